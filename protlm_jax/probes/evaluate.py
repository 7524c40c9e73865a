"""Run a probe task end to end: features → fitted head → metrics, table, plot.

:func:`run_task` fits one head per *row* (a featurizer: the language model,
an HDF5 file, the one-hot / composition baseline) on the task's training
split, early-stops on its validation split and scores every test split; a
"majority class" row (the most frequent training label, no fitting) shows
chance level. :func:`write_outputs` writes ``result.json``, ``results.md`` and
``learning_curve.png``.
"""

from __future__ import annotations

import json
import os
import time
from typing import Callable, Optional, Sequence

import numpy as np

from protlm_jax.errors import ProtlmError
from protlm_jax.probes import features as features_lib
from protlm_jax.probes import heads as heads_lib
from protlm_jax.probes import metrics
from protlm_jax.probes import train as train_lib
from protlm_jax.probes.datasets import ProbeTask, ProteinSet, ResidueSet

MAJORITY = "majority class"


def default_head(task: ProbeTask) -> str:
    return "cnn" if task.kind == "residue" else "fnn"


def _labels(dataset, kind: str) -> dict:
    if kind == "residue":
        return {"ss3": (dataset.ss3, dataset.scored), "ss8": (dataset.ss8, dataset.scored)}
    return {"location": (dataset.labels, np.ones(len(dataset), bool)),
            "membrane": (dataset.membrane, dataset.membrane >= 0)}


def _features(featurizer, dataset, per_protein: bool) -> list:
    feats = features_lib.featurize(featurizer, zip(dataset.ids, dataset.sequences),
                                   per_protein)
    if not per_protein:
        for ident, seq, f in zip(dataset.ids, dataset.sequences, feats):
            if len(f) != len(seq):
                raise ProtlmError(f"{ident}: {len(f)} feature rows for {len(seq)} "
                                  f"residues (was the sequence changed by cleaning?)")
    return feats


def _score(task: ProbeTask, dataset, predictions: dict) -> dict:
    if task.kind == "residue":
        return {
            "q3": metrics.residue_report(dataset.ss3, predictions["ss3"], dataset.scored,
                                         heads_lib.SS3_CLASSES),
            "q8": metrics.residue_report(dataset.ss8, predictions["ss8"], dataset.scored,
                                         heads_lib.SS8_CLASSES)}
    out = {f"q{len(task.class_names)}": metrics.protein_report(
        dataset.labels, predictions["location"], task.class_names)}
    if "membrane" in predictions:
        out["q2"] = metrics.protein_report(dataset.membrane, predictions["membrane"],
                                           ("soluble", "membrane"), dataset.membrane >= 0)
    return out


def _majority(task: ProbeTask) -> dict:
    """Predictions of the most frequent training label for every test item."""
    tests = {}
    if task.kind == "residue":
        common = {}
        for name in ("ss3", "ss8"):
            y = np.concatenate([a[s] for a, s in zip(getattr(task.train, name),
                                                     task.train.scored)])
            common[name] = int(np.bincount(y).argmax())
        for test_name, ds in task.tests.items():
            preds = {n: [np.full(len(s), c) for s in ds.sequences] for n, c in common.items()}
            tests[test_name] = _score(task, ds, preds)
    else:
        loc = int(np.bincount(task.train.labels).argmax())
        known = task.train.membrane[task.train.membrane >= 0]
        mem = int(np.bincount(known, minlength=2).argmax()) if len(known) else 0
        for test_name, ds in task.tests.items():
            tests[test_name] = _score(task, ds, {"location": np.full(len(ds), loc),
                                                 "membrane": np.full(len(ds), mem)})
    return {"tests": tests}


def run_task(task: ProbeTask, rows: Sequence, head: Optional[str] = None,
             config: Optional[train_lib.ProbeConfig] = None,
             log: Optional[Callable[[str], None]] = print, majority: bool = True) -> dict:
    """Fits and scores the head on each featurizer in ``rows``.

    Args:
      task: from ``datasets.load_task``.
      rows: featurizers (each has a ``name``).
      head: ``cnn`` (residue tasks), ``fnn`` or ``light_attention`` (protein
        tasks); default by task kind.
      config: optimisation settings (default ``ProbeConfig()``).
      log: line printer or None.
      majority: add the majority-class row.

    Returns:
      A JSON-able dict: task, head, splits, notes, and per row its test
      metrics, learning curve, best epoch and timings.
    """
    head = head or default_head(task)
    if task.kind == "residue" and head != "cnn":
        raise ProtlmError(f"head {head!r} does not fit per-residue task {task.name} "
                          f"(use cnn)")
    if task.kind == "protein" and head == "cnn":
        raise ProtlmError(f"head cnn does not fit per-protein task {task.name} "
                          f"(use fnn or light_attention)")
    config = config or train_lib.ProbeConfig()
    per_residue_input = heads_lib.per_residue(head)
    per_protein = not per_residue_input
    # The CNN is convolution-only: pack proteins into rows (one compiled shape).
    gap = heads_lib.SecondaryStructureCNN.kernel // 2 if head == "cnn" else 0
    batcher = train_lib.Batcher(per_residue_input, config, pack_gap=gap)
    splits = {name: {"proteins": len(ds), "residues": int(sum(map(len, ds.sequences)))}
              for name, ds in task.all_sets()}
    result = {"task": task.name, "kind": task.kind, "head": head, "notes": task.notes,
              "class_names": list(task.class_names), "splits": splits,
              "config": dict(vars(config)), "rows": {},
              "standard_error": "accuracy over n items: sqrt(p(1-p)/n); per-protein "
                                "mean: std(ddof=1)/sqrt(n_proteins); ±1.96 SE shown"}
    if majority:
        result["rows"][MAJORITY] = _majority(task)
    for featurizer in rows:
        name = _row_name(featurizer, task, per_protein)
        t0 = time.perf_counter()
        feats = {split: _features(featurizer, ds, per_protein) for split, ds in task.all_sets()}
        t_features = time.perf_counter() - t0
        dim = int(feats["train"][0].shape[-1])
        num_classes = len(task.class_names)
        h = (heads_lib.make_head(head) if task.kind == "residue"
             else heads_lib.make_head(head, num_classes, membrane=True))
        valid_batches = batcher(feats["valid"], _labels(task.valid, task.kind))
        epochs = train_lib.iter_epochs(batcher, feats["train"],
                                       _labels(task.train, task.kind), config.seed)
        if log:
            log(f"probe {task.name} / {name}: {head} on {dim}-d features, "
                f"{len(task.train)} training proteins")
        fitted = train_lib.fit(h, epochs, valid_batches, config,
                               log=(lambda s: log(f"  {s}")) if log else None)
        tests = {}
        for test_name, ds in task.tests.items():
            batches = batcher(feats[test_name], _labels(ds, task.kind))
            preds = train_lib.predict(fitted, batches, len(ds))
            tests[test_name] = _score(task, ds, preds)
        result["rows"][name] = {"tests": tests, "feature_dim": dim,
                                "best_epoch": fitted.best_epoch, "curve": fitted.curve,
                                "seconds_features": round(t_features, 2),
                                "seconds_fit": round(fitted.seconds, 2)}
        if log:
            log(f"  → {headline_text(result, name)}")
    return result


def _row_name(featurizer, task: ProbeTask, per_protein: bool) -> str:
    if isinstance(featurizer, features_lib.OneHot):
        return "composition" if per_protein else "one-hot"
    return getattr(featurizer, "name", type(featurizer).__name__)


# --- summaries -----------------------------------------------------------------------


def headline(result: dict, row: str) -> dict:
    """``{"<test>/q3": accuracy, …}`` of one row (for TensorBoard)."""
    out = {}
    for test_name, scores in result["rows"][row]["tests"].items():
        for metric, report in scores.items():
            out[f"{test_name}/{metric}"] = report["accuracy"]
    return out


def headline_text(result: dict, row: str) -> str:
    parts = []
    for test_name, scores in result["rows"][row]["tests"].items():
        parts.append(test_name + " " + ", ".join(
            f"{m.upper()} {metrics.format_accuracy(r)}" for m, r in scores.items()))
    return "; ".join(parts)


def markdown_table(result: dict) -> str:
    """One row per featurizer, columns per test split and metric (percent,
    ± 1.96 SE; per-residue tasks add the per-protein mean)."""
    rows = result["rows"]
    first = next(iter(rows.values()))["tests"]
    header, align = ["features"], ["---"]
    for test_name, scores in first.items():
        for metric in scores:
            label = f"{test_name} {metric.upper()}"
            header += [label, f"{label} MCC"]
            align += ["---:", "---:"]
            if result["kind"] == "residue":
                header.append(f"{label} per-protein")
                align.append("---:")
    lines = [f"| {' | '.join(header)} |", f"| {' | '.join(align)} |"]
    for name, row in rows.items():
        cells = [name]
        for test_name, scores in row["tests"].items():
            for metric, report in scores.items():
                cells += [metrics.format_accuracy(report), f"{report['mcc']:.3f}"]
                if result["kind"] == "residue":
                    pp = report["per_protein"]
                    cells.append(f"{100 * pp['mean']:.1f} ± {100 * pp['ci95']:.1f}")
        lines.append(f"| {' | '.join(cells)} |")
    splits = ", ".join(f"{k} {v['proteins']:,} proteins / {v['residues']:,} residues"
                       for k, v in result["splits"].items())
    return (f"### {result['task']} ({result['head']} head)\n\n" + "\n".join(lines) +
            f"\n\nSplits: {splits}.\n{result['notes']}\n"
            f"Accuracy in % ± 1.96 standard errors ({result['standard_error']}).\n")


def plot_learning_curves(result: dict, path: str) -> None:
    """Validation accuracy and loss per epoch for every fitted row (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    primary = "ss3" if result["kind"] == "residue" else "location"
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
    for name, row in result["rows"].items():
        curve = row.get("curve")
        if not curve:
            continue
        epochs = [c["epoch"] for c in curve]
        ax_acc.plot(epochs, [c[f"valid_{primary}_accuracy"] for c in curve],
                    marker="o", label=f"{name} (valid)")
        ax_acc.plot(epochs, [c[f"train_{primary}_accuracy"] for c in curve],
                    linestyle="--", label=f"{name} (train)")
        ax_loss.plot(epochs, [c["valid_loss"] for c in curve], marker="o",
                     label=f"{name} (valid)")
        ax_loss.plot(epochs, [c["train_loss"] for c in curve], linestyle="--",
                     label=f"{name} (train)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel(f"{primary} accuracy")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("loss (sum over outputs)")
    ax_acc.legend(fontsize=8)
    ax_loss.legend(fontsize=8)
    fig.suptitle(f"{result['task']}: {result['head']} probe learning curves")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(result: dict, out_dir: str) -> dict:
    """Writes result.json, results.md and learning_curve.png; returns paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "result.json"),
             "markdown": os.path.join(out_dir, "results.md"),
             "plot": os.path.join(out_dir, "learning_curve.png")}
    with open(paths["json"], "w") as f:
        json.dump(result, f, indent=1)
    with open(paths["markdown"], "w") as f:
        f.write(markdown_table(result))
    plot_learning_curves(result, paths["plot"])
    return paths


__all__ = ["run_task", "write_outputs", "markdown_table", "headline", "headline_text",
           "plot_learning_curves", "ResidueSet", "ProteinSet"]
