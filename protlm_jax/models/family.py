"""The model-family interface: one :class:`Family` record per family.

A family (ProtT5, ProtBert, ProtAlbert, ProtElectra, …) is one network module
that defines its ``Family`` next to its network, and one line in
:mod:`protlm_jax.models` that registers it. Everything outside ``models/`` and
the family's own Hugging Face module (``protlm_jax/hf/<family>.py``) works
through this record and never branches on a family name or config class:

* training and ``plan`` build the module and its init features, take the
  family's default objective, and count its layer stacks;
* checkpoints store ``Family.name`` and rebuild the config from it;
* embedding asks the family for an :class:`EncoderView` (which params, which
  module, how many layers) and the :class:`TokenLayout` of its inputs;
* ``import-hf``/``export-hf``/``load`` find the family's Hugging Face adapter
  (``Family.hf``) from ``config.json``'s ``model_type``.

Shape legend: B batch, T tokens, D hidden, Y requested layers.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    """Where a family's special tokens sit around the residues of one protein.

    ``prefix``/``suffix`` name vocabulary attributes holding special ids
    (``"eos_id"`` for ProtT5's ``seq </s>``; ``"CLS_ID"``, ``"SEP_ID"`` for
    ProtBert's ``[CLS] seq [SEP]``). The residues are the tokens between them;
    ``padding`` is the side padding goes ("right", or "left" as XLNet pads).
    """
    prefix: Tuple[str, ...] = ()
    suffix: Tuple[str, ...] = ()
    padding: str = "right"

    def special_ids(self, vocab: Any) -> Tuple[list, list]:
        """(prefix ids, suffix ids) of ``vocab``.

        Raises:
          ValueError: the vocabulary lacks one of the named special ids.
        """
        def ids(names):
            out = []
            for name in names:
                value = getattr(vocab, name, None)
                if value is None:
                    raise ValueError(f"the vocabulary {vocab!r} has no {name}")
                out.append(int(value))
            return out
        return ids(self.prefix), ids(self.suffix)


@dataclasses.dataclass(frozen=True)
class EncoderView:
    """What embedding needs of one model: its encoding module and params.

    Attributes:
      config: the config of the encoding stack, for inference (no dropout, no
        remat, layers unrolled so every block's output can be returned).
      params: the unscanned parameter subtree ``module`` takes.
      num_layers: N: representations are numbered 0 (embeddings) .. N (final
        output), like Hugging Face ``hidden_states``.
      max_positions: the longest input in tokens (learned positions), or None.
      make_module: ``(config) -> nn.Module`` whose ``encode(tokens, mask,
        repr_layers)`` returns ``{"representations": {layer: [B, T, D]}}``.
      chunked: ``(config, attention_chunk, mlp_chunk) -> config`` with exact
        chunked attention (and feed-forward) for long inputs.
      pad_id: the id padding positions hold.
    """
    config: Any
    params: Mapping[str, Any]
    num_layers: int
    max_positions: Optional[int]
    make_module: Callable[[Any], nn.Module]
    chunked: Callable[[Any, int, int], Any]
    pad_id: int

    def module(self, dtype: str, chunks: Optional[Tuple[int, int]] = None) -> nn.Module:
        """The encoding module at activation ``dtype``, chunked when ``chunks``."""
        cfg = self.config.replace(dtype=dtype)
        if chunks is not None:
            cfg = self.chunked(cfg, *chunks)
        return self.make_module(cfg)


@dataclasses.dataclass(frozen=True)
class LoraTarget:
    """Where one LoRA target (``q``, ``k``, ``v``, ``o``) lives in every layer.

    Attributes:
      suffix: the kernel's path inside a layer of the encoder view's params
        (``attention/query/kernel``); every ``…/layers_{i}/<suffix>`` matches.
      in_axes: the kernel's axes the projection contracts (its input); the
        other axes, in order, are its output.
      select: ``(axis, index)`` when the target is one slice of a fused kernel
        (the ``q`` of a ``[D, 3, H, K]`` q/k/v projection): the slice along
        ``axis`` at ``index``; ``in_axes`` then count the sliced kernel's axes.
    """
    suffix: str
    in_axes: Tuple[int, ...] = (0,)
    select: Optional[Tuple[int, int]] = None


@dataclasses.dataclass(frozen=True)
class DecoderView:
    """What generation needs of one auto-regressive model (pure, jittable functions).

    Attributes:
      params: the params ``start``/``step`` take.
      start: ``(params, prompt_BP, slots) -> (state, logits_BV)``: reads the
        prompt ([B, P] ids, P >= 1) into a state sized for ``slots`` tokens
        and gives the next token's logits.
      step: ``(params, state, token_B) -> (state, logits_BV)``: appends one
        token per row and gives the next logits.
      end_ids: vocabulary attributes of the ids that end a sequence (``"SEP_ID"``).
    """
    params: Mapping[str, Any]
    start: Callable[..., Tuple[Any, jax.Array]]
    step: Callable[..., Tuple[Any, jax.Array]]
    end_ids: Tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Family:
    """One model family, as the rest of the library sees it.

    Attributes:
      name: the registry key, stored in checkpoint metadata ("t5", "bert", …).
      config_class: its frozen config dataclass.
      build: ``config -> (module, init feature names)``: the training module
        and the batch features its ``init`` takes, in order.
      abstract_params: ``(config, encoder_only=False) -> boxed shapes``
        (``jax.eval_shape``; ``encoder_only``: what embedding needs).
      default_objective: ``() -> objective`` of its pretraining task.
      vocabulary: ``() -> seqio.Vocabulary`` it trains with by default.
      layout: the token layout of one protein at embedding time.
      encoder_view: ``(config, params) -> EncoderView``.
      encoder_collections: top-level params an encoder view reads (a partial
        checkpoint restore reads nothing else).
      towers: ``config -> configs`` holding dtype / remat / scan_layers.
      stack_depths: ``config -> layers per stack`` (FLOP probes).
      with_stack_depths: ``(config, depths) -> unscanned config``.
      hf_module: the module of its Hugging Face adapter (imported on use:
        transformers and torch load only when Hugging Face is used).
      hf_model_types: ``config.json`` ``model_type`` values it reads.
      presets: published (and tiny) configs by name.
      matches: ``config -> bool`` when several families share a config class
        (BERT and ALBERT: ``BertConfig.family``); default: any instance.
      decoder: ``(config, params) -> DecoderView`` of an auto-regressive
        family (``protlm generate``); None: the family does not generate.
      lora_targets: the self-attention projections LoRA may adapt, by their
        conventional names (``q``, ``k``, ``v``, ``o``), in the encoder view's
        params (``protlm finetune``).
    """
    name: str
    config_class: type
    build: Callable[[Any], Tuple[nn.Module, Tuple[str, ...]]]
    abstract_params: Callable[..., Any]
    default_objective: Callable[[], Any]
    vocabulary: Callable[[], Any]
    layout: TokenLayout
    encoder_view: Callable[[Any, Mapping[str, Any]], EncoderView]
    encoder_collections: Tuple[str, ...]
    towers: Callable[[Any], Tuple[Any, ...]]
    stack_depths: Callable[[Any], Tuple[int, ...]]
    with_stack_depths: Callable[[Any, Sequence[int]], Any]
    hf_module: str
    hf_model_types: Tuple[str, ...]
    presets: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    matches: Optional[Callable[[Any], bool]] = None
    decoder: Optional[Callable[[Any, Mapping[str, Any]], DecoderView]] = None
    lora_targets: Mapping[str, LoraTarget] = dataclasses.field(default_factory=dict)

    def hf(self) -> Any:
        """The family's Hugging Face adapter module (``protlm_jax.hf.<family>``)."""
        return importlib.import_module(self.hf_module)

    def accepts(self, config: Any) -> bool:
        """Whether ``config`` is a config of this family."""
        return isinstance(config, self.config_class) and (
            self.matches is None or self.matches(config))


# ------------------------------------------------------- shared helpers ---

def from_presets(presets: Mapping[str, Any], kind: str, name: str, **overrides) -> Any:
    """``presets[name]`` with fields overridden (each family's ``preset``).

    Raises:
      KeyError: an unknown name (the message lists the known ones).
    """
    if name not in presets:
        raise KeyError(f"unknown {kind} preset {name!r}; known: {sorted(presets)}")
    return presets[name].replace(**overrides)


def flat_paths(tree: Any) -> Dict[str, Any]:
    """``a/b/c`` path -> leaf of a nested dict (boxed leaves unboxed)."""
    tree = nn.meta.unbox(tree)
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """The nested dict of ``a/b/c`` paths."""
    tree: Dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def scanned_location(path: str, stored: Any) -> Tuple[str, Optional[int]]:
    """Where the unscanned param ``path`` lives in a tree whose paths are ``stored``.

    ``…/layers_{i}/rest`` is itself when stored so, else row ``i`` of a
    scanned ``…/layers/rest`` (a leading layer axis). Any family's scanned
    stacks follow this naming, so unscanning and the Hugging Face engine need
    no family knowledge.

    Returns:
      (stored path, layer index or None).
    """
    if path in stored:
        return path, None
    head, sep, rest = path.rpartition("/layers_")
    if sep:
        index, _, tail = rest.partition("/")
        if index.isdigit():
            scanned = f"{head}/layers/{tail}" if head else f"layers/{tail}"
            if scanned in stored:
                return scanned, int(index)
    return path, None


def unscan(params: Mapping[str, Any], abstract_unscanned: Any) -> Dict[str, Any]:
    """``params`` (scanned or not) reshaped to the unscanned ``abstract`` layout.

    Only the leaves of ``abstract_unscanned`` are kept.

    Raises:
      KeyError: a parameter of the abstract tree that ``params`` lacks.
    """
    stored = flat_paths(params)
    out = {}
    for path in flat_paths(abstract_unscanned):
        where, layer = scanned_location(path, stored)
        if where not in stored:
            raise KeyError(path)
        leaf = stored[where]
        out[path] = jnp.asarray(leaf if layer is None else leaf[layer])
    return unflatten(out)


def attention_lora_targets(prefix: str, names: Mapping[str, str],
                           out: str = "o") -> Dict[str, LoraTarget]:
    """q/k/v kernels ``[D, H, K]`` and an output kernel ``[H, K, D]`` named
    ``prefix/<names[t]>`` (the layout of the BERT, T5 and XLNet-style blocks)."""
    return {t: LoraTarget(f"{prefix}/{n}", (0, 1) if t == out else (0,))
            for t, n in names.items()}


def where_valid(tokens_BT: jax.Array, mask_BT: Optional[jax.Array], pad_id: int) -> jax.Array:
    """Tokens with every position outside ``mask`` set to ``pad_id``."""
    if mask_BT is None:
        return tokens_BT
    return jnp.where(mask_BT, tokens_BT, jnp.asarray(pad_id, tokens_BT.dtype))
