"""A trainer hook that probes the live encoder every ``period`` steps.

At each probe step the current parameters are wrapped in an
``embed.Embedder`` (encoder subtree, the trainer's mesh), small subsets of the
probe sets are embedded, the heads are fitted quickly (few epochs) and the test
accuracies are written to TensorBoard beside the loss:

  ``probe/ss_casp12/casp12_validation/q3``, ``…/q8``,
  ``probe/scl2205/scl2205_test/q13``, ``…/q2``.

The trainer calls hooks as ``hook(step, state, writer)`` after every step; the
hook returns at once except at multiples of ``period``. Configure it in gin
(``gin/runs/probe_hook.gin``).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from typing import Any, Optional, Sequence

import jax

from protlm_jax import embed
from protlm_jax.probes import datasets, evaluate, features, train


@dataclasses.dataclass
class ProbeHook:
    """Fits quick probes on the current encoder and logs their accuracies.

    Attributes:
      model_config: the model's ``T5Config`` (the hook embeds with it).
      period: probe every N steps (0: never).
      tasks: probe task specs (``datasets.load_task``).
      train_limit: training proteins per task (random, seeded subset).
      test_limit: test proteins per task (None: all).
      max_train_length: longest training protein kept (speed).
      max_test_length: longest test protein kept (speed; the monitor's test
        subsets are not the published test sets, ``protlm probe`` is).
      max_epochs, patience: quick fitting.
      data_dir: fetched data (default ``data/fetched``).
      token_budget: embedding batch budget.
      seed: subsets, initialisation and batch order.
      verbose: print one line per probe step.
    """
    model_config: Any = None
    period: int = 1000
    tasks: Sequence[str] = ("ss_casp12", "scl2205")
    train_limit: int = 300
    test_limit: Optional[int] = 200
    max_train_length: int = 500
    max_test_length: Optional[int] = 500
    max_epochs: int = 20
    patience: int = 3
    data_dir: Optional[str] = None
    token_budget: int = 4096
    seed: int = 0
    verbose: bool = True

    def __post_init__(self):
        self._tasks: dict = {}
        self._embedder = None  # the first probe step's; later steps reuse its programs

    def _task(self, spec: str) -> datasets.ProbeTask:
        if spec not in self._tasks:  # loaded once per run
            self._tasks[spec] = datasets.load_task(
                spec, self.data_dir, train_limit=self.train_limit,
                test_limit=self.test_limit, max_train_length=self.max_train_length,
                max_test_length=self.max_test_length, seed=self.seed)
        return self._tasks[spec]

    def __call__(self, step: int, state, writer) -> Optional[dict]:
        if not self.period or step % self.period:
            return None
        return self.probe(step, state.params, writer)

    def probe(self, step: int, params, writer=None) -> dict:
        """Embeds, fits and scores every task with ``params``; returns scalars."""
        t0 = time.perf_counter()
        leaf = jax.tree.leaves(params)[0]
        mesh = getattr(getattr(leaf, "sharding", None), "mesh", None)
        if mesh is not None and "data" not in getattr(mesh, "axis_names", ()):
            mesh = None
        # The live parameters on the first embedder's compiled programs: shapes,
        # config and shardings do not change during a run.
        if self._embedder is None:
            self._embedder = embed.Embedder(self.model_config, params, mesh=mesh)
            embedder = self._embedder
        else:
            embedder = self._embedder.with_params(params)
        featurizer = features.ModelFeatures(embedder, name="model",
                                            token_budget=self.token_budget)
        config = train.ProbeConfig(max_epochs=self.max_epochs, patience=self.patience,
                                   seed=self.seed)
        scalars = {}
        for spec in self.tasks:
            task = self._task(spec)
            result = evaluate.run_task(task, [featurizer], config=config, log=None,
                                       majority=False)
            for key, value in evaluate.headline(result, "model").items():
                scalars[f"probe/{task.name}/{key}"] = value
        scalars["probe/seconds"] = time.perf_counter() - t0
        if writer is not None:
            writer.write_scalars(step, scalars)
        if self.verbose and jax.process_index() == 0:
            print(f"probe step {step} | " + " | ".join(
                f"{k[len('probe/'):]} {v:.4f}" for k, v in scalars.items()),
                file=sys.stdout, flush=True)
        return scalars
