"""``protlm probe``: fit and score a probe head on a task (arguments and run).

    protlm probe --task ss_casp12 --model MODEL_DIR --output OUT
    protlm probe --task scl2205 --embeddings scl.h5 --head light_attention --output OUT
    protlm probe --task netsurfp:Train_HHblits.csv,CASP12_HHblits.csv --baseline onehot \\
        --output OUT
    protlm probe --write_test_fasta probe_test_sets.fasta   # for prepare --exclude

Writes ``OUT/result.json``, ``OUT/results.md`` (with the majority-class and
one-hot / composition baseline rows, always computed beside the model) and
``OUT/learning_curve.png``.
"""

from __future__ import annotations

import argparse
import os
import sys

from protlm_jax import embed
from protlm_jax.errors import ProtlmError
from protlm_jax.probes import datasets, evaluate, features, heads, train


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--task", metavar="SPEC",
                   help=f"one of: {datasets.TASK_SPECS}")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--model", metavar="DIR",
                        help="embed with a training MODEL_DIR (latest checkpoint)")
    source.add_argument("--embeddings", metavar="H5",
                        help="embeddings written by `protlm embed` (per residue for "
                        "cnn / light_attention; per residue or per protein for fnn)")
    source.add_argument("--baseline", choices=("onehot", "composition"),
                        help="only the baseline (default when no --model/--embeddings)")
    p.add_argument("--step", type=int, default=None, metavar="N",
                   help="checkpoint step with --model (default: latest)")
    p.add_argument("--head", choices=heads.HEADS, default=None,
                   help="cnn (per-residue tasks, default), fnn (per-protein, default) "
                   "or light_attention")
    p.add_argument("--train_limit", type=int, default=None, metavar="N",
                   help="at most N training proteins (random, seeded)")
    p.add_argument("--test_limit", type=int, default=None, metavar="N",
                   help="at most N proteins per test set (default: all)")
    p.add_argument("--max_train_length", type=int, default=None, metavar="N",
                   help="drop longer training proteins")
    p.add_argument("--max_test_length", type=int, default=None, metavar="N",
                   help="drop longer test proteins before --test_limit (models with "
                   "learned positions; not the published test sets then)")
    p.add_argument("--epochs", type=int, default=None, metavar="N",
                   help="maximum epochs (default 30; light attention 200)")
    p.add_argument("--patience", type=int, default=None, metavar="N",
                   help="early-stopping patience in epochs (default 5; light attention 80 "
                   "as published)")
    p.add_argument("--learning_rate", type=float, default=None, metavar="LR",
                   help="AdamW learning rate (default 1e-3; light attention 5e-5)")
    p.add_argument("--batch_size", type=int, default=None, metavar="N",
                   help="proteins per per-protein batch (default 64; light attention 150)")
    p.add_argument("--token_budget", type=int, default=8192, metavar="N",
                   help="residues per per-residue batch (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data_dir", default=None, metavar="DIR",
                   help="fetched data (default data/fetched)")
    p.add_argument("--output", metavar="OUT_DIR", help="where result.json, results.md "
                   "and learning_curve.png go")
    p.add_argument("--write_test_fasta", metavar="FASTA",
                   help="write the probe TEST sequences (CASP12 validation chains, "
                   "SCL2205 test) as FASTA for `protlm prepare --exclude`, then stop")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")


def _config(args, head: str):
    base = train.LIGHT_ATTENTION_PAPER if head == "light_attention" else train.ProbeConfig()
    overrides = {"max_epochs": args.epochs if args.epochs is not None else
                 (200 if head == "light_attention" else base.max_epochs),
                 "token_budget": args.token_budget, "seed": args.seed}
    for field, value in (("patience", args.patience), ("learning_rate", args.learning_rate),
                         ("batch_size", args.batch_size)):
        if value is not None:
            overrides[field] = value
    for field in ("max_epochs", "patience", "batch_size", "token_budget"):
        if overrides.get(field, 1) < 1:
            raise ProtlmError(f"--{field.replace('max_', '')} must be positive")
    import dataclasses

    return dataclasses.replace(base, **overrides)


def check_subset_options(args: argparse.Namespace) -> None:
    """--train_limit / --test_limit / --max_train_length are positive when given."""
    for name in ("train_limit", "test_limit", "max_train_length", "max_test_length"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ProtlmError(f"--{name} must be positive, got {value}")


def run(args: argparse.Namespace) -> int:
    if args.write_test_fasta:
        n = datasets.write_test_fasta(args.write_test_fasta, args.data_dir)
        print(f"protlm probe: wrote {n:,} probe test sequences → {args.write_test_fasta}",
              file=sys.stderr)
        return 0
    if not args.task:
        raise ProtlmError("probe: --task is required (or --write_test_fasta)")
    if not args.output:
        raise ProtlmError("probe: --output OUT_DIR is required")
    check_subset_options(args)
    if args.model and not os.path.isdir(args.model):
        raise ProtlmError(f"{args.model}: no such model directory")
    if args.embeddings and not os.path.exists(args.embeddings):
        raise ProtlmError(f"{args.embeddings}: no such file")
    task = datasets.load_task(args.task, args.data_dir, train_limit=args.train_limit,
                              test_limit=args.test_limit,
                              max_train_length=args.max_train_length,
                              max_test_length=args.max_test_length, seed=args.seed)
    if any(task.left_out.values()):
        print(f"protlm probe: left out test proteins longer than --max_test_length "
              f"{args.max_test_length:,}: " + ", ".join(
                  f"{k} {n:,}" for k, n in task.left_out.items()), file=sys.stderr)
    head = args.head or evaluate.default_head(task)
    if args.baseline == "composition" and head != "fnn":
        raise ProtlmError(f"--baseline composition is per protein: use --head fnn, "
                          f"not {head}")
    rows = []
    if args.model:
        name = os.path.basename(os.path.normpath(args.model))
        rows.append(features.ModelFeatures(embed.load_model(args.model, args.step),
                                           name=f"model ({name})"))
    elif args.embeddings:
        rows.append(features.H5Features(args.embeddings,
                                        name=f"embeddings ({os.path.basename(args.embeddings)})"))
    rows.append(features.OneHot())  # the baseline, always beside the model
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    result = evaluate.run_task(task, rows, head=head, config=_config(args, head), log=log)
    paths = evaluate.write_outputs(result, args.output)
    print(evaluate.markdown_table(result))
    print(f"protlm probe: wrote {', '.join(paths.values())}", file=sys.stderr)
    return 0
