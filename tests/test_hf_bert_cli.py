"""``protlm export-hf`` / ``import-hf`` for ProtBert, ProtAlbert and ProtElectra.

Train-free: random tiny models (``prot_bert_tiny`` scanned, ``prot_albert_tiny``,
``prot_electra_tiny`` scanned) are written as MODEL_DIR checkpoints the way
training writes them, exported with the CLI, loaded with transformers (torch
CPU, float32) and compared with our model on real proteins of the bundled
sample, then imported back and compared with the original params exactly.

Shape legend: B batch, L length (with [CLS] and [SEP]), D hidden, V vocab.
"""

import dataclasses
import json
import re
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import UNIPROT20K, read_sample_records
from safetensors.torch import load_file, save_file

from protlm_jax import cli
from protlm_jax.hf import tokenizers as hf_tokenizers
from protlm_jax.checkpoints import Checkpointer, read_params
from protlm_jax.models import bert, build_model, electra
from protlm_jax.trainer import TrainState
from protlm_jax.data.vocabularies import ProtBertVocabulary

VOCAB = ProtBertVocabulary()
TOL = 1e-5
STEP = 7


def _configs():
    e = electra.preset("prot_electra_tiny")
    return {
        "bert": bert.preset("prot_bert_tiny", scan_layers=True),
        "albert": bert.preset("prot_albert_tiny"),
        "electra": e.replace(discriminator=e.discriminator.replace(scan_layers=True),
                             generator=e.generator.replace(scan_layers=True)),
    }


# family -> (HF class of HF_DIR, HF class of HF_DIR/generator or None)
HF_CLASSES = {"bert": ("BertForMaskedLM", None), "albert": ("AlbertForMaskedLM", None),
              "electra": ("ElectraForPreTraining", "ElectraForMaskedLM")}


def _run(argv):
    return cli.main([str(a) for a in argv])


def _flat(tree):
    return {jax.tree_util.keystr(p): np.asarray(v)
            for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _assert_params_equal(got, want):
    got, want = _flat(got), _flat(want)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _random_params(cfg, seed=0):
    """Initialised params, perturbed so biases and LayerNorms are not trivial.

    The vocabulary's padding rows are zeroed: they are never used nor exported,
    and an import pads with zeros."""
    model, _ = build_model(cfg)
    params = nn.meta.unbox(model.init(jax.random.PRNGKey(seed), jnp.ones((1, 8), jnp.int32))
                           ["params"])
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    vocab = (cfg.discriminator if isinstance(cfg, electra.ElectraConfig) else cfg).vocab_size

    def unpad(path, x):
        name = jax.tree_util.keystr(path)
        if "word_embeddings" in name or name.endswith("_head']['bias']"):
            return x.at[vocab:].set(0.0)
        return x
    return jax.tree_util.tree_map_with_path(unpad, params)


def _write_model_dir(path, cfg, params):
    """A Trainer-style checkpoint: step, params and an optimizer state."""
    state = TrainState(step=jnp.asarray(STEP, jnp.int32), params=params,
                       opt_state={"mu": jax.tree.map(jnp.zeros_like, params)})
    checkpointer = Checkpointer(str(path), async_save=False)
    checkpointer.save(STEP, state, {"step": STEP, "seed": 0,
                                    "model_config": dataclasses.asdict(cfg)})
    checkpointer.close()
    return path


@pytest.fixture(scope="module")
def batch():
    """[CLS] seq [SEP] of four real proteins (rare residues -> X), 0-padded: [B, L]."""
    records = read_sample_records(limit=8)
    seqs = [re.sub(r"[UZOB]", "X", s)[:n] for (_, s), n in zip(records, (40, 25, 33, 12))]
    rows = [[VOCAB.CLS_ID] + VOCAB.encode(s) + [VOCAB.SEP_ID] for s in seqs]
    ids = np.zeros((len(rows), 42), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return ids, ids != 0


_TRAINED = {}


def _trained(family, tmp_path_factory):
    """(config, params, MODEL_DIR, exported HF_DIR) of one family (cached)."""
    if family not in _TRAINED:
        root = tmp_path_factory.mktemp(f"bert_cli_{family}")
        cfg = _configs()[family]
        params = _random_params(cfg)
        model_dir = _write_model_dir(root / "model", cfg, params)
        out = root / "hf"
        assert _run(["export-hf", "--model", model_dir, "--output", out]) == 0
        _TRAINED[family] = cfg, params, model_dir, out
    return _TRAINED[family]


@pytest.fixture(scope="module", params=list(HF_CLASSES))
def trained(request, tmp_path_factory):
    return (request.param,) + _trained(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def trained_bert(tmp_path_factory):
    return _trained("bert", tmp_path_factory)


def _ours(cfg, params, ids, tower=""):
    """(last hidden states [B, L, D], logits [B, L, V] or [B, L]) of our model."""
    model, _ = build_model(cfg)
    methods = {"": ("encode", "__call__"), "discriminator": ("encode", "discriminator_logits"),
               "generator": ("generator_hidden", "generator_logits")}[tower]
    return tuple(np.asarray(model.apply({"params": params}, jnp.asarray(ids), method=m))
                 for m in methods)


def _theirs(cls_name, directory, ids, real):
    model = getattr(transformers, cls_name).from_pretrained(str(directory)).eval()
    with torch.no_grad():
        out = model(torch.tensor(ids), attention_mask=torch.tensor(real.astype(np.int64)),
                    output_hidden_states=True)
    return out.hidden_states[-1].numpy(), out.logits.numpy()


def _assert_close(ours, theirs, real):
    diff = np.abs(ours.astype(np.float32) - theirs.astype(np.float32))[real]
    assert diff.max() <= TOL, diff.max()


def test_export_equals_transformers_and_imports_back_exactly(trained, batch, tmp_path):
    family, cfg, params, model_dir, out = trained
    ids, real = batch
    head_cls, generator_cls = HF_CLASSES[family]
    written = json.loads((out / "config.json").read_text())
    assert written["architectures"] == [head_cls] and written["model_type"] == family
    assert not list(out.glob("model-*")) and (out / "model.safetensors").is_file()
    tower = "discriminator" if family == "electra" else ""
    for ours, theirs in zip(_ours(cfg, params, ids, tower), _theirs(head_cls, out, ids, real)):
        _assert_close(ours, theirs, real)
    if generator_cls:
        gen = out / "generator"
        assert json.loads((gen / "config.json").read_text())["architectures"] == [generator_cls]
        for ours, theirs in zip(_ours(cfg, params, ids, "generator"),
                                _theirs(generator_cls, gen, ids, real)):
            _assert_close(ours, theirs, real)
    card = (out / "README.md").read_text()
    assert 'do_lower_case=False' in card and 're.sub(r"[UZOB]", "X", s)' in card
    assert "[0, 1:7 + 1]" in card and f"`{head_cls}`" in card

    # ... and back: the same config and exactly the same params.
    argv = ["import-hf", "--input", out, "--output", tmp_path / "again",
            "--vocab_pad_to_multiple", 8]
    if family != "albert":
        argv.append("--scan_layers")
    if generator_cls:
        argv += ["--generator", out / "generator"]
    assert _run(argv) == 0
    config2, params2, meta, step = read_params(str(tmp_path / "again"))
    assert step == 0 and meta["params_only"] and config2 == cfg
    _assert_params_equal(params2, params)
    want_tokens = (hf_tokenizers.protbert_vocab_tokens() if family != "albert" else
                   [p.lstrip("\u2581") or "\u2581" for p, _ in hf_tokenizers.albert_pieces()])
    assert meta["vocabulary"] == want_tokens
    assert meta["architecture"] == head_cls and meta["has_head"]
    assert meta["source"]["skipped_tensors"] == []


def test_sharded_export_imports_onto_a_model_axis(trained_bert, tmp_path, monkeypatch):
    cfg, params, model_dir, _ = trained_bert
    out = tmp_path / "sharded"
    assert _run(["export-hf", "--model", model_dir, "--output", out,
                 "--max_shard_size", "100KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not (out / "model.safetensors").exists()
    # A shard closes before it passes the limit (a bigger tensor gets one of its own).
    for shard in shards:
        names = [k for k, v in index["weight_map"].items() if v == shard]
        assert len(names) == 1 or (out / shard).stat().st_size <= 100_000 + 4_096, shard

    saved = {}
    save = Checkpointer.save

    def capture(self, step, state, metadata):
        saved["state"] = state
        return save(self, step, state, metadata)
    monkeypatch.setattr(Checkpointer, "save", capture)
    assert _run(["import-hf", "--input", out, "--output", tmp_path / "model",
                 "--model_parallel_size", 2, "--vocab_pad_to_multiple", 8,
                 "--scan_layers"]) == 0
    leaves = jax.tree.leaves(saved["state"]["params"])
    assert all(dict(x.sharding.mesh.shape) == {"data": 1, "model": 2} for x in leaves)
    # [N, D, F] feed-forward kernels: F split over the 2-way model axis.
    wi = saved["state"]["params"]["encoder"]["layers"]["mlp"]["wi"]["kernel"]
    assert wi.shape == (2, 64, 128) and "model" in str(wi.sharding.spec)
    assert {s.data.shape for s in wi.addressable_shards} == {(2, 64, 64)}
    config2, params2, _, _ = read_params(str(tmp_path / "model"))
    assert config2 == cfg
    _assert_params_equal(params2, params)


@pytest.mark.parametrize("dtype,torch_dtype", [("bfloat16", torch.bfloat16),
                                               ("float16", torch.float16)])
def test_half_precision_export(trained_bert, tmp_path, dtype, torch_dtype):
    _, _, model_dir, out = trained_bert
    assert _run(["export-hf", "--model", model_dir, "--output", tmp_path / dtype,
                 "--dtype", dtype]) == 0
    half = load_file(tmp_path / dtype / "model.safetensors")
    full = load_file(out / "model.safetensors")
    assert set(half) == set(full)
    for k, v in half.items():
        assert v.dtype == torch_dtype, k
        torch.testing.assert_close(v, full[k].to(torch_dtype), rtol=0, atol=0)
    assert json.loads((tmp_path / dtype / "config.json").read_text())["torch_dtype"] == dtype


def test_encoder_only_and_headless_round_trip(trained_bert, batch, tmp_path, capsys):
    cfg, params, model_dir, _ = trained_bert
    ids, real = batch
    out = tmp_path / "base"
    assert _run(["export-hf", "--model", model_dir, "--output", out, "--encoder_only"]) == 0
    assert json.loads((out / "config.json").read_text())["architectures"] == ["BertModel"]
    tensors = load_file(out / "model.safetensors")
    assert all(k.startswith(("embeddings.", "encoder.")) for k in tensors)
    model = transformers.BertModel.from_pretrained(str(out)).eval()
    with torch.no_grad():
        theirs = model(torch.tensor(ids), attention_mask=torch.tensor(real.astype(np.int64)))
    _assert_close(_ours(cfg, params, ids)[0], theirs.last_hidden_state.numpy(), real)

    # A BertModel imports without a head; it exports again only as a BertModel.
    assert _run(["import-hf", "--input", out, "--output", tmp_path / "model",
                 "--scan_layers", "--vocab_pad_to_multiple", 8]) == 0
    capsys.readouterr()
    assert _run(["export-hf", "--model", tmp_path / "model", "--output", tmp_path / "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no mlm_head" in err and "--encoder_only" in err
    assert _run(["export-hf", "--model", tmp_path / "model", "--output", tmp_path / "again",
                 "--encoder_only"]) == 0
    again = load_file(tmp_path / "again" / "model.safetensors")
    assert set(again) == set(tensors)
    for k in tensors:
        torch.testing.assert_close(again[k], tensors[k], rtol=0, atol=0)


def test_electra_discriminator_alone(tmp_path_factory, tmp_path):
    """Without --generator only the discriminator is stored; it exports alone."""
    cfg, params, _, out = _trained("electra", tmp_path_factory)
    assert _run(["import-hf", "--input", out, "--output", tmp_path / "model", "--scan_layers",
                 "--vocab_pad_to_multiple", 8]) == 0
    keep = ("discriminator", "discriminator_head", "embeddings")
    _, stored, meta, _ = read_params(str(tmp_path / "model"))  # its param_collections
    assert meta["param_collections"] == list(keep)
    _assert_params_equal(stored, {k: params[k] for k in keep})
    assert _run(["export-hf", "--model", tmp_path / "model", "--output", tmp_path / "hf"]) == 0
    assert not (tmp_path / "hf" / "generator").exists()
    again = load_file(tmp_path / "hf" / "model.safetensors")
    first = load_file(out / "model.safetensors")
    assert set(again) == set(first)
    for k in first:
        torch.testing.assert_close(again[k], first[k], rtol=0, atol=0)


def test_protbert_snippet_equals_bert_encode(trained_bert):
    """The published ProtBert snippet on an export: BertTokenizer(do_lower_case=False),
    spaces, U Z O B -> X, BertModel, [1:L+1] = our encode of [CLS] seq [SEP]."""
    cfg, params, _, out = trained_bert
    records = read_sample_records()
    sequences = [s for _, s in records if 30 <= len(s) <= 60][:4]
    rare = [s for _, s in records if re.search(r"[UZOB]", s) and len(s) <= 300][:1]
    if not rare and UNIPROT20K.exists():  # a real protein with B and Z
        rare = [s for i, s in read_sample_records(UNIPROT20K) if i == "sp|P02135|HBB_LITCT"]
    sequences += rare
    assert len(sequences) >= 4

    tokenizer = transformers.BertTokenizer.from_pretrained(str(out), do_lower_case=False)
    model = transformers.BertModel.from_pretrained(str(out)).eval()
    sequence_examples = [" ".join(list(re.sub(r"[UZOB]", "X", s))) for s in sequences]
    ids = tokenizer(sequence_examples, add_special_tokens=True, padding="longest")
    input_ids = torch.tensor(ids["input_ids"])
    attention_mask = torch.tensor(ids["attention_mask"])
    with torch.no_grad():
        embedding_repr = model(input_ids=input_ids, attention_mask=attention_mask)

    bert_model = bert.Bert(cfg)
    for i, s in enumerate(sequences):
        theirs = embedding_repr.last_hidden_state[i, 1:len(s) + 1].numpy()
        tokens = [VOCAB.CLS_ID] + VOCAB.encode(re.sub(r"[UZOB]", "X", s)) + [VOCAB.SEP_ID]
        assert ids["input_ids"][i][:len(tokens)] == tokens
        ours = bert_model.apply({"params": params}, jnp.asarray([tokens]), method="encode")
        ours = np.asarray(ours)[0, 1:len(s) + 1]
        assert ours.shape == theirs.shape == (len(s), cfg.hidden_size)
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=TOL)


def _bad(src, dst, tensors=None, config=None):
    shutil.copytree(src, dst)
    if tensors:
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    if config:
        c = json.loads((dst / "config.json").read_text())
        c.update(config)
        (dst / "config.json").write_text(json.dumps(c))
    return dst


BAD = {
    "missing": (dict(tensors=lambda t: t.pop("bert.encoder.layer.1.output.dense.weight")), (),
                r"missing tensors: encoder\.layer\.1\.output\.dense\.weight"),
    "wrong_shape": (dict(tensors=lambda t: t.update({
        "bert.encoder.layer.0.intermediate.dense.weight": torch.zeros(7, 64)})), (),
        r"wrong shapes: bert\.encoder\.layer\.0\.intermediate\.dense\.weight \[7, 64\] "
        r"\(config: \[128, 64\]\)"),
    "inside_the_network": (dict(tensors=lambda t: t.update({
        "bert.encoder.layer.0.attention.self.rotary.weight": torch.zeros(2)})), (),
        r"tensors this bert does not model: "
        r"bert\.encoder\.layer\.0\.attention\.self\.rotary\.weight"),
    "config": (dict(config={"position_embedding_type": "relative_key"}), (),
               r"unsupported bert config: position_embedding_type 'relative_key'"),
    "vocab_split": ({}, ("--model_parallel_size", 4),
                    r"vocabulary \(30 rows\) does not split over --model_parallel_size 4; "
                    r"add --vocab_pad_to_multiple 4"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_directory_one_line_error(kind, trained_bert, tmp_path, capsys):
    edit, flags, message = BAD[kind]
    bad = _bad(trained_bert[3], tmp_path / "bad", **edit)
    capsys.readouterr()
    assert _run(["import-hf", "--input", bad, "--output", tmp_path / "out", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"protlm: error: {bad}"), err
    assert re.search(message, err), err
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_unmodelled_heads_warn_and_are_skipped(trained_bert, tmp_path, capsys):
    cfg, params, _, out = trained_bert
    bad = _bad(out, tmp_path / "with_heads", tensors=lambda t: t.update({
        "bert.pooler.dense.weight": torch.zeros(64, 64), "classifier.weight": torch.zeros(3, 64)}))
    capsys.readouterr()
    assert _run(["import-hf", "--input", bad, "--output", tmp_path / "model", "--scan_layers",
                 "--vocab_pad_to_multiple", 8]) == 0
    err = capsys.readouterr().err
    assert "protlm: warning:" in err and "classifier.weight" in err
    _, params2, meta, _ = read_params(str(tmp_path / "model"))
    assert sorted(meta["source"]["skipped_tensors"]) == ["bert.pooler.dense.weight",
                                                         "classifier.weight"]
    _assert_params_equal(params2, params)
