"""ProtBert, ProtAlbert and ProtElectra: equal to transformers both ways, published
parameter counts, partitioned training equal to one device, clear import errors.

Inputs are real UniProt proteins from the bundled sample, as ``[CLS] seq [SEP]``
with padding, tokenized with the ProtBert ids.
"""

import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protlm_jax import objectives_ae, optimizers, partitioning, trainer
from protlm_jax.hf import bert as hf_bert
from protlm_jax.hf import tokenizers as hf_tokenizers
from protlm_jax.data import pipeline as data_pipeline
from protlm_jax.errors import ProtlmError
from protlm_jax.models import bert, build_model, electra
from protlm_jax.data.vocabularies import ProtBertVocabulary

from conftest import two_steps  # noqa: E402

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

VOCAB = ProtBertVocabulary()
TOL = 1e-5
# (preset, ELECTRA tower or "", HF class with head, HF base class)
CASES = [
    ("prot_bert_tiny", "", "BertForMaskedLM", "BertModel"),
    ("prot_albert_tiny", "", "AlbertForMaskedLM", "AlbertModel"),
    ("prot_electra_tiny", "discriminator", "ElectraForPreTraining", "ElectraModel"),
    ("prot_electra_tiny", "generator", "ElectraForMaskedLM", "ElectraModel"),
]


def _config(name, **overrides):
    if name.startswith("prot_electra"):
        cfg = electra.preset(name)
        return cfg.replace(discriminator=cfg.discriminator.replace(**overrides),
                           generator=cfg.generator.replace(**overrides))
    return bert.preset(name, **overrides)


def _tower(cfg, tower):
    return getattr(cfg, tower) if tower else cfg


def _hf_config(cfg):
    d = hf_bert.hf_config_dict(cfg, "x")
    cls = {"bert": transformers.BertConfig, "albert": transformers.AlbertConfig,
           "electra": transformers.ElectraConfig}[d.pop("model_type")]
    d.pop("architectures")
    return cls(**d)


@pytest.fixture(scope="module")
def batch(sample_records):
    """[CLS] seq [SEP] of four real proteins (rare residues -> X), padded to 42."""
    seqs = [re.sub(r"[UZOB]", "X", s)[:n] for (_, s), n in zip(sample_records[:4], (40, 25, 33, 12))]
    rows = [[VOCAB.CLS_ID] + VOCAB.encode(s) + [VOCAB.SEP_ID] for s in seqs]
    ids = np.zeros((len(rows), 42), np.int64)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = r
    return seqs, ids, (ids != 0)


def _ours(cfg, tower, params, ids):
    """(hidden states, logits) of our model for HF's ``*Model`` / head outputs.

    Eager on purpose: the primitives' compiles are shared by every case, where
    a jitted graph per config compiles more in all."""
    model, _ = build_model(cfg)
    if tower == "generator":
        methods = ("generator_hidden", "generator_logits")
    else:
        methods = ("encode", "discriminator_logits" if tower else "__call__")
    return tuple(model.apply({"params": params}, jnp.asarray(ids), method=m) for m in methods)


def _init(cfg, seed=0):
    model, _ = build_model(cfg)
    return model.init(jax.random.PRNGKey(seed), jnp.ones((1, 8), jnp.int32))["params"]


def _assert_close(ours, ref, real):
    diff = np.abs(np.asarray(ours, np.float32) - np.asarray(ref, np.float32))[real]
    assert diff.max() <= TOL, diff.max()


@pytest.mark.parametrize("name,tower,head_cls,_", CASES)
@pytest.mark.parametrize("scan", [False, True])
def test_hugging_face_to_ours_equal(batch, name, tower, head_cls, _, scan):
    _, ids, real = batch
    cfg = _config(name, scan_layers=scan)
    torch.manual_seed(0)
    hf = getattr(transformers, head_cls)(_hf_config(_tower(cfg, tower))).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms
        for p in hf.parameters():
            p.add_(0.05 * torch.randn_like(p))
        out = hf(torch.tensor(ids), attention_mask=torch.tensor(real.astype(np.int64)),
                 output_hidden_states=True)
    params = hf_bert.params_from_state_dict(hf.state_dict(), cfg, tower=tower)
    hidden, logits = _ours(cfg, tower, params, ids)
    _assert_close(hidden, out.hidden_states[-1].numpy(), real)
    _assert_close(logits, out.logits.numpy(), real)
    if head_cls.endswith("ForMaskedLM") and not tower:
        # MLMObjective's mean over scored positions = HF's loss with labels -100 elsewhere.
        scored = real & (np.arange(ids.shape[1]) % 3 == 1)
        labels = np.where(scored, ids, -100)
        with torch.no_grad():
            hf_loss = float(hf(torch.tensor(ids), attention_mask=torch.tensor(
                real.astype(np.int64)), labels=torch.tensor(labels)).loss)
        model, _ = build_model(cfg)
        b = {"encoder_input_tokens": jnp.asarray(ids), "encoder_target_tokens": jnp.asarray(ids),
             "encoder_loss_weights": jnp.asarray(scored.astype(np.int32))}
        _, sums = objectives_ae.MLMObjective()(model, params, b, jax.random.key(0),
                                               deterministic=True)
        assert abs(float(sums["loss"]) / float(sums["weight"]) - hf_loss) <= 1e-5


@pytest.mark.parametrize("name,tower,head_cls,base_cls", CASES)
def test_ours_to_hugging_face_equal(tmp_path, batch, name, tower, head_cls, base_cls):
    seqs, ids, real = batch
    cfg = _config(name)
    params = _init(cfg, seed=1)
    # Perturb so zero-initialised biases and unit LayerNorms are exercised.
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(2), len(leaves))
    params = jax.tree.unflatten(tree, [x + 0.05 * jax.random.normal(k, x.shape)
                                       for x, k in zip(leaves, keys)])
    out = hf_bert.save_pretrained(params, cfg, str(tmp_path / "hf"),
                                  tower=tower or "discriminator")["directory"]
    hidden, logits = _ours(cfg, tower, params, ids)
    mask = torch.tensor(real.astype(np.int64))
    with torch.no_grad():
        head = getattr(transformers, head_cls).from_pretrained(out).eval()
        _assert_close(logits, head(torch.tensor(ids), attention_mask=mask).logits.numpy(), real)
        base = getattr(transformers, base_cls).from_pretrained(out).eval()
        _assert_close(hidden, base(torch.tensor(ids), attention_mask=mask)
                      .last_hidden_state.numpy(), real)
    # The published ProtBert snippet on the export: tokenizer (spaces, UZOB -> X)
    # + *Model equals our tokenization and encode, per residue.
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    enc = tokenizer([" ".join(s) for s in seqs], return_tensors="pt", padding=True)
    np.testing.assert_array_equal(enc["input_ids"].numpy(), ids[:, :enc["input_ids"].shape[1]])
    imported = hf_bert.load(out)
    assert imported.vocabulary.encode(seqs[0]) == VOCAB.encode(seqs[0])
    with torch.no_grad():
        per_residue = base(**enc).last_hidden_state.numpy()
    ours = imported.encode(jnp.asarray(enc["input_ids"]))
    for i, s in enumerate(seqs):  # drop [CLS] and [SEP]
        np.testing.assert_allclose(np.asarray(ours)[i, 1:len(s) + 1],
                                   per_residue[i, 1:len(s) + 1], atol=TOL, rtol=0)


def test_imported_model_keeps_its_own_vocabulary(tmp_path, batch):
    """Another residue order in vocab.txt: our tokenization follows the file, as HF's does."""
    seqs, _, _ = batch
    cfg = bert.preset("prot_bert_tiny")
    out = hf_bert.save_pretrained(_init(cfg), cfg, str(tmp_path / "hf"))["directory"]
    tokens = hf_tokenizers.protbert_vocab_tokens()
    tokens = tokens[:5] + tokens[5:][::-1]  # residues in reverse order
    with open(os.path.join(out, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(out, do_lower_case=False)
    vocab = hf_bert.load(out).vocabulary
    for s in seqs:
        hf_ids = tokenizer(" ".join(s))["input_ids"]
        assert hf_ids == [vocab.CLS_ID] + vocab.encode(s) + [vocab.SEP_ID]
        assert vocab.encode(s) != VOCAB.encode(s)


def _count(tree):
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


@pytest.mark.parametrize("name", ["prot_bert", "prot_bert_bfd", "prot_albert", "prot_electra"])
def test_published_parameter_counts_equal_transformers(name):
    """eval_shape of our published shapes = the HF models of those configs (meta device)."""
    def hf_count(cls_name, cfg):
        with torch.device("meta"):
            m = getattr(transformers, cls_name)(_hf_config(cfg))
        return sum(p.numel() for p in m.parameters())

    if name == "prot_electra":
        cfg = electra.preset(name)
        flat = jax.tree.map(lambda x: x, nn_unbox(electra.abstract_params(cfg)))
        shared = _count(flat["embeddings"])
        disc = shared + _count(flat["discriminator"]) + _count(flat["discriminator_head"])
        gen = shared + _count(flat["generator"]) + _count(flat["generator_head"])
        assert disc == hf_count("ElectraForPreTraining", cfg.discriminator)
        assert gen == hf_count("ElectraForMaskedLM", cfg.generator)
        assert cfg.discriminator.num_hidden_layers == 32
        assert cfg.discriminator.hidden_size == 1280
        return
    cfg = bert.preset(name)
    cls = "BertForMaskedLM" if cfg.family == "bert" else "AlbertForMaskedLM"
    ours = _count(nn_unbox(bert.abstract_params(cfg)))
    assert ours == hf_count(cls, cfg)
    if name.startswith("prot_bert"):
        assert 415_000_000 < ours < 425_000_000  # ProtBert: ~420 M


def nn_unbox(tree):
    import flax.linen as nn

    return nn.meta.unbox(tree)


def test_gin_model_files_equal_the_presets():
    import gin

    from protlm_jax import gin_config

    for gin_name, want in [("prot_bert", bert.preset("prot_bert")),
                           ("prot_bert_bfd", bert.preset("prot_bert_bfd")),
                           ("prot_albert", bert.preset("prot_albert")),
                           ("prot_bert_tiny", bert.preset("prot_bert_tiny")),
                           ("prot_albert_tiny", bert.preset("prot_albert_tiny")),
                           ("prot_electra", electra.preset("prot_electra")),
                           ("prot_electra_tiny", electra.preset("prot_electra_tiny"))]:
        gin_config.parse([f"gin/models/{gin_name}.gin"],
                         {"train.model_config": "%MODEL_CONFIG"})
        assert gin.get_bindings("train")["model_config"] == want, gin_name


def test_every_parameter_resolves_under_both_rule_sets():
    mesh = partitioning.create_mesh(4)  # 2 x 4 on the 8 simulated devices
    abstracts = []
    # Published vocabularies (30, 34) need their rows padded to split 4 ways;
    # published shapes traced scanned only (tracing 30 unrolled layers is slow).
    for name, scans in (("prot_bert_tiny", (False, True)), ("prot_albert_tiny", (False, True)),
                        ("prot_bert", (True,)), ("prot_albert", (True,))):
        for scan in scans:
            abstracts.append(bert.abstract_params(bert.preset(
                name, scan_layers=scan, vocab_pad_to_multiple=8)))
    for name, scans in (("prot_electra_tiny", (False, True)), ("prot_electra", (True,))):
        for scan in scans:
            abstracts.append(electra.abstract_params(_config(
                name, scan_layers=scan, vocab_pad_to_multiple=8)))
    for rule_set in ("1d", "2d"):
        rules = partitioning.standard_logical_axis_rules(rule_set)
        for abstract in abstracts:
            shardings, shapes = partitioning.param_shardings(abstract, mesh, rules)
            leaves = jax.tree.leaves(shardings)
            assert len(leaves) == len(jax.tree.leaves(shapes))
            assert any("model" in str(s.spec) for s in leaves)
            if rule_set == "2d":
                assert any("data" in str(s.spec) for s in leaves)
        # Unpadded, the 30-row vocabulary cannot split 4 ways: a clear error.
        with pytest.raises(partitioning.PartitioningError, match="pad it"):
            partitioning.param_shardings(bert.abstract_params(bert.preset(
                "prot_bert_tiny", vocab_pad_to_multiple=1)), mesh, rules)


LENGTHS = {"inputs": 32}
# SGD: its update is linear in the gradient, so equal programs summed in another
# order stay equal (see test_trainer.py); a small rate keeps ELECTRA's 50x RTD
# gradients from amplifying last-bit differences.
SGD = optimizers.OptimizerConfig(name="sgd", b1=0.9, schedule=optimizers.ScheduleConfig(
    name="constant", base=0.05))


@pytest.fixture(scope="module")
def mlm_batches(prepared_sample):
    """Two packed batches of 8 rows of the ``uniprot_sample_mlm`` task."""
    data = data_pipeline.DataConfig("uniprot_sample_mlm", LENGTHS)
    it = data_pipeline.batches(data, 8, seed=1)
    return data, [next(it) for _ in range(2)]


def _trainer(tmp_path, config, objective, data, devices=None, **kw):
    converter = data_pipeline.feature_converter(data.task, data.pack)
    model, init_inputs = build_model(config)
    return trainer.Trainer(
        model=model, objective=objective, optimizer_config=SGD,
        config=trainer.TrainConfig(model_dir=str(tmp_path), train_steps=2, batch_size=8,
                                   seed=1, **kw),
        model_feature_lengths=converter.get_model_feature_lengths(LENGTHS),
        init_inputs=init_inputs, devices=devices)


@pytest.mark.parametrize("name", ["prot_bert_tiny", "prot_albert_tiny", "prot_electra_tiny"])
def test_sharded_2x4_steps_equal_one_device(tmp_path, mlm_batches, name):
    data, batches = mlm_batches
    # One layer (two for ALBERT's shared layer) keeps the four compiles short.
    config = _config(name, hidden_dropout_prob=0.1,
                     num_hidden_layers=2 if name.startswith("prot_albert") else 1)
    objective = (objectives_ae.ElectraObjective() if name.startswith("prot_electra")
                 else objectives_ae.MLMObjective())
    sharded = _trainer(tmp_path / "a", config, objective, data, model_parallel_size=4)
    assert dict(sharded.mesh.shape) == {"data": 2, "model": 4}
    single = _trainer(tmp_path / "b", config, objective, data, devices=jax.devices()[:1])
    p_sharded, l_sharded = two_steps(sharded, batches)
    p_single, l_single = two_steps(single, batches)
    np.testing.assert_allclose(l_sharded, l_single, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                 p_sharded, p_single)
    assert l_single[0] != l_single[1]


def test_electra_sampling_passes_no_gradient_to_the_generator(batch):
    """The RTD term changes discriminator gradients only: the generator's gradient
    (sampling is under stop_gradient) is the same with RTD weight 50 and 0."""
    _, ids, real = batch
    cfg = electra.preset("prot_electra_tiny")
    model = electra.Electra(cfg)
    params = _init(cfg)
    scored = real & (np.arange(ids.shape[1]) % 4 == 2)
    mlm_in = np.where(scored, VOCAB.MASK_ID, ids)
    b = {"encoder_input_tokens": jnp.asarray(mlm_in), "encoder_target_tokens": jnp.asarray(ids),
         "encoder_loss_weights": jnp.asarray(scored.astype(np.int32))}

    @jax.jit
    def grads(weight):  # one compile: the RTD weight is traced
        obj = objectives_ae.ElectraObjective(rtd_weight=weight)
        return jax.grad(lambda p: obj(model, p, b, jax.random.key(3), True)[0])(params)

    g50, g0 = grads(50.0), grads(0.0)
    for part in ("generator", "generator_head"):
        jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-6), g50[part], g0[part])
    assert all(float(jnp.abs(x).max()) == 0.0 for x in jax.tree.leaves(g0["discriminator"]))
    assert any(float(jnp.abs(x).max()) > 0.0 for x in jax.tree.leaves(g50["discriminator"]))
    _, sums = jax.jit(lambda p: objectives_ae.ElectraObjective()(
        model, p, b, jax.random.key(3), True))(params)
    assert float(sums["weight"]) == scored.sum()
    assert float(sums["disc_weight"]) == real.sum()
    assert 0 < float(sums["replaced"]) <= scored.sum()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    cfg = bert.preset("prot_bert_tiny")
    return hf_bert.save_pretrained(_init(cfg), cfg,
                                   str(tmp_path_factory.mktemp("e") / "hf"))["directory"]


def _copy_with(src, dst, tensors=None, config=None):
    from safetensors.numpy import load_file, save_file

    os.makedirs(dst)
    t = load_file(os.path.join(src, "model.safetensors"))
    t = tensors(t) if tensors else t
    save_file(t, os.path.join(dst, "model.safetensors"))
    c = json.load(open(os.path.join(src, "config.json")))
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(config(c) if config else c, f)
    return dst


@pytest.mark.parametrize("edit,match", [
    (dict(tensors=lambda t: {k: v for k, v in t.items() if "layer.1.output.dense" not in k}),
     r"missing tensors: .*encoder\.layer\.1\.output\.dense\.weight"),
    (dict(tensors=lambda t: {**t, "bert.encoder.layer.0.intermediate.dense.weight":
                             np.zeros((7, 64), np.float32)}),
     r"wrong shapes: bert\.encoder\.layer\.0\.intermediate\.dense\.weight \[7, 64\] "
     r"\(config: \[128, 64\]\)"),
    (dict(tensors=lambda t: {**t, "bert.encoder.layer.0.attention.self.rotary.weight":
                             np.zeros((2,), np.float32)}),
     r"tensors this bert does not model: "
     r"bert\.encoder\.layer\.0\.attention\.self\.rotary\.weight"),
    (dict(tensors=lambda t: {**t, "cls.predictions.decoder.weight":
                             np.ones((30, 64), np.float32)}),
     r"cls\.predictions\.decoder\.weight \(differs from "
     r"bert\.embeddings\.word_embeddings\.weight"),
    (dict(config=lambda c: {**c, "position_embedding_type": "relative_key"}),
     r"unsupported bert config: position_embedding_type 'relative_key'"),
    (dict(config=lambda c: {**c, "model_type": "roberta"}), r"model_type 'roberta'"),
    (dict(config=lambda c: {**c, "num_hidden_layers": 3}),
     r"bad config.json values: num_hidden_layers 3 but the checkpoint holds 2"),
])
def test_bad_checkpoints_give_one_line_errors(tmp_path, exported, edit, match):
    bad = _copy_with(exported, str(tmp_path / "bad"), **edit)
    with pytest.raises(ProtlmError, match=match) as info:
        hf_bert.load(bad)
    assert "\n" not in str(info.value) and str(info.value).startswith(bad)


def test_missing_weights_and_config_are_reported(tmp_path, exported):
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ProtlmError, match="config.json: not found"):
        hf_bert.load(str(tmp_path / "empty"))
    with open(tmp_path / "empty" / "config.json", "w") as f:
        f.write(open(os.path.join(exported, "config.json")).read())
    with pytest.raises(ProtlmError, match="no model.safetensors"):
        hf_bert.load(str(tmp_path / "empty"))


def test_pytorch_bin_is_read_with_weights_only(tmp_path, exported, batch):
    """A ``pytorch_model.bin`` (BertModel keys, no prefix, with a pooler) imports."""
    _, ids, real = batch
    hf = transformers.BertModel.from_pretrained(exported).eval()
    d = tmp_path / "bin"
    os.makedirs(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    with open(d / "config.json", "w") as f:
        f.write(open(os.path.join(exported, "config.json")).read())
    imported = hf_bert.load(str(d))
    assert not imported.has_head
    ours = imported.encode(jnp.asarray(ids))
    with torch.no_grad():
        ref = hf(torch.tensor(ids), attention_mask=torch.tensor(real.astype(np.int64)))
    _assert_close(ours, ref.last_hidden_state.numpy(), real)
