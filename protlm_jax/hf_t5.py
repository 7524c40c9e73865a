"""Hugging Face T5 <-> protlm-jax T5: key mapping, configs, checkpoint reading.

One table, ``HF_KEY_TABLE``, maps every HF parameter name pattern to the path
of our parameter and says how the array is laid out; both directions (import
and export, ``hf_export.py``) use it:

  "copy"      same array                            (embedding, norms)
  "T"         transpose                             torch Linear [out, in] -> [in, out];
                                                    relpos table [R, H] -> [H, R]
  "heads_in"  [H*K, D] -> [D, H, K]                 q, k, v
  "heads_out" [D, H*K] -> [H, K, D]                 o

``load_pretrained`` reads a Hugging Face directory (``config.json`` plus
``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``,
or a ``pytorch_model.bin`` read only with ``torch.load(weights_only=True)``)
tensor by tensor straight into each parameter's sharding on a mesh.

Tying and scaling of the LM head (REFERENCE §9): configs written by
transformers 4 have no ``scale_decoder_outputs``; there ``tie_word_embeddings``
(default true) decides the d_model**-0.5 scaling. transformers 5 ties the head
unless the checkpoint's ``lm_head.weight`` differs from ``shared.weight``; so a
published ProtT5 checkpoint (no ``tie_word_embeddings``, its own
``lm_head.weight``) imports untied *and* scaled, as transformers 5 loads it.

Shape legend: D d_model, H heads, K d_kv, F d_ff, V vocab, R relpos buckets,
N layers.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import numpy as np

from protlm_jax.errors import ProtlmError
from protlm_jax.models import t5
from protlm_jax.models.t5 import T5Config

log = logging.getLogger(__name__)

# (HF name regex, our path template, transform). ``{stack}`` and ``{i}`` come
# from the named groups; ``{proj}`` maps q/k/v to query/key/value.
HF_KEY_TABLE: Tuple[Tuple[str, str, str], ...] = (
    (r"shared\.weight", "token_embedder/embedding", "copy"),
    (r"(?P<stack>encoder|decoder)\.block\.0\.layer\.0\.SelfAttention"
     r"\.relative_attention_bias\.weight", "{stack}/relpos_bias/rel_embedding", "T"),
    # Encoder block: layer.0 self-attention, layer.1 feed-forward.
    (r"encoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.(?P<proj>[qkv])\.weight",
     "encoder/layers_{i}/attention/{proj}/kernel", "heads_in"),
    (r"encoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.o\.weight",
     "encoder/layers_{i}/attention/out/kernel", "heads_out"),
    (r"encoder\.block\.(?P<i>\d+)\.layer\.0\.layer_norm\.weight",
     "encoder/layers_{i}/pre_attention_layer_norm/scale", "copy"),
    (r"encoder\.block\.(?P<i>\d+)\.layer\.1\.DenseReluDense\.(?P<wi>wi|wi_0|wi_1|wo)\.weight",
     "encoder/layers_{i}/mlp/{wi}/kernel", "T"),
    (r"encoder\.block\.(?P<i>\d+)\.layer\.1\.layer_norm\.weight",
     "encoder/layers_{i}/pre_mlp_layer_norm/scale", "copy"),
    (r"encoder\.final_layer_norm\.weight", "encoder/encoder_norm/scale", "copy"),
    # Decoder block: layer.0 self-attention, layer.1 cross-attention, layer.2 FF.
    (r"decoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.(?P<proj>[qkv])\.weight",
     "decoder/layers_{i}/self_attention/{proj}/kernel", "heads_in"),
    (r"decoder\.block\.(?P<i>\d+)\.layer\.0\.SelfAttention\.o\.weight",
     "decoder/layers_{i}/self_attention/out/kernel", "heads_out"),
    (r"decoder\.block\.(?P<i>\d+)\.layer\.0\.layer_norm\.weight",
     "decoder/layers_{i}/pre_self_attention_layer_norm/scale", "copy"),
    (r"decoder\.block\.(?P<i>\d+)\.layer\.1\.EncDecAttention\.(?P<proj>[qkv])\.weight",
     "decoder/layers_{i}/encoder_decoder_attention/{proj}/kernel", "heads_in"),
    (r"decoder\.block\.(?P<i>\d+)\.layer\.1\.EncDecAttention\.o\.weight",
     "decoder/layers_{i}/encoder_decoder_attention/out/kernel", "heads_out"),
    (r"decoder\.block\.(?P<i>\d+)\.layer\.1\.layer_norm\.weight",
     "decoder/layers_{i}/pre_cross_attention_layer_norm/scale", "copy"),
    (r"decoder\.block\.(?P<i>\d+)\.layer\.2\.DenseReluDense\.(?P<wi>wi|wi_0|wi_1|wo)\.weight",
     "decoder/layers_{i}/mlp/{wi}/kernel", "T"),
    (r"decoder\.block\.(?P<i>\d+)\.layer\.2\.layer_norm\.weight",
     "decoder/layers_{i}/pre_mlp_layer_norm/scale", "copy"),
    (r"decoder\.final_layer_norm\.weight", "decoder/decoder_norm/scale", "copy"),
    (r"lm_head\.weight", "decoder/logits_dense/kernel", "T"),
)

# Keys that carry no parameter of their own: the stacks' copies of the shared
# embedding (checked equal to it on import), and a cross-attention bias some
# old checkpoints hold (unused by transformers too).
HF_IGNORED_KEYS = (
    r"(encoder|decoder)\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)

_PROJ = {"q": "query", "k": "key", "v": "value"}
# HF (is_gated_act, dense_act_fn) -> our feed_forward_proj.
_ACTIVATIONS = {(False, "relu"): "relu", (True, "gelu_new"): "gated-gelu",
                (True, "silu"): "gated-silu"}
# transformers.T5Config defaults, for keys a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                    num_heads=8, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.1,
                    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)
_MAX_LISTED = 12


# ------------------------------------------------------------ the mapping ---

def _to_ours(rule: str, w: np.ndarray, config: T5Config) -> np.ndarray:
    h, k = config.num_heads, config.d_kv
    if rule == "copy":
        return w
    if rule == "T":
        return w.T
    if rule == "heads_in":
        return w.T.reshape(w.shape[1], h, k)
    if rule == "heads_out":
        return w.T.reshape(h, k, w.shape[0])
    raise ValueError(f"unknown transform {rule!r}")


def _to_hf(rule: str, w: np.ndarray, config: T5Config) -> np.ndarray:
    h, k = config.num_heads, config.d_kv
    if rule == "copy":
        return w
    if rule == "T":
        return w.T
    if rule == "heads_in":   # [D, H, K] -> [H*K, D]
        return w.reshape(w.shape[0], h * k).T
    if rule == "heads_out":  # [H, K, D] -> [D, H*K]
        return w.reshape(h * k, w.shape[-1]).T
    raise ValueError(f"unknown transform {rule!r}")


def map_hf_name(name: str) -> Optional[Tuple[str, str]]:
    """HF parameter name -> (our unscanned param path, transform), or None."""
    for pattern, template, rule in HF_KEY_TABLE:
        m = re.fullmatch(pattern, name)
        if m:
            groups = m.groupdict()
            if "proj" in groups:
                groups["proj"] = _PROJ[groups["proj"]]
            return template.format(**groups), rule
    return None


def _scanned_path(path: str, scan_layers: bool) -> Tuple[str, Optional[int]]:
    """Unscanned path -> (path of the params leaf, layer index within it or None)."""
    m = re.fullmatch(r"(encoder|decoder)/layers_(\d+)/(.*)", path)
    if scan_layers and m:
        return f"{m[1]}/layers/{m[3]}", int(m[2])
    return path, None


def hf_parameter_shapes(config: T5Config, encoder_only: bool = False,
                        lm_head: Optional[bool] = None) -> Dict[str, Tuple[int, ...]]:
    """Every HF parameter of the architecture with its shape (state-dict order).

    Written from the HF layout (not from our model) so tests can check the
    mapping against both sides.

    Args:
      config: our config.
      encoder_only: the ``T5EncoderModel`` parameters (``shared`` + ``encoder``).
      lm_head: include ``lm_head.weight``; default: when the head is untied.

    Returns:
      name -> shape, without the stacks' ``embed_tokens`` aliases.
    """
    d, f, v = config.d_model, config.d_ff, config.vocab_size
    inner, r, h = config.num_heads * config.d_kv, config.relative_attention_num_buckets, \
        config.num_heads
    ff = ("wi_0", "wi_1", "wo") if config.feed_forward_proj.startswith("gated") else ("wi", "wo")
    out: Dict[str, Tuple[int, ...]] = {"shared.weight": (v, d)}

    def attention(prefix: str, bias: bool) -> None:
        for p in "qkv":
            out[f"{prefix}.{p}.weight"] = (inner, d)
        out[f"{prefix}.o.weight"] = (d, inner)
        if bias:
            out[f"{prefix}.relative_attention_bias.weight"] = (r, h)

    def feed_forward(prefix: str) -> None:
        for name in ff:
            out[f"{prefix}.DenseReluDense.{name}.weight"] = (d, f) if name == "wo" else (f, d)
        out[f"{prefix}.layer_norm.weight"] = (d,)

    for i in range(config.num_encoder_layers):
        attention(f"encoder.block.{i}.layer.0.SelfAttention", bias=i == 0)
        out[f"encoder.block.{i}.layer.0.layer_norm.weight"] = (d,)
        feed_forward(f"encoder.block.{i}.layer.1")
    out["encoder.final_layer_norm.weight"] = (d,)
    if encoder_only:
        return out
    for i in range(config.num_decoder_layers):
        attention(f"decoder.block.{i}.layer.0.SelfAttention", bias=i == 0)
        out[f"decoder.block.{i}.layer.0.layer_norm.weight"] = (d,)
        attention(f"decoder.block.{i}.layer.1.EncDecAttention", bias=False)
        out[f"decoder.block.{i}.layer.1.layer_norm.weight"] = (d,)
        feed_forward(f"decoder.block.{i}.layer.2")
    out["decoder.final_layer_norm.weight"] = (d,)
    if lm_head if lm_head is not None else not config.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    return out


def _flat(tree: Any) -> Dict[str, Any]:
    return {"/".join(str(getattr(k, "key", k)) for k in path): leaf
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _to_numpy(w: Any) -> np.ndarray:
    # torch tensors (possibly bfloat16) and numpy arrays alike; params are float32.
    if hasattr(w, "detach"):
        w = w.detach().cpu()
        w = (w if w.dtype.is_floating_point else w.double()).float().numpy()
    return np.asarray(w, dtype=np.float32)


def _set(tree: Dict[str, Any], path: str, value: np.ndarray) -> None:
    *parents, leaf = path.split("/")
    for p in parents:
        tree = tree.setdefault(p, {})
    if leaf in tree:
        raise ValueError(f"two HF keys map to {path}")
    tree[leaf] = value


def _stack_layers(stack: Dict[str, Any], num_layers: int) -> None:
    """Replaces ``layers_0..N-1`` by one ``layers`` subtree with a leading N axis."""
    per_layer = [stack.pop(f"layers_{i}") for i in range(num_layers)]

    def stack_trees(trees):
        if isinstance(trees[0], dict):
            return {key: stack_trees([t[key] for t in trees]) for key in trees[0]}
        return np.stack(trees, axis=0)
    stack["layers"] = stack_trees(per_layer)


def params_from_hf_state_dict(state_dict: Mapping[str, Any], config: T5Config,
                              encoder_only: bool = False) -> Dict[str, Any]:
    """Converts an in-memory Hugging Face T5 ``state_dict`` into our params pytree.

    ``lm_head.weight`` is used only when ``config.tie_word_embeddings`` is
    False. Decoder keys are ignored when ``encoder_only``. (Files on disk go
    through ``load_pretrained``, which reads tensor by tensor.)

    Args:
      state_dict: HF parameter name -> array (torch tensors or numpy).
      config: our config of the same shape; ``scan_layers`` selects stacked
        per-layer params.
      encoder_only: build params for ``T5EncoderOnly``.

    Returns:
      Nested dict of float32 numpy arrays, usable as ``{"params": ...}``.

    Raises:
      ValueError: on unknown keys, missing parameters or wrong shapes.
    """
    params: Dict[str, Any] = {}
    for name, value in state_dict.items():
        if any(re.fullmatch(p, name) for p in HF_IGNORED_KEYS):
            continue
        if name == "lm_head.weight" and (config.tie_word_embeddings or encoder_only):
            continue
        if encoder_only and name.startswith("decoder."):
            continue
        mapped = map_hf_name(name)
        if mapped is None:
            raise ValueError(f"unknown Hugging Face T5 parameter {name!r}")
        path, rule = mapped
        _set(params, path, _to_ours(rule, _to_numpy(value), config))

    _check_complete(params, config, encoder_only)
    if config.scan_layers:
        _stack_layers(params["encoder"], config.num_encoder_layers)
        if not encoder_only:
            _stack_layers(params["decoder"], config.num_decoder_layers)
    return params


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: T5Config, encoder_only: bool) -> Dict[str, Tuple[int, ...]]:
    """Flat path -> shape of the params (traced once per config)."""
    expected = nn.meta.unbox(t5.abstract_params(config, encoder_only=encoder_only))
    return {k: tuple(v.shape) for k, v in _flat(expected).items()}


def _shape_key(config: T5Config) -> T5Config:
    # Fields that do not change shapes are normalised so the cache hits.
    return config.replace(dtype="float32", remat_policy="none", dropout_rate=0.0)


def _check_complete(params: Dict[str, Any], config: T5Config, encoder_only: bool) -> None:
    """Compares against the shapes the model expects (unscanned layout)."""
    flat_expected = _expected_shapes(_shape_key(config.replace(scan_layers=False)),
                                     encoder_only)
    flat_got = {k: v.shape for k, v in _flat(params).items()}
    missing = sorted(set(flat_expected) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_expected))
    if missing or extra:
        raise ValueError(f"state dict does not fit the config: missing {missing}, "
                         f"unexpected {extra}")
    bad = {k: (flat_got[k], flat_expected[k]) for k in flat_expected
           if tuple(flat_got[k]) != tuple(flat_expected[k])}
    if bad:
        raise ValueError(f"shape mismatch (got, expected): {bad}")


def _host(x: Any) -> np.ndarray:
    """A (possibly sharded, possibly multi-host) array as float32 numpy."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        x = multihost_utils.process_allgather(x, tiled=True)
    return np.asarray(jax.device_get(x), dtype=np.float32)


def hf_tensors_from_params(params: Any, config: T5Config, encoder_only: bool = False
                           ) -> Iterator[Tuple[str, np.ndarray]]:
    """Our params -> (HF name, float32 array in HF layout), one tensor at a time.

    Only one tensor is on the host at a time (a scanned stack yields its layers
    one by one). ``lm_head.weight`` comes only from an untied head; the
    exporter decides what to write for the other head variants.

    Args:
      params: params of ``T5`` (or ``T5EncoderOnly`` when ``encoder_only``),
        scanned or not as ``config.scan_layers`` says; numpy or jax arrays.
      config: their config.
      encoder_only: yield only ``shared`` and ``encoder.*``.
    """
    flat = _flat(params)
    for name in hf_parameter_shapes(config, encoder_only):
        path, rule = map_hf_name(name)
        leaf_path, layer = _scanned_path(path, config.scan_layers)
        w = flat[leaf_path]
        w = _host(w if layer is None else w[layer])
        yield name, np.ascontiguousarray(_to_hf(rule, w, config))


# ---------------------------------------------------------------- configs ---

def _listing(items: Sequence[str]) -> str:
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def t5config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> T5Config:
    """Our ``T5Config`` for a Hugging Face T5 ``config.json`` (transformers 4 or 5).

    ``scale_decoder_outputs`` is the file's own key when present (transformers
    5), else ``tie_word_embeddings`` (default true; transformers 4). The head is
    returned tied; whether it is really tied depends on the checkpoint's
    tensors (``load_pretrained`` decides).

    Args:
      hf: the parsed ``config.json``.
      where: the file, for messages.

    Returns:
      The config (float32 activations, unscanned).

    Raises:
      ProtlmError: one line listing every unsupported option.
    """
    problems: List[str] = []
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        problems.append(f"model_type {model_type!r} (only T5 and mT5 share the T5 "
                        f"architecture modelled here)")
    ffp = str(hf.get("feed_forward_proj", "relu"))
    parts = ffp.split("-")
    if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
        problems.append(f"feed_forward_proj {ffp!r} is not of the form ACT or gated-ACT")
    gated = parts[0] == "gated"
    act = "gelu_new" if ffp == "gated-gelu" else parts[-1]
    # transformers 5 lets explicit is_gated_act / dense_act_fn keys win.
    gated = bool(hf.get("is_gated_act", gated))
    act = str(hf.get("dense_act_fn", act))
    kind = _ACTIVATIONS.get((gated, act))
    if kind is None:
        problems.append(
            f"feed-forward activation {'gated ' if gated else ''}{act!r} (feed_forward_proj "
            f"{ffp!r}) is not supported; supported: relu, gated-gelu (gelu_new), gated-silu")
    values = {k: hf.get(k, default) for k, default in _HF_DEFAULTS.items()}
    num_decoder_layers = hf.get("num_decoder_layers")  # None: as many as the encoder
    values["num_decoder_layers"] = (values["num_layers"] if num_decoder_layers is None
                                    else num_decoder_layers)
    for key in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
        v = values[key]
        if isinstance(v, list) and len(v) == 1:
            values[key] = v[0]
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance"):
        v = values[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{key} {v!r} (a positive integer is needed)")
    for key in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if not isinstance(values[key], int) or isinstance(values[key], bool):
            problems.append(f"{key} {values[key]!r} (one integer id is needed)")
    buckets = values["relative_attention_num_buckets"]
    if isinstance(buckets, int) and buckets % 2:
        problems.append(f"relative_attention_num_buckets {buckets} (odd counts split "
                        f"unevenly between the encoder's two directions)")
    if hf.get("is_decoder"):
        problems.append("is_decoder true (a decoder-only T5 stack)")
    if problems:
        raise ProtlmError(f"{where}: unsupported T5 config: {'; '.join(problems)}")
    scale = hf.get("scale_decoder_outputs")
    if scale is None:
        scale = hf.get("tie_word_embeddings", True) is not False
    return T5Config(
        vocab_size=values["vocab_size"], d_model=values["d_model"], num_heads=values["num_heads"],
        d_kv=values["d_kv"], d_ff=values["d_ff"], num_encoder_layers=values["num_layers"],
        num_decoder_layers=values["num_decoder_layers"],
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=values["relative_attention_max_distance"],
        dropout_rate=float(values["dropout_rate"]),
        layer_norm_epsilon=float(values["layer_norm_epsilon"]), feed_forward_proj=kind,
        tie_word_embeddings=True, scale_decoder_outputs=bool(scale),
        pad_id=values["pad_token_id"], eos_id=values["eos_token_id"],
        decoder_start_token_id=values["decoder_start_token_id"])


def hf_config_dict(config: T5Config, *, encoder_only: bool = False,
                   torch_dtype: str = "float32") -> Dict[str, Any]:
    """A ``config.json`` that transformers 4 and 5 read the same way.

    Written for the head as exported (``hf_export``): tied heads are scaled
    (T5 v1.0), untied heads unscaled (T5 v1.1), so ``tie_word_embeddings``
    and ``scale_decoder_outputs`` always agree and both conventions (REFERENCE
    §9) give the same model. The exporter folds a scaled untied head into the
    weights and writes a copy of the embedding for an unscaled tied one.
    """
    import transformers  # local: the library is usable without transformers

    tie = config.tie_word_embeddings and config.scale_decoder_outputs
    gated = config.feed_forward_proj.startswith("gated")
    return {
        "architectures": ["T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.d_kv,
        "d_ff": config.d_ff, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": config.feed_forward_proj,
        "dense_act_fn": {"relu": "relu", "gated-gelu": "gelu_new",
                         "gated-silu": "silu"}[config.feed_forward_proj],
        "is_gated_act": gated,
        "is_encoder_decoder": True, "use_cache": True,
        "pad_token_id": config.pad_id, "eos_token_id": config.eos_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "tie_word_embeddings": tie, "scale_decoder_outputs": tie,
        "dtype": torch_dtype, "torch_dtype": torch_dtype,
        "transformers_version": transformers.__version__,
    }


def hf_config_from_t5config(config: T5Config):
    """The ``transformers.T5Config`` of the same architecture (transformers 5).

    ``scale_decoder_outputs`` is set explicitly. ``tie_word_embeddings`` stays
    True in the returned object: in transformers 5 it also ties the stacks'
    ``embed_tokens`` to ``shared``, and an untied LM head comes from a
    checkpoint whose ``lm_head.weight`` differs from ``shared.weight``. (The
    ``config.json`` the exporter writes is ``hf_config_dict``.)

    Args:
      config: our config.

    Returns:
      A ``transformers.T5Config``.
    """
    import transformers  # local: the library is usable without transformers

    hf = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
        d_ff=config.d_ff, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate, layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj=config.feed_forward_proj, pad_token_id=config.pad_id,
        eos_token_id=config.eos_id, decoder_start_token_id=config.decoder_start_token_id,
        scale_decoder_outputs=config.scale_decoder_outputs)
    return hf


# ------------------------------------------------------ checkpoint reading ---

class CheckpointReader:
    """Lazy, tensor-by-tensor access to the weights of a Hugging Face directory.

    Reads ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
    ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``, in that order of
    preference. safetensors files are memory-mapped and read one tensor at a
    time; ``.bin`` files go only through ``torch.load(weights_only=True)``
    (memory-mapped when the file allows), never a full unpickler.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._files: Dict[str, str] = {}     # tensor name -> file
        self._open: Dict[str, Any] = {}      # file -> safe_open handle or state dict
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        candidates = [("model.safetensors.index.json", "safetensors"),
                      ("model.safetensors", "safetensors"),
                      ("pytorch_model.bin.index.json", "bin"),
                      ("pytorch_model.bin", "bin")]
        for filename, kind in candidates:
            path = os.path.join(hf_dir, filename)
            if os.path.isfile(path):
                break
        else:
            raise ProtlmError(f"{hf_dir}: no model.safetensors(.index.json) or "
                              f"pytorch_model.bin(.index.json) in this directory")
        self.kind = kind
        if filename.endswith(".index.json"):
            index = _read_json(path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ProtlmError(f"{path}: no 'weight_map' of tensor name -> file")
            files = {}
            for name, shard in weight_map.items():
                files[name] = os.path.join(hf_dir, shard)
            missing = sorted({f for f in files.values() if not os.path.isfile(f)})
            if missing:
                raise ProtlmError(f"{path}: shard files missing: "
                                  f"{_listing([os.path.basename(f) for f in missing])}")
        else:
            files = None
        shard_files = sorted(set(files.values())) if files else [path]
        for shard in shard_files:
            for name, shape in self._scan(shard).items():
                if files is not None and files.get(name) != shard:
                    continue  # the index says another shard holds it (or none)
                self._files[name] = shard
                self._shapes[name] = shape
        if files is not None:
            absent = sorted(n for n in files if n not in self._files)
            if absent:
                raise ProtlmError(f"{path}: tensors listed in the index are not in their "
                                  f"shard files: {_listing(absent)}")

    def _scan(self, path: str) -> Dict[str, Tuple[int, ...]]:
        """Opens one file lazily; returns its tensor names and shapes."""
        if self.kind == "safetensors":
            from safetensors import safe_open

            _check_safetensors_extent(path)
            try:
                handle = safe_open(path, framework="pt")
                shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}
            except Exception as e:  # safetensors raises its own error types
                raise ProtlmError(f"{path}: not a readable safetensors file "
                                  f"({type(e).__name__}: {e})") from None
            self._open[path] = handle
            return shapes
        import pickle

        import torch

        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise ProtlmError(f"{path}: cannot be read with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise ProtlmError(f"{path}: holds a {type(state).__name__}, not a state dict")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self._open[path] = state
        return {n: tuple(t.shape) for n, t in state.items() if hasattr(t, "shape")}

    def keys(self) -> List[str]:
        return list(self._files)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bfloat16/float16 upcast)."""
        path = self._files[name]
        try:
            if self.kind == "safetensors":
                tensor = self._open[path].get_tensor(name)
            else:
                tensor = self._open[path][name]
            return _to_numpy(tensor)
        except ProtlmError:
            raise
        except Exception as e:
            raise ProtlmError(f"{path}: tensor {name} cannot be read "
                              f"({type(e).__name__}: {e})") from None


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ProtlmError(f"{path}: not valid JSON ({e})") from None
    except OSError as e:
        raise ProtlmError(f"{path}: cannot be read ({e.strerror})") from None


def _check_safetensors_extent(path: str) -> None:
    """Names a truncated file as such: its header promises more bytes than it has.

    Anything else wrong with the file is left to ``safe_open`` to report.
    """
    import struct

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > size:
                raise ProtlmError(f"{path}: truncated safetensors file ({size:,} bytes, "
                                  f"shorter than its {header_len:,}-byte header)")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        return
    if 8 + header_len + end > size:
        raise ProtlmError(f"{path}: truncated safetensors file ({size:,} bytes; its "
                          f"header describes {8 + header_len + end:,})")


def read_hf_config(hf_dir: str) -> Dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face directory."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ProtlmError(f"{hf_dir}: no config.json (not a Hugging Face model directory)")
    hf = _read_json(path)
    if not isinstance(hf, dict):
        raise ProtlmError(f"{path}: expected a JSON object")
    return hf


def inspect_pretrained(hf_dir: str, encoder_only: Optional[bool] = None
                       ) -> Tuple[T5Config, bool, CheckpointReader, List[str]]:
    """Checks a Hugging Face T5 directory against its config, reading no weights
    beyond the small embedding/head tensors needed to decide tying.

    Args:
      hf_dir: the directory.
      encoder_only: True: only ``shared`` + ``encoder.*`` are needed; False:
        the whole encoder-decoder; None: whatever the checkpoint holds.

    Returns:
      (config with the head's tying decided, encoder_only, reader, names of
      skipped tensors of heads we do not model).

    Raises:
      ProtlmError: one line naming every unsupported option, missing tensor,
        misshapen tensor and unsupported tensor.
    """
    config = t5config_from_hf(read_hf_config(hf_dir), os.path.join(hf_dir, "config.json"))
    reader = CheckpointReader(hf_dir)
    names = set(reader.keys())
    has_decoder = any(n.startswith("decoder.") for n in names)
    if encoder_only is None:
        encoder_only = not has_decoder
    elif not encoder_only and not has_decoder:
        raise ProtlmError(f"{hf_dir}: an encoder-only checkpoint (T5EncoderModel: no "
                          f"decoder tensors); it loads only as an encoder")
    shared = reader.get("shared.weight") if "shared.weight" in names else None
    tied = True
    if not encoder_only and "lm_head.weight" in names and shared is not None:
        tied = reader.shape("lm_head.weight") == shared.shape and np.array_equal(
            reader.get("lm_head.weight"), shared)
    config = config.replace(tie_word_embeddings=tied)

    expected = hf_parameter_shapes(config, encoder_only)
    missing = [n for n in expected if n not in names]
    misshapen = [f"{n} {list(reader.shape(n))} (config: {list(s)})"
                 for n, s in expected.items() if n in names and reader.shape(n) != tuple(s)]
    unsupported, skipped = [], []
    for n in sorted(names - set(expected)):
        if any(re.fullmatch(p, n) for p in HF_IGNORED_KEYS):
            if (n.endswith("embed_tokens.weight") and shared is not None
                    and not (encoder_only and n.startswith("decoder."))
                    and not np.array_equal(reader.get(n), shared)):
                unsupported.append(f"{n} (differs from shared.weight: untied input "
                                   f"embeddings are not modelled)")
            continue
        if encoder_only and (n.startswith("decoder.") or n == "lm_head.weight"):
            continue  # present but not needed
        if n == "lm_head.weight" and tied:
            continue  # equal to shared.weight: tied
        if n.startswith(("shared.", "encoder.", "decoder.")):
            unsupported.append(n)  # inside the network: ignoring it would change outputs
        else:
            skipped.append(n)
    problems = []
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if misshapen:
        problems.append(f"wrong shapes: {_listing(misshapen)}")
    if unsupported:
        problems.append(f"tensors this T5 does not model: {_listing(unsupported)}")
    if problems:
        raise ProtlmError(f"{hf_dir}: checkpoint does not match its config.json: "
                          f"{'; '.join(problems)}")
    if skipped:
        log.warning("%s: skipped %d tensors of heads protlm does not model: %s",
                    hf_dir, len(skipped), _listing(skipped))
    return config, encoder_only, reader, skipped


def load_pretrained(hf_dir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
                    encoder_only: bool = True, rules: Optional[Sequence] = None,
                    **config_overrides: Any) -> Tuple[T5Config, Any]:
    """Loads a Hugging Face T5 directory (e.g. ProtT5-XL) as our config and params.

    Tensors are read one at a time and placed straight into their parameter's
    ``NamedSharding`` on ``mesh`` (each device receives only its shard; the
    host holds one parameter at a time, a whole layer stack when
    ``scan_layers``). Without a mesh the params land on the default device.

    Args:
      hf_dir: a directory with ``config.json`` and weights (see
        ``CheckpointReader``): ``T5ForConditionalGeneration`` or
        ``T5EncoderModel``.
      mesh: the ``(data, model)`` mesh to shard onto, or None.
      encoder_only: params of ``T5EncoderOnly`` (True) or of ``T5``.
      rules: logical axis rules (default: the "1d" rules).
      **config_overrides: ``T5Config`` fields to change, e.g.
        ``scan_layers=True`` or ``dtype="bfloat16"`` (shapes stay).

    Returns:
      (config, params) with float32 ``jax.Array`` leaves.

    Raises:
      ProtlmError: one line listing unsupported options, missing or misshapen
        tensors, or an unreadable file.
    """
    config, encoder_only, reader, _ = inspect_pretrained(hf_dir, encoder_only)
    config = config.replace(**config_overrides)
    return config, params_from_reader(reader, config, encoder_only, mesh=mesh, rules=rules)


def params_from_reader(reader: CheckpointReader, config: T5Config, encoder_only: bool, *,
                       mesh: Optional[jax.sharding.Mesh] = None,
                       rules: Optional[Sequence] = None) -> Any:
    """Builds the params pytree leaf by leaf from a checked ``CheckpointReader``."""
    from protlm_jax import partitioning

    boxed = t5.abstract_params(config, encoder_only=encoder_only)
    if mesh is not None:
        rules = rules or partitioning.standard_logical_axis_rules("1d")
        shardings, abstract = partitioning.param_shardings(boxed, mesh, rules)
        flat_shardings = _flat(shardings)
    else:
        abstract, flat_shardings = nn.meta.unbox(boxed), {}
    sources: Dict[str, List[Tuple[Optional[int], str, str]]] = {}
    for name in hf_parameter_shapes(config, encoder_only):
        path, rule = map_hf_name(name)
        leaf_path, layer = _scanned_path(path, config.scan_layers)
        sources.setdefault(leaf_path, []).append((layer, name, rule))

    def load_leaf(path: str, leaf: jax.ShapeDtypeStruct) -> jax.Array:
        parts = sorted(sources[path], key=lambda s: -1 if s[0] is None else s[0])
        arrays = [_to_ours(rule, reader.get(name), config) for _, name, rule in parts]
        host = arrays[0] if parts[0][0] is None else np.stack(arrays)
        del arrays
        assert host.shape == tuple(leaf.shape), (path, host.shape, leaf.shape)
        sharding = flat_shardings.get(path)
        if sharding is None:
            return jax.device_put(host)
        return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

    flat_abstract = _flat(abstract)
    missing = sorted(set(flat_abstract) - set(sources))
    if missing:  # the table and the model disagree: a bug, not bad input
        raise AssertionError(f"no HF tensor maps to {missing}")
    loaded = {path: load_leaf(path, leaf) for path, leaf in flat_abstract.items()}
    leaves = [loaded[p] for p in _flat(abstract)]
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract), leaves)
