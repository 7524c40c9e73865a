"""``protlm plan``: its arguments; the planning is :mod:`protlm_jax.plan`."""

from __future__ import annotations

import argparse
import json
from typing import Any, Sequence

from protlm_jax import plan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``protlm plan``'s own options (gin options are the caller's).

    Args:
      parser: the ``plan`` subcommand's parser.
    """
    parser.add_argument("--mesh", default=None, metavar="DATAxMODEL",
                        help="mesh to compile for (default: all devices, the gin "
                        "MODEL_PARALLEL_SIZE on the model axis); on a CPU host the "
                        "devices are simulated")
    parser.add_argument("--peak_tflops", type=float, default=None, metavar="T",
                        help="peak TFLOP/s per device (default: the gin "
                        "PEAK_FLOPS_PER_DEVICE), e.g. 61.5 for a TPU v3 core")
    parser.add_argument("--mfu", type=float, default=0.5,
                        help="assumed FLOP utilisation for the expected time (default 0.5)")
    parser.add_argument("--batch_per_data_shard", type=int, default=None, metavar="N",
                        help="rows per data shard; the global batch becomes N x data "
                        "(default: the gin BATCH_SIZE)")
    parser.add_argument("--target_mesh", default=None, metavar="DATAxMODEL",
                        help="also report throughput on this mesh (same model axis, "
                        "same rows per data shard), e.g. 128x8")
    parser.add_argument("--rule_set", default=None, choices=("1d", "2d"),
                        help="logical-axis rules (default: the gin TrainConfig.rule_set)")
    parser.add_argument("--no_flop_probes", action="store_true",
                        help="report XLA's FLOPs as compiled, even when scanned "
                        "loops make them an undercount")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def run(args: argparse.Namespace, configs: Sequence[Any]) -> dict:
    """Plans and prints (a table, or JSON with ``--json``)."""
    result = plan.plan_configs(configs, mesh=args.mesh, peak_tflops=args.peak_tflops,
                               mfu=args.mfu, batch_per_data_shard=args.batch_per_data_shard,
                               target_mesh=args.target_mesh, rule_set=args.rule_set,
                               flop_probes=not args.no_flop_probes)
    print(json.dumps(result, indent=1) if args.json else plan.format_plan(result))
    return result
