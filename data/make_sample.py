"""Make the committed real sample ``data/sample/uniprot_sample.fasta.gz``.

Takes every ``stride``-th record (records 0, 10, 20, ...) of the MMseqs2
example ``DB.fasta.gz`` (20,000 UniProtKB records, fetched by
``protlm data fetch --dataset uniprot20k``) and writes them byte for byte:
headers and sequence lines are copied unchanged, including their line
breaks. The gzip header carries no file name and mtime 0, so the same input
gives the same output bytes on the same zlib.

Usage:
    python data/make_sample.py --source data/fetched/uniprot20k/DB.fasta.gz \
        --output data/sample/uniprot_sample.fasta.gz
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
from collections.abc import Iterator
from typing import BinaryIO


def iter_records(stream: BinaryIO) -> Iterator[list[bytes]]:
    """Splits a FASTA byte stream into records, keeping every byte.

    Args:
        stream: binary FASTA stream (already decompressed).

    Returns:
        An iterator of records; each is the list of raw lines (with their
        line endings) from one ``>`` header up to the next.

    Raises:
        ValueError: the stream has non-blank data before the first header.
    """
    record: list[bytes] = []
    for line in stream:
        if line.startswith(b">"):
            if record:
                yield record
            record = [line]
        elif record:
            record.append(line)
        elif line.strip():
            raise ValueError("FASTA data before the first '>' header")
    if record:
        yield record


def make_sample(source: str, output: str, stride: int = 10) -> dict:
    """Writes every ``stride``-th record of ``source`` to gzipped ``output``.

    Args:
        source: gzipped FASTA to sample.
        output: gzipped FASTA to write (replaced atomically).
        stride: keep records whose 0-based index is a multiple of this.

    Returns:
        Statistics: records, residues, bytes (compressed size of output),
        source_records.
    """
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    out_dir = os.path.dirname(os.path.abspath(output))
    os.makedirs(out_dir, exist_ok=True)
    kept = residues = total = 0
    # Temp file + rename so a failed run never leaves a truncated sample
    # where tests and docs expect the committed one.
    fd, tmp = tempfile.mkstemp(prefix=".sample.", suffix=".part", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as raw, gzip.open(source, "rb") as src:
            # filename="" and mtime=0 keep the gzip header free of anything
            # that changes from run to run.
            with gzip.GzipFile(
                filename="", mode="wb", fileobj=raw, compresslevel=9, mtime=0
            ) as gz:
                for index, record in enumerate(iter_records(src)):
                    total += 1
                    if index % stride:
                        continue
                    kept += 1
                    residues += sum(len(line.strip()) for line in record[1:])
                    gz.writelines(record)
        # mkstemp makes 0600; a committed data file should be world-readable.
        mask = os.umask(0o022)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return {
        "records": kept,
        "residues": residues,
        "bytes": os.path.getsize(output),
        "source_records": total,
    }


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point.

    Args:
        argv: arguments without the program name; None reads ``sys.argv``.

    Returns:
        Process exit status.
    """
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", required=True, help="DB.fasta.gz to sample")
    parser.add_argument("--output", required=True, help="gzipped FASTA to write")
    parser.add_argument("--stride", type=int, default=10, help="keep every Nth record")
    args = parser.parse_args(argv)
    stats = make_sample(args.source, args.output, args.stride)
    print(
        f"{args.output}: {stats['records']} of {stats['source_records']} records, "
        f"{stats['residues']} residues, {stats['bytes']} bytes"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
