"""Checkpoints with orbax: period, keep-N, async, exact resume.

A checkpoint holds the whole train state (parameters, optimizer state, step)
plus JSON metadata (data position, seed, configs). Randomness is derived from
(seed, step), so parameters + step + data position are all a resumed run needs
to continue exactly. Orbax writes each step into a temporary folder and renames
it once complete; ``latest_step`` only sees finished ones, so a checkpoint cut
short by a kill is never picked up.

Integrity: once a step is committed, ``checkpoints/<step>.sha256.json`` records
the size and sha256 of every file in it. Restoring verifies them first; a step
that does not verify (a flipped byte, a truncated or deleted file, garbage
metadata) is never loaded: the newest step that verifies is used instead, with
a warning naming the skipped one, and an explicit ``--step`` that does not
verify stops with one line. Folders written before digests existed (no digest
file at all) are read as before, a step orbax cannot read counting as damaged.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import orbax.checkpoint as ocp

from protlm_jax import errors, models, partitioning
from protlm_jax.data.fetch import sha256_file
from protlm_jax.errors import ProtlmError

log = logging.getLogger(__name__)

DIGEST_SUFFIX = ".sha256.json"
DAMAGED_SUFFIX = ".damaged"


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {errors.one_line(e, 200)}"


def _local(directory: str) -> bool:
    return "://" not in directory


def _file_digests(step_dir: str) -> dict:
    out = {}
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            out[os.path.relpath(path, step_dir)] = [os.path.getsize(path), sha256_file(path)]
    return dict(sorted(out.items()))


def write_digest(directory: str, step: int) -> None:
    """Records size + sha256 of every file of a committed step (atomically)."""
    if not _local(directory):
        return
    path = os.path.join(directory, f"{step}{DIGEST_SUFFIX}")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"step": step, "files": _file_digests(os.path.join(directory, str(step)))}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _digests_in_use(directory: str) -> bool:
    return _local(directory) and os.path.isdir(directory) and any(
        n.endswith(DIGEST_SUFFIX) for n in os.listdir(directory))


def verify(directory: str, step: int) -> Tuple[Optional[str], bool]:
    """(reason the step is damaged or None, whether a digest vouched for it)."""
    if not _local(directory):
        return None, False
    path = os.path.join(directory, f"{step}{DIGEST_SUFFIX}")
    if not os.path.isfile(path):
        return ("no digest (written without one, or cut short before it)"
                if _digests_in_use(directory) else None), False
    try:
        with open(path) as f:
            recorded = json.load(f)["files"]
        recorded = {str(k): (int(v[0]), str(v[1])) for k, v in recorded.items()}
    except (OSError, ValueError, KeyError, TypeError, IndexError, AttributeError) as e:
        return f"its digest {os.path.basename(path)} is unreadable ({_short(e)})", False
    step_dir = os.path.join(directory, str(step))
    try:
        have = {k: (v[0], v[1]) for k, v in _file_digests(step_dir).items()}
    except OSError as e:
        return f"cannot be read ({_short(e)})", False
    for name, (size, digest) in recorded.items():
        if name not in have:
            return f"file {name} is missing", False
        if have[name][0] != size:
            return f"file {name} has {have[name][0]:,} bytes, {size:,} were written", False
        if have[name][1] != digest:
            return f"file {name} does not match its sha256", False
    extra = sorted(set(have) - set(recorded))
    if extra:
        return f"file {extra[0]} was not written with it", False
    return None, True


def restore_verified(directory: str, steps: Sequence[int], step: Optional[int],
                     restore: Callable[[int], Any]) -> Tuple[Any, int, list]:
    """``restore(s)`` for the newest step ``s`` that verifies (or exactly ``step``).

    Returns:
      (what ``restore`` returned, the step, the steps skipped as damaged).

    Raises:
      ProtlmError: ``step`` given and damaged; no step verifies; a verified
        step that does not fit what it is restored into.
    """
    if not steps:
        raise ProtlmError(f"{directory}: no complete checkpoint")
    if step is not None and step not in steps:
        raise ProtlmError(f"{directory}: no checkpoint of step {step} (have "
                          f"{', '.join(map(str, sorted(steps)))})")
    skipped, reasons = [], []
    for s in ([step] if step is not None else sorted(steps, reverse=True)):
        where = os.path.join(directory, str(s))
        reason, vouched = verify(directory, s)
        if reason is None:
            try:
                return restore(s), s, skipped
            except ProtlmError:
                raise
            except Exception as e:  # noqa: BLE001  orbax/TensorStore/JSON: any unreadable part
                if vouched:  # intact files: the run asks for another shape
                    raise ProtlmError(f"{where}: does not fit this model ({_short(e)})") from None
                reason = f"cannot be read ({_short(e)})"
        if step is not None:
            raise ProtlmError(f"{where}: damaged checkpoint: {reason}")
        log.warning("%s: damaged checkpoint skipped: %s", where, reason)
        skipped.append(s)
        reasons.append(f"step {s}: {reason}")
    raise ProtlmError(f"{directory}: no checkpoint verifies ({'; '.join(reasons)})")


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
        self._async = async_save
        self._undigested: list[int] = []

    def latest_step(self) -> Optional[int]:
        """The newest complete checkpoint's step, or None."""
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self._manager.all_steps())

    def save(self, step: int, state: Any, metadata: dict) -> None:
        """Starts saving ``state`` (asynchronously when enabled).

        A failed save (a full disk, say) raises here or, asynchronous, at the
        next :meth:`check`, save, wait or close; its partial files are removed.
        """
        self._settle()
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), metadata=ocp.args.JsonSave(metadata)))
        except BaseException:
            self._remove_partial()
            raise
        self._undigested.append(step)
        if not self._async:
            self._settle()

    def check(self) -> None:
        """Raises the error of a failed asynchronous save now (the trainer calls
        this at every log line), after removing its partial files."""
        try:
            self._manager.check_for_errors()
        except BaseException:
            self._remove_partial()
            raise

    def _remove_partial(self) -> None:
        """Removes orbax's temporary folders of unfinished saves (chief only)."""
        if jax.process_index() != 0 or not _local(self.directory) \
                or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if ".orbax-checkpoint-tmp" in name:
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)

    def _settle(self) -> None:
        """Waits for pending saves, then writes their digests (chief only) and
        drops the digests of steps orbax has since deleted (keep-N)."""
        if not self._undigested:
            return
        try:
            self._manager.wait_until_finished()
        except BaseException:
            self._undigested = []
            self._remove_partial()
            raise
        if jax.process_index() == 0 and _local(self.directory):
            kept = set(self._manager.all_steps())
            for step in self._undigested:
                if step in kept:
                    write_digest(self.directory, step)
            for name in os.listdir(self.directory):
                if name.endswith(DIGEST_SUFFIX) and name[:-len(DIGEST_SUFFIX)].isdigit() \
                        and int(name[:-len(DIGEST_SUFFIX)]) not in kept:
                    os.remove(os.path.join(self.directory, name))
        self._undigested = []

    def restore_latest(self, like: Any, *, params_only: bool = False,
                       step: Optional[int] = None) -> Optional[tuple[Any, dict, int]]:
        """(state, metadata, step) of the newest step that verifies (or ``step``),
        or None when there is no checkpoint; see :func:`restore_verified`.

        Damaged steps are moved aside to ``<step>.damaged`` (with their digest),
        so that training can write that step again.
        """
        steps = self.all_steps()
        if not steps and step is None:
            return None
        fn = self.restore_params if params_only else self.restore
        (state, meta), found, skipped = restore_verified(
            self.directory, steps, step, lambda s: fn(s, like))
        if skipped and not params_only and jax.process_index() == 0 and _local(self.directory):
            for s in skipped:
                base = os.path.join(self.directory, str(s))
                os.replace(base, base + DAMAGED_SUFFIX)
                if os.path.exists(base + DIGEST_SUFFIX):
                    os.replace(base + DIGEST_SUFFIX, base + DAMAGED_SUFFIX + DIGEST_SUFFIX)
            self._manager.reload()
        return state, meta, found

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
        """Blocks until pending asynchronous saves are complete (digests written)."""
        self._manager.wait_until_finished()
        self._settle()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._settle()
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

    def restore(s: int):
        where = os.path.join(directory, str(s))
        meta = dict(manager.restore(s, args=ocp.args.Composite(
            metadata=ocp.args.JsonRestore()))["metadata"])
        config = models.config_from_dict(meta.get("model_config"), where,
                                         meta.get("model_family"))
        family = models.family_for(config)
        if meta.get("encoder_only") and not encoder_only:
            raise ProtlmError(f"{where}: an encoder-only checkpoint (imported from a "
                              f"T5EncoderModel); use it encoder-only (export-hf --encoder_only)")
        abstract = family.abstract_params(config, encoder_only=encoder_only)
        if encoder_only:
            abstract = {k: v for k, v in abstract.items() if k in family.encoder_collections}
        if meta.get("param_collections"):  # an import of part of a model (no head…)
            abstract = {k: v for k, v in abstract.items() if k in meta["param_collections"]}
        with partitioning.axis_rules(mesh, rules):
            shardings, abstract = partitioning.param_shardings(abstract, mesh, rules)
        item = jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                            abstract, shardings)
        restore_args = jax.tree.map(lambda sh: ocp.ArrayRestoreArgs(sharding=sh), shardings)
        out = manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item={"params": item}, restore_args={"params": restore_args},
            partial_restore=True)))
        return config, out["state"]["params"], meta

    mesh = mesh if mesh is not None else partitioning.create_mesh(1, jax.devices()[:1])
    rules = rules or partitioning.standard_logical_axis_rules("1d")
    try:
        (config, params, meta), step, _ = restore_verified(
            directory, sorted(manager.all_steps()), step, restore)
    finally:
        manager.close()
    return config, params, meta, step
