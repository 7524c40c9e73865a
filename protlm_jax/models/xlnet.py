"""ProtXLNet: XLNet (two-stream relative attention) in Flax linen, equal to HF XLNet.

The arithmetic follows transformers 5.24 (``models/xlnet``) and zihangdai/xlnet:

* word embeddings (no scaling, no absolute positions); the content stream
  ``h`` starts from them, the query stream ``g`` from ``mask_emb`` at the
  ``target_mapping`` rows;
* each layer: relative multi-head attention shared by both streams (the
  projections q, k, v, o, r and the biases ``r_w_bias``, ``r_r_bias``,
  ``r_s_bias``, ``seg_embed``) with a post-LayerNorm residual, then the
  feed-forward ``LN(x + W2 act(W1 x))``, also shared;
* score ``((q + r_w)·k + rel_shift((q + r_r)·k_r) + (q + r_s)·seg_embed[s]) /
  sqrt(d_head) - 1e30 · mask`` where ``k_r = W_r · [sin, cos](pos · inv_freq)``,
  ``inv_freq = 1 / 10000^(2i/d)``, positions ``klen, klen-1, …, -qlen+1``
  (``attn_type="bi"``), clipped at ``clamp_len``; with ``bi_data`` the second
  half of the batch takes the negated positions; ``s`` = one-hot(token type
  of the query != that of the key; memory is type 0);
* masks (1 = cannot attend): padding keys and ``perm_mask`` for the query
  stream; the content stream additionally sees its own position; memory
  (``mems``, one ``[B, M, D]`` per layer, the inputs of that layer for earlier
  tokens, under ``stop_gradient``) is visible to every query;
* logits: the output (query stream when targets are given, else content
  stream) against the word table plus ``lm_loss/bias``.

Parameters (``encoder/layers`` with a leading layer axis under ``scan_layers``)::

  word_embedding/embedding                 [V, D]        (vocab, embed)
  mask_emb                                 [1, 1, D]     (-, -, embed)
  encoder/layers_{i}/rel_attn/{q,k,v,o,r}          [D, N, K]     (embed, heads, kv)
  encoder/layers_{i}/rel_attn/{r_w_bias,r_r_bias,r_s_bias}  [N, K]  (heads, kv)
  encoder/layers_{i}/rel_attn/seg_embed            [2, N, K]     (-, heads, kv)
  encoder/layers_{i}/rel_attn/layer_norm/{scale,bias}   [D]
  encoder/layers_{i}/ff/layer_1/{kernel [D, F], bias [F]}
  encoder/layers_{i}/ff/layer_2/{kernel [F, D], bias [D]}
  encoder/layers_{i}/ff/layer_norm/{scale,bias}    [D]
  lm_loss/bias                             [V]           (vocab)

Shape legend: B batch, I queries (qlen), J keys (mlen + qlen), R relative
positions (I + J), M targets (``num_predict``) or memory length, D d_model,
N heads, K d_head, F d_inner, V vocab, Y requested layers.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from protlm_jax import objectives_xlnet
from protlm_jax.data.vocabularies import ProtXLNetVocabulary
from protlm_jax.models import bert
from protlm_jax.models.family import (DecoderView, EncoderView, Family, LoraTarget,
                                     TokenLayout, from_presets, unscan, where_valid)

Array = jax.Array

_DTYPES = bert._DTYPES  # the activation dtypes and remat policies of every family
_REMAT_POLICIES = bert._REMAT_POLICIES
_BLD = ("batch", "length", "embed")
_BLNK = ("batch", "length", "heads", "kv")
NEG_INF = 1e30  # HF's mask constant (float32; 65500 would be fp16's)


@dataclasses.dataclass(frozen=True)
class XLNetConfig:
    """Hyper-parameters of an XLNet (HF ``XLNetConfig`` field names).

    ``dtype`` is the activation dtype; parameters are always float32.
    ``mem_len``/``reuse_len`` shape the memory a forward pass returns (None:
    all of it, as HF with ``mem_len`` unset). ``attention_chunk_size``
    computes the content stream's attention block by block for inputs longer
    than it (exact; memory linear in the length): long proteins at embedding
    time.
    """
    family: ClassVar[str] = "xlnet"
    vocab_size: int = 32
    d_model: int = 1024
    n_layer: int = 30
    n_head: int = 16
    d_head: int = 64
    d_inner: int = 4096
    ff_activation: str = "gelu"
    layer_norm_eps: float = 1e-12
    dropout: float = 0.1
    initializer_range: float = 0.02
    mem_len: Optional[int] = None
    reuse_len: Optional[int] = None
    clamp_len: int = -1
    bi_data: bool = False
    pad_id: int = ProtXLNetVocabulary.PAD_ID
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    attention_chunk_size: Optional[int] = None

    def __post_init__(self):
        if self.ff_activation not in bert.ACTIVATIONS:
            raise ValueError(f"ff_activation must be one of {tuple(bert.ACTIVATIONS)}, "
                             f"got {self.ff_activation!r}")
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {_REMAT_POLICIES}, "
                             f"got {self.remat_policy!r}")
        if self.n_layer < 1 or self.n_head < 1 or self.d_head < 1:
            raise ValueError("n_layer, n_head and d_head must be positive")
        if self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even (sin/cos halves)")

    @property
    def activation_dtype(self):
        """The jnp dtype of activations."""
        return _DTYPES[self.dtype]

    def replace(self, **overrides) -> "XLNetConfig":
        """A copy with some fields changed."""
        return dataclasses.replace(self, **overrides)


# Published shape (REFERENCE_AR: 30 x 1024 x 4096 fits Rostlab/prot_xlnet's
# 1,637,757,076-byte checkpoint; 16 heads x 64 UNVERIFIED, the count does not
# depend on them; the vocabulary size of its spiece.model UNVERIFIED: ours has 32).
XLNET_PRESETS: Dict[str, XLNetConfig] = {
    "prot_xlnet": XLNetConfig(),
    "prot_xlnet_tiny": XLNetConfig(d_model=64, n_layer=2, n_head=4, d_head=16, d_inner=128,
                                   dropout=0.0),
}


def preset(name: str, **overrides) -> XLNetConfig:
    """A published (or tiny) configuration, optionally with fields overridden."""
    return from_presets(XLNET_PRESETS, "XLNet", name, **overrides)


def _init(cfg: XLNetConfig):
    return nn.initializers.normal(cfg.initializer_range)


# ------------------------------------------------------------ positions ---

def relative_positions(start: Any, count: int) -> Array:
    """``start, start-1, …, start-count+1`` as float32 [count] (``start`` may be traced)."""
    return jnp.asarray(start, jnp.float32) - jnp.arange(count, dtype=jnp.float32)


def positional_embedding(cfg: XLNetConfig, pos_R: Array, batch: int) -> Array:
    """Sinusoids ``[sin, cos](pos · inv_freq)`` of relative positions: [B|1, R, D] float32.

    With ``bi_data`` the first half of the batch takes ``pos`` and the second
    half ``-pos`` (each clipped at ``clamp_len``), as HF and zihangdai/xlnet.
    """
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, cfg.d_model, 2, dtype=jnp.float32)
                                  / cfg.d_model))

    def emb(pos):
        if cfg.clamp_len > 0:
            pos = jnp.clip(pos, -cfg.clamp_len, cfg.clamp_len)
        x = pos[:, None] * inv_freq[None, :]
        return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)

    if not cfg.bi_data:
        return emb(pos_R)[None]
    if batch % 2:
        raise ValueError(f"bi_data needs an even batch, got {batch}")
    half = batch // 2
    fwd, bwd = emb(pos_R), emb(-pos_R)
    return jnp.concatenate([jnp.broadcast_to(fwd, (half,) + fwd.shape),
                            jnp.broadcast_to(bwd, (half,) + bwd.shape)], axis=0)


def rel_shift(x_BNIR: Array, klen: int) -> Array:
    """``out[..., i, j] = x[..., i, j + I - i]`` for ``j < klen`` (HF ``rel_shift_bnij``)."""
    b, n, i, r = x_BNIR.shape
    x = x_BNIR.reshape(b, n, r, i)[:, :, 1:, :].reshape(b, n, i, r - 1)
    return x[..., :klen]


# ------------------------------------------------------------ attention ---

class RelAttention(nn.Module):
    """Two-stream relative attention with its post-LayerNorm residual (HF ``rel_attn``)."""
    config: XLNetConfig

    def setup(self):
        cfg = self.config
        shape = (cfg.d_model, cfg.n_head, cfg.d_head)
        axes = ("embed", "heads", "kv")
        for name in ("q", "k", "v", "o", "r"):
            setattr(self, name, self.param(name, nn.with_logical_partitioning(_init(cfg), axes),
                                           shape, jnp.float32))
        for name in ("r_w_bias", "r_r_bias", "r_s_bias"):
            setattr(self, name, self.param(name, nn.with_logical_partitioning(
                _init(cfg), ("heads", "kv")), (cfg.n_head, cfg.d_head), jnp.float32))
        self.seg_embed = self.param("seg_embed", nn.with_logical_partitioning(
            _init(cfg), (None, "heads", "kv")), (2, cfg.n_head, cfg.d_head), jnp.float32)
        self.layer_norm = bert.LayerNorm(cfg.layer_norm_eps, cfg.activation_dtype)
        self.drop = nn.Dropout(cfg.dropout)

    def _heads(self, x_BTD: Array, w: Array) -> Array:
        dt = self.config.activation_dtype
        y = jnp.einsum("btd,dnk->btnk", x_BTD.astype(dt), w.astype(dt))
        return nn.with_logical_constraint(y, _BLNK)

    def core(self, q_BINK: Array, k_BJNK: Array, v_BJNK: Array, kr_BRNK: Array,
             seg_BIJ: Optional[Array], mask_BIJ: Optional[Array],
             deterministic: bool) -> Array:
        """Relative attention of I queries over J keys: [B, I, N, K].

        ``kr_BRNK`` holds the R = I + J relative positions from ``start + I``
        down (``B`` may be 1); ``seg_BIJ`` True where query and key types
        differ; ``mask_BIJ`` True where the query cannot attend (``B``/``I``
        may be 1).
        """
        cfg, dt = self.config, self.config.activation_dtype
        klen = k_BJNK.shape[1]
        q = q_BINK.astype(dt)
        ac = jnp.einsum("bind,bjnd->bnij", q + self.r_w_bias.astype(dt), k_BJNK)
        if kr_BRNK.shape[0] == 1:
            bd = jnp.einsum("bind,rnd->bnir", q + self.r_r_bias.astype(dt), kr_BRNK[0])
        else:
            bd = jnp.einsum("bind,brnd->bnir", q + self.r_r_bias.astype(dt), kr_BRNK)
        score = ac.astype(jnp.float32) + rel_shift(bd, klen).astype(jnp.float32)
        if seg_BIJ is not None:
            ef_BIN2 = jnp.einsum("bind,snd->bins", q + self.r_s_bias.astype(dt),
                                 self.seg_embed.astype(dt)).astype(jnp.float32)
            ef_BN2I = ef_BIN2.transpose(0, 2, 3, 1)
            score = score + jnp.where(seg_BIJ[:, None], ef_BN2I[:, :, 1, :, None],
                                      ef_BN2I[:, :, 0, :, None])
        score = score * (cfg.d_head ** -0.5)
        if mask_BIJ is not None:
            score = score - NEG_INF * mask_BIJ[:, None].astype(jnp.float32)
        prob = jax.nn.softmax(score, axis=-1)
        prob = self.drop(prob, deterministic=deterministic)
        out = jnp.einsum("bnij,bjnd->bind", prob.astype(dt), v_BJNK)
        return nn.with_logical_constraint(out, _BLNK)

    def core_chunked(self, q_BINK: Array, k_BJNK: Array, v_BJNK: Array, kr_BRNK: Array,
                     key_pad_BJ: Optional[Array], chunk: int) -> Array:
        """:meth:`core` for the content stream without memory, ``chunk`` queries at a
        time (``lax.map``): the largest block is [B, N, chunk, I + chunk], so memory
        is linear in the length. Masks: padding keys, the own position always
        visible (HF's content-stream mask)."""
        b, i, n, k = q_BINK.shape
        nq = -(-i // chunk)
        chunk = -(-i // nq)  # equal blocks: at most nq - 1 padded queries
        pad = nq * chunk - i
        q = jnp.pad(q_BINK, ((0, 0), (0, pad), (0, 0), (0, 0)))
        q_nBCNK = q.reshape(b, nq, chunk, n, k).swapaxes(0, 1)
        # kr holds positions klen .. -qlen+1 (R = I + J); queries c0..c0+C see the
        # window of C + J positions starting at index klen - c0 - C (from the end).
        kr = jnp.pad(kr_BRNK, ((0, 0), (pad, 0), (0, 0), (0, 0)))  # room for the last block

        def block(args):
            c, q_BCNK = args
            start = i - c * chunk - chunk + pad  # index into the left-padded kr
            kr_c = jax.lax.dynamic_slice_in_dim(kr, start, chunk + i, axis=1)
            qpos = c * chunk + jnp.arange(chunk)
            mask = None
            if key_pad_BJ is not None:
                own = qpos[:, None] == jnp.arange(i)[None, :]
                mask = key_pad_BJ[:, None, :] & ~own[None]
            return self.core(q_BCNK, k_BJNK, v_BJNK, kr_c, None, mask, True)

        out = jax.lax.map(block, (jnp.arange(nq, dtype=jnp.int32), q_nBCNK))
        return out.swapaxes(0, 1).reshape(b, nq * chunk, n, k)[:, :i]

    def post(self, x_BTD: Array, attn_BTNK: Array, deterministic: bool) -> Array:
        dt = self.config.activation_dtype
        out = jnp.einsum("btnk,dnk->btd", attn_BTNK.astype(dt), self.o.astype(dt))
        out = self.drop(out, deterministic=deterministic)
        return nn.with_logical_constraint(self.layer_norm(out + x_BTD.astype(dt)), _BLD)

    def __call__(self, h_BID: Array, g_BMD: Optional[Array], kv_BJD: Array, pos_BRD: Array,
                 seg_BIJ: Optional[Array], mask_h: Optional[Array], mask_g: Optional[Array],
                 target_mapping_BMI: Optional[Array], deterministic: bool,
                 key_pad_BJ: Optional[Array] = None, chunked: bool = False):
        """Both streams through one attention: (h [B, I, D], g [B, M, D] or None)."""
        k = self._heads(kv_BJD, self.k)
        v = self._heads(kv_BJD, self.v)
        kr = self._heads(pos_BRD, self.r)
        q_h = self._heads(h_BID, self.q)
        if chunked:
            attn_h = self.core_chunked(q_h, k, v, kr, key_pad_BJ, self.config.attention_chunk_size)
        else:
            attn_h = self.core(q_h, k, v, kr, seg_BIJ, mask_h, deterministic)
        out_h = self.post(h_BID, attn_h, deterministic)
        if g_BMD is None:
            return out_h, None
        dt = self.config.activation_dtype
        tm = target_mapping_BMI.astype(dt)
        q_g = jnp.einsum("bmnk,bmi->bink", self._heads(g_BMD, self.q), tm)
        attn_g = self.core(q_g, k, v, kr, seg_BIJ, mask_g, deterministic)
        attn_g = jnp.einsum("bink,bmi->bmnk", attn_g, tm)
        return out_h, self.post(g_BMD, attn_g, deterministic)


class FeedForward(nn.Module):
    """``LN(x + drop(W2 drop(act(W1 x))))`` (HF ``ff``)."""
    config: XLNetConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool) -> Array:
        cfg, dt = self.config, self.config.activation_dtype
        drop = nn.Dropout(cfg.dropout)
        y = bert.Dense(cfg.d_inner, ("embed", "mlp"), dtype=dt, kernel_init=_init(cfg),
                       name="layer_1")(x_BTD)
        y = nn.with_logical_constraint(bert.ACTIVATIONS[cfg.ff_activation](y),
                                       ("batch", "length", "mlp"))
        y = drop(y, deterministic=deterministic)
        y = bert.Dense(cfg.d_model, ("mlp", "embed"), dtype=dt, kernel_init=_init(cfg),
                       name="layer_2")(y)
        y = drop(y, deterministic=deterministic)
        out = bert.LayerNorm(cfg.layer_norm_eps, dt, name="layer_norm")(y + x_BTD.astype(dt))
        return nn.with_logical_constraint(out, _BLD)


def cache_memory(cfg: XLNetConfig, h_BID: Array, mem_BMD: Optional[Array]) -> Array:
    """The memory a layer passes on: its input (first ``reuse_len`` positions)
    after the previous memory, the last ``mem_len`` kept (all when unset), no gradient."""
    cur = h_BID[:, :cfg.reuse_len] if cfg.reuse_len else h_BID
    new = cur if mem_BMD is None else jnp.concatenate([mem_BMD.astype(cur.dtype), cur], axis=1)
    if cfg.mem_len:
        new = new[:, -cfg.mem_len:]
    return jax.lax.stop_gradient(new)


class LMBias(nn.Module):
    """The LM head's bias (HF ``lm_loss.bias``; its weight is the word table)."""
    vocab_size: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (self.vocab_size,), jnp.float32)


class Layer(nn.Module):
    """One XLNet layer over both streams; the pair form suits ``nn.scan``."""
    config: XLNetConfig

    @nn.compact
    def __call__(self, carry, mem_BMD, pos_BRD, seg_BIJ, mask_h, mask_g, target_mapping,
                 deterministic: bool, return_mems: bool = False, key_pad_BJ=None,
                 chunked: bool = False, kv_BJD=None):
        """((h, g), memory of this layer) -> ((h, g), the memory it passes on or None).

        ``kv_BJD``: the keys' source when given (generation's cache), else the
        memory followed by ``h``.
        """
        h, g = carry
        kv = kv_BJD if kv_BJD is not None else (
            h if mem_BMD is None else jnp.concatenate([mem_BMD.astype(h.dtype), h], axis=1))
        new_mem = cache_memory(self.config, h, mem_BMD) if return_mems else None
        h, g = RelAttention(self.config, name="rel_attn")(
            h, g, kv, pos_BRD, seg_BIJ, mask_h, mask_g, target_mapping, deterministic,
            key_pad_BJ, chunked)
        ff = FeedForward(self.config, name="ff")
        h = ff(h, deterministic)
        if g is not None:
            g = ff(g, deterministic)
        return (h, g), new_mem


def _remat(cfg: XLNetConfig):
    if cfg.remat_policy == "none":
        return Layer
    policy = None if cfg.remat_policy == "full" else jax.checkpoint_policies.checkpoint_dots
    # static_argnums counts ``self``: deterministic (8), return_mems (9), chunked (11).
    return nn.remat(Layer, policy=policy, prevent_cse=not cfg.scan_layers,
                    static_argnums=(8, 9, 11))


def build_masks(attention_mask_BI: Optional[Array], perm_mask_BII: Optional[Array],
                mlen: int, qlen: int) -> Tuple[Optional[Array], Optional[Array]]:
    """(content-stream mask, query-stream mask) as HF builds them, True = cannot attend.

    The query stream's is padding keys or ``perm_mask``; the content stream's
    the same with the query's own position visible. Memory is always visible.
    """
    data = None
    if attention_mask_BI is not None:
        data = (1.0 - attention_mask_BI.astype(jnp.float32))[:, None, :]
    if perm_mask_BII is not None:
        perm = perm_mask_BII.astype(jnp.float32)
        data = perm if data is None else data + perm
    if data is None:
        return None, None
    if mlen:
        data = jnp.concatenate([jnp.zeros(data.shape[:2] + (mlen,), data.dtype), data], axis=-1)
    mask_g = data > 0
    own = jnp.concatenate([jnp.zeros((qlen, mlen), bool), jnp.eye(qlen, dtype=bool)], axis=1)
    mask_h = (data - own[None].astype(jnp.float32)) > 0
    return mask_h, mask_g


def segment_matrix(token_type_ids_BI: Optional[Array], mlen: int) -> Optional[Array]:
    """[B, I, J] True where the query's token type differs from the key's (memory: 0)."""
    if token_type_ids_BI is None:
        return None
    cat = token_type_ids_BI
    if mlen:
        cat = jnp.concatenate([jnp.zeros(cat.shape[:1] + (mlen,), cat.dtype), cat], axis=1)
    return token_type_ids_BI[:, :, None] != cat[:, None, :]


class Stack(nn.Module):
    """The layers (``encoder/layers_{i}``, or ``encoder/layers`` scanned)."""
    config: XLNetConfig

    def setup(self):
        cfg = self.config
        layer_cls = _remat(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 9, length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.n_layer)]

    def __call__(self, h, g, mems, pos, seg, mask_h, mask_g, target_mapping, deterministic,
                 return_mems, key_pad, chunked, hidden_states):
        """-> (h, g, per-layer memories or None, [embedding, layer outputs] or None)."""
        cfg = self.config
        if cfg.scan_layers:
            if hidden_states:
                raise ValueError("hidden_states needs unscanned layers (scan_layers=False)")
            stacked = None if mems is None else jnp.stack(list(mems))
            (h, g), new = self.layers((h, g), stacked, pos, seg, mask_h, mask_g, target_mapping,
                                      deterministic, return_mems, key_pad, chunked)
            return h, g, ([new[i] for i in range(cfg.n_layer)] if return_mems else None), None
        states, new_mems = [h], []
        for i, layer in enumerate(self.layers):
            (h, g), m = layer((h, g), None if mems is None else mems[i], pos, seg, mask_h,
                              mask_g, target_mapping, deterministic, return_mems, key_pad,
                              chunked)
            new_mems.append(m)
            states.append(h)
        return h, g, (new_mems if return_mems else None), (states if hidden_states else None)

    def decode(self, h, g, cache_LBSD, pos, mask_h, mask_g, target_mapping, start):
        """Generation: each layer writes its input at ``start`` into its cache rows
        and attends over them (see :meth:`XLNet.decode_step`)."""
        new_cache = []
        for i, layer in enumerate(self.layers):
            kv = jax.lax.dynamic_update_slice_in_dim(cache_LBSD[i], h.astype(cache_LBSD.dtype),
                                                     start, axis=1)
            new_cache.append(kv)
            (h, g), _ = layer((h, g), None, pos, None, mask_h, mask_g, target_mapping, True,
                              False, None, False, kv)
        return g, jnp.stack(new_cache)


class XLNet(nn.Module):
    """XLNet with its tied LM head (``XLNetLMHeadModel``); ``encoding_only``: the
    embedding and layers alone (what embedding reads: no ``mask_emb``, no head).

    ``__call__`` returns a dict: ``logits`` ([B, M, V] at the targets when
    ``target_mapping`` is given, else [B, I, V]; float32), ``hidden`` (last
    content stream [B, I, D]), ``mems`` (per layer [B, M', D], with
    ``return_mems``) and ``hidden_states`` (embedding output and every
    layer's content stream, unscanned only, with ``hidden_states``).
    """
    config: XLNetConfig
    encoding_only: bool = False

    def setup(self):
        cfg = self.config
        self.word_embedding = bert.layers.Embed(cfg.vocab_size, cfg.d_model,
                                                dtype=cfg.activation_dtype,
                                                embedding_init=_init(cfg))
        if not self.encoding_only:
            self.mask_emb = self.param("mask_emb", nn.with_logical_partitioning(
                _init(cfg), (None, None, "embed")), (1, 1, cfg.d_model), jnp.float32)
            self.lm_loss = LMBias(cfg.vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = Stack(cfg)

    def __call__(self, input_ids: Array, attention_mask: Optional[Array] = None,
                 perm_mask: Optional[Array] = None, target_mapping: Optional[Array] = None,
                 token_type_ids: Optional[Array] = None,
                 mems: Optional[Sequence[Array]] = None, deterministic: bool = True,
                 return_mems: bool = False, hidden_states: bool = False,
                 with_logits: bool = True,
                 inputs_embeds: Optional[Array] = None) -> Dict[str, Any]:
        """The forward pass (HF ``XLNetLMHeadModel.forward``, batch-major).

        Args:
          input_ids: [B, I] int ids.
          attention_mask: [B, I] 1 on real tokens (None: all real).
          perm_mask: [B, I, I] 1 where query i cannot attend key j.
          target_mapping: [B, M, I] one-hot rows of the M targets (query stream).
          token_type_ids: [B, I] token types (None: no segment term, as HF).
          mems: per layer [B, M', D] memory (None: none).
          deterministic: False enables dropout (needs a ``dropout`` rng).
          return_mems: also return the memory each layer passes on.
          hidden_states: also return every layer's content stream (unscanned).
          with_logits: compute the LM logits (needs the head).
          inputs_embeds: [B, I, D] used instead of the word embeddings of
            ``input_ids`` (HF ``inputs_embeds``; gradients with respect to inputs).
        """
        cfg = self.config
        b, qlen = input_ids.shape
        mlen = 0 if mems is None else int(mems[0].shape[1])
        klen = mlen + qlen
        mask_h, mask_g = build_masks(attention_mask, perm_mask, mlen, qlen)
        seg = segment_matrix(token_type_ids, mlen)
        emb = self.word_embedding(input_ids) if inputs_embeds is None else \
            inputs_embeds.astype(cfg.activation_dtype)
        h = self.drop(emb, deterministic=deterministic)
        h = nn.with_logical_constraint(h, _BLD)
        g = None
        if target_mapping is not None:
            g = jnp.broadcast_to(self.mask_emb.astype(cfg.activation_dtype),
                                 (b, target_mapping.shape[1], cfg.d_model))
            g = self.drop(g, deterministic=deterministic)
        pos = positional_embedding(cfg, relative_positions(klen, klen + qlen), b)
        pos = self.drop(pos.astype(cfg.activation_dtype), deterministic=deterministic)
        chunked = bool(cfg.attention_chunk_size and qlen > cfg.attention_chunk_size
                       and mems is None and g is None and token_type_ids is None
                       and perm_mask is None)
        key_pad = None if attention_mask is None else attention_mask == 0
        h, g, new_mems, states = self.encoder(
            h, g, mems, pos, seg, mask_h, mask_g, target_mapping, deterministic, return_mems,
            key_pad, chunked, hidden_states)
        out: Dict[str, Any] = {}
        if return_mems:
            out["mems"] = new_mems
        if hidden_states:
            out["hidden_states"] = states
        out["hidden"] = h
        if with_logits:
            x = self.drop(g if g is not None else h, deterministic=deterministic)
            out["logits"] = self.logits(x)
        return out

    def logits(self, x: Array) -> Array:
        """[..., D] -> [..., V] float32 against the word table, plus ``lm_loss/bias``."""
        logits = self.word_embedding.attend(x.astype(jnp.float32), dtype=jnp.float32)
        return nn.with_logical_constraint(logits + self.lm_loss(),
                                          ("batch", "length", "vocab"))

    def encode(self, tokens: Array, mask: Optional[Array] = None,
               repr_layers: Sequence[int] = (-1,)) -> Dict[str, Dict[int, Array]]:
        """Representations of ``residues <sep> <cls>`` ids (padding on either side).

        As the ProtTrans notebooks call ``XLNetModel``: ``attention_mask`` only
        (no token types, no permutation). ``repr_layers`` 0 (word embeddings) ..
        N (last layer), like HF ``hidden_states``.
        """
        tokens = where_valid(tokens, mask, self.config.pad_id)
        valid = (tokens != self.config.pad_id) if mask is None else mask
        out = self(tokens, attention_mask=valid.astype(jnp.int32), hidden_states=True,
                   with_logits=False)
        return {"representations": {i: out["hidden_states"][i] for i in repr_layers}}

    # --------------------------------------------------------- generation ---

    def decode_step(self, tokens_BC: Array, cache_LBSD: Array, start: Array,
                    valid: Array) -> Tuple[Array, Array]:
        """One step of HF's XLNet generation against a fixed-size cache.

        ``tokens_BC`` (the last tokens and a trailing dummy) sit at absolute
        positions ``start .. start+C-1``; ``cache_LBSD`` holds every layer's
        input at every position (S slots). Each layer writes its input for
        the C positions into its slot rows, and both streams attend over the
        S slots: slots at or after ``start + C`` are empty, and nobody sees
        the dummy except its own content stream (HF ``perm_mask[:, :, -1] =
        1``). The query stream predicts the dummy's position.

        Args:
          tokens_BC: [B, C] ids, the last one the dummy.
          cache_LBSD: [N layers, B, S, D] layer inputs.
          start: int32 scalar, the absolute position of ``tokens_BC[:, 0]``.
          valid: int32 scalar, the slots holding tokens after this step (start + C).

        Returns:
          (logits [B, V] of the next token, updated cache).
        """
        cfg = self.config
        b, c = tokens_BC.shape
        s = cache_LBSD.shape[2]
        slot = jnp.arange(s)
        dummy = valid - 1
        mask_g = ((slot >= valid) | (slot == dummy))[None, None, :]  # [1, 1, S]
        own = (start + jnp.arange(c))[:, None] == slot[None, :]
        mask_h = (mask_g & ~own[None])  # [1, C, S]
        h = self.word_embedding(tokens_BC)
        g = jnp.broadcast_to(self.mask_emb.astype(cfg.activation_dtype), (b, 1, cfg.d_model))
        tm = (jnp.arange(c) == c - 1).astype(jnp.float32)[None, None, :].repeat(b, 0)
        pos = positional_embedding(cfg, relative_positions(start + c, c + s), b)
        pos = pos.astype(cfg.activation_dtype)
        g, new_cache = self.encoder.decode(h, g, cache_LBSD, pos, mask_h, mask_g, tm, start)
        return self.logits(g[:, 0]), new_cache


@functools.lru_cache(maxsize=64)  # shapes of a config never change: trace once
def abstract_params(config: XLNetConfig, encoding_only: bool = False) -> Any:
    """Boxed parameter shapes of ``XLNet(config)`` via ``jax.eval_shape`` (no memory)."""
    tokens = jnp.ones((2, 4), jnp.int32)
    tm = jnp.ones((2, 1, 4), jnp.float32)
    module = XLNet(config, encoding_only=encoding_only)
    kwargs = {} if encoding_only else {"target_mapping": tm}
    return jax.eval_shape(lambda rng: module.init(rng, tokens, with_logits=not encoding_only,
                                                  **kwargs), jax.random.PRNGKey(0))["params"]


# What embedding reads, and `export-hf --encoder_only` writes (XLNetModel has mask_emb).
ENCODING_COLLECTIONS = ("word_embedding", "mask_emb", "encoder")


def inference_config(config: XLNetConfig) -> XLNetConfig:
    """No dropout, no remat, layers unrolled."""
    return config.replace(dropout=0.0, remat_policy="none", scan_layers=False,
                          attention_chunk_size=None)


def encoding_module(config: XLNetConfig) -> XLNet:
    """The module embedding calls (``encode``): embeddings and layers only."""
    return XLNet(config, encoding_only=True)


def _encoder_view(config: XLNetConfig, params: Mapping[str, Any]) -> EncoderView:
    cfg = inference_config(config)
    tree = params.get("params", params)
    abstract = abstract_params(cfg, encoding_only=True)
    kept = {k: tree[k] for k in ENCODING_COLLECTIONS if k in tree}
    return EncoderView(config=cfg, params=unscan(kept, abstract), num_layers=cfg.n_layer,
                       max_positions=None, make_module=encoding_module,
                       chunked=lambda c, a, m: c.replace(attention_chunk_size=a),
                       pad_id=cfg.pad_id)


DUMMY_ID = 0  # HF appends id 0 as the position to predict


def _decoder(config: XLNetConfig, params: Mapping[str, Any]) -> DecoderView:
    """HF ``XLNetLMHeadModel.generate``'s scheme on a fixed-size cache: the
    prompt and a dummy first; then, per new token, the last two tokens and a
    dummy again (HF's ``offset = 2``), attending over the cached layer inputs
    of every earlier position."""
    cfg = inference_config(config)
    model = XLNet(cfg)
    tree = params.get("params", params)
    if "lm_loss" not in tree or "mask_emb" not in tree:
        raise ValueError("the checkpoint has no LM head (lm_loss, mask_emb): it was "
                         "imported from an XLNetModel")
    view_params = unscan(tree, abstract_params(cfg))

    def start(p, prompt_BP, slots):
        b, n = prompt_BP.shape
        tokens = jnp.concatenate([prompt_BP, jnp.full((b, 1), DUMMY_ID, prompt_BP.dtype)], 1)
        cache = jnp.zeros((cfg.n_layer, b, slots + 1, cfg.d_model), cfg.activation_dtype)
        logits, cache = model.apply({"params": p}, tokens, cache, jnp.int32(0),
                                    jnp.int32(n + 1), method="decode_step")
        return (cache, prompt_BP[:, -1], jnp.int32(n)), logits

    def step(p, state, token_B):
        cache, last_B, n = state  # n tokens before token_B
        b = token_B.shape[0]
        tokens = jnp.stack([last_B, token_B.astype(last_B.dtype),
                            jnp.full((b,), DUMMY_ID, last_B.dtype)], axis=1)
        logits, cache = model.apply({"params": p}, tokens, cache, n - 1, n + 2,
                                    method="decode_step")
        return (cache, token_B.astype(last_B.dtype), n + 1), logits

    return DecoderView(params=view_params, start=start, step=step, end_ids=("SEP_ID",))


FAMILY = Family(
    name="xlnet", config_class=XLNetConfig,
    build=lambda c: (XLNet(c), ("encoder_input_tokens",)),
    abstract_params=lambda c, encoder_only=False: abstract_params(c),
    default_objective=objectives_xlnet.PLMObjective,
    vocabulary=ProtXLNetVocabulary,
    layout=TokenLayout(suffix=("SEP_ID", "CLS_ID"), padding="left"),  # residues <sep> <cls>
    encoder_view=_encoder_view,
    encoder_collections=ENCODING_COLLECTIONS,
    towers=lambda c: (c,),
    stack_depths=lambda c: (c.n_layer,),
    with_stack_depths=lambda c, d: c.replace(scan_layers=False, n_layer=d[0]),
    hf_module="protlm_jax.hf.xlnet", hf_model_types=("xlnet",),
    presets=XLNET_PRESETS, decoder=_decoder,
    # o is [D, H, K] like q/k/v, contracted over its heads (HF "ibnd,hnd->ibh").
    lora_targets={**{t: LoraTarget(f"rel_attn/{t}") for t in "qkv"},
                  "o": LoraTarget("rel_attn/o", (1, 2))})
