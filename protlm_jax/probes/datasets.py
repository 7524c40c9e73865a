"""Probe data sets: the published file formats and the real stand-ins we have.

Formats users bring (REFERENCE.md §6):

  * NetSurfP-2.0 / ProtTrans CSVs (``Train_HHblits.csv``, ``CASP12_HHblits.csv``,
    ``CB513_HHblits.csv``, ``TS115_HHblits.csv``, ``NEW364.csv``): a header
    row, then ``input, dssp3, dssp8, disorder, cb513_mask`` per protein.
    ``input``/``dssp3``/``dssp8`` are strings (white space inside is ignored);
    ``disorder`` and ``cb513_mask`` hold one number per residue separated by
    white space (``1.0`` keep, ``0.0`` exclude from scoring). A residue is
    scored only when both are non-zero. Empty ``disorder``/``cb513_mask``
    cells mean "all scored".
  * DeepLoc FASTA: ``>ACCESSION Location-M|S|U [test]``; records with the
    ``test`` flag form the test set, the rest the training set; ``U`` (unknown
    membrane state) is left out of Q2.

Real stand-ins fetched by ``protlm data fetch`` (DATA.md; say in results that
they are not the paper's test sets):

  * ``ss_casp12``: sidechainnet DSSP annotations with ProteinNet CASP12 split
    membership: probes train on ``casp12_training_30`` chains (5 % of them,
    chosen by a hash of the id, for early stopping) and are tested on the 211
    ``casp12_validation`` chains. There is no disorder mask: unresolved
    residues appear as coil (L) and are scored.
  * ``scl2205``: SCL2205 subcellular localization, 13 classes, its own
    train / ``evl`` (validation) / test split; Q2 is "the label contains
    Membrane" against the rest.

DSSP letters map to 8 states ``H G I E B T S C`` (``L``, ``-``, ``C``, blank
and ``P`` (polyproline, DSSP ≥ 4) are coil) and to 3 states: H, G, I → H;
E, B → E; the rest → C.

Bad files stop with one line naming the file, the record (line) and the reason.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from typing import Iterable, Iterator, Optional, Sequence

import numpy as np

from protlm_jax.data import fetch as data_fetch
from protlm_jax.errors import InputError, ProtlmError
from protlm_jax.probes.heads import SS8_CLASSES

_SS8_INDEX = {c: i for i, c in enumerate(SS8_CLASSES)}
_SS8_INDEX.update({"L": 7, "-": 7, " ": 7, "P": 7})
# 8-state index → 3-state index: H G I → H; E B → E; T S C → C.
SS8_TO_SS3 = np.array([0, 0, 0, 1, 1, 2, 2, 2], np.int8)
_SS3_INDEX = {"H": 0, "E": 1, "C": 2, "L": 2, "-": 2}

SCL2205_MEMBRANE = "Membrane"
_WS = re.compile(r"\s+")


@dataclasses.dataclass
class ResidueSet:
    """Proteins with per-residue 3- and 8-state labels.

    ``scored[i]`` is False at residues excluded from training and scoring
    (disorder, evaluation masks).
    """
    ids: list[str]
    sequences: list[str]
    ss3: list[np.ndarray]
    ss8: list[np.ndarray]
    scored: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "ResidueSet":
        return ResidueSet([self.ids[i] for i in index], [self.sequences[i] for i in index],
                          [self.ss3[i] for i in index], [self.ss8[i] for i in index],
                          [self.scored[i] for i in index])

    @property
    def num_residues(self) -> int:
        return int(sum(len(s) for s in self.sequences))


@dataclasses.dataclass
class ProteinSet:
    """Proteins with one class label each and a membrane label (-1 unknown)."""
    ids: list[str]
    sequences: list[str]
    labels: np.ndarray
    membrane: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "ProteinSet":
        index = list(index)
        return ProteinSet([self.ids[i] for i in index], [self.sequences[i] for i in index],
                          self.labels[index], self.membrane[index])


@dataclasses.dataclass
class ProbeTask:
    """A probe task: splits plus what its labels mean.

    Attributes:
      name: e.g. ``ss_casp12``.
      kind: ``"residue"`` (secondary structure) or ``"protein"``.
      train, valid: training and early-stopping splits.
      tests: test split name → set (several for NetSurfP CSVs).
      class_names: classes of the per-protein label (empty for residue tasks).
      notes: provenance and caveats, copied into results.
      left_out: test split name → proteins left out by ``max_test_length``.
    """
    name: str
    kind: str
    train: ResidueSet | ProteinSet
    valid: ResidueSet | ProteinSet
    tests: dict
    class_names: tuple = ()
    notes: str = ""
    left_out: dict = dataclasses.field(default_factory=dict)

    def all_sets(self) -> Iterator[tuple[str, ResidueSet | ProteinSet]]:
        yield "train", self.train
        yield "valid", self.valid
        yield from self.tests.items()


# --- label parsing -------------------------------------------------------------


def ss8_indices(dssp: str, path: str, line: int) -> np.ndarray:
    """DSSP 8-state string → int8 indices into ``SS8_CLASSES``."""
    try:
        return np.fromiter((_SS8_INDEX[c] for c in dssp), np.int8, len(dssp))
    except KeyError as e:
        raise InputError(path, line, f"unknown DSSP 8-state letter {e.args[0]!r} "
                         f"(expected one of HGIEBTSC, L or -)") from None


def ss3_indices(dssp3: str, path: str, line: int) -> np.ndarray:
    """3-state string (H E C) → int8 indices into ``SS3_CLASSES``."""
    try:
        return np.fromiter((_SS3_INDEX[c] for c in dssp3), np.int8, len(dssp3))
    except KeyError as e:
        raise InputError(path, line, f"unknown 3-state letter {e.args[0]!r} "
                         f"(expected H, E or C)") from None


def hash_fraction(key: str) -> float:
    """A stable number in [0, 1) from a string (split membership by hash)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2 ** 64


def split_by_hash(ids: Sequence[str], fraction: float) -> tuple[list[int], list[int]]:
    """Indices (kept, held out): ``fraction`` of ``ids`` chosen by hash."""
    held = [i for i, x in enumerate(ids) if hash_fraction(x) < fraction]
    held_set = set(held)
    return [i for i in range(len(ids)) if i not in held_set], held


def _open_text(path: str):
    try:
        return open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise InputError(path, 0, f"cannot open: {e.strerror or e}") from None


# --- NetSurfP-2.0 / ProtTrans CSV ------------------------------------------------

NETSURFP_COLUMNS = ("input", "dssp3", "dssp8", "disorder", "cb513_mask")


def _mask_column(cell: str, length: int, name: str, path: str, line: int) -> np.ndarray:
    values = cell.split()
    if not values:
        return np.ones(length, bool)
    if len(values) != length:
        raise InputError(path, line, f"{name} has {len(values)} values for "
                         f"{length} residues")
    try:
        return np.array([float(v) != 0.0 for v in values], bool)
    except ValueError:
        raise InputError(path, line, f"{name} holds a non-number") from None


def load_netsurfp_csv(path: str) -> ResidueSet:
    """Reads a NetSurfP-2.0 / ProtTrans secondary-structure CSV.

    Returns:
      The proteins; ids are ``<file stem>_<row>`` (the format has no ids).
    """
    path = str(path)
    stem = pathlib.Path(path).stem
    ids, seqs, ss3, ss8, scored = [], [], [], [], []
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise InputError(path, 1, "empty file (expected a header row "
                             f"{','.join(NETSURFP_COLUMNS)})")
        names = [h.strip().lstrip("\ufeff") for h in header]
        missing = [c for c in NETSURFP_COLUMNS if c not in names]
        if missing:
            raise InputError(path, 1, f"missing column(s) {', '.join(missing)} "
                             f"(header: {','.join(names)})")
        col = {c: names.index(c) for c in NETSURFP_COLUMNS}
        for row in reader:
            line = reader.line_num
            if not row or all(not c.strip() for c in row):
                continue
            if len(row) < len(names):
                raise InputError(path, line, f"{len(row)} fields, expected {len(names)}")
            seq = _WS.sub("", row[col["input"]]).upper()
            d3 = _WS.sub("", row[col["dssp3"]]).upper()
            d8 = _WS.sub("", row[col["dssp8"]]).upper()
            if not seq:
                raise InputError(path, line, "empty sequence")
            if not seq.isalpha():
                raise InputError(path, line, "sequence holds characters other than letters")
            n = len(seq)
            if len(d3) != n or len(d8) != n:
                raise InputError(path, line, f"sequence has {n} residues but dssp3 "
                                 f"{len(d3)} and dssp8 {len(d8)} labels")
            labels8 = ss8_indices(d8, path, line)
            labels3 = ss3_indices(d3, path, line)
            keep = (_mask_column(row[col["disorder"]], n, "disorder", path, line)
                    & _mask_column(row[col["cb513_mask"]], n, "cb513_mask", path, line))
            ids.append(f"{stem}_{len(ids)}")
            seqs.append(seq)
            ss3.append(labels3)
            ss8.append(labels8)
            scored.append(keep)
    if not ids:
        raise InputError(path, 0, "no proteins")
    return ResidueSet(ids, seqs, ss3, ss8, scored)


# --- DeepLoc FASTA -----------------------------------------------------------------

DEEPLOC_MEMBRANE = {"M": 1, "S": 0, "U": -1}


def _fasta_records(path: str) -> Iterator[tuple[int, str, str]]:
    """(header line number, header, sequence) of a plain FASTA file."""
    header, line_no, parts = None, 0, []
    with _open_text(path) as f:
        for i, raw in enumerate(f, 1):
            line = raw.strip()
            if not line:
                continue
            if line.startswith(">"):
                if header is not None:
                    yield line_no, header, "".join(parts)
                header, line_no, parts = line[1:], i, []
            elif header is None:
                raise InputError(path, i, "sequence line before the first '>' header")
            else:
                parts.append(line)
    if header is not None:
        yield line_no, header, "".join(parts)


def load_deeploc_fasta(path: str) -> tuple[ProteinSet, ProteinSet, tuple[str, ...]]:
    """Reads a DeepLoc FASTA (``>ACC Location-M|S|U [test]``).

    Returns:
      (training set, test set, class names sorted alphabetically).
    """
    path = str(path)
    rows = []
    for line, header, seq in _fasta_records(path):
        fields = header.split()
        if len(fields) < 2:
            raise InputError(path, line, "header lacks the 'Location-M|S' field")
        acc, annotation = fields[0], fields[1]
        location, sep, mem = annotation.rpartition("-")
        if not sep or not location or mem not in DEEPLOC_MEMBRANE:
            raise InputError(path, line, f"expected 'Location-M', 'Location-S' or "
                             f"'Location-U' after the accession, got {annotation!r}")
        extra = [f.lower() for f in fields[2:]]
        if any(f != "test" for f in extra):
            raise InputError(path, line, f"unexpected header field(s) {fields[2:]} "
                             f"(only 'test' may follow)")
        seq = _WS.sub("", seq).upper()
        if not seq:
            raise InputError(path, line, f"{acc}: empty sequence")
        if not seq.isalpha():
            raise InputError(path, line, f"{acc}: sequence holds characters other "
                             f"than letters")
        rows.append((acc, seq, location, DEEPLOC_MEMBRANE[mem], bool(extra)))
    if not rows:
        raise InputError(path, 0, "no records")
    classes = tuple(sorted({r[2] for r in rows}))
    index = {c: i for i, c in enumerate(classes)}

    def make(selected):
        return ProteinSet([r[0] for r in selected], [r[1] for r in selected],
                          np.array([index[r[2]] for r in selected], np.int32),
                          np.array([r[3] for r in selected], np.int32))

    train = make([r for r in rows if not r[4]])
    test = make([r for r in rows if r[4]])
    if not len(test):
        raise InputError(path, 0, "no record carries the 'test' flag (nothing to test on)")
    if not len(train):
        raise InputError(path, 0, "every record carries the 'test' flag (nothing to train on)")
    return train, test, classes


# --- sidechainnet DSSP + ProteinNet CASP12 splits --------------------------------------

SIDECHAINNET_DSSP = "sidechainnet/full_protein_dssp_annotations.json"
SIDECHAINNET_IDS = "sidechainnet/all_proteinnet_ids.csv"


def _pnid_to_key(pnid: str) -> str:
    # Validation ids carry a "NN#" prefix (the identity bin); keys do not.
    return pnid.split("#", 1)[-1]


def load_sidechainnet_splits(data_dir: str, casp: str = "casp12",
                             splits: Sequence[str] = ("training_30", "validation")
                             ) -> dict[str, ResidueSet]:
    """Sidechainnet DSSP labels for the chains of ProteinNet splits.

    Args:
      data_dir: the ``protlm data fetch`` folder (holds ``sidechainnet/``).
      casp: ProteinNet edition, e.g. ``casp12``.
      splits: split names without the edition prefix.

    Returns:
      split → proteins (chains without DSSP labels are left out; the CASP test
      targets have none).
    """
    dssp_path = os.path.join(data_dir, SIDECHAINNET_DSSP)
    ids_path = os.path.join(data_dir, SIDECHAINNET_IDS)
    members: dict[str, list[str]] = {s: [] for s in splits}
    with _open_text(ids_path) as f:
        reader = csv.reader(f)
        header = next(reader, [])
        columns = {}
        for s in splits:
            name = f"{casp}_{s}"
            if name not in header:
                raise InputError(ids_path, 1, f"no column {name!r}")
            columns[s] = header.index(name)
        for row in reader:
            for s, c in columns.items():
                if row[c] == "1":
                    members[s].append(row[0])
    try:
        with _open_text(dssp_path) as f:
            annotations = json.load(f)
    except json.JSONDecodeError as e:
        raise InputError(dssp_path, e.lineno, f"invalid JSON: {e.msg}") from None
    out = {}
    for s, pnids in members.items():
        ids, seqs, ss3, ss8, scored = [], [], [], [], []
        for pnid in pnids:
            entry = annotations.get(_pnid_to_key(pnid))
            if entry is None:
                continue
            seq, dssp = entry["Sequence"], entry["DSSP"]
            if len(seq) != len(dssp):
                raise InputError(dssp_path, 0, f"{pnid}: {len(seq)} residues but "
                                 f"{len(dssp)} DSSP letters")
            labels8 = ss8_indices(dssp, dssp_path, 0)
            ids.append(pnid)
            seqs.append(seq)
            ss8.append(labels8)
            ss3.append(SS8_TO_SS3[labels8])
            scored.append(np.ones(len(seq), bool))
        out[s] = ResidueSet(ids, seqs, ss3, ss8, scored)
    return out


# --- SCL2205 --------------------------------------------------------------------------


def load_scl2205(data_dir: str) -> tuple[dict[str, ProteinSet], tuple[str, ...]]:
    """SCL2205 splits ``train`` / ``valid`` (``evl``) / ``test`` and class names.

    The membrane label is 1 when the class name contains "Membrane".
    """
    root = os.path.join(data_dir, "scl2205")
    csv_path, labels_path, splits_path = (os.path.join(root, n) for n in
                                          ("scl2205.csv", "labels.json", "splits.json"))
    with _open_text(labels_path) as f:
        index_to_label = json.load(f)["index_to_label"]
    classes = tuple(index_to_label[str(i)] for i in range(len(index_to_label)))
    ids, seqs, labels = [], [], []
    with _open_text(csv_path) as f:
        reader = csv.DictReader(f)
        for row in reader:
            try:
                label = int(row["scl"])
                if not 0 <= label < len(classes):
                    raise ValueError
            except (KeyError, TypeError, ValueError):
                raise InputError(csv_path, reader.line_num,
                                 f"bad class index {row.get('scl')!r}") from None
            ids.append(row["entry"])
            seqs.append(row["seq"].strip().upper())
            labels.append(label)
    labels_arr = np.array(labels, np.int32)
    membrane = np.array([int(SCL2205_MEMBRANE in classes[i]) for i in labels], np.int32)
    everything = ProteinSet(ids, seqs, labels_arr, membrane)
    with _open_text(splits_path) as f:
        splits = json.load(f)
    out = {}
    for ours, theirs in (("train", "trn"), ("valid", "evl"), ("test", "tst")):
        index = splits[theirs]
        if index and max(index) >= len(everything):
            raise InputError(splits_path, 0, f"split {theirs!r} refers to row "
                             f"{max(index)} of a {len(everything)}-row table")
        out[ours] = everything.subset(index)
    return out, classes


# --- tasks -----------------------------------------------------------------------------

BUILTIN_TASKS = ("ss_casp12", "scl2205")
TASK_SPECS = "ss_casp12, scl2205, netsurfp:TRAIN.csv,TEST.csv[,TEST.csv…], deeploc:FILE.fasta"


def default_data_dir() -> str:
    """The fetched data sets' folder (:func:`protlm_jax.data.fetch.default_data_dir`)."""
    return data_fetch.default_data_dir()


def _require(path: str) -> None:
    if not os.path.exists(path):
        raise InputError(path, 0, "not found (run `protlm data fetch --dataset all`)")


def subset_limit(dataset, limit: Optional[int], seed: int, max_length: Optional[int] = None):
    """At most ``limit`` items (random, seeded) of those no longer than ``max_length``
    (any set with ``sequences``, ``subset`` and ``len``)."""
    index = list(range(len(dataset)))
    if max_length:
        index = [i for i in index if len(dataset.sequences[i]) <= max_length]
    if limit and limit < len(index):
        rng = np.random.default_rng(seed)
        index = sorted(rng.choice(index, size=limit, replace=False).tolist())
    return dataset if len(index) == len(dataset) else dataset.subset(index)


def load_task(spec: str, data_dir: Optional[str] = None, *, train_limit: Optional[int] = None,
              test_limit: Optional[int] = None, max_train_length: Optional[int] = None,
              max_test_length: Optional[int] = None, seed: int = 0,
              valid_fraction: float = 0.05) -> ProbeTask:
    """A probe task from its spec (``TASK_SPECS``).

    Args:
      spec: ``ss_casp12``, ``scl2205``, ``netsurfp:TRAIN.csv,TEST.csv…`` or
        ``deeploc:FILE.fasta``.
      data_dir: folder of the fetched data (built-in tasks).
      train_limit: at most this many training proteins (random, seeded); the
        validation split is limited to a fifth of it.
      test_limit: at most this many proteins per test set (random, seeded).
      max_train_length: drop longer training/validation proteins.
      max_test_length: drop longer test proteins (quick monitors only: the
        published test sets keep every protein).
      seed: for the subsets.
      valid_fraction: held out of the training file by hash, where the data
        set has no validation split of its own.
    """
    data_dir = data_dir or default_data_dir()
    name, _, arg = spec.partition(":")
    if name == "ss_casp12":
        for rel in (SIDECHAINNET_DSSP, SIDECHAINNET_IDS):
            _require(os.path.join(data_dir, rel))
        sets = load_sidechainnet_splits(data_dir)
        keep, held = split_by_hash(sets["training_30"].ids, valid_fraction)
        task = ProbeTask(
            "ss_casp12", "residue", sets["training_30"].subset(keep),
            sets["training_30"].subset(held), {"casp12_validation": sets["validation"]},
            notes="sidechainnet DSSP labels; train: ProteinNet CASP12 training_30 chains "
                  f"({100 * valid_fraction:g} % by id hash for early stopping); test: the "
                  "CASP12 validation chains. A stand-in, not the NetSurfP CASP12 set; no "
                  "disorder mask (unresolved residues count as coil).")
    elif name == "scl2205":
        for rel in ("scl2205.csv", "labels.json", "splits.json"):
            _require(os.path.join(data_dir, "scl2205", rel))
        sets, classes = load_scl2205(data_dir)
        task = ProbeTask("scl2205", "protein", sets["train"], sets["valid"],
                         {"scl2205_test": sets["test"]}, classes,
                         notes="SCL2205 (UniProt 2022_05), 13 classes, its own train/evl/"
                               "test split; Q2 = label contains Membrane. A stand-in, not "
                               "DeepLoc.")
    elif name == "netsurfp":
        files = [p for p in arg.split(",") if p]
        if len(files) < 2:
            raise ProtlmError(f"--task {spec}: expected netsurfp:TRAIN.csv,TEST.csv[,…]")
        train_all = load_netsurfp_csv(files[0])
        keep, held = split_by_hash(train_all.ids, valid_fraction)
        tests = {pathlib.Path(p).stem: load_netsurfp_csv(p) for p in files[1:]}
        task = ProbeTask("netsurfp", "residue", train_all.subset(keep),
                         train_all.subset(held), tests,
                         notes=f"NetSurfP-2.0 CSVs; train {files[0]} "
                               f"({100 * valid_fraction:g} % held out for early stopping)")
    elif name == "deeploc":
        if not arg:
            raise ProtlmError(f"--task {spec}: expected deeploc:FILE.fasta")
        train_all, test, classes = load_deeploc_fasta(arg)
        keep, held = split_by_hash(train_all.ids, valid_fraction)
        task = ProbeTask("deeploc", "protein", train_all.subset(keep),
                         train_all.subset(held), {"deeploc_test": test}, classes,
                         notes=f"DeepLoc FASTA {arg}; test = records flagged 'test'")
    else:
        raise ProtlmError(f"--task {spec}: unknown task; known: {TASK_SPECS}")
    if not len(task.valid):
        raise ProtlmError(f"--task {spec}: the validation split is empty (too few "
                          f"training proteins)")
    task.train = subset_limit(task.train, train_limit, seed, max_train_length)
    task.valid = subset_limit(task.valid, max(1, train_limit // 5) if train_limit else None,
                        seed, max_train_length)
    if max_test_length:
        task.left_out = {k: sum(len(x) > max_test_length for x in v.sequences)
                         for k, v in task.tests.items()}
        if any(task.left_out.values()):
            task.notes = (task.notes + "; " if task.notes else "") + (
                f"left out test proteins longer than {max_test_length:,} residues "
                f"(--max_test_length): " + ", ".join(f"{k} {n:,} of {len(task.tests[k]):,}"
                                                      for k, n in task.left_out.items()))
    task.tests = {k: subset_limit(v, test_limit, seed, max_test_length)
                  for k, v in task.tests.items()}
    return task


def test_sequences(data_dir: Optional[str] = None) -> list[tuple[str, str]]:
    """(id, sequence) of every probe TEST protein: CASP12 validation chains and
    the SCL2205 test split (for ``protlm prepare --exclude``)."""
    data_dir = data_dir or default_data_dir()
    out = []
    for spec in BUILTIN_TASKS:
        task = load_task(spec, data_dir)
        for test in task.tests.values():
            out.extend(zip(test.ids, test.sequences))
    return out


def write_fasta(records: Iterable[tuple[str, str]], path: str, width: int = 60) -> int:
    """Writes (id, sequence) records as FASTA; returns how many."""
    n = 0
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    with open(path, "w") as f:
        for ident, seq in records:
            f.write(f">{ident}\n")
            for i in range(0, len(seq), width):
                f.write(seq[i:i + width] + "\n")
            n += 1
    return n


def write_test_fasta(path: str, data_dir: Optional[str] = None) -> int:
    """FASTA of the probe test sequences; returns the record count."""
    return write_fasta(test_sequences(data_dir), path)
