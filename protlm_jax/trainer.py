"""Pure train/eval steps and the Trainer loop (T5X ideas on jax.sharding).

* ``train_step(state, batch)`` is pure and jitted with explicit in/out
  shardings and the state donated: gradients are accumulated over
  microbatches with ``lax.scan``, normalised by the number of target tokens of
  the whole global batch (so microbatching and data parallelism give the same
  update as one big batch), and an update with a non-finite loss or gradient is
  not applied (the state stays the last good one and the loop stops with a
  clear message).
* Randomness is ``fold_in(key(seed), step)``: a resumed run draws the same
  dropout masks as an uninterrupted one.
* A *recurrent* objective (one with ``init_carry``, e.g. Transformer-XL's
  memory) gets a ``carry`` in the train state: a pytree whose leaves are
  batch-major (row b belongs to row b of every batch), sharded on the batch
  axis, donated, checkpointed with the step, passed to the objective
  (``objective(..., carry=c) -> (loss, sums, next carry)``) and split over
  microbatches exactly as the batch rows are, so each row's order holds.
  Evaluation starts from an empty carry and threads it through its batches.
* The loop reads host-local batches, turns them into global arrays, logs one
  concise line per period (process 0 only) and TensorBoard scalars (clu), and
  checkpoints with orbax.

Shapes: B global batch rows, M microbatches, L lengths.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax
import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import optax

from protlm_jax import checkpoints, host_memory, optimizers, partitioning
from protlm_jax.errors import ProtlmError
from protlm_jax.objectives import finalize_metrics


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train.

    Attributes:
      model_dir: checkpoints, TensorBoard logs and the operative config.
      train_steps: total steps (a resumed run stops at the same step).
      batch_size: global batch rows (all hosts together).
      microbatches: gradient-accumulation steps per update (divides batch_size).
      checkpoint_period: save every N steps (and at the end).
      keep_checkpoints: how many checkpoints to keep.
      async_checkpoints: save in the background.
      log_period: metrics every N steps.
      eval_period: evaluate every N steps (0: only at the end, if eval data).
      eval_batches: batches per evaluation.
      seed: parameters, dropout and data order derive from it.
      model_parallel_size: the "model" mesh axis size.
      rule_set: logical-axis rules, "1d" or "2d".
      peak_flops_per_device: for MFU (0: not reported).
    """

    model_dir: str
    train_steps: int
    batch_size: int = 128
    microbatches: int = 1
    checkpoint_period: int = 1000
    keep_checkpoints: int = 3
    async_checkpoints: bool = True
    log_period: int = 100
    eval_period: int = 0
    eval_batches: int = 8
    seed: int = 0
    model_parallel_size: int = 1
    rule_set: str = "1d"
    peak_flops_per_device: float = 0.0


@flax.struct.dataclass
class TrainState:
    """Everything that changes during training (a pytree)."""

    step: jax.Array
    params: Any
    opt_state: Any
    carry: Any = None  # a recurrent objective's state (batch-major), else None


MAX_STEPS_IN_FLIGHT = 2  # dispatched, unfinished steps the loop allows (see train)


def is_recurrent(objective) -> bool:
    """Whether ``objective`` carries state across batches (has ``init_carry``)."""
    return hasattr(objective, "init_carry")


def _merge_microbatches(tree, m: int):
    """Inverse of :func:`_split_microbatches`: [M, B/M, …] back to [B, …]."""
    return jax.tree.map(lambda x: x.swapaxes(0, 1).reshape((-1,) + x.shape[2:]), tree)


def _split_microbatches(batch: Mapping[str, jax.Array], m: int):
    # Strided split: microbatch i takes rows i, i+M, … so each microbatch spans
    # every data shard (a contiguous split would leave devices idle).
    def split(x):
        return x.reshape((x.shape[0] // m, m) + x.shape[1:]).swapaxes(0, 1)

    return jax.tree.map(split, dict(batch))


def _denominator(sums: Mapping[str, jax.Array]) -> jax.Array:
    """What Σ-loss gradients are divided by: the batch's loss weight (≥ 1)."""
    return jnp.maximum(sums["weight"], 1.0)


def _global_norm(tree, flat=None) -> jax.Array:
    """``optax.global_norm``; leaves marked True in ``flat`` (a matching tree
    of bools, None: none) have their squares summed as one flat vector.

    The gradients leave the backward's dots in whatever layout XLA picked;
    XLA:CPU's reduce over all axes of such a leaf is slow, the flat row reduce
    is not (the in-step optimizer part of prot_t5_small on one CPU device:
    0.16 -> 0.10 s, ``benchmarks/train_profile.py``). Only unsharded leaves
    should be flattened: flattening a sharded one could gather it.
    """
    leaves = jax.tree.leaves(tree)
    marks = jax.tree.leaves(flat) if flat is not None else [False] * len(leaves)
    return jnp.sqrt(sum(jnp.sum(jnp.square(x).reshape(-1) if m else jnp.square(x))
                        for x, m in zip(leaves, marks, strict=True)))


def train_step(state: TrainState, batch: Mapping[str, jax.Array], *, model, objective,
               optimizer: optax.GradientTransformation, schedule: Callable,
               microbatches: int, seed: int,
               flat_norm: Any = None) -> tuple[TrainState, dict]:
    """One optimizer update on a global batch. Pure; jit it with shardings.

    ``flat_norm``: a tree of bools like the params, True for unsharded leaves
    (:func:`_global_norm`; None: all reduced as they are).

    Returns:
      (new state, dict of metric sums plus ``learning_rate``, ``grad_norm`` and
      ``nonfinite`` (1 when the update was skipped)).
    """
    rng = jax.random.fold_in(jax.random.key(seed), state.step)
    recurrent = state.carry is not None

    def grads_and_sums(mb, mb_rng, mb_carry, normalize=False):
        def loss_fn(params):
            if recurrent:
                total, sums, new = objective(model, params, mb, mb_rng, deterministic=False,
                                             carry=mb_carry)
            else:
                (total, sums), new = objective(model, params, mb, mb_rng,
                                               deterministic=False), None
            # With the whole batch at hand, the per-token mean's 1/Σweight
            # seeds the backward (a scalar) instead of dividing every gradient
            # afterwards (a pass over all of them, with layout copies).
            seed = total / jax.lax.stop_gradient(_denominator(sums)) if normalize else total
            return seed, (total, sums, new)

        (_, (total, sums, new)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params)
        return grads, dict(sums, objective=total), new

    if microbatches == 1:
        grads, sums, new_carry = grads_and_sums(batch, rng, state.carry, normalize=True)
    else:
        parts = _split_microbatches(batch, microbatches)
        carries = _split_microbatches(state.carry, microbatches) if recurrent else None
        rngs = jax.random.split(rng, microbatches)

        def body(acc, xs):
            mb, mb_rng, mb_carry = xs
            g, s, new = grads_and_sums(mb, mb_rng, mb_carry)
            return jax.tree.map(jnp.add, acc, (g, s)), new

        first = jax.tree.map(lambda x: x[0], (parts, rngs, carries))
        zero = jax.eval_shape(lambda *a: grads_and_sums(*a)[:2], *first)
        zero = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), zero)
        (grads, sums), new_parts = jax.lax.scan(body, zero, (parts, rngs, carries))
        new_carry = _merge_microbatches(new_parts, microbatches) if recurrent else None
        # Σ-loss gradients → per-token mean over the whole global batch.
        denominator = _denominator(sums)
        grads = jax.tree.map(lambda g: g / denominator, grads)

    grad_norm = _global_norm(grads, flat_norm)
    finite = jnp.isfinite(grad_norm) & jnp.isfinite(sums["objective"])

    # A conditional, not a select: a select over params and optimizer state
    # reads both versions of every tensor each step (~0.15 s of a 9 s T5-small
    # step on a 2-core CPU); the branch skipping the update runs only on a
    # non-finite step.
    def update(_):
        updates, new_opt_state = optimizer.update(grads, state.opt_state, state.params)
        return optax.apply_updates(state.params, updates), new_opt_state, new_carry

    def keep(_):
        return state.params, state.opt_state, state.carry

    params, opt_state, carry = jax.lax.cond(finite, update, keep, None)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           carry=carry)
    metrics = dict(sums)
    metrics.update(learning_rate=schedule(state.step), grad_norm=grad_norm,
                   nonfinite=1.0 - finite.astype(jnp.float32))
    return new_state, metrics


def eval_step(params, batch: Mapping[str, jax.Array], *, model, objective) -> dict:
    """Metric sums on one batch, deterministic (no dropout)."""
    _, sums = objective(model, params, batch, jax.random.key(0), deterministic=True)
    return sums


def eval_step_recurrent(params, carry, batch: Mapping[str, jax.Array], *, model,
                        objective) -> tuple[dict, Any]:
    """:func:`eval_step` of a recurrent objective: (metric sums, next carry)."""
    _, sums, new = objective(model, params, batch, jax.random.key(0), deterministic=True,
                             carry=carry)
    return sums, new


def maybe_initialize_distributed() -> None:
    """``jax.distributed.initialize()`` when more than one process is configured.

    Explicit settings come from ``JAX_COORDINATOR_ADDRESS``,
    ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``; on TPU VMs and SLURM jax
    detects the cluster itself (``PROTLM_DISTRIBUTED=1`` forces the call).
    CPU processes exchange data through gloo.
    """
    num = int(os.environ.get("JAX_NUM_PROCESSES", "1"))
    auto = os.environ.get("PROTLM_DISTRIBUTED") == "1" or (
        "SLURM_JOB_ID" in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1)
    if num <= 1 and not auto:
        return
    if jax.distributed.is_initialized():
        return
    if os.environ.get("JAX_PLATFORMS", "") == "cpu":
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if num > 1:
        jax.distributed.initialize(
            coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
            num_processes=num, process_id=int(os.environ["JAX_PROCESS_ID"]))
    else:
        jax.distributed.initialize()


def _with_sharding(shapes: Any, shardings: Any) -> Any:
    """``ShapeDtypeStruct`` tree with each leaf's sharding attached."""
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings)


def _dummy_batch(feature_lengths: Mapping[str, int], rows: int) -> dict[str, np.ndarray]:
    return {k: np.zeros((rows, n), np.int32) for k, n in feature_lengths.items()}


class Trainer:
    """Builds the partitioned state and runs the training loop.

    Args:
      model: a flax module called as the objective expects.
      objective: e.g. ``objectives.EncDecObjective()``.
      optimizer_config: ``optimizers.OptimizerConfig``.
      config: ``TrainConfig``.
      model_feature_lengths: model feature name → length (from the seqio
        feature converter), used to build shapes for initialisation.
      init_inputs: names of the batch features ``model.init`` takes, in order.
      extra_metadata: saved with each checkpoint (model config, gin text, …).
      log: where the one-line summaries go (process 0 only).
      devices: the devices of the mesh (default: all).
      hooks: callables ``hook(step, state, writer)`` run after every step
        (after logging, checkpointing and evaluation); each decides itself
        when to act, e.g. ``probes.hook.ProbeHook`` every ``period`` steps.
      flops_fn: ``(trainer) -> global FLOPs of one step`` for steps whose loops XLA
        undercounts (scanned layers, microbatches); used for MFU logging.
    """

    def __init__(self, *, model, objective, optimizer_config, config: TrainConfig,
                 model_feature_lengths: Mapping[str, int], init_inputs: tuple[str, ...],
                 extra_metadata: Optional[dict] = None, log=None,
                 devices: Optional[list] = None, hooks: Sequence[Callable] = (),
                 flops_fn: Optional[Callable[["Trainer"], float]] = None):
        # CPU hosts: reuse freed heap blocks instead of page-faulting fresh
        # mmaps on every step (see host_memory; PROTLM_MALLOC_TUNING=0 opts out).
        host_memory.retain_freed_memory()
        if config.batch_size % config.microbatches:
            raise ProtlmError(f"batch_size {config.batch_size} is not divisible by "
                              f"microbatches {config.microbatches}")
        self.model, self.objective, self.config = model, objective, config
        self.optimizer_config = optimizer_config
        self.optimizer = optimizers.make_optimizer(optimizer_config)
        self.schedule = optimizers.make_schedule(optimizer_config.schedule)
        self.model_feature_lengths = dict(model_feature_lengths)
        self.init_inputs = init_inputs
        self.extra_metadata = extra_metadata or {}
        self.log = log
        self.is_chief = jax.process_index() == 0
        self.mesh = partitioning.create_mesh(config.model_parallel_size, devices)
        self.rules = partitioning.standard_logical_axis_rules(config.rule_set)
        n_data = self.mesh.shape["data"]
        if config.batch_size // config.microbatches % n_data:
            raise ProtlmError(f"a microbatch of {config.batch_size // config.microbatches} "
                              f"rows does not split over the {n_data}-way data axis")
        self._train_fn = None
        self._eval_fn = None
        self.hooks = tuple(hooks)
        self.flops_fn = flops_fn

    # --- state -------------------------------------------------------------

    def abstract_state(self) -> TrainState:
        """The ``TrainState`` :meth:`init_state` builds, without arrays.

        Its leaves are ``jax.ShapeDtypeStruct``s carrying the ``NamedSharding``s
        of the real state: parameters from ``eval_shape(model.init)`` under the
        logical rules, the optimizer state from ``eval_shape(optimizer.init)``
        with :meth:`opt_state_shardings`. ``init_state`` places its arrays
        with exactly these; ``protlm plan`` compiles on them.
        """
        dummy = _dummy_batch(self.model_feature_lengths, 1)
        args = [jax.ShapeDtypeStruct(dummy[k].shape, jnp.int32) for k in self.init_inputs]

        def init_params(rng, *a):
            return self.model.init({"params": rng, "dropout": rng}, *a)["params"]

        # Traced under the rules, like partitioning.sharded_init, so the logical
        # constraints inside the model resolve against this mesh.
        with partitioning.axis_rules(self.mesh, self.rules):
            boxed = jax.eval_shape(init_params, jax.random.key(self.config.seed), *args)
        param_shardings, param_shapes = partitioning.param_shardings(boxed, self.mesh,
                                                                     self.rules)
        params = _with_sharding(param_shapes, param_shardings)
        opt_shapes = jax.eval_shape(self.optimizer.init, params)
        opt_state = _with_sharding(opt_shapes,
                                   self.opt_state_shardings(param_shapes, param_shardings))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
        return TrainState(step=step, params=params, opt_state=opt_state,
                          carry=self.abstract_carry(training=True))

    def abstract_carry(self, training: bool = True) -> Any:
        """The recurrent objective's carry for a global batch (``ShapeDtypeStruct``s
        sharded on their leading, batch axis), or None."""
        if not is_recurrent(self.objective):
            return None
        shapes = jax.eval_shape(lambda: self.objective.init_carry(
            self.model, self.config.batch_size, training=training))
        rows = partitioning.batch_sharding(self.mesh)
        return _with_sharding(shapes, jax.tree.map(lambda _: rows, shapes))

    def empty_carry(self, training: bool = True) -> Any:
        """The carry a run (``training``) or an evaluation starts from, placed."""
        abstract = self.abstract_carry(training)
        if abstract is None:
            return None
        return jax.jit(lambda: self.objective.init_carry(self.model, self.config.batch_size,
                                                         training=training),
                       out_shardings=self.shardings_of(abstract))()

    def init_state(self) -> TrainState:
        """Sharded initialisation: nothing is materialised on one device first."""
        rng = jax.random.key(self.config.seed)
        dummy = _dummy_batch(self.model_feature_lengths, 1)
        args = [jnp.asarray(dummy[k]) for k in self.init_inputs]
        abstract = self.abstract_state()

        def init_params(rng):
            return flax.linen.meta.unbox(
                self.model.init({"params": rng, "dropout": rng}, *args)["params"])

        with partitioning.axis_rules(self.mesh, self.rules):
            params = jax.jit(init_params, out_shardings=self.shardings_of(abstract.params))(rng)
        opt_state = jax.jit(self.optimizer.init, in_shardings=(self.shardings_of(params),),
                            out_shardings=self.shardings_of(abstract.opt_state))(params)
        step = jax.device_put(jnp.zeros([], jnp.int32), abstract.step.sharding)
        return TrainState(step=step, params=params, opt_state=opt_state,
                          carry=self.empty_carry(training=True))

    def opt_state_shardings(self, abstract_params, param_shardings):
        """Shardings of the optimizer state, explicit so nothing is replicated.

        A leaf shaped like its parameter (AdamW moments, unfactored Adafactor
        statistics) takes the parameter's sharding; a factored Adafactor
        statistic, the parameter's spec without the reduced dimension; the rest
        (counters, placeholders) is replicated.
        """
        from jax.sharding import NamedSharding, PartitionSpec

        replicated = NamedSharding(self.mesh, PartitionSpec())
        state = jax.eval_shape(self.optimizer.init, abstract_params)

        def follow(leaf, sharding, param):
            spec = tuple(sharding.spec) + (None,) * (param.ndim - len(sharding.spec))
            if leaf.shape == param.shape:
                return sharding
            candidates = {}
            if param.ndim >= 1:  # statistics averaged over the last dimension
                candidates.setdefault(tuple(param.shape[:-1]), []).append(spec[:-1])
            if param.ndim >= 2:  # … or over the second to last
                candidates.setdefault(tuple(param.shape[:-2] + param.shape[-1:]),
                                      []).append(spec[:-2] + spec[-1:])
            specs = {tuple(c) for c in candidates.get(tuple(leaf.shape), [])}
            if len(specs) == 1:
                return NamedSharding(self.mesh, PartitionSpec(*specs.pop()))
            return replicated  # ambiguous (square) or unrelated: small, replicate

        return optax.tree_map_params(self.optimizer, follow, state, param_shardings,
                                     abstract_params,
                                     transform_non_params=lambda _: replicated)

    @staticmethod
    def shardings_of(tree):
        return jax.tree.map(lambda x: x.sharding, tree)

    # --- compiled steps ------------------------------------------------------

    def train_fn(self, state: TrainState):
        if self._train_fn is None:
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            unsharded = jax.tree.map(lambda x: x.sharding.is_fully_replicated, state.params)
            step = lambda s, b: train_step(  # noqa: E731
                s, b, model=self.model, objective=self.objective, optimizer=self.optimizer,
                schedule=self.schedule, microbatches=self.config.microbatches,
                seed=self.config.seed, flat_norm=unsharded)
            self._train_fn = partitioning.partitioned_jit(
                step, self.mesh, self.rules,
                in_shardings=(self.shardings_of(state), partitioning.batch_sharding(self.mesh)),
                out_shardings=(self.shardings_of(state), replicated), donate_argnums=(0,))
        return self._train_fn

    def eval_fn(self, state: TrainState):
        """``(params, batch) -> sums``; for a recurrent objective
        ``(params, carry, batch) -> (sums, next carry)``."""
        if self._eval_fn is None:
            replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
            rows = partitioning.batch_sharding(self.mesh)
            params = self.shardings_of(state.params)
            if is_recurrent(self.objective):
                carry = self.shardings_of(self.abstract_carry(training=False))
                fn = lambda p, c, b: eval_step_recurrent(  # noqa: E731
                    p, c, b, model=self.model, objective=self.objective)
                self._eval_fn = partitioning.partitioned_jit(
                    fn, self.mesh, self.rules, in_shardings=(params, carry, rows),
                    out_shardings=(replicated, carry), donate_argnums=(1,))
            else:
                fn = lambda p, b: eval_step(p, b, model=self.model,  # noqa: E731
                                            objective=self.objective)
                self._eval_fn = partitioning.partitioned_jit(
                    fn, self.mesh, self.rules, in_shardings=(params, rows),
                    out_shardings=replicated)
        return self._eval_fn

    def step_flops(self, state: TrainState) -> float:
        """FLOPs of one train step (global) from XLA's cost analysis.

        XLA counts a loop body once, so with scanned layers or microbatches the
        count is what ``flops_fn`` (given at construction; ``plan.probe_flops``
        through the gin wrapper) measures on shallow unscanned probes; without
        one it is 0 (unknown) rather than an undercount.
        """
        model_config = getattr(self.model, "config", None)
        if self.config.microbatches > 1 or getattr(model_config, "scan_layers", False):
            if self.flops_fn is None:
                return 0.0
            try:
                return float(self.flops_fn(self))
            except Exception:  # best-effort, like the plain analysis below
                return 0.0
        batch = {k: jax.ShapeDtypeStruct((self.config.batch_size, n), jnp.int32)
                 for k, n in self.model_feature_lengths.items()}
        try:
            analysis = self.train_fn(state).lower(state, batch).cost_analysis()
            if isinstance(analysis, (list, tuple)):
                analysis = analysis[0]
            return float(analysis.get("flops", 0.0))
        except Exception:  # cost analysis is best-effort on some backends
            return 0.0

    # --- loop ----------------------------------------------------------------

    def _global(self, batch: Mapping[str, np.ndarray]) -> dict:
        return partitioning.host_local_to_global(
            {k: v for k, v in batch.items() if k in self.model_feature_lengths}, self.mesh,
            global_batch_size=self.config.batch_size)

    def evaluate(self, state: TrainState, batches: Iterator[Mapping[str, np.ndarray]],
                 max_batches: Optional[int] = None) -> dict[str, float]:
        """Mean metrics over eval batches."""
        fn, total = self.eval_fn(state), None
        carry = self.empty_carry(training=False)  # recurrent: every evaluation starts empty
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            if carry is None:
                sums = fn(state.params, self._global(batch))
            else:
                sums, carry = fn(state.params, carry, self._global(batch))
            sums = jax.device_get(sums)
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        if total is None:
            return {}
        return self._finalize(total)

    def _finalize(self, sums) -> dict[str, float]:
        """Metric sums -> means; an objective may add its own (ELECTRA's
        discriminator loss and accuracy) with a ``finalize_metrics`` method."""
        return getattr(self.objective, "finalize_metrics", finalize_metrics)(sums)

    def _print(self, text: str) -> None:
        if self.is_chief:
            print(text, file=self.log if self.log is not None else sys.stdout, flush=True)

    def train(self, make_batches: Callable[[int], Iterator[Mapping[str, np.ndarray]]],
              make_eval_batches: Optional[Callable[[], Iterator]] = None,
              kill_at_step: Optional[int] = None,
              on_start: Optional[Callable[[], None]] = None) -> TrainState:
        """Runs (or resumes) training to ``train_steps``.

        Args:
          make_batches: ``start_batch → iterator`` of host-local batches.
          make_eval_batches: ``() → iterator`` of eval batches (or None).
          kill_at_step: testing hook: SIGKILL this process right after
            dispatching that step (simulates a crash at an arbitrary moment).
          on_start: called once the run is accepted (checkpoint restored or
            none, data opened), before the first step.

        Returns:
          The final state.
        """
        from clu import metric_writers

        cfg = self.config
        checkpointer = checkpoints.Checkpointer(cfg.model_dir, keep=cfg.keep_checkpoints,
                                    async_save=cfg.async_checkpoints)
        writer = metric_writers.create_default_writer(
            os.path.join(cfg.model_dir, "train"), just_logging=not self.is_chief)
        state = self.init_state()
        restored = checkpointer.restore_latest(state)  # the newest step that verifies
        latest = None
        if restored is not None:
            state, meta, latest = restored
            # An imported (params-only) checkpoint starts a new run: any seed.
            if not meta.get("params_only") and meta.get("seed") != cfg.seed:
                raise ProtlmError(f"{cfg.model_dir}: checkpoint was trained with seed "
                                  f"{meta.get('seed')}, this run has {cfg.seed}")
            self._print(f"resumed from step {latest} ({checkpointer.directory})")
        start = int(jax.device_get(state.step))
        if start >= cfg.train_steps:
            self._print(f"already at step {start} ≥ train_steps {cfg.train_steps}")
            checkpointer.close()
            return state
        batches = make_batches(start)
        if on_start is not None:
            on_start()
        train_fn = self.train_fn(state)
        flops = self.step_flops(state) if cfg.peak_flops_per_device else 0.0
        peak = cfg.peak_flops_per_device * jax.device_count()
        pending, t0, last_good = [], time.perf_counter(), latest
        for step in range(start, cfg.train_steps):
            try:
                batch = next(batches)
            except StopIteration:
                raise ProtlmError("the training data ran out (use num_epochs=None)") from None
            state, metrics = train_fn(state, self._global(batch))
            pending.append(metrics)
            if len(pending) > MAX_STEPS_IN_FLIGHT:
                # Bounded asynchronous dispatch: with hundreds of tiny sharded steps
                # queued, XLA:CPU's in-process all-reduce can wait forever for a
                # participant whose thread is busy with a later step (seen with 8
                # simulated devices on 2 cores); waiting on an earlier step's loss
                # keeps the device fed without letting the host run away.
                jax.block_until_ready(pending[-1 - MAX_STEPS_IN_FLIGHT]["loss"])
            if kill_at_step is not None and step + 1 == kill_at_step:
                os.kill(os.getpid(), 9)
            done = step + 1
            if done % cfg.log_period == 0 or done == cfg.train_steps:
                sums = jax.device_get(pending)
                pending = []
                elapsed = time.perf_counter() - t0
                t0 = time.perf_counter()
                self._stop_if_nonfinite([m["nonfinite"] for m in sums], done, checkpointer,
                                        last_good)
                checkpointer.check()  # a failed asynchronous save stops the run here
                total = jax.tree.map(lambda *x: np.sum(x), *sums)
                scalars = self._finalize(total)
                scalars["learning_rate"] = float(sums[-1]["learning_rate"])
                scalars["grad_norm"] = float(np.mean([m["grad_norm"] for m in sums]))
                scalars["tokens_per_second"] = float(total["weight"]) / elapsed
                scalars["steps_per_second"] = len(sums) / elapsed
                if flops and peak:
                    scalars["mfu"] = flops * len(sums) / elapsed / peak
                writer.write_scalars(done, scalars)
                self._print(_summary_line(done, scalars))
            if done % cfg.checkpoint_period == 0 or done == cfg.train_steps:
                # Every step since the last check is checked before it is saved: a
                # checkpoint never follows a skipped non-finite step.
                self._stop_if_nonfinite(jax.device_get([m["nonfinite"] for m in pending]),
                                        done, checkpointer, last_good)
                meta = {"step": done, "data_batches_consumed": done, "seed": cfg.seed,
                        "train_config": dataclasses.asdict(cfg), **self.extra_metadata}
                checkpointer.save(done, state, meta)
                last_good = done
            if (make_eval_batches is not None and cfg.eval_period
                    and done % cfg.eval_period == 0 and done != cfg.train_steps):
                self._log_eval(done, state, make_eval_batches, writer)
            for hook in self.hooks:
                hook(done, state, writer)
        if make_eval_batches is not None:
            self._log_eval(cfg.train_steps, state, make_eval_batches, writer)
        checkpointer.close()
        writer.flush()
        return state

    @staticmethod
    def _stop_if_nonfinite(flags, done: int, checkpointer, last_good) -> None:
        """Stops at the first non-finite step among the last ``len(flags)``."""
        bad = next((i for i, f in enumerate(flags) if f), None)
        if bad is None:
            return
        checkpointer.close()
        raise ProtlmError(
            f"non-finite loss or gradient at step {done - len(flags) + bad + 1}; stopped "
            f"without applying it or saving after it. Last good checkpoint: step "
            f"{last_good} in {checkpointer.directory}")

    def _log_eval(self, step, state, make_eval_batches, writer) -> dict:
        scalars = self.evaluate(state, make_eval_batches(), self.config.eval_batches)
        if scalars:
            writer.write_scalars(step, {f"eval/{k}": v for k, v in scalars.items()})
            self._print(f"eval step {step} | " + " | ".join(
                f"{k} {v:.4f}" for k, v in scalars.items()))
        return scalars


def _summary_line(step: int, s: Mapping[str, float]) -> str:
    parts = [f"step {step}", f"loss {s['loss']:.4f}"]
    if "masked_loss" in s and not math.isnan(s["masked_loss"]):
        parts.append(f"masked_loss {s['masked_loss']:.4f}")
        parts.append(f"masked_acc {s['masked_accuracy']:.3f}")
    if "disc_loss" in s:
        parts.append(f"disc_loss {s['disc_loss']:.4f}")
        parts.append(f"disc_acc {s['disc_accuracy']:.3f}")
    parts += [f"lr {s['learning_rate']:.2e}", f"gnorm {s['grad_norm']:.3f}",
              f"{s['tokens_per_second']:,.0f} tok/s"]
    if "mfu" in s:
        parts.append(f"MFU {100 * s['mfu']:.1f}%")
    return " | ".join(parts)
