"""Transformer layers shared by the protlm-jax models (Flax linen).

The arithmetic follows Hugging Face T5 (``transformers.models.t5``) so that
converted checkpoints give the same numbers: RMS layer norm without mean or
bias computed in float32, attention logits without ``1/sqrt(d_kv)`` scaling
plus a learned relative position bias, ReLU or gated feed-forward blocks.

Every parameter is declared with a logical axis per dimension
(``nn.with_logical_partitioning``); models never name mesh axes. Activations
at block boundaries carry ``nn.with_logical_constraint`` annotations, which are
no-ops unless the caller installs axis rules.

Shape legend:
  B batch, L/T query lengths, S key length, D embed (d_model),
  H heads, K d_kv (per-head size), F mlp (d_ff), V vocab, R relpos buckets.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# Logical axis names (T5X conventions, REFERENCE §7).
LOGICAL_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "joined_kv",
                "vocab", "relpos_buckets", "layers")

FEED_FORWARD_KINDS = ("relu", "gated-gelu", "gated-silu")


def _normal(stddev: float) -> Initializer:
    return nn.initializers.normal(stddev=stddev)


def _canonicalize_tuple(x: Union[int, Sequence[int]]) -> Tuple[int, ...]:
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class RMSNorm(nn.Module):
    """T5 layer norm: scale only, no mean subtraction, no bias.

    The variance is accumulated in float32 whatever the activation dtype, as in
    Hugging Face ``T5LayerNorm``; the result is cast back to ``dtype``.
    """
    epsilon: float = 1e-6
    dtype: DType = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Normalises over the last axis.

        Args:
          x: [..., D] activations.

        Returns:
          [..., D] normalised and scaled activations in ``dtype``.
        """
        scale = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("embed",)),
            (x.shape[-1],), jnp.float32)
        x32 = x.astype(jnp.float32)
        variance = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(variance + self.epsilon)
        return (scale.astype(self.dtype) * y.astype(self.dtype)).astype(self.dtype)


class Embed(nn.Module):
    """Token embedding table [V, D]; ``attend`` reuses it as a tied output layer."""
    num_embeddings: int
    features: int
    dtype: DType = jnp.float32
    # HF T5 initialises the shared embedding with unit variance.
    embedding_init: Initializer = _normal(1.0)

    def setup(self):
        self.embedding = self.param(
            "embedding",
            nn.with_logical_partitioning(self.embedding_init, ("vocab", "embed")),
            (self.num_embeddings, self.features), jnp.float32)

    def __call__(self, ids: Array) -> Array:
        """Looks up token ids.

        Args:
          ids: [...] integer token ids.

        Returns:
          [..., D] embeddings in ``dtype``.
        """
        return jnp.take(self.embedding, ids, axis=0).astype(self.dtype)

    def attend(self, x: Array, dtype: Optional[DType] = None) -> Array:
        """Projects onto the vocabulary with the transposed table.

        Args:
          x: [..., D] activations.
          dtype: computation dtype (default ``self.dtype``).

        Returns:
          [..., V] logits in ``dtype``.
        """
        dtype = dtype or self.dtype
        return jnp.einsum("...d,vd->...v", x.astype(dtype),
                          self.embedding.astype(dtype))


class DenseGeneral(nn.Module):
    """Bias-free projection contracting ``axis`` of the input to ``features``.

    The kernel has shape ``in_dims + features`` with one logical name per
    dimension in ``kernel_axes``.
    """
    features: Union[int, Tuple[int, ...]]
    kernel_axes: Tuple[str, ...]
    axis: Union[int, Tuple[int, ...]] = -1
    dtype: DType = jnp.float32
    kernel_init: Initializer = _normal(1.0)

    @nn.compact
    def __call__(self, x: Array) -> Array:
        """Applies the projection.

        Args:
          x: [..., *in_dims] activations.

        Returns:
          [..., *features] in ``dtype``.
        """
        features = _canonicalize_tuple(self.features)
        axis = tuple(a % x.ndim for a in _canonicalize_tuple(self.axis))
        in_dims = tuple(x.shape[a] for a in axis)
        kernel_shape = in_dims + features
        if len(self.kernel_axes) != len(kernel_shape):
            raise ValueError(f"kernel_axes {self.kernel_axes} do not name every "
                             f"dimension of the kernel {kernel_shape}")
        kernel = self.param(
            "kernel", nn.with_logical_partitioning(self.kernel_init, self.kernel_axes),
            kernel_shape, jnp.float32)
        contract = (axis, tuple(range(len(axis))))
        return jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                   (contract, ((), ())))


def relative_position_bucket(relative_position: Array, *, bidirectional: bool,
                             num_buckets: int = 32, max_distance: int = 128) -> Array:
    """Maps relative positions (key - query) to T5 buckets.

    Same integer result as ``T5Attention._relative_position_bucket`` in
    transformers: bidirectional stacks give half the buckets to each direction
    (positive offsets in the upper half); unidirectional stacks clip positive
    offsets (the future) to 0. In each direction the first half of the buckets
    are exact offsets, the rest grow logarithmically up to ``max_distance``,
    beyond which everything shares the last bucket.

    Args:
      relative_position: [...] int, memory position minus query position.
      bidirectional: encoder (True) or causal decoder (False) bucketing.
      num_buckets: total buckets R.
      max_distance: offset from which all positions share a bucket.

    Returns:
      [...] int32 buckets in [0, R).
    """
    relative_position = relative_position.astype(jnp.int32)
    buckets = jnp.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative_position > 0).astype(jnp.int32) * num_buckets
        n = jnp.abs(relative_position)
    else:
        n = -jnp.minimum(relative_position, 0)
    max_exact = num_buckets // 2
    is_small = n < max_exact
    # log(0) would be -inf; those entries take the exact branch anyway, so any
    # finite stand-in keeps the float->int cast defined without moving bucket
    # boundaries (an added epsilon, as in mesh-tf, could).
    n_safe = jnp.maximum(n, 1).astype(jnp.float32)
    large = max_exact + (
        jnp.log(n_safe / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, n, large)


def relative_positions(query_length: int, key_length: int,
                       query_positions: Optional[Array] = None,
                       key_positions: Optional[Array] = None) -> Array:
    """Key position minus query position.

    Args:
      query_length: T.
      key_length: S.
      query_positions: optional [B, T] explicit positions (packed rows restart
        at 0 in every segment); default ``arange(T)``.
      key_positions: optional [B, S]; default ``query_positions`` when the
        lengths agree, else ``arange(S)``.

    Returns:
      [1, T, S] int32 without explicit positions, else [B, T, S].
    """
    if key_positions is None and query_positions is not None and query_length == key_length:
        key_positions = query_positions
    if query_positions is None and key_positions is None:
        q = jnp.arange(query_length, dtype=jnp.int32)[None, :]
        k = jnp.arange(key_length, dtype=jnp.int32)[None, :]
    else:
        q = (jnp.arange(query_length, dtype=jnp.int32)[None, :]
             if query_positions is None else query_positions.astype(jnp.int32))
        k = (jnp.arange(key_length, dtype=jnp.int32)[None, :]
             if key_positions is None else key_positions.astype(jnp.int32))
    return k[:, None, :] - q[:, :, None]


def make_attention_mask(*, query_length: int, key_length: int,
                        key_valid: Optional[Array] = None,
                        query_segment_ids: Optional[Array] = None,
                        key_segment_ids: Optional[Array] = None,
                        causal: bool = False) -> Optional[Array]:
    """Boolean attention mask from padding, packing and causality.

    Padding masks keys only (as Hugging Face does), so padded query rows still
    see the real tokens and no row is ever fully masked. With segment ids
    (packing), a query sees only keys of its own segment; padding has segment
    0, so the padding tokens of a packed row see only one another.

    Args:
      query_length: T.
      key_length: S.
      key_valid: optional [B, S] bool, False at padded keys.
      query_segment_ids: optional [B, T] int segment ids.
      key_segment_ids: optional [B, S] int segment ids (required with
        ``query_segment_ids``).
      causal: also forbid keys after the query (by index).

    Returns:
      [B|1, 1, T, S] bool (True = may attend), or None when nothing is masked.
    """
    mask = None

    def _and(a, b):
        return b if a is None else jnp.logical_and(a, b)

    if key_valid is not None:
        mask = _and(mask, key_valid[:, None, None, :].astype(bool))
    if query_segment_ids is not None:
        if key_segment_ids is None:
            raise ValueError("key_segment_ids are required with query_segment_ids")
        mask = _and(mask, (query_segment_ids[:, None, :, None]
                           == key_segment_ids[:, None, None, :]))
    if causal:
        idx_q = jnp.arange(query_length)[:, None]
        idx_k = jnp.arange(key_length)[None, :]
        mask = _and(mask, (idx_k <= idx_q)[None, None])
    return mask


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by relative-position bucket (one table per stack)."""
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    embedding_init: Initializer = _normal(1.0)

    @nn.compact
    def __call__(self, relative_position: Array) -> Array:
        """Looks up the bias for each (query, key) pair.

        Args:
          relative_position: [B|1, T, S] int, key minus query position.

        Returns:
          [B|1, H, T, S] float32 bias.
        """
        table = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(self.embedding_init, ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets), jnp.float32)
        buckets = relative_position_bucket(
            relative_position, bidirectional=self.bidirectional,
            num_buckets=self.num_buckets, max_distance=self.max_distance)
        # Gather in [..., T, S, H] then move heads forward ([B|1, H, T, S]).
        bias = jnp.take(table.T, buckets, axis=0)
        return jnp.moveaxis(bias, -1, -3)


class MultiHeadAttention(nn.Module):
    """T5 multi-head attention: no 1/sqrt(d_kv) scaling, additive position bias.

    Logits and softmax run in float32 whatever ``dtype`` is, so bfloat16
    activations do not lose the bias or the mask.
    """
    num_heads: int
    d_kv: int
    dtype: DType = jnp.float32
    dropout_rate: float = 0.0
    # Defaults follow HF T5 init; the query std folds in the missing
    # 1/sqrt(d_kv) (mesh-tf convention). None means: derive from the shapes.
    query_init: Optional[Initializer] = None
    kv_init: Optional[Initializer] = None
    out_init: Optional[Initializer] = None

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array,
                 bias: Optional[Array] = None, mask: Optional[Array] = None,
                 deterministic: bool = True) -> Array:
        """Attends from ``inputs_q`` to ``inputs_kv``.

        Args:
          inputs_q: [B, T, D] queries.
          inputs_kv: [B, S, D] keys/values.
          bias: optional [B|1, H, T, S] float position bias added to logits.
          mask: optional [B|1, 1|H, T, S] bool, True where attention is allowed.
          deterministic: disables attention dropout.

        Returns:
          [B, T, D] in ``dtype``.
        """
        d_model = inputs_q.shape[-1]
        h, k = self.num_heads, self.d_kv
        q_init = self.query_init or _normal((d_model * k) ** -0.5)
        kv_init = self.kv_init or _normal(d_model ** -0.5)
        o_init = self.out_init or _normal((h * k) ** -0.5)

        def proj(name, init, x):
            return DenseGeneral((h, k), kernel_axes=("embed", "heads", "kv"),
                                dtype=self.dtype, kernel_init=init, name=name)(x)

        q_BTHK = proj("query", q_init, inputs_q)
        k_BSHK = proj("key", kv_init, inputs_kv)
        v_BSHK = proj("value", kv_init, inputs_kv)
        q_BTHK = nn.with_logical_constraint(q_BTHK, ("batch", "length", "heads", "kv"))
        k_BSHK = nn.with_logical_constraint(k_BSHK, ("batch", "length", "heads", "kv"))
        v_BSHK = nn.with_logical_constraint(v_BSHK, ("batch", "length", "heads", "kv"))

        logits_BHTS = jnp.einsum("bthk,bshk->bhts", q_BTHK, k_BSHK).astype(jnp.float32)
        if bias is not None:
            logits_BHTS = logits_BHTS + bias.astype(jnp.float32)
        if mask is not None:
            # Same effect as HF's additive finfo.min mask; a finite value keeps
            # a fully masked row (packed padding) uniform instead of NaN.
            logits_BHTS = jnp.where(mask, logits_BHTS, jnp.finfo(jnp.float32).min)
        weights_BHTS = jax.nn.softmax(logits_BHTS, axis=-1)
        if not deterministic and self.dropout_rate > 0.0:
            weights_BHTS = nn.Dropout(rate=self.dropout_rate)(
                weights_BHTS, deterministic=False)
        weights_BHTS = weights_BHTS.astype(self.dtype)
        out_BTHK = jnp.einsum("bhts,bshk->bthk", weights_BHTS, v_BSHK)
        out_BTHK = nn.with_logical_constraint(out_BTHK, ("batch", "length", "heads", "kv"))
        return DenseGeneral(d_model, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                            dtype=self.dtype, kernel_init=o_init, name="out")(out_BTHK)


def gelu_tanh(x: Array) -> Array:
    """GELU with the tanh approximation (HF ``gelu_new``)."""
    return jax.nn.gelu(x, approximate=True)


class MlpBlock(nn.Module):
    """T5 feed-forward: ReLU (v1.0, ProtT5) or gated GELU(tanh) / SiLU (v1.1, Ankh)."""
    d_ff: int
    feed_forward_proj: str = "relu"
    dtype: DType = jnp.float32
    dropout_rate: float = 0.0
    wi_init: Optional[Initializer] = None
    wo_init: Optional[Initializer] = None

    @nn.compact
    def __call__(self, x: Array, deterministic: bool = True) -> Array:
        """Applies the block.

        Args:
          x: [B, L, D] (already layer-normed).
          deterministic: disables dropout.

        Returns:
          [B, L, D] in ``dtype``.
        """
        if self.feed_forward_proj not in FEED_FORWARD_KINDS:
            raise ValueError(f"feed_forward_proj must be one of {FEED_FORWARD_KINDS}, "
                             f"got {self.feed_forward_proj!r}")
        d_model = x.shape[-1]
        wi_init = self.wi_init or _normal(d_model ** -0.5)
        wo_init = self.wo_init or _normal(self.d_ff ** -0.5)

        def wi(name):
            return DenseGeneral(self.d_ff, kernel_axes=("embed", "mlp"), dtype=self.dtype,
                                kernel_init=wi_init, name=name)(x)

        if self.feed_forward_proj == "relu":
            h_BLF = jax.nn.relu(wi("wi"))
        else:
            # "gated-gelu" is HF's gelu_new, i.e. the tanh approximation.
            act = (gelu_tanh if self.feed_forward_proj == "gated-gelu"
                   else jax.nn.silu)
            h_BLF = act(wi("wi_0")) * wi("wi_1")
        h_BLF = nn.with_logical_constraint(h_BLF, ("batch", "length", "mlp"))
        h_BLF = nn.Dropout(rate=self.dropout_rate)(h_BLF, deterministic=deterministic)
        return DenseGeneral(d_model, kernel_axes=("mlp", "embed"), dtype=self.dtype,
                            kernel_init=wo_init, name="wo")(h_BLF)
