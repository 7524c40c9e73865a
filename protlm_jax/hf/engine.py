"""The one Hugging Face engine: key tables, transforms, check, assembly, export.

A family's Hugging Face module (``hf/t5.py``, ``hf/bert.py``) holds only its
:class:`KeyTable` (HF name pattern <-> our param path, and how the array is
laid out), its config translation and its tokenizer/head rules. This module
does the rest for every family, both ways:

* :func:`expected_tensors`: every HF tensor of an architecture, with its
  shapes in both layouts, derived from our abstract params through the table
  (so a table that misses a parameter fails loudly);
* :func:`check`: a checkpoint's names and shapes against that list, reading
  no weights except those compared for tying; one line lists every missing,
  misshapen and unsupported tensor; heads we do not model are skipped with a
  warning;
* :func:`assemble`: params leaf by leaf, straight into their shardings on a
  mesh (``jax.make_array_from_callback``: each device receives only its
  shard; the host holds one parameter, or one layer stack, at a time);
* :func:`hf_tensors`: our params -> (HF name, array in HF layout), one at a
  time (a scanned stack is sliced layer by layer), in HF order.

Transforms (HF layout -> ours; the inverse on export):

  "copy"        same array                      norms, biases, embeddings
  "T"           transpose                       torch Linear [out, in] -> [in, out]
  "heads_in"    [H*K, D] -> [D, H, K]           query, key, value (or [3*H*K, D] ->
                                                [D, 3, H, K]: a fused q/k/v projection)
  "heads_bias"  [H*K] -> [H, K]                 their biases
  "heads_out"   [D, H*K] -> [H, K, D]           attention output projection
  "vocab_rows"  [V, E] -> [Vp, E]               word embeddings (zero rows pad to Vp)
  "vocab_vec"   [V] -> [Vp]                     a vocabulary bias

Shape legend: V vocab (Vp padded), E embedding, D hidden, H heads, K head size.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import jax
import numpy as np

from protlm_jax import models, partitioning
from protlm_jax.errors import ProtlmError
from protlm_jax.hf.files import listing
from protlm_jax.models.family import flat_paths, scanned_location, unflatten

log = logging.getLogger(__name__)

TRANSFORMS = ("copy", "T", "heads_in", "heads_bias", "heads_out", "vocab_rows", "vocab_vec")


# ------------------------------------------------------------ key tables ---

@dataclasses.dataclass(frozen=True)
class Rule:
    """One mapping: ``hf`` and ``ours`` are templates whose ``{name}`` fields
    are the table's placeholders; ``head``: part of a task head (left out of
    ``*Model`` checkpoints, never prefixed with the base model's name)."""
    hf: str
    ours: str
    transform: str = "copy"
    head: bool = False


class KeyTable:
    """HF tensor names <-> our parameter paths, both ways, from one rule list.

    Args:
      rules: the rules.
      placeholders: ``{field: regex}`` (a number, say) or ``{field: {hf value:
        our value}}`` (``q`` -> ``query``; several HF spellings may map to one
        of ours, and the first is written on export).
      base_prefix: the base model's name prefix (``"bert."``) that checkpoints
        with a head put before non-head tensors; names are read with or
        without it.
    """

    def __init__(self, rules: Sequence[Rule], placeholders: Optional[Mapping[str, Any]] = None,
                 base_prefix: str = ""):
        self.rules = tuple(rules)
        self.base_prefix = base_prefix
        self._values = dict(placeholders or {})
        for rule in self.rules:
            if rule.transform not in TRANSFORMS:
                raise ValueError(f"unknown transform {rule.transform!r} in {rule}")
        self._compiled = [(self._regex(r.hf, hf_side=True), self._regex(r.ours, hf_side=False), r)
                          for r in self.rules]

    def _regex(self, template: str, hf_side: bool) -> "re.Pattern":
        out, pos = [], 0
        for m in re.finditer(r"\{(\w+)\}", template):
            out.append(re.escape(template[pos:m.start()]))
            values = self._values.get(m[1], r"\d+")
            if isinstance(values, Mapping):
                alts = values.keys() if hf_side else dict.fromkeys(values.values())
                alt = "|".join(re.escape(v) for v in alts)
            else:
                alt = values
            out.append(f"(?P<{m[1]}>{alt})")
            pos = m.end()
        out.append(re.escape(template[pos:]))
        return re.compile("".join(out))

    def local(self, name: str) -> str:
        """``name`` without the base-model prefix."""
        p = self.base_prefix
        return name[len(p):] if p and name.startswith(p) else name

    def to_ours(self, name: str) -> Optional[Tuple[str, Rule]]:
        """(our unscanned path, rule) of an HF name (with or without the prefix)."""
        local = self.local(name)
        for hf_re, _, rule in self._compiled:
            m = hf_re.fullmatch(local)
            if m:
                groups = {k: (self._values[k][v] if isinstance(self._values.get(k), Mapping)
                              else v) for k, v in m.groupdict().items()}
                return rule.ours.format(**groups), rule
        return None

    def to_hf(self, path: str) -> Optional[Tuple[str, Rule]]:
        """(HF name without the prefix, rule) of our unscanned path."""
        for _, ours_re, rule in self._compiled:
            m = ours_re.fullmatch(path)
            if m:
                groups = {}
                for k, v in m.groupdict().items():
                    values = self._values.get(k)
                    groups[k] = (next(h for h, o in values.items() if o == v)
                                 if isinstance(values, Mapping) else v)
                return rule.hf.format(**groups), rule
        return None


# ------------------------------------------------------------ transforms ---

def to_ours(transform: str, w: np.ndarray, our_shape: Sequence[int]) -> np.ndarray:
    """An HF-layout array in our layout (``our_shape``: the parameter's shape)."""
    our_shape = tuple(our_shape)
    if transform == "copy":
        return w
    if transform == "T":
        return w.T
    if transform in ("heads_in", "heads_out"):
        return w.T.reshape(our_shape)
    if transform == "heads_bias":
        return w.reshape(our_shape)
    if transform == "vocab_rows":
        return np.pad(w, ((0, our_shape[0] - w.shape[0]), (0, 0)))
    if transform == "vocab_vec":
        return np.pad(w, (0, our_shape[0] - w.shape[0]))
    raise ValueError(f"unknown transform {transform!r}")


def to_hf(transform: str, w: Any, hf_shape: Sequence[int]) -> Any:
    """Our array in HF layout (``hf_shape``: the tensor's shape there)."""
    if transform == "copy":
        return w
    if transform == "T":
        return w.T
    if transform == "heads_in":   # [D, H, K] -> [H*K, D]
        return w.reshape(w.shape[0], -1).T
    if transform == "heads_bias":
        return w.reshape(-1)
    if transform == "heads_out":  # [H, K, D] -> [D, H*K]
        return w.reshape(-1, w.shape[-1]).T
    if transform in ("vocab_rows", "vocab_vec"):
        return w[:hf_shape[0]]
    raise ValueError(f"unknown transform {transform!r}")


def hf_shape(transform: str, ours: Sequence[int], vocab_size: Optional[int]) -> Tuple[int, ...]:
    """The HF shape of a tensor whose shape in our layout is ``ours``."""
    ours = tuple(ours)
    if transform == "T":
        return ours[::-1]
    if transform == "heads_in":
        return (int(np.prod(ours[1:])), ours[0])
    if transform == "heads_bias":
        return (ours[0] * ours[1],)
    if transform == "heads_out":
        return (ours[2], ours[0] * ours[1])
    if transform in ("vocab_rows", "vocab_vec"):
        return (vocab_size,) + ours[1:]
    return ours


# ------------------------------------------------- the architecture's list ---

@dataclasses.dataclass(frozen=True)
class Tensor:
    """One HF tensor of an architecture: its names, our path and both shapes."""
    name: str        # as written (with the base prefix where the layout has one)
    local: str       # without the base prefix
    path: str        # our unscanned parameter path
    transform: str
    hf_shape: Tuple[int, ...]
    our_shape: Tuple[int, ...]
    head: bool


def _natural(name: str) -> List[Any]:
    """Sort key putting ``layer.2`` before ``layer.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def expected_tensors(table: KeyTable, abstract_unscanned: Any, *,
                     vocab_size: Optional[int] = None, with_head: bool = True,
                     prefixed: bool = False) -> Dict[str, Tensor]:
    """Every HF tensor of the architecture whose (unscanned) params are given.

    Args:
      table: the family's key table.
      abstract_unscanned: our params or their abstract shapes, unscanned, as a
        tree or a flat ``a/b`` mapping (only the part one HF directory holds:
        one ELECTRA tower, say).
      vocab_size: HF rows of a padded vocabulary (``vocab_rows``/``vocab_vec``).
      with_head: include head tensors.
      prefixed: non-head names carry ``table.base_prefix`` (checkpoints with a
        head).

    Returns:
      local HF name -> :class:`Tensor`, in HF (natural) order.

    Raises:
      AssertionError: a parameter the table does not cover (a table bug).
    """
    out = {}
    for path, leaf in flat_paths(abstract_unscanned).items():
        mapped = table.to_hf(path)
        if mapped is None:
            raise AssertionError(f"the key table has no Hugging Face name for {path}")
        local, rule = mapped
        if rule.head and not with_head:
            continue
        name = (table.base_prefix + local) if prefixed and not rule.head else local
        shape = tuple(leaf.shape)
        out[local] = Tensor(name, local, path, rule.transform,
                            hf_shape(rule.transform, shape, vocab_size), shape, rule.head)
    return dict(sorted(out.items(), key=lambda kv: _natural(kv[1].name)))


# --------------------------------------------------------------- checking ---

# No size in an untrusted config.json goes above these (a 10^12-position table
# or 10^9 layers would be allocated, or traced, before any tensor is compared).
MAX_SIZE = 1 << 24
MAX_LAYERS = 1024


@dataclasses.dataclass(frozen=True)
class ConfigRules:
    """What a family's ``config.json`` values must be before anything is built.

    Attributes:
      positive: integer sizes (> 0, at most :data:`MAX_SIZE`).
      integers: other integers (or null), e.g. memory lengths, ``-1`` allowed.
      reals: finite non-negative numbers (epsilons, dropout, init ranges).
      layers: ``{key: regex}``: a layer count, at most :data:`MAX_LAYERS`,
        that must equal the count of layers present in the checkpoint: 1 +
        the largest index the regex's group 1 captures in a local tensor name
        (when any tensor matches; None: a count not tied to tensors).
    """
    positive: Tuple[str, ...] = ()
    integers: Tuple[str, ...] = ()
    reals: Tuple[str, ...] = ()
    layers: Mapping[str, Optional[str]] = dataclasses.field(default_factory=dict)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_config(hf: Mapping[str, Any], reader: Any, table: KeyTable, rules: ConfigRules, *,
                 where: str) -> None:
    """Checks an untrusted ``config.json`` against ``rules`` and the tensors of
    ``reader`` (their names read without ``table``'s base prefix).

    Only keys the file has are checked (absent ones take the family's defaults).

    Raises:
      ProtlmError: one line naming every bad value.
    """
    local_names = [table.local(n) for n in reader.keys()]
    problems = []
    for key in rules.positive:
        v = hf.get(key)
        if v is not None and not (_is_int(v) and 0 < v <= MAX_SIZE):
            problems.append(f"{key} {v!r} (an integer from 1 to {MAX_SIZE:,} is needed)")
    for key in rules.integers:
        v = hf.get(key)
        if v is not None and not (_is_int(v) and abs(v) <= MAX_SIZE):
            problems.append(f"{key} {v!r} (an integer up to {MAX_SIZE:,} or null is needed)")
    for key in rules.reals:
        v = hf.get(key)
        if key in hf and not ((_is_int(v) or isinstance(v, float)) and np.isfinite(v)
                              and v >= 0):
            problems.append(f"{key} {v!r} (a finite number >= 0 is needed)")
    for key, pattern in rules.layers.items():
        if key not in hf or hf[key] is None:
            continue
        v = hf[key]
        if not (_is_int(v) and 0 < v <= MAX_LAYERS):
            problems.append(f"{key} {v!r} (a layer count from 1 to {MAX_LAYERS} is needed)")
            continue
        if pattern is None:
            continue
        found = [int(m[1]) for m in map(re.compile(pattern).fullmatch, local_names) if m]
        if found and max(found) + 1 != v:
            problems.append(f"{key} {v} but the checkpoint holds {max(found) + 1} "
                            f"(tensors {pattern})")
    if problems:
        raise ProtlmError(f"{where}: bad config.json values: {'; '.join(problems)}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """How a family treats tensors outside its architecture's list.

    Attributes:
      label: names the model in messages ("T5", "bert", …).
      ignored: regexes of local names read past silently (buffers, unused copies).
      not_needed: local names present but not needed by this load (a T5
        decoder when loading the encoder), read past silently.
      tied: (regex of a local name, local name of the tensor it must equal):
        a tied copy (an MLM decoder of the word embeddings) is not stored.
      stand_ins: (local name, the expected local name it provides when that
        one is missing): an MLM decoder bias for the head bias.
      body: local-name prefixes inside the network: an unknown tensor there
        would change the outputs if ignored, so it is an error; other unknown
        tensors are heads we do not model, skipped with a warning.
      require_head: whether head tensors must be present; None: only when any
        is (``*Model`` checkpoints have none).
    """
    label: str
    ignored: Tuple[str, ...] = ()
    not_needed: Callable[[str], bool] = lambda local: False
    tied: Tuple[Tuple[str, str], ...] = ()
    stand_ins: Tuple[Tuple[str, str], ...] = ()
    body: Tuple[str, ...] = ()
    require_head: Optional[bool] = None


# Where one parameter comes from: (reader, HF tensor name, tensor).
Source = Tuple[Any, str, Tensor]


def check(reader: Any, table: KeyTable, expected: Mapping[str, Tensor], policy: Policy, *,
          where: str) -> Tuple[Dict[str, Source], List[str]]:
    """Checks a checkpoint's tensor names and shapes against ``expected``.

    No weights are read except tied copies and what they must equal.

    Returns:
      (our unscanned path -> source of every tensor found, names of the
      skipped tensors of heads we do not model). Heads absent from a
      ``*Model`` checkpoint are absent from the sources.

    Raises:
      ProtlmError: one line naming every missing, misshapen, unsupported or
        doubled tensor and every tied copy that differs.
    """
    found: Dict[str, str] = {}
    doubled, unsupported, skipped, tied, stand_ins = [], [], [], [], []
    for name in reader.keys():
        local = table.local(name)
        if local in expected:
            if local in found:
                doubled.append(f"{found[local]} and {name}")
            found[local] = name
            continue
        if any(re.fullmatch(p, local) for p in policy.ignored) or policy.not_needed(local):
            continue
        target = next((t for p, t in policy.tied if re.fullmatch(p, local)), None)
        if target is not None:
            tied.append((name, target))
            continue
        target = next((t for s, t in policy.stand_ins if s == local), None)
        if target is not None and target in expected:
            stand_ins.append((name, target))
            continue
        (unsupported if local.startswith(policy.body) else skipped).append(name)
    for name, target in stand_ins:
        found.setdefault(target, name)
    require_head = policy.require_head
    if require_head is None:
        require_head = any(expected[local].head for local in found)
    missing = [t.name for local, t in expected.items()
               if local not in found and (require_head or not t.head)]
    misshapen = [f"{found[local]} {list(reader.shape(found[local]))} (config: "
                 f"{list(t.hf_shape)})" for local, t in expected.items()
                 if local in found and tuple(reader.shape(found[local])) != t.hf_shape]
    for name, target in tied:
        other = found.get(target)
        if other is None:
            continue
        a, b = reader.get(name), reader.get(other)
        if a.shape != b.shape or not np.array_equal(a, b):
            unsupported.append(f"{name} (differs from {other}: untied copies are not modelled)")
    problems = []
    if missing:
        problems.append(f"missing tensors: {listing(missing)}")
    if misshapen:
        problems.append(f"wrong shapes: {listing(misshapen)}")
    if unsupported:
        problems.append(f"tensors this {policy.label} does not model: {listing(unsupported)}")
    if doubled:
        problems.append(f"tensors given twice: {listing(doubled)}")
    if problems:
        raise ProtlmError(f"{where}: checkpoint does not match its config.json: "
                          f"{'; '.join(problems)}")
    if skipped:
        log.warning("%s: skipped %d tensors of heads protlm does not model: %s", where,
                    len(skipped), listing(skipped))
    return {expected[local].path: (reader, name, expected[local])
            for local, name in found.items()}, skipped


# --------------------------------------------------------------- assembly ---

def assemble(sources: Mapping[str, Source], abstract: Any, *,
             mesh: Optional[jax.sharding.Mesh] = None,
             rules: Optional[Sequence] = None) -> Dict[str, Any]:
    """Our params, leaf by leaf, from checked sources.

    Args:
      sources: our unscanned path -> source (:func:`check`).
      abstract: boxed abstract params of the config as it will be used
        (scanned or not): the leaves to build and, with a mesh, their
        logical axes.
      mesh: the ``(data, model)`` mesh; None: float32 numpy leaves.
      rules: logical axis rules (default: the "1d" rules).

    Returns:
      The nested params dict (only the leaves ``sources`` provide).

    Raises:
      PartitioningError: a dimension the mesh's model axis does not divide.
    """
    stored = flat_paths(abstract)
    groups: Dict[str, List[Tuple[Optional[int], Source]]] = {}
    for path, source in sources.items():
        leaf, layer = scanned_location(path, stored)
        if leaf not in stored:
            raise AssertionError(f"{path} has no place in the params")
        groups.setdefault(leaf, []).append((layer, source))
    shardings: Dict[str, Any] = {}
    if mesh is not None:
        rules = rules or partitioning.standard_logical_axis_rules("1d")
        with partitioning.axis_rules(mesh, rules):
            tree, _ = partitioning.param_shardings(abstract, mesh, rules)
        shardings = flat_paths(tree)
    out: Dict[str, Any] = {}
    for leaf, parts in groups.items():
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
        arrays = [to_ours(t.transform, reader.get(name), t.our_shape)
                  for _, (reader, name, t) in parts]
        host = arrays[0] if parts[0][0] is None else np.stack(arrays)
        del arrays
        want = tuple(stored[leaf].shape)
        assert host.shape == want, (leaf, host.shape, want)
        if mesh is None:
            out[leaf] = host
        else:
            out[leaf] = jax.make_array_from_callback(host.shape, shardings[leaf],
                                                     lambda index, host=host: host[index])
    return unflatten(out)


# ----------------------------------------------------------------- export ---

def _host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as float32 numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), dtype=np.float32)


def hf_tensors(params: Any, expected: Mapping[str, Tensor]) -> Iterator[Tuple[str, np.ndarray]]:
    """Our params -> (HF name, float32 array in HF layout), one tensor at a time.

    Args:
      params: our params (numpy or jax arrays, possibly boxed), scanned or not.
      expected: the tensors to write (:func:`expected_tensors`), in order.

    Raises:
      ProtlmError: params lacking a tensor that is to be written.
    """
    flat = flat_paths(params)
    for t in expected.values():
        leaf, layer = scanned_location(t.path, flat)
        if leaf not in flat:
            raise ProtlmError(f"the params have no {t.path} (for {t.name})")
        w = flat[leaf]
        w = _host(w if layer is None else w[layer])
        yield t.name, np.ascontiguousarray(to_hf(t.transform, w, t.hf_shape))


def counting(tensors: Iterator[Tuple[str, np.ndarray]], counted: Dict[str, int]
             ) -> Iterator[Tuple[str, np.ndarray]]:
    """Passes tensors through, adding their sizes to ``counted["parameters"]``."""
    for name, w in tensors:
        counted["parameters"] = counted.get("parameters", 0) + int(w.size)
        yield name, w


@dataclasses.dataclass
class Imported:
    """A Hugging Face checkpoint as our config, params and vocabulary.

    Attributes:
      config: our config (any family).
      params: the params (only the parts the checkpoint provides).
      vocabulary: the checkpoint's own vocabulary, or None (the family's).
      architecture: the transformers class it was saved as.
      has_head: whether the training head's params are there.
      encoder_only: only what embedding needs (a ``T5EncoderModel``).
      skipped: tensors of heads we do not model.
      weights: the file kind read ("safetensors", "bin").
      metadata: family-specific entries for the MODEL_DIR's metadata.
      described: what ``import-hf`` says it read (default the architecture).
      source: family-specific entries for the metadata's ``source``.
    """
    config: Any
    params: Dict[str, Any]
    vocabulary: Any
    architecture: str
    has_head: bool
    encoder_only: bool = False
    skipped: List[str] = dataclasses.field(default_factory=list)
    weights: str = ""
    metadata: Dict[str, Any] = dataclasses.field(default_factory=dict)
    described: str = ""
    source: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def encode(self, tokens: Any) -> jax.Array:
        """Last hidden states [B, T, D] of unpacked token ids [B, T] (the tower
        the family embeds with)."""
        view = models.family_for(self.config).encoder_view(self.config, self.params)
        out = view.module("float32").apply({"params": view.params}, tokens, None, (-1,),
                                           method="encode")
        return out["representations"][-1]
