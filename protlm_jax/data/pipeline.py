"""Training input: seqio task → feature converter → per-process batches.

The global batch of step ``t`` is the concatenation, over ``num_data_shards``
data shards, of each shard's ``t``-th local batch (``seqio.ShardInfo``). A
process reads only the shards it owns (``num_data_shards / process_count`` of
them), so the same global batches come out whether one process reads every
shard or several processes each read their own: multi-host runs equal
single-host runs, and a resumed run equals an uninterrupted one (the data
position is the number of batches consumed, skipped on restore).
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, Mapping, Optional

import numpy as np
import seqio

from protlm_jax.data.feature_converters import MLMFeatureConverter, PLMFeatureConverter


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """What the trainer reads.

    Attributes:
      task: a seqio task or mixture name.
      feature_lengths: task feature lengths, e.g. ``{"inputs": 512, "targets": 512}``.
      split: the split to read.
      pack: pack several examples per row (seqio feature converters).
      shuffle: shuffle (seeded) — train yes, eval no.
      num_data_shards: data streams making up a global batch (default: the
        number of processes). Fix it to compare runs on different host counts.
      use_cached: read seqio's offline cache when present.
    """

    task: str
    feature_lengths: Mapping[str, int]
    split: str = "train"
    pack: bool = True
    shuffle: bool = True
    num_data_shards: Optional[int] = None
    use_cached: bool = False


def feature_converter(task_name: str, pack: bool):
    """The seqio converter for a task, by its output features: MLM (``mlm_weights``),
    permutation LM (``perm_index``; never packed), else encoder-decoder."""
    task = seqio.get_mixture_or_task(task_name)
    if "perm_index" in task.output_features:
        return PLMFeatureConverter(pack=False)
    if "mlm_weights" in task.output_features:
        return MLMFeatureConverter(pack=pack)
    return seqio.EncDecFeatureConverter(pack=pack)


def _shard_stream(config: DataConfig, shard: int, num_shards: int, local_batch: int,
                  seed: int, num_epochs: Optional[int]):
    ds = seqio.get_dataset(
        config.task, dict(config.feature_lengths), dataset_split=config.split,
        shuffle=config.shuffle, num_epochs=num_epochs, seed=seed,
        shard_info=seqio.ShardInfo(index=shard, num_shards=num_shards),
        use_cached=config.use_cached,
        feature_converter=feature_converter(config.task, config.pack))
    # Training streams repeat, so every batch is full. A finite pass (eval)
    # keeps its last, partial batch; `batches` pads it with zero-weight rows.
    return ds.batch(local_batch, drop_remainder=num_epochs is None)


def _zero_rows(batch: dict[str, np.ndarray], rows: int) -> dict[str, np.ndarray]:
    """``batch`` padded with all-zero rows (weight 0: they add nothing) to ``rows``."""
    return {k: np.concatenate([v, np.zeros((rows - v.shape[0],) + v.shape[1:], v.dtype)])
            for k, v in batch.items()}


def batches(config: DataConfig, global_batch_size: int, *, seed: int,
            start_batch: int = 0, num_epochs: Optional[int] = None,
            process_index: int = 0, process_count: int = 1
            ) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's rows of each global batch, from ``start_batch`` on.

    Args:
      config: what to read.
      global_batch_size: rows of one global batch (all processes together).
      seed: the data seed (shuffling and random preprocessing).
      start_batch: batches already consumed (resume).
      num_epochs: None repeats forever (training); 1 for one pass (eval).
      process_index, process_count: this process among all.

    Yields:
      dicts of int32 arrays ``[global_batch_size / process_count, length]``.
    """
    num_shards = config.num_data_shards or process_count
    if num_shards % process_count or global_batch_size % num_shards:
        raise ValueError(
            f"num_data_shards {num_shards} must be a multiple of the process count "
            f"{process_count} and divide the batch size {global_batch_size}")
    per_process = num_shards // process_count
    mine = range(process_index * per_process, (process_index + 1) * per_process)
    local = global_batch_size // num_shards
    streams = [_shard_stream(config, s, num_shards, local, seed, num_epochs)
               .skip(start_batch).as_numpy_iterator() for s in mine]
    if num_epochs is None:
        while True:
            parts = [next(stream) for stream in streams]
            yield {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
    # A finite pass reads every example: partial batches and shards that end
    # early are padded with zero-weight rows until the last shard is done.
    like = None
    while True:
        parts = [next(stream, None) for stream in streams]
        if all(p is None for p in parts):
            return
        like = like or next(p for p in parts if p is not None)
        parts = [_zero_rows(p if p is not None else {k: v[:0] for k, v in like.items()},
                            local) for p in parts]
        yield {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}
