"""``make demo``: the project end to end on the bundled real sample.

Stages (later issues add training, embedding, probes and export):
  1. prepare   ``data/sample/uniprot_sample.fasta.gz`` (2,000 real UniProtKB
               records) → TFRecord shards + stats.json with ``protlm prepare``;
  2. examples  decoded examples of each pretraining task read from those shards.

Run as ``python -m protlm_jax.demo --workdir DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
from typing import Optional, Sequence

SAMPLE = pathlib.Path(__file__).resolve().parents[1] / "data" / "sample" / \
    "uniprot_sample.fasta.gz"
CORPUS = "uniprot_sample"
TASKS = ("prott5", "t5_span_corruption", "mlm")


def _banner(text: str) -> None:
    print(f"\n{'=' * 78}\n{text}\n{'=' * 78}", flush=True)


def prepare_sample(out: pathlib.Path) -> dict:
    """``protlm prepare`` of the bundled sample into ``out``; returns stats.json."""
    from protlm_jax import cli

    code = cli.main(["prepare", "--input", str(SAMPLE), "--output", str(out),
                     "--num_shards", "4", "--validation_fraction", "0.05", "--dedup"])
    if code:
        raise SystemExit(code)
    return json.loads((out / "stats.json").read_text())


def stage_prepare(workdir: pathlib.Path) -> pathlib.Path:
    """Prepares the bundled sample; returns the data dir holding the corpus."""
    data_dir = workdir / "data"
    out = data_dir / CORPUS
    _banner(f"1. protlm prepare --input {SAMPLE.name} --output {out}")
    stats = prepare_sample(out)
    print(json.dumps(stats, indent=1))
    return data_dir


def stage_examples(data_dir: pathlib.Path) -> None:
    """Prints decoded examples of every task on the prepared sample."""
    from protlm_jax import inspect_tasks

    for objective in TASKS:
        task = f"{CORPUS}_{objective}"
        _banner(f"2. protlm examples --task {task}")
        print(inspect_tasks.format_examples(
            task, {"inputs": 96, "targets": 96}, split="validation", num=2,
            data_dir=str(data_dir)))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default="/tmp/protlm-demo",
                        help="where the demo writes (default /tmp/protlm-demo)")
    args = parser.parse_args(argv)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    workdir = pathlib.Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    data_dir = stage_prepare(workdir)
    stage_examples(data_dir)
    _banner(f"demo done: shards and stats in {data_dir / CORPUS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
