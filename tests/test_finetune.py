"""Fine-tuning: LoRA algebra, the CLI end to end (T5 encoder and BERT),
merge and PEFT parity, sharding, kill/resume, bad input.

Real data: SCL2205 proteins (fetched) and the committed contact-number sample;
models are tiny random-init MODEL_DIRs (fine-tuning on them tests the
machinery; the demo models' numbers are in the README).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protlm_jax import cli, models, partitioning
from protlm_jax.embed import io as embed_io
from protlm_jax.finetune import lora, run, tasks, train

from conftest import random_model_dir, random_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FETCHED = os.path.join(REPO, "data", "fetched")
PRESETS = {"t5": "prot_t5_tiny", "bert": "prot_bert_tiny"}
ARGS = ["--task", "scl2205", "--train_limit", "24", "--test_limit", "8",
        "--max_train_length", "120", "--epochs", "2", "--batch_size", "8", "--quiet"]


def _model_dir(path, family_name):
    return random_model_dir(path, family_name, PRESETS[family_name])


def _tree_bytes(path):
    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, path)] = fh.read()
    return out


# ------------------------------------------------------------- LoRA algebra ---


def test_lora_zero_b_is_exact_and_counts_follow_the_formula():
    cfg, params = random_params("t5", PRESETS["t5"])
    fam = models.lookup("t5")
    view = fam.encoder_view(cfg, params)
    spec = lora.LoraSpec(rank=4, alpha=1.0)
    sites = lora.sites(fam.lora_targets, train.boxed_view(view), spec)
    assert len(sites) == 4 * cfg.num_encoder_layers
    adapters = lora.init_adapters(sites, spec, jax.random.PRNGKey(0))
    adapted = lora.apply(view.params, adapters, sites, spec)
    jax.tree.map(np.testing.assert_array_equal, adapted, view.params)  # B = 0: exact
    module = view.module("float32")
    tokens = jnp.asarray([[3, 5, 7, 9, 1, 0]], jnp.int32)
    out = lambda p: module.apply({"params": p}, tokens, tokens != 0, (2,),  # noqa: E731
                                 method="encode")["representations"][2]
    np.testing.assert_array_equal(out(adapted), out(view.params))
    # B != 0 changes exactly the targeted kernels, by scale * A B.
    bumped = jax.tree.map(lambda x: x + 0.1, adapters)
    before = models.family.flat_paths(view.params)
    after = models.family.flat_paths(lora.apply(view.params, bumped, sites, spec))
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert changed == {s.path for s in sites.values()}

    # ProtT5-XL's encoder, rank 4 on q, k, v, o: per layer q, k, v take
    # A [1024, 4] + B [4, 32 x 128] and o A [32 x 128, 4] + B [4, 1024]:
    # 24 layers x 4 x 4 x (1024 + 4096) = 1,966,080 adapter parameters.
    xl = fam.presets["prot_t5_xl_uniref50"].replace(scan_layers=False)
    boxed = fam.abstract_params(xl, encoder_only=True)
    xl_sites = lora.sites(fam.lora_targets, boxed, spec)
    by_shape = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(
        nn.meta.unbox(lora.abstract_adapters(xl_sites, spec))))
    formula = xl.num_encoder_layers * 4 * spec.rank * (xl.d_model + xl.num_heads * xl.d_kv)
    assert by_shape == lora.count(xl_sites, spec) == formula == 1_966_080
    # Adapters shard like their kernels: heads over "model", rank never.
    a_q = lora.abstract_adapters(xl_sites, spec)[
        "encoder.layers_0.attention.query.kernel"]
    assert a_q["a"].names == ("embed", "lora_rank")
    assert a_q["b"].names == ("lora_rank", "heads", "kv")


@pytest.mark.parametrize("family_name,preset", [("xlnet", "prot_xlnet_tiny"),
                                                ("txl", "prot_txl_tiny"),
                                                ("electra", "prot_electra_tiny"),
                                                ("albert", "prot_albert_tiny")])
def test_every_family_has_its_attention_targets(family_name, preset):
    fam = models.lookup(family_name)
    cfg = fam.presets[preset]
    module, feats = fam.build(cfg)
    params = nn.meta.unbox(module.init(jax.random.PRNGKey(0),
                                       *[jnp.ones((2, 8), jnp.int32)] * len(feats))["params"])
    view = fam.encoder_view(cfg, params)
    spec = lora.LoraSpec(rank=2)
    sites = lora.sites(fam.lora_targets, train.boxed_view(view), spec)
    assert {s.target for s in sites.values()} == {"q", "k", "v", "o"}
    ad = jax.tree.map(lambda x: x + 0.01, lora.init_adapters(sites, spec, jax.random.PRNGKey(1)))
    host = jax.tree.map(np.asarray, view.params)  # --merge applies to host arrays
    before, after = (models.family.flat_paths(p) for p in
                     (view.params, lora.apply(host, ad, sites, spec)))
    for s in sites.values():
        assert not np.array_equal(before[s.path], after[s.path])
    assert lora.count(sites, spec) == sum(x.size for x in jax.tree.leaves(ad))


# ------------------------------------------------------ end to end, T5 and BERT ---


@pytest.fixture(scope="module")
def fetched():
    if not os.path.exists(os.path.join(FETCHED, "scl2205", "scl2205.csv")):
        pytest.skip("probe data not fetched: run `make data`")
    return FETCHED


def _adapted_encoder(out_dir, base_dir, records):
    """Our adapted encoder's final hidden states per protein [T, D] (all tokens)."""
    base, params, _ = run.merged_encoder_params(base_dir, out_dir)
    view = base["view"]
    module = view.module("float32")
    tok = train.Tokens(base["family"], base["vocab"], None)
    out = []
    for _, seq in records:
        ids = np.asarray(tok.prefix + list(base["vocab"].encode(seq)) + tok.suffix, np.int32)
        r = module.apply({"params": params}, ids[None], None, (view.num_layers,),
                         method="encode")["representations"][view.num_layers]
        out.append((ids, np.asarray(r[0])))
    return out


@pytest.mark.parametrize("family_name", ["t5", "bert"])
def test_finetune_merge_and_peft_equal_the_adapted_model(tmp_path, fetched, family_name):
    import torch
    import transformers
    from peft import PeftModel

    base = _model_dir(tmp_path / "base", family_name)
    before = _tree_bytes(base)
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--model", base, "--output", str(out), "--method", "lora",
                     "--data_dir", fetched, *ARGS]) == 0
    assert _tree_bytes(base) == before  # the base MODEL_DIR is never written
    result = json.loads((out / "result.json").read_text())
    assert result["trainable_parameters"]["lora"] == lora.count(
        lora.sites(models.lookup(family_name).lora_targets, train.boxed_view(
            run.read_base(base, None)["view"]), lora.LoraSpec()), lora.LoraSpec())
    q = result["tests"]["scl2205_test"]["location"]
    test_split = result["splits"]["scl2205_test"]
    assert test_split["proteins"] + test_split["left_out"] == 8  # too long: counted
    assert q["n"] == test_split["proteins"] and 0 <= q["accuracy"] <= 1 and "mcc" in q
    assert len(result["curve"]) >= 1 and (out / "learning_curve.png").exists()
    assert (out / "results.md").read_text().startswith("### scl2205: lora")
    # Small: the adapters, norms and head only (no base weights).
    weights = run.read_artifact(str(out))[1]
    assert all(k.split(".")[0] in ("head", "lora", "norms") for k in weights)
    # Training moved the adapters (B left zero) but the frozen kernels stayed.
    assert any(np.abs(v).max() > 0 for k, v in weights.items() if k.endswith(".b"))

    records = [(f"p{i}", s) for i, s in enumerate(
        ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMSLFDFFKNKGSAAATAEVLKA", "MADQLTEEQIAEFKEAFSLF"])]
    ours = _adapted_encoder(str(out), base, records)

    # --merge: a MODEL_DIR whose encoder gives the adapted outputs.
    merged = tmp_path / "merged"
    assert cli.main(["finetune", "--merge", "--model", base, "--adapter", str(out),
                     "--output", str(merged)]) == 0
    emb = embed_io.load_model(str(merged))
    for (ident, seq), (_, want) in zip(records, ours):
        got = dict(emb.embed([(ident, seq)]))[ident]
        start = len(emb.prefix)
        np.testing.assert_allclose(got, want[start:start + len(seq)], atol=1e-5, rtol=1e-5)

    # PEFT on the encoder-only HF export = ours.
    hf_dir, peft_dir = tmp_path / "hf", tmp_path / "peft"
    assert cli.main(["export-hf", "--model", base, "--output", str(hf_dir),
                     "--encoder_only"]) == 0
    assert cli.main(["finetune", "--export_peft", "--model", base, "--adapter", str(out),
                     "--output", str(peft_dir)]) == 0
    arch = json.loads((hf_dir / "config.json").read_text())["architectures"][0]
    hf_model = getattr(transformers, arch).from_pretrained(str(hf_dir)).eval()
    peft_model = PeftModel.from_pretrained(hf_model, str(peft_dir)).eval()
    for ids, want in ours:
        with torch.no_grad():
            got = peft_model(input_ids=torch.tensor(ids[None].astype(np.int64))
                             ).last_hidden_state[0].numpy()
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    # Without the adapter the HF base differs (the adapter did something).
    with torch.no_grad(), peft_model.disable_adapter():
        plain = peft_model(input_ids=torch.tensor(ours[0][0][None].astype(np.int64))
                           ).last_hidden_state[0].numpy()
    assert np.abs(plain - ours[0][1]).max() > 1e-4


# ------------------------------------------------- sharding and kill / resume ---


def test_sharded_steps_equal_one_device_and_kill_resume(tmp_path, fetched):
    """Regression task (contact numbers), full fine-tuning: a 2 x 4 mesh
    trains like one device; a run killed after its first epoch and resumed
    ends bit-equal to an uninterrupted one."""
    base = _model_dir(tmp_path / "base", "bert")
    task = tasks.load_task("contact_number", train_limit=16, test_limit=4,
                           max_train_length=200)
    # Adam turns float reduction-order noise into ~lr-sized steps on
    # near-zero gradients: a small learning rate keeps the comparison at 1e-5.
    cfg = train.FinetuneConfig(method="full", epochs=1, batch_size=8, learning_rate=1e-4)
    results = {}
    for name, mesh in (("one", partitioning.create_mesh(1, jax.devices()[:1])),
                       ("2x4", partitioning.create_mesh(4))):
        b = run.read_base(base, mesh)
        model = train.build(b["family"], b["view"], task, cfg, mesh,
                            partitioning.standard_logical_axis_rules("1d"))
        tok = train.Tokens(b["family"], b["vocab"], b["view"].max_positions)
        enc = {k: tok.encode(s) for k, s in task.all_splits()}
        trained = train.fit(model, b["view"].params, enc, output=None)
        results[name] = jax.device_get(trained.trainable)
        if name == "2x4":  # the LoRA tree is sharded by logical axes too
            assert dict(mesh.shape) == {"data": 2, "model": 4}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5),
                 results["one"], results["2x4"])

    args = ["finetune", "--model", base, "--task", "contact_number", "--method", "lora",
            "--epochs", "3", "--patience", "3", "--batch_size", "8", "--train_limit", "16",
            "--test_limit", "4", "--max_train_length", "200", "--learning_rate", "3e-3",
            "--quiet"]
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
               TF_CPP_MIN_LOG_LEVEL="3")
    cmd = [sys.executable, "-m", "protlm_jax.cli"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    p = subprocess.run(cmd + args + ["--output", str(whole)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    p = subprocess.run(cmd + args + ["--output", str(killed),
                                     "--gin.FinetuneConfig.kill_at_step=2"],
                       env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert p.returncode == -9, p.stderr[-2000:]
    p = subprocess.run(cmd + args + ["--output", str(killed)], env=env, cwd=REPO,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((killed / "result.json").read_text())["resumed_from_step"] == 2
    a, b = (run.read_artifact(str(d))[1] for d in (whole, killed))
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    r = json.loads((whole / "result.json").read_text())["tests"]["test"]["contact_number"]
    assert r["n"] > 0 and -1 <= r["pearson"] <= 1 and r["mae"] > 0


# ---------------------------------------------------------------- bad input ---


def test_bad_input_gives_one_line_and_exit_2(tmp_path, capsys):
    base = _model_dir(tmp_path / "base", "t5")

    def fails(argv, words):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("protlm: error:"), err
        assert all(w in err[0] for w in words), err[0]

    common = ["finetune", "--model", base, "--output", str(tmp_path / "o")]
    fails(common + ["--task", "nonsense"], ["unknown task"])
    bad = tmp_path / "bad.csv"
    bad.write_text("id,sequence,label\na,MKTAY,1 2 3 4 5\nb,MKTAYIA,1 2 3\n")
    fails(common + ["--task", f"csv:{bad}"], ["bad.csv", "3", "numbers for 7 residues"])
    empty = tmp_path / "empty.csv"
    empty.write_text("id,sequence,label\n")
    fails(common + ["--task", f"csv:{bad},{empty}"], ["empty.csv", "no records"])
    # An adapter of another family than the base.
    t = tasks.load_task("contact_number")
    one = tmp_path / "one.csv"
    tasks.write_contact_table([(i, s, np.asarray(v)) for _, split in t.all_splits()
                               for i, s, v in zip(split.ids, split.sequences,
                                                  split.labels["contact_number"])], str(one))
    out = tmp_path / "ft"
    assert cli.main(["finetune", "--model", base, "--task", f"csv:{one}", "--output", str(out),
                     "--epochs", "1", "--batch_size", "8", "--max_train_length", "150",
                     "--quiet"]) == 0
    capsys.readouterr()
    bert = _model_dir(tmp_path / "bert", "bert")
    fails(["finetune", "--merge", "--model", bert, "--adapter", str(out), "--output",
           str(tmp_path / "m")], ["adapters of a t5 model", "bert model"])


def test_too_long_proteins_are_left_out_and_counted():
    fam = models.lookup("bert")
    task = tasks.load_task("contact_number")
    tok = train.Tokens(fam, fam.vocabulary(), 100)
    enc = tok.encode(task.train)
    long = [i for i, s in zip(task.train.ids, task.train.sequences) if len(s) + 2 > 100]
    assert long and enc.left_out == long
    assert len(enc.tokens) + len(long) == len(task.train)


def test_pdb_reader_and_contact_numbers(tmp_path):
    """The PDB reader (first chain, CA records, MSE -> M, unknown -> X) and the
    12 Å contact count that built the committed sample."""
    t = tasks.load_task("contact_number")
    assert t.kind == "residue" and t.outputs[0].regression
    ca = np.array([[0, 0, 0], [3.8, 0, 0], [7.6, 0, 0], [20, 0, 0]], float)
    np.testing.assert_array_equal(tasks.contact_numbers(ca), [2, 2, 2, 0])
    pdb = tmp_path / "x.pdb"
    lines = [f"ATOM  {i + 1:5d}  CA  {r} A{i + 1:4d}    {x:8.3f}{0:8.3f}{0:8.3f}  1.00  0.00"
             for i, (r, x) in enumerate([("MET", 0.0), ("LYS", 3.8), ("MSE", 7.6),
                                         ("XYZ", 20.0)])]
    pdb.write_text("\n".join(lines) + "\nEND\n")
    seq, coords = tasks.read_pdb_chain(str(pdb))
    assert seq == "MKMX" and coords.shape == (4, 3)
    assert math.isclose(float(tasks.contact_numbers(coords)[0]), 2.0)


def test_cnn_head_never_reads_padding():
    head = train.Head("residue", (("ss3", 3),), conv=True)
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 16, 8))
    mask = jnp.asarray(np.arange(16)[None] < np.array([[10], [16]]), jnp.float32)
    params = head.init(jax.random.PRNGKey(1), x, mask)
    noisy = x.at[0, 10:].set(100.0)  # garbage where row 0 is padding
    a, b = (head.apply(params, v, mask)["ss3"] for v in (x, noisy))
    np.testing.assert_array_equal(a[0, :10], b[0, :10])
    assert not np.allclose(a[1], head.apply(params, x.at[1, 12].set(5.0), mask)["ss3"][1])
