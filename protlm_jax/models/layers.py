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

import functools
import math
from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from protlm_jax import partitioning

Array = jax.Array
DType = Any
Initializer = Callable[..., Array]

# The logical axis names every parameter and activation uses (one list, in
# partitioning, which maps them to the mesh).
LOGICAL_AXES = partitioning.LOGICAL_AXES

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


def relative_position_bias(table: Array, relative_position: Array, *, bidirectional: bool,
                           max_distance: int = 128) -> Array:
    """Gathers a [H, R] bias table at the T5 buckets of ``relative_position``.

    Args:
      table: [H, R] learned bias per head and bucket.
      relative_position: [B|1, T, S] int, key minus query position.
      bidirectional: encoder (True) or causal decoder (False) bucketing.
      max_distance: offset from which all positions share a bucket.

    Returns:
      [B|1, H, T, S] float32 bias.
    """
    buckets = relative_position_bucket(
        relative_position, bidirectional=bidirectional, num_buckets=table.shape[-1],
        max_distance=max_distance)
    # Gather in [..., T, S, H] then move heads forward ([B|1, H, T, S]).
    bias = jnp.take(table.T, buckets, axis=0)
    return jnp.moveaxis(bias, -1, -3)


@flax.struct.dataclass
class PositionBiasTable:
    """A stack's relative position table plus its bucketing, as a pytree.

    Passed to attention instead of a materialised [1, H, L, L] bias so that
    chunked attention computes the bias of one block of (query, key) pairs at a
    time: memory then grows linearly with the length. Only the table is traced;
    it crosses ``nn.scan``/``nn.remat`` like any array.
    """
    table: Array  # [H, R]
    bidirectional: bool = flax.struct.field(pytree_node=False)
    max_distance: int = flax.struct.field(pytree_node=False)

    def __call__(self, query_positions: Array, key_positions: Array) -> Array:
        """Bias for absolute positions: [T] and [S] -> [1, H, T, S] float32."""
        rel = (key_positions.astype(jnp.int32)[None, :]
               - query_positions.astype(jnp.int32)[:, None])
        return relative_position_bias(self.table, rel[None], bidirectional=self.bidirectional,
                                      max_distance=self.max_distance)


class RelativePositionBias(nn.Module):
    """Learned per-head bias indexed by relative-position bucket (one table per stack)."""
    num_heads: int
    num_buckets: int = 32
    max_distance: int = 128
    bidirectional: bool = True
    embedding_init: Initializer = _normal(1.0)

    def setup(self):
        self.rel_embedding = self.param(
            "rel_embedding",
            nn.with_logical_partitioning(self.embedding_init, ("heads", "relpos_buckets")),
            (self.num_heads, self.num_buckets), jnp.float32)

    def __call__(self, relative_position: Array) -> Array:
        """Looks up the bias for each (query, key) pair.

        Args:
          relative_position: [B|1, T, S] int, key minus query position.

        Returns:
          [B|1, H, T, S] float32 bias.
        """
        return relative_position_bias(self.rel_embedding, relative_position,
                                      bidirectional=self.bidirectional,
                                      max_distance=self.max_distance)

    def table(self) -> PositionBiasTable:
        """The table and its bucketing, for bias computed block by block."""
        return PositionBiasTable(self.rel_embedding, self.bidirectional, self.max_distance)


def _pad_axis(x: Array, axis: int, size: int, value=0) -> Array:
    """Pads ``axis`` of ``x`` at the end up to ``size``."""
    pad = size - x.shape[axis]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def chunked_attention(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array, *,
                      bias: Optional[PositionBiasTable], key_mask: Optional[Array],
                      chunk_size: int) -> Array:
    """Exact softmax attention computed block by block (online softmax).

    Queries are processed ``chunk_size`` at a time (``lax.map``); for each
    query block the keys are visited ``chunk_size`` at a time (``lax.scan``)
    keeping a running maximum, normaliser and weighted sum in float32, so the
    largest intermediate is one [B, H, C, C] block whatever the length: memory
    grows linearly with the length instead of quadratically. The T5 position
    bias of each block is computed from the table on the fly. The result equals
    the plain softmax up to float rounding (sums taken in another order).

    Masked keys get the same finite minimum logit as the plain path, so a row
    with no valid key comes out as the same uniform average.

    Args:
      q_BTHK: [B, T, H, K] queries.
      k_BSHK: [B, S, H, K] keys.
      v_BSHK: [B, S, H, K] values.
      bias: the position bias table, or None.
      key_mask: optional [B|1, S] bool, True at keys that may be attended.
      chunk_size: C, the block length for queries and keys.

    Returns:
      [B, T, H, K] in the dtype of ``v_BSHK``.
    """
    b, t, h, k = q_BTHK.shape
    s = k_BSHK.shape[1]
    c = chunk_size
    nq, nk = -(-t // c), -(-s // c)
    neg = jnp.finfo(jnp.float32).min
    if key_mask is None:
        key_mask = jnp.ones((1, s), bool)
    # Padded keys are masked; padded queries are computed and dropped.
    mask_nBS = _pad_axis(key_mask.astype(bool), 1, nk * c, False)
    mask_nBC = mask_nBS.reshape(mask_nBS.shape[0], nk, c).swapaxes(0, 1)
    k_nBCHK = _pad_axis(k_BSHK, 1, nk * c).reshape(b, nk, c, h, k).swapaxes(0, 1)
    v_nBCHK = _pad_axis(v_BSHK, 1, nk * c).reshape(b, nk, c, h, k).swapaxes(0, 1)
    q_nBCHK = _pad_axis(q_BTHK, 1, nq * c).reshape(b, nq, c, h, k).swapaxes(0, 1)
    offsets = jnp.arange(c, dtype=jnp.int32)

    def query_block(args):
        qi, q_BCHK = args
        q_pos = qi * c + offsets

        def key_block(carry, xs):
            m_BHC, l_BHC, acc_BCHK = carry
            kj, k_BCHK, v_BCHK, mask_BC = xs
            logits = jnp.einsum("bqhk,bshk->bhqs", q_BCHK, k_BCHK).astype(jnp.float32)
            if bias is not None:
                k_pos = kj * c + offsets
                # Pairs at least max_distance apart share one bucket per
                # direction: blocks that far off the diagonal need only one.
                far = (jnp.abs(kj - qi) - 1) * c + 1 >= bias.max_distance
                logits = logits + jax.lax.cond(
                    far, lambda: jnp.broadcast_to(bias(q_pos[:1], k_pos[:1]),
                                                  (1, h, c, c)),
                    lambda: bias(q_pos, k_pos))
            logits = jnp.where(mask_BC[:, None, None, :], logits, neg)
            m_new = jnp.maximum(m_BHC, logits.max(axis=-1))
            p = jnp.exp(logits - m_new[..., None])
            correction = jnp.exp(m_BHC - m_new)
            l_new = l_BHC * correction + p.sum(axis=-1)
            pv = jnp.einsum("bhqs,bshk->bqhk", p.astype(v_BCHK.dtype), v_BCHK)
            acc_new = (acc_BCHK * jnp.moveaxis(correction, 1, 2)[..., None]
                       + pv.astype(jnp.float32))
            return (m_new, l_new, acc_new), None

        init = (jnp.full((b, h, c), -jnp.inf, jnp.float32), jnp.zeros((b, h, c), jnp.float32),
                jnp.zeros((b, c, h, k), jnp.float32))
        (_, l_BHC, acc_BCHK), _ = jax.lax.scan(
            key_block, init, (jnp.arange(nk, dtype=jnp.int32), k_nBCHK, v_nBCHK, mask_nBC))
        return (acc_BCHK / jnp.moveaxis(l_BHC, 1, 2)[..., None]).astype(v_BSHK.dtype)

    out_nBCHK = jax.lax.map(query_block, (jnp.arange(nq, dtype=jnp.int32), q_nBCHK))
    return out_nBCHK.swapaxes(0, 1).reshape(b, nq * c, h, k)[:, :t]


# Plain attention over more than 2x this many queries runs in query blocks.
QUERY_BLOCK = 512


def sum_leading(x: Array) -> Array:
    """``x.sum(axis=0, keepdims=True)`` as a halving tree of element-wise adds.

    XLA:CPU's reduce over the outermost axis of a large array runs at a small
    fraction of memory bandwidth (an [8, 8, 512, 512] float32 sum: 78 ms,
    against 2.4 ms for the same sum written as adds, which XLA fuses into one
    pass). Equal to ``jnp.sum`` up to the order of the additions.
    """
    rest = None
    while x.shape[0] > 1:
        n = x.shape[0]
        if n % 2:
            rest = x[-1:] if rest is None else rest + x[-1:]
        half = n // 2
        x = x[:half] + x[half:2 * half]
    return x if rest is None else x + rest


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _broadcast_leading(x: Array, size: int) -> Array:
    return jnp.broadcast_to(x, (size,) + x.shape[1:])


def _broadcast_leading_fwd(x, size):
    return _broadcast_leading(x, size), None


def _broadcast_leading_bwd(size, _, g):
    return (sum_leading(g),)


_broadcast_leading.defvjp(_broadcast_leading_fwd, _broadcast_leading_bwd)


def broadcast_leading(x: Array, size: int) -> Array:
    """Broadcasts a leading axis of size 1 to ``size``; the gradient is summed
    back with :func:`sum_leading` (a bias shared by the batch: its gradient
    is otherwise XLA:CPU's slow outer-axis reduce, 0.7 s of a 10 s T5 step)."""
    if x.shape[0] != 1 or size == 1:
        return x
    return _broadcast_leading(x, size)


def dot_product_attention(q_BTHK: Array, k_BSHK: Array, v_BSHK: Array,
                          bias: Optional[Array] = None, mask: Optional[Array] = None, *,
                          dtype: DType = jnp.float32,
                          dropout: Optional[Callable[[Array], Array]] = None,
                          query_block: int = QUERY_BLOCK) -> Array:
    """``softmax(q k^T + bias) v`` with the softmax in float32: [B, T, H, K].

    ``bias`` is additive, [B|1, H|1, T, S]; no scaling is applied (T5 has
    none, BERT scales q). ``mask`` [B|1, 1|H, T|1, S] is True where a query may
    attend: ``finfo(float32).min`` is added to masked logits (as HF does), so
    a fully masked row (packed padding) comes out as the uniform average
    instead of NaN. ``dropout``, if given,
    maps the unnormalised weights (training).

    Head-major operands and explicit ``dot_general`` s: the value product reads
    the [B, H, T, S] weights in place, and XLA:CPU (YNNPACK) then runs logits,
    bias, mask and softmax as fused passes. The mask is added to the logits as
    ``where(mask, 0, min)`` of its own shape rather than folded into a
    [B, H, T, S] bias first: each layer then reads the [1, H, T, S] bias and
    the [B, 1, 1, S] mask instead of a materialised [B, H, T, S] array, and the
    backward needs no select.
    A bias shared by the batch is broadcast with :func:`broadcast_leading`, whose
    gradient avoids XLA:CPU's slow outer-axis reduce. The softmax is
    normalised after the value product (``exp(l - max) @ v / sum``), dividing
    [B, H, T, K] instead of the weights; equal up to rounding.

    Longer than ``2 * query_block`` queries, the queries run in blocks of
    ``query_block`` against all keys (exact: softmax rows are independent), so
    one block's [B, H, query_block, S] weights stay in cache (1.4x faster at
    1,500-2,000 tokens on a 2-core CPU, no change up to 1,024).
    """
    t = q_BTHK.shape[1]
    if query_block and t > 2 * query_block:
        def rows(x, i):
            return x if x is None or x.shape[2] == 1 else x[:, :, i:i + query_block]

        outs = [dot_product_attention(q_BTHK[:, i:i + query_block], k_BSHK, v_BSHK,
                                      rows(bias, i), rows(mask, i), dtype=dtype,
                                      dropout=dropout, query_block=0)
                for i in range(0, t, query_block)]
        return jnp.concatenate(outs, axis=1)
    q_BHTK, k_BHSK, v_BHSK = (jnp.swapaxes(x, 1, 2) for x in (q_BTHK, k_BSHK, v_BSHK))
    logits_BHTS = jax.lax.dot_general(
        q_BHTK, k_BHSK, (((3,), (3,)), ((0, 1), (0, 1)))).astype(jnp.float32)
    if bias is not None:
        bias = broadcast_leading(bias.astype(jnp.float32), logits_BHTS.shape[0])
        logits_BHTS = logits_BHTS + bias
    if mask is not None:
        # Added, not selected: the additive mask has the mask's own (small)
        # shape, and the logits' gradient passes through unchanged (it is
        # already 0 where the weights are), with no select in the backward.
        logits_BHTS = logits_BHTS + jnp.where(mask, 0.0, jnp.finfo(jnp.float32).min)
    logits_max_BHT = jax.lax.stop_gradient(jnp.max(logits_BHTS, axis=-1))
    unnorm_BHTS = jnp.exp(logits_BHTS - logits_max_BHT[..., None])
    denom_BHT = jnp.sum(unnorm_BHTS, axis=-1)
    if dropout is not None:
        unnorm_BHTS = dropout(unnorm_BHTS)
    out_BHTK = jax.lax.dot_general(unnorm_BHTS.astype(dtype), v_BHSK,
                                   (((3,), (2,)), ((0, 1), (0, 1))))
    return jnp.swapaxes(out_BHTK / denom_BHT[..., None], 1, 2).astype(dtype)


class MultiHeadAttention(nn.Module):
    """T5 multi-head attention: no 1/sqrt(d_kv) scaling, additive position bias.

    Logits and softmax run in float32 whatever ``dtype`` is, so bfloat16
    activations do not lose the bias or the mask.

    With ``chunk_size`` set and a longer query or key sequence, attention runs
    block by block (:func:`chunked_attention`): exact, memory linear in the
    length. That needs the bias as a :class:`PositionBiasTable` (or none) and a
    mask of keys only ([B|1, 1, 1, S]); otherwise the plain path runs.
    """
    num_heads: int
    d_kv: int
    dtype: DType = jnp.float32
    dropout_rate: float = 0.0
    chunk_size: Optional[int] = None
    # Defaults follow HF T5 init; the query std folds in the missing
    # 1/sqrt(d_kv) (mesh-tf convention). None means: derive from the shapes.
    query_init: Optional[Initializer] = None
    kv_init: Optional[Initializer] = None
    out_init: Optional[Initializer] = None

    @nn.compact
    def __call__(self, inputs_q: Array, inputs_kv: Array,
                 bias: Union[Array, PositionBiasTable, None] = None,
                 mask: Optional[Array] = None, deterministic: bool = True) -> Array:
        """Attends from ``inputs_q`` to ``inputs_kv``.

        Args:
          inputs_q: [B, T, D] queries.
          inputs_kv: [B, S, D] keys/values.
          bias: optional [B|1, H, T, S] float position bias added to logits,
            or the table it comes from (absolute positions ``arange``).
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

        t, s = q_BTHK.shape[1], k_BSHK.shape[1]
        # Blocks need the bias as a table and a key-only mask; a materialised
        # bias or a per-query mask (packing) means the plain path.
        chunkable = ((bias is None or isinstance(bias, PositionBiasTable))
                     and (mask is None or (mask.shape[1], mask.shape[2]) == (1, 1)))
        if self.chunk_size is not None and max(t, s) > self.chunk_size and chunkable:
            if not deterministic and self.dropout_rate > 0.0:
                raise ValueError("chunked attention has no attention dropout; "
                                 "use it for inference or set dropout_rate=0")
            out_BTHK = chunked_attention(
                q_BTHK, k_BSHK, v_BSHK, bias=bias, chunk_size=self.chunk_size,
                key_mask=None if mask is None else mask[:, 0, 0, :])
        else:
            if isinstance(bias, PositionBiasTable):
                bias = bias(jnp.arange(t), jnp.arange(s))
            dropout = None
            if not deterministic and self.dropout_rate > 0.0:
                def dropout(w):
                    return nn.Dropout(rate=self.dropout_rate)(w, deterministic=False)
            out_BTHK = dot_product_attention(q_BTHK, k_BSHK, v_BSHK, bias, mask,
                                             dtype=self.dtype, dropout=dropout)
        out_BTHK = nn.with_logical_constraint(out_BTHK, ("batch", "length", "heads", "kv"))
        return DenseGeneral(d_model, axis=(-2, -1), kernel_axes=("heads", "kv", "embed"),
                            dtype=self.dtype, kernel_init=o_init, name="out")(out_BTHK)


def apply_in_chunks(module: nn.Module, x_BLD: Array, chunk_size: int, **kwargs) -> Array:
    """``module(x, **kwargs)`` for a position-wise ``module``, ``chunk_size`` positions at a time.

    A lifted ``nn.scan`` with broadcast params runs the module on [B, C, D]
    blocks, so its intermediates (e.g. the [B, L, F] feed-forward hidden
    layer) exist for one block at a time. Exact: positions do not interact.
    Call it from the parent's compact method with the (unbound) submodule.

    Args:
      module: maps [B, C, D] -> [B, C, D'] position by position.
      x_BLD: [B, L, D] input.
      chunk_size: C.
      **kwargs: Python values passed on each call (e.g. ``deterministic``).

    Returns:
      [B, L, D'] output.
    """
    b, length = x_BLD.shape[:2]
    n = -(-length // chunk_size)
    x_nBCD = _pad_axis(x_BLD, 1, n * chunk_size).reshape(
        (b, n, chunk_size) + x_BLD.shape[2:]).swapaxes(0, 1)

    def body(mdl, carry, x_BCD):
        return carry, mdl(x_BCD, **kwargs)

    _, y_nBCD = nn.scan(body, variable_broadcast="params",
                        split_rngs={"params": False, "dropout": True}, length=n)(
                            module, None, x_nBCD)
    return y_nBCD.swapaxes(0, 1).reshape((b, n * chunk_size) + y_nBCD.shape[3:])[:, :length]


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
