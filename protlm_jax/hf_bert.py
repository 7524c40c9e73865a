"""Hugging Face BERT / ALBERT / ELECTRA <-> protlm-jax, both directions.

One key table per family maps every Hugging Face parameter name (without its
``bert.``/``albert.``/``electra.`` prefix, which ``*Model`` checkpoints lack)
to the path of our parameter and says how the array is laid out:

  "copy"        same array                      LayerNorm, biases, position tables
  "T"           transpose                       torch Linear [out, in] -> [in, out]
  "heads_in"    [H*K, D] -> [D, H, K]           query, key, value
  "heads_bias"  [H*K] -> [H, K]                 their biases
  "heads_out"   [D, H*K] -> [H, K, D]           attention output dense
  "vocab_rows"  [V, E] -> [Vp, E]               word embeddings (zero rows pad to Vp)
  "vocab_vec"   [V] -> [Vp]                     MLM decoder bias

Tied decoder weights (``cls.predictions.decoder.weight``,
``predictions.decoder.weight``, ``generator_lm_head.weight``) are not stored
by us: on import they must equal the word embeddings (else a clear error);
on export they are left out and transformers ties them again.

Directories are read from ``config.json`` plus ``model.safetensors`` (sharded
with ``model.safetensors.index.json``) or ``pytorch_model.bin`` (read only
with ``torch.load(weights_only=True)``, never unpickled) through
``hf_t5.CheckpointReader``: :func:`check_tensors` checks names and shapes
first, :func:`assemble_params` then reads tensor by tensor, straight into the
parameters' shardings on a mesh (``protlm import-hf``). Unknown tensors inside
the network are errors; heads we do not model (pooler, NSP/SOP, task heads)
are listed in a warning and skipped. Exports write ``config.json``,
``model.safetensors`` (shards + index above a size; ``hf_export``) and the
tokenizer: ``vocab.txt`` with ``do_lower_case=False`` (BERT, ELECTRA) or an
ALBERT ``spiece.model``.

ProtAlbert's SentencePiece model has 34 ids whose order REFERENCE marks
UNVERIFIED. The one written here (:func:`albert_pieces`) is: 0 ``<pad>``,
1 ``<unk>``, 2 ``[CLS]``, 3 ``[SEP]``, 4 ``[MASK]`` (ALBERT's usual special
ids), 5-29 the residues ``▁L ▁A ▁G …`` in ProtBert's order (so residue and
special ids equal ProtBert's and the ``*_mlm`` tasks feed ALBERT unchanged),
30 ``▁`` and 31-33 unused pieces. An imported ALBERT keeps its own
``spiece.model`` (:meth:`vocabularies.VocabTxtVocabulary.from_spiece_model`).

Shape legend: V vocab (Vp padded), E embedding size, D hidden, H heads,
K head size, F intermediate, N layers.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np

from protlm_jax.errors import ProtlmError
from protlm_jax.models import bert, electra
from protlm_jax.models.bert import BertConfig
from protlm_jax.models.electra import ElectraConfig
from protlm_jax.vocabularies import PROTBERT_RESIDUES, VocabTxtVocabulary

log = logging.getLogger(__name__)

Rule = Tuple[str, str, str]

# ------------------------------------------------------------ key tables ---

# One BERT/ELECTRA encoder layer (HF ``encoder.layer.{i}``), relative to it.
_BERT_LAYER: Tuple[Rule, ...] = (
    (r"attention\.self\.(?P<proj>query|key|value)\.weight",
     "attention/{proj}/kernel", "heads_in"),
    (r"attention\.self\.(?P<proj>query|key|value)\.bias", "attention/{proj}/bias", "heads_bias"),
    (r"attention\.output\.dense\.weight", "attention/out/kernel", "heads_out"),
    (r"attention\.output\.dense\.bias", "attention/out/bias", "copy"),
    (r"attention\.output\.LayerNorm\.(?P<ln>weight|bias|gamma|beta)",
     "attention_layer_norm/{ln}", "copy"),
    (r"intermediate\.dense\.weight", "mlp/wi/kernel", "T"),
    (r"intermediate\.dense\.bias", "mlp/wi/bias", "copy"),
    (r"output\.dense\.weight", "mlp/wo/kernel", "T"),
    (r"output\.dense\.bias", "mlp/wo/bias", "copy"),
    (r"output\.LayerNorm\.(?P<ln>weight|bias|gamma|beta)", "mlp_layer_norm/{ln}", "copy"),
)

# One ALBERT layer (``albert_layer_groups.{g}.albert_layers.{j}``).
_ALBERT_LAYER: Tuple[Rule, ...] = (
    (r"attention\.(?P<proj>query|key|value)\.weight", "attention/{proj}/kernel", "heads_in"),
    (r"attention\.(?P<proj>query|key|value)\.bias", "attention/{proj}/bias", "heads_bias"),
    (r"attention\.dense\.weight", "attention/out/kernel", "heads_out"),
    (r"attention\.dense\.bias", "attention/out/bias", "copy"),
    (r"attention\.LayerNorm\.(?P<ln>weight|bias|gamma|beta)", "attention_layer_norm/{ln}", "copy"),
    (r"ffn\.weight", "mlp/wi/kernel", "T"),
    (r"ffn\.bias", "mlp/wi/bias", "copy"),
    (r"ffn_output\.weight", "mlp/wo/kernel", "T"),
    (r"ffn_output\.bias", "mlp/wo/bias", "copy"),
    (r"full_layer_layer_norm\.(?P<ln>weight|bias|gamma|beta)", "mlp_layer_norm/{ln}", "copy"),
)

_EMBEDDINGS: Tuple[Rule, ...] = (
    (r"embeddings\.word_embeddings\.weight", "embeddings/word_embeddings/embedding",
     "vocab_rows"),
    (r"embeddings\.position_embeddings\.weight", "embeddings/position_embeddings", "copy"),
    (r"embeddings\.token_type_embeddings\.weight", "embeddings/token_type_embeddings", "copy"),
    (r"embeddings\.LayerNorm\.(?P<ln>weight|bias|gamma|beta)", "embeddings/layer_norm/{ln}",
     "copy"),
)


def _nested(prefix_re: str, path_prefix: str, rules: Sequence[Rule]) -> Tuple[Rule, ...]:
    return tuple((prefix_re + r"\." + r, f"{path_prefix}/{p}", t) for r, p, t in rules)


def key_table(family: str, tower: str = "") -> Tuple[Rule, ...]:
    """(HF name regex, our path template, transform) rules of one family.

    Args:
      family: "bert", "albert" or "electra".
      tower: for ELECTRA, "discriminator" (``ElectraForPreTraining``) or
        "generator" (``ElectraForMaskedLM``); our paths are prefixed with it.

    Returns:
      The rules; HF names are without the base-model prefix.
    """
    if family == "bert":
        return _EMBEDDINGS + _nested(r"encoder\.layer\.(?P<i>\d+)", "encoder/layers_{i}",
                                     _BERT_LAYER) + (
            (r"cls\.predictions\.transform\.dense\.weight", "mlm_head/dense/kernel", "T"),
            (r"cls\.predictions\.transform\.dense\.bias", "mlm_head/dense/bias", "copy"),
            (r"cls\.predictions\.transform\.LayerNorm\.(?P<ln>weight|bias|gamma|beta)",
             "mlm_head/layer_norm/{ln}", "copy"),
            (r"cls\.predictions\.bias", "mlm_head/bias", "vocab_vec"),
        )
    if family == "albert":
        return _EMBEDDINGS + (
            (r"encoder\.embedding_hidden_mapping_in\.weight", "embedding_projection/kernel", "T"),
            (r"encoder\.embedding_hidden_mapping_in\.bias", "embedding_projection/bias", "copy"),
        ) + _nested(r"encoder\.albert_layer_groups\.(?P<g>\d+)\.albert_layers\.(?P<j>\d+)",
                    "encoder/groups_{g}/layers_{j}", _ALBERT_LAYER) + (
            (r"predictions\.dense\.weight", "mlm_head/dense/kernel", "T"),
            (r"predictions\.dense\.bias", "mlm_head/dense/bias", "copy"),
            (r"predictions\.LayerNorm\.(?P<ln>weight|bias|gamma|beta)",
             "mlm_head/layer_norm/{ln}", "copy"),
            (r"predictions\.bias", "mlm_head/bias", "vocab_vec"),
        )
    if family == "electra":
        if tower not in ("discriminator", "generator"):
            raise ValueError(f"ELECTRA tower must be 'discriminator' or 'generator', "
                             f"got {tower!r}")
        body = (
            (r"embeddings_project\.weight", f"{tower}/embedding_projection/kernel", "T"),
            (r"embeddings_project\.bias", f"{tower}/embedding_projection/bias", "copy"),
        ) + _nested(r"encoder\.layer\.(?P<i>\d+)", f"{tower}/encoder/layers_{{i}}", _BERT_LAYER)
        if tower == "discriminator":
            head = (
                (r"discriminator_predictions\.dense\.weight", "discriminator_head/dense/kernel",
                 "T"),
                (r"discriminator_predictions\.dense\.bias", "discriminator_head/dense/bias",
                 "copy"),
                (r"discriminator_predictions\.dense_prediction\.weight",
                 "discriminator_head/prediction/kernel", "T"),
                (r"discriminator_predictions\.dense_prediction\.bias",
                 "discriminator_head/prediction/bias", "copy"),
            )
        else:
            head = (
                (r"generator_predictions\.dense\.weight", "generator_head/dense/kernel", "T"),
                (r"generator_predictions\.dense\.bias", "generator_head/dense/bias", "copy"),
                (r"generator_predictions\.LayerNorm\.(?P<ln>weight|bias|gamma|beta)",
                 "generator_head/layer_norm/{ln}", "copy"),
                (r"generator_lm_head\.bias", "generator_head/bias", "vocab_vec"),
            )
        return _EMBEDDINGS + body + head
    raise ValueError(f"unknown family {family!r}")


# Buffers, not parameters: read past silently.
_BUFFERS = (r".*position_ids", r".*token_type_ids")
# Heads we do not model (pooler, next-sentence / sentence-order heads): listed
# in a warning and skipped, like any unknown tensor outside the network.
_HEADS_NOT_MODELLED = (r"pooler\..*", r"cls\.seq_relationship\..*", r"sop_classifier\..*")
# Unknown tensors under these are inside the network: ignoring one would change
# the hidden states, so it is an error.
_BODY = ("embeddings.", "embeddings_project.", "encoder.")
# Tied to the word embeddings (weights) or to the head bias (decoder biases).
_TIED = {
    "bert": (r"cls\.predictions\.decoder\.weight", r"cls\.predictions\.decoder\.bias"),
    "albert": (r"predictions\.decoder\.weight", r"predictions\.decoder\.bias"),
    "electra": (r"generator_lm_head\.weight",),
}
_PREFIX = {"bert": "bert.", "albert": "albert.", "electra": "electra."}
_LN = {"weight": "scale", "gamma": "scale", "bias": "bias", "beta": "bias"}


def map_hf_name(name: str, family: str, tower: str = "") -> Optional[Tuple[str, str]]:
    """Our (path, transform) for one HF parameter name, or None when unknown."""
    local = name[len(_PREFIX[family]):] if name.startswith(_PREFIX[family]) else name
    for pattern, template, rule in key_table(family, tower):
        m = re.fullmatch(pattern, local)
        if m:
            groups = m.groupdict()
            if "ln" in groups:
                groups["ln"] = _LN[groups["ln"]]
            return template.format(**groups), rule
    return None


# ------------------------------------------------------------ transforms ---

def _to_ours(rule: str, w: np.ndarray, cfg: BertConfig) -> np.ndarray:
    h, k = cfg.num_attention_heads, cfg.head_dim
    if rule == "copy":
        return w
    if rule == "T":
        return w.T
    if rule == "heads_in":  # [H*K, D] -> [D, H, K]
        return w.T.reshape(w.shape[1], h, k)
    if rule == "heads_bias":
        return w.reshape(h, k)
    if rule == "heads_out":  # [D, H*K] -> [H, K, D]
        return w.T.reshape(h, k, w.shape[0])
    if rule == "vocab_rows":
        return np.pad(w, ((0, cfg.padded_vocab_size - w.shape[0]), (0, 0)))
    if rule == "vocab_vec":
        return np.pad(w, (0, cfg.padded_vocab_size - w.shape[0]))
    raise ValueError(f"unknown transform {rule!r}")


def _to_hf(rule: str, w: np.ndarray, cfg: BertConfig) -> np.ndarray:
    if rule == "copy":
        return w
    if rule == "T":
        return w.T
    if rule == "heads_in":  # [D, H, K] -> [H*K, D]
        return w.reshape(w.shape[0], -1).T
    if rule == "heads_bias":
        return w.reshape(-1)
    if rule == "heads_out":  # [H, K, D] -> [D, H*K]
        return w.reshape(-1, w.shape[-1]).T
    if rule in ("vocab_rows", "vocab_vec"):
        return w[:cfg.vocab_size]
    raise ValueError(f"unknown transform {rule!r}")


def _flat(tree: Any) -> Dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _unflat(flat: Mapping[str, Any]) -> Dict[str, Any]:
    tree: Dict[str, Any] = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _to_numpy(w: Any) -> np.ndarray:
    if hasattr(w, "detach"):  # torch tensors, possibly bfloat16/float16
        w = w.detach().cpu()
        w = (w if w.dtype.is_floating_point else w.double()).float().numpy()
    return np.asarray(w, dtype=np.float32)


def _tower_config(config: Union[BertConfig, ElectraConfig], tower: str) -> BertConfig:
    if isinstance(config, ElectraConfig):
        return getattr(config, tower)
    return config


def _path_config(config: Union[BertConfig, ElectraConfig], path: str) -> BertConfig:
    """The tower config a param path belongs to (shared embeddings: the discriminator's)."""
    if isinstance(config, ElectraConfig) and path.startswith("generator"):
        return config.generator
    return _tower_config(config, "discriminator")


def _abstract_params(config: Union[BertConfig, ElectraConfig]) -> Any:
    if isinstance(config, ElectraConfig):
        return electra.abstract_params(config)
    return bert.abstract_params(config)


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: Union[BertConfig, ElectraConfig]) -> Dict[str, Tuple[int, ...]]:
    """Flat path -> shape of our params, unscanned (traced with eval_shape)."""
    if isinstance(config, ElectraConfig):
        unscanned = ElectraConfig(discriminator=config.discriminator.replace(scan_layers=False),
                                  generator=config.generator.replace(scan_layers=False))
    else:
        unscanned = config.replace(scan_layers=False)
    return {k: tuple(v.shape) for k, v in _flat(nn.meta.unbox(_abstract_params(unscanned))).items()}


def _scan_towers(config: Union[BertConfig, ElectraConfig]) -> List[Tuple[str, BertConfig]]:
    """(param prefix, config) of each stack whose layers may be scanned."""
    if isinstance(config, ElectraConfig):
        return [("discriminator/", config.discriminator), ("generator/", config.generator)]
    return [("", config)]


def _scanned_path(path: str, config: Union[BertConfig, ElectraConfig]
                  ) -> Tuple[str, Optional[int]]:
    """Unscanned path -> (path of the params leaf, layer index within it or None).

    Scanned BERT/ELECTRA layers ``encoder/layers_{i}/X`` live in
    ``encoder/layers/X`` [N, ...]; a scanned shared ALBERT group keeps its paths.
    """
    for prefix, cfg in _scan_towers(config):
        if cfg.scan_layers and cfg.family != "albert":
            m = re.fullmatch(re.escape(prefix) + r"encoder/layers_(\d+)/(.*)", path)
            if m:
                return f"{prefix}encoder/layers/{m[2]}", int(m[1])
    return path, None


def _hf_shape(rule: str, ours: Sequence[int], cfg: BertConfig) -> Tuple[int, ...]:
    """The HF shape of a tensor whose shape in our layout is ``ours`` (as ``_to_hf``)."""
    ours = tuple(ours)
    if rule == "T":
        return ours[::-1]
    if rule == "heads_in":  # [D, H, K] -> [H*K, D]
        return (ours[1] * ours[2], ours[0])
    if rule == "heads_bias":
        return (ours[0] * ours[1],)
    if rule == "heads_out":  # [H, K, D] -> [D, H*K]
        return (ours[2], ours[0] * ours[1])
    if rule in ("vocab_rows", "vocab_vec"):
        return (cfg.vocab_size,) + ours[1:]
    return ours


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.fullmatch(p, name) for p in patterns)


# ------------------------------------------------- checkpoint -> our params ---

# Where one parameter comes from: (reader, HF tensor name, transform).
Source = Tuple[Any, str, str]


class StateDictReader:
    """``hf_t5.CheckpointReader``'s interface over an in-memory state dict."""
    kind = "state dict"

    def __init__(self, state_dict: Mapping[str, Any]):
        self._state = state_dict

    def keys(self) -> List[str]:
        return list(self._state)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> np.ndarray:
        return _to_numpy(self._state[name])


def check_tensors(reader: Any, config: Union[BertConfig, ElectraConfig], *, tower: str = "",
                  where: str = "state dict", require_head: Optional[bool] = None
                  ) -> Tuple[Dict[str, Source], List[str]]:
    """Checks a checkpoint's tensors against our config by name and shape.

    No weights are read except a tied decoder weight and the word embeddings
    (compared for equality).

    Args:
      reader: ``hf_t5.CheckpointReader`` (a directory, tensor by tensor) or
        :class:`StateDictReader`; names with or without the
        ``bert.``/``albert.``/``electra.`` prefix.
      config: our config (``ElectraConfig`` for ELECTRA).
      tower: ELECTRA only: "discriminator" or "generator".
      where: names the source in error messages (a directory).
      require_head: whether the MLM / discriminator head must be complete;
        None: only if any head tensor is present (``*Model`` checkpoints have
        none; the params then embed but have no head).

    Returns:
      (our unscanned param path -> source, names of skipped tensors of heads
      we do not model). Only the parts the checkpoint provides are there (for
      ELECTRA one tower plus the shared embeddings).

    Raises:
      ProtlmError: one line naming the tensor: unknown inside the network,
        missing, misshapen, or a decoder not tied to the word embeddings.
    """
    cfg = _tower_config(config, tower or "discriminator")
    family = cfg.family
    found: Dict[str, Tuple[str, str]] = {}
    tied: List[Tuple[str, str]] = []
    skipped: List[str] = []
    for name in reader.keys():
        local = name[len(_PREFIX[family]):] if name.startswith(_PREFIX[family]) else name
        if _matches(local, _BUFFERS):
            continue
        if _matches(local, _HEADS_NOT_MODELLED):
            skipped.append(name)
            continue
        if _matches(local, _TIED[family]):
            tied.append((local, name))
            continue
        mapped = map_hf_name(name, family, tower)
        if mapped is None:
            if local.startswith(_BODY):
                raise ProtlmError(f"{where}: unexpected tensor {name!r} for a Hugging Face "
                                  f"{family} {tower or 'model'}")
            skipped.append(name)
            continue
        path, rule = mapped
        if path in found:
            raise ProtlmError(f"{where}: two tensors map to {path} (second: {name!r})")
        found[path] = (name, rule)

    expected = _expected_shapes(config)
    if isinstance(config, ElectraConfig):
        other = "generator" if tower == "discriminator" else "discriminator"
        expected = {k: v for k, v in expected.items() if not k.startswith(other)}
    head_prefixes = ("mlm_head/", "discriminator_head/", "generator_head/")
    bias_path = {"bert": "mlm_head/bias", "albert": "mlm_head/bias",
                 "electra": "generator_head/bias"}[family]
    for local, name in tied:  # the decoder bias stands in for a missing head bias
        if local.endswith("decoder.bias") and bias_path not in found:
            found[bias_path] = (name, "vocab_vec")
    if require_head is None:
        require_head = any(p.startswith(head_prefixes) for p in found)
    for path, (name, rule) in found.items():
        if path not in expected:
            raise ProtlmError(f"{where}: tensor {name!r} has no place in this config "
                              f"(no parameter {path})")
        # Compared in HF layout so the message speaks the checkpoint's language.
        want_hf = _hf_shape(rule, expected[path], _path_config(config, path))
        if tuple(reader.shape(name)) != want_hf:
            raise ProtlmError(f"{where}: tensor {name!r} has shape {tuple(reader.shape(name))}, "
                              f"config.json implies {want_hf}")
    missing = [p for p in expected if p not in found
               and (require_head or not p.startswith(head_prefixes))]
    if missing:
        raise ProtlmError(f"{where}: missing tensor for {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    word = found.get("embeddings/word_embeddings/embedding")
    for local, name in tied:
        if local.endswith("weight") and word is not None:
            w, embedding = reader.get(name), reader.get(word[0])
            if w.shape != embedding.shape or not np.array_equal(w, embedding):
                raise ProtlmError(f"{where}: {local} differs from the word embeddings; "
                                  f"untied MLM decoders are not supported")
    return {path: (reader, name, rule) for path, (name, rule) in found.items()}, skipped


def assemble_params(sources: Mapping[str, Source], config: Union[BertConfig, ElectraConfig], *,
                    mesh: Optional[jax.sharding.Mesh] = None,
                    rules: Optional[Sequence] = None) -> Dict[str, Any]:
    """Builds our params leaf by leaf from checked sources (:func:`check_tensors`).

    With a mesh each leaf goes straight into its ``NamedSharding``
    (``jax.make_array_from_callback``: each device receives only its shard;
    the host holds one parameter at a time, a whole layer stack when
    scanned). Without one the leaves are float32 numpy arrays.

    Args:
      sources: our unscanned param path -> (reader, HF name, transform).
      config: our config; ``scan_layers`` stacks the layers.
      mesh: the ``(data, model)`` mesh, or None.
      rules: logical axis rules (default: the "1d" rules).

    Returns:
      The nested params dict (only the parts ``sources`` holds).

    Raises:
      PartitioningError: a dimension the mesh's model axis does not divide.
    """
    groups: Dict[str, List[Tuple[Optional[int], Source]]] = {}
    for path, source in sources.items():
        leaf, layer = _scanned_path(path, config)
        groups.setdefault(leaf, []).append((layer, source))
    shardings: Dict[str, Any] = {}
    shapes: Dict[str, Tuple[int, ...]] = {}
    if mesh is not None:
        from protlm_jax import partitioning

        rules = rules or partitioning.standard_logical_axis_rules("1d")
        with partitioning.axis_rules(mesh, rules):
            tree, abstract = partitioning.param_shardings(_abstract_params(config), mesh, rules)
        shardings = _flat(tree)
        shapes = {k: tuple(v.shape) for k, v in _flat(abstract).items()}
    out: Dict[str, Any] = {}
    for leaf, parts in groups.items():
        parts.sort(key=lambda p: -1 if p[0] is None else p[0])
        cfg = _path_config(config, leaf)
        arrays = [_to_ours(rule, reader.get(name), cfg) for _, (reader, name, rule) in parts]
        host = arrays[0] if parts[0][0] is None else np.stack(arrays)
        del arrays
        if mesh is None:
            out[leaf] = host
            continue
        assert host.shape == shapes[leaf], (leaf, host.shape, shapes[leaf])
        out[leaf] = jax.make_array_from_callback(host.shape, shardings[leaf],
                                                 lambda index, host=host: host[index])
    return _unflat(out)


def params_from_state_dict(state_dict: Mapping[str, Any],
                           config: Union[BertConfig, ElectraConfig], *, tower: str = "",
                           where: str = "state dict", require_head: Optional[bool] = None
                           ) -> Dict[str, Any]:
    """Converts an in-memory Hugging Face state dict into our params pytree.

    (Directories on disk go through :func:`load_pretrained`, tensor by tensor.)

    Args:
      state_dict: HF name -> array (torch tensors or numpy), with or without
        the ``bert.``/``albert.``/``electra.`` prefix.
      config, tower, where, require_head: as :func:`check_tensors`.

    Returns:
      Nested dict of float32 numpy arrays (``{"params": ...}`` ready), holding
      only the parts this checkpoint provides.

    Raises:
      ProtlmError: as :func:`check_tensors`.
    """
    sources, skipped = check_tensors(StateDictReader(state_dict), config, tower=tower,
                                     where=where, require_head=require_head)
    if skipped:
        log.warning("%s: skipped %d tensors of heads protlm does not model: %s", where,
                    len(skipped), _listing(skipped))
    return assemble_params(sources, config)


def _listing(names: Sequence[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (and {len(names) - limit} more)" if len(names) > limit else "")


# ------------------------------------------------- our params -> checkpoint ---

def _natural(name: str) -> List[Any]:
    """Sort key putting ``layer.2`` before ``layer.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def hf_tensors_from_params(params: Any, config: Union[BertConfig, ElectraConfig], *,
                           tower: str = "", with_head: bool = True, prefixed: bool = True
                           ) -> Iterator[Tuple[str, np.ndarray]]:
    """Our params -> (HF name, float32 array in HF layout), one tensor at a time.

    Tensors come in HF order (embeddings, layers by index, head); only one is
    on the host at a time (a scanned stack is sliced layer by layer on its
    device). Tied decoder weights are left out: transformers ties them again.

    Args:
      params: our params (numpy or jax arrays, possibly boxed), scanned or not
        as ``config`` says; for ELECTRA the other tower's params are ignored.
      config: their config.
      tower: ELECTRA only: "discriminator" or "generator".
      with_head: include the MLM / discriminator head (``*ForMaskedLM``,
        ``ElectraForPreTraining``); else the ``*Model`` tensors alone.
      prefixed: base-model tensors carry the ``bert.``/``albert.``/``electra.``
        prefix (models with a head); ``*Model`` checkpoints have none.
    """
    cfg = _tower_config(config, tower or "discriminator")
    family = cfg.family
    flat = _flat(nn.meta.unbox(params))
    plan = []  # (HF name, leaf path, layer index or None, transform)
    for leaf_path in flat:
        layers = [(leaf_path, None)]
        m = re.fullmatch(r"(.*encoder/)layers/(.*)", leaf_path)
        if m:  # scanned: one HF tensor per layer
            layers = [(f"{m[1]}layers_{i}/{m[2]}", i) for i in range(flat[leaf_path].shape[0])]
        for path, layer in layers:
            hf = _hf_name(path, family, tower)
            if hf is None:
                continue  # the other ELECTRA tower's params
            name, rule, is_head = hf
            if is_head and not with_head:
                continue
            prefix = _PREFIX[family] if prefixed and not is_head else ""
            plan.append((prefix + name, leaf_path, layer, rule))
    for name, leaf_path, layer, rule in sorted(plan, key=lambda p: _natural(p[0])):
        w = flat[leaf_path] if layer is None else flat[leaf_path][layer]
        w = np.asarray(jax.device_get(w), np.float32)
        yield name, np.ascontiguousarray(_to_hf(rule, w, _path_config(config, leaf_path)))


def state_dict_from_params(params: Any, config: Union[BertConfig, ElectraConfig], *,
                           tower: str = "", with_head: bool = True) -> Dict[str, np.ndarray]:
    """Our params -> a Hugging Face state dict (``*ForMaskedLM`` / ``*ForPreTraining``).

    Returns:
      HF name (with the base-model prefix) -> float32 numpy array; tied
      decoder weights are left out. (:func:`hf_tensors_from_params` yields
      them one at a time.)
    """
    return dict(hf_tensors_from_params(params, config, tower=tower, with_head=with_head))


def _hf_name(path: str, family: str, tower: str) -> Optional[Tuple[str, str, bool]]:
    """HF name (without prefix), transform and whether it is a head tensor."""
    for pattern, template, rule in key_table(family, tower):
        name = _invert(pattern, template, path)
        if name is not None:
            head = template.startswith(("mlm_head", "discriminator_head", "generator_head"))
            return name, rule, head
    return None


def _invert(pattern: str, template: str, path: str) -> Optional[str]:
    """Fills ``pattern``'s named groups from ``path`` matched against ``template``."""
    # Template -> regex over our paths; named groups become captures.
    # Each group matches what the HF pattern allows (``proj``: query|key|value).
    allowed = dict(re.findall(r"\(\?P<(\w+)>([^)]*)\)", pattern), ln="scale|bias")
    tre = re.escape(template)
    for g, alt in allowed.items():
        tre = tre.replace(re.escape("{" + g + "}"), f"(?P<{g}>(?:{alt}))")
    m = re.fullmatch(tre, path)
    if not m:
        return None
    groups = m.groupdict()
    if "ln" in groups:
        groups["ln"] = {"scale": "weight", "bias": "bias"}[groups["ln"]]
    name = pattern.replace(r"\.", ".")
    for g, v in groups.items():
        name = re.sub(r"\(\?P<" + g + r">[^)]*\)", v, name)
    if re.search(r"[()\\|?]", name):
        return None
    return name


# --------------------------------------------------------------- configs ---

_ARCHITECTURES = {
    "bert": ("BertForMaskedLM", "BertModel", "BertForPreTraining"),
    "albert": ("AlbertForMaskedLM", "AlbertModel", "AlbertForPreTraining"),
    "electra": ("ElectraForPreTraining", "ElectraForMaskedLM", "ElectraModel"),
}


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> BertConfig:
    """Our ``BertConfig`` (family from ``model_type``) from a HF ``config.json`` dict.

    Raises:
      ProtlmError: one line listing unsupported options.
    """
    family = hf.get("model_type")
    if family not in _ARCHITECTURES:
        raise ProtlmError(f"{where}: model_type {family!r} is not bert, albert or electra")
    problems = []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {hf['position_embedding_type']!r} "
                        "(only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        problems.append("decoder / cross-attention BERTs")
    act = hf.get("hidden_act", "gelu_new" if family == "albert" else "gelu")
    if act not in bert.ACTIVATIONS:
        problems.append(f"hidden_act {act!r} (supported: {sorted(bert.ACTIVATIONS)})")
    if hf.get("tie_word_embeddings") is False:
        problems.append("tie_word_embeddings false (untied MLM decoder)")
    if family != "albert" and hf.get("num_hidden_groups", 1) != 1:
        problems.append("num_hidden_groups outside ALBERT")
    if problems:
        raise ProtlmError(f"{where}: unsupported {family} config: {'; '.join(problems)}")
    defaults = {"bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, max_position_embeddings=512),
                "albert": dict(hidden_size=4096, num_hidden_layers=12, num_attention_heads=64,
                               intermediate_size=16384, max_position_embeddings=512,
                               embedding_size=128),
                "electra": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                                intermediate_size=1024, max_position_embeddings=512,
                                embedding_size=128)}[family]
    get = lambda k, d=None: hf.get(k, defaults.get(k, d))  # noqa: E731
    try:
        return BertConfig(
            family=family, vocab_size=int(get("vocab_size", 30522)),
            hidden_size=int(get("hidden_size")), num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            intermediate_size=int(get("intermediate_size")), hidden_act=act,
            max_position_embeddings=int(get("max_position_embeddings")),
            type_vocab_size=int(get("type_vocab_size", 2)),
            layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
            hidden_dropout_prob=float(get("hidden_dropout_prob", 0.0 if family == "albert"
                                          else 0.1)),
            attention_probs_dropout_prob=float(get("attention_probs_dropout_prob",
                                                   0.0 if family == "albert" else 0.1)),
            initializer_range=float(get("initializer_range", 0.02)),
            embedding_size=(int(get("embedding_size")) if family != "bert" else None),
            num_hidden_groups=int(get("num_hidden_groups", 1)),
            inner_group_num=int(get("inner_group_num", 1)),
            pad_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0))
    except ValueError as e:
        raise ProtlmError(f"{where}: {e}") from None


def hf_config_dict(config: BertConfig, architecture: str) -> Dict[str, Any]:
    """``config.json`` contents for ``config`` (loads alike in transformers 4 and 5)."""
    d: Dict[str, Any] = {
        "architectures": [architecture], "model_type": config.family,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "initializer_range": config.initializer_range,
        "position_embedding_type": "absolute", "pad_token_id": config.pad_id,
        "tie_word_embeddings": True,
    }
    if config.family != "bert":
        d["embedding_size"] = config.emb_size
    if config.family == "albert":
        d.update(num_hidden_groups=config.num_hidden_groups,
                 inner_group_num=config.inner_group_num, classifier_dropout_prob=0.1,
                 bos_token_id=2, eos_token_id=3)
    return d


# ------------------------------------------------------------- tokenizers ---

PROTBERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def protbert_vocab_tokens() -> List[str]:
    """The 30 lines of ProtBert's ``vocab.txt`` (REFERENCE §2)."""
    return list(PROTBERT_SPECIALS) + list(PROTBERT_RESIDUES)


def albert_pieces(tokens: Optional[Sequence[str]] = None) -> List[Tuple[str, int]]:
    """(piece, sentencepiece type) of an ALBERT SentencePiece model.

    Args:
      tokens: a checkpoint's vocabulary in id order (``VocabTxtVocabulary.tokens``:
        residues without their ``▁``); None: our 34-id model (order: module
        docstring). Residues become ``▁X`` pieces, ``<unk>`` the unknown
        piece, ``[MASK]`` user-defined, ``<unusedN>`` unused, other bracketed
        names control pieces.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    t = pb.ModelProto.SentencePiece
    if tokens is None:
        pieces = [("<pad>", t.CONTROL), ("<unk>", t.UNKNOWN), ("[CLS]", t.CONTROL),
                  ("[SEP]", t.CONTROL), ("[MASK]", t.USER_DEFINED)]
        pieces += [("\u2581" + r, t.NORMAL) for r in PROTBERT_RESIDUES]
        pieces += [("\u2581", t.NORMAL)] + [(f"<unused{i}>", t.UNUSED) for i in range(3)]
        return pieces
    pieces = []
    for token in tokens:
        if len(token) == 1 and token != "\u2581":
            pieces.append(("\u2581" + token, t.NORMAL))
        elif token == "<unk>":
            pieces.append((token, t.UNKNOWN))
        elif token == "[MASK]":
            pieces.append((token, t.USER_DEFINED))
        elif re.fullmatch(r"<unused\d+>", token):
            pieces.append((token, t.UNUSED))
        elif re.fullmatch(r"<.*>|\[.*\]", token):
            pieces.append((token, t.CONTROL))
        else:
            pieces.append((token, t.NORMAL))
    return pieces


def write_albert_spiece(path: str, tokens: Optional[Sequence[str]] = None) -> None:
    """Writes the ALBERT SentencePiece model (unigram, no lower-casing);
    ``tokens`` as :func:`albert_pieces`."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    pieces = albert_pieces(tokens)
    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    model.trainer_spec.vocab_size = len(pieces)
    model.trainer_spec.pad_id, model.trainer_spec.unk_id = 0, 1
    model.trainer_spec.bos_id, model.trainer_spec.eos_id = -1, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    for piece, kind in pieces:
        sp = model.pieces.add()
        sp.piece, sp.type = piece, kind
        sp.score = -10.0 if piece == "\u2581" else 0.0
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def tokenizer_files(family: str) -> List[str]:
    """The files :func:`write_tokenizer` writes for ``family``."""
    return [("spiece.model" if family == "albert" else "vocab.txt"), "tokenizer_config.json",
            "special_tokens_map.json"]


def write_tokenizer(directory: str, family: str, max_length: int,
                    tokens: Optional[Sequence[str]] = None) -> None:
    """Tokenizer files: ``vocab.txt`` (BERT, ELECTRA) or ``spiece.model`` (ALBERT).

    Args:
      directory: where to write.
      family: "bert", "albert" or "electra".
      max_length: ``model_max_length`` (the position table's size).
      tokens: the vocabulary in id order (an imported checkpoint's own,
        ``VocabTxtVocabulary.tokens``); None: ProtBert's / our ALBERT pieces.
    """
    if family == "albert":
        write_albert_spiece(os.path.join(directory, "spiece.model"), tokens)
        _write_json(os.path.join(directory, "tokenizer_config.json"), {
            "tokenizer_class": "AlbertTokenizer", "do_lower_case": False,
            "keep_accents": True, "remove_space": True, "model_max_length": max_length,
            "unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "[CLS]",
            "sep_token": "[SEP]", "mask_token": "[MASK]", "bos_token": "[CLS]",
            "eos_token": "[SEP]"})
        specials = {"unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "[CLS]",
                    "sep_token": "[SEP]", "mask_token": "[MASK]", "bos_token": "[CLS]",
                    "eos_token": "[SEP]"}
    else:
        with open(os.path.join(directory, "vocab.txt"), "w") as f:
            f.write("\n".join(tokens or protbert_vocab_tokens()) + "\n")
        tokenizer_class = "ElectraTokenizer" if family == "electra" else "BertTokenizer"
        _write_json(os.path.join(directory, "tokenizer_config.json"), {
            "tokenizer_class": tokenizer_class, "do_lower_case": False,
            "model_max_length": max_length, "unk_token": "[UNK]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
        specials = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "sep_token": "[SEP]", "mask_token": "[MASK]"}
    _write_json(os.path.join(directory, "special_tokens_map.json"), specials)


# -------------------------------------------------------------- export ---

def architecture(config: Union[BertConfig, ElectraConfig], tower: str = "discriminator",
                 with_head: bool = True) -> str:
    """The transformers class a tower exports as (``*ForMaskedLM``, ``*Model``, ...)."""
    cfg = _tower_config(config, tower)
    if not with_head:
        return _ARCHITECTURES[cfg.family][1] if cfg.family != "electra" else "ElectraModel"
    if cfg.family == "electra":
        return "ElectraForPreTraining" if tower == "discriminator" else "ElectraForMaskedLM"
    return _ARCHITECTURES[cfg.family][0]


def write_pretrained(params: Any, config: Union[BertConfig, ElectraConfig], directory: str, *,
                     tower: str = "discriminator", with_head: bool = True,
                     dtype: str = "float32", max_shard_size: Optional[int] = None,
                     vocabulary: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Writes one Hugging Face model directory; see :func:`save_pretrained`.

    Args:
      params, config, tower, with_head: as :func:`save_pretrained`.
      directory: created; weight files of an earlier export there are removed.
      dtype: weight dtype in the files ("float32", "float16", "bfloat16").
      max_shard_size: bytes per safetensors shard before splitting into
        ``model-0000i-of-0000N.safetensors`` + index (default 5 GB).
      vocabulary: the tokenizer's tokens in id order (an imported checkpoint's
        own); None: ProtBert's / our ALBERT pieces.

    Returns:
      ``{"architecture", "files", "parameters"}`` (parameters: values written).
    """
    from protlm_jax import hf_export

    cfg = _tower_config(config, tower)
    arch = architecture(config, tower, with_head)
    counted = {"parameters": 0}

    def counting(tensors):
        for name, w in tensors:
            counted["parameters"] += w.size
            yield name, w

    os.makedirs(directory, exist_ok=True)
    hf_export._remove_stale_weights(directory)
    tensors = hf_tensors_from_params(params, config, with_head=with_head, prefixed=with_head,
                                     tower=tower if cfg.family == "electra" else "")
    files = hf_export.write_safetensors(
        counting(tensors), directory, dtype=dtype,
        max_shard_size=max_shard_size or hf_export.DEFAULT_MAX_SHARD_SIZE)
    _write_json(os.path.join(directory, "config.json"),
                dict(hf_config_dict(cfg, arch), torch_dtype=dtype))
    write_tokenizer(directory, cfg.family, cfg.max_position_embeddings, vocabulary)
    files += ["config.json", *tokenizer_files(cfg.family)]
    return {"architecture": arch, "files": files, "parameters": counted["parameters"]}


def save_pretrained(params: Any, config: Union[BertConfig, ElectraConfig], directory: str, *,
                    tower: str = "discriminator", with_head: bool = True,
                    dtype: str = "float32", max_shard_size: Optional[int] = None) -> str:
    """Writes a Hugging Face directory: config.json, safetensors, tokenizer.

    BERT/ALBERT export as ``*ForMaskedLM`` (``*Model`` without the head when
    ``with_head`` is False). For ELECTRA, ``tower`` picks the
    ``ElectraForPreTraining`` discriminator or the ``ElectraForMaskedLM``
    generator (each gets a copy of the shared embeddings; ``ElectraModel``
    without the head); see :func:`save_electra` for both. Weights go out one
    tensor at a time (``hf_export.write_safetensors``: sharded above
    ``max_shard_size``).

    Returns:
      ``directory``.
    """
    write_pretrained(params, config, directory, tower=tower, with_head=with_head, dtype=dtype,
                     max_shard_size=max_shard_size)
    return directory


def save_electra(params: Any, config: ElectraConfig, directory: str, *,
                 dtype: str = "float32", max_shard_size: Optional[int] = None
                 ) -> Tuple[str, str]:
    """Both ELECTRA towers: the discriminator (``ElectraForPreTraining``) in
    ``directory``, the generator (``ElectraForMaskedLM``) in ``directory/generator``.

    Returns:
      (discriminator directory, generator directory).
    """
    generator = os.path.join(directory, "generator")
    for tower, where in (("discriminator", directory), ("generator", generator)):
        save_pretrained(params, config, where, tower=tower, dtype=dtype,
                        max_shard_size=max_shard_size)
    return directory, generator


# -------------------------------------------------------------- import ---

@dataclasses.dataclass
class ImportedModel:
    """A Hugging Face checkpoint as our config, params and vocabulary.

    ``skipped`` names the tensors of heads we do not model; ``weights`` is the
    file kind read ("safetensors" or "bin").
    """
    config: Union[BertConfig, ElectraConfig]
    params: Dict[str, Any]
    vocabulary: VocabTxtVocabulary
    architecture: str
    has_head: bool
    skipped: List[str] = dataclasses.field(default_factory=list)
    weights: str = ""

    def module(self) -> nn.Module:
        """The Flax module to apply ``params`` with (see :attr:`encode_method`)."""
        from protlm_jax.models import build_model

        return build_model(self.config)[0]

    @property
    def encode_method(self) -> str:
        """The module method giving last hidden states: ``encode``, or
        ``generator_hidden`` for a lone ELECTRA generator."""
        if self.architecture == "ElectraForMaskedLM" and "discriminator" not in self.params:
            return "generator_hidden"
        return "encode"

    def encode(self, tokens: Any, **kwargs) -> jax.Array:
        """Last hidden states [B, L, D] of ``[CLS] seq [SEP]`` token ids [B, L]."""
        return self.module().apply({"params": self.params}, tokens,
                                   method=self.encode_method, **kwargs)


def read_state_dict(directory: str) -> Dict[str, Any]:
    """Tensors of a HF directory: safetensors (single or sharded) or ``pytorch_model.bin``.

    Raises:
      ProtlmError: when no weights file is there or it cannot be read.
    """
    single = os.path.join(directory, "model.safetensors")
    index = os.path.join(directory, "model.safetensors.index.json")
    binary = os.path.join(directory, "pytorch_model.bin")
    try:
        if os.path.isfile(single) or os.path.isfile(index):
            from safetensors.numpy import load_file

            files = ([single] if os.path.isfile(single) else sorted(set(
                os.path.join(directory, f) for f in json.load(open(index))["weight_map"].values())))
            out: Dict[str, Any] = {}
            for f in files:
                try:
                    out.update(load_file(f))
                except TypeError:  # bfloat16 has no numpy dtype: go through torch
                    from safetensors.torch import load_file as load_torch

                    out.update(load_torch(f))
            return out
        if os.path.isfile(binary):
            import torch

            return torch.load(binary, map_location="cpu", weights_only=True)
    except ProtlmError:
        raise
    except Exception as e:  # corrupt or truncated files
        raise ProtlmError(f"{directory}: cannot read the weights: "
                          f"{' '.join(str(e).split())[:200]}") from None
    raise ProtlmError(f"{directory}: no model.safetensors, model.safetensors.index.json "
                      "or pytorch_model.bin")


def _read_config(directory: str) -> Dict[str, Any]:
    path = os.path.join(directory, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise ProtlmError(f"{path}: not found (not a Hugging Face model directory)") from None
    except json.JSONDecodeError as e:
        raise ProtlmError(f"{path}: invalid JSON: {e}") from None


def checkpoint_vocabulary(directory: str, family: str) -> VocabTxtVocabulary:
    """The vocabulary a checkpoint ships (``vocab.txt`` or ``spiece.model``).

    Falls back to ProtBert's (BERT/ELECTRA) or our ALBERT pieces when the
    directory has no tokenizer files.
    """
    txt = os.path.join(directory, "vocab.txt")
    spm = os.path.join(directory, "spiece.model")
    if os.path.isfile(txt):
        return VocabTxtVocabulary.from_vocab_txt(txt)
    if os.path.isfile(spm):
        return VocabTxtVocabulary.from_spiece_model(spm)
    if family == "albert":
        return VocabTxtVocabulary([p for p, _ in albert_pieces()])
    return VocabTxtVocabulary(protbert_vocab_tokens())


def _reader(directory: str) -> Any:
    from protlm_jax.hf_t5 import CheckpointReader

    return CheckpointReader(directory)


def load_pretrained(directory: str, *, generator_directory: Optional[str] = None,
                    mesh: Optional[jax.sharding.Mesh] = None, rules: Optional[Sequence] = None,
                    **overrides) -> ImportedModel:
    """Imports a HF BERT/ALBERT/ELECTRA directory (``*ForMaskedLM``, ``*Model``,
    ``ElectraForPreTraining``; an ``ElectraForMaskedLM`` generator too).

    Everything is checked from names and shapes first (one line on the first
    problem); then tensors are read one at a time (``hf_t5.CheckpointReader``:
    safetensors, sharded or not, memory-mapped; ``.bin`` only through
    ``torch.load(weights_only=True)``) and, with a mesh, placed straight into
    their shardings. Tensors of heads we do not model are listed in a warning
    and skipped.

    Args:
      directory: the HF model directory. For ELECTRA, a discriminator
        (``ElectraForPreTraining`` / ``ElectraModel``) or, alone, a generator.
      generator_directory: ELECTRA: the generator to pair with the
        discriminator (their embeddings must be equal).
      mesh: the ``(data, model)`` mesh to shard onto; None: numpy leaves.
      rules: logical axis rules (default: the "1d" rules).
      **overrides: ``BertConfig`` fields to set (e.g. ``dtype``,
        ``scan_layers``, ``vocab_pad_to_multiple``).

    Returns:
      An :class:`ImportedModel`; for a lone ELECTRA tower the config's other
      tower is a copy of it and its params are absent.

    Raises:
      ProtlmError: one line on unsupported configs and bad tensors.
    """
    hf = _read_config(directory)
    cfg = config_from_hf(hf, os.path.join(directory, "config.json")).replace(**overrides)
    arch = (hf.get("architectures") or [_ARCHITECTURES[cfg.family][0]])[0]
    reader = _reader(directory)
    vocabulary = checkpoint_vocabulary(directory, cfg.family)
    if cfg.family != "electra":
        if generator_directory is not None:
            raise ProtlmError(f"{generator_directory}: a generator goes with an ELECTRA "
                              f"discriminator, not with a {cfg.family} model")
        config: Union[BertConfig, ElectraConfig] = cfg
        sources, skipped = check_tensors(reader, cfg, where=directory)
        has_head = any(p.startswith("mlm_head/") for p in sources)
    elif generator_directory is None:
        tower = "generator" if arch == "ElectraForMaskedLM" else "discriminator"
        config = ElectraConfig(discriminator=cfg, generator=cfg)
        sources, skipped = check_tensors(reader, config, tower=tower, where=directory)
        has_head = any(p.startswith(f"{tower}_head/") for p in sources)
    else:
        if arch == "ElectraForMaskedLM":
            raise ProtlmError(f"{directory}: an ElectraForMaskedLM (a generator); give the "
                              f"discriminator as the model and this as the generator")
        gcfg = config_from_hf(_read_config(generator_directory),
                              os.path.join(generator_directory, "config.json")).replace(**overrides)
        try:
            config = ElectraConfig(discriminator=cfg, generator=gcfg)
        except ValueError as e:
            raise ProtlmError(f"{generator_directory}: {e}") from None
        sources, skipped = check_tensors(reader, config, tower="discriminator", where=directory)
        generator, gskipped = check_tensors(_reader(generator_directory), config,
                                            tower="generator", where=generator_directory)
        for path, (greader, gname, rule) in generator.items():
            if not path.startswith("embeddings/"):
                sources[path] = (greader, gname, rule)
                continue
            dreader, dname, _ = sources[path]
            if not np.array_equal(greader.get(gname), dreader.get(dname)):
                raise ProtlmError(f"{generator_directory}: {path} differs from the "
                                  "discriminator's; ELECTRA towers share their embeddings")
        skipped += gskipped
        has_head = all(any(p.startswith(h) for p in sources)
                       for h in ("discriminator_head/", "generator_head/"))
    if skipped:
        log.warning("%s: skipped %d tensors of heads protlm does not model: %s", directory,
                    len(skipped), _listing(skipped))
    params = assemble_params(sources, config, mesh=mesh, rules=rules)
    return ImportedModel(config, params, vocabulary, arch, has_head, skipped=skipped,
                         weights=reader.kind)
