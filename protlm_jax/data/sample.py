"""The bundled real sample (``data/sample/uniprot_sample.fasta.gz``, 2,000
UniProtKB records; ``data/README.md`` has its attribution), prepared on demand.

The sample ships with the repository, not the wheel: it is found next to the
package of a source checkout (``pip install -e .``, as the Makefile does).
"""

from __future__ import annotations

import json
import pathlib
from typing import Optional

from protlm_jax.data import prepare

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
SAMPLE = REPO_ROOT / "data" / "sample" / "uniprot_sample.fasta.gz"
CORPUS = "uniprot_sample"


def prepare_sample(out: pathlib.Path, *, progress: bool = True,
                   beam_args: Optional[list] = None) -> dict:
    """``protlm prepare`` of the bundled sample into ``out`` (4 shards, 5 %
    validation, deduplicated); returns its ``stats.json``."""
    config = prepare.PrepareConfig(
        inputs=(str(SAMPLE),), output=str(out), num_shards=4, dedup=True,
        validation_fraction=0.05, progress=progress)
    prepare.run(config, beam_args or [])
    return json.loads((pathlib.Path(out) / "stats.json").read_text())
