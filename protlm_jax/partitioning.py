"""Partitioning: logical axis rules, meshes and sharded jit on ``jax.sharding``.

Models name every weight and activation dimension with a *logical* axis
(``batch, length, embed, mlp, heads, kv, joined_kv, vocab, relpos_buckets,
layers, lora_rank``) and never mention the mesh. This module owns the one place where
logical names meet the device mesh ``("data", "model")``:

* ``standard_logical_axis_rules`` gives the T5X-style rule sets ("1d", "2d").
* ``create_mesh`` builds the ``(data, model)`` mesh over all global devices.
* ``logical_to_mesh_axes`` / ``logical_to_sharding`` / ``param_shardings``
  resolve logical specs to ``NamedSharding`` trees, failing loudly on unknown
  names and on dimensions the mesh cannot split evenly.
* ``sharded_init`` initialises parameters directly into their shards
  (``eval_shape`` -> specs -> ``jit(init, out_shardings=...)``); nothing is
  materialised on one device first.
* ``axis_rules`` and ``partitioned_jit`` make the models'
  ``nn.with_logical_constraint`` calls bind to the mesh while tracing.
* ``batch_sharding``, ``process_data_slice`` and ``host_local_to_global``
  turn each process's slice of a batch into one global ``jax.Array``.
* ``describe`` prints a per-parameter table (shape, spec, bytes per device).

Rule resolution follows flax: for each array, rules are tried in order and a
logical axis takes the first rule whose mesh axis is not already used by
another dimension of the same array; a logical axis with no usable rule is
replicated.
"""

import contextlib
import functools
import math
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from flax.core import meta
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from protlm_jax.errors import ProtlmError

# The mesh axes, outermost first. "data" is outermost so that on multi-host
# machines one process's devices tend to share data-axis positions (each
# process then reads a contiguous slice of the batch).
MESH_AXES = ("data", "model")

# Every logical axis name the models use.
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "joined_kv",
                "vocab", "relpos_buckets", "layers", "lora_rank")

LogicalRules = tuple[tuple[str, Optional[str]], ...]


class PartitioningError(ProtlmError, ValueError):
    """A mesh or sharding that cannot work (bad sizes, unknown axis names)."""


# ------------------------------------------------------------------ rules ---

def standard_logical_axis_rules(rule_set: str = "1d") -> LogicalRules:
    """T5X-style logical-to-mesh axis rules.

    "1d" is T5X's standard model parallelism (Megatron-style): the batch is
    split over "data"; the wide axes of the feed-forward and attention blocks
    (mlp, heads, joined_kv) and the vocabulary over "model"; everything else
    is replicated. Parameters are therefore replicated over "data" (plain data
    parallelism across that axis).

    "2d" additionally splits the parameters' ``embed`` axis over "data", so
    every large weight is split over both mesh axes (ZeRO-3/FSDP-like memory
    savings; XLA all-gathers the weight over "data" before use). The rule
    ``embed -> data`` comes *after* ``batch -> data``: in an activation such
    as ``(batch, length, embed)`` "data" is already taken by ``batch``, so
    ``embed`` stays replicated and activations keep the 1-D layout. In
    parameters (which have no batch axis) ``embed`` gets "data".

    Args:
      rule_set: "1d" or "2d".

    Returns:
      A tuple of ``(logical_axis, mesh_axis_or_None)`` pairs, in priority
      order, covering every name in ``LOGICAL_AXES``.

    Raises:
      PartitioningError: for an unknown ``rule_set``.
    """
    if rule_set == "1d":
        return (
            # Data parallelism: each data-axis row of the mesh sees its own
            # slice of the batch.
            ("batch", "data"),
            # Vocab-parallel embedding and logits: the largest matrices in
            # small protein LMs; the softmax reduces over "model".
            ("vocab", "model"),
            # Megatron feed-forward: first matmul column-split, second
            # row-split, one all-reduce per block.
            ("mlp", "model"),
            # Attention heads are independent: split them, no communication
            # until the output projection.
            ("heads", "model"),
            # Fused heads*kv projections follow the heads split.
            ("joined_kv", "model"),
            # The residual stream is contracted by every layer; splitting it
            # would add communication to every matmul.
            ("embed", None),
            # Per-head width is small; heads already carry the split.
            ("kv", None),
            # Sequences are short relative to the model; no sequence
            # parallelism.
            ("length", None),
            # Scanned layer stacks are indexed one layer at a time.
            ("layers", None),
            # The relative-position bias table is tiny.
            ("relpos_buckets", None),
            # LoRA's rank (4, 8, ...) is too small to split.
            ("lora_rank", None),
        )
    if rule_set == "2d":
        one_d = standard_logical_axis_rules("1d")
        rules = [r for r in one_d if r[0] != "embed"]
        # Parameters' embed axis over "data" (2-D parameter sharding). Must
        # come after ("batch", "data") so activations' batch wins "data".
        rules.insert(rules.index(("batch", "data")) + 1, ("embed", "data"))
        return tuple(rules)
    raise PartitioningError(
        f"unknown rule_set {rule_set!r}: expected '1d' or '2d'")


def _check_names(logical_axes: Sequence[Any], rules: LogicalRules,
                 where: str = "") -> None:
    """Raises if a logical name in ``logical_axes`` has no rule."""
    known = {name for name, _ in rules}
    unknown = [n for n in logical_axes if isinstance(n, str) and n not in known]
    if unknown:
        raise PartitioningError(
            f"unknown logical axis name(s) {unknown}{where}; the rules know "
            f"{sorted(known)} (add a rule, e.g. ({unknown[0]!r}, None))")


def logical_to_mesh_axes(logical_axes: Optional[Sequence[Optional[str]]],
                         rules: LogicalRules) -> PartitionSpec:
    """Resolves one logical spec to a mesh ``PartitionSpec``.

    Args:
      logical_axes: one logical name (or None) per array dimension, e.g.
        ``PartitionSpec("batch", "length", "embed")``; None means replicated.
      rules: logical-to-mesh rules, e.g. ``standard_logical_axis_rules()``.

    Returns:
      The mesh-axis ``PartitionSpec`` (``PartitionSpec()`` for None).

    Raises:
      PartitioningError: if a logical name has no rule.
    """
    if logical_axes is None:
        return PartitionSpec()
    logical_axes = tuple(logical_axes)
    _check_names(logical_axes, rules)
    return nn.logical_to_mesh_axes(logical_axes, rules)


def logical_to_sharding(logical_spec_tree: Any, mesh: Mesh,
                        rules: LogicalRules) -> Any:
    """Maps a tree of logical ``PartitionSpec``s to ``NamedSharding``s.

    Args:
      logical_spec_tree: a pytree whose leaves are logical ``PartitionSpec``s
        or None (None -> replicated).
      mesh: the device mesh.
      rules: logical-to-mesh rules.

    Returns:
      A tree of the same structure with ``NamedSharding`` leaves.

    Raises:
      PartitioningError: naming the tree path of a spec with an unknown name.
    """
    def one(path, spec):
        where = f" at {jax.tree_util.keystr(path)}" if path else ""
        if spec is not None:
            _check_names(tuple(spec), rules, where)
        return NamedSharding(mesh, logical_to_mesh_axes(spec, rules))

    return jax.tree_util.tree_map_with_path(
        one, logical_spec_tree,
        is_leaf=lambda x: x is None or isinstance(x, PartitionSpec))


def _unbox(tree: Any) -> Any:
    """Strips flax ``AxisMetadata`` boxes without adding sharding constraints.

    ``meta.unbox`` would call ``with_sharding_constraint`` whenever a mesh is
    set, which fails on the ``ShapeDtypeStruct``s of ``eval_shape``; the
    explicit ``out_shardings`` already place the values.
    """
    def strip(x):
        while isinstance(x, meta.AxisMetadata):
            x = (x.unbox(apply_constraint=False)
                 if isinstance(x, nn.Partitioned) else x.unbox())
        return x

    return jax.tree_util.tree_map(
        strip, tree, is_leaf=lambda x: isinstance(x, meta.AxisMetadata))


def _check_divisible(shardings: Any, shapes: Any) -> None:
    """Raises, naming the parameter, if a sharded dim cannot split evenly."""
    def one(path, sharding, shape):
        for dim, (size, axes) in enumerate(
                zip(shape.shape, tuple(sharding.spec))):
            if axes is None:
                continue
            axes = (axes,) if isinstance(axes, str) else tuple(axes)
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % parts:
                raise PartitioningError(
                    f"{jax.tree_util.keystr(path)}: dimension {dim} of shape "
                    f"{tuple(shape.shape)} is split over mesh axes {axes} "
                    f"({parts} ways) but {size} is not divisible by {parts}; "
                    "pad it (e.g. the vocabulary to a multiple of 128) or "
                    "change model_parallel_size")

    jax.tree_util.tree_map_with_path(one, shardings, shapes)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh,
                    rules: LogicalRules) -> tuple[Any, Any]:
    """Shardings for the output of ``jax.eval_shape(model.init, ...)``.

    Args:
      abstract_boxed_params: a variables tree whose leaves are
        ``ShapeDtypeStruct``s, some wrapped in ``nn.LogicallyPartitioned``
        boxes (from ``nn.with_logical_partitioning``). Unboxed leaves are
        replicated.
      mesh: the device mesh.
      rules: logical-to-mesh rules.

    Returns:
      ``(shardings, abstract)``: a ``NamedSharding`` tree and the unboxed
      ``ShapeDtypeStruct`` tree, with the same structure.

    Raises:
      PartitioningError: for unknown logical names, or a sharded dimension
        that the mesh does not divide evenly (the message names the param).
    """
    logical_specs = nn.get_partition_spec(abstract_boxed_params)
    shardings = logical_to_sharding(logical_specs, mesh, rules)
    abstract = _unbox(abstract_boxed_params)
    _check_divisible(shardings, abstract)
    return shardings, abstract


# ------------------------------------------------------------------- mesh ---

def create_mesh(model_parallel_size: int = 1,
                devices: Optional[Sequence[Any]] = None) -> Mesh:
    """Builds the ``("data", "model")`` mesh.

    Args:
      model_parallel_size: size of the "model" axis; the "data" axis gets the
        remaining ``n_devices // model_parallel_size``.
      devices: the devices to use; defaults to ``jax.devices()`` (all global
        devices, so every process builds the same mesh on multi-host).

    Returns:
      A ``jax.sharding.Mesh`` of shape ``(n_devices // model_parallel_size,
      model_parallel_size)``.

    Raises:
      PartitioningError: if ``model_parallel_size`` is not a positive divisor
        of the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    if model_parallel_size < 1 or n % model_parallel_size:
        raise PartitioningError(
            f"model_parallel_size={model_parallel_size} must be a positive "
            f"divisor of the number of devices ({n})")
    shape = (n // model_parallel_size, model_parallel_size)
    try:
        # Topology-aware on TPU: "model" (the innermost, chattiest axis) is
        # laid out over physically adjacent chips.
        grid = mesh_utils.create_device_mesh(shape, devices=devices)
    except (ValueError, NotImplementedError, AssertionError, KeyError):
        # Unknown topologies or shapes it cannot map: device order is fine on
        # CPU/GPU, where all devices of a host are equally connected.
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return Mesh(grid, MESH_AXES)


# ------------------------------------------------------- rules in context ---

@contextlib.contextmanager
def axis_rules(mesh: Mesh, rules: LogicalRules) -> Iterator[None]:
    """Context in which ``nn.with_logical_constraint`` binds to ``mesh``.

    Sets flax's logical axis rules and makes ``mesh`` the current mesh
    (``jax.set_mesh``; the older ``with mesh:`` is deprecated in jax 0.10 and
    does not set the abstract mesh that flax checks, so constraints would be
    silently dropped). Enter it outside ``jax.jit``, around the call that
    traces.

    Args:
      mesh: the device mesh.
      rules: logical-to-mesh rules.

    Yields:
      None.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield


def sharded_init(init_fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                 *args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """Initialises variables straight into their shards.

    ``eval_shape`` gives the boxed abstract variables, their logical specs
    resolve to ``NamedSharding``s, and ``jit(init_fn, out_shardings=...)``
    makes each device compute only its own shard.

    Args:
      init_fn: e.g. ``model.init``; returns a variables tree that may contain
        ``nn.LogicallyPartitioned`` boxes.
      mesh: the device mesh.
      rules: logical-to-mesh rules.
      *args: traced arguments of ``init_fn`` (rngs, example inputs).
      **kwargs: passed as Python values, not traced (e.g. ``train=False``).

    Returns:
      ``(variables, shardings)``: the unboxed variables (``jax.Array``s, each
      with its ``NamedSharding``) and the sharding tree.
    """
    def unboxed_init(*a):
        return _unbox(init_fn(*a, **kwargs))

    with axis_rules(mesh, rules):
        boxed = jax.eval_shape(functools.partial(init_fn, **kwargs), *args)
        shardings, _ = param_shardings(boxed, mesh, rules)
        variables = jax.jit(unboxed_init, out_shardings=shardings)(*args)
    return variables, shardings


class _PartitionedFunction:
    """A jitted function that is always traced under ``axis_rules``."""

    def __init__(self, fn: Callable[..., Any], jitted: Any, mesh: Mesh,
                 rules: LogicalRules):
        functools.update_wrapper(self, fn)
        self.jitted = jitted
        self.mesh = mesh
        self.rules = rules

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with axis_rules(self.mesh, self.rules):
            return self.jitted(*args, **kwargs)

    def lower(self, *args: Any, **kwargs: Any) -> Any:
        """``jax.jit(...).lower`` under the axis rules (for cost/memory)."""
        with axis_rules(self.mesh, self.rules):
            return self.jitted.lower(*args, **kwargs)


def partitioned_jit(fn: Callable[..., Any], mesh: Mesh, rules: LogicalRules,
                    in_shardings: Any, out_shardings: Any,
                    donate_argnums: Sequence[int] = (),
                    static_argnums: Sequence[int] = ()) -> Callable[..., Any]:
    """Jits ``fn`` with explicit shardings, tracing it under the axis rules.

    Args:
      fn: the step function.
      mesh: the device mesh.
      rules: logical-to-mesh rules; the models' logical constraints inside
        ``fn`` resolve with them.
      in_shardings: ``NamedSharding`` tree (prefix) for the positional args.
      out_shardings: ``NamedSharding`` tree (prefix) for the outputs.
      donate_argnums: args whose buffers may be reused (e.g. the train state).
      static_argnums: args passed as Python values (recompiles per value).

    Returns:
      A callable with ``fn``'s signature, plus ``.lower(...)`` and
      ``.jitted`` (the underlying ``jax.jit`` object). Call it outside jit.
    """
    jitted = jax.jit(fn, in_shardings=in_shardings,
                     out_shardings=out_shardings,
                     donate_argnums=tuple(donate_argnums),
                     static_argnums=tuple(static_argnums))
    return _PartitionedFunction(fn, jitted, mesh, rules)


# ------------------------------------------------------------------- data ---

def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of input batches: leading (batch) dim over "data".

    Other dims are replicated: model-parallel devices of one data row all
    need the same examples.

    Args:
      mesh: the device mesh.

    Returns:
      ``NamedSharding(mesh, PartitionSpec("data"))``.
    """
    return NamedSharding(mesh, PartitionSpec("data"))


def process_data_slice(global_batch_size: int,
                       mesh: Optional[Mesh] = None) -> tuple[int, int]:
    """The rows of the global batch this process must read.

    Args:
      global_batch_size: examples per step over all processes.
      mesh: if given, the rows are those that this process's devices hold
        under ``batch_sharding(mesh)`` (correct even when the "model" axis
        spans processes, which then read the same rows). Without it, rows are
        split evenly in ``jax.process_index()`` order.

    Returns:
      ``(start, size)``: read rows ``[start, start + size)``.

    Raises:
      PartitioningError: if the batch does not split evenly, or the mesh gives
        this process non-contiguous rows.
    """
    if mesh is None:
        count = jax.process_count()
        if global_batch_size % count:
            raise PartitioningError(
                f"global batch size {global_batch_size} is not divisible by "
                f"the number of processes ({count})")
        per_process = global_batch_size // count
        return jax.process_index() * per_process, per_process
    data = mesh.shape["data"]
    if global_batch_size % data:
        raise PartitioningError(
            f"global batch size {global_batch_size} is not divisible by the "
            f"mesh's data axis ({data})")
    index_map = batch_sharding(mesh).addressable_devices_indices_map(
        (global_batch_size,))
    rows = sorted({(s[0].start or 0,
                    global_batch_size if s[0].stop is None else s[0].stop)
                   for s in index_map.values()})
    for (_, stop), (start, _) in zip(rows, rows[1:]):
        if start != stop:
            raise PartitioningError(
                f"process {jax.process_index()} holds non-contiguous batch "
                f"rows {rows}; build the mesh so that each process's devices "
                "are adjacent on the data axis")
    return rows[0][0], rows[-1][1] - rows[0][0]


def host_local_to_global(batch: Mapping[str, np.ndarray], mesh: Mesh,
                         global_batch_size: Optional[int] = None
                         ) -> dict[str, jax.Array]:
    """Assembles each process's rows into global arrays sharded over "data".

    Args:
      batch: this process's rows (see ``process_data_slice``), feature name
        to array with a leading batch dim.
      mesh: the device mesh.
      global_batch_size: the global leading dim; inferred from the sharding
        (uniform split over processes) when None.

    Returns:
      Feature name to ``jax.Array`` with ``batch_sharding(mesh)``.
    """
    sharding = batch_sharding(mesh)
    out = {}
    for name, local in batch.items():
        local = np.asarray(local)
        global_shape = (None if global_batch_size is None
                        else (global_batch_size,) + local.shape[1:])
        out[name] = jax.make_array_from_process_local_data(
            sharding, local, global_shape)
    return out


# --------------------------------------------------------------- describe ---

def _format_bytes(n: float) -> str:
    if n < 1024:
        return f"{n:.0f} B"
    for unit in ("KiB", "MiB", "GiB"):
        n /= 1024
        if n < 1024 or unit == "GiB":
            break
    return f"{n:.1f} {unit}"


def describe(mesh: Mesh, shardings: Any, abstract_params: Any) -> str:
    """A text table of parameters: path, shape, dtype, spec, bytes/device.

    Args:
      mesh: the device mesh.
      shardings: ``NamedSharding`` tree (from ``param_shardings``).
      abstract_params: matching tree of arrays or ``ShapeDtypeStruct``s.

    Returns:
      The table, one parameter per line, then totals (parameter count,
      bytes in all, bytes per device).
    """
    rows = []
    total_params = total_bytes = per_device = 0
    leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
    sharding_leaves = jax.tree_util.tree_leaves(shardings)
    for (path, leaf), sharding in zip(leaves, sharding_leaves, strict=True):
        shape = tuple(leaf.shape)
        itemsize = np.dtype(leaf.dtype).itemsize
        shard = math.prod(sharding.shard_shape(shape)) * itemsize
        total_params += math.prod(shape)
        total_bytes += math.prod(shape) * itemsize
        per_device += shard
        spec = ", ".join("-" if a is None else str(a) for a in sharding.spec)
        rows.append((jax.tree_util.keystr(path), str(shape),
                     str(np.dtype(leaf.dtype)), f"({spec})",
                     _format_bytes(shard)))
    header = ("param", "shape", "dtype", "spec", "bytes/device")
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(5)]
    mesh_desc = ", ".join(f"{k}={v}" for k, v in mesh.shape.items())
    lines = [f"mesh ({mesh_desc}), {mesh.size} devices"]
    for r in [header] + rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    lines.append(f"total: {total_params:,} params, "
                 f"{_format_bytes(total_bytes)}; "
                 f"{_format_bytes(per_device)} per device")
    return "\n".join(lines)
