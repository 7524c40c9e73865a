"""``protlm finetune``: LoRA, full or head-only fine-tuning; merging; PEFT export.

    protlm finetune --model MODEL_DIR|HF_DIR --task scl2205 --method lora --output OUT
    protlm finetune --model M --task contact_number --method full --epochs 20 --output OUT
    protlm finetune --gin_file gin/runs/finetune_lora.gin --model M --task ss_casp12 --output OUT
    protlm finetune --merge --model BASE --adapter OUT --output MERGED_MODEL_DIR
    protlm finetune --export_peft --model BASE_HF_DIR --adapter OUT --output PEFT_DIR

Flags given on the command line win over a gin file's ``FinetuneConfig``
bindings, which win over the defaults (ProtTrans' LoRA recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from protlm_jax.cli import probe as probe_cmd
from protlm_jax.errors import ProtlmError
from protlm_jax.finetune import lora as lora_lib
from protlm_jax.finetune import run as run_lib
from protlm_jax.finetune import tasks as tasks_lib
from protlm_jax.finetune import train as train_lib
from protlm_jax.hf import peft as hf_peft

# Flags that set FinetuneConfig fields (None: not given).
_CONFIG_FLAGS = ("method", "rank", "alpha", "learning_rate", "epochs", "patience",
                 "batch_size", "accumulate", "seed", "dropout", "weight_decay", "head")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="DIR", help="the base: a MODEL_DIR or a Hugging Face "
                   "directory (any registered family); only read")
    p.add_argument("--task", metavar="SPEC", help=f"one of: {tasks_lib.TASK_SPECS}")
    p.add_argument("--output", metavar="DIR", help="where the adapters/head, results and "
                   "the resumable state go (rerun to resume)")
    p.add_argument("--method", choices=train_lib.METHODS, default=None,
                   help="lora (default), full or head")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default 4)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default 1)")
    p.add_argument("--targets", default=None, metavar="q,k,v,o",
                   help="LoRA targets (default q,k,v,o)")
    p.add_argument("--no_train_norms", action="store_true",
                   help="LoRA: keep the layer norms frozen (default: trained)")
    p.add_argument("--learning_rate", type=float, default=None, help="AdamW (default 3e-4)")
    p.add_argument("--weight_decay", type=float, default=None)
    p.add_argument("--epochs", type=int, default=None, help="at most (default 10)")
    p.add_argument("--patience", type=int, default=None,
                   help="early-stopping patience in epochs (default 3)")
    p.add_argument("--batch_size", type=int, default=None,
                   help="proteins per micro-batch (default 8)")
    p.add_argument("--accumulate", type=int, default=None,
                   help="micro-batches per update (default 1)")
    p.add_argument("--dropout", type=float, default=None, help="head dropout (default 0.2)")
    p.add_argument("--head", choices=train_lib.HEADS, default=None,
                   help="per-residue head: linear (default, the LoRA notebooks) or cnn "
                   "(the ProtTrans secondary-structure CNN)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 encoder activations")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--train_limit", type=int, default=None, metavar="N")
    p.add_argument("--test_limit", type=int, default=None, metavar="N")
    p.add_argument("--max_train_length", type=int, default=None, metavar="N")
    p.add_argument("--max_test_length", type=int, default=None, metavar="N",
                   help="drop longer test proteins before --test_limit (as probe)")
    p.add_argument("--data_dir", default=None, metavar="DIR",
                   help="fetched data (default data/fetched)")
    p.add_argument("--model_parallel_size", type=int, default=1,
                   help="devices on the model axis of the mesh (default 1)")
    p.add_argument("--gin_file", action="append", default=[],
                   help="gin file binding FinetuneConfig (gin/runs/finetune_lora.gin …)")
    p.add_argument("--merge", action="store_true",
                   help="write --output as a MODEL_DIR of --model + --adapter merged")
    p.add_argument("--export_peft", action="store_true",
                   help="write --output as a Hugging Face PEFT adapter for --model "
                   "(the base exported with `protlm export-hf --encoder_only`)")
    p.add_argument("--adapter", metavar="DIR", help="a `protlm finetune` output "
                   "(with --merge / --export_peft)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")


def config_from_args(args: argparse.Namespace, gin_defaults=None) -> train_lib.FinetuneConfig:
    base = gin_defaults or train_lib.FinetuneConfig()
    overrides = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    if args.targets is not None:
        overrides["targets"] = lora_lib.check_targets(args.targets.split(","))
    if args.no_train_norms:
        overrides["train_norms"] = False
    if args.bf16:
        overrides["bf16"] = True
    return dataclasses.replace(base, **overrides)  # validated on construction


def run(args: argparse.Namespace, gin_defaults=None) -> int:
    for name in ("model", "output"):
        if not getattr(args, name):
            raise ProtlmError(f"finetune: --{name} is required")
    if args.merge or args.export_peft:
        if not args.adapter:
            raise ProtlmError("finetune: --adapter DIR is required with --merge / "
                              "--export_peft")
        if args.merge:
            summary = run_lib.merge(args.model, args.adapter, args.output)
            print(f"protlm finetune --merge: {summary['parameters']:,} parameters "
                  f"({summary['family']}) → {args.output}", file=sys.stderr)
        else:
            summary = hf_peft.export(args.model, args.adapter, args.output)
            print(f"protlm finetune --export_peft: {summary['tensors']} tensors → "
                  f"{args.output}", file=sys.stderr)
        return 0
    if not args.task:
        raise ProtlmError("finetune: --task is required")
    probe_cmd.check_subset_options(args)
    config = config_from_args(args, gin_defaults)
    task = tasks_lib.load_task(args.task, args.data_dir, train_limit=args.train_limit,
                               test_limit=args.test_limit,
                               max_train_length=args.max_train_length,
                               max_test_length=args.max_test_length, seed=config.seed)
    log = None if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))
    result = run_lib.finetune(args.model, task, config, args.output,
                              model_parallel_size=args.model_parallel_size, log=log)
    print(run_lib.markdown(result, task))
    print(f"protlm finetune: wrote {args.output}/result.json, results.md, "
          f"learning_curve.png, {run_lib.ARTIFACT}", file=sys.stderr)
    return 0
