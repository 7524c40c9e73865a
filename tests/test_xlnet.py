"""ProtXLNet: equal to transformers both ways (both streams, with and without
memory), the factorisation order in the gradients, the permutation-LM data,
the published parameter count, the ProtTrans snippet on an export, greedy
generation equal to transformers', and 2x4 sharded training equal to one device.

Inputs are real UniProt proteins from the bundled sample, as ``residues <sep>
<cls>`` padded on the left (the XLNet tokenizer's layout).
"""

import collections
import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protlm_jax import embed, generate, objectives_xlnet, optimizers, trainer
from protlm_jax.data import pipeline as data_pipeline
from protlm_jax.data import preprocessors as pp
from protlm_jax.data.vocabularies import ProtXLNetVocabulary
from protlm_jax.errors import ProtlmError
from protlm_jax.hf import convert
from protlm_jax.hf import xlnet as hf_xlnet
from protlm_jax.models import build_model, family, xlnet

from conftest import two_steps  # noqa: E402

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB = ProtXLNetVocabulary()
TINY = xlnet.preset("prot_xlnet_tiny")
TOL = 1e-5


def _hf_config(cfg, **extra):
    d = hf_xlnet.hf_config_dict(cfg, "XLNetLMHeadModel")
    d.pop("architectures"), d.pop("model_type")
    return transformers.XLNetConfig(**{**d, **extra})


@pytest.fixture(scope="module")
def hf_model():
    """A tiny XLNetLMHeadModel with random weights (biases and norms too)."""
    torch.manual_seed(0)
    model = transformers.XLNetLMHeadModel(_hf_config(TINY)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0.0, 0.3 if "layer_norm" not in name else 0.1)
            if name.endswith("layer_norm.weight"):
                p.add_(1.0)
    return model


@pytest.fixture(scope="module")
def params(hf_model):
    return hf_xlnet.params_from_state_dict(
        {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}, TINY)


@pytest.fixture(scope="module")
def batch(sample_records):
    """Three real proteins as ``residues <sep> <cls>``, left-padded, with a
    permutation order, targets and token types as the PLM task makes them."""
    seqs = [s[:n] for (_, s), n in zip(sample_records[:3], (13, 9, 11))]
    length, m = 15, 4
    rng = np.random.default_rng(0)
    ids = np.full((3, length), VOCAB.PAD_ID, np.int64)
    mask = np.zeros((3, length), np.int64)
    perm = np.zeros((3, length, length), np.float32)
    mapping = np.zeros((3, m, length), np.float32)
    for b, s in enumerate(seqs):
        tokens = list(VOCAB.encode(s)) + [VOCAB.SEP_ID, VOCAB.CLS_ID]
        start = length - len(tokens)
        ids[b, start:] = tokens
        mask[b, start:] = 1
        is_masked = np.zeros(len(tokens), bool)
        chosen = rng.choice(len(s), m, replace=False)
        is_masked[chosen] = True
        functional = np.zeros(len(tokens), bool)
        functional[-2:] = True
        rev = pp.xlnet_local_perm(len(tokens), is_masked, functional, 4, rng)
        perm[b, start:, start:] = pp.plm_masks_from_ranks(rev, is_masked & ~functional)
        mapping[b, np.arange(m), start + np.sort(chosen)] = 1.0
    types = np.where(ids == VOCAB.CLS_ID, 2, 0)
    return dict(input_ids=ids, attention_mask=mask, perm_mask=perm, target_mapping=mapping,
                token_type_ids=types)


def _hf(model, batch, **kw):
    with torch.no_grad():
        return model(**{k: torch.tensor(v) for k, v in batch.items()}, **kw)


def _ours(cfg, params, batch, **kw):
    return xlnet.XLNet(cfg).apply({"params": params},
                                  **{k: jnp.asarray(v) for k, v in batch.items()}, **kw)


def _assert_close(a, b):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=TOL)


@pytest.mark.parametrize("scan", [False, True])
def test_hugging_face_to_ours_equal_both_streams(hf_model, params, batch, scan):
    cfg = TINY.replace(scan_layers=scan)
    # The engine assembles straight into the scanned layout when asked.
    tree = params if not scan else hf_xlnet.params_from_state_dict(
        {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}, cfg)
    theirs = _hf(hf_model, batch, output_hidden_states=True)
    ours = _ours(cfg, tree, batch)
    # Query stream: logits at the targets under the same perm_mask / target_mapping.
    _assert_close(ours["logits"], theirs.logits.numpy())
    assert np.abs(np.asarray(ours["logits"])).max() > 0.1  # not trivially small
    # Content stream: HF interleaves (h, g) per layer; the last h.
    _assert_close(ours["hidden"], theirs.hidden_states[-2].numpy())
    # The content stream alone (no perm_mask): every hidden state, left padding.
    base = {k: batch[k] for k in ("input_ids", "attention_mask")}
    theirs = _hf(hf_model.transformer, base, output_hidden_states=True)
    enc = xlnet.XLNet(TINY).apply({"params": params}, jnp.asarray(batch["input_ids"]),
                                  jnp.asarray(batch["attention_mask"]) > 0, (0, 1, 2),
                                  method="encode")["representations"]
    for i in range(3):
        _assert_close(enc[i], theirs.hidden_states[i].numpy())


def test_memory_two_segments_equal(hf_model, params, batch):
    """mem_len set: the second segment attends to the first's memory, both streams."""
    cfg = TINY.replace(mem_len=5)
    hf_mem = transformers.XLNetLMHeadModel(_hf_config(TINY, mem_len=5)).eval()
    hf_mem.load_state_dict(hf_model.state_dict())
    ids = batch["input_ids"]
    first, second = ids[:, :7], ids[:, 7:]
    second_batch = dict(input_ids=second, perm_mask=batch["perm_mask"][:, 7:, 7:],
                        target_mapping=np.eye(8, dtype=np.float32)[None, [2, 5]].repeat(3, 0),
                        token_type_ids=batch["token_type_ids"][:, 7:])
    with torch.no_grad():
        a = hf_mem(input_ids=torch.tensor(first), use_mems=True)
    b = _hf(hf_mem, second_batch, mems=a.mems, use_mems=True, output_hidden_states=True)
    ours_a = _ours(cfg, params, {"input_ids": first}, return_mems=True)
    assert [m.shape for m in ours_a["mems"]] == [(3, 5, 64)] * 2
    for x, y in zip(ours_a["mems"], a.mems):
        _assert_close(x, y.numpy().transpose(1, 0, 2))
    ours_b = _ours(cfg, params, second_batch, mems=ours_a["mems"], return_mems=True)
    _assert_close(ours_b["logits"], b.logits.numpy())
    _assert_close(ours_b["hidden"], b.hidden_states[-2].numpy())
    for x, y in zip(ours_b["mems"], b.mems):
        _assert_close(x, y.numpy().transpose(1, 0, 2))


def test_ours_to_hugging_face_equal(tmp_path, batch):
    """Our random init, exported: XLNetLMHeadModel and XLNetModel load it and agree."""
    model, _ = build_model(TINY)
    ours_params = model.init(jax.random.PRNGKey(3), jnp.asarray(batch["input_ids"]),
                             target_mapping=jnp.asarray(batch["target_mapping"]))["params"]
    ours_params = jax.tree.map(np.asarray, nn.meta.unbox(ours_params))
    # Non-zero biases, so that the bias rules are exercised.
    ours_params["lm_loss"]["bias"] = np.linspace(-1, 1, TINY.vocab_size).astype(np.float32)
    out = tmp_path / "hf"
    summary = hf_xlnet.export(ours_params, TINY, str(out), encoder_only=False, dtype="float32",
                              max_shard_size=0, step=1, source="test", meta={})
    assert summary["architectures"] == {".": "XLNetLMHeadModel"}
    hf = transformers.XLNetLMHeadModel.from_pretrained(str(out)).eval()
    theirs = _hf(hf, batch, output_hidden_states=True)
    ours = _ours(TINY, ours_params, batch)
    _assert_close(ours["logits"], theirs.logits.numpy())
    _assert_close(ours["hidden"], theirs.hidden_states[-2].numpy())
    # And back: the export imports to the same params.
    back = hf_xlnet.load(str(out))
    jax.tree.map(np.testing.assert_array_equal, family.flat_paths(back.params),
                 family.flat_paths(ours_params))
    assert back.has_head and back.architecture == "XLNetLMHeadModel"


def test_query_stream_sees_only_earlier_tokens_in_the_order(params, batch):
    """d logits[target m] / d input embedding[j] is exactly zero for the target
    itself and for tokens at or after it in the factorisation order, non-zero
    for earlier ones and for the visible context."""
    b = 0
    one = {k: v[b:b + 1] for k, v in batch.items()}
    model = xlnet.XLNet(TINY)
    emb = jnp.asarray(np.asarray(params["word_embedding"]["embedding"])[one["input_ids"][0]])

    probe = jnp.asarray(np.random.default_rng(1).normal(size=TINY.vocab_size), jnp.float32)

    def logits(e):  # [M]: each target's logits against a random vector
        return model.apply({"params": params}, jnp.asarray(one["input_ids"]),
                           attention_mask=jnp.asarray(one["attention_mask"]),
                           perm_mask=jnp.asarray(one["perm_mask"]),
                           target_mapping=jnp.asarray(one["target_mapping"]),
                           token_type_ids=jnp.asarray(one["token_type_ids"]),
                           inputs_embeds=e[None])["logits"][0] @ probe

    jac = np.asarray(jax.jacrev(logits)(emb))  # [M, T, D]
    depends = np.abs(jac).sum(axis=2) > 0  # [M, T]
    perm = one["perm_mask"][0]
    real = one["attention_mask"][0] > 0
    checked_earlier = 0
    for m, pos in enumerate(np.argmax(one["target_mapping"][0], axis=1)):
        visible = (perm[pos] == 0) & real  # what the target's query may see
        visible[pos] = False
        assert not depends[m, pos]  # its own token
        assert not depends[m, ~visible].any()  # later in the order, or padding
        assert depends[m, visible].all()  # every earlier / context token
        checked_earlier += int(visible.sum())
    assert checked_earlier > 0


# ---------------------------------------------------------------- data ---

LENGTHS = {"inputs": 128, "target_positions": 21}


@pytest.fixture(scope="module")
def plm_examples(prepared_sample):
    import seqio

    task = seqio.get_mixture_or_task("uniprot_sample_plm")
    ds = task.get_dataset(LENGTHS, split="train", shuffle=False, seed=5)
    return list(ds.as_numpy_iterator())


def test_plm_targets_share_order_and_mapping(plm_examples):
    residues = targets = 0
    width = LENGTHS["inputs"]
    perm_rows, tpos_rows, refs = [], [], []
    for ex in plm_examples:
        ids, perm, tpos = ex["inputs"], ex["perm_index"], ex["target_positions"] - 1
        n = len(ids) - 2
        assert ids[-2:].tolist() == [VOCAB.SEP_ID, VOCAB.CLS_ID] and n <= width - 2
        assert (np.diff(tpos) > 0).all() and tpos.min() >= 0 and tpos.max() < n
        residues += n
        targets += len(tpos)
        rev = perm.astype(np.int64) - 2
        is_target = np.zeros(len(ids), bool)
        is_target[tpos] = True
        # Targets and <sep>/<cls> have ranks; the rest is visible context.
        assert (rev[is_target] >= 0).all() and (rev[-2:] >= 0).all()
        assert (rev[:n][~is_target[:n]] == -1).all()
        # Ranks of the ordered positions are distinct: an order.
        ranked = rev[rev >= 0]
        assert len(set(ranked.tolist())) == len(ranked)
        mask = pp.plm_masks_from_ranks(rev, is_target)
        # Acyclic: "i sees j" among distinct positions never runs both ways, and a
        # target never sees itself.
        sees = (mask == 0) & ~np.eye(len(ids), dtype=bool)
        assert not (sees & sees.T)[np.ix_(rev >= 0, rev >= 0)].any()
        assert (mask[tpos, tpos] == 1).all()
        perm_rows.append(np.pad(perm, (0, width - len(perm))))
        tpos_rows.append(np.pad(tpos + 1, (0, LENGTHS["target_positions"] - len(tpos))))
        refs.append(mask)
    share = targets / residues
    assert abs(share - 21 / 128) < 0.01, share
    # What the objective builds on the device, from the padded features, equals
    # the reference on every real position, and the one-hot mapping the targets.
    perm_fn = jax.jit(objectives_xlnet.perm_mask)
    map_fn = jax.jit(lambda t: objectives_xlnet.target_mapping(t, width))
    for start in range(0, len(refs), 256):
        p = np.zeros((256, width), np.int32)
        t = np.zeros((256, LENGTHS["target_positions"]), np.int32)
        rows = slice(start, start + 256)
        chunk_p, chunk_t = perm_rows[rows], tpos_rows[rows]
        p[:len(chunk_p)], t[:len(chunk_t)] = chunk_p, chunk_t
        device, mapping = np.asarray(perm_fn(p, t)), np.asarray(map_fn(t))
        for r, ref in enumerate(refs[rows]):
            n = len(ref)
            np.testing.assert_array_equal(device[r, :n, :n], ref)
            real = t[r] > 0
            np.testing.assert_array_equal(np.argmax(mapping[r][real], axis=1), t[r][real] - 1)
            assert not mapping[r][~real].any()


def test_span_lengths_follow_the_inverse_law(sample_records):
    """Spans (before the random fill) have length g with P(g) ∝ 1/g, g = 1..5.

    Spans never touch (the context after a span is at least one token), so
    the runs of the mask are the spans. A goal above the span budget keeps
    the cap (``goal - count``) from cutting any; the one span per protein
    that would cross the end is not taken, a bias below the tolerance.
    """
    rng = np.random.default_rng(0)
    runs = collections.Counter()
    for _, seq in sample_records[:1500]:
        n = len(seq)
        _, spans = pp.xlnet_span_mask(n, n, rng)
        edges = np.flatnonzero(np.diff(np.concatenate([[0], spans.astype(int), [0]])))
        runs.update((edges[1::2] - edges[::2]).tolist())
    total = sum(runs.values())
    assert set(runs) <= set(range(1, 6)) and total > 20000
    expected = (1 / np.arange(1, 6)) / (1 / np.arange(1, 6)).sum()
    observed = np.array([runs[g] for g in range(1, 6)]) / total
    chi2 = float((((observed - expected) * total) ** 2 / (expected * total)).sum())
    np.testing.assert_allclose(observed, expected, atol=0.01)
    assert chi2 < 30, (observed, chi2)  # a wrong law (uniform, geometric) gives thousands


def test_same_seed_same_batch(prepared_sample):
    config = data_pipeline.DataConfig("uniprot_sample_plm", LENGTHS, pack=False)
    first = [next(data_pipeline.batches(config, 8, seed=7)) for _ in range(2)]
    other = next(data_pipeline.batches(config, 8, seed=8))
    for k in first[0]:
        np.testing.assert_array_equal(first[0][k], first[1][k])
    assert set(first[0]) == {"encoder_input_tokens", "encoder_perm_index",
                             "encoder_target_positions"}
    assert not np.array_equal(first[0]["encoder_perm_index"], other["encoder_perm_index"])


# ----------------------------------------------------------- published ---

def test_published_parameter_count_equals_transformers():
    ours = sum(int(np.prod(x.shape)) for x in family.flat_paths(
        xlnet.abstract_params(xlnet.preset("prot_xlnet"))).values())
    with torch.device("meta"):
        theirs = transformers.XLNetLMHeadModel(_hf_config(xlnet.preset("prot_xlnet")))
    assert ours == sum(p.numel() for p in theirs.parameters())
    # 30 layers of 13,645,824 parameters (REFERENCE_AR) plus the embedding.
    assert ours - 30 * 13_645_824 == 32 * 1024 + 1024 + 32


def test_gin_model_files_equal_the_presets():
    import gin

    from protlm_jax import gin_config  # noqa: F401  (registers the config classes)

    for name in ("prot_xlnet", "prot_xlnet_tiny"):
        gin.clear_config()
        gin.parse_config_files_and_bindings([f"gin/models/{name}.gin"], [])
        assert gin.query_parameter("%MODEL_CONFIG").scoped_configurable_fn() == \
            xlnet.preset(name)
    gin.clear_config()


# ---------------------------------------------------------- export/embed ---

@pytest.fixture(scope="module")
def exported(tmp_path_factory, params):
    out = tmp_path_factory.mktemp("xlnet") / "hf"
    hf_xlnet.export(params, TINY, str(out), encoder_only=False, dtype="float32",
                    max_shard_size=0, step=0, source="test", meta={})
    return out


def test_prottrans_snippet_equals_protlm_embed(exported, sample_records):
    card = (exported / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope = {}
    exec(code.replace("path/to/this/model", str(exported)), scope)  # the card, verbatim
    embedder = embed.load_model(str(exported))
    ours = dict(embedder.embed([("0", "PRTEINO"), ("1", "SEQWENCE")]))
    _assert_close(ours["0"], scope["emb_0"].numpy())
    _assert_close(ours["1"], scope["emb_1"].numpy())
    _assert_close(dict(embedder.embed([("0", "PRTEINO")], per_protein=True))["0"],
                  scope["protein_0"].numpy())
    # A left-padded batch of real proteins of different lengths (rare residues -> <unk>).
    seqs = [s for _, s in sample_records if 20 <= len(s) <= 60][:5] + ["MKTUZOBXAY"]
    theirs = convert.prottrans_embeddings(str(exported), seqs)
    ours = dict(embedder.embed([(str(i), s) for i, s in enumerate(seqs)]))
    assert len({len(s) for s in seqs}) > 3
    for i, s in enumerate(seqs):
        assert theirs[i].shape == (len(s), 64)
        _assert_close(ours[str(i)], theirs[i])


def test_long_proteins_chunked_equal(params, sample_records):
    """Past the long-input threshold the content stream runs in query blocks:
    equal to the plain path, no length cap."""
    seqs = [s for _, s in sample_records if 60 <= len(s) <= 90][:3]
    plain = embed.Embedder(TINY, params)
    chunked = embed.Embedder(TINY, params, long_length=16, attention_chunk_size=16)
    a = dict(plain.embed([(str(i), s) for i, s in enumerate(seqs)]))
    b = dict(chunked.embed([(str(i), s) for i, s in enumerate(seqs)]))
    for k in a:
        _assert_close(a[k], b[k])
    assert plain.max_tokens is None


def test_greedy_generate_equals_transformers(exported, params):
    """transformers' greedy generate on our export equals ours token for token."""
    hf_model = transformers.XLNetLMHeadModel.from_pretrained(str(exported)).eval()
    gen = generate.Generator(TINY, params)
    for prompt in ("M", "MKTAYIAKQR"):
        ids = gen.prompt_ids(prompt)
        ours = gen.token_ids(ids, 2, generate.SamplingConfig(max_length=40, greedy=True))
        with torch.no_grad():
            theirs = hf_model.generate(torch.tensor([ids] * 2), max_length=40, do_sample=False,
                                       eos_token_id=None, pad_token_id=VOCAB.PAD_ID)
        np.testing.assert_array_equal(ours, theirs.numpy())
        assert len(set(ours[0, len(ids):].tolist())) > 2  # not one repeated token
    # Sampling: seeded, filtered, FASTA-ready residues.
    cfg = generate.SamplingConfig(max_length=30, top_p=0.9, top_k=5, seed=3)
    a = list(gen.sample(3, "MK", cfg, batch_size=2))
    assert a == list(gen.sample(3, "MK", cfg, batch_size=2))
    assert all(s.startswith("MK") and re.fullmatch(r"[A-Z]+", s) for s in a)
    with pytest.raises(ProtlmError, match="top_p"):
        generate.SamplingConfig(top_p=0.0)
    from protlm_jax.models import bert

    with pytest.raises(ProtlmError, match="bert family does not generate.*xlnet"):
        generate.Generator(bert.preset("prot_bert_tiny"), {})


def test_filter_logits_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    kept = np.isfinite(np.asarray(generate.filter_logits(
        logits, generate.SamplingConfig(top_p=0.7))))
    assert kept.tolist() == [[True, True, False, False]]
    kept = np.isfinite(np.asarray(generate.filter_logits(
        logits, generate.SamplingConfig(top_p=1.0, top_k=3))))
    assert kept.tolist() == [[True, True, True, False]]


def test_bad_checkpoints_give_one_line_errors(tmp_path, exported):
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["transformer.layer.1.rel_attn.r"]
    tensors["transformer.layer.0.rel_attn.q"] = tensors["transformer.layer.0.rel_attn.q"][:32]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ProtlmError) as e:
        hf_xlnet.load(str(bad))
    message = str(e.value)
    assert "\n" not in message and "layer.1.rel_attn.r" in message and "wrong shapes" in message
    config = json.loads((exported / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "attn_type": "uni"}))
    with pytest.raises(ProtlmError, match="attn_type 'uni'"):
        hf_xlnet.load(str(bad))


# ------------------------------------------------------------ training ---

SGD = optimizers.OptimizerConfig(name="sgd", b1=0.9, schedule=optimizers.ScheduleConfig(
    name="constant", base=0.05))


def _trainer(tmp_path, config, devices=None, **kw):
    converter = data_pipeline.feature_converter("uniprot_sample_plm", False)
    model, init_inputs = build_model(config)
    return trainer.Trainer(
        model=model, objective=objectives_xlnet.PLMObjective(), optimizer_config=SGD,
        config=trainer.TrainConfig(model_dir=str(tmp_path), train_steps=2, batch_size=8,
                                   seed=1, **kw),
        model_feature_lengths=converter.get_model_feature_lengths(LENGTHS),
        init_inputs=init_inputs, devices=devices)


def test_sharded_2x4_steps_equal_one_device(tmp_path, prepared_sample):
    data = data_pipeline.DataConfig("uniprot_sample_plm", LENGTHS, pack=False)
    it = data_pipeline.batches(data, 8, seed=1)
    batches = [next(it) for _ in range(2)]
    config = TINY.replace(n_layer=1, dropout=0.1)
    sharded = _trainer(tmp_path / "a", config, model_parallel_size=4)
    assert dict(sharded.mesh.shape) == {"data": 2, "model": 4}
    single = _trainer(tmp_path / "b", config, devices=jax.devices()[:1])
    p_sharded, l_sharded = two_steps(sharded, batches)
    p_single, l_single = two_steps(single, batches)
    np.testing.assert_allclose(l_sharded, l_single, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 p_sharded, p_single)
    assert l_single[0] != l_single[1]
