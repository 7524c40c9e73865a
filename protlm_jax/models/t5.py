"""ProtT5: the T5 v1.0 encoder-decoder in Flax linen, numerically equal to HF T5.

``T5`` (encoder + decoder + LM head) and ``T5EncoderOnly`` (shared embedding +
encoder, for per-residue embeddings) share parameter names, so the encoder-only
params are a subset of the full model's:

  token_embedder/embedding                       [V, D]     (vocab, embed)
  encoder/relpos_bias/rel_embedding              [H, R]     (heads, relpos_buckets)
  encoder/layers_{i}/pre_attention_layer_norm/scale          [D]
  encoder/layers_{i}/attention/{query,key,value}/kernel      [D, H, K]
  encoder/layers_{i}/attention/out/kernel                    [H, K, D]
  encoder/layers_{i}/pre_mlp_layer_norm/scale                [D]
  encoder/layers_{i}/mlp/{wi | wi_0, wi_1}/kernel            [D, F]
  encoder/layers_{i}/mlp/wo/kernel                           [F, D]
  encoder/encoder_norm/scale                                 [D]
  decoder/relpos_bias/rel_embedding, decoder/layers_{i}/{pre_self_attention_layer_norm,
    self_attention, pre_cross_attention_layer_norm, encoder_decoder_attention,
    pre_mlp_layer_norm, mlp}, decoder/decoder_norm/scale
  decoder/logits_dense/kernel                    [D, V]     (only when untied)

With ``scan_layers=True`` the per-layer params live under ``layers`` with a
leading ``layers`` axis of size num_layers. There is exactly one relative
position table per stack (HF keeps it in block 0 and reuses it); the bias is
computed once per stack and passed to every layer.

Shape legend:
  B batch, L encoder length, T decoder length, D embed (d_model), H heads,
  K d_kv, F mlp (d_ff), V vocab, R relative position buckets, N layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from protlm_jax import objectives
from protlm_jax.models import layers
from protlm_jax.data.vocabularies import ProtT5Vocabulary
from protlm_jax.models.family import (EncoderView, Family, TokenLayout,
                                     attention_lora_targets, from_presets, unscan,
                                     where_valid)

Array = jax.Array

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
_REMAT_POLICIES = ("none", "full", "dots")


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Hyper-parameters of a T5 encoder-decoder (defaults: ProtT5 vocabulary).

    ``tie_word_embeddings`` shares the LM head with the token embedding;
    ``scale_decoder_outputs`` multiplies the decoder output by d_model**-0.5
    before the head (T5 v1.0 / ProtT5). Transformers-4 configs tie both to
    ``tie_word_embeddings``; they are separate here so untied-but-scaled
    checkpoints (ProtT5 stores its own ``lm_head.weight``) can be expressed.
    ``dtype`` is the activation dtype; parameters are always float32.
    ``attention_chunk_size``/``mlp_chunk_size`` change memory, not results.
    """
    vocab_size: int = 128
    d_model: int = 512
    num_heads: int = 8
    d_kv: int = 64
    d_ff: int = 2048
    num_encoder_layers: int = 6
    num_decoder_layers: int = 6
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    dropout_rate: float = 0.1
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    tie_word_embeddings: bool = True
    scale_decoder_outputs: bool = True
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    pad_id: int = 0
    eos_id: int = 1
    decoder_start_token_id: int = 0
    # Long inputs (embedding whole proteins): the encoder attends in blocks of
    # this many queries/keys and runs the feed-forward on blocks of this many
    # positions once the length exceeds them, so memory grows linearly with
    # the length. Exact; unpacked inputs only. None: the plain path.
    attention_chunk_size: Optional[int] = None
    mlp_chunk_size: Optional[int] = None
    # The registry key (models.family_for); not a field, not in asdict().
    family: ClassVar[str] = "t5"

    def __post_init__(self):
        if self.feed_forward_proj not in layers.FEED_FORWARD_KINDS:
            raise ValueError(f"feed_forward_proj must be one of "
                             f"{layers.FEED_FORWARD_KINDS}, got {self.feed_forward_proj!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {_REMAT_POLICIES}, "
                             f"got {self.remat_policy!r}")

    @property
    def activation_dtype(self):
        """The jnp dtype of activations."""
        return _DTYPES[self.dtype]

    def replace(self, **overrides) -> "T5Config":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **overrides)


# Published shapes (REFERENCE §1; XL/XXL from the HF config.json files).
T5_PRESETS: Dict[str, T5Config] = {
    "prot_t5_tiny": T5Config(d_model=64, num_heads=4, d_kv=16, d_ff=128,
                             num_encoder_layers=2, num_decoder_layers=2,
                             dropout_rate=0.0),
    "prot_t5_small": T5Config(d_model=512, num_heads=8, d_kv=64, d_ff=2048,
                              num_encoder_layers=6, num_decoder_layers=6),
    "prot_t5_base": T5Config(d_model=768, num_heads=12, d_kv=64, d_ff=3072,
                             num_encoder_layers=12, num_decoder_layers=12),
    "prot_t5_xl_uniref50": T5Config(d_model=1024, num_heads=32, d_kv=128, d_ff=16384,
                                    num_encoder_layers=24, num_decoder_layers=24),
    "prot_t5_xl_bfd": T5Config(d_model=1024, num_heads=32, d_kv=128, d_ff=16384,
                               num_encoder_layers=24, num_decoder_layers=24),
    "prot_t5_xxl": T5Config(d_model=1024, num_heads=128, d_kv=128, d_ff=65536,
                            num_encoder_layers=24, num_decoder_layers=24),
}


def preset(name: str, **overrides) -> T5Config:
    """A published configuration, optionally with fields overridden.

    Args:
      name: a key of ``T5_PRESETS``.
      **overrides: ``T5Config`` fields to change (e.g. ``scan_layers=True``).

    Returns:
      The config.
    """
    return from_presets(T5_PRESETS, "T5", name, **overrides)


def decoder_input_tokens_from_targets(targets: Array, segment_ids: Optional[Array] = None,
                                      decoder_start_token_id: int = 0) -> Array:
    """Teacher-forcing decoder inputs: targets shifted right by one.

    Args:
      targets: [B, T] int target ids.
      segment_ids: optional [B, T] segment ids of packed rows; each segment
        then starts with ``decoder_start_token_id`` instead of the previous
        segment's last token.
      decoder_start_token_id: the first decoder input (0, the pad id, in T5).

    Returns:
      [B, T] int decoder input ids.
    """
    start = jnp.full_like(targets[:, :1], decoder_start_token_id)
    shifted = jnp.concatenate([start, targets[:, :-1]], axis=1)
    if segment_ids is not None:
        prev_seg = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1]),
                                    segment_ids[:, :-1]], axis=1)
        shifted = jnp.where(segment_ids == prev_seg, shifted, decoder_start_token_id)
    return shifted


_BLE = ("batch", "length", "embed")


def _dropout(config: T5Config):
    return nn.Dropout(rate=config.dropout_rate)


def _position_bias(cfg: T5Config, length: int, positions: Optional[Array], *,
                   bidirectional: bool, as_table: bool = False):
    """The stack's one relative position bias table applied to [B|1, H, L, L].

    Called inside a stack's compact ``__call__`` (the table is its
    ``relpos_bias`` submodule); encoder buckets are bidirectional, decoder
    buckets causal. ``as_table`` returns the table itself
    (``layers.PositionBiasTable``) for attention computed in blocks.
    """
    module = layers.RelativePositionBias(
        cfg.num_heads, cfg.relative_attention_num_buckets,
        cfg.relative_attention_max_distance, bidirectional=bidirectional,
        embedding_init=nn.initializers.normal(cfg.d_model ** -0.5),
        name="relpos_bias")
    if as_table:
        return module.table()
    return module(layers.relative_positions(length, length, positions, positions))


def _residual(cfg: T5Config, x: Array, norm_name: str, block, deterministic: bool):
    """``x + dropout(block(RMSNorm(x)))``, constrained to (batch, length, embed).

    Called inside a layer's compact ``__call__``, so the norm (and what
    ``block`` creates) are that layer's submodules.
    """
    h = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype, name=norm_name)(x)
    x = x + _dropout(cfg)(block(h), deterministic=deterministic)
    return nn.with_logical_constraint(x, _BLE)


class EncoderLayer(nn.Module):
    """Pre-norm self-attention + feed-forward block (bidirectional)."""
    config: T5Config

    @nn.compact
    def __call__(self, x: Array, position_bias: Array, mask: Optional[Array],
                 deterministic: bool):
        """[B, L, D] -> ([B, L, D], None); the pair form suits ``nn.scan``."""
        cfg, dt = self.config, self.config.activation_dtype
        attention = layers.MultiHeadAttention(cfg.num_heads, cfg.d_kv, dt, cfg.dropout_rate,
                                              chunk_size=cfg.attention_chunk_size,
                                              name="attention")
        mlp = layers.MlpBlock(cfg.d_ff, cfg.feed_forward_proj, dt, cfg.dropout_rate,
                              name="mlp")

        def feed_forward(h):
            if cfg.mlp_chunk_size is not None and h.shape[1] > cfg.mlp_chunk_size:
                return layers.apply_in_chunks(mlp, h, cfg.mlp_chunk_size,
                                              deterministic=deterministic)
            return mlp(h, deterministic)

        x = _residual(cfg, x, "pre_attention_layer_norm",
                      lambda h: attention(h, h, position_bias, mask, deterministic),
                      deterministic)
        x = _residual(cfg, x, "pre_mlp_layer_norm", feed_forward, deterministic)
        return x, None


class DecoderLayer(nn.Module):
    """Pre-norm causal self-attention + cross-attention + feed-forward block."""
    config: T5Config

    @nn.compact
    def __call__(self, y: Array, encoded: Array, position_bias: Array,
                 self_mask: Optional[Array], cross_mask: Optional[Array],
                 deterministic: bool):
        """[B, T, D] (encoded [B, L, D]) -> ([B, T, D], None)."""
        cfg, dt = self.config, self.config.activation_dtype
        self_attention = layers.MultiHeadAttention(
            cfg.num_heads, cfg.d_kv, dt, cfg.dropout_rate, name="self_attention")
        cross_attention = layers.MultiHeadAttention(
            cfg.num_heads, cfg.d_kv, dt, cfg.dropout_rate, name="encoder_decoder_attention")
        mlp = layers.MlpBlock(cfg.d_ff, cfg.feed_forward_proj, dt, cfg.dropout_rate,
                              name="mlp")
        y = _residual(cfg, y, "pre_self_attention_layer_norm",
                      lambda h: self_attention(h, h, position_bias, self_mask, deterministic),
                      deterministic)
        # Cross-attention has no position bias (as in T5).
        y = _residual(cfg, y, "pre_cross_attention_layer_norm",
                      lambda h: cross_attention(h, encoded, None, cross_mask, deterministic),
                      deterministic)
        y = _residual(cfg, y, "pre_mlp_layer_norm", lambda h: mlp(h, deterministic),
                      deterministic)
        return y, None


def _stack(layer_cls, config: T5Config, num_layers: int, num_broadcast_args: int):
    """Returns ``apply(x, *args) -> x`` running ``num_layers`` blocks.

    ``deterministic`` is always the last argument: it is static under remat
    (dropout is Python control flow) and broadcast under scan.
    """
    if config.remat_policy != "none":
        # "full" saves nothing (recompute the whole block); "dots" saves the
        # matmul outputs and recomputes only the cheap element-wise ops.
        policy = (None if config.remat_policy == "full"
                  else jax.checkpoint_policies.checkpoint_dots)
        # static_argnums counts ``self`` as 0.
        layer_cls = nn.remat(layer_cls, policy=policy, prevent_cse=not config.scan_layers,
                             static_argnums=(num_broadcast_args + 1,))

    def apply(x, *args, hidden=None):
        # ``hidden``: a list that receives each block's output (unscanned
        # stacks only; embedding asks for them).
        if config.scan_layers:
            scanned = nn.scan(
                layer_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(nn.broadcast,) * num_broadcast_args, length=num_layers,
                metadata_params={nn.PARTITION_NAME: "layers"})
            x, _ = scanned(config, name="layers")(x, *args)
            return x
        for i in range(num_layers):
            x, _ = layer_cls(config, name=f"layers_{i}")(x, *args)
            if hidden is not None:
                hidden.append(x)
        return x
    return apply


class Encoder(nn.Module):
    """Embedding, N bidirectional blocks, final RMS norm."""
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, tokens: Array, segment_ids: Optional[Array] = None,
                 positions: Optional[Array] = None, deterministic: bool = True,
                 hidden_states: bool = False):
        """Encodes token ids.

        Args:
          tokens: [B, L] int ids; 0 is padding when ``segment_ids`` is None.
          segment_ids: optional [B, L] packing segment ids (0 = padding).
          positions: optional [B, L] positions restarting in every segment.
          deterministic: disables dropout.
          hidden_states: also return every representation (unscanned only).

        Returns:
          [B, L, D] encodings in the activation dtype; with ``hidden_states``
          ``(encodings, [embedding output, block 1 .. N-1 outputs, encodings])``
          numbered like Hugging Face ``hidden_states``.
        """
        cfg = self.config
        length = tokens.shape[1]
        # Unpacked long inputs pass the bias table, not [1, H, L, L]; the
        # attention then works in blocks (see T5Config.attention_chunk_size).
        chunked = (cfg.attention_chunk_size is not None and length > cfg.attention_chunk_size
                   and segment_ids is None and positions is None)
        bias = _position_bias(cfg, length, positions, bidirectional=True, as_table=chunked)
        mask = layers.make_attention_mask(
            query_length=length, key_length=length,
            key_valid=None if segment_ids is not None else tokens != cfg.pad_id,
            query_segment_ids=segment_ids, key_segment_ids=segment_ids)
        x = self.shared_embedding(tokens)
        hidden = [x] if hidden_states else None
        x = _dropout(cfg)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, _BLE)
        x = _stack(EncoderLayer, cfg, cfg.num_encoder_layers, 3)(
            x, bias, mask, deterministic, hidden=hidden)
        x = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype,
                           name="encoder_norm")(x)
        x = _dropout(cfg)(x, deterministic=deterministic)
        x = nn.with_logical_constraint(x, _BLE)
        if hidden_states:
            # The last block's output is replaced by the normed final output.
            return x, hidden[:-1] + [x] if cfg.num_encoder_layers else hidden + [x]
        return x


class Decoder(nn.Module):
    """Embedding, N causal blocks with cross-attention, final norm, LM head."""
    config: T5Config
    shared_embedding: nn.Module

    @nn.compact
    def __call__(self, encoded: Array, encoder_input_tokens: Array,
                 decoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
                 decoder_segment_ids: Optional[Array] = None,
                 decoder_positions: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        """Teacher-forced decoding; see ``T5.decode``. Returns [B, T, V] float32."""
        cfg = self.config
        length = decoder_input_tokens.shape[1]
        enc_length = encoder_input_tokens.shape[1]
        bias = _position_bias(cfg, length, decoder_positions, bidirectional=False)
        # Without segment ids decoder padding needs no mask: it sits after the
        # real tokens, which causality already hides it from (as in HF). Input
        # id 0 is also the start token, so it cannot mark padding here.
        self_mask = layers.make_attention_mask(
            query_length=length, key_length=length,
            query_segment_ids=decoder_segment_ids, key_segment_ids=decoder_segment_ids,
            causal=True)
        if decoder_segment_ids is not None:
            if encoder_segment_ids is None:
                raise ValueError("decoder_segment_ids need encoder_segment_ids")
            cross_mask = layers.make_attention_mask(
                query_length=length, key_length=enc_length,
                query_segment_ids=decoder_segment_ids, key_segment_ids=encoder_segment_ids)
        else:
            cross_mask = layers.make_attention_mask(
                query_length=length, key_length=enc_length,
                key_valid=encoder_input_tokens != cfg.pad_id)

        y = self.shared_embedding(decoder_input_tokens)
        y = _dropout(cfg)(y, deterministic=deterministic)
        y = nn.with_logical_constraint(y, _BLE)
        y = _stack(DecoderLayer, cfg, cfg.num_decoder_layers, 5)(
            y, encoded, bias, self_mask, cross_mask, deterministic)
        y = layers.RMSNorm(cfg.layer_norm_epsilon, cfg.activation_dtype,
                           name="decoder_norm")(y)
        y = _dropout(cfg)(y, deterministic=deterministic)
        y = nn.with_logical_constraint(y, _BLE)
        # The head runs in float32: the vocabulary is tiny (128) and the loss
        # wants full-precision logits.
        y = y.astype(jnp.float32)
        if cfg.scale_decoder_outputs:
            y = y * (cfg.d_model ** -0.5)
        if cfg.tie_word_embeddings:
            logits = self.shared_embedding.attend(y, dtype=jnp.float32)
        else:
            logits = layers.DenseGeneral(
                cfg.vocab_size, kernel_axes=("embed", "vocab"), dtype=jnp.float32,
                kernel_init=nn.initializers.normal(cfg.d_model ** -0.5),
                name="logits_dense")(y)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))


def _setup_encoder(module: nn.Module) -> None:
    """Gives ``module`` (in its ``setup``) the shared embedding and the encoder,
    under the names both ``T5`` and ``T5EncoderOnly`` params use."""
    cfg = module.config
    module.token_embedder = layers.Embed(cfg.vocab_size, cfg.d_model,
                                         dtype=cfg.activation_dtype)
    module.encoder = Encoder(cfg, module.token_embedder)


class T5(nn.Module):
    """Encoder-decoder T5 (ProtT5). Call ``init``/``apply`` with ``__call__``,
    or ``apply(..., method="encode" | "decode")``."""
    config: T5Config

    def setup(self):
        _setup_encoder(self)
        self.decoder = Decoder(self.config, self.token_embedder)

    def encode(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               encoder_positions: Optional[Array] = None,
               deterministic: bool = True) -> Array:
        """Runs the encoder.

        Args:
          encoder_input_tokens: [B, L] int ids; 0 is padding when
            ``encoder_segment_ids`` is None.
          encoder_segment_ids: optional [B, L] packing segment ids (0 = padding);
            tokens attend only within their segment.
          encoder_positions: optional [B, L] positions restarting per segment.
          deterministic: False enables dropout (needs a ``dropout`` rng).

        Returns:
          [B, L, D] encodings in the activation dtype.
        """
        return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                            deterministic)

    def decode(self, encoded: Array, encoder_input_tokens: Array,
               decoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
               decoder_segment_ids: Optional[Array] = None,
               decoder_positions: Optional[Array] = None,
               deterministic: bool = True) -> Array:
        """Runs the decoder with teacher forcing.

        Args:
          encoded: [B, L, D] output of ``encode``.
          encoder_input_tokens: [B, L] int ids (their padding masks
            cross-attention when no segment ids are given).
          decoder_input_tokens: [B, T] int ids, targets shifted right
            (``decoder_input_tokens_from_targets``).
          encoder_segment_ids: optional [B, L]; required with decoder ones.
          decoder_segment_ids: optional [B, T]; decoder tokens attend (self and
            cross) only within their segment.
          decoder_positions: optional [B, T] positions restarting per segment.
          deterministic: False enables dropout.

        Returns:
          [B, T, V] float32 logits.
        """
        return self.decoder(encoded, encoder_input_tokens, decoder_input_tokens,
                            encoder_segment_ids, decoder_segment_ids, decoder_positions,
                            deterministic)

    def __call__(self, encoder_input_tokens: Array, decoder_input_tokens: Array,
                 encoder_segment_ids: Optional[Array] = None,
                 decoder_segment_ids: Optional[Array] = None,
                 encoder_positions: Optional[Array] = None,
                 decoder_positions: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        """Encodes then decodes; arguments as in ``encode`` and ``decode``.

        Returns:
          [B, T, V] float32 logits.
        """
        encoded = self.encode(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                              deterministic)
        return self.decode(encoded, encoder_input_tokens, decoder_input_tokens,
                           encoder_segment_ids, decoder_segment_ids, decoder_positions,
                           deterministic)


class T5EncoderOnly(nn.Module):
    """Shared embedding + encoder (HF ``T5EncoderModel``), for embeddings.

    Its params are the ``token_embedder`` and ``encoder`` subtrees of ``T5``.
    """
    config: T5Config

    def setup(self):
        _setup_encoder(self)

    def __call__(self, encoder_input_tokens: Array, encoder_segment_ids: Optional[Array] = None,
                 encoder_positions: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        """Same as ``T5.encode``; returns [B, L, D]."""
        return self.encoder(encoder_input_tokens, encoder_segment_ids, encoder_positions,
                            deterministic)

    def encode(self, *args, **kwargs) -> Array:
        """Alias of ``__call__`` so both model classes answer ``encode``."""
        return self(*args, **kwargs)


@functools.lru_cache(maxsize=64)  # shapes of a config never change: trace once
def abstract_params(config: T5Config, encoder_only: bool = False,
                    batch: int = 1, length: int = 8) -> Any:
    """Boxed parameter shapes via ``jax.eval_shape`` (no memory, any size).

    Args:
      config: the model config.
      encoder_only: shapes of ``T5EncoderOnly`` instead of ``T5``.
      batch: dummy batch size for tracing.
      length: dummy length for tracing.

    Returns:
      A pytree of ``nn.LogicallyPartitioned``-boxed ``jax.ShapeDtypeStruct``;
      ``nn.get_partition_spec`` gives the logical specs.
    """
    tokens = jnp.ones((batch, length), jnp.int32)
    if encoder_only:
        model = T5EncoderOnly(config)
        fn = lambda rng: model.init(rng, tokens)  # noqa: E731
    else:
        model = T5(config)
        fn = lambda rng: model.init(rng, tokens, tokens)  # noqa: E731
    return jax.eval_shape(fn, jax.random.PRNGKey(0))["params"]


def greedy_decode(model: T5, params: Any, encoder_input_tokens: Array,
                  max_length: int) -> Array:
    """Greedy decoding (no KV cache: each step reruns the decoder on the prefix).

    Meant for checks and short outputs (e.g. agreeing with Hugging Face
    ``generate(do_sample=False)``), not for throughput. Decoder inputs have a
    fixed length, so one compiled step serves every position; causality keeps
    the not-yet-written positions from affecting the current one.

    Args:
      model: a ``T5``.
      params: its params (without the ``{"params": ...}`` wrapper).
      encoder_input_tokens: [B, L] int ids, 0-padded.
      max_length: tokens to generate after the start token.

    Returns:
      [B, max_length] int32 ids; after a row's EOS its tokens are ``pad_id``.
    """
    cfg = model.config

    @jax.jit
    def run(params, tokens):
        encoded = model.apply({"params": params}, tokens, method="encode")
        b = tokens.shape[0]
        dec = jnp.full((b, max_length + 1), cfg.decoder_start_token_id, jnp.int32)

        def step(t, carry):
            dec, done = carry
            logits = model.apply({"params": params}, encoded, tokens, dec[:, :-1],
                                 method="decode")
            nxt = jnp.argmax(logits[:, t], axis=-1).astype(jnp.int32)
            nxt = jnp.where(done, cfg.pad_id, nxt)
            return dec.at[:, t + 1].set(nxt), done | (nxt == cfg.eos_id)

        dec, _ = jax.lax.fori_loop(0, max_length, step, (dec, jnp.zeros((b,), bool)))
        return dec[:, 1:]

    return run(params, jnp.asarray(encoder_input_tokens, jnp.int32))


class Encoding(T5EncoderOnly):
    """``T5EncoderOnly`` answering the embedding contract (same params)."""

    def encode(self, tokens: Array, mask: Optional[Array] = None,
               repr_layers: Sequence[int] = (-1,)) -> Dict[str, Dict[int, Array]]:
        """Representations of unpacked token ids.

        Args:
          tokens: [B, T] int ids (``seq </s>`` then padding).
          mask: [B, T] bool, True on real tokens (default: ``tokens != pad_id``).
          repr_layers: layers 0 (token embedding) .. N (final output, after the
            final norm), negative from N; like HF ``hidden_states``.

        Returns:
          ``{"representations": {layer: [B, T, D]}}`` keyed as asked.
        """
        tokens = where_valid(tokens, mask, self.config.pad_id)
        _, hidden = self.encoder(tokens, hidden_states=True)
        return {"representations": {i: hidden[i] for i in repr_layers}}


def _encoder_view(config: T5Config, params: Mapping[str, Any]) -> EncoderView:
    cfg = config.replace(dropout_rate=0.0, remat_policy="none", scan_layers=False,
                         attention_chunk_size=None, mlp_chunk_size=None)
    tree = params.get("params", params)
    tree = {k: tree[k] for k in ("token_embedder", "encoder") if k in tree}
    return EncoderView(
        config=cfg, params=unscan(tree, abstract_params(cfg, encoder_only=True)),
        num_layers=cfg.num_encoder_layers, max_positions=None,  # relative positions
        make_module=Encoding,
        chunked=lambda c, a, m: c.replace(attention_chunk_size=a, mlp_chunk_size=m),
        pad_id=cfg.pad_id)


def _with_stack_depths(config: T5Config, depths: Sequence[int]) -> T5Config:
    return config.replace(scan_layers=False, num_encoder_layers=depths[0],
                          num_decoder_layers=depths[1])


FAMILY = Family(
    name="t5", config_class=T5Config,
    build=lambda c: (T5(c), ("encoder_input_tokens", "decoder_input_tokens")),
    abstract_params=lambda c, encoder_only=False: abstract_params(c, encoder_only=encoder_only),
    default_objective=objectives.EncDecObjective,
    vocabulary=ProtT5Vocabulary,
    layout=TokenLayout(suffix=("eos_id",)),  # seq </s>: residues are [:L]
    encoder_view=_encoder_view,
    encoder_collections=("token_embedder", "encoder"),
    towers=lambda c: (c,),
    stack_depths=lambda c: (c.num_encoder_layers, c.num_decoder_layers),
    with_stack_depths=_with_stack_depths,
    hf_module="protlm_jax.hf.t5", hf_model_types=("t5", "mt5"),
    presets=T5_PRESETS,
    lora_targets=attention_lora_targets(
        "attention", {"q": "query/kernel", "k": "key/kernel", "v": "value/kernel",
                      "o": "out/kernel"}))
