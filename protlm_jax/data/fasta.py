"""Streaming FASTA and FFindex readers with explicit, counted normalisation.

Readers never hold a whole file in memory: FASTA is read line by line through a
buffer (gzip detected by its magic bytes, not by the file name), FFindex
entries are read one at a time by seeking into the ``.ffdata`` file.

Normalisation (each kind counted in a ``collections.Counter`` the caller owns):
  * upper-casing (``lowercase_records``, ``lowercase_residues``),
  * removing gap characters ``-`` and ``.`` (``gap_characters``),
  * removing white space inside sequence lines (``whitespace_characters``),
  * removing one terminal stop ``*`` (``terminal_stops``).
Rare residues (U Z O B) are kept: mapping them to X is a tokenization step, so
prepared shards stay model-agnostic.

Structural problems (not FASTA, sequence before any header, truncated or corrupt
gzip, unreadable path, malformed FFindex line) raise :class:`InputError` with the
file and line.  Records that are merely unusable are yielded as they are; the
caller decides with :func:`invalid_reason` and counts the drop.
"""

from __future__ import annotations

import collections
import gzip
import io
import os
import string
import zlib
from typing import BinaryIO, Callable, Iterator, NamedTuple, Optional

from protlm_jax.errors import InputError

try:  # The C fast path (protlm_jax/data/_fastfasta.c), built by `pip install`.
    from protlm_jax.data import _fastfasta
except ImportError:  # pragma: no cover - a source tree without the build
    _fastfasta = None

_BUFFER = 1 << 20
_CHUNK = 1 << 16  # small enough that a gzip error is reported near its line
_GZIP_MAGIC = b"\x1f\x8b"
_NEWLINES = b"\r\n"
_GAPS = b"-."
_INNER_WHITESPACE = b" \t\v\f"
_UPPER = string.ascii_uppercase.encode()
_LOWER = string.ascii_lowercase.encode()
# Characters that may appear in a sequence line before normalisation.
_SEQUENCE_LINE_CHARS = frozenset(
    string.ascii_letters.encode() + _GAPS + _INNER_WHITESPACE + _NEWLINES + b"*")

# Upper-case letters map to themselves and every other byte to NUL: one
# translate drops the line breaks of a record and flags whatever needs
# normalising (or is invalid), so clean records take the fast path.
_CLEAN_TABLE = bytes(c if 65 <= c <= 90 else 0 for c in range(256))
_new_tuple = tuple.__new__
# Tests switch this off to check the pure-Python path gives the same records.
USE_C_PARSER = True

Counts = collections.Counter


class Record(NamedTuple):
    """One normalised FASTA record.

    Attributes:
      id: the header up to the first white space (without ``>``).
      description: the whole header line without ``>`` and line ending.
      sequence: the normalised sequence (upper case, no gaps/white space, no
        terminal ``*``); may still hold invalid characters, see
        :func:`invalid_reason`.
      line: 1-based line of the header in its file (for FFindex: the index line).
    """

    id: str
    description: str
    sequence: str
    line: int


def invalid_reason(sequence: str) -> Optional[str]:
    """Returns why a normalised sequence is unusable, or None if it is fine.

    Reasons are the keys used in ``stats.json``'s ``dropped``: ``empty`` and
    ``invalid_characters`` (anything but the letters A-Z, e.g. digits or an
    inner ``*``).
    """
    if not sequence:
        return "empty"
    if sequence.encode("latin-1").translate(None, _UPPER):
        return "invalid_characters"
    return None


def _is_remote(path: str) -> bool:
    return "://" in path


def _open_binary(path: str) -> BinaryIO:
    """Opens a local or remote (gs://, …) file for binary reading."""
    if _is_remote(path):
        import tensorflow as tf  # Only remote paths need TF's file systems.

        return tf.io.gfile.GFile(path, "rb")
    return open(path, "rb", buffering=_BUFFER)


def open_stream(path: str) -> BinaryIO:
    """Opens ``path`` for reading, transparently decompressing gzip.

    Raises:
      InputError: the path cannot be opened (line 0).
    """
    try:
        if not _is_remote(path) and os.path.isdir(path):
            raise InputError(path, 0, "cannot read: is a directory")
        raw = _open_binary(path)
    except InputError:
        raise
    except Exception as e:  # OSError locally, tf.errors.* remotely.
        reason = getattr(e, "strerror", None) or getattr(e, "message", None) or str(e)
        raise InputError(path, 0, f"cannot read: {reason}") from None
    try:
        magic = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
        if not hasattr(raw, "peek"):
            magic = raw.read(2)
            raw.seek(0)
    except Exception as e:
        raw.close()
        raise InputError(path, 0, f"cannot read: {e}") from None
    if magic == _GZIP_MAGIC:
        # GzipFile buffers little, so a truncation is reported near its line.
        return gzip.GzipFile(fileobj=raw, mode="rb")
    return raw


_CONTROL = bytes(set(range(32)) - set(b"\t\n\r\v\f"))


def _looks_binary(line: bytes) -> bool:
    if len(line.translate(None, _CONTROL)) != len(line):
        return True
    try:
        line.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _first_line_problem(line: bytes) -> str:
    if _looks_binary(line):
        return "not a FASTA file (binary data; expected a '>' header line)"
    if set(line) <= _SEQUENCE_LINE_CHARS:
        return "sequence line before any header"
    return "not a FASTA file (first line does not start with '>')"


def _normalise(chunks: list[bytes], counts: Counts) -> bytes:
    """Joins sequence lines and applies the counted normalisations."""
    seq = b"".join(chunks).translate(None, _NEWLINES)
    cleaned = seq.translate(None, _GAPS)
    if len(cleaned) != len(seq):
        counts["gap_characters"] += len(seq) - len(cleaned)
        seq = cleaned
    cleaned = seq.translate(None, _INNER_WHITESPACE)
    if len(cleaned) != len(seq):
        counts["whitespace_characters"] += len(seq) - len(cleaned)
        seq = cleaned
    upper = seq.upper()
    if upper != seq:
        counts["lowercase_records"] += 1
        counts["lowercase_residues"] += len(seq) - len(seq.translate(None, _LOWER))
        seq = upper
    if seq.endswith(b"*"):
        counts["terminal_stops"] += 1
        seq = seq[:-1]
    return seq


def _make_record(header: bytes, chunks: list[bytes], line: int,
                 counts: Counts) -> Record:
    description = header[1:].rstrip(b"\r\n").decode("utf-8", "replace").strip()
    ident = description.split(None, 1)[0] if description else ""
    sequence = _normalise(chunks, counts).decode("latin-1")
    return Record(ident, description, sequence, line)


def _ffindex_entry_as_fasta(entry: bytes, name: str) -> bytes:
    """An FFindex entry as FASTA text: NULs and leading ``#`` lines (a3m) go,
    and a bare sequence gets a header named after its index entry."""
    lines = entry.rstrip(b"\x00").split(b"\n")
    start = 0
    while start < len(lines) and (not lines[start].strip() or lines[start].startswith(b"#")):
        start += 1
    text = b"\n".join(lines[start:])
    if text and not text.startswith(b">"):
        text = b">" + name.encode() + b"\n" + text
    return text


def _blocks(stream: BinaryIO, path: str, state: list) -> Iterator[bytes]:
    """Yields texts of whole records (start with '>', end with a newline).

    Reads 64 KiB at a time and cuts after the last record boundary; a record
    longer than that (titin) just spans several reads. ``state[0]`` is the line
    number where the next text starts, kept up to date by the caller.
    """
    pending: list[bytes] = []
    started = False
    text = b""
    try:
        while True:
            chunk = stream.read(_CHUNK)
            if not chunk:
                break
            cut = chunk.rfind(b"\n>")
            if cut < 0:
                pending.append(chunk)
                continue
            pending.append(chunk[:cut + 1])
            text = b"".join(pending)
            pending = [chunk[cut + 1:]]
            if not started:
                text, started = _start(text, path, state), True
            yield text
        text = b"".join(pending)
    except EOFError:
        raise InputError(path, state[0] + b"".join(pending).count(b"\n"),
                         "truncated gzip file (compressed stream ended early)") from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(path, state[0], f"corrupt gzip data ({e})") from None
    except OSError as e:
        raise InputError(path, state[0], f"read error ({e})") from None
    if not started:
        if not text.strip():
            return  # an empty file holds no records
        text = _start(text, path, state)
    if text:
        yield text if text.endswith(b"\n") else text + b"\n"


def _start(text: bytes, path: str, state: list) -> bytes:
    stripped = text.lstrip(b"\r\n\t ")
    state[0] += text[: len(text) - len(stripped)].count(b"\n")
    if stripped[:1] != b">":
        raise InputError(path, state[0],
                         _first_line_problem(stripped.split(b"\n", 1)[0]))
    return stripped


def parse_stream(stream: BinaryIO, path: str, counts: Counts) -> Iterator[Record]:
    """Parses a binary FASTA stream block by block (the fast path of read_fasta).

    The C extension splits a block into records and joins clean sequences;
    without it, per record: one partition, one translate (line breaks out,
    anything not A-Z flagged), two decodes. Either way only flagged records go
    through the counted normalisation, and both paths give identical records.
    """
    state = [1]
    if _fastfasta is not None and USE_C_PARSER:
        for text in _blocks(stream, path, state):
            lineno = state[0]
            for header, seq, body, lines in _fastfasta.records(text):
                if seq is None:
                    seq = _normalise([body], counts).decode("latin-1")
                description = header.decode("utf-8", "replace").strip()
                ident = description.split(None, 1)[0] if description else ""
                yield _new_tuple(Record, (ident, description, seq, lineno))
                lineno += lines
            state[0] = lineno
        return
    table, crlf_chars = _CLEAN_TABLE, b"\r\n"
    for text in _blocks(stream, path, state):
        crlf = b"\r" in text
        lineno = state[0]
        for blob in text[1:-1].split(b"\n>"):
            header, _, body = blob.partition(b"\n")
            seq = body.translate(table, crlf_chars)
            breaks = body.count(b"\n") if crlf else len(body) - len(seq)
            if b"\x00" in seq:
                seq = _normalise([body], counts)
            description = header.decode("utf-8", "replace").strip()
            ident = description.split(None, 1)[0] if description else ""
            yield _new_tuple(Record, (ident, description, seq.decode("latin-1"), lineno))
            lineno += breaks + 2
        state[0] = lineno


def read_fasta(path: str, counts: Optional[Counts] = None,
               progress: Optional[Callable[[int], None]] = None) -> Iterator[Record]:
    """Streams the records of a FASTA file (plain or gzip, local or remote).

    Args:
      path: the file.
      counts: receives normalisation counts (a fresh Counter if None).
      progress: called now and then with the number of bytes consumed from the
        (compressed) file since the previous call.

    Yields:
      Record objects in file order.
    """
    counts = collections.Counter() if counts is None else counts
    stream = open_stream(path)
    inner = getattr(stream, "fileobj", None)  # The compressed file under gzip.
    def tell() -> int:
        try:
            return (inner or stream).tell()
        except Exception:  # Some remote streams cannot tell.
            return last

    with stream:
        last = 0
        for i, record in enumerate(parse_stream(stream, path, counts)):
            if progress is not None and i % 4096 == 0:
                now = tell()
                progress(now - last)
                last = now
            yield record
        if progress is not None:
            progress(max(tell() - last, 0))


def _ffindex_pair(path: str) -> tuple[str, str]:
    stem, ext = os.path.splitext(path)
    if ext == ".ffindex":
        return path, stem + ".ffdata"
    if ext == ".ffdata":
        return stem + ".ffindex", path
    raise ValueError(path)


def read_ffindex(path: str, counts: Optional[Counts] = None,
                 progress: Optional[Callable[[int], None]] = None) -> Iterator[Record]:
    """Streams the records of an FFindex database (``.ffindex`` + ``.ffdata``).

    Each entry of ``.ffdata`` (ended by a NUL byte) holds FASTA text, e.g. an
    a3m alignment whose members turn into their full sequences once upper-cased
    and stripped of gaps; an entry with no header is one record named after its
    index entry. Lines starting with ``#`` at the start of an entry are skipped.

    Args:
      path: either file of the pair; the other is found beside it.
      counts: receives normalisation counts.
      progress: called with the number of data bytes consumed.

    Yields:
      Record objects; ``line`` is the entry's line in the index.
    """
    counts = collections.Counter() if counts is None else counts
    index_path, data_path = _ffindex_pair(path)
    index = open_stream(index_path)
    data = open_stream(data_path)
    with index, data:
        for lineno, line in enumerate(index, 1):
            if not line.strip():
                continue
            fields = line.rstrip(b"\r\n").split(b"\t")
            try:
                name, offset, length = fields[0].decode(), int(fields[1]), int(fields[2])
                if len(fields) != 3 or offset < 0 or length < 0:
                    raise ValueError
            except (ValueError, IndexError, UnicodeDecodeError):
                raise InputError(index_path, lineno,
                                 "malformed ffindex line (expected name<TAB>offset<TAB>length)"
                                 ) from None
            data.seek(offset)
            entry = data.read(length)
            if len(entry) != length:
                raise InputError(index_path, lineno,
                                 f"entry {name!r} runs past the end of {data_path}")
            if progress is not None:
                progress(length)
            entry = _ffindex_entry_as_fasta(entry, name)
            if entry:
                for record in parse_stream(io.BytesIO(entry), index_path, counts):
                    yield record._replace(line=lineno)


def is_ffindex(path: str) -> bool:
    """Whether ``path`` names one file of an FFindex pair."""
    return os.path.splitext(path)[1] in (".ffindex", ".ffdata")


def read_records(path: str, counts: Optional[Counts] = None,
                 progress: Optional[Callable[[int], None]] = None) -> Iterator[Record]:
    """Streams records from a FASTA file or an FFindex pair, by file name."""
    reader = read_ffindex if is_ffindex(path) else read_fasta
    return reader(path, counts=counts, progress=progress)


def input_size(path: str) -> int:
    """Bytes the reader will consume from ``path`` (for progress bars)."""
    try:
        if is_ffindex(path):
            path = _ffindex_pair(path)[1]
        if _is_remote(path):
            import tensorflow as tf

            return tf.io.gfile.stat(path).length
        return os.path.getsize(path)
    except Exception:
        return 0
