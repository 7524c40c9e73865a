"""ProtTXL: Transformer-XL (segment-level recurrence, relative attention) in Flax linen.

The arithmetic follows the original code (kimiyoung/transformer-xl, which
cybertronai/transformer-xl, the ProtTXL trainer, forks) with ``attn_type`` 0,
``untie_r`` false, ``pre_lnorm`` false, no adaptive softmax (``cutoffs []``,
``div_val 1``):

* ``h0 = drop(sqrt(D) · E[x])``; each layer attends over ``[SG(mem); h]``
  where ``mem`` is that layer's input for the previous tokens;
* score ``A_ij = ((q_i + u)·k_j + (q_i + v)·W_R R_{i-j}) / sqrt(d_head)``
  with ``u = r_w_bias``, ``v = r_r_bias`` shared by all layers
  ([heads, d_head]); ``R`` the sinusoids ``[sin, cos](pos · inv_freq)``,
  ``inv_freq = 1 / 10000^(2i/D)``, of the distances ``klen-1 … 0`` clipped
  at ``clamp_len`` (dropped out like the embeddings);
* masks: causal (``triu(ones(qlen, klen), 1 + mlen)``), empty memory slots,
  and with ``same_length`` every key ``mem_len`` or more positions back
  (``mem_len``: the size of the memory in use, M; ``config.mem_len`` for a
  pass without memory);
* post-LayerNorm (eps 1e-5) residuals: ``LN(h + W_o attn)`` then
  ``LN(x + W2 drop(relu(W1 x)))``;
* logits ``drop(h_N) · Eᵀ + b`` (tied output, its own bias: ``crit``).

Memory is fixed-size: ``mems`` is ``[B, N layers, M, D]`` right-aligned, with
``mem_valid`` ``[B]`` slots of it filled (the newest last). A first segment
has ``mem_valid = 0`` and sees only itself, as the original code's empty
memory; distances are relative, so the padding slots change nothing else.
Batch-major memory is what the trainer carries from step to step.

Parameters (``decoder/layers`` with a leading layer axis under ``scan_layers``)::

  word_emb/embedding                         [V, D]        (vocab, embed)
  r_w_bias, r_r_bias                         [N, K]        (heads, kv)
  decoder/layers_{i}/dec_attn/qkv            [D, 3, N, K]  (embed, -, heads, kv)
  decoder/layers_{i}/dec_attn/o              [N, K, D]     (heads, kv, embed)
  decoder/layers_{i}/dec_attn/r              [D, N, K]     (embed, heads, kv)
  decoder/layers_{i}/dec_attn/layer_norm/{scale,bias}   [D]
  decoder/layers_{i}/pos_ff/layer_1/{kernel [D, F], bias [F]}
  decoder/layers_{i}/pos_ff/layer_2/{kernel [F, D], bias [D]}
  decoder/layers_{i}/pos_ff/layer_norm/{scale,bias}     [D]
  crit/bias                                  [V]           (vocab)

Parameter count: ``V·D + 2·N·K + V + n_layer · (3·D·N·K + N·K·D + D·N·K +
2·D·F + F + D + 4·D)`` (:func:`parameter_count`).

Shape legend: B batch, I queries (qlen), M memory slots, J keys (M + I),
L layers, D d_model, N heads, K d_head, F d_inner, V vocab, S segment length.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, ClassVar, Dict, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from protlm_jax import objectives_txl
from protlm_jax.data.vocabularies import ProtTXLVocabulary
from protlm_jax.models import bert
from protlm_jax.models.family import (DecoderView, EncoderView, Family, LoraTarget,
                                     TokenLayout, from_presets, unscan, where_valid)

Array = jax.Array

_DTYPES = bert._DTYPES
_REMAT_POLICIES = bert._REMAT_POLICIES
_BLD = ("batch", "length", "embed")
_BLNK = ("batch", "length", "heads", "kv")
NEG_INF = 1e30


@dataclasses.dataclass(frozen=True)
class TXLConfig:
    """Hyper-parameters of a Transformer-XL (HF ``TransfoXLConfig`` field names).

    ``mem_len`` is the memory of training; ``eval_mem_len`` (None: the same)
    that of evaluation, embedding and generation (Transformer-XL evaluates
    with a longer one). ``segment_len``: embedding runs proteins longer than
    it as consecutive segments of that many tokens with memory (None: one
    segment however long). ``dtype`` is the activation dtype; parameters are
    float32.
    """
    family: ClassVar[str] = "txl"
    vocab_size: int = 32
    d_model: int = 1024
    n_layer: int = 30
    n_head: int = 16
    d_head: int = 64
    d_inner: int = 4096
    dropout: float = 0.1
    dropatt: float = 0.0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    mem_len: int = 512
    eval_mem_len: Optional[int] = None
    clamp_len: int = -1
    same_length: bool = False
    pad_id: int = ProtTXLVocabulary.PAD_ID
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    segment_len: Optional[int] = None

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {tuple(_DTYPES)}, got {self.dtype!r}")
        if self.remat_policy not in _REMAT_POLICIES:
            raise ValueError(f"remat_policy must be one of {_REMAT_POLICIES}, "
                             f"got {self.remat_policy!r}")
        if min(self.n_layer, self.n_head, self.d_head, self.d_model, self.d_inner) < 1:
            raise ValueError("n_layer, n_head, d_head, d_model and d_inner must be positive")
        if self.d_model % 2:
            raise ValueError(f"d_model {self.d_model} must be even (sin/cos halves)")
        if self.mem_len < 0 or (self.eval_mem_len or 0) < 0:
            raise ValueError("mem_len and eval_mem_len must be >= 0")
        if self.segment_len is not None and self.segment_len < 1:
            raise ValueError(f"segment_len must be positive, got {self.segment_len}")

    @property
    def activation_dtype(self):
        return _DTYPES[self.dtype]

    @property
    def inference_mem_len(self) -> int:
        """The memory of evaluation, embedding and generation."""
        return self.mem_len if self.eval_mem_len is None else self.eval_mem_len

    def replace(self, **overrides) -> "TXLConfig":
        return dataclasses.replace(self, **overrides)


# ProtTXL was never published (REFERENCE_AR): the sizes are an ASSUMPTION,
# ProtXLNet's 30 x 1024 x 4096 with 16 heads x 64 (409.4 M layer parameters).
# prot_txl_bfd is the same network (only its corpus differs).
TXL_PRESETS: Dict[str, TXLConfig] = {
    "prot_txl": TXLConfig(),
    "prot_txl_bfd": TXLConfig(),
    "prot_txl_tiny": TXLConfig(d_model=64, n_layer=2, n_head=4, d_head=16, d_inner=128,
                               dropout=0.0, mem_len=64, eval_mem_len=128, segment_len=64),
}


def preset(name: str, **overrides) -> TXLConfig:
    """A preset configuration, optionally with fields overridden."""
    return from_presets(TXL_PRESETS, "Transformer-XL", name, **overrides)


def parameter_count(cfg: TXLConfig) -> int:
    """The formula of the module docstring (the gin files state it too)."""
    d, n, k, f, v = cfg.d_model, cfg.n_head, cfg.d_head, cfg.d_inner, cfg.vocab_size
    layer = 3 * d * n * k + n * k * d + d * n * k + 2 * d * f + f + d + 4 * d
    return v * d + 2 * n * k + v + cfg.n_layer * layer


def _init(cfg: TXLConfig):
    return nn.initializers.normal(cfg.initializer_range)


# ------------------------------------------------------------ positions ---

def positional_embedding(cfg: TXLConfig, klen: int) -> Array:
    """[klen, D] float32 sinusoids of the distances ``klen-1 … 0`` (clipped at ``clamp_len``)."""
    pos = jnp.arange(klen - 1, -1, -1, dtype=jnp.float32)
    if cfg.clamp_len > 0:
        pos = jnp.minimum(pos, float(cfg.clamp_len))
    inv_freq = 1.0 / (10000.0 ** (jnp.arange(0, cfg.d_model, 2, dtype=jnp.float32)
                                  / cfg.d_model))
    x = pos[:, None] * inv_freq[None, :]
    return jnp.concatenate([jnp.sin(x), jnp.cos(x)], axis=-1)


def rel_shift(x_BNIJ: Array) -> Array:
    """The original code's pad-and-reshape shift: ``out[..., i, j] = x[..., i, j + I - 1 - i]``
    wherever that index exists (``j <= i + mlen``: every unmasked pair)."""
    b, n, i, j = x_BNIJ.shape
    x = jnp.pad(x_BNIJ, ((0, 0), (0, 0), (0, 0), (1, 0)))
    return x.reshape(b, n, j + 1, i)[:, :, 1:].reshape(b, n, i, j)


def attention_mask(cfg: TXLConfig, qlen: int, mlen: int, mem_valid_B: Optional[Array],
                   mem_len: int) -> Array:
    """[B|1, I, J] True where query i cannot attend key j (J = mlen + qlen keys)."""
    i = jnp.arange(qlen)[:, None]
    j = jnp.arange(mlen + qlen)[None, :]
    dist = mlen + i - j
    masked = dist < 0  # causal
    if cfg.same_length:
        masked |= dist >= max(mem_len, 1)
    masked = masked[None]
    if mem_valid_B is not None and mlen:
        empty = j[None] < (mlen - mem_valid_B.astype(jnp.int32))[:, None, None]
        masked = masked | empty
    return masked


# ------------------------------------------------------------ the layer ---

class RelAttention(nn.Module):
    """``LN(h + W_o · Attn(q(h), k([SG(mem); h]), v(…), R))`` (``dec_attn``)."""
    config: TXLConfig

    def setup(self):
        cfg = self.config
        init = nn.with_logical_partitioning
        self.qkv = self.param("qkv", init(_init(cfg), ("embed", None, "heads", "kv")),
                              (cfg.d_model, 3, cfg.n_head, cfg.d_head), jnp.float32)
        self.o = self.param("o", init(_init(cfg), ("heads", "kv", "embed")),
                            (cfg.n_head, cfg.d_head, cfg.d_model), jnp.float32)
        self.r = self.param("r", init(_init(cfg), ("embed", "heads", "kv")),
                            (cfg.d_model, cfg.n_head, cfg.d_head), jnp.float32)
        self.layer_norm = bert.LayerNorm(cfg.layer_norm_eps, cfg.activation_dtype)
        self.drop = nn.Dropout(cfg.dropout)
        self.dropatt = nn.Dropout(cfg.dropatt)

    def __call__(self, h_BID: Array, kv_BJD: Array, pos_JD: Array, mask_BIJ: Array,
                 r_w_bias: Array, r_r_bias: Array, deterministic: bool) -> Array:
        cfg, dt = self.config, self.config.activation_dtype
        w = self.qkv.astype(dt)
        q = nn.with_logical_constraint(
            jnp.einsum("bid,dnk->bink", h_BID.astype(dt), w[:, 0]), _BLNK)
        k = nn.with_logical_constraint(
            jnp.einsum("bjd,dnk->bjnk", kv_BJD.astype(dt), w[:, 1]), _BLNK)
        v = nn.with_logical_constraint(
            jnp.einsum("bjd,dnk->bjnk", kv_BJD.astype(dt), w[:, 2]), _BLNK)
        kr = jnp.einsum("jd,dnk->jnk", pos_JD.astype(dt), self.r.astype(dt))
        ac = jnp.einsum("bink,bjnk->bnij", q + r_w_bias.astype(dt), k)
        bd = rel_shift(jnp.einsum("bink,jnk->bnij", q + r_r_bias.astype(dt), kr))
        score = (ac.astype(jnp.float32) + bd.astype(jnp.float32)) * (cfg.d_head ** -0.5)
        score = score - NEG_INF * mask_BIJ[:, None].astype(jnp.float32)
        prob = self.dropatt(jax.nn.softmax(score, axis=-1), deterministic=deterministic)
        vec = jnp.einsum("bnij,bjnk->bink", prob.astype(dt), v)
        out = jnp.einsum("bink,nkd->bid", vec, self.o.astype(dt))
        out = self.drop(out, deterministic=deterministic)
        return nn.with_logical_constraint(self.layer_norm(h_BID.astype(dt) + out), _BLD)


class FeedForward(nn.Module):
    """``LN(x + drop(W2 drop(relu(W1 x))))`` (``pos_ff``)."""
    config: TXLConfig

    @nn.compact
    def __call__(self, x_BTD: Array, deterministic: bool) -> Array:
        cfg, dt = self.config, self.config.activation_dtype
        drop = nn.Dropout(cfg.dropout)
        y = bert.Dense(cfg.d_inner, ("embed", "mlp"), dtype=dt, kernel_init=_init(cfg),
                       name="layer_1")(x_BTD)
        y = drop(nn.with_logical_constraint(jax.nn.relu(y), ("batch", "length", "mlp")),
                 deterministic=deterministic)
        y = bert.Dense(cfg.d_model, ("mlp", "embed"), dtype=dt, kernel_init=_init(cfg),
                       name="layer_2")(y)
        y = drop(y, deterministic=deterministic)
        out = bert.LayerNorm(cfg.layer_norm_eps, dt, name="layer_norm")(y + x_BTD.astype(dt))
        return nn.with_logical_constraint(out, _BLD)


class Layer(nn.Module):
    """One decoder layer; ``(h, memory of this layer) -> (h, the memory it passes on)``."""
    config: TXLConfig

    @nn.compact
    def __call__(self, h_BID, mem_BMD, pos_JD, mask_BIJ, r_w_bias, r_r_bias,
                 deterministic: bool, new_mem_len: int):
        kv = h_BID if mem_BMD is None else jnp.concatenate(
            [jax.lax.stop_gradient(mem_BMD).astype(h_BID.dtype), h_BID], axis=1)
        new_mem = None
        if new_mem_len:
            cat = kv if kv.shape[1] >= new_mem_len else jnp.pad(
                kv, ((0, 0), (new_mem_len - kv.shape[1], 0), (0, 0)))
            new_mem = jax.lax.stop_gradient(cat[:, -new_mem_len:])
        h = RelAttention(self.config, name="dec_attn")(h_BID, kv, pos_JD, mask_BIJ, r_w_bias,
                                                       r_r_bias, deterministic)
        h = FeedForward(self.config, name="pos_ff")(h, deterministic)
        return h, new_mem


def _remat(cfg: TXLConfig):
    if cfg.remat_policy == "none":
        return Layer
    policy = None if cfg.remat_policy == "full" else jax.checkpoint_policies.checkpoint_dots
    # static_argnums counts ``self``: deterministic (7), new_mem_len (8).
    return nn.remat(Layer, policy=policy, prevent_cse=not cfg.scan_layers,
                    static_argnums=(7, 8))


class Stack(nn.Module):
    """The layers (``decoder/layers_{i}``, or ``decoder/layers`` scanned)."""
    config: TXLConfig

    def setup(self):
        cfg = self.config
        layer_cls = _remat(cfg)
        if cfg.scan_layers:
            self.layers = nn.scan(
                layer_cls, variable_axes={"params": 0},
                split_rngs={"params": True, "dropout": True},
                in_axes=(0,) + (nn.broadcast,) * 6, length=cfg.n_layer,
                metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        else:
            self.layers = [layer_cls(cfg) for _ in range(cfg.n_layer)]

    def __call__(self, h, mems_BLMD, pos, mask, r_w_bias, r_r_bias, deterministic,
                 new_mem_len, hidden_states):
        """-> (h, new memories [B, L, M', D] or None, [embedding, layer outputs] or None)."""
        cfg = self.config
        if cfg.scan_layers:
            if hidden_states:
                raise ValueError("hidden_states needs unscanned layers (scan_layers=False)")
            per_layer = None if mems_BLMD is None else mems_BLMD.swapaxes(0, 1)
            h, new = self.layers(h, per_layer, pos, mask, r_w_bias, r_r_bias,
                                 deterministic, new_mem_len)
            return h, (None if new is None else new.swapaxes(0, 1)), None
        states, new_mems = [h], []
        for i, layer in enumerate(self.layers):
            h, m = layer(h, None if mems_BLMD is None else mems_BLMD[:, i], pos, mask,
                         r_w_bias, r_r_bias, deterministic, new_mem_len)
            new_mems.append(m)
            states.append(h)
        new = jnp.stack(new_mems, axis=1) if new_mem_len else None
        return h, new, (states if hidden_states else None)


class TransfoXL(nn.Module):
    """Transformer-XL with its tied LM head (``TransfoXLLMHeadModel``).

    ``__call__`` returns a dict: ``logits`` [B, I, V] float32 (with
    ``with_logits``), ``hidden`` [B, I, D] (last layer, before the output
    dropout), ``mems`` [B, L, M', D] and ``mem_valid`` [B] (with
    ``new_mem_len``), ``hidden_states`` (embedding output and every layer's,
    unscanned only).
    """
    config: TXLConfig
    encoding_only: bool = False

    def setup(self):
        cfg = self.config
        self.word_emb = bert.layers.Embed(cfg.vocab_size, cfg.d_model,
                                          dtype=cfg.activation_dtype,
                                          embedding_init=_init(cfg))
        bias = nn.with_logical_partitioning(_init(cfg), ("heads", "kv"))
        self.r_w_bias = self.param("r_w_bias", bias, (cfg.n_head, cfg.d_head), jnp.float32)
        self.r_r_bias = self.param("r_r_bias", bias, (cfg.n_head, cfg.d_head), jnp.float32)
        if not self.encoding_only:
            self.crit = _Bias(cfg.vocab_size)
        self.drop = nn.Dropout(cfg.dropout)
        self.decoder = Stack(cfg)

    def __call__(self, input_ids: Array, mems: Optional[Array] = None,
                 mem_valid: Optional[Array] = None, deterministic: bool = True,
                 new_mem_len: int = 0, hidden_states: bool = False,
                 with_logits: bool = True,
                 inputs_embeds: Optional[Array] = None) -> Dict[str, Any]:
        """The forward pass of one segment.

        Args:
          input_ids: [B, I] ids.
          mems: [B, L, M, D] the memory (None: none, as an empty one).
          mem_valid: [B] filled slots of ``mems`` (None: all M).
          deterministic: False enables dropout (needs a ``dropout`` rng).
          new_mem_len: return the memory of the next segment, that many slots
            (0: none).
          hidden_states: also return every layer's output (unscanned).
          with_logits: compute the LM logits.
          inputs_embeds: [B, I, D] used instead of the (unscaled) word
            embeddings of ``input_ids`` (gradients with respect to inputs).
        """
        cfg, dt = self.config, self.config.activation_dtype
        b, qlen = input_ids.shape
        mlen = 0 if mems is None else int(mems.shape[2])
        mask = attention_mask(cfg, qlen, mlen, mem_valid, mlen or cfg.mem_len)
        emb = self.word_emb(input_ids) if inputs_embeds is None else inputs_embeds.astype(dt)
        emb = emb * jnp.asarray(cfg.d_model ** 0.5, dt)
        h = nn.with_logical_constraint(self.drop(emb, deterministic=deterministic), _BLD)
        pos = self.drop(positional_embedding(cfg, mlen + qlen).astype(dt),
                        deterministic=deterministic)
        h, new_mems, states = self.decoder(h, mems, pos, mask, self.r_w_bias, self.r_r_bias,
                                           deterministic, new_mem_len, hidden_states)
        out: Dict[str, Any] = {"hidden": h}
        if new_mem_len:
            valid = jnp.full((b,), qlen, jnp.int32) + (
                0 if mems is None else (jnp.full((b,), mlen, jnp.int32) if mem_valid is None
                                        else mem_valid.astype(jnp.int32)))
            out["mems"] = new_mems
            out["mem_valid"] = jnp.minimum(valid, new_mem_len)
        if hidden_states:
            out["hidden_states"] = states
        if with_logits:
            out["logits"] = self.logits(self.drop(h, deterministic=deterministic))
        return out

    def logits(self, x: Array) -> Array:
        """[..., D] -> [..., V] float32: the word table transposed plus ``crit/bias``."""
        logits = self.word_emb.attend(x.astype(jnp.float32), dtype=jnp.float32)
        return nn.with_logical_constraint(logits + self.crit(), ("batch", "length", "vocab"))

    def encode(self, tokens: Array, mask: Optional[Array] = None,
               repr_layers: Sequence[int] = (-1,)) -> Dict[str, Dict[int, Array]]:
        """Representations of ``<eos> residues`` (right padding), 0 (scaled word
        embeddings) .. N (last layer) like HF ``hidden_states``.

        Inputs longer than ``segment_len`` run as consecutive segments, each
        attending to the memory of ``inference_mem_len`` earlier tokens; so a
        residue sees at most ``segment_len + inference_mem_len - 1`` tokens back
        (all of them for a protein up to that long: then the result equals one
        segment's to float rounding). Causal attention: padding on the right
        changes nothing before it.
        """
        cfg = self.config
        tokens = where_valid(tokens, mask, cfg.pad_id)
        b, t = tokens.shape
        seg = cfg.segment_len
        if not seg or t <= seg:
            out = self(tokens, hidden_states=True, with_logits=False)
            return {"representations": {i: out["hidden_states"][i] for i in repr_layers}}
        n_seg = -(-t // seg)
        padded = jnp.pad(tokens, ((0, 0), (0, n_seg * seg - t)), constant_values=cfg.pad_id)
        segments = padded.reshape(b, n_seg, seg).swapaxes(0, 1)  # [nS, B, S]
        m = cfg.inference_mem_len
        mems0 = jnp.zeros((b, cfg.n_layer, m, cfg.d_model), cfg.activation_dtype)

        def body(module, carry, seg_BS):
            mems, valid = carry
            out = module(seg_BS, mems if m else None, valid if m else None,
                         new_mem_len=m, hidden_states=True, with_logits=False)
            reps = tuple(out["hidden_states"][i] for i in repr_layers)
            if not m:
                return carry, reps
            return (out["mems"], out["mem_valid"]), reps

        scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False},
                       in_axes=0, out_axes=0)
        _, reps = scan(self, (mems0, jnp.zeros((b,), jnp.int32)), segments)
        return {"representations": {
            layer: r.swapaxes(0, 1).reshape(b, n_seg * seg, -1)[:, :t]
            for layer, r in zip(repr_layers, reps)}}


class _Bias(nn.Module):
    """The output layer's bias (``crit.out_layers.0.bias``; the weight is tied)."""
    vocab_size: int

    @nn.compact
    def __call__(self) -> Array:
        return self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros, ("vocab",)),
                          (self.vocab_size,), jnp.float32)


@functools.lru_cache(maxsize=64)
def abstract_params(config: TXLConfig, encoding_only: bool = False) -> Any:
    """Boxed parameter shapes of ``TransfoXL(config)`` (``jax.eval_shape``)."""
    tokens = jnp.ones((2, 4), jnp.int32)
    module = TransfoXL(config, encoding_only=encoding_only)
    return jax.eval_shape(lambda rng: module.init(rng, tokens, with_logits=not encoding_only),
                          jax.random.PRNGKey(0))["params"]


ENCODING_COLLECTIONS = ("word_emb", "r_w_bias", "r_r_bias", "decoder")


def inference_config(config: TXLConfig) -> TXLConfig:
    """No dropout, no remat, layers unrolled."""
    return config.replace(dropout=0.0, dropatt=0.0, remat_policy="none", scan_layers=False)


def encoding_module(config: TXLConfig) -> TransfoXL:
    return TransfoXL(config, encoding_only=True)


def _encoder_view(config: TXLConfig, params: Mapping[str, Any]) -> EncoderView:
    cfg = inference_config(config)
    tree = params.get("params", params)
    kept = {k: tree[k] for k in ENCODING_COLLECTIONS if k in tree}
    return EncoderView(config=cfg, params=unscan(kept, abstract_params(cfg, True)),
                       num_layers=cfg.n_layer, max_positions=None,
                       make_module=encoding_module,
                       # Long proteins: segments of the attention chunk with memory.
                       chunked=lambda c, a, m: c.replace(segment_len=min(a, c.segment_len or a)),
                       pad_id=cfg.pad_id)


def _decoder(config: TXLConfig, params: Mapping[str, Any]) -> DecoderView:
    """Sampling with memory: the prompt as one segment, then one token per step
    attending to the last ``inference_mem_len`` tokens' layer inputs (constant
    memory and time per token, however long the sequence grows)."""
    cfg = inference_config(config)
    model = TransfoXL(cfg)
    tree = params.get("params", params)
    if "crit" not in tree:
        raise ValueError("the checkpoint has no LM head (crit): it was imported encoder-only")
    view_params = unscan(tree, abstract_params(cfg))
    m = max(cfg.inference_mem_len, 1)

    def start(p, prompt_BP, slots):
        del slots  # the memory is bounded; it does not grow with the output
        out = model.apply({"params": p}, prompt_BP, new_mem_len=m)
        return (out["mems"], out["mem_valid"]), out["logits"][:, -1]

    def step(p, state, token_B):
        mems, valid = state
        out = model.apply({"params": p}, token_B[:, None].astype(jnp.int32), mems, valid,
                          new_mem_len=m)
        return (out["mems"], out["mem_valid"]), out["logits"][:, -1]

    return DecoderView(params=view_params, start=start, step=step, end_ids=("eos_id",))


FAMILY = Family(
    name="txl", config_class=TXLConfig,
    build=lambda c: (TransfoXL(c), ("inputs",)),
    abstract_params=lambda c, encoder_only=False: abstract_params(c, encoder_only),
    default_objective=objectives_txl.CLMObjective,
    vocabulary=ProtTXLVocabulary,
    layout=TokenLayout(prefix=("eos_id",)),  # <eos> residues: as after the previous protein
    encoder_view=_encoder_view,
    encoder_collections=ENCODING_COLLECTIONS,
    towers=lambda c: (c,),
    stack_depths=lambda c: (c.n_layer,),
    with_stack_depths=lambda c, d: c.replace(scan_layers=False, n_layer=d[0]),
    hf_module="protlm_jax.hf.txl", hf_model_types=("transfo-xl",),
    presets=TXL_PRESETS, decoder=_decoder,
    # q, k, v are the slices of the fused [D, 3, H, K] projection.
    lora_targets={**{t: LoraTarget("dec_attn/qkv", (0,), (1, i)) for i, t in enumerate("qkv")},
                  "o": LoraTarget("dec_attn/o", (0, 1))})
