"""Gin at the edge: configurables and the ``protlm train`` / ``protlm eval`` runs.

This is the only library module that imports gin. It registers the frozen
config dataclasses as external configurables and defines the two gin-bound
entry functions, :func:`train` and :func:`evaluate`. Gin files live in
``gin/`` (``models/``, ``runs/``, ``experiments/``), T5X style:

    protlm train --gin_file=gin/experiments/prot_t5_tiny_demo.gin \\
        --gin.MODEL_DIR="/tmp/run" --gin.TRAIN_STEPS=300

``--gin.NAME=value`` binds a macro or parameter; a value that is not a gin
literal is taken as a string, so ``--gin.MODEL_DIR=/tmp/x`` works unquoted.
The full config is written to ``MODEL_DIR/config.gin`` once the run is
accepted (resumable, data present) and the operative config beside the
checkpoints at the end.

A gin file is code: it calls the configurables it binds. Give only gin files
you trust. As a guard, a gin file (or an include) that imports modules other
than protlm's own, or turns on ``dynamic_registration``, is refused, and
``--gin.`` names must be gin names. Nothing reads gin back from a MODEL_DIR.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
import re
import sys
from typing import Mapping, Optional, Sequence

import gin
import jax

import protlm_tasks  # noqa: F401  (registers the seqio tasks the runs read)
from protlm_jax import checkpoints, errors, models, optimizers, plan, trainer
from protlm_jax.data import pipeline as data_pipeline
from protlm_jax.data import sample
from protlm_jax.data import sources as data_sources
from protlm_jax.errors import ProtlmError
from protlm_jax.finetune import train as finetune_train
from protlm_jax.probes import hook as probe_hook

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

gin.external_configurable(trainer.TrainConfig, "TrainConfig")
gin.external_configurable(optimizers.OptimizerConfig, "OptimizerConfig")
gin.external_configurable(optimizers.ScheduleConfig, "ScheduleConfig")
gin.external_configurable(data_pipeline.DataConfig, "DataConfig")
gin.external_configurable(probe_hook.ProbeHook, "ProbeHook")
gin.external_configurable(finetune_train.FinetuneConfig, "FinetuneConfig")
# Every registered family's config class and objective, under their class
# names (T5Config, BertConfig, ElectraConfig, EncDecObjective, MLMObjective…).
for _cls in dict.fromkeys(c for f in models.FAMILIES.values()
                          for c in (f.config_class, f.default_objective)):
    gin.external_configurable(_cls, _cls.__name__)


def _set_data_dir(data_dir: Optional[str]) -> None:
    if data_dir:
        data_sources.set_data_dir(data_dir)


def _prepare_sample_if_missing(task: str) -> None:
    """Prepares the bundled sample when a ``uniprot_sample_*`` task has no shards."""
    if not task.startswith("uniprot_sample_"):
        return
    directory = data_sources.corpus_dir("uniprot_sample")
    if "://" in directory:
        return  # remote data dirs are prepared with `protlm prepare`, not here
    if list(pathlib.Path(directory).glob("train.tfrecord-*")):
        return
    print(f"preparing the bundled sample into {directory}", file=sys.stderr)
    sample.prepare_sample(pathlib.Path(directory))


def _build(model_config, data_config: data_pipeline.DataConfig,
           train_config: trainer.TrainConfig, optimizer_config, objective,
           extra_metadata: dict, hooks: Sequence = ()) -> trainer.Trainer:
    converter = data_pipeline.feature_converter(data_config.task, data_config.pack)
    lengths = converter.get_model_feature_lengths(dict(data_config.feature_lengths))
    family = models.family_for(model_config)
    model, init_inputs = family.build(model_config)
    objective = objective if objective is not None else family.default_objective()

    def flops(run: trainer.Trainer) -> float:
        # Loops XLA undercounts: measured on shallow unscanned probes.
        return plan.probe_flops(model_config, run.optimizer_config, run.config,
                                run.model_feature_lengths, list(run.mesh.devices.flat),
                                run.objective)[1]

    return trainer.Trainer(
        model=model, objective=objective,
        optimizer_config=optimizer_config, config=train_config,
        model_feature_lengths=lengths,
        init_inputs=init_inputs,
        extra_metadata={"model_family": family.name, **extra_metadata}, hooks=hooks,
        flops_fn=flops)


@gin.configurable
def train(model_config=gin.REQUIRED,
          train_config: trainer.TrainConfig = gin.REQUIRED,
          data_config: data_pipeline.DataConfig = gin.REQUIRED,
          eval_data_config: Optional[data_pipeline.DataConfig] = None,
          optimizer_config: optimizers.OptimizerConfig = optimizers.OptimizerConfig(),
          objective=None,
          data_dir: Optional[str] = None,
          prepare_sample_if_missing: bool = False,
          kill_at_step: Optional[int] = None,
          hooks: Sequence = ()) -> trainer.TrainState:
    """Trains (or resumes) a model as configured; returns the final state.

    ``hooks`` run after every step (``hook(step, state, writer)``), e.g.
    ``[@ProbeHook()]`` from ``gin/runs/probe_hook.gin``.
    """
    trainer.maybe_initialize_distributed()
    _set_data_dir(data_dir)
    if prepare_sample_if_missing and jax.process_index() == 0:
        _prepare_sample_if_missing(data_config.task)
    os.makedirs(train_config.model_dir, exist_ok=True) if "://" not in \
        train_config.model_dir else None
    config_text = gin.config_str()

    def write_config():  # once the run is accepted: a refused run leaves it as it was
        if jax.process_index() == 0:
            _write_text(os.path.join(train_config.model_dir, "config.gin"), config_text)

    # The full gin config travels inside every checkpoint's metadata, so any
    # checkpoint says how it was made even if MODEL_DIR/config.gin is lost.
    meta = {"model_config": dataclasses.asdict(model_config),
            "task": data_config.task, "feature_lengths": dict(data_config.feature_lengths),
            "gin_config": gin.config_str()}
    run = _build(model_config, data_config, train_config, optimizer_config, objective, meta,
                 hooks)
    pc, pi = jax.process_count(), jax.process_index()

    def make_batches(start):
        return data_pipeline.batches(data_config, train_config.batch_size,
                                     seed=train_config.seed, start_batch=start,
                                     process_index=pi, process_count=pc)

    def make_eval():
        return data_pipeline.batches(eval_data_config, train_config.batch_size,
                                     seed=train_config.seed, num_epochs=1,
                                     process_index=pi, process_count=pc)

    state = run.train(make_batches, make_eval if eval_data_config is not None else None,
                      kill_at_step=kill_at_step, on_start=write_config)
    if jax.process_index() == 0:
        _write_text(os.path.join(train_config.model_dir, "checkpoints", "operative_config.gin"),
                    gin.operative_config_str())
    return state


@gin.configurable
def evaluate(model_config=gin.REQUIRED,
             train_config: trainer.TrainConfig = gin.REQUIRED,
             eval_data_config: data_pipeline.DataConfig = gin.REQUIRED,
             optimizer_config: optimizers.OptimizerConfig = optimizers.OptimizerConfig(),
             objective=None,
             data_dir: Optional[str] = None,
             step: Optional[int] = None,
             max_batches: Optional[int] = None) -> dict:
    """Evaluates a checkpoint of ``MODEL_DIR`` (latest unless ``step``)."""
    trainer.maybe_initialize_distributed()
    _set_data_dir(data_dir)
    run = _build(model_config, eval_data_config, train_config, optimizer_config,
                 objective, {})
    checkpointer = checkpoints.Checkpointer(train_config.model_dir, async_save=False)
    # Params only: the optimizer that trained them (LAMB, Adafactor…) does not matter;
    # the newest step that verifies, unless `step`.
    restored = checkpointer.restore_latest(run.init_state(), params_only=True, step=step)
    if restored is None:
        raise ProtlmError(f"{train_config.model_dir}: no complete checkpoint to evaluate")
    state, _, step = restored
    batches = data_pipeline.batches(eval_data_config, train_config.batch_size,
                                    seed=train_config.seed, num_epochs=1,
                                    process_index=jax.process_index(),
                                    process_count=jax.process_count())
    metrics = run.evaluate(state, batches, max_batches)
    checkpointer.close()
    return {"step": step, **metrics}


def plan_configs() -> tuple:
    """The configs a gin ``train`` run is bound to, for ``protlm plan``.

    Reads ``train``'s own bindings (``gin/runs/pretrain.gin`` binds
    ``train.model_config`` etc.), so planning needs no gin files of its own.

    Returns:
      (model_config, train_config, data_config, optimizer_config, objective).
    """
    bindings = gin.get_bindings("train")
    missing = [k for k in ("model_config", "train_config", "data_config")
               if k not in bindings]
    if missing:
        raise ProtlmError(f"gin: protlm plan reads the train.* bindings of a run; "
                          f"train.{missing[0]} is not bound (include gin/runs/pretrain.gin)")
    return (bindings["model_config"], bindings["train_config"], bindings["data_config"],
            bindings.get("optimizer_config", optimizers.OptimizerConfig()),
            bindings.get("objective"))


def _write_text(path: str, text: str) -> None:
    if "://" in path:
        import tensorflow as tf

        with tf.io.gfile.GFile(path, "w") as f:
            f.write(text)
        return
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def _binding(name: str, value: str) -> str:
    """``NAME = value``, quoting ``value`` when it is not a gin literal."""
    try:
        gin.config.parse_value(value)
        return f"{name} = {value}"
    except Exception:
        return f"{name} = {value!r}"


# ``--gin.NAME=value``: a macro or a (scoped) ``configurable.parameter``.
_BINDING_NAME = re.compile(r"[A-Za-z_][\w.]*(/[A-Za-z_][\w.]*)*")
_IMPORT = re.compile(r"\s*(?:import\s+([\w.]+)|from\s+([\w.]+)\s+import\b)")
_INCLUDE = re.compile(r"\s*include\s+(['\"])(.+?)\1")
# Modules a gin file may import: protlm's own (they register configurables).
_ALLOWED_IMPORTS = ("protlm_jax", "protlm_tasks", "tasks")


def _check_gin_file(path: str, roots: Sequence[str], seen: set) -> None:
    """Refuses a gin file (or an include of it) that imports code from outside
    protlm or turns on ``dynamic_registration`` (which makes any Python
    callable, ``os.system`` say, configurable): file:line, one line."""
    real = os.path.realpath(path)
    if real in seen:
        return
    seen.add(real)
    try:
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ProtlmError(f"gin: {path}: cannot be read ({e})") from None
    for number, line in enumerate(lines, 1):
        m = _IMPORT.match(line)
        if m:
            module = m[1] or m[2]
            if module.split(".")[0] not in _ALLOWED_IMPORTS:
                what = ("dynamic_registration" if module == "__gin__"
                        else f"import of {module!r}")
                raise ProtlmError(f"{path}:{number}: gin: {what} is refused (gin files may "
                                  f"import only {', '.join(_ALLOWED_IMPORTS)} modules)")
        m = _INCLUDE.match(line)
        if m:
            name = m[2]
            found = [os.path.join(r, name) for r in (os.path.dirname(path), *roots)
                     if os.path.isfile(os.path.join(r, name))]
            if os.path.isabs(name) and os.path.isfile(name):
                found.insert(0, name)
            if found:  # a missing include is gin's own error, reported at parse
                _check_gin_file(found[0], roots, seen)


def parse(gin_files: Sequence[str], bindings: Mapping[str, str] | Sequence[tuple[str, str]],
          search_paths: Sequence[str] = ()) -> None:
    """Parses gin files and ``--gin.NAME=value`` bindings (T5X style).

    Files and their includes (``gin/models/…``) are looked up in the working
    directory, ``search_paths`` and the repository root, in that order.
    """
    gin.clear_config(clear_constants=True)  # a second run in one process starts clean
    roots = [os.getcwd(), *search_paths, str(REPO_ROOT)]
    for path in reversed(roots):  # gin tries the most recently added first
        gin.add_config_file_search_path(path)
    files = []
    for name in gin_files:
        found = [os.path.join(r, name) for r in roots if os.path.isfile(os.path.join(r, name))]
        if not found and not os.path.isfile(name):
            raise ProtlmError(f"gin: file {name!r} not found in {roots}")
        files.append(name if os.path.isfile(name) else found[0])
    items = list(bindings.items() if isinstance(bindings, Mapping) else bindings)
    for name, _ in items:
        if not _BINDING_NAME.fullmatch(name):
            raise ProtlmError(f"--gin.{name!r}: not a gin name (a MACRO, a "
                              "configurable.parameter or scope/configurable.parameter)")
    seen: set = set()
    for path in files:
        _check_gin_file(path, roots, seen)
    root_logger = logging.getLogger()
    quiet = _DropMissingPathMessages()
    root_logger.addFilter(quiet)  # gin logs every search-path miss as an error
    try:
        gin.parse_config_files_and_bindings(
            files, [_binding(k, v) for k, v in items], finalize_config=True)
    except Exception as e:  # gin raises ValueError, SyntaxError, KeyError, …
        raise ProtlmError(f"gin: {errors.one_line(e)}") from None
    finally:
        root_logger.removeFilter(quiet)


class _DropMissingPathMessages(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Path not found")


def finetune_config() -> "finetune_train.FinetuneConfig":
    """``FinetuneConfig()`` with the parsed gin bindings (``protlm finetune``)."""
    return gin.get_configurable("FinetuneConfig")()

