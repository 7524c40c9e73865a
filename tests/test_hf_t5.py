"""Hugging Face interop: export-hf / import-hf round trips, the ProtTrans
snippet, published-size key coverage, bad checkpoints, tokenizers.

Tiny random models (``prot_t5_tiny`` shapes, float32) on real proteins.
Shape legend: B batch, L encoder length, T decoder length, V vocab.
"""

import functools
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import UNIPROT20K, read_sample_records
from safetensors.torch import load_file, save_file

from protlm_jax import cli
from protlm_jax.hf import t5 as hf_t5
from protlm_jax.checkpoints import Checkpointer, read_params
from protlm_jax.hf import engine as hf_engine
from protlm_jax.models import family as model_family
from protlm_jax.models import t5
from protlm_jax.trainer import TrainState
from protlm_jax.data.vocabularies import ProtT5Vocabulary

# name -> (feed_forward_proj, how the HF model's head is set up)
#   "prott5": own lm_head.weight, config without tie_word_embeddings=False, i.e.
#             untied and scaled, as the published ProtT5 checkpoints (§1, §9);
#   "v1_1":   untied and unscaled (tie_word_embeddings=False), as T5 v1.1 / Ankh.
VARIANTS = {"relu": ("relu", "prott5"), "gated-gelu": ("gated-gelu", "v1_1")}


def _run(argv):
    return cli.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def proteins():
    """Real UniProt sequences: short ones whole, long ones cropped (speed)."""
    records = read_sample_records(limit=40)
    seqs = [seq[:24 + 9 * i] for i, (_, seq) in enumerate(records[:4])]
    assert len(set(map(len, seqs))) == 4
    return seqs


@pytest.fixture(scope="module")
def token_batch(proteins):
    """[B, L] ProtT5 ids + EOS, 0-padded; and the HF attention mask."""
    vocab = ProtT5Vocabulary()
    rows = [list(vocab.encode(s)) + [vocab.eos_id] for s in proteins]
    tokens = np.zeros((len(rows), max(map(len, rows))), np.int64)
    for i, r in enumerate(rows):
        tokens[i, :len(r)] = r
    return tokens


def _hf_model(name):
    ffp, head = VARIANTS[name]
    cfg = t5.preset("prot_t5_tiny", feed_forward_proj=ffp,
                    scale_decoder_outputs=head == "prott5")
    torch.manual_seed(1 if head == "prott5" else 2)
    hf_config = hf_t5.hf_config_from_t5config(cfg)
    model = transformers.T5ForConditionalGeneration(hf_config)
    # A distinct head; transformers 5 then keeps it untied on load. (An
    # unscaled head gets T5 v1.1's d_model**-0.5 init, keeping logits O(1).)
    std = 1.0 if head == "prott5" else cfg.d_model ** -0.5
    model.lm_head.weight = torch.nn.Parameter(torch.randn(cfg.vocab_size, cfg.d_model) * std)
    return model.eval()


_IMPORTED = {}


def _imported(name, tmp_path_factory):
    """A random HF model saved by transformers itself, imported with the CLI (cached)."""
    if name not in _IMPORTED:
        _IMPORTED[name] = _import_new(name, tmp_path_factory)
    return _IMPORTED[name]


@pytest.fixture(scope="module", params=list(VARIANTS))
def imported(request, tmp_path_factory):
    return _imported(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def prott5_imported(tmp_path_factory):
    return _imported("relu", tmp_path_factory)


def _import_new(name, tmp_path_factory):
    root = tmp_path_factory.mktemp(f"hf_{name}")
    hf = _hf_model(name)
    hf.save_pretrained(root / "hf")
    if VARIANTS[name][1] == "v1_1":
        # transformers 5 writes tie_word_embeddings true + scale false; write the
        # transformers-4 form instead (no scale key, tie false) to read that too.
        config = json.loads((root / "hf" / "config.json").read_text())
        assert config.pop("scale_decoder_outputs") is False
        config["tie_word_embeddings"] = False
        (root / "hf" / "config.json").write_text(json.dumps(config))
    assert _run(["import-hf", "--input", root / "hf", "--output", root / "model",
                 "--model_parallel_size", 2]) == 0
    return name, hf, root


def _ours(model_dir, encoder_only=False):
    config, params, meta, _ = read_params(str(model_dir), encoder_only=encoder_only)
    return config, params, meta


@functools.lru_cache(maxsize=None)
def _forward_fn(config):
    """Jitted (encoder states, teacher-forced logits) of our T5 for ``config``."""
    model = t5.T5(config)

    @jax.jit
    def forward(params, tokens, dec_in):
        enc = model.apply({"params": params}, tokens, method="encode")
        return enc, model.apply({"params": params}, tokens, dec_in)
    return forward


def _hf_forward(hf, tokens, dec_in):
    with torch.no_grad():
        out = hf(input_ids=torch.tensor(tokens), attention_mask=torch.tensor(tokens != 0),
                 decoder_input_ids=torch.tensor(dec_in))
    return out.encoder_last_hidden_state.numpy(), out.logits.numpy()


def test_round_trips_both_directions(imported, token_batch, tmp_path):
    name, hf, root = imported
    tokens = token_batch
    dec_in = np.asarray(t5.decoder_input_tokens_from_targets(jnp.asarray(tokens)))
    ref_enc, ref_logits = _hf_forward(hf, tokens, dec_in)

    # transformers -> ours
    config, params, meta = _ours(root / "model")
    assert meta["params_only"] and not meta["encoder_only"]
    assert config.tie_word_embeddings is False
    assert config.scale_decoder_outputs is (VARIANTS[name][1] == "prott5")
    assert config.feed_forward_proj == VARIANTS[name][0]
    model = t5.T5(config)
    enc, logits = _forward_fn(config)(params, tokens, dec_in)
    np.testing.assert_allclose(np.asarray(enc), ref_enc, rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(logits), ref_logits, rtol=0, atol=1e-5)

    # ours -> transformers, sharded (a small max_shard_size forces an index)
    out = tmp_path / "export"
    assert _run(["export-hf", "--model", root / "model", "--output", out,
                 "--max_shard_size", "60KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).is_file() for s in shards)
    assert not (out / "model.safetensors").exists()
    written = json.loads((out / "config.json").read_text())
    # Both conventions agree: transformers 4 reads tie (→ tying and scaling).
    assert written["tie_word_embeddings"] == written["scale_decoder_outputs"]
    hf2 = transformers.T5ForConditionalGeneration.from_pretrained(out).eval()
    enc2, logits2 = _hf_forward(hf2, tokens, dec_in)
    np.testing.assert_allclose(enc2, np.asarray(enc), rtol=0, atol=1e-5)
    np.testing.assert_allclose(logits2, np.asarray(logits), rtol=0, atol=1e-5)
    # The ProtT5 head (untied, scaled) goes out with the scale folded into
    # lm_head; d_model**-0.5 = 1/8 is a power of two, so HF → ours → HF is exact.
    np.testing.assert_allclose(logits2, ref_logits, rtol=0, atol=1e-6)

    # ... and the exported (sharded) directory imports back to the same params.
    assert _run(["import-hf", "--input", out, "--output", tmp_path / "again"]) == 0
    config3, params3, _ = _ours(tmp_path / "again")
    # The folded ProtT5 head comes back as a plain untied, unscaled one.
    assert config3 == config.replace(scale_decoder_outputs=False)
    _, logits3 = _forward_fn(config3)(params3, tokens, dec_in)
    np.testing.assert_allclose(np.asarray(logits3), ref_logits, rtol=0, atol=1e-5)

    # Greedy generation agrees token for token (HF stops when all rows ended).
    steps = 8
    ours = np.asarray(t5.greedy_decode(model, params, tokens, steps))
    with torch.no_grad():
        theirs = hf2.generate(input_ids=torch.tensor(tokens),
                              attention_mask=torch.tensor(tokens != 0),
                              max_new_tokens=steps, do_sample=False, num_beams=1).numpy()
    assert (theirs[:, 0] == config.decoder_start_token_id).all()
    theirs = theirs[:, 1:]
    np.testing.assert_array_equal(ours[:, :theirs.shape[1]], theirs)
    assert (ours[:, theirs.shape[1]:] == 0).all()


def test_published_prott5_head_imports_untied_and_scaled(tmp_path):
    """ProtT5's config.json (transformers 4: no tie key, so scale) + own lm_head."""
    hf = _hf_model("relu")
    hf.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    for key in ("tie_word_embeddings", "scale_decoder_outputs", "dense_act_fn",
                "is_gated_act", "feed_forward_proj"):
        config.pop(key, None)   # the published files have none of these
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    imported = hf_t5.load(str(tmp_path / "hf"), encoder_only=False)
    cfg, params = imported.config, imported.params
    assert (cfg.feed_forward_proj, cfg.tie_word_embeddings, cfg.scale_decoder_outputs) \
        == ("relu", False, True)
    head = np.asarray(params["decoder"]["logits_dense"]["kernel"])
    np.testing.assert_array_equal(head, hf.lm_head.weight.detach().numpy().T)


def test_prottrans_snippet_equals_protlm_embed(prott5_imported, tmp_path):
    from protlm_jax import embed

    _, _, root = prott5_imported
    out = tmp_path / "encoder"
    assert _run(["export-hf", "--model", root / "model", "--output", out,
                 "--encoder_only"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["T5EncoderModel"]
    assert not any(k.startswith("decoder.") or k == "lm_head.weight"
                   for k in load_file(out / "model.safetensors"))
    records = read_sample_records()
    # Whole real proteins of similar length (one compiled bucket on our side).
    sequences = [s for _, s in records if 30 <= len(s) <= 46][:5]
    assert len(sequences) == 5
    if UNIPROT20K.exists():  # a real protein with rare residues (B, Z) → X
        sequences += [s for i, s in read_sample_records(UNIPROT20K)
                      if i == "sp|P02135|HBB_LITCT"]
        assert re.search(r"[UZOB]", sequences[-1])

    # The ProtTrans README snippet, as users run it.
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(out), do_lower_case=False)
    model = transformers.T5EncoderModel.from_pretrained(str(out)).eval()
    sequence_examples = [" ".join(list(re.sub(r"[UZOB]", "X", s))) for s in sequences]
    ids = tokenizer(sequence_examples, add_special_tokens=True, padding="longest")
    input_ids = torch.tensor(ids["input_ids"])
    attention_mask = torch.tensor(ids["attention_mask"])
    with torch.no_grad():
        embedding_repr = model(input_ids=input_ids, attention_mask=attention_mask)
    theirs = [embedding_repr.last_hidden_state[i, :len(s)].numpy()
              for i, s in enumerate(sequences)]

    ours = dict(embed.load_model(str(root / "model")).embed(
        [(str(i), s) for i, s in enumerate(sequences)]))
    for i, s in enumerate(sequences):
        assert ours[str(i)].shape == theirs[i].shape == (len(s), 64)
        np.testing.assert_allclose(ours[str(i)], theirs[i], rtol=0, atol=1e-5)
    # The exported directory itself is a model for `protlm embed --model HF_DIR`.
    direct = dict(embed.load_model(str(out)).embed([("0", sequences[0])]))
    np.testing.assert_allclose(direct["0"], theirs[0], rtol=0, atol=1e-5)


def test_tokenizers_give_prott5_ids(tmp_path):
    from protlm_jax.hf import tokenizers as hf_tokenizer

    hf_tokenizer.write_prott5_tokenizer(str(tmp_path))
    vocab = ProtT5Vocabulary()
    sequences = [s for _, s in read_sample_records(limit=30)][:30]
    for tokenizer in (transformers.T5Tokenizer.from_pretrained(str(tmp_path),
                                                               do_lower_case=False),
                      transformers.AutoTokenizer.from_pretrained(str(tmp_path))):
        assert len(tokenizer) == 128
        # REFERENCE §2
        assert tokenizer("A E T C X A X").input_ids == [3, 9, 11, 22, 23, 3, 23, 1]
        assert tokenizer("S K T X P").input_ids == [7, 14, 11, 23, 13, 1]
        assert tokenizer.convert_tokens_to_ids(
            ["<pad>", "</s>", "<unk>", "▁A", "▁Z", "<extra_id_0>", "<extra_id_99>"]) \
            == [0, 1, 2, 3, 27, 127, 28]
        for s in sequences:
            assert tokenizer(" ".join(s)).input_ids == list(vocab.encode(s)) + [1]


def test_key_mapping_covers_published_configs():
    """Every tensor of ProtT5-XL (U50 and BFD share one config) and -XXL maps to
    a parameter of ours of the right shape and back, with an own lm_head and
    for T5EncoderModel; abstract shapes only (meta device, eval_shape)."""
    assert t5.preset("prot_t5_xl_bfd") == t5.preset("prot_t5_xl_uniref50")
    for name, scans in (("prot_t5_xl_uniref50", (False, True)), ("prot_t5_xxl", (True,))):
        cfg = t5.preset(name, tie_word_embeddings=False)   # with its own lm_head
        hf_shapes = {}
        for encoder_only, cls in ((False, transformers.T5ForConditionalGeneration),
                                  (True, transformers.T5EncoderModel)):
            with torch.device("meta"):
                hf = cls(hf_t5.hf_config_from_t5config(cfg))
            hf_shapes[encoder_only] = {k: tuple(v.shape) for k, v in hf.state_dict().items()
                                       if not k.endswith("embed_tokens.weight")}
            expected = hf_t5.expected_tensors(cfg, encoder_only)
            assert hf_shapes[encoder_only] == {n: t.hf_shape for n, t in expected.items()}
        assert "lm_head.weight" in hf_shapes[False]
        assert set(hf_shapes[True]) == {k for k in hf_shapes[False]
                                        if k.startswith(("shared.", "encoder."))}
        for scan in scans:
            c = cfg.replace(scan_layers=scan)
            stored = {k: tuple(v.shape) for k, v in
                      model_family.flat_paths(t5.abstract_params(c)).items()}
            covered = {}
            for hf_name, t in hf_t5.expected_tensors(c).items():
                assert hf_t5.TABLE.to_ours(hf_name)[0] == t.path
                leaf, layer = model_family.scanned_location(t.path, stored)
                mine = jax.eval_shape(lambda: hf_engine.to_ours(
                    t.transform, jnp.zeros(t.hf_shape), t.our_shape)).shape
                back = jax.eval_shape(lambda: hf_engine.to_hf(
                    t.transform, jnp.zeros(mine), t.hf_shape)).shape
                assert stored[leaf][1 if layer is not None else 0:] == mine, hf_name
                assert back == hf_shapes[False][hf_name], hf_name
                covered.setdefault(leaf, set()).add(layer)
            assert set(covered) == set(stored)  # every parameter has its HF tensor(s)
            if scan:
                assert all(covered[k] == set(range(24)) for k in covered if "/layers/" in k)


def test_published_config_json_reads_as_prott5():
    # ProtT5-XL-U50's config.json fields (REFERENCE §1), transformers-4 era.
    published = {"architectures": ["T5WithLMHeadModel"], "d_ff": 16384, "d_kv": 128,
                 "d_model": 1024, "decoder_start_token_id": 0, "dropout_rate": 0.1,
                 "eos_token_id": 1, "initializer_factor": 1.0, "is_encoder_decoder": True,
                 "layer_norm_epsilon": 1e-06, "model_type": "t5", "n_positions": 512,
                 "num_heads": 32, "num_layers": 24, "pad_token_id": 0,
                 "relative_attention_num_buckets": 32, "vocab_size": 128}
    cfg = hf_t5.config_from_hf(published)
    assert cfg == t5.preset("prot_t5_xl_uniref50")
    exported = hf_t5.hf_config_dict(cfg)
    assert hf_t5.config_from_hf(exported) == cfg
    loaded = transformers.T5Config.from_dict(exported)
    assert (loaded.feed_forward_proj, loaded.scale_decoder_outputs, loaded.is_gated_act,
            loaded.dense_act_fn) == ("relu", True, False, "relu")


@pytest.fixture(scope="module")
def good_hf_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("good")
    _hf_model("relu").save_pretrained(root)
    return root


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _bad_safetensors(dst, edit):
    tensors = load_file(dst / "model.safetensors")
    edit(tensors)
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 1000])


def _set_config(dst, **changes):
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))


BAD = {
    "missing": (lambda d: _bad_safetensors(d, lambda t: t.pop(
        "encoder.block.1.layer.0.SelfAttention.k.weight")),
        r"missing tensors: encoder\.block\.1\.layer\.0\.SelfAttention\.k\.weight"),
    "wrong_shape": (lambda d: _bad_safetensors(d, lambda t: t.update({
        "decoder.block.0.layer.2.DenseReluDense.wi.weight": torch.zeros(96, 64)})),
        r"wrong shapes: decoder\.block\.0\.layer\.2\.DenseReluDense\.wi\.weight "
        r"\[96, 64\] \(config: \[128, 64\]\)"),
    "truncated": (lambda d: _truncate(d / "model.safetensors"),
                  r"model\.safetensors: truncated safetensors file"),
    "activation": (lambda d: _set_config(d, feed_forward_proj="gated-relu",
                                         dense_act_fn="relu", is_gated_act=True),
                   r"unsupported T5 config: feed-forward activation gated 'relu'"),
    "per_layer_bias": (lambda d: _bad_safetensors(d, lambda t: t.update({
        "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight":
            torch.zeros(32, 4)})),
        r"tensors this T5 does not model: "
        r"encoder\.block\.1\.layer\.0\.SelfAttention\.relative_attention_bias\.weight"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_checkpoint_one_line_error(kind, good_hf_dir, tmp_path, capsys):
    make_bad, message = BAD[kind]
    bad = _copy(good_hf_dir, tmp_path / "bad")
    make_bad(bad)
    capsys.readouterr()
    assert _run(["import-hf", "--input", bad, "--output", tmp_path / "out"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"protlm: error: {bad}"), err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_unmodelled_head_warns_and_bin_import(good_hf_dir, tmp_path, capsys):
    """A .bin (weights_only) with a classification head: listed, skipped."""
    src = tmp_path / "bin"
    src.mkdir()
    shutil.copy(good_hf_dir / "config.json", src / "config.json")
    state = load_file(good_hf_dir / "model.safetensors")
    state["classification_head.dense.weight"] = torch.zeros(3, 64)
    torch.save(state, src / "pytorch_model.bin")
    capsys.readouterr()
    assert _run(["import-hf", "--input", src, "--output", tmp_path / "model"]) == 0
    err = capsys.readouterr().err
    assert "protlm: warning:" in err and "classification_head.dense.weight" in err
    config, params, meta = _ours(tmp_path / "model")
    assert meta["source"]["skipped_tensors"] == ["classification_head.dense.weight"]
    want = hf_t5.load(str(good_hf_dir), encoder_only=False).params
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 params, want)

    # protlm eval / fine-tuning restore a train state: imported params, fresh optimizer.
    like = TrainState(step=jnp.zeros([], jnp.int32),
                      params=jax.tree.map(jnp.zeros_like, params),
                      opt_state={"mu": jax.tree.map(jnp.zeros_like, params)})
    checkpointer = Checkpointer(str(tmp_path / "model"), async_save=False)
    state, meta = checkpointer.restore(0, like)
    checkpointer.close()
    assert meta["params_only"] and int(state.step) == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 state.params, want)


def test_export_from_training_checkpoint(good_hf_dir, tmp_path):
    """A Trainer-style checkpoint (step, params, opt_state; scanned layers) exports."""
    imported = hf_t5.load(str(good_hf_dir), encoder_only=False, scan_layers=True)
    cfg, params = imported.config, imported.params
    import dataclasses

    state = TrainState(step=jnp.asarray(7, jnp.int32), params=params,
                       opt_state={"mu": jax.tree.map(jnp.zeros_like, params)})
    checkpointer = Checkpointer(str(tmp_path / "run"), async_save=False)
    checkpointer.save(7, state, {"step": 7, "seed": 0,
                                 "model_config": dataclasses.asdict(cfg)})
    checkpointer.close()
    out = tmp_path / "hf"
    assert _run(["export-hf", "--model", tmp_path / "run", "--output", out,
                 "--dtype", "bfloat16"]) == 0
    assert "`T5ForConditionalGeneration`" in (out / "README.md").read_text()
    exported = load_file(out / "model.safetensors")
    original = load_file(good_hf_dir / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in exported.values())
    for k, v in exported.items():
        want = original[k] * (cfg.d_model ** -0.5 if k == "lm_head.weight" else 1.0)
        torch.testing.assert_close(v, want.to(torch.bfloat16), rtol=0, atol=0)
    assert set(exported) == set(original) - {"encoder.embed_tokens.weight",
                                             "decoder.embed_tokens.weight"}
    assert os.path.getsize(out / "spiece.model") > 0
