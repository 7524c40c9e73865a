"""``protlm analyze``: what the embeddings learned, as pictures and numbers.

    protlm analyze aminoacids --model M --output DIR [--fasta F] [--proteins 200]
    protlm analyze proteins (--embeddings H5 | --model M) (--labels CSV | --task scl2205)
                            --output DIR [--fasta F]

Every run writes its pictures (PNG, and HTML: interactive plotly, offline)
and its numbers (JSON) into DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from protlm_jax.analyze import aminoacids, proteins, stats
from protlm_jax.data import sample
from protlm_jax.embed import io as embed_io
from protlm_jax.errors import ProtlmError


def _common(p: argparse.ArgumentParser, perplexity: float, neighbors: int) -> None:
    p.add_argument("--output", required=True, metavar="DIR", help="folder for the files")
    p.add_argument("--method", nargs="+", default=["tsne"], choices=stats.METHODS,
                   help="2-D projections (default tsne; several draw one picture each)")
    p.add_argument("--metric", default="cosine", choices=stats.METRICS,
                   help="embedding distance (default cosine)")
    p.add_argument("--perplexity", type=float, default=perplexity,
                   help=f"t-SNE perplexity (default {perplexity:g})")
    p.add_argument("--neighbors", type=int, default=neighbors,
                   help=f"UMAP neighbours (default {neighbors})")
    p.add_argument("--seed", type=int, default=0, help="seed of everything random (default 0)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="MODEL_DIR: the checkpoint step (default the latest)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="analyze_command", required=True)
    a = sub.add_parser(
        "aminoacids", help="the 20 amino acids' embeddings against their biophysics",
        description="Input embeddings (layer 0 of each residue alone) and mean contextual "
        "embeddings (over a FASTA) of the 20 standard amino acids, for the model and a random "
        "init of its config: projections coloured by biophysical group, and the Spearman "
        "correlation of embedding distances with hydrophobicity, volume and charge "
        "differences, with permutation p-values.")
    a.add_argument("--model", required=True, metavar="DIR",
                   help="a training MODEL_DIR or a Hugging Face directory (any family)")
    a.add_argument("--fasta", default=str(sample.SAMPLE), metavar="FILE",
                   help="proteins of the contextual view (default the bundled UniProt sample)")
    a.add_argument("--proteins", type=int, default=200, metavar="N",
                   help="the first N records of --fasta (default 200)")
    a.add_argument("--permutations", type=int, default=9999, metavar="N",
                   help="of each permutation test (default 9999)")
    _common(a, perplexity=5.0, neighbors=10)
    r = sub.add_parser(
        "proteins", help="per-protein maps and how well labels separate",
        description="Projects per-protein embeddings (an HDF5 of `protlm embed --per_protein`, "
        "or embedded here with --model) coloured by labels (CSV identifier,label, or "
        "--task scl2205), with leave-one-out k-NN accuracy and silhouette against amino-acid "
        "composition. Proteins without a label are drawn as UNKNOWN.")
    src = r.add_mutually_exclusive_group(required=True)
    src.add_argument("--embeddings", metavar="H5", help="per-protein vectors")
    src.add_argument("--model", metavar="DIR", help="embed the proteins (of --task or --fasta)")
    lab = r.add_mutually_exclusive_group(required=True)
    lab.add_argument("--labels", metavar="CSV", help="identifier,label annotations")
    lab.add_argument("--task", choices=proteins.TASKS, help="a built-in task's labels")
    r.add_argument("--fasta", metavar="FILE",
                   help="sequences (composition baseline; with --model, what is embedded)")
    r.add_argument("--limit", type=int, default=None, metavar="N",
                   help="with --model: at most N proteins (seeded)")
    r.add_argument("--max_length", type=int, default=None, metavar="N",
                   help="with --model: leave out (and count) longer proteins")
    r.add_argument("--random_init", action="store_true",
                   help="with --model: also score a random init of its config")
    r.add_argument("--k", type=int, default=5, help="neighbours of the k-NN vote (default 5)")
    r.add_argument("--data_dir", default=None, metavar="DIR", help="fetched data (--task)")
    _common(r, perplexity=30.0, neighbors=15)


def _summary(result: dict) -> str:
    return json.dumps({k: v for k, v in result.items() if k not in ("files",)})


def run(args: argparse.Namespace) -> int:
    if args.analyze_command == "aminoacids":
        if args.proteins < 1:
            raise ProtlmError(f"--proteins must be at least 1, got {args.proteins}")
        embedder = embed_io.load_model(args.model, args.step)
        result = aminoacids.analyze(
            embedder, args.output, fasta=args.fasta, proteins=args.proteins,
            methods=args.method, metric=args.metric, perplexity=args.perplexity,
            neighbors=args.neighbors, permutations=args.permutations, seed=args.seed,
            model_name=os.path.basename(os.path.normpath(args.model)))
        print(json.dumps(result["correlations"]))
    else:
        if args.model is None and (args.limit is not None or args.max_length is not None
                                   or args.random_init):
            raise ProtlmError("--limit, --max_length and --random_init go with --model")
        if args.task:
            labels, sequences = proteins.task_proteins(args.task, args.data_dir)
            labels_source = args.task
        else:
            labels, sequences = proteins.read_labels(args.labels), None
            labels_source = args.labels
        if args.fasta:
            sequences = proteins.read_sequences(args.fasta)
        extra, baselines, resolve = {}, {}, None
        if args.model is not None:
            if sequences is None:
                raise ProtlmError("--model needs the sequences to embed: give --fasta or --task")
            records, longer = proteins.select(sequences, limit=args.limit,
                                              max_length=args.max_length, seed=args.seed)
            if longer:
                extra["left_out_longer_than_max_length"] = longer
            if not records:
                raise ProtlmError(f"no protein is at most --max_length {args.max_length}")
            embedder = embed_io.load_model(args.model, args.step)
            vectors = proteins.embed_vectors(embedder, records)
            if args.random_init:
                baselines["random_init"] = proteins.embed_vectors(
                    embedder.with_random_params(args.seed), records)
            source = os.path.basename(os.path.normpath(args.model))
        else:
            vectors, resolve = proteins.read_h5(args.embeddings)
            source = args.embeddings
        result = proteins.analyze(
            vectors, labels, args.output, sequences=sequences, baselines=baselines,
            resolve=resolve, extra=extra, labels_source=labels_source,
            embeddings_source=source, strict=args.labels is not None and args.model is None,
            methods=args.method, metric=args.metric, perplexity=args.perplexity,
            neighbors=args.neighbors, k=args.k, seed=args.seed)
        print(_summary(result))
    print(f"protlm analyze: wrote {', '.join(result['files'])} to {args.output}",
          file=sys.stderr)
    return 0
