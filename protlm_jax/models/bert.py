"""ProtBert and ProtAlbert: BERT-family encoders in Flax linen, equal to HF BERT/ALBERT.

One config (:class:`BertConfig`) covers three Hugging Face families, selected
by ``family``:

* ``"bert"``: ``BertForMaskedLM`` / ``BertModel`` (ProtBert, ProtBert-BFD).
* ``"albert"``: ``AlbertForMaskedLM`` / ``AlbertModel`` (ProtAlbert): a
  factorised embedding (``embedding_size`` E, projected to D by
  ``embedding_projection``) and cross-layer sharing (``num_hidden_groups``
  groups of ``inner_group_num`` layers; ProtAlbert has one group of one layer
  used by all 12 layers).
* ``"electra"``: the encoder of ``ElectraModel`` (projection only when E != D);
  its heads live in :mod:`protlm_jax.models.electra`.

The arithmetic follows transformers 5.24 (``models/bert``, ``models/albert``):
learned absolute position and token-type embeddings added to the word
embedding, then LayerNorm (with bias); post-layer-norm blocks
``LN(x + attention(x))`` and ``LN(x + W2 act(W1 x))``; attention with biases
and ``1/sqrt(head_dim)`` scaling; exact (erf) GELU for ``hidden_act="gelu"``;
the MLM head ``dense -> act -> LayerNorm -> tied decoder + bias``.

Parameters (family "bert"; "albert" puts the layers under
``encoder/groups_{g}/layers_{j}``):

  embeddings/word_embeddings/embedding            [Vp, E]  (vocab, embed)
  embeddings/position_embeddings                  [P, E]   (length, embed)
  embeddings/token_type_embeddings                [T, E]   (-, embed)
  embeddings/layer_norm/{scale,bias}              [E]      (embed)
  embedding_projection/{kernel [E, D], bias [D]}  albert; electra when E != D
  encoder/layers_{i}/attention/{query,key,value}/{kernel [D, H, K], bias [H, K]}
  encoder/layers_{i}/attention/out/{kernel [H, K, D], bias [D]}
  encoder/layers_{i}/attention_layer_norm/{scale,bias}        [D]
  encoder/layers_{i}/mlp/wi/{kernel [D, F], bias [F]}
  encoder/layers_{i}/mlp/wo/{kernel [F, D], bias [D]}
  encoder/layers_{i}/mlp_layer_norm/{scale,bias}              [D]
  mlm_head/dense/{kernel [D, E'], bias [E']}      E' = D (bert) or E (albert)
  mlm_head/layer_norm/{scale,bias}                [E']
  mlm_head/bias                                   [Vp]     (vocab)

With ``scan_layers`` unshared layers live under ``encoder/layers`` with a
leading ``layers`` axis; a shared ALBERT group is scanned with its params
broadcast, so its paths do not change. ``vocab_pad_to_multiple`` pads the
vocabulary rows (Vp) so a model axis can split them (ProtBert's 30 rows do not
split 4 ways); logits are sliced back to ``vocab_size`` and the padding rows
are never used. Dimensions of size 1–2 (token types, the one ELECTRA
discriminator output) are declared replicated (``None``).

Shape legend:
  B batch, L length, E embedding size, D hidden size, H heads, K head size,
  F intermediate size, V vocab (Vp padded), P max positions, T token types.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from protlm_jax import objectives_ae
from protlm_jax.data.vocabularies import ProtBertVocabulary
from protlm_jax.models import layers
from protlm_jax.models.family import (EncoderView, Family, TokenLayout,
                                     attention_lora_targets, from_presets, unscan,
                                     where_valid)

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = ("none", "full", "dots")
FAMILIES = ("bert", "albert", "electra")


def _gelu_erf(x: Array) -> Array:
    return jax.nn.gelu(x, approximate=False)


# HF ACT2FN names -> functions (exact GELU is "gelu"; "gelu_new" is tanh).
ACTIVATIONS: Dict[str, Callable[[Array], Array]] = {
    "gelu": _gelu_erf,
    "gelu_new": layers.gelu_tanh,
    "gelu_pytorch_tanh": layers.gelu_tanh,
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Hyper-parameters of a BERT/ALBERT/ELECTRA encoder (HF field names).

    ``embedding_size`` None means ``hidden_size`` (BERT). ``dtype`` is the
    activation dtype; parameters are always float32. ``attention_chunk_size``
    computes attention block by block (exact, memory linear in the length) for
    unpacked inputs longer than it: long proteins at embedding time.
    """
    vocab_size: int = 30
    hidden_size: int = 1024
    num_hidden_layers: int = 30
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    max_position_embeddings: int = 40000
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    family: str = "bert"
    embedding_size: Optional[int] = None
    num_hidden_groups: int = 1
    inner_group_num: int = 1
    pad_id: int = 0
    vocab_pad_to_multiple: int = 1
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_chunk_size: Optional[int] = None

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"family must be one of {FAMILIES}, got {self.family!r}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act must be one of {tuple(ACTIVATIONS)}, "
                             f"got {self.hidden_act!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {_REMAT_POLICIES}, "
                             f"got {self.remat_policy!r}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not a multiple of "
                             f"num_attention_heads {self.num_attention_heads}")
        if self.family == "albert" and not (
                1 <= self.num_hidden_groups <= self.num_hidden_layers):
            raise ValueError(f"num_hidden_groups {self.num_hidden_groups} must be in "
                             f"1..num_hidden_layers ({self.num_hidden_layers})")
        if self.vocab_pad_to_multiple < 1:
            raise ValueError("vocab_pad_to_multiple must be >= 1")

    @property
    def activation_dtype(self):
        """The jnp dtype of activations."""
        return _DTYPES[self.dtype]

    @property
    def emb_size(self) -> int:
        """E: the width of the embedding tables."""
        return self.embedding_size or self.hidden_size

    @property
    def head_dim(self) -> int:
        """K: per-head width."""
        return self.hidden_size // self.num_attention_heads

    @property
    def padded_vocab_size(self) -> int:
        """Vp: rows of the word embedding (``vocab_size`` rounded up)."""
        m = self.vocab_pad_to_multiple
        return -(-self.vocab_size // m) * m

    @property
    def has_embedding_projection(self) -> bool:
        """ALBERT always projects E -> D; ELECTRA only when E != D."""
        return self.family == "albert" or (
            self.family == "electra" and self.emb_size != self.hidden_size)

    def replace(self, **overrides) -> "BertConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **overrides)


# Published shapes (REFERENCE §1, from the Rostlab config.json files).
BERT_PRESETS: Dict[str, BertConfig] = {
    # Tiny: CPU tests and the demo (vocab rows padded to 32 so a 4- or 8-way
    # model axis splits them; logits still have 30 entries).
    "prot_bert_tiny": BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                 intermediate_size=128, max_position_embeddings=1024,
                                 vocab_pad_to_multiple=8),
    "prot_albert_tiny": BertConfig(family="albert", vocab_size=34, hidden_size=64,
                                   num_hidden_layers=3, num_attention_heads=4,
                                   intermediate_size=128, embedding_size=16,
                                   max_position_embeddings=1024, vocab_pad_to_multiple=8),
    # ProtBert (UniRef100) and ProtBert-BFD: 30 layers, 1024 wide, 16 heads,
    # intermediate 4096, 40,000 positions, vocab 30, dropout 0.
    "prot_bert": BertConfig(),
    "prot_bert_bfd": BertConfig(),
    # ProtAlbert: 12 layers sharing one set of weights, 4096 wide, 64 heads,
    # intermediate 16384, embedding 128, vocab 34.
    "prot_albert": BertConfig(family="albert", vocab_size=34, hidden_size=4096,
                              num_hidden_layers=12, num_attention_heads=64,
                              intermediate_size=16384, embedding_size=128,
                              num_hidden_groups=1, inner_group_num=1),
}


def preset(name: str, **overrides) -> BertConfig:
    """A published (or tiny) configuration, optionally with fields overridden.

    Args:
      name: a key of ``BERT_PRESETS``.
      **overrides: ``BertConfig`` fields to change (e.g. ``scan_layers=True``).

    Returns:
      The config.
    """
    return from_presets(BERT_PRESETS, "BERT", name, **overrides)


_BLE = ("batch", "length", "embed")


def _init(cfg: BertConfig) -> layers.Initializer:
    return nn.initializers.normal(cfg.initializer_range)


class LayerNorm(nn.Module):
    """LayerNorm with scale and bias (torch ``nn.LayerNorm``), statistics in float32."""
    epsilon: float = 1e-12
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[..., E] -> [..., E] in ``dtype``."""
        d = x.shape[-1]
        scale = self.param("scale", nn.with_logical_partitioning(
            nn.initializers.ones, ("embed",)), (d,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros, ("embed",)), (d,), jnp.float32)
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.epsilon)
        return (y * scale + bias).astype(self.dtype)


class Dense(nn.Module):
    """A projection with bias (torch ``nn.Linear``), contracting ``axis`` of the input.

    The kernel has shape ``in_dims + features`` with one logical name per
    dimension in ``kernel_axes``; the bias takes the names of the output dims.
    """
    features: Any
    kernel_axes: tuple
    axis: Any = -1
    dtype: Any = jnp.float32
    kernel_init: layers.Initializer = nn.initializers.normal(0.02)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[..., *in_dims] -> [..., *features] in ``dtype``."""
        features = self.features if isinstance(self.features, tuple) else (self.features,)
        axis = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        axis = tuple(a % x.ndim for a in axis)
        kernel_shape = tuple(x.shape[a] for a in axis) + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not name every "
                             f"dimension of the kernel {kernel_shape}")
        kernel = self.param("kernel", nn.with_logical_partitioning(
            self.kernel_init, self.kernel_axes), kernel_shape, jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(
            nn.initializers.zeros, self.kernel_axes[len(axis):]), features, jnp.float32)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                ((axis, tuple(range(len(axis)))), ((), ())))
        return y + bias.astype(self.dtype)


class Embeddings(nn.Module):
    """Word + absolute position + token-type embeddings, LayerNorm, dropout.

    ``attend`` reuses the word table as the tied MLM decoder.
    """
    config: BertConfig

    def setup(self):
        cfg = self.config
        e = cfg.emb_size
        self.word_embeddings = layers.Embed(cfg.padded_vocab_size, e,
                                            dtype=cfg.activation_dtype,
                                            embedding_init=_init(cfg))
        self.position_embeddings = self.param(
            "position_embeddings", nn.with_logical_partitioning(_init(cfg), ("length", "embed")),
            (cfg.max_position_embeddings, e), jnp.float32)
        # Two rows: too few to split, declared replicated.
        self.token_type_embeddings = self.param(
            "token_type_embeddings", nn.with_logical_partitioning(_init(cfg), (None, "embed")),
            (cfg.type_vocab_size, e), jnp.float32)
        self.layer_norm = LayerNorm(cfg.layer_norm_eps, cfg.activation_dtype)
        self.dropout = nn.Dropout(cfg.hidden_dropout_prob)

    def __call__(self, tokens: Array, positions: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None, deterministic: bool = True) -> Array:
        """Embeds token ids.

        Args:
          tokens: [B, L] int ids.
          positions: optional [B, L] positions (restarting per packed segment);
            default ``arange(L)`` as in HF.
          token_type_ids: optional [B, L] segment types; default 0.
          deterministic: disables dropout.

        Returns:
          [B, L, E] in the activation dtype.
        """
        cfg = self.config
        if positions is None:
            positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)[None, :]
        x = self.word_embeddings(tokens).astype(jnp.float32)
        if token_type_ids is None:
            x = x + self.token_type_embeddings[0]
        else:
            x = x + jnp.take(self.token_type_embeddings, token_type_ids, axis=0)
        x = x + jnp.take(self.position_embeddings, positions, axis=0)
        x = self.layer_norm(x)
        x = self.dropout(x, deterministic=deterministic)
        return nn.with_logical_constraint(x.astype(cfg.activation_dtype), _BLE)

    def attend(self, x: Array) -> Array:
        """[..., E] -> [..., Vp] float32 logits against the word table."""
        return self.word_embeddings.attend(x.astype(jnp.float32), dtype=jnp.float32)


class SelfAttention(nn.Module):
    """BERT self-attention: biased q/k/v/out projections, logits scaled by K**-0.5."""
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array], deterministic: bool) -> Array:
        """[B, L, D] -> [B, L, D]; ``mask`` [B|1, 1, L|1, L] bool (True = attend)."""
        cfg, dt = self.config, self.config.activation_dtype
        h, k = cfg.num_attention_heads, cfg.head_dim

        def proj(name):
            y = Dense((h, k), ("embed", "heads", "kv"), dtype=dt, kernel_init=_init(cfg),
                      name=name)(x)
            return nn.with_logical_constraint(y, ("batch", "length", "heads", "kv"))

        q_BLHK, k_BLHK, v_BLHK = proj("query"), proj("key"), proj("value")
        scale = k ** -0.5
        length = x.shape[1]
        key_only = mask is None or (mask.shape[1], mask.shape[2]) == (1, 1)
        if (cfg.attention_chunk_size is not None and length > cfg.attention_chunk_size
                and key_only and (deterministic or cfg.attention_probs_dropout_prob == 0.0)):
            # Scaling q instead of the logits: same value up to rounding.
            out_BLHK = layers.chunked_attention(
                q_BLHK * jnp.asarray(scale, q_BLHK.dtype), k_BLHK, v_BLHK, bias=None,
                key_mask=None if mask is None else mask[:, 0, 0, :],
                chunk_size=cfg.attention_chunk_size)
        else:
            # HF adds finfo.min for masked keys (dot_product_attention's mask);
            # scaling q instead of the logits: same value up to rounding.
            dropout = None
            if not deterministic and cfg.attention_probs_dropout_prob > 0.0:
                dropout = lambda w: nn.Dropout(cfg.attention_probs_dropout_prob)(
                    w, deterministic=False)
            out_BLHK = layers.dot_product_attention(
                q_BLHK * jnp.asarray(scale, q_BLHK.dtype), k_BLHK, v_BLHK,
                mask=mask, dtype=dt, dropout=dropout)
        out_BLHK = nn.with_logical_constraint(out_BLHK, ("batch", "length", "heads", "kv"))
        return Dense(x.shape[-1], ("heads", "kv", "embed"), axis=(-2, -1), dtype=dt,
                     kernel_init=_init(cfg), name="out")(out_BLHK)


class Mlp(nn.Module):
    """``W2 act(W1 x)`` with biases (BertIntermediate/BertOutput, ALBERT ffn)."""
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """[B, L, D] -> [B, L, D]."""
        cfg, dt = self.config, self.config.activation_dtype
        h = Dense(cfg.intermediate_size, ("embed", "mlp"), dtype=dt, kernel_init=_init(cfg),
                  name="wi")(x)
        h = ACTIVATIONS[cfg.hidden_act](h)
        h = nn.with_logical_constraint(h, ("batch", "length", "mlp"))
        return Dense(x.shape[-1], ("mlp", "embed"), dtype=dt, kernel_init=_init(cfg),
                     name="wo")(h)


class TransformerLayer(nn.Module):
    """Post-norm block: ``x = LN(x + drop(attn(x)))``; ``x = LN(x + drop(mlp(x)))``."""
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array], deterministic: bool):
        """[B, L, D] -> ([B, L, D], None); the pair form suits ``nn.scan``."""
        cfg, dt = self.config, self.config.activation_dtype
        drop = nn.Dropout(cfg.hidden_dropout_prob)
        a = SelfAttention(cfg, name="attention")(x, mask, deterministic)
        x = LayerNorm(cfg.layer_norm_eps, dt, name="attention_layer_norm")(
            x + drop(a, deterministic=deterministic))
        x = nn.with_logical_constraint(x, _BLE)
        m = Mlp(cfg, name="mlp")(x)
        x = LayerNorm(cfg.layer_norm_eps, dt, name="mlp_layer_norm")(
            x + drop(m, deterministic=deterministic))
        return nn.with_logical_constraint(x, _BLE), None


class LayerGroup(nn.Module):
    """ALBERT: ``inner_group_num`` layers applied in turn (one shared group)."""
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array], deterministic: bool):
        """[B, L, D] -> ([B, L, D], None)."""
        for j in range(self.config.inner_group_num):
            x, _ = _remat(TransformerLayer, self.config)(self.config, name=f"layers_{j}")(
                x, mask, deterministic)
        return x, None


def _remat(layer_cls, cfg: BertConfig):
    """``layer_cls`` rematerialised per ``cfg.remat_policy`` (deterministic static)."""
    if cfg.remat_policy == "none":
        return layer_cls
    policy = None if cfg.remat_policy == "full" else jax.checkpoint_policies.checkpoint_dots
    # static_argnums counts ``self``: (self, x, mask, deterministic).
    return nn.remat(layer_cls, policy=policy, prevent_cse=not cfg.scan_layers,
                    static_argnums=(3,))


class Encoder(nn.Module):
    """The stack of post-norm layers: unshared (BERT, ELECTRA) or grouped (ALBERT)."""
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, mask: Optional[Array], deterministic: bool,
                 hidden_states: bool = False):
        """[B, L, D] -> [B, L, D]; with ``hidden_states`` also each layer's
        output in order (ALBERT: call by call), unscanned stacks only."""
        cfg = self.config
        n = cfg.num_hidden_layers
        hidden = []
        if cfg.family == "albert":
            if cfg.scan_layers and cfg.num_hidden_groups == 1:
                # One shared group run n times: scan with the params broadcast
                # (no layer axis), so paths equal the unscanned ones.
                group = nn.scan(_remat(LayerGroup, cfg), variable_broadcast="params",
                                split_rngs={"params": False, "dropout": True},
                                in_axes=(nn.broadcast, nn.broadcast), length=n)
                x, _ = group(cfg, name="groups_0")(x, mask, deterministic)
                return (x, hidden) if hidden_states else x
            groups = [LayerGroup(cfg, name=f"groups_{g}") for g in range(cfg.num_hidden_groups)]
            for i in range(n):
                # HF: group_idx = int(i / (num_hidden_layers / num_hidden_groups)).
                x, _ = groups[int(i / (n / cfg.num_hidden_groups))](x, mask, deterministic)
                hidden.append(x)
            return (x, hidden) if hidden_states else x
        layer_cls = _remat(TransformerLayer, cfg)
        if cfg.scan_layers:
            scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                              split_rngs={"params": True, "dropout": True},
                              in_axes=(nn.broadcast, nn.broadcast), length=n,
                              metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(cfg, name="layers")(x, mask, deterministic)
            return (x, hidden) if hidden_states else x
        for i in range(n):
            x, _ = layer_cls(cfg, name=f"layers_{i}")(x, mask, deterministic)
            hidden.append(x)
        return (x, hidden) if hidden_states else x


class MlmHead(nn.Module):
    """``dense -> act -> LayerNorm -> tied decoder + bias`` (BERT, ALBERT, ELECTRA gen.).

    ``act`` is ``hidden_act`` for BERT/ALBERT; ELECTRA's generator always uses
    exact GELU (``ElectraGeneratorPredictions``).
    """
    config: BertConfig

    @nn.compact
    def __call__(self, x: Array, embeddings: Embeddings) -> Array:
        """[B, L, D] -> [B, L, V] float32 logits."""
        cfg = self.config
        width = cfg.hidden_size if cfg.family == "bert" else cfg.emb_size
        act = ACTIVATIONS["gelu" if cfg.family == "electra" else cfg.hidden_act]
        # The head runs in float32: the vocabulary is tiny and the loss wants
        # full-precision logits.
        h = Dense(width, ("embed", "mlp"), dtype=jnp.float32, kernel_init=_init(cfg),
                  name="dense")(x.astype(jnp.float32))
        h = LayerNorm(cfg.layer_norm_eps, jnp.float32, name="layer_norm")(act(h))
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (cfg.padded_vocab_size,), jnp.float32)
        logits = embeddings.attend(h) + bias
        return nn.with_logical_constraint(logits[..., :cfg.vocab_size],
                                          ("batch", "length", "vocab"))


def attention_mask(tokens: Array, segment_ids: Optional[Array], pad_id: int) -> Array:
    """Keys-only padding mask, or the packed-segment mask when ``segment_ids`` given."""
    length = tokens.shape[1]
    return layers.make_attention_mask(
        query_length=length, key_length=length,
        key_valid=None if segment_ids is not None else tokens != pad_id,
        query_segment_ids=segment_ids, key_segment_ids=segment_ids)


def _embed_and_encode(cfg: BertConfig, embeddings: Embeddings, projection: Optional[nn.Module],
                      encoder: nn.Module, tokens: Array, segment_ids: Optional[Array],
                      positions: Optional[Array], token_type_ids: Optional[Array],
                      deterministic: bool, hidden_states: bool = False):
    """Embeddings -> projection (ALBERT, ELECTRA with E != D) -> encoder: [B, L, D].

    With ``hidden_states``: ``(x, [embedding output, layer 1 .. N outputs])``
    (HF ``hidden_states``: the embedding output is after the projection).
    """
    x = embeddings(tokens, positions, token_type_ids, deterministic)
    if projection is not None:
        x = projection(x)
    first = x
    x = nn.with_logical_constraint(x, _BLE) if projection is not None else x
    mask = attention_mask(tokens, segment_ids, cfg.pad_id)
    if not hidden_states:
        return encoder(x, mask, deterministic)
    x, hidden = encoder(x, mask, deterministic, hidden_states=True)
    return x, [first] + hidden


def _projection(cfg: BertConfig) -> Optional[nn.Module]:
    if not cfg.has_embedding_projection:
        return None
    return Dense(cfg.hidden_size, ("mlp", "embed"), dtype=cfg.activation_dtype,
                 kernel_init=_init(cfg))


def _setup_tower(module: nn.Module) -> None:
    """Gives ``module`` (in its ``setup``) the tower's embeddings, projection
    and encoder, under the names every BERT-shaped params tree uses."""
    module.embeddings = Embeddings(module.config)
    projection = _projection(module.config)
    if projection is not None:
        module.embedding_projection = projection
    module.encoder = Encoder(module.config)


class Body(nn.Module):
    """Embedding projection (if any) + encoder on embeddings owned by the parent.

    The two ELECTRA towers are Bodies sharing one :class:`Embeddings`.
    """
    config: BertConfig
    embeddings: Embeddings

    def setup(self):
        projection = _projection(self.config)
        if projection is not None:
            self.embedding_projection = projection
        self.encoder = Encoder(self.config)

    def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, token_type_ids: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        """[B, L] ids -> [B, L, D] last hidden states."""
        return _embed_and_encode(self.config, self.embeddings,
                                 getattr(self, "embedding_projection", None), self.encoder,
                                 tokens, segment_ids, positions, token_type_ids, deterministic)


class Bert(nn.Module):
    """BERT or ALBERT with its MLM head (``*ForMaskedLM``).

    ``__call__`` gives MLM logits; ``encode`` the last hidden states
    (``*Model.last_hidden_state``) and needs no head parameters, so params
    imported from a ``BertModel``/``AlbertModel`` directory embed as well.
    """
    config: BertConfig

    def setup(self):
        _setup_tower(self)
        self.mlm_head = MlmHead(self.config)

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               token_type_ids: Optional[Array] = None, deterministic: bool = True) -> Array:
        """Last hidden states.

        Args:
          encoder_input_tokens: [B, L] int ids; ``pad_id`` is padding when
            ``encoder_segment_ids`` is None.
          encoder_segment_ids: optional [B, L] packing segment ids (0 = padding).
          encoder_positions: optional [B, L] positions restarting per segment.
          token_type_ids: optional [B, L] token types (default 0).
          deterministic: False enables dropout (needs a ``dropout`` rng).

        Returns:
          [B, L, D] in the activation dtype.
        """
        return _embed_and_encode(self.config, self.embeddings,
                                 getattr(self, "embedding_projection", None), self.encoder,
                                 encoder_input_tokens, encoder_segment_ids, encoder_positions,
                                 token_type_ids, deterministic)

    def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
                 encoder_positions: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None, deterministic: bool = True) -> Array:
        """MLM logits [B, L, V] float32; arguments as in ``encode``."""
        hidden = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                             token_type_ids, deterministic)
        return self.mlm_head(hidden, self.embeddings)


@functools.lru_cache(maxsize=64)  # shapes of a config never change: trace once
def abstract_params(config: BertConfig, batch: int = 1, length: int = 8) -> Any:
    """Boxed parameter shapes of ``Bert(config)`` via ``jax.eval_shape`` (no memory).

    Returns:
      A pytree of ``nn.LogicallyPartitioned``-boxed ``jax.ShapeDtypeStruct``.
    """
    tokens = jnp.ones((batch, length), jnp.int32)
    return jax.eval_shape(lambda rng: Bert(config).init(rng, tokens),
                          jax.random.PRNGKey(0))["params"]


class Encoding(nn.Module):
    """Embeddings, projection and encoder of a BERT/ALBERT/ELECTRA tower (no
    head): the embedding contract. Its params are those of ``Bert`` without
    ``mlm_head`` (an ELECTRA tower's, with the shared embeddings)."""
    config: BertConfig

    def setup(self):
        _setup_tower(self)

    def encode(self, tokens: Array, mask: Optional[Array] = None,
               repr_layers: Sequence[int] = (-1,)) -> Dict[str, Dict[int, Array]]:
        """Representations of unpacked ``[CLS] seq [SEP]`` token ids.

        Args:
          tokens: [B, T] int ids, padded with ``pad_id``.
          mask: [B, T] bool, True on real tokens (default: ``tokens != pad_id``).
          repr_layers: 0 (embedding output, after ALBERT's/ELECTRA's
            projection) .. N (last layer), negative from N; like HF
            ``hidden_states``; ALBERT's shared layers count call by call.

        Returns:
          ``{"representations": {layer: [B, T, D]}}`` keyed as asked.
        """
        tokens = where_valid(tokens, mask, self.config.pad_id)
        _, hidden = _embed_and_encode(self.config, self.embeddings,
                                      getattr(self, "embedding_projection", None), self.encoder,
                                      tokens, None, None, None, True, hidden_states=True)
        return {"representations": {i: hidden[i] for i in repr_layers}}


ENCODING_COLLECTIONS = ("embeddings", "embedding_projection", "encoder")


def inference_config(config: BertConfig) -> BertConfig:
    """No dropout, no remat, layers unrolled, the plain attention path."""
    return config.replace(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                          remat_policy="none", scan_layers=False, attention_chunk_size=None)


def tower_view(config: BertConfig, tree: Mapping[str, Any]) -> EncoderView:
    """The :class:`EncoderView` of one BERT-shaped tower (``tree``: its
    embeddings, projection and encoder params, scanned or not)."""
    cfg = inference_config(config)
    abstract = {k: v for k, v in abstract_params(cfg).items() if k in ENCODING_COLLECTIONS}
    return EncoderView(
        config=cfg, params=unscan({k: tree[k] for k in ENCODING_COLLECTIONS if k in tree},
                                  abstract),
        num_layers=cfg.num_hidden_layers, max_positions=cfg.max_position_embeddings,
        make_module=Encoding, chunked=lambda c, a, m: c.replace(attention_chunk_size=a),
        pad_id=cfg.pad_id)


def _family(name: str) -> Family:
    return Family(
        name=name, config_class=BertConfig,
        build=lambda c: (Bert(c), ("encoder_input_tokens",)),
        abstract_params=lambda c, encoder_only=False: abstract_params(c),
        default_objective=objectives_ae.MLMObjective,
        # ProtAlbert's pieces put [PAD] [UNK] [CLS] [SEP] [MASK] and the
        # residues at ProtBert's ids (30..33 are unused), so ALBERT trains
        # and embeds on ProtBert ids.
        vocabulary=ProtBertVocabulary,
        layout=TokenLayout(prefix=("CLS_ID",), suffix=("SEP_ID",)),  # residues [1:L+1]
        encoder_view=lambda c, params: tower_view(c, params.get("params", params)),
        encoder_collections=ENCODING_COLLECTIONS,
        towers=lambda c: (c,),
        stack_depths=lambda c: (c.num_hidden_layers,),
        # Every ALBERT layer costs the same whichever group it uses: one group.
        with_stack_depths=lambda c, d: c.replace(
            scan_layers=False, num_hidden_layers=d[0],
            num_hidden_groups=1 if c.family == "albert" else c.num_hidden_groups),
        hf_module="protlm_jax.hf.bert", hf_model_types=(name,),
        presets={k: v for k, v in BERT_PRESETS.items() if v.family == name},
        matches=lambda c: c.family == name,
        lora_targets=attention_lora_targets(
            "attention", {"q": "query/kernel", "k": "key/kernel", "v": "value/kernel",
                          "o": "out/kernel"}))


BERT_FAMILY = _family("bert")
ALBERT_FAMILY = _family("albert")
