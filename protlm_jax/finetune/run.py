"""``protlm finetune`` end to end: base model + task -> trained head/adapters,
results as the probes write them, merging, and a Hugging Face PEFT export.

``OUTPUT/`` after a run:

  finetuned.safetensors   the trainable weights only (head, LoRA A/B, trained
                          norms; ``full``: the whole encoder), flat ``a.b.c`` keys
  finetune.json           base model, family, method, LoRA spec, task outputs,
                          label normalisation: what ``--merge`` and reuse need
  result.json, results.md, learning_curve.png   as ``protlm probe`` writes them
  checkpoints/            the resumable training state (last epoch)

The base MODEL_DIR / HF_DIR is only read. Regression metrics: Pearson r
(± 1.96 SE by Fisher's z over residues, optimistic as residues are not
independent), the per-protein mean r ± 1.96 SE (the honest one), Spearman ρ,
MAE and RMSE.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Callable, Dict, List, Optional

import jax
import numpy as np
from safetensors.numpy import load_file, save_file

from protlm_jax import checkpoints, models, partitioning
from protlm_jax.embed import io as embed_io
from protlm_jax.errors import ProtlmError
from protlm_jax.finetune import lora as lora_lib
from protlm_jax.finetune import train as train_lib
from protlm_jax.finetune.tasks import Task
from protlm_jax.models.family import flat_paths, unflatten
from protlm_jax.probes import metrics

ARTIFACT = "finetuned.safetensors"
MANIFEST = "finetune.json"
Z95 = metrics.Z95


# ----------------------------------------------------------------- metrics ---


def _pearson(a: np.ndarray, b: np.ndarray) -> float:
    if len(a) < 2 or a.std() == 0 or b.std() == 0:
        return float("nan")
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    order = np.argsort(x, kind="stable")
    r = np.empty(len(x), np.float64)
    r[order] = np.arange(len(x))
    # average ties
    _, inv, counts = np.unique(x, return_inverse=True, return_counts=True)
    sums = np.bincount(inv, r)
    return sums[inv] / counts[inv]


def regression_report(y_true: List[np.ndarray], y_pred: List[np.ndarray],
                      weights: List[np.ndarray]) -> Dict[str, Any]:
    """Pearson / Spearman / MAE / RMSE over scored items, and per-protein r."""
    t = [np.atleast_1d(np.asarray(a, np.float64))[np.atleast_1d(w) > 0]
         for a, w in zip(y_true, weights)]
    p = [np.atleast_1d(np.asarray(a, np.float64))[np.atleast_1d(w) > 0]
         for a, w in zip(y_pred, weights)]
    ft, fp = np.concatenate(t), np.concatenate(p)
    n = len(ft)
    r = _pearson(ft, fp)
    z_se = 1.0 / math.sqrt(n - 3) if n > 3 else float("nan")
    lo, hi = (math.tanh(math.atanh(r) - Z95 * z_se), math.tanh(math.atanh(r) + Z95 * z_se)) \
        if abs(r) < 1 else (r, r)
    per = [_pearson(a, b) for a, b in zip(t, p) if len(a) > 2]
    per = [x for x in per if not math.isnan(x)]
    pp_se = float(np.std(per, ddof=1) / math.sqrt(len(per))) if len(per) > 1 else float("nan")
    return {"pearson": r, "pearson_ci95": [lo, hi], "n": n,
            "spearman": _pearson(_ranks(ft), _ranks(fp)),
            "mae": float(np.mean(np.abs(ft - fp))),
            "rmse": float(np.sqrt(np.mean((ft - fp) ** 2))),
            "per_protein": {"mean": float(np.mean(per)) if per else float("nan"),
                            "se": pp_se, "ci95": Z95 * pp_se, "n_proteins": len(per)}}


def score(task: Task, split, preds: Dict[str, List[Any]]) -> Dict[str, Any]:
    """Metrics of one split per output (probe reports for classes)."""
    out = {}
    for o in task.outputs:
        y, w, p = split.labels[o.name], split.weights[o.name], preds[o.name]
        if o.regression:
            out[o.name] = regression_report(y, p, w)
        elif task.kind == "residue":
            out[o.name] = metrics.residue_report(y, p, [np.asarray(x) > 0 for x in w],
                                                 o.classes)
        else:
            known = np.asarray(w) > 0
            out[o.name] = metrics.protein_report(np.asarray(y), np.asarray(p), o.classes, known)
    return out


def headline(task: Task, tests: Dict[str, Any]) -> str:
    parts = []
    for test_name, scores in tests.items():
        cells = []
        for o in task.outputs:
            r = scores[o.name]
            if o.regression:
                pp = r["per_protein"]
                cells.append(f"{o.name} r {r['pearson']:.3f} (per protein {pp['mean']:.3f} ± "
                             f"{pp['ci95']:.3f}), MAE {r['mae']:.2f}")
            else:
                cells.append(f"{o.name} {metrics.format_accuracy(r)}")
        parts.append(f"{test_name}: " + ", ".join(cells))
    return "; ".join(parts)


def markdown(result: Dict[str, Any], task: Task) -> str:
    lines = [f"### {result['task']}: {result['method']} fine-tuning of "
             f"{result['base']['name']} ({result['base']['family']})", ""]
    header = ["test", "output", "metric", "value"]
    lines += ["| " + " | ".join(header) + " |", "|---|---|---|---:|"]
    for test_name, scores in result["tests"].items():
        for o in task.outputs:
            r = scores[o.name]
            if o.regression:
                pp = r["per_protein"]
                rows = [("Pearson r", f"{r['pearson']:.3f} [{r['pearson_ci95'][0]:.3f}, "
                                      f"{r['pearson_ci95'][1]:.3f}]"),
                        ("per-protein r", f"{pp['mean']:.3f} ± {pp['ci95']:.3f}"),
                        ("Spearman ρ", f"{r['spearman']:.3f}"), ("MAE", f"{r['mae']:.2f}")]
            else:
                rows = [("accuracy %", metrics.format_accuracy(r)), ("MCC", f"{r['mcc']:.3f}")]
                if "per_protein" in r:
                    pp = r["per_protein"]
                    rows.append(("per-protein %", f"{100 * pp['mean']:.1f} ± "
                                                  f"{100 * pp['ci95']:.1f}"))
            lines += [f"| {test_name} | {o.name} | {m} | {v} |" for m, v in rows]
    tp = result["trainable_parameters"]
    lines += ["", f"Trainable parameters: {sum(tp.values()):,} ("
              + ", ".join(f"{k} {v:,}" for k, v in tp.items()) + f"); best epoch "
              f"{result['best_epoch']} of {len(result['curve'])}.",
              "Splits: " + ", ".join(f"{k} {v['proteins']:,} proteins"
                                      + (f" ({v['left_out']} left out: too long)"
                                         if v["left_out"] else "")
                                      for k, v in result["splits"].items()) + ".",
              task.notes, "Accuracy ± 1.96 SE as the probes report it.", ""]
    return "\n".join(lines)


def plot_curve(result: Dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    fig, ax = plt.subplots(figsize=(6, 4))
    epochs = [c["epoch"] for c in curve]
    ax.plot(epochs, [c["train_loss"] for c in curve], "--", label="train")
    ax.plot(epochs, [c["valid_loss"] for c in curve], "o-", label="validation")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (sum over outputs)")
    ax.legend()
    ax.set_title(f"{result['task']}: {result['method']} fine-tuning")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------ the base model ---


def read_base(path: str, mesh) -> Dict[str, Any]:
    """The base encoder: family, encoder view, vocabulary (MODEL_DIR or HF dir)."""
    config, params, vocab, step = embed_io.read_model(path, encoder_only=True, mesh=mesh)
    family = models.family_for(config)
    try:
        view = family.encoder_view(config, params)
    except (KeyError, ValueError) as e:
        raise ProtlmError(f"{path}: params lack what the {family.name} encoder needs "
                          f"({e})") from None
    return {"config": config, "family": family, "view": view,
            "vocab": vocab if vocab is not None else family.vocabulary(), "step": step}


# --------------------------------------------------------------------- run ---


def finetune(base_path: str, task: Task, config: train_lib.FinetuneConfig, output: str, *,
             model_parallel_size: int = 1, log: Optional[Callable[[str], None]] = None
             ) -> Dict[str, Any]:
    """Fine-tunes, scores every test split, writes OUTPUT (see the module doc)."""
    if os.path.abspath(output) == os.path.abspath(base_path):
        raise ProtlmError(f"--output {output}: must not be the base model directory")
    mesh = partitioning.create_mesh(model_parallel_size)
    rules = partitioning.standard_logical_axis_rules("1d")
    base = read_base(base_path, mesh)
    family, view = base["family"], base["view"]
    model = train_lib.build(family, view, task, config, mesh, rules)
    tokens = train_lib.Tokens(family, base["vocab"], view.max_positions)
    enc = {name: tokens.encode(split) for name, split in task.all_splits()}
    for name, e in enc.items():
        if e.left_out and log:
            log(f"{name}: {len(e.left_out)} proteins longer than the model's "
                f"{view.max_positions} positions left out (e.g. {e.left_out[0]})")
        if not e.tokens:
            raise ProtlmError(f"--task {task.name}: every {name} protein is longer than "
                              f"the model's {view.max_positions} positions")
    counts = train_lib.trainable_count(model)
    if log:
        log(f"finetune {task.name}: {config.method} on {family.name} "
            f"({view.num_layers} layers); trainable " + ", ".join(
                f"{k} {v:,}" for k, v in counts.items()))
    os.makedirs(output, exist_ok=True)
    trained = train_lib.fit(model, view.params, enc, output=output, log=log)
    tests = {}
    for name in task.tests:
        _, preds = train_lib.evaluate(trained.runner, trained.trainable, enc[name])
        tests[name] = score(task, enc[name].split, preds)
    result = {
        "task": task.name, "kind": task.kind, "method": config.method,
        "base": {"path": os.path.abspath(base_path), "family": family.name,
                 "name": os.path.basename(os.path.normpath(base_path)), "step": base["step"]},
        "config": {k: (list(v) if isinstance(v, tuple) else v)
                   for k, v in dataclasses.asdict(config).items()},
        "outputs": [{"name": o.name, "classes": list(o.classes)} for o in task.outputs],
        "trainable_parameters": counts,
        "splits": {k: {"proteins": len(e.tokens), "left_out": len(e.left_out)}
                   for k, e in enc.items()},
        "tests": tests, "curve": trained.curve, "best_epoch": trained.best_epoch,
        "seconds": round(trained.seconds, 1), "resumed_from_step": trained.resumed_from,
        "notes": task.notes,
    }
    save_artifact(output, trained.trainable, model, base_path)
    with open(os.path.join(output, "result.json"), "w") as f:
        json.dump(result, f, indent=1, default=float)
    with open(os.path.join(output, "results.md"), "w") as f:
        f.write(markdown(result, task))
    plot_curve(result, os.path.join(output, "learning_curve.png"))
    if log:
        log(f"  → {headline(task, tests)}")
    return result


# ---------------------------------------------------------------- artifact ---


def save_artifact(output: str, trainable, model: train_lib.Model, base_path: str) -> None:
    flat = {k.replace("/", "."): np.asarray(jax.device_get(v), np.float32)
            for k, v in flat_paths(trainable).items()}
    tmp = os.path.join(output, ARTIFACT + ".tmp")
    save_file(flat, tmp)
    os.replace(tmp, os.path.join(output, ARTIFACT))
    manifest = {"format": 1, "base": os.path.abspath(base_path),
                "family": model.family.name, "method": model.config.method,
                "lora": lora_lib.spec_to_json(model.spec) if model.sites else None,
                "task_kind": model.task.kind,
                "outputs": [{"name": o.name, "classes": list(o.classes)}
                            for o in model.task.outputs],
                "label_norm": model.norm, "dropout": model.config.dropout,
                "head": model.config.head}
    with open(os.path.join(output, MANIFEST), "w") as f:
        json.dump(manifest, f, indent=1)


def read_artifact(adapter_dir: str) -> tuple[Dict[str, Any], Dict[str, np.ndarray]]:
    """(manifest, flat weights) of a fine-tuning OUTPUT directory."""
    mpath, wpath = (os.path.join(adapter_dir, n) for n in (MANIFEST, ARTIFACT))
    for p in (mpath, wpath):
        if not os.path.isfile(p):
            raise ProtlmError(f"{p}: not found (is {adapter_dir} a `protlm finetune` "
                              f"output?)")
    try:
        with open(mpath) as f:
            manifest = json.load(f)
        weights = load_file(wpath)
    except (OSError, ValueError) as e:
        raise ProtlmError(f"{adapter_dir}: unreadable fine-tuning output ({e})") from None
    return manifest, weights


def trainable_tree(weights: Dict[str, np.ndarray]) -> Dict[str, Any]:
    """``finetuned.safetensors`` keys (``head.dense.kernel``,
    ``lora.<kernel key>.a``, ``norms.<path key>``) -> the trainable tree."""
    tree: Dict[str, Any] = {}
    for key, value in weights.items():
        part, rest = key.split(".", 1)
        if part == "lora":
            site, leaf = rest.rsplit(".", 1)
            tree.setdefault(part, {}).setdefault(site, {})[leaf] = value
        elif part == "norms":
            tree.setdefault(part, {})[rest] = value
        else:  # head, base: nested module params
            tree.setdefault(part, {})[rest.replace(".", "/")] = value
    for part in ("head", "base"):
        if part in tree:
            tree[part] = unflatten(tree[part])
    return tree


@dataclasses.dataclass
class Adapter:
    """A fine-tuning output read against its base: what merge and PEFT use."""
    base: Dict[str, Any]       # read_base
    manifest: Dict[str, Any]
    tree: Dict[str, Any]       # trainable_tree
    sites: Dict[str, lora_lib.Site]
    spec: Optional[lora_lib.LoraSpec]


def load_adapter(base_path: str, adapter_dir: str, mesh=None) -> Adapter:
    """Reads ``adapter_dir`` and checks it fits ``base_path``: same family, every
    adapter and trained norm of the base's shapes.

    Raises:
      ProtlmError: not a fine-tuning output, another family, shapes that differ.
    """
    manifest, weights = read_artifact(adapter_dir)
    base = read_base(base_path, mesh or partitioning.create_mesh(1, jax.devices()[:1]))
    if manifest["family"] != base["family"].name:
        raise ProtlmError(f"{adapter_dir}: adapters of a {manifest['family']} model, but "
                          f"{base_path} is a {base['family'].name} model")
    tree = trainable_tree(weights)
    flat = flat_paths(base["view"].params)
    for k, v in tree.get("norms", {}).items():
        path = k.replace(".", "/")
        if path not in flat or flat[path].shape != v.shape:
            raise ProtlmError(f"{adapter_dir}: norm {path} does not fit the base model")
    sites, spec = {}, None
    if "lora" in tree:
        spec = lora_lib.spec_from_json(manifest["lora"])
        sites = lora_lib.sites(base["family"].lora_targets, train_lib.boxed_view(base["view"]),
                               spec)
        missing = sorted(set(sites) ^ set(tree["lora"]))
        if missing:
            raise ProtlmError(f"{adapter_dir}: adapters do not fit the base model "
                              f"({missing[0]})")
        for k, s in sites.items():
            a, b = tree["lora"][k]["a"], tree["lora"][k]["b"]
            if a.shape != s.in_shape + (spec.rank,) or b.shape != (spec.rank,) + s.out_shape:
                raise ProtlmError(f"{adapter_dir}: adapter {k} has shapes {a.shape}/{b.shape}, "
                                  f"the base model needs {s.in_shape}/{s.out_shape}")
    return Adapter(base, manifest, tree, sites, spec)


def merged_encoder_params(base_path: str, adapter_dir: str, mesh=None):
    """(base dict from :func:`read_base`, merged encoder params, manifest)."""
    ad = load_adapter(base_path, adapter_dir, mesh)
    frozen = jax.tree.map(np.asarray, ad.base["view"].params)
    params = jax.tree.map(np.asarray, train_lib.adapted_params(frozen, ad.tree, ad.sites,
                                                               ad.spec))
    return ad.base, params, ad.manifest


def merge(base_path: str, adapter_dir: str, output: str) -> Dict[str, Any]:
    """Writes a MODEL_DIR (params-only checkpoint) of base + adapter: its
    encoder outputs equal the adapted model's."""
    if os.path.exists(os.path.join(output, "checkpoints")):
        raise ProtlmError(f"{output}: already holds checkpoints; choose a new --output")
    base, params, manifest = merged_encoder_params(base_path, adapter_dir)
    # The encoder view's own config (inference settings, layers unscanned) and
    # family; a view that is a tower of a larger model (ELECTRA's
    # discriminator) is no model of its own.
    cfg = base["view"].config
    try:
        family = models.family_for(cfg)
    except TypeError:
        raise ProtlmError(f"--merge: the {base['family'].name} encoder is a tower of a "
                          "larger model, not a model of its own; use the fine-tuning "
                          "output directly") from None
    step = 0
    state = {"step": jax.numpy.asarray(step, jax.numpy.int32),
             "params": jax.tree.map(jax.numpy.asarray, params)}
    meta = {"step": step, "params_only": True, "encoder_only": True,
            "model_family": family.name, "model_config": dataclasses.asdict(cfg),
            "param_collections": sorted(params),
            "source": {"merged": {"base": os.path.abspath(base_path),
                                  "adapter": os.path.abspath(adapter_dir),
                                  "method": manifest["method"], "lora": manifest["lora"]}}}
    tokens = getattr(base["vocab"], "tokens", None)
    if tokens is not None:  # an imported checkpoint's own vocabulary
        meta["vocabulary"] = list(tokens)
    ckpt = checkpoints.Checkpointer(output, keep=1, async_save=False)
    ckpt.save(step, state, meta)
    ckpt.close()
    return {"output": output, "family": family.name,
            "parameters": sum(int(np.size(x)) for x in jax.tree.leaves(params))}
