"""Where data live: one setting for the prepared corpora and the fetched sets.

The data root is, in order:

  * :func:`set_data_dir` (a run's gin ``DATA_DIR``, bound at the entry points);
  * the environment variable ``PROTLM_DATA_DIR`` (a local folder or ``gs://``);
  * ``data/`` of the working directory when it exists, else the ``data/`` of
    the source checkout this package runs from (``pip install -e``), else
    ``data/`` (created where needed).

Under it, corpus ``NAME`` (``protlm prepare --output <root>/NAME``) is read
from ``NAME/{train,validation}.tfrecord-*`` by the seqio tasks, and the data
sets of ``protlm data fetch`` live in ``fetched/``, where the probes and the
probe tasks read them. One corpus can be pointed elsewhere with
``PROTLM_DATA_DIR_<NAME>`` (upper case). Everything is resolved at each use,
not at import. No TensorFlow here: fetch and the probes import it cheaply.
"""

from __future__ import annotations

import os
import pathlib
from typing import Optional

ENV_VAR = "PROTLM_DATA_DIR"
DEFAULT_DATA_DIR = "data"
FETCHED = "fetched"
_CHECKOUT_DATA = pathlib.Path(__file__).resolve().parents[2] / DEFAULT_DATA_DIR

_data_dir: Optional[str] = None


def set_data_dir(path: Optional[str]) -> None:
    """Overrides the data root for this process (None: back to the default)."""
    global _data_dir
    _data_dir = path


def data_dir() -> str:
    """The data root (see the module docstring)."""
    explicit = _data_dir or os.environ.get(ENV_VAR)
    if explicit:
        return explicit
    if os.path.isdir(DEFAULT_DATA_DIR) or not _CHECKOUT_DATA.is_dir():
        return DEFAULT_DATA_DIR
    return str(_CHECKOUT_DATA)


def corpus_dir(corpus: str) -> str:
    """The folder holding the shards of ``corpus``."""
    override = os.environ.get(f"{ENV_VAR}_{corpus.upper()}")
    return override or os.path.join(data_dir(), corpus)


def fetched_dir() -> str:
    """The folder of the data sets ``protlm data fetch`` writes."""
    return os.path.join(data_dir(), FETCHED)
