"""Fine-tuning tasks: labelled proteins with one or more outputs.

Task specs (``--task``):

* the probe tasks as ``protlm probe`` reads them (``ss_casp12``, ``scl2205``,
  ``netsurfp:TRAIN.csv,TEST.csv…``, ``deeploc:FILE.fasta``): per residue
  ``ss3`` + ``ss8``; per protein ``location`` + ``membrane``;
* ``contact_number[:FILE.csv|DIR]`` (per-residue regression): the CA contact
  number, how many other CA atoms lie within 12 Å (the radius of Biopython's
  ``ExposureCN``), a standard burial measure. A directory of PDB files is read
  (``ATOM`` CA records of the first model, first chain); without an argument,
  the committed sample ``data/sample/contact_number_pdb52.csv`` (52 PDB chains,
  see ``data/README.md``). Split by id hash: 20 % test, 10 % validation;
* ``csv:TRAIN.csv[,TEST.csv…]``: a user's own labels, ``id,sequence,label``
  per protein. The label is a class name or a number (per protein), or per
  residue a string of one letter per residue (classes) or numbers separated
  by spaces, commas or semicolons (regression). Numbers everywhere make a
  regression task, anything else classes;
* ``fasta:TRAIN.fasta[,TEST.fasta…]``: ``>id label`` headers (per protein).

Where a file has no validation split, 10 % of the training proteins (by id
hash) are held out for early stopping. Bad files stop with one line naming the
file, the record and the reason.

Shapes: L residues of one protein.
"""

from __future__ import annotations

import csv
import dataclasses
import gzip
import os
import pathlib
import re
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from protlm_jax.errors import InputError, ProtlmError
from protlm_jax.probes import datasets as probe_datasets
from protlm_jax.probes.heads import SS3_CLASSES, SS8_CLASSES

CONTACT_RADIUS = 12.0
SAMPLE_CONTACTS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), "data", "sample", "contact_number_pdb52.csv")
TASK_SPECS = ("ss_casp12, scl2205, netsurfp:TRAIN.csv,TEST.csv…, deeploc:FILE.fasta, "
              "contact_number[:FILE.csv|PDB_DIR], csv:TRAIN.csv[,TEST.csv…], "
              "fasta:TRAIN.fasta[,TEST.fasta…]")

THREE_TO_ONE = {
    "ALA": "A", "ARG": "R", "ASN": "N", "ASP": "D", "CYS": "C", "GLN": "Q", "GLU": "E",
    "GLY": "G", "HIS": "H", "ILE": "I", "LEU": "L", "LYS": "K", "MET": "M", "PHE": "F",
    "PRO": "P", "SER": "S", "THR": "T", "TRP": "W", "TYR": "Y", "VAL": "V", "SEC": "U",
    "PYL": "O", "MSE": "M", "ASX": "B", "GLX": "Z"}


@dataclasses.dataclass(frozen=True)
class Output:
    """One predicted quantity: ``classes`` names, or () for a regression."""
    name: str
    classes: Tuple[str, ...] = ()

    @property
    def regression(self) -> bool:
        return not self.classes

    @property
    def size(self) -> int:
        return len(self.classes) or 1


@dataclasses.dataclass
class Split:
    """Proteins with, per output, labels and weights (0: not scored).

    Per-residue tasks hold ``[L]`` arrays per protein, per-protein tasks one
    number per protein.
    """
    ids: List[str]
    sequences: List[str]
    labels: Dict[str, List[Any]]
    weights: Dict[str, List[Any]]

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, index: Sequence[int]) -> "Split":
        index = list(index)
        return Split([self.ids[i] for i in index], [self.sequences[i] for i in index],
                     {k: [v[i] for i in index] for k, v in self.labels.items()},
                     {k: [v[i] for i in index] for k, v in self.weights.items()})


@dataclasses.dataclass
class Task:
    """A fine-tuning task: its kind, outputs and splits."""
    name: str
    kind: str  # "residue" or "protein"
    outputs: Tuple[Output, ...]
    train: Split
    valid: Split
    tests: Dict[str, Split]
    notes: str = ""

    def all_splits(self):
        yield "train", self.train
        yield "valid", self.valid
        yield from self.tests.items()


# --- from the probe tasks ---------------------------------------------------------


def _from_probe(task: probe_datasets.ProbeTask) -> Task:
    def convert(ds) -> Split:
        if task.kind == "residue":
            return Split(list(ds.ids), list(ds.sequences),
                         {"ss3": list(ds.ss3), "ss8": list(ds.ss8)},
                         {"ss3": [s.astype(np.float32) for s in ds.scored],
                          "ss8": [s.astype(np.float32) for s in ds.scored]})
        return Split(list(ds.ids), list(ds.sequences),
                     {"location": list(ds.labels), "membrane": list(np.maximum(ds.membrane, 0))},
                     {"location": [1.0] * len(ds),
                      "membrane": [float(m >= 0) for m in ds.membrane]})
    outputs = ((Output("ss3", SS3_CLASSES), Output("ss8", SS8_CLASSES))
               if task.kind == "residue" else
               (Output("location", tuple(task.class_names)),
                Output("membrane", ("soluble", "membrane"))))
    return Task(task.name, task.kind, outputs, convert(task.train), convert(task.valid),
                {k: convert(v) for k, v in task.tests.items()}, task.notes)


# --- contact numbers from PDB files --------------------------------------------------


def contact_numbers(ca_LX: np.ndarray, radius: float = CONTACT_RADIUS) -> np.ndarray:
    """Per residue, how many other CA atoms lie within ``radius`` Å."""
    d = np.linalg.norm(ca_LX[:, None, :] - ca_LX[None, :, :], axis=-1)
    return (d <= radius).sum(axis=1).astype(np.float32) - 1.0


def read_pdb_chain(path: str) -> Tuple[str, np.ndarray]:
    """(sequence, [L, 3] CA coordinates) of the first chain of the first model.

    Reads ``ATOM`` records only (no code, no external tools); alternate
    locations other than blank/``A`` and repeated residues are skipped;
    residue names outside the 20 (+ U O and MSE) become X.
    """
    opener = gzip.open if path.endswith(".gz") else open
    seq, coords, seen, chain = [], [], set(), None
    try:
        with opener(path, "rt", encoding="ascii", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if line.startswith("ENDMDL"):
                    break
                if not line.startswith("ATOM") or line[12:16].strip() != "CA":
                    continue
                if line[16] not in (" ", "A"):
                    continue
                c = line[21]
                if chain is None:
                    chain = c
                elif c != chain:
                    break
                key = line[22:27]
                if key in seen:
                    continue
                seen.add(key)
                try:
                    xyz = [float(line[30:38]), float(line[38:46]), float(line[46:54])]
                except ValueError:
                    raise InputError(path, n, "CA record with unreadable coordinates") from None
                seq.append(THREE_TO_ONE.get(line[17:20].strip(), "X"))
                coords.append(xyz)
    except (OSError, EOFError) as e:
        raise InputError(path, 0, f"cannot read: {e}") from None
    if not seq:
        raise InputError(path, 0, "no ATOM CA records")
    return "".join(seq), np.asarray(coords, np.float64)


def contact_table_from_pdb(directory: str) -> List[Tuple[str, str, np.ndarray]]:
    """(id, sequence, contact numbers) of every ``*.pdb[.gz]``/``*.ent[.gz]`` file."""
    names = sorted(n for n in os.listdir(directory)
                   if re.search(r"\.(pdb|ent)(\.gz)?$", n))
    if not names:
        raise InputError(directory, 0, "no .pdb/.ent files")
    out = []
    for name in names:
        seq, ca = read_pdb_chain(os.path.join(directory, name))
        out.append((re.sub(r"\.(pdb|ent)(\.gz)?$", "", name), seq, contact_numbers(ca)))
    return out


def write_contact_table(rows, path: str) -> None:
    """``id,sequence,label`` CSV with the numbers space-separated (``%g``)."""
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "sequence", "label"])
        for ident, seq, values in rows:
            w.writerow([ident, seq, " ".join(f"{v:g}" for v in values)])


# --- generic CSV / FASTA ------------------------------------------------------------

_NUMBERS = re.compile(r"[\s,;]+")


def _parse_values(cell: str) -> Optional[np.ndarray]:
    parts = [p for p in _NUMBERS.split(cell.strip()) if p]
    try:
        return np.array([float(p) for p in parts], np.float32)
    except ValueError:
        return None


def _read_csv(path: str) -> List[Tuple[str, str, str, int]]:
    rows = []
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise InputError(path, 0, f"cannot open: {e.strerror or e}") from None
    with f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise InputError(path, 0, "empty file")
        cols = [h.strip().lower() for h in header]
        if cols[:3] != ["id", "sequence", "label"]:
            raise InputError(path, 1, f"expected the header id,sequence,label, got "
                             f"{','.join(header)[:80]!r}")
        for row in reader:
            if not row or not any(c.strip() for c in row):
                continue
            if len(row) < 3:
                raise InputError(path, reader.line_num, f"{len(row)} columns, expected 3")
            rows.append((row[0].strip(), re.sub(r"\s+", "", row[1]).upper(), row[2].strip(),
                         reader.line_num))
    return rows


def _read_fasta_labels(path: str) -> List[Tuple[str, str, str, int]]:
    rows = []
    for line, header, seq in probe_datasets._fasta_records(path):
        parts = header.split(None, 1)
        if len(parts) < 2:
            raise InputError(path, line, f"record {parts[0] if parts else ''!r}: no label "
                             "after the id (expected '>id label')")
        rows.append((parts[0], seq.upper(), parts[1].strip(), line))
    return rows


def _rows_to_task(name: str, files: Sequence[str], reader, output: str = "label") -> Task:
    tables = [(p, reader(p)) for p in files]
    for p, rows in tables:
        if not rows:
            raise InputError(p, 0, "no records")
        seen: Dict[str, int] = {}
        for ident, seq, label, line in rows:
            if not ident:
                raise InputError(p, line, "empty id")
            if ident in seen:
                raise InputError(p, line, f"duplicate id {ident!r} (first at line "
                                 f"{seen[ident]})")
            seen[ident] = line
            if not seq or not seq.isalpha():
                raise InputError(p, line, f"record {ident!r}: "
                                 f"{'empty sequence' if not seq else 'non-letters in sequence'}")
            if not label:
                raise InputError(p, line, f"record {ident!r}: empty label")
    # Per residue when every label has one value (or letter) per residue.
    def per_residue(seq, label):
        values = _parse_values(label)
        if values is not None and len(values) == len(seq) and len(seq) > 1:
            return True
        return len(label) == len(seq) and len(seq) > 1 and label.isalpha()
    first_rows = [r for _, rows in tables for r in rows]
    # The first record decides: per residue or per protein, numbers or classes.
    _, seq0, label0, _ = first_rows[0]
    residue = per_residue(seq0, label0)
    numeric = _parse_values(label0) is not None
    for p, rows in tables:
        for ident, seq, label, line in rows:
            v = _parse_values(label)
            if numeric and v is None:
                raise InputError(p, line, f"record {ident!r}: label {label[:30]!r} is not "
                                 "numbers (the first record's label is)")
            if residue and not per_residue(seq, label):
                n = len(v) if v is not None else len(label)
                raise InputError(p, line, f"record {ident!r}: {n} "
                                 f"{'numbers' if numeric else 'letters'} for {len(seq)} "
                                 "residues (the first record has one per residue)")
            if numeric and not residue and len(v) != 1:
                raise InputError(p, line, f"record {ident!r}: {len(v)} numbers for "
                                 f"{len(seq)} residues (the first record has one per protein)")
    classes: Tuple[str, ...] = ()
    if not numeric:
        if residue:
            classes = tuple(sorted({c for _, _, label, _ in first_rows for c in label}))
        else:
            classes = tuple(sorted({label for _, _, label, _ in first_rows}))
    out = Output(output, classes)
    index = {c: i for i, c in enumerate(classes)}

    def split(rows) -> Split:
        ids, seqs, labels, weights = [], [], [], []
        for ident, seq, label, _ in rows:
            ids.append(ident)
            seqs.append(seq)
            if numeric:
                v = _parse_values(label)
                labels.append(v if residue else float(v[0]))
                weights.append(np.ones(len(seq), np.float32) if residue else 1.0)
            elif residue:
                labels.append(np.array([index[c] for c in label], np.int32))
                weights.append(np.ones(len(seq), np.float32))
            else:
                labels.append(index[label])
                weights.append(1.0)
        return Split(ids, seqs, {output: labels}, {output: weights})

    train_all = split(tables[0][1])
    tests = {pathlib.Path(p).stem: split(rows) for p, rows in tables[1:]}
    if not tests:  # one file: 20 % of it (by a salted id hash) is the test set
        test = [i for i, x in enumerate(train_all.ids)
                if probe_datasets.hash_fraction(f"test:{x}") < 0.20]
        tests = {"test": train_all.subset(test)}
        train_all = train_all.subset(sorted(set(range(len(train_all))) - set(test)))
    keep, held = probe_datasets.split_by_hash(train_all.ids, 0.10)
    return Task(name, "residue" if residue else "protein", (out,), train_all.subset(keep),
                train_all.subset(held), tests,
                notes=f"{', '.join(files)}; {'per residue' if residue else 'per protein'} "
                      f"{'regression' if numeric else f'{len(classes)} classes'}; validation: "
                      "ids by hash")


# --- the entry point -------------------------------------------------------------------


def _empty(task: Task) -> None:
    for split_name, split in task.all_splits():
        if not len(split):
            raise ProtlmError(f"--task {task.name}: the {split_name} split is empty")


def load_task(spec: str, data_dir: Optional[str] = None, *, train_limit: Optional[int] = None,
              test_limit: Optional[int] = None, max_train_length: Optional[int] = None,
              max_test_length: Optional[int] = None, seed: int = 0) -> Task:
    """A task from its spec (``TASK_SPECS``), with the probe's subset options.

    Raises:
      ProtlmError / InputError: an unknown task, unreadable or inconsistent
        files, an empty split.
    """
    name, _, arg = spec.partition(":")
    if name in ("ss_casp12", "scl2205", "netsurfp", "deeploc"):
        task = _from_probe(probe_datasets.load_task(
            spec, data_dir, train_limit=train_limit, test_limit=test_limit,
            max_train_length=max_train_length, max_test_length=max_test_length, seed=seed))
        _empty(task)
        return task
    if name == "contact_number":
        source = arg or SAMPLE_CONTACTS
        if os.path.isdir(source):
            rows = _contact_rows(contact_table_from_pdb(source))
            task = _rows_to_task(name, [source], lambda _: rows, output=name)
        else:
            task = _rows_to_task(name, [source], _read_csv, output=name)
        if task.outputs[0].classes or task.kind != "residue":
            raise InputError(source, 0, "contact numbers must be one number per residue")
        task.notes = (f"CA contact number (CA atoms within {CONTACT_RADIUS:g} Å), from "
                      f"{source}; 20 % of chains (id hash) test, 10 % of the rest validation")
    elif name in ("csv", "fasta"):
        files = [p for p in arg.split(",") if p]
        if not files:
            raise ProtlmError(f"--task {spec}: expected {name}:TRAIN.{name}[,TEST.{name}…]")
        task = _rows_to_task(name, files, _read_csv if name == "csv" else _read_fasta_labels)
    else:
        raise ProtlmError(f"--task {spec}: unknown task; known: {TASK_SPECS}")
    _empty(task)
    task.train = probe_datasets.subset_limit(task.train, train_limit, seed, max_train_length)
    task.valid = probe_datasets.subset_limit(
        task.valid, max(1, train_limit // 5) if train_limit else None, seed, max_train_length)
    task.tests = {k: probe_datasets.subset_limit(v, test_limit, seed, max_test_length)
                  for k, v in task.tests.items()}
    _empty(task)
    return task


def _contact_rows(rows):
    return [(ident, seq, " ".join(f"{v:g}" for v in values), i + 2)
            for i, (ident, seq, values) in enumerate(rows)]
