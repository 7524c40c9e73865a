"""Embedding with the auto-encoder family (ProtBert, ProtAlbert, ProtElectra).

``[CLS] seq [SEP]`` in, residues ``[1:L+1]`` out; per-protein means over the
residues only; layers numbered as Hugging Face's ``hidden_states``; an imported
checkpoint tokenizes with its own vocabulary; long proteins run the chunked
attention exactly; learned positions bound the length with a clear message.

Shape legend: B batch, L residues, T tokens, D hidden size, Y layers.
"""

import dataclasses
import os
import re

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from conftest import read_sample_records
# Imported before any capsys test (the Trainer binds sys.stdout at import).
from protlm_jax import cli, embed, partitioning, trainer  # noqa: F401
from protlm_jax.hf import bert as hf_bert
from protlm_jax.hf import tokenizers as hf_tokenizers
from protlm_jax.checkpoints import Checkpointer
from protlm_jax.errors import ProtlmError
from protlm_jax.models import bert, electra
from protlm_jax.data.vocabularies import ProtBertVocabulary

TOL = 1e-5
CONFIGS = {
    "bert": bert.preset("prot_bert_tiny"),
    "albert": bert.preset("prot_albert_tiny"),
    "electra": electra.preset("prot_electra_tiny"),
}
HF_BASE = {"bert": "BertModel", "albert": "AlbertModel", "electra": "ElectraModel"}


def _module(cfg):
    return electra.Electra(cfg) if isinstance(cfg, electra.ElectraConfig) else bert.Bert(cfg)


_INITS = {}


def _params(cfg, seed=0):
    """Random params, perturbed so zero biases and unit LayerNorms are exercised."""
    if cfg not in _INITS:
        _INITS[cfg] = jax.jit(lambda rng: _init_perturbed(cfg, rng))
    return _INITS[cfg](jax.random.PRNGKey(seed))


def _init_perturbed(cfg, rng):
    boxed = _module(cfg).init(rng, jnp.ones((1, 8), jnp.int32))["params"]
    params = jax.tree.map(lambda x: x.value if hasattr(x, "value") else x, boxed,
                          is_leaf=lambda x: hasattr(x, "value"))
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.fold_in(rng, 1), len(leaves))
    return jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                     for x, k in zip(leaves, keys)])


def _one_device_mesh():
    return partitioning.create_mesh(1, devices=jax.devices()[:1])


def _model_dir(path, cfg, params, step=7):
    """A MODEL_DIR checkpoint as training writes it (params, step, model_config)."""
    ckpt = Checkpointer(str(path), async_save=False)
    ckpt.save(step, {"step": jnp.asarray(step, jnp.int32), "params": params},
              {"model_config": dataclasses.asdict(cfg), "step": step})
    ckpt.close()
    return str(path)


@pytest.fixture(scope="module")
def records():
    """Real UniProt (id, sequence) pairs, cropped to a few lengths (speed)."""
    recs = read_sample_records(limit=40)
    return [(f"p{i}", seq[:20 + 13 * i]) for i, (_, seq) in enumerate(recs[:5])]


_ENCODERS = {}


def _direct(cfg, params, seq):
    """``encode`` on the one unpadded ``[CLS] seq [SEP]``, residues only: [L, D]."""
    if cfg not in _ENCODERS:
        _ENCODERS[cfg] = jax.jit(
            lambda p, ids: _module(cfg).apply({"params": p}, ids, method="encode"))
    vocab = ProtBertVocabulary()
    ids = jnp.asarray([[vocab.CLS_ID] + vocab.encode(embed.clean_sequence(seq))
                       + [vocab.SEP_ID]])
    return np.asarray(_ENCODERS[cfg](params, ids)[0, 1:-1])


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_layers_and_prottrans_snippet_match_transformers(family, records, tmp_path):
    """A MODEL_DIR exported with `protlm export-hf` embeds like transformers:
    the ProtBert snippet (tokenizer, spaces, UZOB -> X, *Model, [1:L+1]) on the
    export equals `protlm embed` of the export and of the MODEL_DIR, for every
    hidden state."""
    cfg = CONFIGS[family]
    params = _params(cfg)
    # A training MODEL_DIR, exported with `protlm export-hf`.
    model_dir = _model_dir(tmp_path / "model", cfg, params)
    out = str(tmp_path / "hf")
    assert cli.main(["export-hf", "--model", model_dir, "--output", out]) == 0
    embedder = embed.load_model(out)
    n = embedder.num_layers
    assert embedder.family.name == family
    ours = dict(embedder.embed(records, layers=list(range(n + 1))))
    # `protlm embed`'s loader on the MODEL_DIR itself gives the same arrays.
    from_model_dir = dict(embed.load_model(model_dir).embed(records))
    for ident, _ in records:
        np.testing.assert_allclose(from_model_dir[ident], ours[ident][-1], atol=TOL, rtol=0)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out, do_lower_case=False)
    model = getattr(transformers, HF_BASE[family]).from_pretrained(out).eval()
    seqs = [s for _, s in records]
    enc = tokenizer([" ".join(re.sub(r"[UZOB]", "X", s)) for s in seqs],
                    return_tensors="pt", padding=True)
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states
    assert len(hidden) == n + 1
    for i, (ident, seq) in enumerate(records):
        got = ours[ident]
        assert got.shape == (n + 1, len(seq), embedder.config.hidden_size)
        for layer in range(n + 1):
            want = hidden[layer][i, 1:len(seq) + 1].numpy()
            np.testing.assert_allclose(got[layer], want, atol=TOL, rtol=0,
                                       err_msg=f"{family} layer {layer} {ident}")


def test_imported_vocabulary_drives_tokenization(records, tmp_path):
    """A checkpoint with another residue order (rows and vocab.txt permuted
    together) embeds exactly like the original: the file's ids are used."""
    cfg = CONFIGS["bert"]
    params = _params(cfg)
    plain = hf_bert.save_pretrained(params, cfg, str(tmp_path / "plain"))["directory"]
    tokens = hf_tokenizers.protbert_vocab_tokens()
    order = list(range(5)) + list(range(len(tokens) - 1, 4, -1))  # residues reversed
    permuted = jax.tree.map(lambda x: x, params)
    table = params["embeddings"]["word_embeddings"]["embedding"]
    rows = np.asarray(table).copy()
    rows[:len(order)] = np.asarray(table)[order]
    permuted["embeddings"]["word_embeddings"]["embedding"] = jnp.asarray(rows)
    bias = np.asarray(params["mlm_head"]["bias"]).copy()
    bias[:len(order)] = np.asarray(params["mlm_head"]["bias"])[order]
    permuted["mlm_head"]["bias"] = jnp.asarray(bias)
    other = hf_bert.save_pretrained(permuted, cfg, str(tmp_path / "permuted"))["directory"]
    with open(os.path.join(other, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens[i] for i in order) + "\n")
    want = dict(embed.load_model(plain).embed(records))
    got = dict(embed.load_model(other).embed(records))
    for ident, _ in records:
        np.testing.assert_allclose(got[ident], want[ident], atol=TOL, rtol=0)
    # Read with ProtBert's own ids instead, the permuted weights give other vectors.
    wrong = dict(embed.Embedder(cfg, permuted).embed(records[:1]))
    assert np.abs(wrong[records[0][0]] - want[records[0][0]]).max() > 1e-3


@pytest.mark.parametrize("family", ["albert"])  # shared layers; ELECTRA: the MODEL_DIR test
def test_batched_equals_alone_and_means_skip_specials(family):
    """Sequences of many lengths in padded buckets (8-way data axis), whole or
    as groups of rows run one after another, equal each one alone; per-protein
    means cover residues only."""
    cfg = CONFIGS[family]
    params = _params(cfg, seed=3)
    # Seven lengths in three buckets (32, 48, 64 tokens): few programs to compile.
    crops = (20, 25, 30, 40, 45, 55, 60)
    recs = [(f"r{i}", seq[:n]) for i, ((_, seq), n)
            in enumerate(zip(read_sample_records(limit=60)[10:17], crops))]
    assert len({embed.bucket_length(len(s) + 2) for _, s in recs}) == 3
    embedder = embed.Embedder(cfg, params)
    tower = cfg if family != "electra" else cfg.discriminator
    direct_params = params if family != "electra" else {
        "embeddings": params["embeddings"], **params["discriminator"]}
    residues = dict(embedder.embed(recs, token_budget=64))
    means = dict(embedder.embed(recs, per_protein=True, token_budget=64))
    # 256-token batches in groups of <= 32 tokens (lax.map over groups).
    grouped = embed.Embedder(cfg, params, mesh=_one_device_mesh(), group_tokens=32)
    in_groups = dict(grouped.embed(recs, token_budget=256))
    assert any(rows > max(1, 32 // bucket)
               for bucket, rows, _ in grouped._plan(
                   [(i, [0] * (len(s) + 2)) for i, s in recs], 256))
    for ident, seq in recs:
        want = _direct(tower, direct_params, seq)
        np.testing.assert_allclose(residues[ident], want, atol=TOL, rtol=0)
        np.testing.assert_allclose(in_groups[ident], want, atol=TOL, rtol=0)
        np.testing.assert_allclose(means[ident], want.mean(axis=0), atol=TOL, rtol=0)


def test_long_protein_chunked_attention_is_exact():
    """Above ``long_length`` the BERT encoder attends in key/query blocks: same values."""
    cfg = CONFIGS["bert"]
    params = _params(cfg, seed=5)
    longest = max((s for _, s in read_sample_records(limit=300)), key=len)[:600]
    recs = [("long", longest), ("short", longest[:50])]
    plain = dict(embed.Embedder(cfg, params, mesh=_one_device_mesh()).embed(recs))
    chunked_embedder = embed.Embedder(cfg, params, mesh=_one_device_mesh(),
                                      long_length=128, attention_chunk_size=64)
    chunked = dict(chunked_embedder.embed(recs))
    assert any(key[0] for key in chunked_embedder._fns)  # the chunked program ran
    for ident in ("long", "short"):
        np.testing.assert_allclose(chunked[ident], plain[ident], atol=TOL, rtol=0)


def test_learned_positions_bound_the_length():
    """Buckets never pass the position table (padding would read past it), and a
    protein longer than the table fails with one clear message."""
    cfg = CONFIGS["bert"].replace(max_position_embeddings=100)
    params = _params(cfg, seed=7)
    seq = max((s for _, s in read_sample_records(limit=300)), key=len)
    fits = seq[:97]  # 99 tokens: its plain bucket (112) would pass 100 positions
    assert embed.bucket_length(99) > 100
    embedder = embed.Embedder(cfg, params, mesh=_one_device_mesh())
    got = dict(embedder.embed([("fits", fits)]))["fits"]
    np.testing.assert_allclose(got, _direct(cfg, params, fits), atol=TOL, rtol=0)
    with pytest.raises(ProtlmError, match="exceed the model's 100 positions"):
        list(embedder.embed([("long", seq[:99])]))


def test_protlm_embed_on_an_electra_model_dir(records, tmp_path, capsys):
    """A training MODEL_DIR of ProtElectra: ``protlm embed`` reads only the
    embeddings and the discriminator and writes ProtTrans-style HDF5."""
    cfg = CONFIGS["electra"]
    params = _params(cfg, seed=9)
    model_dir = _model_dir(tmp_path / "model", cfg, params)
    fasta = tmp_path / "in.fasta"
    fasta.write_text("".join(f">{i} some/desc.1\n{s}\n" for i, s in records))
    h5_path = tmp_path / "out.h5"
    rc = cli.main(["embed", "--model", str(model_dir), "--input", str(fasta),
                   "--output", str(h5_path), "--no_progress"])
    assert rc == 0, capsys.readouterr().err
    direct_params = {"embeddings": params["embeddings"], **params["discriminator"]}
    with h5py.File(h5_path, "r") as h5:
        assert len(h5) == len(records)
        for ident, seq in records:
            key = embed.sanitize_id(f"{ident} some/desc.1")
            np.testing.assert_allclose(h5[key][()], _direct(cfg.discriminator, direct_params,
                                                            seq), atol=TOL, rtol=0)
