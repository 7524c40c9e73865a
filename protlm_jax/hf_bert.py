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
with ``torch.load(weights_only=True)``, never unpickled). Exports write
``config.json``, ``model.safetensors`` and the tokenizer: ``vocab.txt`` with
``do_lower_case=False`` (BERT, ELECTRA) or an ALBERT ``spiece.model``.

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
import json
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import numpy as np

from protlm_jax.errors import ProtlmError
from protlm_jax.models import bert, electra
from protlm_jax.models.bert import BertConfig
from protlm_jax.models.electra import ElectraConfig
from protlm_jax.vocabularies import PROTBERT_RESIDUES, VocabTxtVocabulary

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


# Keys we read past: poolers and pretraining heads we do not model, buffers.
_IGNORED = (r"pooler\..*", r"cls\.seq_relationship\..*", r"sop_classifier\..*",
            r".*position_ids", r".*token_type_ids")
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


def _expected_shapes(config: Union[BertConfig, ElectraConfig]) -> Dict[str, Tuple[int, ...]]:
    """Flat path -> shape of our params, unscanned (traced with eval_shape)."""
    if isinstance(config, ElectraConfig):
        unscanned = ElectraConfig(discriminator=config.discriminator.replace(scan_layers=False),
                                  generator=config.generator.replace(scan_layers=False))
        abstract = electra.abstract_params(unscanned)
    else:
        abstract = bert.abstract_params(config.replace(scan_layers=False))
    return {k: tuple(v.shape) for k, v in _flat(nn.meta.unbox(abstract)).items()}


def _scan_towers(config: Union[BertConfig, ElectraConfig]) -> List[Tuple[str, BertConfig]]:
    """(param prefix, config) of each stack whose layers may be scanned."""
    if isinstance(config, ElectraConfig):
        return [("discriminator/", config.discriminator), ("generator/", config.generator)]
    return [("", config)]


def _stack(flat: Dict[str, np.ndarray], config) -> Dict[str, np.ndarray]:
    """Unscanned ``encoder/layers_{i}/X`` -> ``encoder/layers/X`` [N, ...] where scanned."""
    for prefix, cfg in _scan_towers(config):
        if not cfg.scan_layers or cfg.family == "albert":
            continue
        head = f"{prefix}encoder/layers_"
        names = sorted({k[len(head):].split("/", 1)[1] for k in flat if k.startswith(head)})
        if not names:
            continue
        for rest in names:
            flat[f"{prefix}encoder/layers/{rest}"] = np.stack(
                [flat.pop(f"{head}{i}/{rest}") for i in range(cfg.num_hidden_layers)])
    return flat


def _unstack(flat: Dict[str, np.ndarray], config) -> Dict[str, np.ndarray]:
    """Inverse of :func:`_stack`."""
    for prefix, cfg in _scan_towers(config):
        head = f"{prefix}encoder/layers/"
        for key in [k for k in flat if k.startswith(head)]:
            stacked = flat.pop(key)
            for i in range(stacked.shape[0]):
                flat[f"{prefix}encoder/layers_{i}/{key[len(head):]}"] = stacked[i]
    return flat


# ------------------------------------------------------- state dict <-> us ---

def params_from_state_dict(state_dict: Mapping[str, Any],
                           config: Union[BertConfig, ElectraConfig], *, tower: str = "",
                           where: str = "state dict", require_head: Optional[bool] = None
                           ) -> Dict[str, Any]:
    """Converts a Hugging Face state dict into our params pytree.

    Args:
      state_dict: HF name -> array (torch tensors or numpy), with or without
        the ``bert.``/``albert.``/``electra.`` prefix.
      config: our config (``ElectraConfig`` for ELECTRA).
      tower: ELECTRA only: "discriminator" or "generator".
      where: names the source in error messages (a file path).
      require_head: whether the MLM / discriminator head must be complete;
        None: only if any head tensor is present (``*Model`` checkpoints have
        none; the result then embeds but has no head).

    Returns:
      Nested dict of float32 numpy arrays (``{"params": ...}`` ready), holding
      only the parts this checkpoint provides (for ELECTRA, one tower plus the
      shared embeddings).

    Raises:
      ProtlmError: one line naming the tensor: unknown, missing, misshapen,
        or a decoder not tied to the word embeddings.
    """
    cfg = _tower_config(config, tower or "discriminator")
    family = cfg.family
    flat: Dict[str, np.ndarray] = {}
    tied: Dict[str, np.ndarray] = {}
    for name, value in state_dict.items():
        local = name[len(_PREFIX[family]):] if name.startswith(_PREFIX[family]) else name
        if any(re.fullmatch(p, local) for p in _IGNORED):
            continue
        if any(re.fullmatch(p, local) for p in _TIED[family]):
            tied[local] = _to_numpy(value)
            continue
        mapped = map_hf_name(name, family, tower)
        if mapped is None:
            raise ProtlmError(f"{where}: unexpected tensor {name!r} for a Hugging Face "
                              f"{family} {tower or 'model'}")
        path, rule = mapped
        if path in flat:
            raise ProtlmError(f"{where}: two tensors map to {path} (second: {name!r})")
        w = _to_numpy(value)
        flat[path] = (w, rule, name)

    expected = _expected_shapes(config)
    if isinstance(config, ElectraConfig):
        other = "generator" if tower == "discriminator" else "discriminator"
        expected = {k: v for k, v in expected.items() if not k.startswith(other)}
    head_prefixes = ("mlm_head/", "discriminator_head/", "generator_head/")
    has_head = any(p.startswith(head_prefixes) for p in flat)
    if require_head is None:
        require_head = has_head
    out: Dict[str, np.ndarray] = {}
    for path, (w, rule, name) in flat.items():
        if path not in expected:
            raise ProtlmError(f"{where}: tensor {name!r} has no place in this config "
                              f"(no parameter {path})")
        want = expected[path]
        # Compare in HF layout so the message speaks the checkpoint's language.
        want_hf = _to_hf(rule, np.zeros(want, np.float32), _tower_config(config, tower or
                                                                          "discriminator")).shape
        if w.shape != want_hf:
            raise ProtlmError(f"{where}: tensor {name!r} has shape {tuple(w.shape)}, "
                              f"config.json implies {tuple(want_hf)}")
        out[path] = _to_ours(rule, w, _tower_config(config, tower or "discriminator"))
    missing = [p for p in expected if p not in out
               and (require_head or not p.startswith(head_prefixes))]
    if missing:
        raise ProtlmError(f"{where}: missing tensor for {missing[0]}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    word = out.get("embeddings/word_embeddings/embedding")
    for local, w in tied.items():
        if local.endswith("weight") and word is not None and not np.array_equal(
                w, word[:cfg.vocab_size]):
            raise ProtlmError(f"{where}: {local} differs from the word embeddings; untied "
                              f"MLM decoders are not supported")
    bias_path = {"bert": "mlm_head/bias", "albert": "mlm_head/bias",
                 "electra": "generator_head/bias"}[family]
    for local, w in tied.items():
        if local.endswith("decoder.bias") and bias_path not in out:
            out[bias_path] = _to_ours("vocab_vec", w, cfg)
    return _unflat(_stack(out, config))


def state_dict_from_params(params: Any, config: Union[BertConfig, ElectraConfig], *,
                           tower: str = "", with_head: bool = True) -> Dict[str, np.ndarray]:
    """Our params -> a Hugging Face state dict (``*ForMaskedLM`` / ``*ForPreTraining``).

    Args:
      params: our params (arrays, possibly sharded or boxed).
      config: our config.
      tower: ELECTRA only: "discriminator" or "generator".
      with_head: include the MLM / discriminator head.

    Returns:
      HF name (with the base-model prefix) -> float32 numpy array; tied
      decoder weights are left out.
    """
    cfg = _tower_config(config, tower or "discriminator")
    family = cfg.family
    flat = {k: np.asarray(jax.device_get(v), np.float32)
            for k, v in _flat(nn.meta.unbox(params)).items()}
    flat = _unstack(flat, config)
    out: Dict[str, np.ndarray] = {}
    for path, w in flat.items():
        hf = _hf_name(path, family, tower)
        if hf is None:
            continue  # the other ELECTRA tower's params
        name, rule, is_head = hf
        if is_head and not with_head:
            continue
        prefix = "" if is_head else _PREFIX[family]
        out[prefix + name] = np.ascontiguousarray(_to_hf(rule, w, cfg))
    return out


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


def albert_pieces() -> List[Tuple[str, int]]:
    """(piece, sentencepiece type) of our 34-id ALBERT model (order: module docstring)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    t = pb.ModelProto.SentencePiece
    pieces = [("<pad>", t.CONTROL), ("<unk>", t.UNKNOWN), ("[CLS]", t.CONTROL),
              ("[SEP]", t.CONTROL), ("[MASK]", t.USER_DEFINED)]
    pieces += [("\u2581" + r, t.NORMAL) for r in PROTBERT_RESIDUES]
    pieces += [("\u2581", t.NORMAL)] + [(f"<unused{i}>", t.UNUSED) for i in range(3)]
    return pieces


def write_albert_spiece(path: str) -> None:
    """Writes the ALBERT SentencePiece model (unigram, no lower-casing)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    model.trainer_spec.vocab_size = 34
    model.trainer_spec.pad_id, model.trainer_spec.unk_id = 0, 1
    model.trainer_spec.bos_id, model.trainer_spec.eos_id = -1, -1
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    for piece, kind in albert_pieces():
        sp = model.pieces.add()
        sp.piece, sp.type = piece, kind
        sp.score = -10.0 if piece == "\u2581" else 0.0
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def _write_json(path: str, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


def write_tokenizer(directory: str, family: str, max_length: int) -> None:
    """Tokenizer files: ``vocab.txt`` (BERT, ELECTRA) or ``spiece.model`` (ALBERT)."""
    if family == "albert":
        write_albert_spiece(os.path.join(directory, "spiece.model"))
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
            f.write("\n".join(protbert_vocab_tokens()) + "\n")
        tokenizer_class = "ElectraTokenizer" if family == "electra" else "BertTokenizer"
        _write_json(os.path.join(directory, "tokenizer_config.json"), {
            "tokenizer_class": tokenizer_class, "do_lower_case": False,
            "model_max_length": max_length, "unk_token": "[UNK]", "pad_token": "[PAD]",
            "cls_token": "[CLS]", "sep_token": "[SEP]", "mask_token": "[MASK]"})
        specials = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                    "sep_token": "[SEP]", "mask_token": "[MASK]"}
    _write_json(os.path.join(directory, "special_tokens_map.json"), specials)


# -------------------------------------------------------------- export ---

def save_pretrained(params: Any, config: Union[BertConfig, ElectraConfig], directory: str, *,
                    tower: str = "discriminator", with_head: bool = True) -> str:
    """Writes a Hugging Face directory: config.json, model.safetensors, tokenizer.

    BERT/ALBERT export as ``*ForMaskedLM`` (``*Model`` without the head when
    ``with_head`` is False). For ELECTRA, ``tower`` picks the
    ``ElectraForPreTraining`` discriminator or the ``ElectraForMaskedLM``
    generator (each gets a copy of the shared embeddings); see
    :func:`save_electra` for both.

    Returns:
      ``directory``.
    """
    from safetensors.numpy import save_file

    cfg = _tower_config(config, tower)
    if cfg.family == "electra":
        arch = "ElectraForPreTraining" if tower == "discriminator" else "ElectraForMaskedLM"
        if not with_head:
            arch = "ElectraModel"
    else:
        arch = _ARCHITECTURES[cfg.family][0 if with_head else 1]
    tensors = state_dict_from_params(params, config, tower=tower if cfg.family == "electra"
                                     else "", with_head=with_head)
    if not with_head:
        # *Model checkpoints carry no base-model prefix.
        prefix = _PREFIX[cfg.family]
        tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    _write_json(os.path.join(directory, "config.json"), hf_config_dict(cfg, arch))
    write_tokenizer(directory, cfg.family, cfg.max_position_embeddings)
    return directory


def save_electra(params: Any, config: ElectraConfig, directory: str) -> Tuple[str, str]:
    """Both ELECTRA towers: ``directory/discriminator`` and ``directory/generator``."""
    return (save_pretrained(params, config, os.path.join(directory, "discriminator"),
                            tower="discriminator"),
            save_pretrained(params, config, os.path.join(directory, "generator"),
                            tower="generator"))


# -------------------------------------------------------------- import ---

@dataclasses.dataclass
class ImportedModel:
    """A Hugging Face checkpoint as our config, params and vocabulary."""
    config: Union[BertConfig, ElectraConfig]
    params: Dict[str, Any]
    vocabulary: VocabTxtVocabulary
    architecture: str
    has_head: bool

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


def load_pretrained(directory: str, *, generator_directory: Optional[str] = None,
                    **overrides) -> ImportedModel:
    """Imports a HF BERT/ALBERT/ELECTRA directory (``*ForMaskedLM``, ``*Model``,
    ``ElectraForPreTraining``; an ``ElectraForMaskedLM`` generator too).

    Args:
      directory: the HF model directory. For ELECTRA, a discriminator
        (``ElectraForPreTraining`` / ``ElectraModel``) or, alone, a generator.
      generator_directory: ELECTRA: the generator to pair with the
        discriminator (their embeddings must be equal).
      **overrides: ``BertConfig`` fields to set (e.g. ``dtype``,
        ``scan_layers``, ``vocab_pad_to_multiple``).

    Returns:
      An :class:`ImportedModel`; for a lone ELECTRA tower the config's other
      tower is a copy of it and its params are absent.

    Raises:
      ProtlmError: one line on unsupported configs and bad tensors.
    """
    hf = _read_config(directory)
    where = os.path.join(directory, "config.json")
    cfg = config_from_hf(hf, where).replace(**overrides)
    arch = (hf.get("architectures") or [_ARCHITECTURES[cfg.family][0]])[0]
    weights_where = directory
    state = read_state_dict(directory)
    vocabulary = checkpoint_vocabulary(directory, cfg.family)
    if cfg.family != "electra":
        params = params_from_state_dict(state, cfg, where=weights_where)
        return ImportedModel(cfg, params, vocabulary, arch, "mlm_head" in params)
    tower = "generator" if arch == "ElectraForMaskedLM" else "discriminator"
    if generator_directory is None:
        config = ElectraConfig(discriminator=cfg, generator=cfg)
        params = params_from_state_dict(state, config, tower=tower, where=weights_where)
        has_head = f"{tower}_head" in params
        return ImportedModel(config, params, vocabulary, arch, has_head)
    gcfg = config_from_hf(_read_config(generator_directory),
                          os.path.join(generator_directory, "config.json")).replace(**overrides)
    try:
        config = ElectraConfig(discriminator=cfg, generator=gcfg)
    except ValueError as e:
        raise ProtlmError(f"{generator_directory}: {e}") from None
    params = params_from_state_dict(state, config, tower="discriminator", where=weights_where)
    gparams = params_from_state_dict(read_state_dict(generator_directory), config,
                                     tower="generator", where=generator_directory)
    for k, v in _flat(gparams.pop("embeddings")).items():
        if not np.array_equal(v, _flat(params["embeddings"])[k]):
            raise ProtlmError(f"{generator_directory}: embeddings/{k} differs from the "
                              "discriminator's; ELECTRA towers share their embeddings")
    params.update(gparams)
    return ImportedModel(config, params, vocabulary, arch,
                         "discriminator_head" in params and "generator_head" in params)
