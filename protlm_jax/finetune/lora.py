"""LoRA on any family's self-attention, as a transform of its parameters.

A family names its attention projections (``Family.lora_targets``: ``q``,
``k``, ``v``, ``o``, each a kernel suffix and which of its axes are the input).
For every matching kernel ``W`` (one per layer) the adapter holds

    A  [*in, r]   (Kaiming-uniform like HF PEFT's ``lora_A``)
    B  [r, *out]  (zeros: at initialisation the model is unchanged, exactly)

and the adapted model runs with ``W + (alpha / r) A B`` — the same function as
``x W + (alpha / r) (x A) B`` (Hu et al. 2021), computed inside the jitted
step, so any family's network runs unchanged and merging is the same sum
written once. The base ``W`` is a constant of the step: it is never
differentiated, never copied into optimizer state.

A and B carry logical axes: the kernel's own names on ``in``/``out`` and
``lora_rank`` (never split) on ``r``, so adapters shard like their kernels.

Why not a library: ``qwix`` intercepts the dot products of Linen modules,
which works on ``nn.Dense``-style calls but not on our einsum kernels with
several input/output axes (``[D, H, K]``) or a fused q/k/v, and gives no
logical axes; ``flax.nnx.LoRA`` is NNX only (our families are Linen);
``jax-lorax`` pins jax 0.4. This module is about 150 lines.

Shape legend: r rank; ``in``/``out`` the kernel's input / output axes.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Dict, Mapping, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from protlm_jax.errors import ProtlmError
from protlm_jax.models.family import LoraTarget, flat_paths, unflatten

RANK_AXIS = "lora_rank"


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Which projections get adapters, and their rank and scale.

    Attributes:
      rank: r.
      alpha: the scale is ``alpha / rank`` (ProtTrans' notebooks: r 4, alpha 1).
      targets: target names of the family (``q``, ``k``, ``v``, ``o``).
    """
    rank: int = 4
    alpha: float = 1.0
    targets: Tuple[str, ...] = ("q", "k", "v", "o")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


@dataclasses.dataclass(frozen=True)
class Site:
    """One adapted kernel: its path, target name and how A, B map onto it."""
    path: str
    target: str
    spec: LoraTarget
    in_shape: Tuple[int, ...]
    out_shape: Tuple[int, ...]
    in_names: Tuple[Any, ...]
    out_names: Tuple[Any, ...]


def _key(path: str) -> str:
    """Adapter dict key of a kernel path (``/`` -> ``.``: one flat level)."""
    return path.replace("/", ".")


def boxed_leaves(boxed: Any) -> Dict[str, Any]:
    """``a/b/c`` path -> leaf of a boxed tree, boxes kept (their logical names)."""
    return {"/".join(str(getattr(k, "key", k)) for k in p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(
                boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))[0]}


def sites(family_targets: Mapping[str, LoraTarget], boxed_abstract: Any,
          spec: LoraSpec) -> Dict[str, Site]:
    """Every kernel of ``boxed_abstract`` (an encoder view's boxed params) the
    spec adapts, keyed by adapter key.

    Raises:
      ProtlmError: a target the family does not have, or one that matches no
        parameter.
    """
    unknown = [t for t in spec.targets if t not in family_targets]
    if unknown or not spec.targets:
        raise ProtlmError(f"--targets {','.join(spec.targets) or '(none)'}: this family "
                          f"adapts {', '.join(family_targets) or 'nothing'}")
    if spec.rank < 1:
        raise ProtlmError(f"--rank must be positive, got {spec.rank}")
    leaves = boxed_leaves(boxed_abstract)
    out: Dict[str, Site] = {}
    for target in spec.targets:
        t = family_targets[target]
        found = False
        for path, leaf in leaves.items():
            if not re.search(rf"(^|/){re.escape(t.suffix)}$", path):
                continue
            found = True
            shape = tuple(getattr(leaf, "value", leaf).shape)
            names = tuple(getattr(leaf, "names", (None,) * len(shape)))
            if t.select is not None:
                axis = t.select[0]
                shape, names = shape[:axis] + shape[axis + 1:], names[:axis] + names[axis + 1:]
            out_axes = tuple(i for i in range(len(shape)) if i not in t.in_axes)
            key = _key(path) + (f".{target}" if t.select is not None else "")
            out[key] = Site(path, target, t, tuple(shape[i] for i in t.in_axes),
                            tuple(shape[i] for i in out_axes),
                            tuple(names[i] for i in t.in_axes), tuple(names[i] for i in out_axes))
        if not found:
            raise ProtlmError(f"LoRA target {target!r} ({t.suffix}) matches no parameter")
    return out


def abstract_adapters(sites_: Mapping[str, Site], spec: LoraSpec) -> Dict[str, Any]:
    """Boxed ``ShapeDtypeStruct``s of the adapters (for shardings and counts)."""
    def box(shape, names):
        return nn.Partitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names=names)
    return {k: {"a": box(s.in_shape + (spec.rank,), s.in_names + (RANK_AXIS,)),
                "b": box((spec.rank,) + s.out_shape, (RANK_AXIS,) + s.out_names)}
            for k, s in sites_.items()}


def count(sites_: Mapping[str, Site], spec: LoraSpec) -> int:
    """Adapter parameters: ``sum over kernels of r (prod(in) + prod(out))``."""
    return sum(spec.rank * (math.prod(s.in_shape) + math.prod(s.out_shape))
               for s in sites_.values())


def init_adapters(sites_: Mapping[str, Site], spec: LoraSpec, rng: jax.Array) -> Dict[str, Any]:
    """A ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)) (PEFT's Kaiming-uniform, a = sqrt 5),
    B = 0."""
    out = {}
    for i, (k, s) in enumerate(sorted(sites_.items())):
        fan_in = math.prod(s.in_shape)
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(jax.random.fold_in(rng, i), s.in_shape + (spec.rank,),
                               jnp.float32, -bound, bound)
        out[k] = {"a": a, "b": jnp.zeros((spec.rank,) + s.out_shape, jnp.float32)}
    return out


def delta(site: Site, a: jax.Array, b: jax.Array, scale: float) -> jax.Array:
    """``scale * A B`` laid out like the (sliced) kernel."""
    n_in = len(site.in_shape)
    d = scale * jnp.tensordot(a, b, axes=[[n_in], [0]])  # [*in, *out]
    order = list(site.spec.in_axes) + [i for i in range(n_in + len(site.out_shape))
                                       if i not in site.spec.in_axes]
    return jnp.transpose(d, np.argsort(order))


def apply(params: Mapping[str, Any], adapters: Mapping[str, Any],
          sites_: Mapping[str, Site], spec: LoraSpec) -> Dict[str, Any]:
    """``params`` with every adapted kernel replaced by ``W + scale A B``."""
    flat = flat_paths(params)
    for k, site in sites_.items():
        w = flat[site.path]
        d = delta(site, adapters[k]["a"], adapters[k]["b"], spec.scale).astype(w.dtype)
        if site.spec.select is None:
            flat[site.path] = w + d
        else:
            axis, index = site.spec.select
            flat[site.path] = jnp.asarray(w).at[(slice(None),) * axis + (index,)].add(d)
    return unflatten(flat)


def spec_to_json(spec: LoraSpec) -> Dict[str, Any]:
    return {"rank": spec.rank, "alpha": spec.alpha, "targets": list(spec.targets)}


def spec_from_json(d: Mapping[str, Any]) -> LoraSpec:
    return LoraSpec(int(d["rank"]), float(d["alpha"]), tuple(d["targets"]))


def check_targets(names: Sequence[str]) -> Tuple[str, ...]:
    """``"q,k,v,o"`` style names, de-duplicated in order."""
    out = []
    for n in names:
        n = n.strip()
        if n and n not in out:
            out.append(n)
    return tuple(out)
