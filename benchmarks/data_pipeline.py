"""Throughput benchmarks of the protlm-jax data pipeline, each against a baseline.

Run from the repository root (``make bench`` does this)::

    .venv/bin/python benchmarks/data_pipeline.py [--repeats N] [--data PATH] [--quick]

Three measurements, each with its baseline measured in the same run on the same
bytes, so a line never compares numbers from different machines or states:

1. FASTA parse + normalise (MB/s of uncompressed FASTA): ``fasta.read_fasta``
   vs Biopython's ``SeqIO.parse(..., "fasta")`` plus the same normalisation
   (upper case, gaps removed), on the data file as shipped (one sequence line
   per record) and re-wrapped at 60 columns (the usual UniProt layout).
2. ``protlm prepare`` (``prepare.run`` on the DirectRunner) vs a plain
   single-process loop that writes the same TFRecord shards without Beam.
3. Tokens/s out of the ``uniprot_sample_prott5`` and ``uniprot_sample_mlm``
   seqio tasks with packing, vs the same task without packing.

Output: one JSON object per line on stdout and nothing else (progress and the
libraries' chatter go to stderr), so ``> results.jsonl`` captures just the
figures. ``benchmarks/README.md`` says what each line means.
"""

from __future__ import annotations

import argparse
import collections
import filecmp
import gzip
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

from _common import Reporter, claim_stdout, round5, version

# Must be set before anything imports TensorFlow; setdefault keeps a caller's
# choice (the Makefile exports its own).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parent.parent
DEFAULT_DATA = REPO / "data" / "fetched" / "uniprot20k" / "DB.fasta.gz"
FALLBACK_DATA = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"
MB = 1e6  # MB/s here means 10**6 bytes per second.
WRAP_WIDTH = 60
NUM_SHARDS = 16
SEQUENCE_LENGTH = 512
BATCH_SIZE = 32
WARMUP_BATCHES = 2
SEQIO_WINDOWS = 4
# --quick: few enough records that the whole run, imports included, stays well
# under a minute on two cores; the figures are only a smoke test then.
QUICK_RECORDS = 2000
QUICK_REPEATS = 2
QUICK_BATCHES = 8
# Records in the file whose prepare time is taken as Beam's fixed cost.
STARTUP_RECORDS = 10


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def best_of(repeats: int,
            fns: dict[str, Callable[[], object]]) -> dict[str, tuple[float, object]]:
    """Best wall time of each function over ``repeats`` rounds, with its result.

    One untimed round runs first: lazy imports, the first Beam pipeline's
    module loading and cold caches would otherwise decide the figure when
    ``repeats`` is small. The functions are interleaved within each round
    rather than run back to back, so slow drift of the machine (CPU clock, a
    neighbour's load) hits all of them alike instead of favouring one.
    """
    for fn in fns.values():
        fn()
    best: dict[str, tuple[float, object]] = {}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            result = fn()
            seconds = time.perf_counter() - start
            if name not in best or seconds < best[name][0]:
                best[name] = (seconds, result)
    return best


# ---------------------------------------------------------------------------
# Input files
# ---------------------------------------------------------------------------

def write_plain(source: Path, dest: Path, limit: int | None) -> None:
    """Decompresses ``source`` to ``dest``, keeping the first ``limit`` records.

    Both parsers must read the same plain bytes from disk, so decompression is
    done once here and kept out of the timed part. A plain ``--data`` file is
    copied as it is (gzip is told by its magic bytes, as the reader does).
    """
    with open(source, "rb") as probe:
        is_gzip = probe.read(2) == b"\x1f\x8b"
    records = 0
    with (gzip.open(source, "rb") if is_gzip else open(source, "rb")) as fin, \
            open(dest, "wb") as fout:
        for line in fin:
            if line.startswith(b">"):
                records += 1
                if limit is not None and records > limit:
                    break
            fout.write(line)


def write_wrapped(source: Path, dest: Path, width: int = WRAP_WIDTH) -> None:
    """Rewrites a FASTA file with sequences wrapped at ``width`` columns.

    Headers are copied byte for byte; only the sequence lines change, so the
    records (and the residues both parsers must return) are the same.
    """
    with open(source, "rb") as fin, open(dest, "wb") as fout:
        pieces: list[bytes] = []

        def flush() -> None:
            sequence = b"".join(pieces)
            for start in range(0, len(sequence), width):
                fout.write(sequence[start:start + width] + b"\n")
            pieces.clear()

        for line in fin:
            if line.startswith(b">"):
                flush()
                fout.write(line)
            else:
                pieces.append(line.rstrip(b"\r\n"))
        flush()


def write_head(source: Path, dest: Path, records: int) -> None:
    """Copies the first ``records`` records of a plain FASTA file."""
    seen = 0
    with open(source, "rb") as fin, open(dest, "wb") as fout:
        for line in fin:
            if line.startswith(b">"):
                seen += 1
                if seen > records:
                    break
            fout.write(line)


def gzip_file(source: Path, dest: Path) -> None:
    # mtime=0 so the bytes do not depend on when the benchmark ran.
    with open(source, "rb") as fin, gzip.GzipFile(dest, "wb", mtime=0) as fout:
        shutil.copyfileobj(fin, fout, 1 << 20)


# ---------------------------------------------------------------------------
# 1. FASTA parse + normalise
# ---------------------------------------------------------------------------

def parse_protlm(path: Path) -> tuple[int, int]:
    from protlm_jax.data.fasta import read_fasta

    records = residues = 0
    for record in read_fasta(str(path), counts=collections.Counter()):
        records += 1
        residues += len(record.sequence)
    return records, residues


def parse_biopython(path: Path) -> tuple[int, int]:
    from Bio import SeqIO

    records = residues = 0
    with open(path, encoding="utf-8") as handle:
        for rec in SeqIO.parse(handle, "fasta"):
            # read_fasta upper-cases and drops gap characters, so the baseline
            # does the same work; otherwise it would win by doing less.
            sequence = str(rec.seq).upper().replace("-", "").replace(".", "")
            records += 1
            residues += len(sequence)
    return records, residues


def bench_parse(report: Reporter, layouts: dict[str, Path], repeats: int) -> None:
    for layout, path in layouts.items():
        size = path.stat().st_size
        log(f"parse: {layout} layout, {size / MB:.1f} MB, best of {repeats}")
        best = best_of(repeats, {
            "protlm_jax": lambda: parse_protlm(path),
            "biopython": lambda: parse_biopython(path),
        })
        (ours_s, ours_out), (bio_s, bio_out) = best["protlm_jax"], best["biopython"]
        records, residues = ours_out
        # Only a like-for-like parse makes the speedup meaningful.
        same = ours_out == bio_out
        if not same:
            log(f"parse: WARNING parsers disagree: ours {ours_out}, biopython {bio_out}")
        context = {"layout": layout, "file": path.name, "bytes": size, "records": records,
                   "residues": residues, "repeats": repeats}
        for parser, seconds in (("protlm_jax", ours_s), ("biopython", bio_s)):
            report.emit(f"fasta_parse/{parser}", size / MB / seconds, "MB/s",
                        parser=parser, seconds=seconds, **context)
        report.emit("fasta_parse/speedup", size / MB / ours_s, "MB/s",
                    baseline=round5(size / MB / bio_s), speedup=round5(bio_s / ours_s),
                    target_speedup=2.0, outputs_match=same, **context)


# ---------------------------------------------------------------------------
# 2. protlm prepare
# ---------------------------------------------------------------------------

def prepare_beam(path: Path, output: Path) -> dict:
    from protlm_jax.data.prepare import PrepareConfig, run

    return run(PrepareConfig(inputs=(str(path),), output=str(output),
                             num_shards=NUM_SHARDS, progress=False))


def prepare_plain(path: Path, output: Path) -> dict:
    """What ``prepare`` does for this input, as one Python loop without Beam.

    Same reader, same filter, same sequence-hash sharding and in-shard order,
    same deterministic serialisation: the shards come out byte-identical (the
    benchmark checks), so the time difference is Beam's overhead and nothing
    else. Dedup, exclusions and the validation split are off in both.
    """
    import tensorflow as tf

    from protlm_jax.data import fasta
    from protlm_jax.data.prepare import canonical_digest, serialize_example, shard_name

    shards: list[list[tuple[bytes, str, str]]] = [[] for _ in range(NUM_SHARDS)]
    read = 0
    for record in fasta.read_fasta(str(path), counts=collections.Counter()):
        read += 1
        if not record.id or fasta.invalid_reason(record.sequence) is not None:
            continue
        digest = canonical_digest(record.sequence)
        shards[int.from_bytes(digest[:8], "big") % NUM_SHARDS].append(
            (digest, record.id, record.sequence))
    output.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, shard in enumerate(shards):
        shard.sort()
        with tf.io.TFRecordWriter(str(output / shard_name("train", index, NUM_SHARDS))) as writer:
            for _, ident, sequence in shard:
                writer.write(serialize_example(ident, sequence))
                written += 1
    return {"records_read": read, "records_written": written}


def same_shards(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.glob("train.tfrecord-*"))
    if names != sorted(p.name for p in b.glob("train.tfrecord-*")) or not names:
        return False
    return all(filecmp.cmp(a / n, b / n, shallow=False) for n in names)


def bench_prepare(report: Reporter, gz_path: Path, plain_path: Path, work: Path,
                  repeats: int) -> None:
    from protlm_jax.data.prepare import run  # noqa: F401  (import cost outside the timing)
    import tensorflow as tf  # noqa: F401

    size = plain_path.stat().st_size
    tiny = work / "startup.fasta"
    write_head(plain_path, tiny, STARTUP_RECORDS)
    outputs = work / "prepare_outputs"
    counter = iter(range(10 ** 6))

    def fresh(kind: str) -> Path:
        # Each run gets an empty folder: prepare replaces old shards, but
        # deleting them would be extra work inside the timing.
        return outputs / f"{kind}-{next(counter)}"

    last: dict[str, Path] = {}

    def beam_full():
        last["beam"] = fresh("beam")
        return prepare_beam(gz_path, last["beam"])

    def plain_full():
        last["plain"] = fresh("plain")
        return prepare_plain(gz_path, last["plain"])

    log(f"prepare: {gz_path.name} ({size / MB:.1f} MB uncompressed), best of {repeats}")
    best = best_of(repeats, {
        "startup": lambda: prepare_beam(tiny, fresh("startup")),
        "beam": beam_full,
        "plain": plain_full,
    })
    startup_s = best["startup"][0]
    beam_s, beam_stats = best["beam"]
    plain_s, plain_stats = best["plain"]
    records = beam_stats["records_read"]
    identical = same_shards(last["beam"], last["plain"])
    if not identical:
        log("prepare: WARNING Beam and plain-loop shards differ")
    context = {"file": gz_path.name, "bytes_uncompressed": size,
               "bytes_gzip": gz_path.stat().st_size, "records": records,
               "records_written": beam_stats["records_written"],
               "num_shards": NUM_SHARDS, "repeats": repeats}
    report.emit("prepare/plain_loop", size / MB / plain_s, "MB/s",
                records_per_s=records / plain_s, seconds=plain_s,
                records_written=plain_stats["records_written"],
                **{k: v for k, v in context.items() if k != "records_written"})
    report.emit("prepare/beam", size / MB / beam_s, "MB/s",
                records_per_s=records / beam_s, seconds=beam_s, runner="DirectRunner",
                **context)
    # Beam's fixed cost (pipeline construction, DirectRunner start, staging
    # folder, stats files) is what a 10-record run costs; subtracting it leaves
    # the per-record rate that larger inputs approach.
    if beam_s > startup_s:
        report.emit("prepare/beam_excl_startup", size / MB / (beam_s - startup_s), "MB/s",
                    records_per_s=records / (beam_s - startup_s),
                    seconds=beam_s - startup_s, startup_s=startup_s,
                    startup_records=STARTUP_RECORDS, runner="DirectRunner", **context)
    report.emit("prepare/beam_vs_plain", size / MB / beam_s, "MB/s",
                baseline=round5(size / MB / plain_s), speedup=round5(plain_s / beam_s),
                startup_s=startup_s, identical_output=identical, **context)
    shutil.rmtree(outputs, ignore_errors=True)


# ---------------------------------------------------------------------------
# 3. seqio tasks with packing
# ---------------------------------------------------------------------------

def bench_seqio(report: Reporter, gz_path: Path, work: Path, batches: int) -> None:
    data_dir = work / "prepared"
    log(f"seqio: preparing {gz_path.name} into {data_dir / 'uniprot_sample'}")
    stats = prepare_beam(gz_path, data_dir / "uniprot_sample")
    # The tasks resolve their shards from the environment when a dataset is
    # built; a per-corpus override left in the caller's environment would
    # silently point them elsewhere.
    os.environ["PROTLM_DATA_DIR"] = str(data_dir)
    os.environ.pop("PROTLM_DATA_DIR_UNIPROT_SAMPLE", None)
    import numpy as np
    import seqio

    import protlm_tasks  # noqa: F401  (registers the tasks)
    from protlm_jax.data.feature_converters import MLMFeatureConverter

    lengths = {"inputs": SEQUENCE_LENGTH, "targets": SEQUENCE_LENGTH}
    for task, converter in (("uniprot_sample_prott5", seqio.EncDecFeatureConverter),
                            ("uniprot_sample_mlm", MLMFeatureConverter)):
        results = {}
        for pack in (False, True):
            log(f"seqio: {task} pack={pack}, {batches} batches of {BATCH_SIZE}")
            # num_epochs=None repeats inside seqio (after the cache point,
            # before cropping/masking), as training does, so the stream never
            # runs dry however many batches are asked for.
            ds = seqio.get_dataset(
                task, lengths, feature_converter=converter(pack=pack),
                dataset_split="train", use_cached=False, shuffle=True, seed=0,
                num_epochs=None, verbose=False).batch(BATCH_SIZE)
            it = ds.as_numpy_iterator()
            # Warm-up batches absorb graph tracing, file opening and the
            # shuffle buffer's first fill, which a long run amortises away.
            for _ in range(WARMUP_BATCHES):
                next(it)
            # The timed batches are cut into windows and the median window
            # rate is reported: a stream cannot be restarted cheaply for a
            # best-of, and on a small shared machine one window hit by another
            # process's burst should not move the figure.
            windows = max(1, min(SEQIO_WINDOWS, batches))
            tokens = slots = examples = 0
            token_rates, example_rates = [], []
            elapsed = 0.0
            for window in range(windows):
                count = batches // windows + (window < batches % windows)
                w_tokens = w_examples = 0
                start = time.perf_counter()
                for _ in range(count):
                    batch = next(it)
                    inputs = batch["encoder_input_tokens"]
                    w_tokens += int(np.count_nonzero(inputs))
                    slots += inputs.size
                    if pack:
                        # Segment ids run 1..k within a packed row, so the
                        # row's maximum is the number of examples in it.
                        w_examples += int(batch["encoder_segment_ids"].max(axis=1).sum())
                    else:
                        w_examples += int(np.count_nonzero(inputs.any(axis=1)))
                seconds = time.perf_counter() - start
                elapsed += seconds
                tokens += w_tokens
                examples += w_examples
                token_rates.append(w_tokens / seconds)
                example_rates.append(w_examples / seconds)
            rate = statistics.median(token_rates)
            results[pack] = (rate, tokens / batches)
            report.emit(f"seqio/{task}/{'packed' if pack else 'unpacked'}",
                        rate, "tokens/s", task=task, pack=pack,
                        examples_per_s=statistics.median(example_rates),
                        packing_efficiency=tokens / slots,
                        tokens_per_batch=tokens / batches, nonpad_tokens=tokens,
                        token_slots=slots, examples=examples, batches=batches,
                        windows=windows, tokens_per_s_min=min(token_rates),
                        tokens_per_s_max=max(token_rates), seconds=elapsed,
                        warmup_batches=WARMUP_BATCHES, batch_size=BATCH_SIZE,
                        sequence_length=SEQUENCE_LENGTH,
                        corpus_records=stats["records_written"],
                        token_count="encoder_input_tokens != 0")
        # speedup compares pipeline tokens/s; tokens_per_batch_gain is what
        # packing buys a model step of fixed shape (more real tokens per batch).
        report.emit(f"seqio/{task}/packed_vs_unpacked", results[True][0], "tokens/s",
                    task=task, baseline=round5(results[False][0]),
                    speedup=round5(results[True][0] / results[False][0]),
                    tokens_per_batch_gain=round5(results[True][1] / results[False][1]),
                    batches=batches, batch_size=BATCH_SIZE,
                    sequence_length=SEQUENCE_LENGTH)


# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=None,
                        help="best of N for the parse and prepare timings "
                             f"(default 5; {QUICK_REPEATS} with --quick)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"FASTA (gzip or plain) to measure (default "
                             f"{DEFAULT_DATA.relative_to(REPO)}; falls back to "
                             f"{FALLBACK_DATA.relative_to(REPO)} if absent)")
    parser.add_argument("--batches", type=int, default=None,
                        help=f"timed seqio batches per task and mode (default 200; "
                             f"{QUICK_BATCHES} with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: first {QUICK_RECORDS} records, few repeats (< 60 s)")
    args = parser.parse_args(argv)
    repeats = args.repeats
    if repeats is None:
        repeats = QUICK_REPEATS if args.quick else 5
    batches = args.batches
    if batches is None:
        batches = QUICK_BATCHES if args.quick else 200
    if repeats < 1 or batches < 1:
        parser.error("--repeats and --batches must be at least 1")

    json_out = claim_stdout()
    t_start = time.perf_counter()

    fallback = False
    data = args.data
    if data is None:
        data = DEFAULT_DATA
        if not data.exists():
            # The fetched set is the one the figures are meant for; the
            # committed sample keeps the benchmark runnable without it, and
            # every line says so.
            log(f"{data} not found (run `protlm data fetch`); using {FALLBACK_DATA}")
            data, fallback = FALLBACK_DATA, True
    elif not data.exists():
        parser.error(f"--data {data}: no such file")

    common = {
        "data": str(data.resolve().relative_to(REPO)
                    if data.resolve().is_relative_to(REPO) else data),
        "data_fallback": fallback,
        "quick": args.quick,
        # The load average at start says whether something else was running
        # (figures from a busy two-core machine are not comparable).
        "host": {"python": platform.python_version(), "cpus": os.cpu_count(),
                 "machine": platform.machine(),
                 "loadavg_1m": round(os.getloadavg()[0], 2)},
        "versions": {name: version(pkg) for name, pkg in (
            ("protlm_jax", "protlm-jax"), ("jax", "jax"), ("tensorflow", "tensorflow"),
            ("seqio", "seqio"), ("apache_beam", "apache-beam"), ("biopython", "biopython"))},
    }
    report = Reporter(json_out, common)

    work = Path(tempfile.mkdtemp(prefix="protlm-bench-"))
    try:
        plain = work / "records.fasta"
        write_plain(data, plain, QUICK_RECORDS if args.quick else None)
        wrapped = work / f"records.wrap{WRAP_WIDTH}.fasta"
        write_wrapped(plain, wrapped)
        if args.quick:
            # prepare reads gzip as shipped; the quick subset is re-gzipped so
            # it takes the same decompressing path.
            gz = work / "records.fasta.gz"
            gzip_file(plain, gz)
        else:
            gz = data

        bench_parse(report, {"one_line": plain, f"wrapped{WRAP_WIDTH}": wrapped}, repeats)
        log("importing TensorFlow / Beam")
        bench_prepare(report, gz, plain, work, repeats)
        bench_seqio(report, gz, work, batches)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done: {len(report.lines)} lines in {time.perf_counter() - t_start:.1f} s")
    json_out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
