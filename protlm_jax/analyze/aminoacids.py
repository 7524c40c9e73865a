"""What a model learned about the 20 amino acids (``protlm analyze aminoacids``).

Two views of each standard residue, for the model and for a random
initialisation of the same config (the family's own initialisers, seeded):

* ``input``: its uncontextualised input embedding, the model's layer 0
  (Hugging Face ``hidden_states[0]``) for the residue alone between the
  family's special tokens: the embedding row itself for T5, XLNet and TXL
  (relative positions); for BERT-style models the row plus the first
  position and token type, layer-normalised, the same shift for all 20.
* ``contextual``: the mean final-layer embedding of the residue over every
  occurrence in the proteins of a FASTA file.

Numbers: for each view and each property (Kyte–Doolittle hydrophobicity,
volume, charge; :mod:`protlm_jax.analyze.properties`), the Spearman
correlation between the residues' embedding distances (cosine by default)
and their property differences, with a one-sided permutation p-value
(:func:`protlm_jax.analyze.stats.mantel`). Pictures: the 2-D projections,
coloured by biophysical group with the letters drawn (PNG and HTML).
"""

from __future__ import annotations

import csv
import json
import os
from typing import Dict, Optional, Sequence

import numpy as np

from protlm_jax.analyze import plots, properties, stats
from protlm_jax.data import fasta as fasta_io
from protlm_jax.embed.engine import clean_sequence
from protlm_jax.errors import InputError, ProtlmError

VIEWS = ("input", "contextual")
WEIGHTS = ("model", "random_init")


def input_rows(embedder) -> np.ndarray:
    """[20, D] layer 0 of each standard residue alone (``properties.AMINO_ACIDS`` order)."""
    out = dict(embedder.embed([(a, a) for a in properties.AMINO_ACIDS], layers=(0,)))
    return np.stack([out[a][0] for a in properties.AMINO_ACIDS])


def read_proteins(path: str, limit: int, max_length: Optional[int] = None) -> tuple:
    """(the first ``limit`` records of a FASTA file no longer than ``max_length`` as
    (id, sequence), how many longer ones were passed over); one line on bad input."""
    records, longer = [], 0
    for rec in fasta_io.read_records(path):
        reason = fasta_io.invalid_reason(rec.sequence)
        if reason:
            raise InputError(path, rec.line, f"record {rec.id!r}: {reason.replace('_', ' ')}")
        if max_length is not None and len(clean_sequence(rec.sequence)) > max_length:
            longer += 1
            continue
        records.append((f"{len(records)}", rec.sequence))
        if len(records) >= limit:
            break
    if not records:
        raise InputError(path, 0, "no FASTA records" if not longer else
                         f"all {longer} records are longer than the model's "
                         f"{max_length} residues")
    return records, longer


def contextual_means(embedder, records: Sequence[tuple], batch_tokens: int = 4096):
    """([20, D] mean last-layer embedding per standard residue, occurrences [20])."""
    sums, counts = None, np.zeros(len(properties.AMINO_ACIDS), np.int64)
    index = {a: i for i, a in enumerate(properties.AMINO_ACIDS)}
    seqs = {i: clean_sequence(s) for i, s in records}
    for ident, x_LD in embedder.embed(records, token_budget=batch_tokens):
        if sums is None:
            sums = np.zeros((len(properties.AMINO_ACIDS), x_LD.shape[-1]), np.float64)
        letters = np.array([index.get(c, -1) for c in seqs[ident]])
        keep = letters >= 0
        np.add.at(sums, letters[keep], x_LD[keep])
        counts += np.bincount(letters[keep], minlength=len(counts))
    missing = [a for a, c in zip(properties.AMINO_ACIDS, counts) if c == 0]
    if missing:
        raise ProtlmError(f"the proteins never contain {', '.join(missing)}: the contextual "
                          "view needs every standard residue (give more proteins)")
    return (sums / counts[:, None]).astype(np.float32), counts


def correlations(x_AD: np.ndarray, *, metric: str, permutations: int, seed: int) -> dict:
    """Per property: Spearman(distance, |difference|) and its permutation p-value."""
    dist = stats.pairwise(x_AD, metric)
    return {name: stats.mantel(dist, [table[a] for a in properties.AMINO_ACIDS],
                               permutations=permutations, seed=seed)
            for name, table in properties.PROPERTIES.items()}


def analyze(embedder, output: str, *, fasta: Optional[str] = None, proteins: int = 200,
            methods: Sequence[str] = ("tsne",), metric: str = "cosine", perplexity: float = 5.0,
            neighbors: int = 10, permutations: int = 9999, seed: int = 0,
            model_name: str = "model") -> dict:
    """Runs the analysis and writes its files into ``output``.

    Args:
      embedder: the model's :class:`~protlm_jax.embed.Embedder`.
      output: the folder (created) for ``aminoacids.json``,
        ``aminoacids_points.csv``, ``aminoacids_<method>.png`` / ``.html``.
      fasta: proteins for the contextual view (None: no contextual view).
      proteins: the first this many records of ``fasta`` (that fit the model's
        positions; longer ones are passed over and counted).
      methods: projections (``pca``, ``tsne``, ``umap``).
      metric: embedding distance (``cosine`` or ``euclidean``).
      perplexity, neighbors: t-SNE and UMAP settings (20 points).
      permutations: of the permutation tests.
      seed: of the random initialisation, the tests and the projections.
      model_name: how the pictures name the model.

    Returns:
      What ``aminoacids.json`` holds.
    """
    if metric not in stats.METRICS:
        raise ProtlmError(f"--metric must be one of {', '.join(stats.METRICS)}, got {metric!r}")
    for method in methods:
        stats.check_projection(method, len(properties.AMINO_ACIDS), perplexity=perplexity,
                               neighbors=neighbors)
    if permutations < 1:
        raise ProtlmError(f"--permutations must be at least 1, got {permutations}")
    records, longer = None, 0
    if fasta:
        # Learned positions end somewhere (BERT-style models): longer proteins
        # are passed over, and counted.
        room = None if embedder.max_tokens is None else \
            embedder.max_tokens - len(embedder.prefix) - len(embedder.suffix)
        records, longer = read_proteins(fasta, proteins, room)
    weights = {"model": embedder, "random_init": embedder.with_random_params(seed)}
    vectors: Dict[tuple, np.ndarray] = {}
    occurrences = None
    for w, emb in weights.items():
        vectors[("input", w)] = input_rows(emb)
        if records is not None:
            vectors[("contextual", w)], occurrences = contextual_means(emb, records)
    result: dict = {
        "model": model_name, "family": embedder.family.name,
        "d_model": int(vectors[("input", "model")].shape[1]), "metric": metric, "seed": seed,
        "properties": {"hydrophobicity": "Kyte-Doolittle 1982", "volume": "Zamyatnin 1972 (A^3)",
                       "charge": "side chain at pH 7 (H +0.1)"},
        "fasta": fasta, "proteins": None if records is None else len(records),
        "proteins_passed_over_longer_than_positions": longer,
        "residues_per_amino_acid": None if occurrences is None else
        dict(zip(properties.AMINO_ACIDS, occurrences.tolist())),
        "correlations": {}, "files": []}
    for (view, w), x in vectors.items():
        result["correlations"].setdefault(view, {})[w] = correlations(
            x, metric=metric, permutations=permutations, seed=seed)
    os.makedirs(output, exist_ok=True)
    rows = []
    groups = [properties.GROUPS[a] for a in properties.AMINO_ACIDS]
    hover = [f"{a} ({properties.GROUPS[a]})<br>hydropathy {properties.KYTE_DOOLITTLE[a]:+.1f}"
             f"<br>volume {properties.VOLUME[a]:.1f} A^3<br>charge {properties.CHARGE[a]:+.1f}"
             for a in properties.AMINO_ACIDS]
    for method in methods:
        panels = []
        for (view, w), x in vectors.items():
            xy = stats.project(x, method, seed=seed, metric=metric, perplexity=perplexity,
                               neighbors=neighbors)
            rho = result["correlations"][view][w]["hydrophobicity"]
            who = model_name if w == "model" else "random init"
            panels.append(plots.Panel(
                f"{view} embedding, {who}: hydrophobicity rho {rho['spearman']:+.2f} "
                f"(p {rho['p_value']:.3g})", xy, groups, list(properties.AMINO_ACIDS), hover))
            rows += [(view, w, method, a, g, float(px), float(py))
                     for a, g, (px, py) in zip(properties.AMINO_ACIDS, groups, xy)]
        title = f"Amino acids in {model_name} ({method.upper()}, {metric})"
        for writer, ext in ((plots.write_png, "png"), (plots.write_html, "html")):
            path = os.path.join(output, f"aminoacids_{method}.{ext}")
            writer(panels, path, suptitle=title, palette=properties.GROUP_COLOURS,
                   order=properties.GROUP_ORDER)
            result["files"].append(os.path.basename(path))
    with open(os.path.join(output, "aminoacids_points.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["view", "weights", "method", "residue", "group", "x", "y"])
        writer.writerows(rows)
    result["files"] += ["aminoacids_points.csv", "aminoacids.json"]
    with open(os.path.join(output, "aminoacids.json"), "w") as f:
        json.dump(result, f, indent=1)
    return result
