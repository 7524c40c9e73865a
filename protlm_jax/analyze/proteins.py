"""How well per-protein embeddings separate labels (``protlm analyze proteins``).

The points are the per-protein vectors of an HDF5 file written by
``protlm embed --per_protein`` (or embedded here from a model). Labels come
from a CSV (bio_embeddings' annotation file: ``identifier,label``) or a
built-in task (``scl2205``: the localization classes). Proteins of the file
without a label are drawn as ``UNKNOWN`` and left out of the numbers.

Numbers, for the embeddings and for amino-acid composition (the baseline;
needs the sequences: from the task or a FASTA): leave-one-out k-NN accuracy
against the majority class, and the silhouette of the labelled points.
Pictures: the 2-D projection (PNG, and plotly HTML whose hover shows the id
and the label); ``proteins_points.csv`` holds the coordinates.
"""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from protlm_jax.analyze import plots, stats
from protlm_jax.data import fasta as fasta_io
from protlm_jax.embed.engine import sanitize_id
from protlm_jax.errors import InputError, ProtlmError
from protlm_jax.probes import datasets, features

TASKS = ("scl2205",)


def read_h5(path: str) -> Tuple[Dict[str, np.ndarray], Callable[[str], Optional[str]]]:
    """({dataset key: [D] float32}, the key of a protein id) of a per-protein HDF5 file.

    Ids resolve as the probes resolve them (:class:`~protlm_jax.probes.features.H5Features`:
    the key, the ``original_id`` or its first word, the sanitised id). One line on bad input.
    """
    import h5py

    h5 = features.H5Features(path)
    out: Dict[str, np.ndarray] = {}
    for key, ds in h5.items():
        if not isinstance(ds, h5py.Dataset):
            raise InputError(path, 0, f"{key!r} is a group, not a per-protein dataset")
        if ds.ndim != 1:
            raise InputError(path, 0, f"{key!r} has shape {ds.shape}: not a per-protein "
                             "vector (embed with `protlm embed --per_protein`)")
        out[key] = np.asarray(ds[()], np.float32)
    if not out:
        raise InputError(path, 0, "no per-protein vectors (embed with "
                         "`protlm embed --per_protein`)")
    dims = {v.shape[0] for v in out.values()}
    if len(dims) > 1:
        raise InputError(path, 0, f"vectors of different sizes {sorted(dims)}")
    return out, h5.key


def read_labels(path: str) -> Dict[str, str]:
    """{identifier: label} of an annotation CSV with ``identifier`` and ``label`` columns."""
    try:
        f = open(path, newline="", encoding="utf-8")
    except OSError as e:
        raise InputError(path, 0, f"cannot read: {e.strerror}") from None
    out: Dict[str, str] = {}
    with f:
        reader = csv.DictReader(f)
        try:
            fields = reader.fieldnames or []
        except UnicodeDecodeError:
            raise InputError(path, 1, "not UTF-8 text") from None
        if "identifier" not in fields or "label" not in fields:
            raise InputError(path, 1, f"needs the columns identifier,label (has "
                             f"{','.join(fields) or 'none'})")
        try:
            for row in reader:
                ident, label = (row["identifier"] or "").strip(), (row["label"] or "").strip()
                if not ident or not label:
                    raise InputError(path, reader.line_num, "empty identifier or label")
                if ident in out and out[ident] != label:
                    raise InputError(path, reader.line_num, f"{ident!r} has two labels, "
                                     f"{out[ident]!r} and {label!r}")
                out[ident] = label
        except UnicodeDecodeError:
            raise InputError(path, reader.line_num + 1, "not UTF-8 text") from None
    if not out:
        raise InputError(path, 0, "no labels")
    return out


def task_proteins(task: str, data_dir: Optional[str] = None):
    """({id: label}, {id: sequence}) of every protein of a built-in task."""
    if task != "scl2205":
        raise ProtlmError(f"--task must be one of {', '.join(TASKS)}, got {task!r}")
    root = data_dir or datasets.default_data_dir()
    if not os.path.exists(os.path.join(root, "scl2205", "scl2205.csv")):
        raise InputError(os.path.join(root, "scl2205"), 0,
                         "not found (run `protlm data fetch --dataset all`)")
    splits, classes = datasets.load_scl2205(root)
    labels, seqs = {}, {}
    for part in splits.values():
        for ident, seq, y in zip(part.ids, part.sequences, part.labels):
            labels[ident], seqs[ident] = classes[int(y)], seq
    return labels, seqs


def read_sequences(path: str) -> Dict[str, str]:
    """{id: sequence} of a FASTA file, by the HDF5 key ``protlm embed`` gives each."""
    out = {}
    for rec in fasta_io.read_records(path):
        out[sanitize_id(rec.description)] = rec.sequence
    if not out:
        raise InputError(path, 0, "no FASTA records")
    return out


def analyze(vectors: Dict[str, np.ndarray], labels: Dict[str, str], output: str, *,
            sequences: Optional[Dict[str, str]] = None,
            baselines: Optional[Dict[str, Dict[str, np.ndarray]]] = None,
            resolve: Optional[Callable[[str], Optional[str]]] = None,
            extra: Optional[Mapping[str, Any]] = None, labels_source: str = "labels",
            embeddings_source: str = "embeddings", strict: bool = True,
            methods: Sequence[str] = ("tsne",), metric: str = "cosine",
            perplexity: float = 30.0, neighbors: int = 15, k: int = 5, seed: int = 0) -> dict:
    """Numbers and pictures of labelled per-protein vectors, written into ``output``.

    Args:
      vectors: {HDF5 key: [D]}.
      labels: {protein id: label}, matched to keys by ``resolve``.
      output: the folder for ``proteins.json``, ``proteins_points.csv``,
        ``proteins_<method>.png`` / ``.html``.
      sequences: {id or key: sequence} for the composition baseline (None: no baseline).
      baselines: more vectors scored beside them, by name ({"random_init": {key: [D]}}),
        with the same keys.
      resolve: protein id -> key or None (default: the id as given or sanitised as
        ``protlm embed`` keys it; :func:`read_h5` gives the probes' lookup).
      extra: more entries for ``proteins.json`` (counts of the caller's).
      labels_source, embeddings_source: file names for messages.
      strict: every label's id must be in ``vectors`` (a labels CSV); False
        for a task's labels, of which the file holds a subset.
      methods, metric, perplexity, neighbors: the projections.
      k: neighbours of the k-NN vote.
      seed: of the projections.

    Returns:
      What ``proteins.json`` holds.
    """
    if metric not in stats.METRICS:
        raise ProtlmError(f"--metric must be one of {', '.join(stats.METRICS)}, got {metric!r}")
    if k < 1:
        raise ProtlmError(f"--k must be at least 1, got {k}")
    keys = list(vectors)
    if resolve is None:
        def resolve(ident):
            return next((k for k in (ident, sanitize_id(ident)) if k in vectors), None)
    point_label: Dict[str, str] = {}
    missing: List[str] = []
    for ident, label in labels.items():
        key = resolve(ident)
        if key is None:
            missing.append(ident)
        else:
            point_label[key] = label
    if missing and strict:
        raise InputError(labels_source, 0, f"{len(missing):,} of {len(labels):,} labelled ids "
                         f"are not in {embeddings_source} (e.g. {', '.join(missing[:3])})")
    labelled = [key for key in keys if key in point_label]
    if not labelled:
        raise InputError(labels_source, 0, f"none of its ids is in {embeddings_source}")
    for method in methods:
        stats.check_projection(method, len(keys), perplexity=perplexity, neighbors=neighbors)
    x = np.stack([vectors[key] for key in keys])
    y = [point_label[key] for key in labelled]
    x_lab = np.stack([vectors[key] for key in labelled])
    result: dict = {
        "embeddings": embeddings_source, "labels": labels_source, "metric": metric, "k": k,
        "seed": seed, "points": len(keys), "labelled": len(labelled),
        "unknown": len(keys) - len(labelled), "labels_not_in_embeddings": len(missing),
        "classes": {c: y.count(c) for c in sorted(set(y))},
        "majority_accuracy": stats.majority_accuracy(y), **(extra or {}), "scores": {},
        "files": []}

    def score(name, features):
        entry = {"knn_accuracy": stats.knn_accuracy(features, y, k=k, metric=metric)}
        try:
            entry["silhouette"] = stats.silhouette(features, y, metric=metric)
        except ProtlmError as e:
            entry["silhouette"], entry["silhouette_note"] = None, str(e)
        result["scores"][name] = entry

    score("embeddings", x_lab)
    for name, other in (baselines or {}).items():
        score(name, np.stack([other[key] for key in labelled]))
    if sequences is not None:
        seqs = []
        for key in labelled:
            seq = sequences.get(key)
            if seq is None:
                raise InputError(labels_source, 0, f"no sequence for {key!r}: the composition "
                                 "baseline needs every labelled protein's sequence")
            seqs.append(seq)
        score("composition", stats.composition(seqs))
    os.makedirs(output, exist_ok=True)
    category = [point_label.get(key, plots.UNKNOWN) for key in keys]
    hover = [f"{key}<br>{c}" for key, c in zip(keys, category)]
    rows = []
    emb = result["scores"]["embeddings"]
    for method in methods:
        xy = stats.project(x, method, seed=seed, metric=metric, perplexity=perplexity,
                           neighbors=neighbors)
        title = (f"{len(keys):,} proteins ({method.upper()}, {metric}): {k}-NN accuracy "
                 f"{emb['knn_accuracy']:.3f} (majority {result['majority_accuracy']:.3f})")
        panel = plots.Panel(os.path.basename(embeddings_source), xy, category, None, hover)
        order = sorted(set(y)) + ([plots.UNKNOWN] if result["unknown"] else [])
        for writer, ext in ((plots.write_png, "png"), (plots.write_html, "html")):
            path = os.path.join(output, f"proteins_{method}.{ext}")
            writer([panel], path, suptitle=title, order=order)
            result["files"].append(os.path.basename(path))
        rows += [(key, c, method, float(px), float(py)) for key, c, (px, py)
                 in zip(keys, category, xy)]
    with open(os.path.join(output, "proteins_points.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["identifier", "label", "method", "x", "y"])
        writer.writerows(rows)
    result["files"] += ["proteins_points.csv", "proteins.json"]
    with open(os.path.join(output, "proteins.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result


def embed_vectors(embedder, records: Sequence[tuple]) -> Dict[str, np.ndarray]:
    """{HDF5-style key: per-protein mean} of (id, sequence) records, embedded here."""
    return {sanitize_id(ident): v for ident, v in embedder.embed(records, per_protein=True)}


def select(sequences: Dict[str, str], *, limit: Optional[int], max_length: Optional[int],
           seed: int) -> tuple:
    """(records kept, number longer than ``max_length``): at most ``limit`` (seeded) of
    those no longer than ``max_length``, in id order."""
    ids = sorted(sequences)
    short = [i for i in ids if not max_length or len(sequences[i]) <= max_length]
    longer = len(ids) - len(short)
    if limit and limit < len(short):
        rng = np.random.default_rng(seed)
        short = sorted(rng.choice(short, size=limit, replace=False).tolist())
    return [(i, sequences[i]) for i in short], longer
