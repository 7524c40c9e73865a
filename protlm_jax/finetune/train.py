"""Fine-tuning any family's encoder with a task head: LoRA, full or head only.

The model is the family's :class:`~protlm_jax.models.EncoderView` (the module
and params ``protlm embed`` runs) followed by a :class:`Head`:

* per protein (ProtTrans' LoRA notebooks): mean over the residues -> dropout
  -> Dense(D, D) -> tanh -> dropout -> Dense(classes) per output;
* per residue: dropout -> Dense(classes) per output at every residue.

Classes train with cross-entropy, regressions with the squared error of the
label standardised by the training split's mean and standard deviation
(predictions are mapped back). Methods (``FinetuneConfig.method``):

  ``head``  the encoder frozen: only the head trains;
  ``lora``  rank-r adapters on the attention projections
            (:mod:`protlm_jax.finetune.lora`), the layer norms (every param
            whose path names a ``norm``, as ProtTrans' recipe) and the head;
  ``full``  every encoder parameter and the head.

The frozen parameters are an argument of the jitted step, never
differentiated and never in the optimizer state (AdamW, ``optax.MultiSteps``
for gradient accumulation); only the trainable tree is checkpointed.
Everything runs on a ``(data, model)`` mesh: batches split over ``data``,
params and adapters by their logical axes.

Batches: proteins shuffled per epoch (seeded), cut into pools of 32 batches,
each pool sorted by length so a batch holds similar lengths, every batch
padded to a power-of-two bucket (few compiled shapes); ``batch_size`` rows.
The validation loss decides early stopping (``patience`` epochs); the best
epoch's weights are kept. A checkpoint at the end of every epoch (under
``OUTPUT/checkpoints``) makes a killed run resume exactly: batches, dropout and
the optimizer state are functions of (seed, step).

Shape legend: B batch rows, T tokens (bucket), D hidden, C classes.
"""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec

from protlm_jax import checkpoints, partitioning
from protlm_jax.embed.engine import clean_sequence
from protlm_jax.errors import ProtlmError
from protlm_jax.finetune import lora as lora_lib
from protlm_jax.finetune.tasks import Split, Task
from protlm_jax.models.family import flat_paths, unflatten
from protlm_jax.probes import heads as heads_lib
from protlm_jax.probes.train import bucket_length, sum_metrics

METHODS = ("lora", "full", "head")
HEADS = ("linear", "cnn")
POOL_BATCHES = 32


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """How to fine-tune (``protlm finetune`` flags; gin binds the same fields).

    Attributes:
      method: ``lora``, ``full`` or ``head``.
      rank, alpha, targets: LoRA (r 4, alpha 1 on q k v o: ProtTrans' recipe).
      train_norms: LoRA also trains the encoder's layer norms.
      learning_rate: AdamW (3e-4 as ProtTrans' LoRA notebooks).
      weight_decay: AdamW decoupled weight decay.
      epochs: at most this many epochs.
      patience: stop after this many epochs without a lower validation loss.
      batch_size: proteins per micro-batch (a multiple of the data axis).
      accumulate: micro-batches per optimizer update (effective batch
        ``batch_size * accumulate``).
      dropout: the head's dropout (0.2 as the notebooks).
      head: per-residue tasks: ``linear`` (dropout -> Dense, the LoRA
        notebooks) or ``cnn`` (the ProtTrans secondary-structure CNN:
        Conv(D->32, k7) -> ReLU -> dropout -> Conv(32->C, k7) per output).
      bf16: encoder activations in bfloat16 (weights and optimizer stay f32).
      seed: initialisation, shuffling and dropout.
      kill_at_step: test hook: SIGKILL the process after this step's
        checkpoint (crash-safety tests).
    """
    method: str = "lora"
    rank: int = 4
    alpha: float = 1.0
    targets: Tuple[str, ...] = ("q", "k", "v", "o")
    train_norms: bool = True
    learning_rate: float = 3e-4
    weight_decay: float = 0.0
    epochs: int = 10
    patience: int = 3
    batch_size: int = 8
    accumulate: int = 1
    dropout: float = 0.2
    head: str = "linear"
    bf16: bool = False
    seed: int = 0
    kill_at_step: Optional[int] = None

    def lora_spec(self) -> lora_lib.LoraSpec:
        return lora_lib.LoraSpec(self.rank, self.alpha, tuple(self.targets))

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ProtlmError(f"--method must be one of {', '.join(METHODS)}, got "
                              f"{self.method!r}")
        for name in ("epochs", "patience", "batch_size", "accumulate", "rank"):
            if getattr(self, name) < 1:
                raise ProtlmError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.head not in HEADS:
            raise ProtlmError(f"--head must be one of {', '.join(HEADS)}, got {self.head!r}")
        if not self.learning_rate > 0:
            raise ProtlmError(f"--learning_rate must be positive, got {self.learning_rate}")


class Head(nn.Module):
    """The task head on encoder outputs [B, T, D] (see the module docstring)."""
    kind: str
    sizes: Tuple[Tuple[str, int], ...]
    dropout: float = 0.2
    conv: bool = False  # per residue: the ProtTrans SS CNN instead of Dense

    @nn.compact
    def __call__(self, x_BTD, residues_BT, *, train: bool = False) -> Dict[str, jax.Array]:
        x_BTD = x_BTD.astype(jnp.float32)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        if self.kind == "protein":
            w_BT = residues_BT.astype(jnp.float32)
            x_BD = jnp.einsum("btd,bt->bd", x_BTD, w_BT) / jnp.maximum(
                w_BT.sum(1), 1.0)[:, None]
            h = jnp.tanh(nn.Dense(x_BD.shape[-1], name="dense")(drop(x_BD)))
            h = drop(h)
        elif self.conv:
            return heads_lib.SecondaryStructureCNN(dropout=self.dropout, outputs=self.sizes,
                                                   name="cnn")(x_BTD, residues_BT, train=train)
        else:
            h = drop(x_BTD)
        return {name: nn.Dense(size, name=name)(h) for name, size in self.sizes}


def _is_norm(path: str) -> bool:
    return any("norm" in part for part in path.split("/"))


# ----------------------------------------------------------------- batches ---


@dataclasses.dataclass
class Encoded:
    """One split as token ids, plus which proteins were left out (too long)."""
    split: Split
    tokens: List[np.ndarray]
    start: int                 # token index of the first residue (the prefix length)
    left_out: List[str]


class Tokens:
    """Token ids of proteins as the family embeds them (its layout, its side)."""

    def __init__(self, family, vocab, max_tokens: Optional[int]):
        self.prefix, self.suffix = family.layout.special_ids(vocab)
        self.vocab, self.max_tokens = vocab, max_tokens

    def encode(self, split: Split) -> Encoded:
        keep, tokens, left_out = [], [], []
        for i, seq in enumerate(split.sequences):
            ids = self.prefix + list(self.vocab.encode(clean_sequence(seq))) + self.suffix
            if len(ids) - len(self.prefix) - len(self.suffix) != len(seq):
                raise ProtlmError(f"{split.ids[i]}: the vocabulary gives "
                                  f"{len(ids) - len(self.prefix) - len(self.suffix)} tokens "
                                  f"for {len(seq)} residues")
            if self.max_tokens is not None and len(ids) > self.max_tokens:
                left_out.append(split.ids[i])
                continue
            keep.append(i)
            tokens.append(np.asarray(ids, np.int32))
        return Encoded(split.subset(keep), tokens, len(self.prefix), left_out)


def make_batch(enc: Encoded, members: List[int], rows: int, model: "Model") -> Dict:
    """Host arrays of one batch (filler rows weigh 0)."""
    task, norm = model.task, model.norm
    length = bucket_length(max(len(enc.tokens[i]) for i in members), 32)
    b = {"tokens": np.full((rows, length), model.pad_id, np.int32),
         "residues": np.zeros((rows, length), np.float32),
         "index": np.full(rows, -1, np.int64)}
    for out in task.outputs:
        shape = (rows, length) if task.kind == "residue" else (rows,)
        b[f"y_{out.name}"] = np.zeros(shape, np.float32 if out.regression else np.int32)
        b[f"w_{out.name}"] = np.zeros(shape, np.float32)
    for r, i in enumerate(members):
        ids = enc.tokens[i]
        off = length - len(ids) if model.left_padded else 0
        b["tokens"][r, off:off + len(ids)] = ids
        s, n = off + enc.start, len(enc.split.sequences[i])
        b["residues"][r, s:s + n] = 1.0
        b["index"][r] = i
        for out in task.outputs:
            y = np.asarray(enc.split.labels[out.name][i], np.float32)
            w = np.asarray(enc.split.weights[out.name][i], np.float32)
            if out.regression:
                mean, std = norm[out.name]
                y = (y - mean) / std
            if task.kind == "residue":
                b[f"y_{out.name}"][r, s:s + n] = y
                b[f"w_{out.name}"][r, s:s + n] = w
            else:
                b[f"y_{out.name}"][r] = y
                b[f"w_{out.name}"][r] = w
    return b


def epoch_batches(enc: Encoded, rows: int, seed: int) -> List[List[int]]:
    """Member lists of one epoch: shuffled (``seed``) pools sorted by length."""
    n = len(enc.tokens)
    lengths = np.array([len(t) for t in enc.tokens])
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n)
    pool = rows * POOL_BATCHES
    batches = []
    for start in range(0, n, pool):
        chunk = sorted(perm[start:start + pool], key=lambda i: lengths[i])
        batches += [list(chunk[i:i + rows]) for i in range(0, len(chunk), rows)]
    return [batches[i] for i in rng.permutation(len(batches))]


def eval_batches(enc: Encoded, data_size: int,
                 tokens_per_device: int) -> List[Tuple[int, List[int]]]:
    """(rows, members) by bucket: about ``tokens_per_device`` padded tokens per
    device, rows a multiple of the data axis (one compiled shape per bucket)."""
    by_bucket: Dict[int, List[int]] = {}
    for i, t in enumerate(enc.tokens):
        by_bucket.setdefault(bucket_length(len(t), 32), []).append(i)
    out = []
    for length, members in sorted(by_bucket.items()):
        rows = data_size * max(1, tokens_per_device // length)
        out += [(rows, members[i:i + rows]) for i in range(0, len(members), rows)]
    return out


# ------------------------------------------------------------------- model ---


@dataclasses.dataclass
class Model:
    """A base encoder, its head, the method: what the jitted steps close over."""
    family: Any
    view: Any
    task: Task
    config: FinetuneConfig
    mesh: Any
    rules: Any
    sites: Dict[str, lora_lib.Site]
    head: Head
    norm: Dict[str, Tuple[float, float]]
    hidden: int
    boxed: Any  # the encoder view's boxed abstract params (logical axes)

    @property
    def pad_id(self) -> int:
        return self.view.pad_id

    @property
    def left_padded(self) -> bool:
        return self.family.layout.padding == "left"

    @property
    def spec(self) -> lora_lib.LoraSpec:
        return self.config.lora_spec()

    def encoder(self):
        return self.view.module("bfloat16" if self.config.bf16 else "float32")

    def outputs(self, frozen, trainable, batch, *, train: bool, rng=None):
        base = adapted_params(frozen, trainable, self.sites, self.spec)
        tokens = batch["tokens"]
        reps = self.encoder().apply({"params": base}, tokens, tokens != self.view.pad_id,
                                    (self.view.num_layers,), method="encode")
        x = reps["representations"][self.view.num_layers]
        return self.head.apply({"params": trainable["head"]}, x, batch["residues"],
                               train=train, rngs={"dropout": rng} if train else None)

    def loss(self, outputs, batch) -> Tuple[jax.Array, Dict[str, jax.Array]]:
        total, sums = 0.0, {}
        for out in self.task.outputs:
            pred = outputs[out.name].astype(jnp.float32)
            y, w = batch[f"y_{out.name}"], batch[f"w_{out.name}"]
            if out.regression:
                per = (pred[..., 0] - y) ** 2
            else:
                per = optax.softmax_cross_entropy_with_integer_labels(pred, y)
            weight = jnp.sum(w)
            total = total + jnp.sum(per * w) / jnp.maximum(weight, 1.0)
            sums[f"{out.name}/loss_sum"] = jnp.sum(per * w)
            sums[f"{out.name}/weight"] = weight
        return total, sums


def adapted_params(frozen, trainable, sites, spec):
    """The encoder's params as the fine-tuned model runs them: the trained base
    (``full``) or the frozen one, with trained norms put in and adapters added.
    The jitted step and ``--merge`` both use it."""
    base = trainable["base"] if "base" in trainable else frozen
    if "norms" in trainable:
        flat = flat_paths(base)
        flat.update({k.replace(".", "/"): v for k, v in trainable["norms"].items()})
        base = unflatten(flat)
    if "lora" in trainable:
        base = lora_lib.apply(base, trainable["lora"], sites, spec)
    return base


def _label_norm(task: Task) -> Dict[str, Tuple[float, float]]:
    norm = {}
    for out in task.outputs:
        if out.regression:
            values = np.concatenate([np.atleast_1d(np.asarray(v, np.float64))[
                np.atleast_1d(np.asarray(w)) > 0] for v, w in zip(
                    task.train.labels[out.name], task.train.weights[out.name])])
            norm[out.name] = (float(values.mean()), float(values.std()) or 1.0)
    return norm


def build(family, view, task: Task, config: FinetuneConfig, mesh, rules,
          norm: Optional[Dict[str, Tuple[float, float]]] = None) -> Model:
    """The fine-tuning model of ``view`` (an encoder view) for ``task``."""
    boxed = boxed_view(view)
    sites = {}
    if config.method == "lora":
        sites = lora_lib.sites(family.lora_targets, boxed, config.lora_spec())
    if config.head == "cnn" and task.kind != "residue":
        raise ProtlmError(f"--head cnn is per residue; {task.name} is a per-protein task")
    head = Head(task.kind, tuple((o.name, o.size) for o in task.outputs), config.dropout,
                conv=config.head == "cnn")
    return Model(family, view, task, config, mesh, rules, sites, head,
                 norm if norm is not None else _label_norm(task), _hidden_size(view, boxed),
                 boxed)


def boxed_view(view):
    """Boxed abstract params of an encoder view's module (its logical axes)."""
    module = view.make_module(view.config.replace(dtype="float32"))
    return jax.eval_shape(lambda r: module.init(r, jnp.ones((1, 8), jnp.int32),
                                                method="encode"), jax.random.PRNGKey(0))["params"]


def abstract_trainable(model: Model) -> Tuple[Any, Any]:
    """Boxed abstract trainable tree (``head``, ``lora``, ``norms``, ``base``)."""
    x = jnp.zeros((1, 8, model.hidden), jnp.float32)
    head = jax.eval_shape(lambda r: model.head.init(r, x, jnp.ones((1, 8))), jax.random.PRNGKey(0))
    tree = {"head": head["params"]}
    cfg = model.config
    if cfg.method == "full":
        tree["base"] = model.boxed
    elif cfg.method == "lora":
        tree["lora"] = lora_lib.abstract_adapters(model.sites, model.spec)
        if cfg.train_norms:
            tree["norms"] = {k.replace("/", "."): v
                             for k, v in lora_lib.boxed_leaves(model.boxed).items()
                             if _is_norm(k)}
    return tree


def _hidden_size(view, boxed) -> int:
    module = view.module("float32")
    out = jax.eval_shape(
        lambda p: module.apply({"params": p}, jnp.ones((1, 8), jnp.int32), None,
                               (view.num_layers,), method="encode"),
        nn.meta.unbox(boxed))
    return int(out["representations"][view.num_layers].shape[-1])


def trainable_count(model: Model) -> Dict[str, int]:
    """Trainable parameters by part (``head``, ``lora``, ``norms``, ``base``)."""
    tree = abstract_trainable(model)
    return {k: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(v)))
            for k, v in tree.items()}


# ---------------------------------------------------------------- training ---


@dataclasses.dataclass
class Trained:
    """What a finished run gives: best trainable weights and the curve."""
    model: Model
    trainable: Any
    runner: "Runner"   # placed frozen params and compiled steps, for evaluation
    curve: List[Dict[str, float]]
    best_epoch: int
    left_out: Dict[str, List[str]]
    seconds: float
    resumed_from: Optional[int] = None


class Runner:
    """Places params on the mesh and compiles the steps of one model."""

    def __init__(self, model: Model, frozen_params: Mapping[str, Any]):
        self.model = model
        mesh, rules = model.mesh, model.rules
        self.replicated = NamedSharding(mesh, PartitionSpec())
        with partitioning.axis_rules(mesh, rules):
            self.t_shardings, self.t_abstract = partitioning.param_shardings(
                abstract_trainable(model), mesh, rules)
            self.v_shardings, _ = partitioning.param_shardings(model.boxed, mesh, rules)
        cfg = model.config
        self.tx = optax.MultiSteps(optax.adamw(cfg.learning_rate, weight_decay=cfg.weight_decay),
                                   every_k_schedule=cfg.accumulate)
        opt_abstract = jax.eval_shape(self.tx.init, self.t_abstract)
        self.o_shardings = optax.tree_map_params(
            self.tx, lambda _, s: s, opt_abstract, self.t_shardings,
            transform_non_params=lambda _: self.replicated)
        self.frozen = jax.device_put(jax.tree.map(jnp.asarray, dict(frozen_params)),
                                     self.v_shardings)
        self.batch_sharding = partitioning.batch_sharding(mesh)
        self._train = self._eval = None

    def init(self, seed: int):
        """(trainable, opt_state): head and A random, B zero; norms / full
        params start from the base."""
        m = self.model
        rng = jax.random.key(seed)
        x = jnp.zeros((1, 8, m.hidden), jnp.float32)
        head = m.head.init(jax.random.fold_in(rng, 0), x, jnp.ones((1, 8)))["params"]
        tree = {"head": head}
        # Copies: the step donates the trainable tree, the frozen one stays.
        if "base" in self.t_abstract:
            tree["base"] = jax.tree.map(jnp.copy, self.frozen)
        if "lora" in self.t_abstract:
            tree["lora"] = lora_lib.init_adapters(m.sites, m.spec, jax.random.fold_in(rng, 1))
        if "norms" in self.t_abstract:
            flat = flat_paths(self.frozen)
            tree["norms"] = {k: jnp.copy(flat[k.replace(".", "/")])
                             for k in self.t_abstract["norms"]}
        trainable = jax.device_put(tree, self.t_shardings)
        opt_state = jax.jit(self.tx.init, out_shardings=self.o_shardings)(trainable)
        return trainable, opt_state

    def frozen_arg(self):
        """The frozen encoder params the step reads (None when all train)."""
        return None if "base" in self.t_abstract else self.frozen

    def train_step(self):
        if self._train is None:
            m, tx = self.model, self.tx

            def step(trainable, opt_state, frozen, batch, rng):
                def loss_fn(t):
                    out = m.outputs(frozen, t, batch, train=True, rng=rng)
                    return m.loss(out, batch)
                (loss, sums), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
                updates, opt_state = tx.update(grads, opt_state, trainable)
                return optax.apply_updates(trainable, updates), opt_state, sums

            frozen_sh = None if self.frozen_arg() is None else self.v_shardings
            self._train = partitioning.partitioned_jit(
                step, m.mesh, m.rules,
                in_shardings=(self.t_shardings, self.o_shardings, frozen_sh,
                              self.batch_sharding, self.replicated),
                out_shardings=(self.t_shardings, self.o_shardings, self.replicated),
                donate_argnums=(0, 1))
        return self._train

    def eval_step(self):
        if self._eval is None:
            m = self.model

            def step(trainable, frozen, batch):
                out = m.outputs(frozen, trainable, batch, train=False)
                _, sums = m.loss(out, batch)
                preds = {o.name: (out[o.name][..., 0] if o.regression
                                  else jnp.argmax(out[o.name], -1)) for o in m.task.outputs}
                return sums, preds

            frozen_sh = None if self.frozen_arg() is None else self.v_shardings
            self._eval = partitioning.partitioned_jit(
                step, m.mesh, m.rules,
                in_shardings=(self.t_shardings, frozen_sh, self.batch_sharding),
                out_shardings=(self.replicated, self.batch_sharding))
        return self._eval

    def put(self, batch: Dict) -> Dict:
        return {k: jax.device_put(v, self.batch_sharding) for k, v in batch.items()
                if k != "index"}


EVAL_TOKENS_PER_DEVICE = 4096


def evaluate(runner: Runner, trainable, enc: Encoded) -> Tuple[Dict, Dict]:
    """(loss sums, predictions per output per protein in split order); batches
    by a token budget (long test proteins run a few rows at a time)."""
    m = runner.model
    fn = runner.eval_step()
    parts, preds = [], {o.name: [None] * len(enc.tokens) for o in m.task.outputs}
    data = int(m.mesh.shape["data"])
    for rows, members in eval_batches(enc, data, EVAL_TOKENS_PER_DEVICE):
        b = make_batch(enc, members, rows, m)
        sums, p = fn(trainable, runner.frozen_arg(), runner.put(b))
        parts.append(sums)
        p = jax.device_get(p)
        for o in m.task.outputs:
            for r, i in enumerate(b["index"]):
                if i < 0:
                    continue
                v = p[o.name][r]
                if m.task.kind == "residue":
                    real = b["residues"][r] > 0
                    v = v[real]
                if o.regression:
                    mean, std = m.norm[o.name]
                    v = v * std + mean
                preds[o.name][i] = v
    return sum_metrics(parts), preds


def fit(model: Model, frozen_params, task_enc: Dict[str, Encoded], *, output: Optional[str],
        log: Optional[Callable[[str], None]] = None) -> Trained:
    """Trains with early stopping; resumes from ``output``'s last checkpoint."""
    cfg = model.config
    t0 = time.perf_counter()
    runner = Runner(model, frozen_params)
    data = int(model.mesh.shape["data"])
    rows = cfg.batch_size
    if rows % data:
        raise ProtlmError(f"--batch_size {rows} must be a multiple of the {data} "
                          f"devices on the data axis")
    train_enc, valid_enc = task_enc["train"], task_enc["valid"]
    if not train_enc.tokens or not valid_enc.tokens:
        raise ProtlmError("no training or validation protein fits the model's positions")
    trainable, opt_state = runner.init(cfg.seed)
    best = {"loss": math.inf, "epoch": 0, "stale": 0}
    best_trainable = jax.tree.map(jnp.copy, trainable)
    curve: List[Dict[str, float]] = []
    start_epoch, step, resumed = 0, 0, None
    ckpt = checkpoints.Checkpointer(output, keep=1, async_save=False) if output else None
    try:
        like = {"trainable": trainable, "opt_state": opt_state, "best": best_trainable,
                "best_loss": jnp.zeros([]), "epoch": jnp.zeros([], jnp.int32),
                "stale": jnp.zeros([], jnp.int32), "best_epoch": jnp.zeros([], jnp.int32)}
        restored = ckpt.restore_latest(like) if ckpt is not None else None
        if restored is not None:
            state, meta, latest = restored
            trainable, opt_state, best_trainable = (state["trainable"], state["opt_state"],
                                                    state["best"])
            best = {"loss": float(state["best_loss"]), "epoch": int(state["best_epoch"]),
                    "stale": int(state["stale"])}
            start_epoch, step = int(state["epoch"]), int(latest)
            curve = list(meta.get("curve", []))
            resumed = step
            if log:
                log(f"resumed from step {step} (epoch {start_epoch})")
        rng = jax.random.key(cfg.seed)
        train_fn = runner.train_step()
        for epoch in range(start_epoch, cfg.epochs):
            if best["stale"] >= cfg.patience:
                break
            parts = []
            for members in epoch_batches(train_enc, rows, cfg.seed * 1000 + epoch):
                b = make_batch(train_enc, members, rows, model)
                step_rng = jax.random.fold_in(rng, step)
                trainable, opt_state, sums = train_fn(trainable, opt_state, runner.frozen_arg(),
                                                      runner.put(b), step_rng)
                parts.append(sums)
                step += 1
            train_m = sum_metrics(parts)
            valid_m, _ = evaluate(runner, trainable, valid_enc)
            row = {"epoch": epoch + 1, "step": step,
                   **{f"train_{k}": v for k, v in train_m.items()},
                   **{f"valid_{k}": v for k, v in valid_m.items()}}
            if valid_m["loss"] < best["loss"]:
                best = {"loss": valid_m["loss"], "epoch": epoch + 1, "stale": 0}
                best_trainable = jax.tree.map(jnp.copy, trainable)
            else:
                best["stale"] += 1
            curve.append(row)
            if log:
                log(" | ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                               for k, v in row.items()))
            if ckpt is not None:
                ckpt.save(step, {"trainable": trainable, "opt_state": opt_state,
                                 "best": best_trainable,
                                 "best_loss": jnp.asarray(best["loss"], jnp.float32),
                                 "epoch": jnp.asarray(epoch + 1, jnp.int32),
                                 "stale": jnp.asarray(best["stale"], jnp.int32),
                                 "best_epoch": jnp.asarray(best["epoch"], jnp.int32)},
                          {"curve": curve})
                ckpt.wait()
                if cfg.kill_at_step is not None and step >= cfg.kill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
    finally:
        if ckpt is not None:
            ckpt.close()
    left_out = {k: v.left_out for k, v in task_enc.items()}
    return Trained(model, best_trainable, runner, curve, int(best["epoch"]), left_out,
                   time.perf_counter() - t0, resumed)
