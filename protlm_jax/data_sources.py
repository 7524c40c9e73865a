"""Where prepared corpora live, and seqio data sources that read them.

One setting decides the location of every corpus, so the same task names read a
local folder or a ``gs://`` bucket:

  * :func:`set_data_dir` (bound from gin at the entry points, e.g.
    ``protlm_jax.data_sources.set_data_dir.path = %DATA_DIR``), else
  * the environment variable ``PROTLM_DATA_DIR``, else
  * ``data/prepared`` under the current directory.

Corpus ``NAME`` is read from ``<data dir>/NAME/{train,validation}.tfrecord-*``,
the layout written by ``protlm prepare --output <data dir>/NAME``. A single
corpus can be pointed elsewhere with ``PROTLM_DATA_DIR_<NAME>`` (upper case).
The location is resolved each time a dataset is built, not at import.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping, Optional

import seqio
import tensorflow as tf

ENV_VAR = "PROTLM_DATA_DIR"
DEFAULT_DATA_DIR = os.path.join("data", "prepared")
SPLITS = ("train", "validation")

_data_dir: Optional[str] = None


def set_data_dir(path: Optional[str]) -> None:
    """Overrides the data directory for this process (None: back to default)."""
    global _data_dir
    _data_dir = path


def data_dir() -> str:
    """The current root of the prepared corpora."""
    return _data_dir or os.environ.get(ENV_VAR) or DEFAULT_DATA_DIR


def corpus_dir(corpus: str) -> str:
    """The folder holding the shards of ``corpus``."""
    override = os.environ.get(f"{ENV_VAR}_{corpus.upper()}")
    return override or os.path.join(data_dir(), corpus)


def shard_pattern(directory: str, split: str) -> str:
    """File pattern of one split's shards as written by ``protlm prepare``."""
    return os.path.join(directory, f"{split}.tfrecord-*")


class _LazySplits(Mapping[str, str]):
    """split → file pattern, resolved against the data dir at every lookup."""

    def __init__(self, corpus: str):
        self._corpus = corpus

    def __getitem__(self, split: str) -> str:
        if split not in SPLITS:
            raise KeyError(split)
        return shard_pattern(corpus_dir(self._corpus), split)

    def __iter__(self) -> Iterator[str]:
        return iter(SPLITS)

    def __len__(self) -> int:
        return len(SPLITS)

    def __repr__(self) -> str:
        return f"<{self._corpus} shards under ${ENV_VAR}: {dict(self)}>"


FEATURE_DESCRIPTION = {
    "id": tf.io.FixedLenFeature([], tf.string),
    "sequence": tf.io.FixedLenFeature([], tf.string),
    "length": tf.io.FixedLenFeature([], tf.int64),
}


def corpus_source(corpus: str) -> seqio.TFExampleDataSource:
    """A seqio source over the prepared shards of ``corpus``."""
    return seqio.TFExampleDataSource(
        split_to_filepattern=_LazySplits(corpus),
        feature_description=FEATURE_DESCRIPTION)
