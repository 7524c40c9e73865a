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
import logging
from typing import Iterator, List, Mapping, Optional

import numpy as np
import seqio
import tensorflow as tf

from protlm_jax.data.feature_converters import (MLMFeatureConverter, PLMFeatureConverter,
                                               StreamConverter)
from protlm_jax.errors import ProtlmError

log = logging.getLogger(__name__)


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
    """The seqio converter for a task, by its output features: causal-LM stream
    (``stream``: :class:`StreamConverter`), MLM (``mlm_weights``), permutation
    LM (``perm_index``; never packed), else encoder-decoder."""
    task = seqio.get_mixture_or_task(task_name)
    if "stream" in task.output_features:
        return StreamConverter()
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


def shard_files(config: DataConfig) -> List[str]:
    """The files a run reads (every file-backed task of the task or mixture),
    checked before training: none, or all empty, is a one-line error; some
    empty gets a warning (the run reads less data than the corpus suggests).

    Raises:
      ProtlmError: a task with no shard files for the split, or only empty ones.
    """
    task = seqio.get_mixture_or_task(config.task)
    tasks = getattr(task, "tasks", None) or [task]
    out = []
    for t in tasks:
        list_shards = getattr(t.source, "list_shards", None)
        if list_shards is None:
            continue  # not read from files (a function source)
        try:
            shards = sorted(list_shards(config.split))
        except (tf.errors.OpError, ValueError, KeyError) as e:
            raise ProtlmError(f"task {t.name}: cannot list its {config.split} shards "
                              f"({type(e).__name__}: {e})") from None
        if not shards:
            raise ProtlmError(f"task {t.name}: no {config.split} shard files (`protlm "
                              "prepare` writes them; check the data dir)")
        gone = [f for f in shards if not tf.io.gfile.exists(f)]
        if gone:
            raise ProtlmError(f"{gone[0]}: shard file is gone (listed earlier; "
                              f"{len(gone)} of {len(shards)} missing)")
        empty = [f for f in shards if tf.io.gfile.stat(f).length == 0]
        if len(empty) == len(shards):
            raise ProtlmError(f"task {t.name}: all {len(shards)} {config.split} shard files "
                              f"are empty ({shards[0]}, …)")
        if empty:
            log.warning("task %s: %d of %d %s shard files are empty (%s): training reads "
                        "the other %d", t.name, len(empty), len(shards), config.split,
                        ", ".join(empty[:3]) + (", …" if len(empty) > 3 else ""),
                        len(shards) - len(empty))
        out += shards
    return out


def bad_shard(files: List[str]) -> Optional[str]:
    """``FILE: reason`` of the first unreadable TFRecord file (read one by one,
    after a read error that did not name it), or None."""
    for f in files:
        n = 0
        try:
            for record in tf.data.TFRecordDataset(f).as_numpy_iterator():
                tf.train.Example.FromString(record)
                n += 1
        except (tf.errors.OpError, ValueError) as e:
            reason = getattr(e, "message", str(e)).split("\n")[0]
            return f"{f}: corrupt or truncated TFRecord shard after {n:,} records ({reason})"
        except Exception as e:  # protobuf's DecodeError
            return f"{f}: record {n + 1:,} is not a tf.train.Example ({type(e).__name__})"
    return None


def _guarded(gen: Iterator, files: List[str], task: str) -> Iterator:
    """Read errors as one line naming the bad file; an exhausted stream as such."""
    try:
        yield from gen
    except (tf.errors.DataLossError, tf.errors.InvalidArgumentError) as e:
        where = bad_shard(files) or f"task {task}: {e.message.splitlines()[0]}"
        raise ProtlmError(where) from None
    except _RanOut:
        raise ProtlmError(f"task {task}: no examples left after preprocessing (every "
                          "record filtered out?)") from None


class _RanOut(Exception):
    """A repeating stream that yielded nothing."""


def batches(config: DataConfig, global_batch_size: int, *, seed: int,
            start_batch: int = 0, num_epochs: Optional[int] = None,
            process_index: int = 0, process_count: int = 1
            ) -> Iterator[dict[str, np.ndarray]]:
    """Yields this process's rows of each global batch, from ``start_batch`` on.

    The shard files are checked first (:func:`shard_files`); a read error
    names the bad file.

    Args:
      config: what to read.
      global_batch_size: rows of one global batch (all processes together).
      seed: the data seed (shuffling and random preprocessing).
      start_batch: batches already consumed (resume).
      num_epochs: None repeats forever (training); 1 for one pass (eval).
      process_index, process_count: this process among all.

    Yields:
      dicts of int32 arrays ``[global_batch_size / process_count, length]``.

    Raises:
      ProtlmError: no or only empty shard files, a corrupt shard, no examples.
    """
    files = shard_files(config)
    return _guarded(_batches(config, global_batch_size, seed=seed, start_batch=start_batch,
                             num_epochs=num_epochs, process_index=process_index,
                             process_count=process_count), files, config.task)


def _batches(config: DataConfig, global_batch_size: int, *, seed: int,
            start_batch: int = 0, num_epochs: Optional[int] = None,
            process_index: int = 0, process_count: int = 1
            ) -> Iterator[dict[str, np.ndarray]]:
    """:func:`batches` without the checks."""
    num_shards = config.num_data_shards or process_count
    if num_shards % process_count or global_batch_size % num_shards:
        raise ValueError(
            f"num_data_shards {num_shards} must be a multiple of the process count "
            f"{process_count} and divide the batch size {global_batch_size}")
    per_process = num_shards // process_count
    mine = range(process_index * per_process, (process_index + 1) * per_process)
    local = global_batch_size // num_shards
    if isinstance(feature_converter(config.task, config.pack), StreamConverter):
        streams = [column_segments(config, s, num_shards, local, seed, num_epochs, start_batch)
                   for s in mine]
    else:
        streams = [_shard_stream(config, s, num_shards, local, seed, num_epochs)
                   .skip(start_batch).as_numpy_iterator() for s in mine]
    if num_epochs is None:
        while True:
            try:
                parts = [next(stream) for stream in streams]
            except StopIteration:
                raise _RanOut() from None
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


# ------------------------------------------------------ causal-LM streams ---

def column_segments(config: DataConfig, shard: int, num_shards: int, columns: int,
                    seed: int, num_epochs: Optional[int], start_batch: int = 0
                    ) -> Iterator[dict[str, np.ndarray]]:
    """One data shard's ``columns`` token streams, one segment per batch.

    The shard's proteins (each ``residues <eos>``, in its seeded order) are
    dealt to the columns as they need them: at every batch, column 0 first,
    a column short of ``S + 1`` tokens appends the shard's next protein. So
    segment t + 1 of a column continues segment t exactly (the last target
    of one is the first input of the next), and everything is a function of
    (seed, batch): a resumed run replays ``start_batch`` batches of this
    bookkeeping (no model work) and reads exactly what it would have read.
    A finite pass (``num_epochs``) ends when every column is empty; columns
    that run out first are padded with weight 0.

    Yields:
      dicts of int32 ``inputs``, ``targets``, ``weights`` [columns, S].
    """
    task = seqio.get_mixture_or_task(config.task)
    seg = int(config.feature_lengths["stream"])
    ds = task.get_dataset(sequence_length=None, split=config.split, shuffle=config.shuffle,
                          seed=seed, shard_info=seqio.ShardInfo(index=shard,
                                                                num_shards=num_shards),
                          num_epochs=num_epochs, use_cached=config.use_cached,
                          trim_output_features=False)
    proteins = (np.asarray(x["stream"], np.int32) for x in ds.as_numpy_iterator())
    buffers = [np.zeros(0, np.int32) for _ in range(columns)]
    exhausted, batch = False, 0
    while True:
        inputs = np.zeros((columns, seg), np.int32)
        targets = np.zeros((columns, seg), np.int32)
        weights = np.zeros((columns, seg), np.int32)
        for c in range(columns):
            parts = [buffers[c]]
            have = len(buffers[c])
            while have < seg + 1 and not exhausted:
                nxt = next(proteins, None)
                if nxt is None:
                    exhausted = True
                    break
                parts.append(nxt)
                have += len(nxt)
            buf = np.concatenate(parts) if len(parts) > 1 else parts[0]
            n = max(min(len(buf) - 1, seg), 0)
            inputs[c, :n] = buf[:n]
            targets[c, :n] = buf[1:n + 1]
            weights[c, :n] = 1
            buffers[c] = buf[n:] if n else buf[:0] if exhausted else buf
        if exhausted and not weights.any():
            return
        if batch >= start_batch:
            yield {"inputs": inputs, "targets": targets, "weights": weights}
        batch += 1

