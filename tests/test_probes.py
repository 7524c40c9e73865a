"""Probes: head shapes and parameter counts (REFERENCE §4 by hand), metrics
against hand-computed values, padding/excluded residues never counted, the
loaders on files written from real records, a one-hot probe that learns, the
CLI's one-line errors, and the trainer hook logging probe metrics."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from protlm_jax import cli
from protlm_jax.errors import InputError
from protlm_jax.probes import datasets, evaluate, features, heads, metrics, train

from conftest import REPO

FETCHED = REPO / "data" / "fetched"


def _need_fetched():
    if not (FETCHED / datasets.SIDECHAINNET_DSSP).exists() or \
            not (FETCHED / "scl2205" / "scl2205.csv").exists():
        pytest.skip("probe data not fetched: run `make data`")


@pytest.fixture(scope="session")
def ss_sets():
    _need_fetched()
    return datasets.load_sidechainnet_splits(str(FETCHED))


@pytest.fixture(scope="session")
def scl_sets():
    _need_fetched()
    return datasets.load_scl2205(str(FETCHED))


def _count(tree) -> int:
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


# --- heads ---------------------------------------------------------------------------


def _init_shapes(head, x_shape, mask_shape):
    fn = lambda: head.init({"params": jax.random.key(0)}, jnp.zeros(x_shape),  # noqa: E731
                           jnp.ones(mask_shape))
    variables = jax.eval_shape(fn)
    out = jax.eval_shape(lambda v: head.apply(v, jnp.zeros(x_shape), jnp.ones(mask_shape)),
                         variables)
    return variables, out


def test_head_shapes_and_parameter_counts_for_d1024():
    d = 1024
    v, out = _init_shapes(heads.SecondaryStructureCNN(), (2, 50, d), (2, 50))
    assert _count(v["params"]) == (d * 32 * 7 + 32) + (32 * 3 * 7 + 3) + (32 * 8 * 7 + 8)
    assert out["ss3"].shape == (2, 50, 3) and out["ss8"].shape == (2, 50, 8)

    v, out = _init_shapes(heads.PerProteinFNN(num_classes=10), (4, d), (4,))
    assert _count(v["params"]) == (d * 32 + 32) + (32 * 10 + 10) + (32 * 2 + 2)
    assert out["location"].shape == (4, 10) and out["membrane"].shape == (4, 2)

    v, out = _init_shapes(heads.LightAttention(num_classes=10), (2, 30, d), (2, 30))
    conv = d * d * 9 + d
    assert _count(v["params"]) == 2 * conv + (2 * d * 32 + 32) + 2 * 32 + (32 * 10 + 10)
    assert _count(v["batch_stats"]) == 2 * 32
    assert out["location"].shape == (2, 10) and "membrane" not in out


def test_padding_never_changes_real_positions():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(1, 40, 16)).astype(np.float32)
    for head in (heads.SecondaryStructureCNN(), heads.LightAttention(num_classes=5)):
        variables = head.init({"params": jax.random.key(1)}, jnp.asarray(x), jnp.ones((1, 40)))
        apply = jax.jit(head.apply)  # one program, not op-by-op dispatch
        alone = apply(variables, jnp.asarray(x), jnp.ones((1, 40)))
        padded = np.concatenate([x, rng.normal(size=(1, 24, 16)).astype(np.float32)], 1)
        mask = np.concatenate([np.ones((1, 40)), np.zeros((1, 24))], 1)
        inside = apply(variables, jnp.asarray(padded), jnp.asarray(mask))
        for k, a in alone.items():
            b = inside[k][:, :40] if a.ndim == 3 else inside[k]
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# --- metrics -------------------------------------------------------------------------


def test_metrics_against_hand_computed_values():
    t = np.array([0, 0, 1, 1, 2, 2])
    p = np.array([0, 1, 1, 1, 2, 0])
    r = metrics.classification_report(t, p, ("a", "b", "c"))
    assert r["accuracy"] == pytest.approx(4 / 6)
    assert r["accuracy_se"] == pytest.approx(np.sqrt((4 / 6) * (2 / 6) / 6))
    assert r["accuracy_ci95"] == pytest.approx(1.96 * np.sqrt((4 / 6) * (2 / 6) / 6))
    # Gorodkin: c=4, s=6, t=(2,2,2), p=(2,3,1): (24-12)/sqrt((36-14)(36-12)).
    assert r["mcc"] == pytest.approx(12 / np.sqrt(22 * 24))
    # Class b one vs rest: tp 2, fp 1, fn 0, tn 3.
    assert r["per_class"]["b"]["mcc"] == pytest.approx(6 / np.sqrt(3 * 2 * 4 * 3))
    assert r["per_class"]["a"]["accuracy"] == pytest.approx(0.5)
    assert metrics.mcc_from_confusion(np.array([[5, 0], [0, 3]])) == pytest.approx(1.0)
    pp = metrics.per_protein_mean([np.array([1, 1]), np.array([0, 1]), np.array([2, 2, 2, 2])],
                                  [np.array([1, 1]), np.array([1, 1]), np.array([2, 2, 2, 0])])
    assert pp["mean"] == pytest.approx(0.75)
    assert pp["se"] == pytest.approx(0.25 / np.sqrt(3))


def test_excluded_residues_and_padding_are_never_counted():
    y = [np.array([0, 1, 2, 2]), np.array([1, 1])]
    pred = [np.array([0, 1, 0, 0]), np.array([1, 0])]
    scored = [np.array([1, 1, 0, 0], bool), np.array([1, 0], bool)]
    r = metrics.residue_report(y, pred, scored, heads.SS3_CLASSES)
    assert r["n"] == 3 and r["accuracy"] == 1.0
    assert r["per_protein"]["mean"] == 1.0
    # Training batches: padding and excluded residues carry weight 0.
    feats = [np.ones((4, 3), np.float32), np.ones((2, 3), np.float32)]
    for batches in (train.packed_batches(feats, {"ss3": (y, scored)}, 128, gap=3),
                    train.residue_batches(feats, {"ss3": (y, scored)}, 128)):
        assert sum(b["w_ss3"].sum() for b in batches) == 3
        assert sum(b["mask"].sum() for b in batches) == 6


def test_packed_batch_predictions_equal_one_protein_alone(ss_sets):
    ds = ss_sets["validation"].subset(range(6))
    feats = features.OneHot()(list(zip(ds.ids, ds.sequences)), per_protein=False)
    labels = {"ss3": (ds.ss3, ds.scored), "ss8": (ds.ss8, ds.scored)}
    head = heads.SecondaryStructureCNN()
    fitted = train.fit(head, lambda e: train.packed_batches(feats, labels, 4096, 3),
                       train.packed_batches(feats, labels, 4096, 3),
                       train.ProbeConfig(max_epochs=1))
    together = train.predict(fitted, train.packed_batches(feats, labels, 4096, 3), len(ds))
    for i in range(len(ds)):
        one = {k: ([v[i]], [m[i]]) for k, (v, m) in labels.items()}
        alone = train.predict(fitted, train.residue_batches([feats[i]], one, 64), 1)
        for k in ("ss3", "ss8"):
            np.testing.assert_array_equal(alone[k][0], together[k][i])


# --- loaders -------------------------------------------------------------------------


def _netsurfp_csv(path, ds, drop_every=5):
    letters3, letters8 = "HEC", "HGIEBTSC"
    with open(path, "w") as f:
        f.write("input,dssp3,dssp8,disorder,cb513_mask\n")
        for seq, y3, y8 in zip(ds.sequences, ds.ss3, ds.ss8):
            disorder = ["0.0" if i % drop_every == 0 else "1.0" for i in range(len(seq))]
            f.write(f"{seq},{''.join(letters3[i] for i in y3)},"
                    f"{''.join(letters8[i] for i in y8)},{' '.join(disorder)},"
                    f"{' '.join(['1.0'] * len(seq))}\n")


def test_netsurfp_csv_loader_on_real_records(tmp_path, ss_sets):
    real = ss_sets["validation"].subset(range(5))
    path = tmp_path / "CASP12_HHblits.csv"
    _netsurfp_csv(path, real)
    got = datasets.load_netsurfp_csv(str(path))
    assert got.sequences == real.sequences
    for a, b, s in zip(got.ss8, real.ss8, got.scored):
        np.testing.assert_array_equal(a, b)
        assert s.sum() == len(s) - len(range(0, len(s), 5))
    for a, b in zip(got.ss3, real.ss3):
        np.testing.assert_array_equal(a, b)
    bad = tmp_path / "bad.csv"
    lines = path.read_text().splitlines()
    fields = lines[3].split(",")
    fields[2] = fields[2][:-1]  # one 8-state label short
    bad.write_text("\n".join(lines[:3] + [",".join(fields)]) + "\n")
    with pytest.raises(InputError, match=r"bad.csv:4: sequence has \d+ residues but"):
        datasets.load_netsurfp_csv(str(bad))


def test_deeploc_fasta_loader_on_real_records(tmp_path, scl_sets):
    sets, classes = scl_sets
    train_part, test_part = sets["train"].subset(range(6)), sets["test"].subset(range(3))
    path = tmp_path / "deeploc.fasta"
    with open(path, "w") as f:
        for ds, flag in ((train_part, ""), (test_part, " test")):
            for i, seq, y, m in zip(ds.ids, ds.sequences, ds.labels, ds.membrane):
                location = classes[y].replace(" ", ".").replace(";", "/")
                f.write(f">{i} {location}-{'M' if m else 'S'}{flag}\n{seq[:70]}\n{seq[70:]}\n")
    tr, te, names = datasets.load_deeploc_fasta(str(path))
    assert tr.ids == train_part.ids and te.ids == test_part.ids
    assert tr.sequences == train_part.sequences
    assert [names[i] for i in tr.labels] == [classes[y].replace(" ", ".").replace(";", "/")
                                            for y in train_part.labels]
    np.testing.assert_array_equal(te.membrane, test_part.membrane)
    text = path.read_text().splitlines()
    text[0] = text[0].rsplit("-", 1)[0] + "-Q"
    (tmp_path / "bad.fasta").write_text("\n".join(text) + "\n")
    with pytest.raises(InputError, match=r"bad.fasta:1: expected 'Location-M'"):
        datasets.load_deeploc_fasta(str(tmp_path / "bad.fasta"))


def test_builtin_splits_and_test_fasta(tmp_path, ss_sets, scl_sets):
    assert len(ss_sets["validation"]) == 211
    assert len(ss_sets["training_30"]) == 21008
    assert not set(ss_sets["validation"].sequences) & set(ss_sets["training_30"].sequences)
    sets, classes = scl_sets
    assert len(classes) == 13 and [len(sets[k]) for k in ("train", "valid", "test")] == \
        [15183, 1260, 2631]
    membrane = {classes[y] for y, m in zip(sets["test"].labels, sets["test"].membrane) if m}
    assert membrane == {"Membrane", "Cytoplasm;Membrane"}
    out = tmp_path / "probe_test.fasta"
    assert cli.main(["probe", "--write_test_fasta", str(out), "--data_dir", str(FETCHED)]) == 0
    headers = [line for line in out.read_text().splitlines() if line.startswith(">")]
    assert len(headers) == 211 + 2631


# --- training ------------------------------------------------------------------------


def test_one_hot_probe_learns_secondary_structure_above_chance():
    _need_fetched()
    task = datasets.load_task("ss_casp12", str(FETCHED), train_limit=400,
                              max_train_length=400, test_limit=120, seed=0)
    result = evaluate.run_task(task, [features.OneHot()],
                               config=train.ProbeConfig(max_epochs=6, patience=2), log=None)
    q3 = result["rows"]["one-hot"]["tests"]["casp12_validation"]["q3"]
    chance = result["rows"][evaluate.MAJORITY]["tests"]["casp12_validation"]["q3"]
    # Real held-out chains: the one-hot CNN must beat always-coil by a clear margin.
    assert q3["accuracy"] - q3["accuracy_ci95"] > chance["accuracy"] + 0.05
    assert q3["n"] == sum(len(s) for s in task.tests["casp12_validation"].sequences)


def test_probe_cli_writes_outputs_and_one_line_errors(tmp_path, capsys, scl_sets):
    sets, classes = scl_sets
    path = tmp_path / "deeploc.fasta"
    with open(path, "w") as f:
        for ds, flag in ((sets["train"].subset(range(120)), ""),
                         (sets["test"].subset(range(40)), " test")):
            for i, seq, y, m in zip(ds.ids, ds.sequences, ds.labels, ds.membrane):
                f.write(f">{i} {classes[y].replace(' ', '.')}-{'M' if m else 'S'}{flag}\n"
                        f"{seq}\n")
    out = tmp_path / "out"
    assert cli.main(["probe", "--task", f"deeploc:{path}", "--baseline", "composition",
                     "--epochs", "3", "--quiet", "--output", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    assert set(result["rows"]) == {"majority class", "composition"}
    assert "| composition |" in (out / "results.md").read_text()
    assert (out / "learning_curve.png").stat().st_size > 1000
    capsys.readouterr()
    for argv, expected in (
            (["--task", "deeploc:/nonexistent.fasta"], "/nonexistent.fasta:0: cannot open"),
            (["--task", "netsurfp:only_one.csv"], "expected netsurfp:TRAIN.csv,TEST.csv"),
            (["--task", "nope"], "unknown task"),
            (["--task", "scl2205", "--train_limit", "0"], "--train_limit must be positive")):
        assert cli.main(["probe", *argv, "--output", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("protlm: error:") and expected in err[0]


# --- trainer hook --------------------------------------------------------------------


def test_trainer_hook_logs_probe_metrics(tmp_path, prepared_sample):
    import tensorflow as tf

    from protlm_jax import objectives, optimizers, trainer
    from protlm_jax.data import pipeline as data_pipeline
    from protlm_jax.models import t5
    from protlm_jax.probes.hook import ProbeHook

    _need_fetched()
    config = t5.preset("prot_t5_tiny")
    lengths = {"inputs": 64, "targets": 64}
    data = data_pipeline.DataConfig("uniprot_sample_prott5", lengths)
    converter = data_pipeline.feature_converter(data.task, data.pack)
    hook = ProbeHook(model_config=config, period=2, train_limit=16, test_limit=8,
                     max_train_length=60, max_test_length=60, max_epochs=1,
                     data_dir=str(FETCHED), verbose=False)
    run = trainer.Trainer(
        model=t5.T5(config), objective=objectives.EncDecObjective(),
        optimizer_config=optimizers.OptimizerConfig(name="sgd", schedule=optimizers.
                                                    ScheduleConfig(name="constant", base=0.1)),
        config=trainer.TrainConfig(model_dir=str(tmp_path), train_steps=3, batch_size=8,
                                   log_period=1, checkpoint_period=100,
                                   async_checkpoints=False),
        model_feature_lengths=converter.get_model_feature_lengths(lengths),
        init_inputs=("encoder_input_tokens", "decoder_input_tokens"), hooks=[hook],
        devices=jax.devices()[:1])  # one device: fewer, cheaper compiles
    run.train(lambda start: data_pipeline.batches(data, 8, seed=0, start_batch=start))
    tags = {}
    for event_file in tf.io.gfile.glob(os.path.join(str(tmp_path), "train", "events*")):
        for event in tf.compat.v1.train.summary_iterator(event_file):
            for v in event.summary.value:
                tags.setdefault(v.tag, []).append(event.step)
    for key in ("ss_casp12/casp12_validation/q3", "ss_casp12/casp12_validation/q8",
                "scl2205/scl2205_test/q13", "scl2205/scl2205_test/q2"):
        assert tags[f"probe/{key}"] == [2]  # period 2 of 3 steps: once, at step 2
    assert "loss" in tags
