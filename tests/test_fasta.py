"""Streaming FASTA/FFindex readers: formats, normalisation counts, bad input."""

import collections
import gzip
import io

import pytest

from protlm_jax.data import fasta
from protlm_jax.errors import InputError


@pytest.fixture(autouse=True, params=["c", "python"])
def parser_path(request, monkeypatch):
    """Every test runs on the C fast path and on the pure-Python path."""
    monkeypatch.setattr(fasta, "USE_C_PARSER", request.param == "c")
    return request.param


def test_c_fast_path_is_built(parser_path):
    assert fasta._fastfasta is not None, "pip install -e . builds protlm_jax.data._fastfasta"


def _write_fasta(path, records, width=60, newline="\n", blank_lines=False):
    with open(path, "w", newline="") as f:
        for ident, seq in records:
            f.write(f">{ident} some description{newline}")
            for i in range(0, len(seq), width):
                f.write(seq[i:i + width] + newline)
                if blank_lines:
                    f.write(newline)
    return str(path)


def _gzip(src, dst):
    with open(src, "rb") as f, gzip.open(dst, "wb") as g:
        g.write(f.read())
    return str(dst)


def test_layouts_give_identical_records(tmp_path, sample_records):
    records = sample_records[:200]
    variants = {
        "one_line": _write_fasta(tmp_path / "a.fa", records, width=10**6),
        "wrapped": _write_fasta(tmp_path / "b.fa", records, width=60),
        "crlf_blank": _write_fasta(tmp_path / "c.fa", records, width=61, newline="\r\n",
                                   blank_lines=True),
    }
    variants["gzip"] = _gzip(variants["wrapped"], tmp_path / "b.fa.gz")
    variants["gzip_named_plain"] = _gzip(variants["crlf_blank"], tmp_path / "d.fasta")
    for name, path in variants.items():
        counts = collections.Counter()
        got = [(r.id, r.sequence) for r in fasta.read_fasta(path, counts)]
        assert got == records, name
        assert not counts, (name, counts)  # Nothing needed normalising.
    first = next(iter(fasta.read_fasta(variants["wrapped"])))
    assert first.description.endswith("some description") and first.line == 1


def test_normalisation_is_explicit_and_counted(tmp_path):
    path = tmp_path / "n.fa"
    path.write_text(">p1\nmkta-yi.AK*\n>p2\nMK TA\tYIUZOB\n>p3\nMKT*A\n>p4\n\n")
    counts = collections.Counter()
    records = list(fasta.read_fasta(str(path), counts))
    assert [r.sequence for r in records] == ["MKTAYIAK", "MKTAYIUZOB", "MKT*A", ""]
    assert counts == {"lowercase_records": 1, "lowercase_residues": 6,
                      "gap_characters": 2, "whitespace_characters": 2,
                      "terminal_stops": 1}
    assert [fasta.invalid_reason(r.sequence) for r in records] == [
        None, None, "invalid_characters", "empty"]
    assert fasta.invalid_reason("MKT1") == "invalid_characters"


def test_rare_residues_are_kept():
    records = list(fasta.parse_stream(io.BytesIO(b">x\nUZOBX\n"), "mem",
                                      collections.Counter()))
    assert records[0].sequence == "UZOBX"


def test_reader_streams(tmp_path, sample_records):
    """The first record arrives before the reader has seen the (broken) end."""
    path = tmp_path / "s.fa.gz"
    # ~3.5 MB of text: more than the reader's 1 MiB buffer.
    _write_fasta(tmp_path / "s.fa", sample_records * 3)
    data = gzip.compress((tmp_path / "s.fa").read_bytes())
    path.write_bytes(data[: len(data) // 2])  # truncated
    reader = fasta.read_fasta(str(path))
    assert next(reader).id == sample_records[0][0]
    with pytest.raises(InputError, match="truncated gzip"):
        list(reader)


def test_100k_residue_record(tmp_path, sample_records):
    long_seq = "".join(s for _, s in sample_records)[:100_000]
    for width in (10**6, 60):
        path = _write_fasta(tmp_path / f"long{width}.fa", [("titin_like", long_seq),
                                                           ("next", "MKV")], width=width)
        records = list(fasta.read_fasta(path))
        assert len(records[0].sequence) == 100_000 and records[0].sequence == long_seq
        assert records[1].sequence == "MKV"


@pytest.mark.parametrize("content,line,reason", [
    (b"ID   1433B_HUMAN\nSQ   SEQUENCE\n", 1, "not a FASTA file"),
    (b"\x89PNG\r\n\x1a\n\x00\x00", 1, "binary data"),
    (b"\n\nMKTAYIAKQR\n>p1\nMKV\n", 3, "sequence line before any header"),
])
def test_structural_errors(tmp_path, content, line, reason):
    path = tmp_path / "bad.fa"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        list(fasta.read_fasta(str(path)))
    assert (err.value.path, err.value.line) == (str(path), line)
    assert reason in err.value.reason


def test_truncated_gzip_names_the_line(tmp_path, sample_path):
    data = sample_path.read_bytes()
    path = tmp_path / "cut.fa.gz"
    path.write_bytes(data[: len(data) * 3 // 4])
    with pytest.raises(InputError) as err:
        list(fasta.read_fasta(str(path)))
    assert err.value.line > 1000 and "truncated gzip" in err.value.reason


def test_unreadable_paths(tmp_path):
    for path, reason in ((tmp_path / "missing.fa", "No such file"),
                         (tmp_path, "is a directory")):
        with pytest.raises(InputError) as err:
            list(fasta.read_fasta(str(path)))
        assert err.value.line == 0 and reason in err.value.reason


def _write_ffindex(tmp_path, entries):
    data, index = io.BytesIO(), []
    for name, text in entries:
        offset = data.tell()
        data.write(text.encode() + b"\x00")
        index.append(f"{name}\t{offset}\t{data.tell() - offset}\n")
    (tmp_path / "db.ffdata").write_bytes(data.getvalue())
    # FFindex files are sorted by name, not by offset.
    (tmp_path / "db.ffindex").write_text("".join(sorted(index)))
    return str(tmp_path / "db.ffindex")


def test_ffindex(tmp_path, sample_records):
    (a, sa), (b, sb), (c, sc) = sample_records[:3]
    # An a3m entry: the query, then a member with insertions (lower case) and
    # deletions (-); upper-casing and removing gaps restores its sequence.
    member = sb[:5].lower() + "--" + sb[5:]
    entries = [("e1", f"#A3M#\n>{a}\n{sa}\n>{b}\n{member}\n"),
               ("e2", sc[:50] + "\n" + sc[50:] + "\n"),  # bare sequence
               ("e0", f">{c}\n{sc}\n")]
    index = _write_ffindex(tmp_path, entries)
    counts = collections.Counter()
    for path in (index, index.replace(".ffindex", ".ffdata")):
        got = [(r.id, r.sequence, r.line) for r in fasta.read_records(path, counts)]
        assert got == [(c, sc, 1), (a, sa, 2), (b, sb, 2), ("e2", sc, 3)]
    assert counts["gap_characters"] == 4 and counts["lowercase_residues"] == 10


def test_ffindex_malformed_line(tmp_path):
    (tmp_path / "db.ffdata").write_bytes(b">a\nMKV\n\x00")
    (tmp_path / "db.ffindex").write_text("a\t0\t8\nb\tzero\t8\n")
    with pytest.raises(InputError) as err:
        list(fasta.read_ffindex(str(tmp_path / "db.ffindex")))
    assert err.value.line == 2 and "malformed ffindex line" in err.value.reason
    (tmp_path / "db.ffindex").write_text("a\t0\t800\n")
    with pytest.raises(InputError, match="runs past the end"):
        list(fasta.read_ffindex(str(tmp_path / "db.ffindex")))
