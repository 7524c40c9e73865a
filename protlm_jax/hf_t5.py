"""Hugging Face T5 <-> protlm-jax T5: key mapping and config translation.

Minimal import direction (HF ``state_dict`` -> our params); export builds on
the same table. ``HF_KEY_TABLE`` lists every HF parameter name pattern with
the path of our parameter and how the array is reshaped:

  "copy"      same array                            (embedding, norms)
  "T"         transpose                             torch Linear [out, in] -> [in, out];
                                                    relpos table [R, H] -> [H, R]
  "heads_in"  [H*K, D] -> [D, H, K]                 q, k, v
  "heads_out" [D, H*K] -> [H, K, D]                 o

Shape legend: D d_model, H heads, K d_kv, F d_ff, V vocab, R relpos buckets,
N layers.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Dict, Mapping, Tuple

import flax.linen as nn
import jax
import numpy as np

from protlm_jax.models import t5
from protlm_jax.models.t5 import T5Config

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
# embedding, and a cross-attention bias some old checkpoints hold (unused).
HF_IGNORED_KEYS = (
    r"(encoder|decoder)\.embed_tokens\.weight",
    r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",
)

_PROJ = {"q": "query", "k": "key", "v": "value"}


def _transform(rule: str, w: np.ndarray, config: T5Config) -> np.ndarray:
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


def _to_numpy(w: Any) -> np.ndarray:
    # torch tensors (possibly bfloat16) and numpy arrays alike; params are float32.
    if hasattr(w, "detach"):
        w = w.detach().cpu().float().numpy()
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
    """Converts a Hugging Face T5 ``state_dict`` into our params pytree.

    ``lm_head.weight`` is used only when ``config.tie_word_embeddings`` is
    False; with tied embeddings it is ignored (ProtT5 checkpoints store one
    although their config ties). Decoder keys are ignored when
    ``encoder_only``.

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
        for pattern, template, rule in HF_KEY_TABLE:
            m = re.fullmatch(pattern, name)
            if m:
                groups = m.groupdict()
                if "proj" in groups:
                    groups["proj"] = _PROJ[groups["proj"]]
                _set(params, template.format(**groups),
                     _transform(rule, _to_numpy(value), config))
                break
        else:
            raise ValueError(f"unknown Hugging Face T5 parameter {name!r}")

    _check_complete(params, config, encoder_only)
    if config.scan_layers:
        _stack_layers(params["encoder"], config.num_encoder_layers)
        if not encoder_only:
            _stack_layers(params["decoder"], config.num_decoder_layers)
    return params


@functools.lru_cache(maxsize=16)
def _expected_shapes(config: T5Config, encoder_only: bool) -> Dict[str, Tuple[int, ...]]:
    """Flat path -> shape of the unscanned params (traced once per config)."""
    expected = nn.meta.unbox(t5.abstract_params(config.replace(scan_layers=False),
                                                encoder_only=encoder_only))
    return {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
            for path, leaf in jax.tree_util.tree_flatten_with_path(expected)[0]}


def _check_complete(params: Dict[str, Any], config: T5Config, encoder_only: bool) -> None:
    """Compares against the shapes the model expects (unscanned layout)."""
    # Fields that do not change shapes are normalised so the cache hits.
    flat_expected = _expected_shapes(
        config.replace(scan_layers=False, dtype="float32", remat_policy="none",
                       dropout_rate=0.0), encoder_only)
    flat_got = {"/".join(str(getattr(k, "key", k)) for k in path): leaf.shape
                for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
    missing = sorted(set(flat_expected) - set(flat_got))
    extra = sorted(set(flat_got) - set(flat_expected))
    if missing or extra:
        raise ValueError(f"state dict does not fit the config: missing {missing}, "
                         f"unexpected {extra}")
    bad = {k: (flat_got[k], flat_expected[k]) for k in flat_expected
           if tuple(flat_got[k]) != tuple(flat_expected[k])}
    if bad:
        raise ValueError(f"shape mismatch (got, expected): {bad}")


def hf_config_from_t5config(config: T5Config):
    """The ``transformers.T5Config`` of the same architecture (transformers 5).

    ``scale_decoder_outputs`` is set explicitly. ``tie_word_embeddings`` stays
    True in the returned object: in transformers 5 it also ties the stacks'
    ``embed_tokens`` to ``shared``, and an untied LM head comes from a
    checkpoint whose ``lm_head.weight`` differs from ``shared.weight``. (A
    config file for transformers 4, where ``tie_word_embeddings`` decides
    tying and scaling, is the exporter's concern.)

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
