"""ProtT5 in Flax: equal to Hugging Face T5, published sizes, masking properties.

Shape legend: B batch, L encoder length, T decoder length, D embed, V vocab.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import read_sample_records
from transformers.models.t5.modeling_t5 import T5Attention

from protlm_jax import objectives
from protlm_jax.hf import t5 as hf_t5
from protlm_jax.models import layers
from protlm_jax.errors import ProtlmError
from protlm_jax.models import t5
from protlm_jax.data.vocabularies import ProtT5Vocabulary

XL_ENCODER_PARAMS = 1_208_141_824  # REFERENCE §1 (published encoder-only count)
XL_PARAMS = 2_818_830_336          # shared + encoder + decoder, tied head
XXL_PARAMS = 11_274_553_344


def _count(boxed):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nn.meta.unbox(boxed)))


def _arithmetic_count(cfg, encoder_only=False):
    """Parameter count of a T5 by hand, independent of both implementations."""
    d, inner = cfg.d_model, cfg.num_heads * cfg.d_kv
    attn = 4 * d * inner
    ff = (3 if cfg.feed_forward_proj.startswith("gated") else 2) * d * cfg.d_ff
    relpos = cfg.relative_attention_num_buckets * cfg.num_heads
    enc = cfg.num_encoder_layers * (attn + ff + 2 * d) + relpos + d
    n = cfg.vocab_size * d + enc
    if not encoder_only:
        n += cfg.num_decoder_layers * (2 * attn + ff + 3 * d) + relpos + d
        if not cfg.tie_word_embeddings:
            n += d * cfg.vocab_size
    return n


@pytest.fixture(scope="module")
def protein_batch():
    """[4, L] real ProtT5 ids (residues + EOS), right-padded with 0, lengths differ."""
    vocab = ProtT5Vocabulary()
    records = read_sample_records(limit=4)
    seqs = [list(vocab.encode(seq[:18 + 7 * i])) + [vocab.eos_id]
            for i, (_, seq) in enumerate(records)]
    tokens = np.zeros((len(seqs), max(map(len, seqs))), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, :len(s)] = s
    assert (tokens == 0).any() and (tokens[:, 0] > 2).all()
    return tokens


def _hf_model(cfg, head):
    """Random-init HF T5 (float32, eval) for ``cfg``; ``head`` picks the LM head."""
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(hf_t5.hf_config_from_t5config(cfg))
    if head != "tied":
        # transformers 5 unties only the LM head when a checkpoint carries its
        # own lm_head.weight; reproduce that directly.
        model.lm_head.weight = torch.nn.Parameter(
            torch.randn(cfg.vocab_size, cfg.d_model) * cfg.d_model ** -0.5)
    return model.eval()


HEADS = {  # name -> (tie_word_embeddings, scale_decoder_outputs)
    "tied": (True, True),                   # T5 v1.0 as configured
    "untied": (False, False),               # T5 v1.1 / Ankh
    "untied_scaled": (False, True),         # ProtT5 checkpoints (own lm_head)
}


@pytest.mark.parametrize("feed_forward_proj,head", [
    ("relu", "tied"), ("relu", "untied"), ("relu", "untied_scaled"),
    ("gated-gelu", "tied"), ("gated-gelu", "untied"),
])
def test_matches_hugging_face(protein_batch, feed_forward_proj, head):
    tie, scale = HEADS[head]
    cfg = t5.preset("prot_t5_tiny", feed_forward_proj=feed_forward_proj,
                    tie_word_embeddings=tie, scale_decoder_outputs=scale)
    hf = _hf_model(cfg, head)
    tokens = protein_batch
    dec_in = np.asarray(t5.decoder_input_tokens_from_targets(jnp.asarray(tokens)))
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(tokens, dtype=torch.long),
                 attention_mask=torch.tensor(tokens != 0),
                 decoder_input_ids=torch.tensor(dec_in, dtype=torch.long))
    ref_enc = ref.encoder_last_hidden_state.numpy()
    ref_logits = ref.logits.numpy()
    state = {k: v.numpy() for k, v in hf.state_dict().items()}

    for scan in (False, True):
        c = cfg.replace(scan_layers=scan)
        params = hf_t5.params_from_state_dict(state, c)
        assert (jax.tree.structure(params)
                == jax.tree.structure(nn.meta.unbox(t5.abstract_params(c))))
        enc, logits = _forward(c, jit=scan)(params, tokens, dec_in)
        assert logits.dtype == jnp.float32 and logits.shape == ref_logits.shape
        np.testing.assert_allclose(np.asarray(enc), ref_enc, rtol=0, atol=1e-5)
        np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=1e-5)

    enc_params = hf_t5.params_from_state_dict(state, cfg, encoder_only=True)
    enc_only = t5.T5EncoderOnly(cfg).apply({"params": enc_params}, jnp.asarray(tokens))
    np.testing.assert_allclose(np.asarray(enc_only), ref_enc, rtol=0, atol=1e-5)


def test_gradients_match_hugging_face(protein_batch):
    """The training gradient (every parameter, position tables included) equals
    torch autograd's through HF T5: guards the hand-written backward passes
    (``layers.broadcast_leading``) against the reference."""
    cfg = t5.preset("prot_t5_tiny")
    hf = _hf_model(cfg, "tied").train()
    tokens = protein_batch
    dec_in = np.asarray(t5.decoder_input_tokens_from_targets(jnp.asarray(tokens)))
    labels = torch.tensor(np.where(tokens == 0, -100, tokens), dtype=torch.long)
    hf(input_ids=torch.tensor(tokens, dtype=torch.long),
       attention_mask=torch.tensor(tokens != 0),
       decoder_input_ids=torch.tensor(dec_in, dtype=torch.long), labels=labels).loss.backward()
    # Tied weights are one Parameter under several keys: each key sees its grad.
    want = hf_t5.params_from_state_dict(
        {k: v.grad.numpy() for k, v in hf.state_dict(keep_vars=True).items()
         if v.grad is not None}, cfg)
    params = hf_t5.params_from_state_dict(
        {k: v.detach().numpy() for k, v in hf.state_dict().items()}, cfg)

    def mean_ce(p):
        logits = t5.T5(cfg).apply({"params": p}, tokens, dec_in)
        ce, _, _ = objectives.token_losses(logits, jnp.asarray(tokens))
        return jnp.sum(ce * (tokens != 0)) / jnp.sum(tokens != 0)

    got = jax.jit(jax.grad(mean_ce))(params)
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for path, g in jax.tree_util.tree_leaves_with_path(got):
        w = want
        for k in path:
            w = w[k.key]
        assert np.abs(w).max() > 0, path
        np.testing.assert_allclose(np.asarray(g), w, rtol=0, atol=2e-5, err_msg=str(path))


def test_sum_leading_equals_sum():
    x = jax.random.normal(jax.random.key(0), (7, 3, 5))
    for n in (1, 2, 5, 7):
        np.testing.assert_allclose(np.asarray(layers.sum_leading(x[:n])),
                                   np.asarray(x[:n].sum(0, keepdims=True)), rtol=1e-6, atol=1e-6)
    g = jax.grad(lambda b: jnp.sum(jnp.sin(layers.broadcast_leading(b, 7)) * x))(x[:1])
    want = (jnp.cos(x[:1]) * x).sum(0, keepdims=True)
    np.testing.assert_allclose(np.asarray(g), np.asarray(want), rtol=1e-6, atol=1e-6)


def test_relative_position_bucket_matches_hugging_face():
    rel = np.arange(-3000, 3001)
    for bidirectional in (True, False):
        for num_buckets, max_distance in ((32, 128), (64, 128), (8, 16), (16, 1000)):
            want = T5Attention._relative_position_bucket(
                torch.tensor(rel), bidirectional=bidirectional,
                num_buckets=num_buckets, max_distance=max_distance).numpy()
            got = layers.relative_position_bucket(
                jnp.asarray(rel), bidirectional=bidirectional,
                num_buckets=num_buckets, max_distance=max_distance)
            np.testing.assert_array_equal(np.asarray(got), want)


def test_unknown_hf_key_is_rejected():
    cfg = t5.preset("prot_t5_tiny")
    with pytest.raises(ProtlmError, match=r"does not model: encoder\.block\.0\.mystery\.weight"):
        hf_t5.params_from_state_dict({"encoder.block.0.mystery.weight": np.zeros(3)}, cfg)


def test_published_parameter_counts():
    xl = t5.preset("prot_t5_xl_uniref50")
    assert _count(t5.abstract_params(xl, encoder_only=True)) == XL_ENCODER_PARAMS
    assert _arithmetic_count(xl, encoder_only=True) == XL_ENCODER_PARAMS
    assert _count(t5.abstract_params(xl)) == _arithmetic_count(xl) == XL_PARAMS
    assert _count(t5.abstract_params(xl.replace(scan_layers=True))) == XL_PARAMS
    with torch.device("meta"):
        hf = transformers.T5ForConditionalGeneration(hf_t5.hf_config_from_t5config(xl))
    assert sum(p.numel() for p in hf.parameters()) == XL_PARAMS
    xxl = t5.preset("prot_t5_xxl")
    assert _count(t5.abstract_params(xxl)) == _arithmetic_count(xxl) == XXL_PARAMS
    assert t5.preset("prot_t5_xl_bfd") == xl


def _with_embedding_delta(model, method, args, length):
    """fn(delta [B, length, D]) -> outputs, adding delta to embeddings of that length.

    Encoder and decoder share one embedding module; inputs of different
    lengths tell the two calls apart.
    """
    def fn(params, delta):
        def interceptor(next_fun, call_args, kwargs, context):
            out = next_fun(*call_args, **kwargs)
            if (isinstance(context.module, layers.Embed) and context.method_name == "__call__"
                    and out.shape[1] == length):
                out = out + delta.astype(out.dtype)
            return out
        with nn.intercept_methods(interceptor):
            return model.apply({"params": params}, *args, method=method)
    return fn


def test_encoder_bidirectional_decoder_causal():
    # Unscanned only: the scanned stack computes the same numbers
    # (test_matches_hugging_face, test_scan_and_remat_give_the_same_gradients).
    cfg = t5.preset("prot_t5_tiny")
    model, params = t5.T5(cfg), _params(cfg)
    enc_tok = jnp.array([[5, 9, 4, 11, 7, 1, 0], [6, 3, 8, 1, 0, 0, 0]])  # [B, L=7]
    dec_tok = jnp.array([[0, 5, 9, 4, 11], [0, 6, 3, 8, 1]])              # [B, T=5]
    (b, length), t, d = enc_tok.shape, dec_tok.shape[1], cfg.d_model

    def outputs(delta_enc, delta_dec):
        """Sums over D / V of encodings [B, L] and logits [B, T]."""
        enc = _with_embedding_delta(model, "encode", (enc_tok,), length)(params, delta_enc)
        fn = _with_embedding_delta(model, None, (enc_tok, dec_tok), t)
        return enc.sum(-1), fn(params, delta_dec).sum(-1)

    # Jacobians w.r.t. the embeddings, e.g. dec[b, t, b', s, :] =
    # d sum_v logits[b, t, v] / d emb[b', s, :]; one compile for both.
    (enc_jac, _), (_, dec_jac) = jax.jit(jax.jacrev(outputs, argnums=(0, 1)))(
        jnp.zeros((b, length, d)), jnp.zeros((b, t, d)))
    for i in range(b):
        norms = np.abs(np.asarray(dec_jac[i, :, i])).sum(-1)  # [T (output), T (input)]
        assert (norms[np.triu_indices(t, 1)] == 0).all(), norms
        assert (norms[np.tril_indices(t)] > 0).all(), norms

    n_real = int((enc_tok[0] != 0).sum())
    norms = np.abs(np.asarray(enc_jac[0, :, 0])).sum(-1)  # [L (output), L (input)]
    # Every real position sees every real position, later ones included...
    assert (norms[:n_real, :n_real] > 0).all()
    # ...and never the padding.
    assert (norms[:n_real, n_real:] == 0).all()


def _params(cfg, seed=0):
    """Params of ``cfg`` from a random HF T5 (cheaper on CPU than ``init``)."""
    torch.manual_seed(seed)
    hf = transformers.T5ForConditionalGeneration(hf_t5.hf_config_from_t5config(cfg))
    state = {k: v.detach().numpy() for k, v in hf.state_dict().items()}
    return hf_t5.params_from_state_dict(state, cfg)


def _forward(cfg, jit=True):
    """fn(params, enc_tokens, dec_tokens, [enc_segs, dec_segs, enc_pos, dec_pos])
    -> (encodings [B, L, D], logits [B, T, V]) in one apply (one compile)."""
    def both(module, enc_tok, dec_tok, enc_seg=None, dec_seg=None, enc_pos=None,
             dec_pos=None):
        encoded = module.encode(enc_tok, enc_seg, enc_pos)
        return encoded, module.decode(encoded, enc_tok, dec_tok, enc_seg, dec_seg, dec_pos)

    model = t5.T5(cfg)
    fn = lambda p, *args: model.apply({"params": p}, *args, method=both)  # noqa: E731
    return jax.jit(fn) if jit else fn


def test_padding_does_not_change_real_positions():
    cfg = t5.preset("prot_t5_tiny")
    params, forward = _params(cfg), _forward(cfg)
    a = np.array([5, 9, 4, 11, 7, 1])
    b = np.array([6, 3, 8, 12, 14, 15, 4, 9, 1])
    dec_a = t5.decoder_input_tokens_from_targets(jnp.asarray(a)[None])
    dec_b = t5.decoder_input_tokens_from_targets(jnp.asarray(b)[None])
    enc_alone, logits_alone = forward(params, a[None], dec_a)

    batch = np.zeros((2, 11), np.int32)
    batch[0, :len(a)], batch[1, :len(b)] = a, b
    dec_batch = np.zeros((2, 10), np.int32)
    dec_batch[0, :len(a)], dec_batch[1, :len(b)] = dec_a[0], dec_b[0]
    enc_batch, logits_batch = forward(params, batch, dec_batch)
    np.testing.assert_allclose(enc_batch[0, :len(a)], enc_alone[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits_batch[0, :len(a)], logits_alone[0], atol=1e-5, rtol=0)


def test_packed_rows_equal_separate_rows():
    cfg = t5.preset("prot_t5_tiny")
    params, forward = _params(cfg), _forward(cfg)
    a = np.array([5, 9, 4, 11, 7, 1])
    b = np.array([6, 3, 8, 12, 1])
    pad = 3
    tokens = np.concatenate([a, b, np.zeros(pad, np.int32)])[None]
    segs = np.concatenate([np.full(len(a), 1), np.full(len(b), 2), np.zeros(pad)])[None]
    pos = np.concatenate([np.arange(len(a)), np.arange(len(b)), np.zeros(pad)])[None]
    segs, pos = segs.astype(np.int32), pos.astype(np.int32)
    # Targets are packed the same way as the inputs (span corruption aside).
    dec_packed = t5.decoder_input_tokens_from_targets(jnp.asarray(tokens), jnp.asarray(segs))

    enc_packed, logits_packed = forward(params, tokens, dec_packed, segs, segs, pos, pos)
    start = 0
    for seq in (a, b):
        dec = t5.decoder_input_tokens_from_targets(jnp.asarray(seq)[None])
        sl = slice(start, start + len(seq))
        np.testing.assert_array_equal(dec_packed[0, sl], dec[0])
        enc, logits = forward(params, seq[None], dec)
        np.testing.assert_allclose(enc_packed[0, sl], enc[0], atol=1e-5, rtol=0)
        np.testing.assert_allclose(logits_packed[0, sl], logits[0], atol=1e-5, rtol=0)
        start += len(seq)
    assert np.isfinite(np.asarray(logits_packed)).all()


@pytest.mark.parametrize("scan", [False, True])
def test_every_parameter_has_logical_axes(scan):
    cfg = t5.preset("prot_t5_tiny", scan_layers=scan, tie_word_embeddings=False,
                    feed_forward_proj="gated-gelu")
    boxed = t5.abstract_params(cfg)
    specs = nn.get_partition_spec(boxed)
    shapes = nn.meta.unbox(boxed)
    flat_specs = jax.tree_util.tree_flatten_with_path(
        specs, is_leaf=lambda s: isinstance(s, jax.sharding.PartitionSpec))[0]
    flat_shapes = jax.tree.leaves(shapes)
    assert len(flat_specs) == len(flat_shapes)
    relpos_tables = []
    for (path, spec), x in zip(flat_specs, flat_shapes):
        names = tuple(spec)
        keys = [getattr(k, "key", k) for k in path]
        if "rel_embedding" in keys:
            relpos_tables.append(keys)
        assert len(names) == len(x.shape), (keys, names, x.shape)
        assert all(n in layers.LOGICAL_AXES for n in names), (keys, names)
        in_stack = "layers" in keys
        assert (names[0] == "layers") == (scan and in_stack), (keys, names)
        if names[0] == "layers":
            n = cfg.num_encoder_layers if keys[0] == "encoder" else cfg.num_decoder_layers
            assert x.shape[0] == n
    # One relative position table per stack, outside the layers, also when scanned.
    assert relpos_tables == [["decoder", "relpos_bias", "rel_embedding"],
                             ["encoder", "relpos_bias", "rel_embedding"]]
    assert specs["encoder"]["relpos_bias"]["rel_embedding"] == jax.sharding.PartitionSpec(
        "heads", "relpos_buckets")


def test_bfloat16_activations_close_to_float32():
    tokens = jnp.array([[5, 9, 4, 11, 7, 1, 0, 0], [6, 3, 8, 12, 14, 15, 4, 1]])
    dec = t5.decoder_input_tokens_from_targets(tokens)
    cfg32 = t5.preset("prot_t5_tiny")
    cfg16 = cfg32.replace(dtype="bfloat16")
    assert all(x.dtype == jnp.float32
               for x in jax.tree.leaves(nn.meta.unbox(t5.abstract_params(cfg16))))
    params = _params(cfg32)
    enc16, logits16 = _forward(cfg16)(params, tokens, dec)
    _, logits32 = _forward(cfg32)(params, tokens, dec)
    assert enc16.dtype == jnp.bfloat16
    assert logits16.dtype == jnp.float32
    scale = float(jnp.abs(logits32).max())
    np.testing.assert_allclose(logits16, logits32, atol=0.05 * scale, rtol=0)


def test_scan_and_remat_give_the_same_gradients():
    tokens = jnp.array([[5, 9, 4, 11, 7, 1], [6, 3, 8, 12, 1, 0]])
    dec = t5.decoder_input_tokens_from_targets(tokens)
    base = t5.preset("prot_t5_tiny", dropout_rate=0.1)
    params = _params(base)
    stacked = _params(base.replace(scan_layers=True))

    def grads(cfg, p):
        loss = lambda p: t5.T5(cfg).apply({"params": p}, tokens, dec).sum()  # noqa: E731
        return jax.jit(jax.grad(loss))(p)

    want = grads(base, params)
    got = grads(base.replace(scan_layers=True, remat_policy="dots"), stacked)
    for stack, n in (("encoder", base.num_encoder_layers),
                     ("decoder", base.num_decoder_layers)):
        for i in range(n):
            jax.tree.map(
                lambda a, b: np.testing.assert_allclose(a[i], b, atol=1e-4, rtol=1e-5),
                got[stack]["layers"], want[stack][f"layers_{i}"])
    np.testing.assert_allclose(got["token_embedder"]["embedding"],
                               want["token_embedder"]["embedding"], atol=1e-4, rtol=1e-5)

    # Dropout in training mode runs under scan + full remat (encoder only, to
    # keep the compile small) and changes with the rng.
    cfg = base.replace(scan_layers=True, remat_policy="full")
    enc_params = {k: stacked[k] for k in ("token_embedder", "encoder")}

    @jax.jit
    def encoder_grad(p, rng):
        return jax.grad(lambda p: t5.T5EncoderOnly(cfg).apply(
            {"params": p}, tokens, deterministic=False, rngs={"dropout": rng}).sum())(p)

    # "rbg" keys compile much faster than threefry on CPU.
    g1 = encoder_grad(enc_params, jax.random.key(1, impl="rbg"))
    g2 = encoder_grad(enc_params, jax.random.key(2, impl="rbg"))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(g1))
    assert not np.allclose(g1["token_embedder"]["embedding"], g2["token_embedder"]["embedding"])


def test_decoder_input_tokens_from_targets():
    targets = jnp.array([[7, 8, 9, 1, 0], [4, 1, 5, 6, 1]])
    np.testing.assert_array_equal(t5.decoder_input_tokens_from_targets(targets),
                                  [[0, 7, 8, 9, 1], [0, 4, 1, 5, 6]])
    segs = jnp.array([[1, 1, 1, 1, 0], [1, 1, 2, 2, 2]])
    np.testing.assert_array_equal(t5.decoder_input_tokens_from_targets(targets, segs),
                                  [[0, 7, 8, 9, 0], [0, 4, 0, 5, 6]])
