"""``protlm prepare``: an Apache Beam pipeline from FASTA/FFindex to TFRecords.

    inputs ─ReadAndFilter─▶ records ─[dedup by id, by sequence]─▶ key by
    (split, shard) from the sequence hash ─GroupByKey─▶ sort ─▶ TFRecord shard
                └──────────── per-stage counts ──────────▶ stats.json

Each record becomes ``tf.train.Example{id, sequence, length}``. Output is
deterministic: a record's shard and its place inside the shard depend only on
its sequence and id (a hash), never on worker timing or input order, and
examples serialise deterministically, so the same input gives the same bytes.
Identical sequences land in the same split, so validation never leaks into
training.

Bad input never produces output: structural problems (see ``fasta.py``) are
collected by the pipeline; if any occurred the run fails with the first one as
``FILE:LINE: reason`` and nothing is written to the output folder (shards are
staged in a temporary folder and moved in only after a clean run). Merely
unusable records are dropped and counted by reason, so that
``records_read == records_written + sum(dropped)`` always holds.

Runs on the DirectRunner by default and on any Beam runner through pass-through
pipeline options (``--runner DataflowRunner --project … --temp_location gs://…``).
"""

from __future__ import annotations

import collections
import dataclasses
import glob as globlib
import hashlib
import json
import os
import sys
import uuid
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam

from protlm_jax.data import fasta
from protlm_jax.data.residues import RARE_RESIDUES, RARE_TO_X
from protlm_jax.errors import InputError, ProtlmError

SPLITS = ("train", "validation")
# Upper bin edges (inclusive) of the length histogram; the last bin is open.
HISTOGRAM_EDGES = (32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768,
                   65536)
_GLOB_CHARS = set("*?[")


@dataclasses.dataclass(frozen=True)
class PrepareConfig:
    """What ``protlm prepare`` does.

    Attributes:
      inputs: file names or glob patterns (FASTA, FASTA.gz, FFindex pairs).
      output: the output folder (local or ``gs://``).
      num_shards: number of training shards.
      min_length: records shorter than this are dropped (``too_short``).
      max_length: records longer than this are dropped (``too_long``); 0 = no
        limit.
      dedup: drop records whose id, or whose sequence, was seen before
        (``duplicate_id``, ``duplicate_sequence``); the first in input order is
        kept.
      exclude: FASTA files whose sequences must not appear in the output
        (compared after normalisation, with U Z O B read as X).
      validation_fraction: share of distinct sequences written to the
        ``validation`` split (chosen by hash).
      progress: show progress bars on stderr.
    """

    inputs: tuple[str, ...]
    output: str
    num_shards: int = 16
    min_length: int = 1
    max_length: int = 0
    dedup: bool = False
    exclude: tuple[str, ...] = ()
    validation_fraction: float = 0.0
    progress: bool = True

    def __post_init__(self):
        if self.num_shards < 1:
            raise ProtlmError("--num_shards must be at least 1")
        if self.min_length < 1:
            raise ProtlmError("--min_length must be at least 1")
        if self.max_length and self.max_length < self.min_length:
            raise ProtlmError("--max_length must be at least --min_length")
        if not 0.0 <= self.validation_fraction < 1.0:
            raise ProtlmError("--validation_fraction must be in [0, 1)")

    @property
    def num_validation_shards(self) -> int:
        if self.validation_fraction <= 0:
            return 0
        return max(1, round(self.num_shards * self.validation_fraction))


# ---------------------------------------------------------------------------
# Driver-side helpers
# ---------------------------------------------------------------------------

def _glob(pattern: str) -> list[str]:
    if "://" in pattern:
        import tensorflow as tf

        return tf.io.gfile.glob(pattern)
    return globlib.glob(pattern)


def _exists(path: str) -> bool:
    if "://" in path:
        import tensorflow as tf

        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def expand_inputs(patterns: Sequence[str]) -> list[str]:
    """Expands globs into a sorted, duplicate-free list of inputs.

    An FFindex pair (``x.ffindex`` + ``x.ffdata``) counts once, as its index.

    Raises:
      InputError: a pattern matches nothing, or a named file is missing.
    """
    files: list[str] = []
    for pattern in patterns:
        if _GLOB_CHARS & set(pattern):
            matches = sorted(_glob(pattern))
            if not matches:
                raise InputError(pattern, 0, "cannot read: no file matches this pattern")
        else:
            if not _exists(pattern):
                raise InputError(pattern, 0, "cannot read: No such file or directory")
            matches = [pattern]
        for path in matches:
            if fasta.is_ffindex(path):
                stem = os.path.splitext(path)[0]
                path = stem + ".ffindex"
                for part in (path, stem + ".ffdata"):
                    if not _exists(part):
                        raise InputError(part, 0, "cannot read: FFindex pair is incomplete")
            if path not in files:
                files.append(path)
    return files


def preflight(path: str) -> None:
    """Fails fast on a file that cannot be read or does not start like FASTA."""
    next(iter(fasta.read_records(path)), None)


def canonical_digest(sequence: str) -> bytes:
    """Hash of a sequence as a model sees it (U Z O B read as X)."""
    return hashlib.sha1(sequence.translate(RARE_TO_X).encode("latin-1")).digest()


def load_exclusions(paths: Sequence[str]) -> frozenset[bytes]:
    """Digests of every usable sequence in the exclusion FASTA files."""
    digests = set()
    for path in expand_inputs(paths):
        for record in fasta.read_records(path):
            if fasta.invalid_reason(record.sequence) is None:
                digests.add(canonical_digest(record.sequence))
    return frozenset(digests)


# ---------------------------------------------------------------------------
# Statistics: dicts merged by sum, except min:/max: keys
# ---------------------------------------------------------------------------

def merge_stats(parts: Iterable[dict]) -> dict:
    """Merges count dicts: sums values, keeps the min/max of ``min:``/``max:``."""
    out: dict[str, Any] = {}
    for part in parts:
        for key, value in part.items():
            if key not in out:
                out[key] = value
            elif key.startswith("min:"):
                out[key] = min(out[key], value)
            elif key.startswith("max:"):
                out[key] = max(out[key], value)
            else:
                out[key] += value
    return out


def histogram_bin(length: int) -> int:
    for i, edge in enumerate(HISTOGRAM_EDGES):
        if length <= edge:
            return i
    return len(HISTOGRAM_EDGES)


# ---------------------------------------------------------------------------
# Pipeline stages
# ---------------------------------------------------------------------------

# A record inside the pipeline: (digest, file index, record index, id, sequence).
Rec = tuple[bytes, int, int, str, str]

# Stages emit (kind, value) pairs on one output, split with filters: Beam's Dask
# runner neither separates tagged outputs nor runs more than the pipeline's
# last transform, so the pipeline is one graph ending in one summary write.
RECORD, STATS, ERROR = "record", "stats", "error"


def _records(pcoll, label: str):
    return (pcoll
            | f"Records{label}" >> beam.Filter(lambda kv: kv[0] == RECORD)
            | f"Unwrap{label}" >> beam.Map(lambda kv: kv[1]))


def _not_records(pcoll, label: str):
    return pcoll | f"Events{label}" >> beam.Filter(lambda kv: kv[0] != RECORD)


class ReadAndFilter(beam.DoFn):
    """Reads one input file; emits usable records, per-file stats and errors."""

    def __init__(self, config: PrepareConfig, exclusions: frozenset[bytes]):
        self._config = config
        self._exclusions = exclusions

    def _reason(self, record: fasta.Record) -> Optional[str]:
        if not record.id:
            return "missing_id"
        reason = fasta.invalid_reason(record.sequence)
        if reason:
            return reason
        n = len(record.sequence)
        if n < self._config.min_length:
            return "too_short"
        if self._config.max_length and n > self._config.max_length:
            return "too_long"
        return None

    def process(self, element: tuple[int, str]) -> Iterator[Any]:
        file_index, path = element
        counts: collections.Counter = collections.Counter()
        stats: collections.Counter = collections.Counter()
        bar = None
        if self._config.progress:
            from tqdm import tqdm

            bar = tqdm(total=fasta.input_size(path) or None, unit="B", unit_scale=True,
                       desc=f"read {os.path.basename(path)}", file=sys.stderr,
                       mininterval=1.0, leave=False)
        try:
            for index, record in enumerate(fasta.read_records(
                    path, counts=counts, progress=bar.update if bar is not None else None)):
                stats["records_read"] += 1
                reason = self._reason(record)
                digest = None
                if reason is None:
                    digest = canonical_digest(record.sequence)
                    if digest in self._exclusions:
                        reason = "excluded"
                if reason is not None:
                    stats[f"dropped:{reason}"] += 1
                    continue
                yield RECORD, (digest, file_index, index, record.id, record.sequence)
        except InputError as e:
            yield ERROR, (file_index, e.line, e.path, e.reason)
        finally:
            if bar is not None:
                bar.close()
        stats[f"file:{file_index}"] = stats["records_read"]
        stats.update({f"normalised:{k}": v for k, v in counts.items()})
        yield STATS, dict(stats)


class KeepFirst(beam.DoFn):
    """Of records sharing a key, keeps the first in input order."""

    def __init__(self, reason: str):
        self._reason = reason

    def process(self, element: tuple[Any, Iterable[Rec]]) -> Iterator[Any]:
        _, group = element
        records = sorted(group, key=lambda r: (r[1], r[2]))
        yield RECORD, records[0]
        if len(records) > 1:
            yield STATS, {f"dropped:{self._reason}": len(records) - 1}


def _dedup(records, key_index: int, reason: str, label: str):
    out = (records
           | f"KeyBy{label}" >> beam.Map(lambda r: (r[key_index], r))
           | f"Group{label}" >> beam.GroupByKey()
           | f"KeepFirst{label}" >> beam.ParDo(KeepFirst(reason)))
    return _records(out, label), _not_records(out, label)


def assign_shard(record: Rec, config: PrepareConfig) -> tuple[tuple[str, int], Rec]:
    """(split, shard) from the sequence hash: stable and content-addressed."""
    digest = record[0]
    split_draw = int.from_bytes(digest[8:16], "big") / 2.0 ** 64
    if split_draw < config.validation_fraction:
        split, shards = "validation", config.num_validation_shards
    else:
        split, shards = "train", config.num_shards
    return (split, int.from_bytes(digest[:8], "big") % shards), record


def serialize_example(ident: str, sequence: str) -> bytes:
    """``tf.train.Example{id, sequence, length}``, serialised deterministically."""
    import tensorflow as tf

    example = tf.train.Example(features=tf.train.Features(feature={
        "id": tf.train.Feature(bytes_list=tf.train.BytesList(value=[ident.encode("utf-8")])),
        "sequence": tf.train.Feature(bytes_list=tf.train.BytesList(
            value=[sequence.encode("latin-1")])),
        "length": tf.train.Feature(int64_list=tf.train.Int64List(value=[len(sequence)])),
    }))
    return example.SerializeToString(deterministic=True)


def shard_name(split: str, index: int, count: int) -> str:
    return f"{split}.tfrecord-{index:05d}-of-{count:05d}"


class WriteShard(beam.DoFn):
    """Sorts one shard's records by (hash, id) and writes it as TFRecords."""

    def __init__(self, config: PrepareConfig, staging: str):
        self._config = config
        self._staging = staging

    def process(self, element: tuple[tuple[str, int], Iterable[Optional[Rec]]]):
        import tensorflow as tf

        (split, index), group = element
        records = sorted((r for r in group if r is not None),
                         key=lambda r: (r[0], r[3], r[1], r[2]))
        count = (self._config.num_validation_shards if split == "validation"
                 else self._config.num_shards)
        stats: collections.Counter = collections.Counter()
        lengths = []
        path = os.path.join(self._staging, shard_name(split, index, count))
        with tf.io.TFRecordWriter(path) as writer:
            for _, _, _, ident, sequence in records:
                writer.write(serialize_example(ident, sequence))
                n = len(sequence)
                lengths.append(n)
                stats[f"hist:{histogram_bin(n)}"] += 1
                for rare in RARE_RESIDUES:
                    c = sequence.count(rare)
                    if c:
                        stats[f"rare:{rare}"] += c
        out: dict[str, Any] = dict(stats)
        out["records_written"] = len(records)
        out[f"split:{split}"] = len(records)
        out["residues_written"] = sum(lengths)
        if lengths:
            out["min:length"] = min(lengths)
            out["max:length"] = max(lengths)
        yield STATS, out


class WriteSummary(beam.DoFn):
    """Merges every stats part and error into ``stats.partial.json`` and
    ``errors.json`` in the staging folder (for the driver to read)."""

    def __init__(self, staging: str):
        self._staging = staging

    def process(self, element):
        import tensorflow as tf

        events = list(element[1])
        stats = merge_stats([v for kind, v in events if kind == STATS])
        errors = sorted(list(v) for kind, v in events if kind == ERROR)
        for name, value in (("stats.partial.json", stats), ("errors.json", errors)):
            with tf.io.gfile.GFile(os.path.join(self._staging, name), "w") as f:
                json.dump(value, f)


def build_pipeline(p: beam.Pipeline, config: PrepareConfig, files: Sequence[str],
                   exclusions: frozenset[bytes], staging: str) -> None:
    """Adds the prepare stages to ``p``; results land in ``staging``."""
    read = (p
            | "Files" >> beam.Create(list(enumerate(files)))
            | "Spread" >> beam.Reshuffle()
            | "Read" >> beam.ParDo(ReadAndFilter(config, exclusions)))
    records = _records(read, "Read")
    events = [_not_records(read, "Read")]
    if config.dedup:
        records, dropped = _dedup(records, 3, "duplicate_id", "Id")
        events.append(dropped)
        records, dropped = _dedup(records, 0, "duplicate_sequence", "Sequence")
        events.append(dropped)
    all_shards = [(("train", i), None) for i in range(config.num_shards)]
    all_shards += [(("validation", i), None)
                   for i in range(config.num_validation_shards)]
    keyed = records | "Assign" >> beam.Map(assign_shard, config)
    events.append((keyed, p | "AllShards" >> beam.Create(all_shards))
                  | "WithEmptyShards" >> beam.Flatten()
                  | "GroupShards" >> beam.GroupByKey()
                  | "Write" >> beam.ParDo(WriteShard(config, staging)))
    # Every shard's stats come through here, so the summary waits for them all.
    (events
     | "AllEvents" >> beam.Flatten()
     | "KeyEvents" >> beam.Map(lambda kv: (0, kv))
     | "GatherEvents" >> beam.GroupByKey()
     | "WriteSummary" >> beam.ParDo(WriteSummary(staging)))


def _final_stats(raw: dict, config: PrepareConfig, files: Sequence[str],
                 num_exclusions: int) -> dict:
    dropped = {k.split(":", 1)[1]: v for k, v in sorted(raw.items())
               if k.startswith("dropped:")}
    counts = [raw.get(f"hist:{i}", 0) for i in range(len(HISTOGRAM_EDGES) + 1)]
    written = raw.get("records_written", 0)
    return {
        "records_read": raw.get("records_read", 0),
        "records_written": written,
        "residues_written": raw.get("residues_written", 0),
        "dropped": dropped,
        "splits": {s: raw.get(f"split:{s}", 0) for s in SPLITS},
        "normalised": {k.split(":", 1)[1]: v for k, v in sorted(raw.items())
                       if k.startswith("normalised:")},
        "rare_residues": {r: raw.get(f"rare:{r}", 0) for r in RARE_RESIDUES},
        "length": {
            "min": raw.get("min:length"),
            "max": raw.get("max:length"),
            "mean": raw.get("residues_written", 0) / written if written else None,
        },
        "length_histogram": {
            "upper_edges": list(HISTOGRAM_EDGES) + [None],
            "counts": counts,
        },
        "files": [{"path": path, "records_read": raw.get(f"file:{i}", 0)}
                  for i, path in enumerate(files)],
        "config": {
            "num_shards": config.num_shards,
            "num_validation_shards": config.num_validation_shards,
            "min_length": config.min_length,
            "max_length": config.max_length,
            "dedup": config.dedup,
            "exclude": list(config.exclude),
            "excluded_sequences_known": num_exclusions,
            "validation_fraction": config.validation_fraction,
        },
    }


def _gfile():
    import tensorflow as tf

    return tf.io.gfile


# Runners Beam ships outside its short-name registry, by the name users give.
_RUNNERS = {"DaskRunner": "apache_beam.runners.dask.dask_runner.DaskRunner"}


def _beam_args(beam_args: Sequence[str]) -> list:
    """``--runner DaskRunner`` (or ``=DaskRunner``) as Beam's qualified name."""
    out = list(beam_args)
    for i, arg in enumerate(out):
        if arg.startswith("--runner="):
            name = arg.split("=", 1)[1]
            out[i] = "--runner=" + _RUNNERS.get(name, name)
        elif arg == "--runner" and i + 1 < len(out):
            out[i + 1] = _RUNNERS.get(out[i + 1], out[i + 1])
    return out


def _absolute(path: str) -> str:
    return path if "://" in path else os.path.abspath(path)


def run(config: PrepareConfig, beam_args: Sequence[str] = ()) -> dict:
    """Runs the pipeline and returns the statistics written to stats.json.

    Args:
      config: what to prepare.
      beam_args: pass-through Beam pipeline options (``--runner`` …).

    Returns:
      The contents of ``<output>/stats.json``.

    Raises:
      InputError: bad input (nothing is written to the output folder).
    """
    from apache_beam.options.pipeline_options import PipelineOptions

    files = expand_inputs(config.inputs)
    for path in files:
        preflight(path)
    exclusions = load_exclusions(config.exclude) if config.exclude else frozenset()

    gfile = _gfile()
    if gfile.exists(config.output) and not gfile.isdir(config.output):
        raise ProtlmError(f"{config.output}: exists and is not a folder (--output names "
                          "the folder the shards go into)")
    gfile.makedirs(config.output)
    staging = os.path.join(config.output, f".prepare-staging-{uuid.uuid4().hex}")
    gfile.makedirs(staging)
    try:
        options = PipelineOptions(_beam_args(beam_args))
        try:
            pipeline = beam.Pipeline(options=options)
        except ValueError as e:  # an unknown runner
            raise ProtlmError(f"beam: {' '.join(str(e).split())}") from None
        with pipeline as p:
            # Workers (Dask, Dataflow) need paths that do not depend on their cwd.
            build_pipeline(p, config, [_absolute(f) for f in files], exclusions,
                           _absolute(staging))
        with gfile.GFile(os.path.join(staging, "errors.json")) as f:
            errors = sorted(tuple(e) for e in json.load(f))
        if errors:
            _, line, path, reason = errors[0]
            if len(errors) > 1:
                reason += f" (and {len(errors) - 1} more bad input files)"
            raise InputError(path, line, reason)
        with gfile.GFile(os.path.join(staging, "stats.partial.json")) as f:
            stats = _final_stats(json.load(f), config, files, len(exclusions))
        if not stats["records_read"]:
            raise InputError(files[0], 0, "no FASTA records"
                             + (f" (nor in the other {len(files) - 1} files)"
                                if len(files) > 1 else ""))
        if not stats["records_written"]:
            raise ProtlmError(f"every one of the {stats['records_read']:,} records was "
                              f"dropped ({json.dumps(stats['dropped'])}): nothing to write")
        total = stats["records_written"] + sum(stats["dropped"].values())
        if total != stats["records_read"]:
            raise ProtlmError(f"internal error: records_read {stats['records_read']} != "
                              f"written + dropped {total}")
        for split in SPLITS:
            for old in gfile.glob(os.path.join(config.output, f"{split}.tfrecord-*")):
                gfile.remove(old)
        for name in sorted(gfile.listdir(staging)):
            if ".tfrecord-" in name:
                gfile.rename(os.path.join(staging, name),
                             os.path.join(config.output, name), overwrite=True)
        with gfile.GFile(os.path.join(config.output, "stats.json"), "w") as f:
            json.dump(stats, f, indent=2)
            f.write("\n")
        return stats
    finally:
        if gfile.exists(staging):
            gfile.rmtree(staging)
