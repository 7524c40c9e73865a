"""seqio data sources over the prepared corpora.

Corpus ``NAME`` is read from ``<data root>/NAME/{train,validation}.tfrecord-*``,
the layout written by ``protlm prepare --output <data root>/NAME``; the root
is the one data-location setting of :mod:`protlm_jax.data.locations`
(re-exported here: ``set_data_dir``, ``data_dir``, ``corpus_dir``), resolved
each time a dataset is built, not at import.
"""

from __future__ import annotations

import os
from typing import Iterator, Mapping

import seqio
import tensorflow as tf

from protlm_jax.data.locations import (ENV_VAR, corpus_dir, data_dir,  # noqa: F401
                                       set_data_dir)

SPLITS = ("train", "validation")


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
