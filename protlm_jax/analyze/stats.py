"""Numbers and projections of embedding analyses (scikit-learn, SciPy, umap-learn).

* :func:`mantel`: Spearman correlation between two distance matrices with a
  permutation p-value (the items of one matrix relabelled at random).
* :func:`knn_accuracy`: leave-one-out k-nearest-neighbour accuracy.
* :func:`silhouette`: the mean silhouette of labelled points.
* :func:`composition`: amino-acid composition vectors, the usual baseline.
* :func:`project`: 2-D PCA, t-SNE or UMAP with a fixed seed.

Shape legend: N points, D dimensions, P pairs (N (N - 1) / 2).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from scipy import stats as scipy_stats
from scipy.spatial import distance as scipy_distance

from protlm_jax.analyze.properties import AMINO_ACIDS
from protlm_jax.errors import ProtlmError

METHODS = ("pca", "tsne", "umap")
METRICS = ("cosine", "euclidean")


def pairwise(x_ND: np.ndarray, metric: str = "cosine") -> np.ndarray:
    """Condensed pairwise distances [P] (``scipy.spatial.distance.pdist`` order)."""
    return scipy_distance.pdist(np.asarray(x_ND, np.float64), metric=metric)


def mantel(dist_P: np.ndarray, values_N: Sequence[float], *, permutations: int = 9999,
           seed: int = 0) -> dict:
    """Spearman rho between distances and |value differences|, one-sided p-value.

    The alternative is a positive correlation: items far apart in the
    embedding differ more in the property. The null relabels the items of
    the property (all ``N!`` orders equally likely); ``p = (1 + #{rho_perm >=
    rho}) / (1 + permutations)``.

    Returns:
      ``{"spearman": rho, "p_value": p, "permutations": n}``.
    """
    values = np.asarray(values_N, np.float64)
    n = len(values)
    if len(dist_P) != n * (n - 1) // 2:
        raise ValueError(f"{len(dist_P)} distances do not pair {n} items")
    rank_d = scipy_stats.rankdata(dist_P)
    rank_d = (rank_d - rank_d.mean()) / np.linalg.norm(rank_d - rank_d.mean())

    def rho(orders_KN):
        diffs = np.stack([scipy_distance.pdist(values[o][:, None], "cityblock")
                          for o in orders_KN])
        r = scipy_stats.rankdata(diffs, axis=1)
        r = r - r.mean(axis=1, keepdims=True)
        norm = np.linalg.norm(r, axis=1)
        return (r @ rank_d) / np.where(norm > 0, norm, 1.0)

    observed = float(rho(np.arange(n)[None])[0])
    rng = np.random.default_rng(seed)
    orders = np.argsort(rng.random((permutations, n)), axis=1)
    null = np.concatenate([rho(orders[i:i + 2000]) for i in range(0, permutations, 2000)])
    p = (1.0 + float(np.sum(null >= observed - 1e-12))) / (1.0 + permutations)
    return {"spearman": round(observed, 6), "p_value": round(p, 6),
            "permutations": int(permutations)}


def knn_accuracy(x_ND: np.ndarray, labels_N: Sequence, *, k: int = 5,
                 metric: str = "cosine") -> float:
    """Leave-one-out k-NN accuracy: each point's label by a vote of its ``k``
    nearest other points (a tie goes to the nearest of the tied labels)."""
    from sklearn.neighbors import NearestNeighbors

    labels = np.asarray(labels_N)
    n = len(labels)
    if n < 2:
        raise ProtlmError(f"k-NN needs at least 2 labelled points, got {n}")
    k = min(k, n - 1)
    index = NearestNeighbors(n_neighbors=k + 1, metric=metric).fit(x_ND)
    _, neighbours = index.kneighbors(x_ND)
    correct = 0
    for i, row in enumerate(neighbours):
        others = [j for j in row if j != i][:k]
        votes: dict = {}
        for rank, j in enumerate(others):
            count, first = votes.get(labels[j], (0, rank))
            votes[labels[j]] = (count + 1, first)
        best = max(votes.items(), key=lambda kv: (kv[1][0], -kv[1][1]))[0]
        correct += int(best == labels[i])
    return correct / n


def silhouette(x_ND: np.ndarray, labels_N: Sequence, metric: str = "cosine") -> float:
    """Mean silhouette (scikit-learn); needs 2 .. N - 1 distinct labels."""
    from sklearn.metrics import silhouette_score

    labels = np.asarray(labels_N)
    distinct = len(set(labels.tolist()))
    if not 2 <= distinct <= len(labels) - 1:
        raise ProtlmError(f"the silhouette needs 2 to {len(labels) - 1} distinct labels, "
                          f"got {distinct}")
    return float(silhouette_score(x_ND, labels, metric=metric))


def majority_accuracy(labels_N: Sequence) -> float:
    """Accuracy of always answering the most frequent label."""
    _, counts = np.unique(np.asarray(labels_N), return_counts=True)
    return float(counts.max() / counts.sum())


def composition(sequences: Sequence[str]) -> np.ndarray:
    """[N, 20] share of each standard amino acid (others ignored) per sequence."""
    out = np.zeros((len(sequences), len(AMINO_ACIDS)), np.float32)
    for i, seq in enumerate(sequences):
        seq = seq.upper()
        counts = np.array([seq.count(a) for a in AMINO_ACIDS], np.float32)
        out[i] = counts / max(1.0, counts.sum())
    return out


def check_projection(method: str, n: int, *, perplexity: float, neighbors: int) -> None:
    """One line when ``n`` points are too few for ``method``'s settings."""
    if method not in METHODS:
        raise ProtlmError(f"--method must be one of {', '.join(METHODS)}, got {method!r}")
    if n < 3:
        raise ProtlmError(f"{n} point(s): a 2-D projection needs at least 3")
    if method == "tsne" and not perplexity < n:
        raise ProtlmError(f"{n} points are too few for t-SNE with perplexity {perplexity:g} "
                          f"(it needs more points than the perplexity): lower --perplexity "
                          f"or use --method pca")
    if method == "umap" and not 2 <= neighbors < n:
        raise ProtlmError(f"{n} points are too few for UMAP with {neighbors} neighbours "
                          f"(it needs 2 <= neighbours < points): lower --neighbors or use "
                          f"--method pca")


def project(x_ND: np.ndarray, method: str, *, seed: int = 0, metric: str = "cosine",
            perplexity: float = 30.0, neighbors: int = 15) -> np.ndarray:
    """[N, 2] float64 coordinates: PCA (the data centred), t-SNE (``metric``,
    PCA start, ``perplexity``) or UMAP (``metric``, ``neighbors``), seeded."""
    x = np.asarray(x_ND, np.float64)
    check_projection(method, len(x), perplexity=perplexity, neighbors=neighbors)
    if method == "pca":
        from sklearn.decomposition import PCA

        return PCA(n_components=2, random_state=seed).fit_transform(x)
    if method == "tsne":
        from sklearn.manifold import TSNE

        return TSNE(n_components=2, perplexity=perplexity, metric=metric, init="pca",
                    random_state=seed).fit_transform(x)
    import umap  # numba compiles on first use: imported only when asked for

    return umap.UMAP(n_components=2, n_neighbors=neighbors, metric=metric,
                     random_state=seed, n_jobs=1).fit_transform(x).astype(np.float64)
