"""Offline tests for ``protlm_jax.data.fetch`` and the committed real sample.

No test touches a registry: the downloader is replaced by functions that copy
small packages built here (a fake wheel and a fake .deb with the real member
layout).
"""

from __future__ import annotations

import argparse
import dataclasses
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import tarfile
import zipfile
from pathlib import Path

import pytest

from protlm_jax.cli import data as data_cmd
from protlm_jax.data import fetch as data_fetch
from protlm_jax.errors import ProtlmError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample" / "uniprot_sample.fasta.gz"

WHEEL_MEMBERS = {
    "fakepkg/resources/a.json": b'{"x": [1, 2, 3]}\n',
    "fakepkg/resources/b.csv": b"id,label\n" + b"P12345,H\n" * 5000,
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_wheel(path: Path) -> Path:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("fakepkg/__init__.py", "")
        for name, data in WHEEL_MEMBERS.items():
            zf.writestr(name, data)
    return path


def _tar_bytes(files: dict[str, bytes], mode: str) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode=mode) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _build_deb(path: Path, files: dict[str, bytes]) -> Path:
    """Writes a minimal but well-formed .deb (ar of debian-binary/control/data)."""
    control = (
        b"Package: fakedata\nVersion: 1.0-1\nArchitecture: all\n"
        b"Maintainer: Test <test@example.org>\nDescription: test data\n"
    )
    members = [
        ("debian-binary", b"2.0\n"),
        ("control.tar.gz", _tar_bytes({"./control": control}, "w:gz")),
        # xz like the real mmseqs2-examples package.
        ("data.tar.xz", _tar_bytes({f"./{k}": v for k, v in files.items()}, "w:xz")),
    ]
    with open(path, "wb") as f:
        f.write(b"!<arch>\n")
        for name, data in members:
            header = (
                f"{name:<16}{0:<12}{0:<6}{0:<6}{'100644':<8}{len(data):<10}".encode()
                + b"`\n"
            )
            assert len(header) == 60
            f.write(header + data + (b"\n" if len(data) % 2 else b""))
    return path


def _wheel_dataset(
    tmp_path: Path, name: str = "fakewheel"
) -> tuple[data_fetch.Dataset, Path]:
    src_dir = tmp_path / "src"
    src_dir.mkdir(exist_ok=True)
    whl = _build_wheel(src_dir / "fakepkg-1.0-py3-none-any.whl")
    ds = data_fetch.Dataset(
        name=name,
        kind="pypi",
        package="fakepkg",
        version="1.0",
        filename=whl.name,
        sha256=_sha(whl),
        members=tuple(
            data_fetch.Member(src, f"{name}/{Path(src).name}") for src in WHEEL_MEMBERS
        ),
        license="test",
        description="test",
    )
    return ds, whl


def _copying_downloader(src: Path, calls: list | None = None):
    def downloader(dataset, dest_dir):
        if calls is not None:
            calls.append(dataset.name)
        return Path(shutil.copy(src, Path(dest_dir) / src.name))

    return downloader


@pytest.fixture
def wheel_ds(tmp_path, monkeypatch):
    """Registers a fake wheel data set in the table; yields (dataset, wheel)."""
    ds, whl = _wheel_dataset(tmp_path)
    monkeypatch.setitem(data_fetch.DATASETS_BY_NAME, ds.name, ds)
    return ds, whl


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file()) if root.exists() else []


def test_table_is_pinned_and_consistent():
    names = [d.name for d in data_fetch.DATASETS]
    assert names == ["uniprot20k", "sidechainnet", "scl2205", "proteome938293", "antiberty"]
    # The 97 MB pretrained model is opt-in: `--dataset all` (make data) skips it.
    assert data_fetch.resolve_names(["all"]) == names[:-1]
    for d in data_fetch.DATASETS:
        assert re.fullmatch(r"[0-9a-f]{64}", d.sha256), d.name
        assert d.kind in ("deb", "pypi")
        assert d.version in d.filename
        assert d.filename.endswith(".deb" if d.kind == "deb" else ".whl")
        assert d.members and d.license
        for m in d.members:
            assert m.dest.startswith(d.name + "/")
            assert not m.source.startswith(("/", "./"))
    assert data_fetch.DATASETS_BY_NAME["uniprot20k"].requirement == (
        "mmseqs2-examples=14-7e284+ds-1"
    )
    assert data_fetch.DATASETS_BY_NAME["scl2205"].requirement == "p-scldata==2025.6.0"


def test_sha256_mismatch_raises_and_extracts_nothing(tmp_path, monkeypatch, wheel_ds):
    ds, whl = wheel_ds
    bad = tmp_path / "bad"
    bad.mkdir()
    # Same name, one byte different: the check must be on content, not name.
    corrupted = bytearray(whl.read_bytes())
    corrupted[-1] ^= 0xFF
    (bad / whl.name).write_bytes(bytes(corrupted))
    got = hashlib.sha256(bytes(corrupted)).hexdigest()
    monkeypatch.setattr(data_fetch, "download", _copying_downloader(bad / whl.name))

    out = tmp_path / "out"
    with pytest.raises(ProtlmError) as exc:
        data_fetch.fetch([ds.name], out)
    msg = str(exc.value)
    assert whl.name in msg and ds.sha256 in msg and got in msg
    assert "\n" not in msg
    assert _all_files(out) == []


def test_fetch_extracts_stamps_then_reports_cached(tmp_path, monkeypatch, wheel_ds):
    ds, whl = wheel_ds
    calls: list[str] = []
    monkeypatch.setattr(data_fetch, "download", _copying_downloader(whl, calls))
    out = tmp_path / "out"

    first = data_fetch.fetch([ds.name], out)[ds.name]
    assert first["status"] == "fetched" and calls == [ds.name]
    for src, data in WHEEL_MEMBERS.items():
        assert (out / ds.name / Path(src).name).read_bytes() == data
    assert first["bytes"] == sum(len(v) for v in WHEEL_MEMBERS.values())
    stamp = json.loads((out / ds.name / ".fetched.json").read_text())
    assert stamp["name"] == ds.name and stamp["sha256"] == ds.sha256
    assert stamp["package"] == "fakepkg" and stamp["version"] == "1.0"
    assert stamp["license"] == "test"
    assert [m["dest"] for m in stamp["members"]] == [m.dest for m in ds.members]
    # No temp files are left next to the members.
    assert not [p for p in _all_files(out) if p.name.endswith(".part")]

    def must_not_download(dataset, dest_dir):
        raise AssertionError("downloader called for a cached data set")

    monkeypatch.setattr(data_fetch, "download", must_not_download)
    second = data_fetch.fetch([ds.name], out)[ds.name]
    assert second["status"] == "cached"
    assert second["bytes"] == first["bytes"]


def test_force_and_damaged_member_trigger_refetch(tmp_path, wheel_ds):
    ds, whl = wheel_ds
    calls: list[str] = []
    dl = _copying_downloader(whl, calls)
    out = tmp_path / "out"
    data_fetch.fetch([ds.name], out, downloader=dl)
    assert data_fetch.fetch([ds.name], out, force=True, downloader=dl)[ds.name][
        "status"
    ] == "fetched"
    # A truncated member no longer matches the stamp's recorded size.
    target = out / ds.members[1].dest
    target.write_bytes(target.read_bytes()[:10])
    assert data_fetch.fetch([ds.name], out, downloader=dl)[ds.name]["status"] == "fetched"
    assert target.read_bytes() == WHEEL_MEMBERS[ds.members[1].source]
    # A stamp for another sha256 (e.g. an older pin) is not trusted.
    stamp_path = out / ds.name / ".fetched.json"
    stamp = json.loads(stamp_path.read_text())
    stamp["sha256"] = "0" * 64
    stamp_path.write_text(json.dumps(stamp))
    assert data_fetch.fetch([ds.name], out, downloader=dl)[ds.name]["status"] == "fetched"
    assert calls == [ds.name] * 4


def test_interrupted_extraction_leaves_no_partial_member(tmp_path, monkeypatch, wheel_ds):
    ds, whl = wheel_ds
    out = tmp_path / "out"
    real_copy = data_fetch._copy_stream
    copies = []

    def crash_on_second_member(src, dst):
        copies.append(1)
        if len(copies) == 2:
            dst.write(src.read(7))  # Some bytes reach disk, then the crash.
            raise KeyboardInterrupt
        real_copy(src, dst)

    monkeypatch.setattr(data_fetch, "_copy_stream", crash_on_second_member)
    with pytest.raises(KeyboardInterrupt):
        data_fetch.fetch([ds.name], out, downloader=_copying_downloader(whl))

    second = out / ds.members[1].dest
    assert not second.exists()
    leftovers = [p.name for p in _all_files(out) if p.name.endswith(".part")]
    assert leftovers == []
    assert not (out / ds.name / ".fetched.json").exists()
    # Whatever did land is complete, never a prefix.
    first = out / ds.members[0].dest
    if first.exists():
        assert first.read_bytes() == WHEEL_MEMBERS[ds.members[0].source]

    # The next run is not fooled into "cached" and completes the job.
    monkeypatch.setattr(data_fetch, "_copy_stream", real_copy)
    res = data_fetch.fetch([ds.name], out, downloader=_copying_downloader(whl))
    assert res[ds.name]["status"] == "fetched"
    assert second.read_bytes() == WHEEL_MEMBERS[ds.members[1].source]


def test_missing_download_file_is_reported(tmp_path, wheel_ds):
    ds, _ = wheel_ds

    def wrong_name(dataset, dest_dir):
        (Path(dest_dir) / "other-2.0.whl").write_bytes(b"x")
        return Path(dest_dir) / dataset.filename

    with pytest.raises(ProtlmError, match=r"expected .*fakepkg-1\.0.*found other-2\.0\.whl"):
        data_fetch.fetch([ds.name], tmp_path / "out", downloader=wrong_name)


@pytest.mark.parametrize(
    "use_dpkg",
    [
        False,
        pytest.param(
            True,
            marks=pytest.mark.skipif(
                shutil.which("dpkg-deb") is None, reason="dpkg-deb not installed"
            ),
        ),
    ],
)
def test_deb_extraction(tmp_path, use_dpkg):
    files = {
        "usr/share/doc/fake/example-data/DB.fasta.gz": gzip.compress(b">sp|P1|X\nMKV\n"),
        "usr/share/doc/fake/example-data/other.txt": b"ignored\n",
    }
    deb = _build_deb(tmp_path / "fakedata_1.0-1_all.deb", files)
    ds = data_fetch.Dataset(
        name="fakedeb",
        kind="deb",
        package="fakedata",
        version="1.0-1",
        filename=deb.name,
        sha256=_sha(deb),
        members=(
            data_fetch.Member(
                "usr/share/doc/fake/example-data/DB.fasta.gz", "fakedeb/DB.fasta.gz"
            ),
        ),
        license="test",
        description="test",
    )
    out = tmp_path / "out"
    res = data_fetch.extract(ds, deb, out, use_dpkg=use_dpkg)
    assert [r["dest"] for r in res] == ["fakedeb/DB.fasta.gz"]
    assert (out / "fakedeb/DB.fasta.gz").read_bytes() == files[ds.members[0].source]
    assert [p.relative_to(out).as_posix() for p in _all_files(out)] == ["fakedeb/DB.fasta.gz"]

    missing = dataclasses.replace(
        ds, members=(data_fetch.Member("usr/share/doc/fake/nope.gz", "fakedeb/nope.gz"),)
    )
    with pytest.raises(ProtlmError, match="not found: usr/share/doc/fake/nope.gz"):
        data_fetch.extract(missing, deb, tmp_path / "out2", use_dpkg=use_dpkg)


def test_cli_arguments_and_run(tmp_path, monkeypatch, capsys, wheel_ds):
    ds, whl = wheel_ds
    parser = argparse.ArgumentParser()
    data_cmd.add_arguments(parser)

    args = parser.parse_args([])
    assert data_fetch.resolve_names(args.dataset) == ["uniprot20k"]
    assert args.data_dir is None and args.force is False
    args = parser.parse_args(["--dataset", "all", "--dataset", "scl2205"])
    assert data_fetch.resolve_names(args.dataset) == [
        "uniprot20k", "sidechainnet", "scl2205", "proteome938293"
    ]
    with pytest.raises(SystemExit):
        parser.parse_args(["--dataset", "nope"])
    with pytest.raises(ProtlmError, match="unknown dataset 'nope'"):
        data_fetch.resolve_names(["nope"])

    # fetched/ of the one data root: $PROTLM_DATA_DIR, else data/ (run from the repo).
    monkeypatch.delenv("PROTLM_DATA_DIR", raising=False)
    monkeypatch.chdir(REPO)
    assert data_fetch.default_data_dir() == os.path.join("data", "fetched")
    monkeypatch.setenv("PROTLM_DATA_DIR", str(tmp_path / "root"))
    assert data_fetch.default_data_dir() == str(tmp_path / "root" / "fetched")

    # run() takes the table names from argparse; the fake set is in the table
    # (fixture), so pass it directly rather than through choices.
    monkeypatch.setattr(data_fetch, "download", _copying_downloader(whl))
    ns = argparse.Namespace(dataset=[ds.name], data_dir=None, force=False)
    assert data_cmd.run(ns) == 0
    assert data_cmd.run(ns) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    total = sum(len(v) for v in WHEEL_MEMBERS.values())
    for line, status in zip(lines, ["fetched", "cached"]):
        fields = line.split("\t")
        assert fields[:3] == [ds.name, status, str(tmp_path / "root" / "fetched" / ds.name)]
        assert fields[3].startswith(f"{total} bytes")


def test_committed_sample_is_2000_uniprot_records():
    assert SAMPLE.is_file(), f"missing committed sample {SAMPLE}"
    headers = []
    residues = 0
    with gzip.open(SAMPLE, "rt", encoding="ascii") as f:
        for line in f:
            if line.startswith(">"):
                headers.append(line)
            else:
                residues += len(line.strip())
    assert len(headers) == 2000
    assert all(h.startswith((">sp|", ">tr|")) for h in headers)
    assert residues > 0
    # mtime 0 in the gzip header keeps the committed bytes reproducible.
    assert SAMPLE.read_bytes()[4:8] == b"\x00\x00\x00\x00"
