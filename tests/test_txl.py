"""ProtTXL: causal in every gradient (also across the memory), two segments with
memory equal one segment, equal to the original equations in torch (export and
import both ways), the stream data, the carried memory in the trainer (2x4
sharded and microbatched equal one device), the gin formula's parameter counts,
segmented embedding and generation with memory.

Inputs are real UniProt proteins from the bundled sample.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protlm_jax import embed, generate, objectives_txl, optimizers, trainer
from protlm_jax.data import pipeline as data_pipeline
from protlm_jax.data.vocabularies import ProtTXLVocabulary
from protlm_jax.errors import ProtlmError
from protlm_jax.hf import txl as hf_txl
from protlm_jax.models import build_model, family, txl

from conftest import REPO, two_steps  # noqa: E402

torch = pytest.importorskip("torch")
from protlm_jax.hf.txl_torch import TransfoXLReference  # noqa: E402

VOCAB = ProtTXLVocabulary()
TINY = txl.preset("prot_txl_tiny")
TOL = 1e-5


def _random_params(cfg, seed=0):
    """Every parameter random (norms near 1, biases non-zero), so no term hides."""
    params = jax.device_get(nn.meta.unbox(txl.TransfoXL(cfg).init(
        jax.random.key(seed), jnp.ones((1, 4), jnp.int32))["params"]))
    rng = np.random.default_rng(seed)
    flat = family.flat_paths(params)
    out = {}
    for path, leaf in flat.items():
        noise = rng.normal(0.0, 0.3 if "layer_norm" not in path else 0.1, leaf.shape)
        out[path] = (noise + (1.0 if path.endswith("layer_norm/scale") else 0.0)
                     ).astype(np.float32)
    return family.unflatten(out)


def _tokens(sample_records, n, length):
    """``<eos> residues`` of real proteins, cut to ``length``."""
    rows = []
    for _, s in sample_records:
        if len(s) >= length:
            rows.append([VOCAB.EOS_ID] + list(VOCAB.encode(s))[:length - 1])
        if len(rows) == n:
            return np.asarray(rows, np.int32)
    raise AssertionError("not enough long proteins")


@pytest.fixture(scope="module")
def params():
    return _random_params(TINY)


def _apply(cfg, params, tokens, **kw):
    return txl.TransfoXL(cfg).apply({"params": params}, jnp.asarray(tokens), **kw)


# ----------------------------------------------------------- the network ---

def test_causal_within_and_across_the_memory(params, sample_records):
    """d logits[t] / d input[s] is exactly 0 for every later s, in the first
    segment, in the second (which attends to the first's memory), and the memory
    passes no gradient back into the first segment."""
    tokens = _tokens(sample_records, 1, 16)
    model = txl.TransfoXL(TINY)
    table = params["word_emb"]["embedding"]
    e1, e2 = table[tokens[:, :8]], table[tokens[:, 8:]]

    def logits(e1, e2):
        a = model.apply({"params": params}, tokens[:, :8], inputs_embeds=e1, new_mem_len=8)
        b = model.apply({"params": params}, tokens[:, 8:], a["mems"], a["mem_valid"],
                        inputs_embeds=e2)
        return a["logits"][0], b["logits"][0]

    # Whole Jacobians, one compiled function each: [t, V, 1, s, D].
    j1 = np.abs(np.asarray(jax.jit(jax.jacrev(lambda x: logits(x, e2)[0]))(e1)))
    j2a = np.abs(np.asarray(jax.jit(jax.jacrev(lambda x: logits(e1, x)[1]))(e2)))
    j2b = np.abs(np.asarray(jax.jit(jax.jacrev(lambda x: logits(x, e2)[1]))(e1)))
    for t in range(8):
        assert j1[t, :, 0, t + 1:].sum() == 0.0 and j2a[t, :, 0, t + 1:].sum() == 0.0
        assert j1[t, :, 0, :t + 1].sum(axis=(0, 2)).min() > 0  # every earlier input counts
        assert j2a[t, :, 0, :t + 1].sum(axis=(0, 2)).min() > 0
    assert j2b.sum() == 0.0  # stop_gradient on the memory


@pytest.mark.parametrize("same_length", [False, True])
def test_two_segments_with_memory_equal_one_segment(params, sample_records, same_length):
    cfg = TINY.replace(same_length=same_length, mem_len=64)
    tokens = _tokens(sample_records, 2, 40)
    whole = _apply(cfg, params, tokens, hidden_states=True)
    a = _apply(cfg, params, tokens[:, :24], new_mem_len=cfg.mem_len)  # 24 of 64 slots filled
    b = _apply(cfg, params, tokens[:, 24:], mems=a["mems"], mem_valid=a["mem_valid"],
               hidden_states=True)
    np.testing.assert_allclose(b["logits"], whole["logits"][:, 24:], atol=TOL, rtol=TOL)
    for x, y in zip(b["hidden_states"][1:], whole["hidden_states"][1:]):
        np.testing.assert_allclose(x, y[:, 24:], atol=TOL, rtol=TOL)
    # A shorter memory forgets: the second segment then differs.
    short = _apply(cfg, params, tokens[:, :24], new_mem_len=4)
    c = _apply(cfg, params, tokens[:, 24:], mems=short["mems"], mem_valid=short["mem_valid"])
    assert np.abs(np.asarray(c["logits"] - b["logits"])).max() > 1e-3


def test_scanned_remat_and_bfloat16_match_the_unrolled_network(params, sample_records):
    """``scan_layers`` (params under ``decoder/layers`` with a layer axis) and
    ``remat_policy`` change nothing but the layout; bfloat16 activations stay close."""
    tokens = _tokens(sample_records, 2, 24)
    ref = _apply(TINY, params, tokens[:, :12], new_mem_len=16)
    ref2 = _apply(TINY, params, tokens[:, 12:], mems=ref["mems"], mem_valid=ref["mem_valid"])
    scanned_cfg = TINY.replace(scan_layers=True, remat_policy="full")
    scanned_abstract = family.flat_paths(txl.abstract_params(scanned_cfg))
    flat = family.flat_paths(params)
    stacked = {}
    for path in scanned_abstract:
        head, _, tail = path.partition("/layers/")
        stacked[path] = (np.stack([flat[f"{head}/layers_{i}/{tail}"] for i in range(2)])
                         if tail else flat[path])
    scanned = family.unflatten(stacked)
    # The engine's unscan inverts the stacking exactly.
    back = family.unscan(scanned, txl.abstract_params(TINY))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back), params)

    def loss(p, cfg):
        a = txl.TransfoXL(cfg).apply({"params": p}, jnp.asarray(tokens[:, :12]), new_mem_len=16)
        b = txl.TransfoXL(cfg).apply({"params": p}, jnp.asarray(tokens[:, 12:]), a["mems"],
                                     a["mem_valid"])
        return jnp.sum(b["logits"] ** 2), b

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)
    (_, out), grads = grad_fn(scanned, scanned_cfg)
    # Logits of ~60 (random weights): the scan's op order moves the last bits.
    np.testing.assert_allclose(out["logits"], ref2["logits"], atol=5e-4, rtol=TOL)
    (_, _), plain_grads = grad_fn(params, TINY)
    g = family.flat_paths(family.unscan(grads, txl.abstract_params(TINY)))
    for path, value in family.flat_paths(plain_grads).items():
        np.testing.assert_allclose(g[path], value, atol=1e-2, rtol=1e-4)
    half = _apply(TINY.replace(dtype="bfloat16"), params, tokens[:, :12])
    assert half["hidden"].dtype == jnp.bfloat16
    assert np.abs(np.asarray(half["logits"]) - np.asarray(ref["logits"])).max() < 0.3


def test_gin_formula_gives_the_preset_parameter_counts():
    for name, cfg in txl.TXL_PRESETS.items():
        counted = sum(int(np.prod(v.shape))
                      for v in family.flat_paths(txl.abstract_params(cfg)).values())
        assert counted == txl.parameter_count(cfg), name
    formula = re.search(r"# Parameter formula: (.*)", (REPO / "gin" / "models" /
                                                         "prot_txl.gin").read_text())[1]
    assert re.fullmatch(r"[A-Za-z_0-9*+() ]+", formula)  # arithmetic only
    stated = {}
    for name, cfg in txl.TXL_PRESETS.items():
        text = (REPO / "gin" / "models" / f"{name}.gin").read_text()
        stated[name] = int(re.search(r"# Parameter count: ([\d,]+)", text)[1].replace(",", ""))
        names = dict(V=cfg.vocab_size, D=cfg.d_model, N=cfg.n_head, K=cfg.d_head,
                     F=cfg.d_inner, n_layer=cfg.n_layer)
        assert eval(formula, {"__builtins__": {}}, names) == stated[name], name
    assert stated == {n: txl.parameter_count(c) for n, c in txl.TXL_PRESETS.items()}
    assert stated["prot_txl"] == 409_255_968


# -------------------------------------------------- torch reference, HF ---

@pytest.fixture(scope="module")
def exported(tmp_path_factory, params):
    out = tmp_path_factory.mktemp("txl") / "hf"
    hf_txl.export(params, TINY, str(out), encoder_only=False, dtype="float32",
                  max_shard_size=0, step=0, source="test", meta={})
    return out


@pytest.mark.parametrize("variant", [{}, {"clamp_len": 6, "same_length": True, "mem_len": 16}])
def test_export_equals_the_original_equations_and_reimports(exported, params, sample_records,
                                                            tmp_path, variant):
    """Our export run by the torch re-implementation of the original equations
    (relative positions per pair): hidden states and logits of two segments with
    memory ≤ 1e-5; the import gives back the same params bit for bit."""
    directory = exported
    cfg = TINY.replace(**variant)
    if variant:
        directory = tmp_path / "variant"
        hf_txl.export(params, cfg, str(directory), encoder_only=False, dtype="float32",
                      max_shard_size=0, step=0, source="test", meta={})
    ref = TransfoXLReference.from_pretrained(str(directory), exact_positions=True).eval()
    fast = TransfoXLReference.from_pretrained(str(directory)).eval()
    tokens = _tokens(sample_records, 2, 30)
    seg = (tokens[:, :14], tokens[:, 14:])
    with torch.no_grad():
        r1 = ref(torch.tensor(seg[0], dtype=torch.long), mem_len=16)
        r2 = ref(torch.tensor(seg[1], dtype=torch.long), mems=r1["mems"], mem_len=16)
        f2 = fast(torch.tensor(seg[1], dtype=torch.long), mems=r1["mems"], mem_len=16)
    o1 = _apply(cfg, params, seg[0], new_mem_len=16, hidden_states=True)
    o2 = _apply(cfg, params, seg[1], mems=o1["mems"], mem_valid=o1["mem_valid"],
                hidden_states=True)
    for ours, theirs in ((o1, r1), (o2, r2)):
        np.testing.assert_allclose(ours["logits"], theirs["logits"].numpy(), atol=TOL, rtol=TOL)
        for x, y in zip(ours["hidden_states"], theirs["hidden_states"]):
            np.testing.assert_allclose(x, y.numpy(), atol=TOL, rtol=TOL)
    np.testing.assert_allclose(f2["logits"].numpy(), r2["logits"].numpy(), atol=TOL, rtol=TOL)
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "transfo-xl" and config["cutoffs"] == []
    assert config["div_val"] == 1 and config["untie_r"] is False
    back = hf_txl.load(str(directory))
    assert back.config == cfg
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params), params)


def test_bad_checkpoints_give_one_line_errors(tmp_path, exported):
    import shutil

    from safetensors.numpy import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(exported, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    del tensors["transformer.layers.1.dec_attn.r_net.weight"]
    save_file(tensors, str(bad / "model.safetensors"))
    with pytest.raises(ProtlmError) as e:
        hf_txl.load(str(bad))
    assert "\n" not in str(e.value) and "layers.1.dec_attn.r_net.weight" in str(e.value)
    config = json.loads((exported / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "cutoffs": [10], "div_val": 4}))
    with pytest.raises(ProtlmError, match=r"cutoffs \[10\].*div_val 4"):
        hf_txl.load(str(bad))


# --------------------------------------------------- embed and generate ---

def test_embedding_in_segments_with_memory(exported, params, sample_records):
    """Proteins longer than ``segment_len`` run as segments with memory: equal to
    one segment while the memory covers the protein, bounded context beyond."""
    seqs = [s for _, s in sample_records if 150 <= len(s) <= 250][:3]
    whole = embed.Embedder(TINY.replace(segment_len=None), params)
    covered = embed.Embedder(TINY.replace(segment_len=40, eval_mem_len=256), params)
    bounded = embed.Embedder(TINY.replace(segment_len=40, eval_mem_len=40), params)
    items = [(str(i), s) for i, s in enumerate(seqs)]
    a, b, c = (dict(e.embed(items)) for e in (whole, covered, bounded))
    for i, s in enumerate(seqs):
        assert a[str(i)].shape == (len(s), 64)
        np.testing.assert_allclose(b[str(i)], a[str(i)], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(c[str(i)][:79], a[str(i)][:79], atol=1e-4, rtol=1e-4)
        assert np.abs(c[str(i)][120:] - a[str(i)][120:]).max() > 1e-3
    # The exported folder embeds the same through the torch snippet of its card.
    card = (exported / "README.md").read_text()
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    scope = {}
    exec(code.replace("path/to/this/model", str(exported))
         .replace('"PRTEINOSEQWENCE"', repr(seqs[0])), scope)  # the card, verbatim
    ours = dict(embed.load_model(str(exported)).embed([("0", seqs[0])]))["0"]
    np.testing.assert_allclose(ours, scope["emb"].numpy(), atol=1e-4, rtol=1e-4)


def test_generation_with_memory_equals_full_recompute(params):
    """Greedy tokens through the bounded memory equal an argmax loop that re-reads
    the whole sequence each step (the memory covers it); sampling is seeded."""
    cfg = TINY.replace(eval_mem_len=64)
    gen = generate.Generator(cfg, params)
    ids = gen.prompt_ids("MKT")
    assert ids[0] == VOCAB.EOS_ID
    ours = gen.token_ids(ids, 2, generate.SamplingConfig(max_length=30, greedy=True))
    # One compiled shape: right padding changes nothing before it (causal).
    full = jax.jit(lambda p, t: txl.TransfoXL(cfg).apply({"params": p}, t)["logits"])
    seq = list(ids)
    while len(seq) < 30:
        padded = np.zeros((1, 30), np.int32)
        padded[0, :len(seq)] = seq
        seq.append(int(np.argmax(np.asarray(full(params, padded))[0, len(seq) - 1])))
    np.testing.assert_array_equal(ours[0], seq)
    sampling = generate.SamplingConfig(max_length=25, top_p=0.9, seed=3)
    a = list(gen.sample(3, "MK", sampling, batch_size=2))
    assert a == list(gen.sample(3, "MK", sampling, batch_size=2))
    assert all(s.startswith("MK") and re.fullmatch(r"[A-Z]*", s) for s in a)


# ------------------------------------------------------- data, training ---

STREAM = {"stream": 32}


def test_stream_columns_continue_resume_and_split_over_hosts(prepared_sample):
    config = data_pipeline.DataConfig("uniprot_sample_clm", STREAM, pack=False,
                                      num_data_shards=2)
    it = data_pipeline.batches(config, 8, seed=1)
    b = [next(it) for _ in range(3)]
    assert set(b[0]) == {"inputs", "targets", "weights"}
    np.testing.assert_array_equal(b[0]["targets"][:, :-1], b[0]["inputs"][:, 1:])
    np.testing.assert_array_equal(b[0]["targets"][:, -1], b[1]["inputs"][:, 0])  # continues
    assert b[0]["weights"].all() and b[0]["inputs"].max() < 27  # residues and <eos>
    resumed = next(data_pipeline.batches(config, 8, seed=1, start_batch=2))
    hosts = [next(data_pipeline.batches(config, 8, seed=1, process_index=i, process_count=2))
             for i in range(2)]
    for k in b[0]:
        np.testing.assert_array_equal(resumed[k], b[2][k])
        np.testing.assert_array_equal(np.concatenate([h[k] for h in hosts]), b[0][k])
    # A finite pass reads every held-out token once (Σ (residues + <eos>) - 1 per column).
    held_out = data_pipeline.DataConfig("uniprot_sample_clm", STREAM, split="validation",
                                        pack=False, shuffle=False)
    import seqio

    ds = seqio.get_mixture_or_task("uniprot_sample_clm").get_dataset(
        None, split="validation", shuffle=False, trim_output_features=False)
    tokens = sum(len(x["stream"]) for x in ds.as_numpy_iterator())
    scored = sum(int(x["weights"].sum())
                 for x in data_pipeline.batches(held_out, 8, seed=0, num_epochs=1))
    assert tokens - 8 <= scored < tokens


SGD = optimizers.OptimizerConfig(name="sgd", b1=0.9, schedule=optimizers.ScheduleConfig(
    name="constant", base=0.05))


def _trainer(tmp_path, config, devices=None, **kw):
    model, init_inputs = build_model(config)
    return trainer.Trainer(
        model=model, objective=objectives_txl.CLMObjective(), optimizer_config=SGD,
        config=trainer.TrainConfig(model_dir=str(tmp_path), train_steps=3, batch_size=8,
                                   seed=1, **kw),
        model_feature_lengths={"inputs": 32, "targets": 32, "weights": 32},
        init_inputs=init_inputs, devices=devices)


def test_carried_memory_sharded_and_microbatched_equal_one_device(tmp_path, prepared_sample):
    data = data_pipeline.DataConfig("uniprot_sample_clm", STREAM, pack=False)
    it = data_pipeline.batches(data, 8, seed=1)
    batches = [next(it) for _ in range(3)]
    # No dropout: microbatches draw their own masks (the other families' tests
    # cover dropout under sharding).
    config = TINY.replace(n_layer=1, mem_len=40)
    sharded = _trainer(tmp_path / "a", config, model_parallel_size=4)
    assert dict(sharded.mesh.shape) == {"data": 2, "model": 4}
    micro = _trainer(tmp_path / "c", config, devices=jax.devices()[:2], microbatches=2)
    single = _trainer(tmp_path / "b", config, devices=jax.devices()[:1])
    (p1, c1), l1 = two_steps(single, batches, with_carry=True)
    assert c1["mems"].shape == (8, 1, 40, 64) and c1["mem_valid"].tolist() == [40] * 8
    for run in (sharded, micro):
        (p, c), losses = two_steps(run, batches, with_carry=True)
        np.testing.assert_allclose(losses, l1, rtol=1e-5)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     (p, c), (p1, c1))
    # The carry is sharded on the batch axis like the batch.
    state = sharded.abstract_state()
    assert state.carry["mems"].sharding.spec[0] == "data"
    # Evaluation: with memory and without, on the same segments.
    held = data_pipeline.DataConfig("uniprot_sample_clm", STREAM, split="validation",
                                    pack=False, shuffle=False)
    scores = single.evaluate(single.init_state(),
                             data_pipeline.batches(held, 8, seed=0, num_epochs=1), 4)
    assert {"perplexity", "perplexity_no_memory", "memory_gain",
            "memory_gain_stderr", "bits_per_residue"} <= set(scores)
    assert scores["perplexity"] == pytest.approx(np.exp(scores["loss"]))


def test_memory_lowers_held_out_perplexity(tmp_path, prepared_sample):
    """A briefly trained tiny ProtTXL (segments of 16 tokens, so most of a
    residue's context is in the memory) scores the held-out proteins better with
    the memory carried than without it on the same segments, by more than the
    standard error of the paired difference."""
    config = TINY.replace(mem_len=64, eval_mem_len=128)
    model, init_inputs = build_model(config)
    adamw = optimizers.OptimizerConfig(
        name="adamw", grad_clip_norm=1.0, schedule=optimizers.ScheduleConfig(
            name="cosine", base=3e-3, warmup_steps=30, total_steps=400, end_fraction=0.0))
    run = trainer.Trainer(
        model=model, objective=objectives_txl.CLMObjective(), optimizer_config=adamw,
        config=trainer.TrainConfig(model_dir=str(tmp_path), train_steps=400, batch_size=16,
                                   seed=0, log_period=400, checkpoint_period=400,
                                   async_checkpoints=False),
        model_feature_lengths={"inputs": 16, "targets": 16, "weights": 16},
        init_inputs=init_inputs, log=open(tmp_path / "log.txt", "w"))
    train = data_pipeline.DataConfig("uniprot_sample_clm", {"stream": 16}, pack=False)
    held = data_pipeline.DataConfig("uniprot_sample_clm", {"stream": 16}, split="validation",
                                    pack=False, shuffle=False)
    state = run.train(lambda start: data_pipeline.batches(train, 16, seed=0, start_batch=start))
    scores = run.evaluate(state, data_pipeline.batches(held, 16, seed=0, num_epochs=1))
    assert scores["masked_tokens"] > 40_000  # every held-out token, once
    assert scores["perplexity"] < scores["perplexity_no_memory"]
    print({k: scores[k] for k in ("perplexity", "perplexity_no_memory", "memory_gain",
                                  "memory_gain_stderr")})
    assert scores["memory_gain"] > scores["memory_gain_stderr"] > 0
