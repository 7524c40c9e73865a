"""Training and evaluation of probe heads (optax AdamW, early stopping, buckets).

Batches have a bounded set of shapes so XLA compiles a bounded number of
times: per-residue proteins are sorted by length and padded to the next
bucket length (powers of two, at least 64), with
``token_budget // bucket`` rows per batch (the last batch of a bucket is
filled with empty rows); pooled per-protein batches all have ``batch_size``
rows. Padding rows/positions and excluded residues carry weight 0, so they
never enter the loss or a metric.

Every output of a head (``ss3``/``ss8``, ``location``/``membrane``) has labels
``y_<name>`` and weights ``w_<name>`` in the batch; the loss is the sum over
outputs of the weighted mean cross-entropy. Training keeps the parameters of
the epoch with the lowest validation loss and stops after ``patience`` epochs
without improvement. Everything random derives from ``seed``.

Shapes: B batch rows, L bucket length, D features.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from protlm_jax.errors import ProtlmError
from protlm_jax.probes import heads as heads_lib


@dataclasses.dataclass(frozen=True)
class ProbeConfig:
    """How to fit a probe.

    Attributes:
      learning_rate: AdamW learning rate.
      weight_decay: AdamW decoupled weight decay.
      max_epochs: upper bound on epochs.
      patience: stop after this many epochs without a better validation loss.
      token_budget: residues (padded) per per-residue batch.
      batch_size: rows per pooled per-protein batch.
      seed: initialisation, dropout and batch order.
    """
    learning_rate: float = 1e-3
    weight_decay: float = 1e-2
    max_epochs: int = 30
    patience: int = 5
    token_budget: int = 8192
    batch_size: int = 64
    seed: int = 0


# Published light-attention recipe (REFERENCE §4): lr 5e-5, batch 150, patience 80.
LIGHT_ATTENTION_PAPER = ProbeConfig(learning_rate=5e-5, batch_size=150, patience=80,
                                    max_epochs=5000)


def bucket_length(n: int, minimum: int = 64) -> int:
    """The smallest power of two ≥ max(n, minimum): few shapes, few compiles
    (the heads are cheap, so padding costs less than compiling)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# --- batches -------------------------------------------------------------------------


def residue_batches(features: Sequence[np.ndarray], labels: dict, token_budget: int,
                    order: Optional[np.ndarray] = None) -> list[dict]:
    """Per-residue batches padded to bucket lengths.

    Args:
      features: per protein [L_i, D].
      labels: output name → (per protein [L_i] int labels, per protein [L_i]
        bool scored), or an empty dict (prediction only).
      token_budget: padded residues per batch (at least one protein).
      order: protein order before bucketing (default: by length).

    Returns:
      Dicts with ``x`` [B, L, D] float32, ``mask`` [B, L], ``index`` [B]
      (protein index, -1 for filler rows), ``y_<name>``/``w_<name>`` [B, L].
    """
    lengths = np.array([len(f) for f in features])
    order = np.argsort(lengths, kind="stable") if order is None else order
    by_bucket: dict[int, list[int]] = {}
    for i in order:
        by_bucket.setdefault(bucket_length(int(lengths[i])), []).append(int(i))
    d = features[0].shape[-1]
    batches = []
    for length, members in sorted(by_bucket.items()):
        rows = max(1, token_budget // length)
        for start in range(0, len(members), rows):
            chunk = members[start:start + rows]
            b = {"x": np.zeros((rows, length, d), np.float32),
                 "mask": np.zeros((rows, length), np.float32),
                 "index": np.full(rows, -1, np.int64)}
            for name in labels:
                b[f"y_{name}"] = np.zeros((rows, length), np.int32)
                b[f"w_{name}"] = np.zeros((rows, length), np.float32)
            for r, i in enumerate(chunk):
                n = int(lengths[i])
                b["x"][r, :n] = features[i]
                b["mask"][r, :n] = 1.0
                b["index"][r] = i
                for name, (ys, scored) in labels.items():
                    b[f"y_{name}"][r, :n] = ys[i]
                    b[f"w_{name}"][r, :n] = scored[i]
            batches.append(b)
    return batches


def packed_batches(features: Sequence[np.ndarray], labels: dict, token_budget: int,
                   gap: int, order: Optional[np.ndarray] = None,
                   min_row_length: int = 1024) -> list[dict]:
    """Per-residue batches with several proteins per row, one shape for all.

    For convolution-only heads (the SS CNN): proteins follow each other in a
    row separated by ``gap`` ≥ kernel // 2 zero positions, so no convolution
    window reaches a neighbour (the CNN also zeroes its hidden layer at
    positions outside proteins). Rows are ``max(min_row_length, next power of
    two ≥ the longest protein)`` long, ``token_budget // row`` per batch: one
    compiled program per fit, and little padding.

    Returns:
      Dicts as :func:`residue_batches`, with ``spans`` (host side): (row,
      start, length, protein index) of every protein in the batch.
    """
    lengths = np.array([len(f) for f in features])
    order = np.arange(len(features)) if order is None else order
    row_len = bucket_length(int(lengths.max()), min_row_length)
    rows = max(1, token_budget // row_len)
    d = features[0].shape[-1]
    # First fit: a protein goes to the current row if it fits, else a new row.
    placed, row, cursor = [], 0, 0
    for i in order:
        n = int(lengths[i])
        if cursor and cursor + n > row_len:
            row, cursor = row + 1, 0
        placed.append((row, cursor, n, int(i)))
        cursor += n + gap
    batches = []
    for first_row in range(0, row + 1, rows):
        spans = [(r - first_row, c, n, i) for r, c, n, i in placed
                 if first_row <= r < first_row + rows]
        b = {"x": np.zeros((rows, row_len, d), np.float32),
             "mask": np.zeros((rows, row_len), np.float32), "spans": spans}
        for name in labels:
            b[f"y_{name}"] = np.zeros((rows, row_len), np.int32)
            b[f"w_{name}"] = np.zeros((rows, row_len), np.float32)
        for r, c, n, i in spans:
            b["x"][r, c:c + n] = features[i]
            b["mask"][r, c:c + n] = 1.0
            for name, (ys, scored) in labels.items():
                b[f"y_{name}"][r, c:c + n] = ys[i]
                b[f"w_{name}"][r, c:c + n] = scored[i]
        batches.append(b)
    return batches


def pooled_batches(features: Sequence[np.ndarray], labels: dict, batch_size: int,
                   order: Optional[np.ndarray] = None) -> list[dict]:
    """Per-protein batches of pooled features [B, D] (filler rows weigh 0).

    ``labels``: output name → ([N] int labels, [N] bool known).
    """
    n = len(features)
    order = np.arange(n) if order is None else order
    x_all = np.stack(features).astype(np.float32)
    batches = []
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        b = {"x": np.zeros((batch_size, x_all.shape[1]), np.float32),
             "mask": np.zeros((batch_size,), np.float32),
             "index": np.full(batch_size, -1, np.int64)}
        b["x"][:len(idx)] = x_all[idx]
        b["mask"][:len(idx)] = 1.0
        b["index"][:len(idx)] = idx
        for name, (ys, known) in labels.items():
            b[f"y_{name}"] = np.zeros(batch_size, np.int32)
            b[f"w_{name}"] = np.zeros(batch_size, np.float32)
            b[f"y_{name}"][:len(idx)] = np.maximum(ys[idx], 0)
            b[f"w_{name}"][:len(idx)] = known[idx]
        batches.append(b)
    return batches


class Batcher:
    """Makes batches for a head kind; reshuffles training batches per epoch.

    ``pack_gap`` > 0 packs proteins into rows (convolution-only heads).
    """

    def __init__(self, per_residue_input: bool, config: ProbeConfig, pack_gap: int = 0):
        self.per_residue_input, self.config = per_residue_input, config
        self.pack_gap = pack_gap

    def __call__(self, features, labels, shuffle_seed: Optional[int] = None) -> list[dict]:
        n = len(features)
        if self.per_residue_input and self.pack_gap:
            order = (np.random.default_rng(shuffle_seed).permutation(n)
                     if shuffle_seed is not None else None)
            batches = packed_batches(features, labels, self.config.token_budget,
                                     self.pack_gap, order)
        elif self.per_residue_input:
            order = None
            if shuffle_seed is not None:  # shuffle within buckets, then batches
                rng = np.random.default_rng(shuffle_seed)
                lengths = np.array([len(f) for f in features])
                order = np.lexsort((rng.permutation(n), lengths))
            batches = residue_batches(features, labels, self.config.token_budget, order)
        else:
            order = (np.random.default_rng(shuffle_seed).permutation(n)
                     if shuffle_seed is not None else None)
            batches = pooled_batches(features, labels, self.config.batch_size, order)
        if shuffle_seed is not None:
            perm = np.random.default_rng(shuffle_seed + 1).permutation(len(batches))
            batches = [batches[i] for i in perm]
        return batches


# --- steps -----------------------------------------------------------------------------


@flax.struct.dataclass
class ProbeState:
    params: dict
    batch_stats: dict
    opt_state: optax.OptState
    step: jax.Array


def _loss_and_metrics(outputs: dict, batch: dict) -> tuple[jax.Array, dict]:
    total, metrics = 0.0, {}
    for name, logits in outputs.items():
        y, w = batch[f"y_{name}"], batch[f"w_{name}"]
        ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        weight = jnp.sum(w)
        total = total + jnp.sum(ce * w) / jnp.maximum(weight, 1.0)
        correct = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        metrics[f"{name}/loss_sum"] = jnp.sum(ce * w)
        metrics[f"{name}/correct"] = jnp.sum(correct * w)
        metrics[f"{name}/weight"] = weight
    return total, metrics


def _apply(head, variables, batch, train, rng=None):
    kwargs = {"rngs": {"dropout": rng}} if train else {}
    mutable = ["batch_stats"] if train and "batch_stats" in variables else False
    out = head.apply(variables, batch["x"], batch["mask"], train=train, mutable=mutable,
                     **kwargs)
    return out if mutable else (out, {})


@functools.partial(jax.jit, static_argnames=("head", "tx"))
def _train_step(state: ProbeState, batch: dict, rng, *, head, tx):
    def loss_fn(params):
        variables = {"params": params}
        if state.batch_stats:
            variables["batch_stats"] = state.batch_stats
        outputs, updates = _apply(head, variables, batch, True, rng)
        loss, metrics = _loss_and_metrics(outputs, batch)
        return loss, (metrics, updates.get("batch_stats", state.batch_stats))

    (loss, (metrics, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return ProbeState(params, batch_stats, opt_state, state.step + 1), loss, metrics


@functools.partial(jax.jit, static_argnames=("head",))
def _eval_step(params, batch_stats, batch, *, head):
    """Metric sums and argmax predictions (one compiled program per shape)."""
    variables = {"params": params}
    if batch_stats:
        variables["batch_stats"] = batch_stats
    outputs, _ = _apply(head, variables, batch, False)
    _, metrics = _loss_and_metrics(outputs, batch)
    return metrics, {k: jnp.argmax(v, -1) for k, v in outputs.items()}


def sum_metrics(parts: list[dict]) -> dict:
    """Per-batch ``<output>/loss_sum|weight[|correct]`` sums -> ``<output>_loss``
    (and ``_accuracy`` where counted) and their total ``loss``."""
    total = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(parts))
    out = {}
    for key in total:
        name, what = key.split("/")
        if what == "weight":
            w = max(total[key], 1.0)
            out[f"{name}_loss"] = total[f"{name}/loss_sum"] / w
            if f"{name}/correct" in total:
                out[f"{name}_accuracy"] = total[f"{name}/correct"] / w
    out["loss"] = sum(v for k, v in out.items() if k.endswith("_loss"))
    return out


@dataclasses.dataclass
class FitResult:
    """A fitted probe: best parameters and the learning curve (one row per epoch)."""
    head: object
    params: dict
    batch_stats: dict
    curve: list[dict]
    best_epoch: int
    seconds: float


def fit(head, train_batches: Callable[[int], list[dict]], valid_batches: list[dict],
        config: ProbeConfig, log: Optional[Callable[[str], None]] = None) -> FitResult:
    """Fits ``head`` with AdamW and early stopping on the validation loss.

    Args:
      head: a Flax module returning ``{output: logits}``.
      train_batches: ``epoch → batches`` (reshuffled per epoch).
      valid_batches: fixed validation batches.
      config: the optimisation settings.
      log: optional line printer (one line per epoch).
    """
    t0 = time.perf_counter()
    first = train_batches(0)
    if not first:
        raise ProtlmError("no training batches")
    rng = jax.random.key(config.seed)
    variables = head.init({"params": rng, "dropout": rng}, jnp.asarray(first[0]["x"]),
                          jnp.asarray(first[0]["mask"]), train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})
    tx = optax.adamw(config.learning_rate, weight_decay=config.weight_decay)
    state = ProbeState(params, batch_stats, tx.init(params), jnp.zeros([], jnp.int32))
    best = (math.inf, params, batch_stats, -1)
    curve, stale = [], 0
    for epoch in range(config.max_epochs):
        batches = first if epoch == 0 else train_batches(epoch)
        parts = []
        for b in batches:
            step_rng = jax.random.fold_in(jax.random.fold_in(rng, 1), int(state.step))
            state, _, m = _train_step(state, _device_batch(b), step_rng, head=head, tx=tx)
            parts.append(m)
        train_m = sum_metrics(parts)
        valid_m = evaluate_loss(head, state.params, state.batch_stats, valid_batches)
        row = {"epoch": epoch + 1, **{f"train_{k}": v for k, v in train_m.items()},
               **{f"valid_{k}": v for k, v in valid_m.items()}}
        curve.append(row)
        if log:
            log(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                           for k, v in row.items()))
        if valid_m["loss"] < best[0]:
            best, stale = (valid_m["loss"], state.params, state.batch_stats, epoch + 1), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    return FitResult(head, best[1], best[2], curve, best[3], time.perf_counter() - t0)


def _device_batch(b: dict) -> dict:
    return {k: jnp.asarray(v) for k, v in b.items() if k not in ("index", "spans")}


def evaluate_loss(head, params, batch_stats, batches: list[dict]) -> dict:
    parts = [_eval_step(params, batch_stats, _device_batch(b), head=head)[0]
             for b in batches]
    return sum_metrics(parts)


def predict(result: FitResult, batches: list[dict], num_items: int) -> dict:
    """Predictions per item: per-residue outputs → list of [L_i] arrays,
    per-protein outputs → [N] array (items in their original order).

    ``batches`` carry labels like training batches (any values: only the
    predictions are used), so evaluation and prediction share one program.
    """
    out: dict = {}
    for b in batches:
        _, preds = _eval_step(result.params, result.batch_stats, _device_batch(b),
                              head=result.head)
        preds = jax.device_get(preds)
        for name, p in preds.items():
            store = out.setdefault(name, [None] * num_items)
            for r, c, n, i in b.get("spans", ()):
                store[i] = p[r, c:c + n]
            for r, i in enumerate(b.get("index", ())):
                if i < 0:
                    continue
                if p.ndim == 2:
                    store[i] = p[r, :int(b["mask"][r].sum())]
                else:
                    store[i] = int(p[r])
    return {k: (np.array(v) if all(np.isscalar(x) for x in v) else v)
            for k, v in out.items()}


def make_head(name: str, num_classes: int = 0, membrane: bool = True):
    """A head by name (see ``heads.make_head``)."""
    return heads_lib.make_head(name, num_classes, membrane)


def iter_epochs(batcher: Batcher, features, labels, seed: int) -> Callable[[int], list]:
    """``epoch → shuffled training batches`` for :func:`fit`."""
    return lambda epoch: batcher(features, labels, shuffle_seed=seed * 1000 + epoch)


__all__ = ["ProbeConfig", "LIGHT_ATTENTION_PAPER", "bucket_length", "residue_batches",
           "pooled_batches", "Batcher", "fit", "predict", "FitResult", "iter_epochs",
           "evaluate_loss"]

