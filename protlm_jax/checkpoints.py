"""Checkpoints with orbax: period, keep-N, async, exact resume.

A checkpoint holds the whole train state (parameters, optimizer state, step)
plus JSON metadata (data position, seed, configs). Randomness is derived from
(seed, step), so parameters + step + data position are all a resumed run needs
to continue exactly. Orbax writes each step into a temporary folder and renames
it once complete; ``latest_step`` only sees finished ones, so a checkpoint cut
short by a kill is never picked up.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Tuple

import jax
import orbax.checkpoint as ocp

from protlm_jax import models, partitioning
from protlm_jax.errors import ProtlmError


class Checkpointer:
    """Saves and restores train states under ``<model_dir>/checkpoints``."""

    def __init__(self, model_dir: str, *, keep: int = 3, async_save: bool = True):
        self.directory = os.path.join(os.path.abspath(model_dir)
                                      if "://" not in model_dir else model_dir,
                                      "checkpoints")
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                cleanup_tmp_directories=True))

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Starts saving ``state`` (asynchronously when enabled)."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)))

    def restore(self, step: int, like: Any) -> tuple[Any, dict]:
        """Restores the state of ``step`` into the shapes and shardings of ``like``.

        A params-only checkpoint (``protlm import-hf``) gives ``like`` with its
        params and step replaced; the optimizer state stays ``like``'s fresh one.
        """
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore()))["metadata"])
        if meta.get("params_only"):
            return self._restore_params_only(step, like, meta), meta
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), metadata=ocp.args.JsonRestore()))
        return out["state"], dict(out["metadata"])

    def restore_params(self, step: int, like: Any) -> tuple[Any, dict]:
        """``like`` with the params (and step) of ``step``; the optimizer state
        on disk is never read, so evaluation needs no optimizer settings."""
        meta = dict(self._manager.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore()))["metadata"])
        return self._restore_params_only(step, like, meta), meta

    def _restore_params_only(self, step: int, like: Any, meta: dict) -> Any:
        where = os.path.join(self.directory, str(step))
        if meta.get("encoder_only"):
            raise ProtlmError(f"{where}: an encoder-only checkpoint (imported from a "
                              f"T5EncoderModel): it has no decoder to train or evaluate")
        target = {"params": jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like.params)}
        restore_args = jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding),
                                    {"params": like.params})
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(item=target, restore_args=restore_args,
                                         partial_restore=True)))
        step_array = jax.device_put(jax.numpy.asarray(step, like.step.dtype),
                                    like.step.sharding)
        return like.replace(params=out["state"]["params"], step=step_array)

    def wait(self) -> None:
        """Blocks until pending asynchronous saves are complete."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


def read_params(model_dir: str, step: Optional[int] = None, *, encoder_only: bool = False,
                mesh: Optional[jax.sharding.Mesh] = None,
                rules: Optional[Sequence] = None) -> Tuple[Any, Any, dict, int]:
    """The params (only) of a MODEL_DIR checkpoint, a training state or imported.

    Reads just ``params`` (an orbax partial restore: no optimizer state) into
    their shardings on ``mesh``; the model config comes from the checkpoint's
    metadata (``model_family`` + ``model_config``; checkpoints written before
    the family was stored have it guessed from the config's fields).

    Args:
      model_dir: the MODEL_DIR (its ``checkpoints/`` folder is read).
      step: the checkpoint step; default the latest complete one.
      encoder_only: only what the family's encoder needs
        (``Family.encoder_collections``: no decoder, heads or generator).
      mesh: default the first device alone.
      rules: logical axis rules; default the 1-D set.

    Returns:
      (config, params, metadata, step).

    Raises:
      ProtlmError: no checkpoint, unknown step, metadata or params that do not
        match.
    """
    directory = os.path.join(os.path.abspath(model_dir) if "://" not in model_dir
                             else model_dir, "checkpoints")
    if "://" not in directory and not os.path.isdir(directory):
        raise ProtlmError(f"{model_dir}: no checkpoints/ folder (not a protlm MODEL_DIR)")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
    try:
        steps = sorted(manager.all_steps())
        if not steps:
            raise ProtlmError(f"{directory}: no complete checkpoint")
        step = steps[-1] if step is None else step
        if step not in steps:
            raise ProtlmError(f"{directory}: no checkpoint of step {step} (have "
                              f"{', '.join(map(str, steps))})")
        where = os.path.join(directory, str(step))
        meta = dict(manager.restore(step, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore()))["metadata"])
        config = models.config_from_dict(meta.get("model_config"), where,
                                         meta.get("model_family"))
        family = models.family_for(config)
        if meta.get("encoder_only") and not encoder_only:
            raise ProtlmError(f"{where}: an encoder-only checkpoint (imported from a "
                              f"T5EncoderModel); use it encoder-only (export-hf --encoder_only)")
        mesh = mesh if mesh is not None else partitioning.create_mesh(1, jax.devices()[:1])
        rules = rules or partitioning.standard_logical_axis_rules("1d")
        abstract = family.abstract_params(config, encoder_only=encoder_only)
        if encoder_only:
            abstract = {k: v for k, v in abstract.items() if k in family.encoder_collections}
        if meta.get("param_collections"):  # an import of part of a model (no head…)
            abstract = {k: v for k, v in abstract.items() if k in meta["param_collections"]}
        with partitioning.axis_rules(mesh, rules):
            shardings, abstract = partitioning.param_shardings(abstract, mesh, rules)
        item = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                            abstract, shardings)
        restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s), shardings)
        try:
            out = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
                item={"params": item}, restore_args={"params": restore_args},
                partial_restore=True)))
        except (ValueError, KeyError) as e:
            raise ProtlmError(f"{where}: params do not match its model_config "
                              f"({' '.join(str(e).split())[:300]})") from None
    finally:
        manager.close()
    return config, out["state"]["params"], meta, step
