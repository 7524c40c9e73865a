"""Probe metrics with the paper's ±1.96 standard errors (NumPy, host side).

* Accuracy over n items (Q3/Q8 over all scored residues, Qn/Q2 over proteins):
  p = correct / n, standard error ``sqrt(p (1 - p) / n)`` (binomial). Over
  residues this treats residues as independent, so it is optimistic; the
  per-protein figure below is the honest one for per-residue tasks.
* Per-protein mean accuracy (Q3/Q8 averaged over proteins): the mean of the
  per-protein accuracies and the standard error of that mean,
  ``std(ddof=1) / sqrt(n_proteins)``.
* Matthews correlation: binary per class (one vs rest) and multi-class
  (Gorodkin's R_K from the confusion matrix),
  ``(c s - Σ_k p_k t_k) / sqrt((s² - Σ p_k²)(s² - Σ t_k²))`` with c correct,
  s total, p_k predicted and t_k true counts of class k (0 when undefined).

Only scored items enter: padding and excluded residues (disorder, masks) are
dropped before any count.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np

Z95 = 1.96


def accuracy_se(p: float, n: int) -> float:
    """Binomial standard error of an accuracy ``p`` over ``n`` items."""
    return math.sqrt(p * (1.0 - p) / n) if n > 0 else float("nan")


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """[true, predicted] counts."""
    m = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(m, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return m


def mcc_from_confusion(m: np.ndarray) -> float:
    """Multi-class Matthews correlation (Gorodkin's R_K); binary MCC for 2×2."""
    m = m.astype(np.float64)
    s, c = m.sum(), np.trace(m)
    t, p = m.sum(axis=1), m.sum(axis=0)
    denom = math.sqrt((s * s - (p * p).sum()) * (s * s - (t * t).sum()))
    return float((c * s - (p * t).sum()) / denom) if denom > 0 else 0.0


def binary_mcc(tp: float, fp: float, fn: float, tn: float) -> float:
    """Matthews correlation of a 2×2 table (0 when undefined)."""
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return float((tp * tn - fp * fn) / denom) if denom > 0 else 0.0


def classification_report(y_true: np.ndarray, y_pred: np.ndarray,
                          class_names: Sequence[str]) -> dict:
    """Accuracy ±SE, multi-class MCC, and per-class accuracy (recall) and MCC.

    Args:
      y_true: [N] int labels of the scored items.
      y_pred: [N] int predictions.
      class_names: names, index = class id.

    Returns:
      ``{"accuracy", "accuracy_se", "accuracy_ci95", "n", "mcc", "per_class":
      {name: {"n", "accuracy", "mcc"}}}`` (classes absent from ``y_true`` have
      accuracy None).
    """
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    k = len(class_names)
    m = confusion_matrix(y_true, y_pred, k)
    n = int(m.sum())
    acc = float(np.trace(m) / n) if n else float("nan")
    se = accuracy_se(acc, n)
    per_class = {}
    for i, name in enumerate(class_names):
        tp = m[i, i]
        fn = m[i].sum() - tp
        fp = m[:, i].sum() - tp
        tn = n - tp - fn - fp
        support = int(m[i].sum())
        per_class[name] = {"n": support,
                           "accuracy": float(tp / support) if support else None,
                           "mcc": binary_mcc(tp, fp, fn, tn)}
    return {"accuracy": acc, "accuracy_se": se, "accuracy_ci95": Z95 * se, "n": n,
            "mcc": mcc_from_confusion(m), "per_class": per_class}


def per_protein_mean(y_true: Sequence[np.ndarray], y_pred: Sequence[np.ndarray]) -> dict:
    """Mean of per-protein accuracies and its standard error.

    Proteins with no scored residue are left out (and counted).
    """
    accs = [float(np.mean(t == p)) for t, p in zip(y_true, y_pred) if len(t)]
    n = len(accs)
    mean = float(np.mean(accs)) if n else float("nan")
    se = float(np.std(accs, ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    return {"mean": mean, "se": se, "ci95": Z95 * se, "n_proteins": n,
            "proteins_without_scored_residues": len(y_true) - n}


def residue_report(y_true: Sequence[np.ndarray], y_pred: Sequence[np.ndarray],
                   scored: Sequence[np.ndarray], class_names: Sequence[str]) -> dict:
    """Per-residue metrics: over all scored residues and the per-protein mean.

    Args:
      y_true, y_pred: per protein, [L_i] int labels / predictions.
      scored: per protein, [L_i] bool, True where the residue counts.
      class_names: names, index = class id.
    """
    t = [np.asarray(a)[np.asarray(s, bool)] for a, s in zip(y_true, scored)]
    p = [np.asarray(a)[np.asarray(s, bool)] for a, s in zip(y_pred, scored)]
    flat_t = np.concatenate(t) if t else np.zeros(0, np.int64)
    flat_p = np.concatenate(p) if p else np.zeros(0, np.int64)
    report = classification_report(flat_t, flat_p, class_names)
    report["per_protein"] = per_protein_mean(t, p)
    return report


def protein_report(y_true: np.ndarray, y_pred: np.ndarray, class_names: Sequence[str],
                   known: Optional[np.ndarray] = None) -> dict:
    """Per-protein metrics; ``known`` (bool) drops proteins without a label."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if known is not None:
        y_true, y_pred = y_true[known], y_pred[known]
    return classification_report(y_true, y_pred, class_names)


def format_accuracy(report: dict, percent: bool = True) -> str:
    """``"81.2 ± 0.4"``: accuracy ± 1.96 SE (in percent by default)."""
    scale = 100.0 if percent else 1.0
    return f"{scale * report['accuracy']:.1f} ± {scale * report['accuracy_ci95']:.1f}"
