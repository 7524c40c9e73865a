"""MODEL_DIRs and Hugging Face exports written before the family interface
(``tests/data/legacy_c5345f0``, by commit c5345f0's code) embed, import and
export with the same numbers today."""

import json
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file

from protlm_jax import cli, embed, models
from protlm_jax.checkpoints import read_params

LEGACY = pathlib.Path(__file__).resolve().parent / "data" / "legacy_c5345f0"
FAMILIES = ("t5", "electra", "albert")
LAYERS = (0, 1, -1)


@pytest.fixture(scope="module")
def legacy():
    expected = dict(np.load(LEGACY / "expected_embeddings.npz"))
    sequences = [tuple(s) for s in json.loads((LEGACY / "sequences.json").read_text())]
    return expected, sequences


def _check(embedder, expected, sequences, prefix):
    got = dict(embedder.embed(sequences, layers=LAYERS))
    for ident, seq in sequences:
        want = expected[f"{prefix}/{ident}"]
        assert got[ident].shape == want.shape == (len(LAYERS), len(seq), want.shape[-1])
        # The expected arrays were computed on another CPU: XLA:CPU's kernels (and so
        # the order of float32 sums) differ by instruction set, by up to ~20 ulps here.
        np.testing.assert_allclose(got[ident], want, rtol=1e-5, atol=5e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_old_model_dirs_and_exports_embed_alike(family, legacy):
    expected, sequences = legacy
    meta_dir = LEGACY / family / "checkpoints" / "1" / "metadata" / "metadata"
    assert "model_family" not in json.loads(meta_dir.read_text())  # the old format
    config, _, _, step = read_params(str(LEGACY / family), encoder_only=True)
    assert step == 1 and models.family_for(config).name == family
    _check(embed.load_model(str(LEGACY / family)), expected, sequences, f"{family}/model_dir")
    _check(embed.load_model(str(LEGACY / f"{family}_hf")), expected, sequences, f"{family}/hf")


@pytest.mark.parametrize("family", FAMILIES)
def test_old_model_dirs_export_the_same_tensors_and_old_exports_import(family, legacy,
                                                                       tmp_path):
    expected, sequences = legacy
    out = tmp_path / "hf"
    flags = ["--encoder_only"] if family == "t5" else []
    assert cli.main(["export-hf", "--model", str(LEGACY / family), "--output", str(out),
                     *flags]) == 0
    old = LEGACY / f"{family}_hf"
    for sub in [p.relative_to(old) for p in old.rglob("model.safetensors")]:
        new, before = load_file(out / sub), load_file(old / sub)
        assert set(new) == set(before)
        for name in before:
            np.testing.assert_array_equal(new[name], before[name], err_msg=name)
    assert json.loads((out / "config.json").read_text()) == \
        json.loads((old / "config.json").read_text())
    model_dir = tmp_path / "model"
    argv = ["import-hf", "--input", str(old), "--output", str(model_dir)]
    if family == "electra":
        argv += ["--generator", str(old / "generator")]
    if family != "t5":
        argv += ["--vocab_pad_to_multiple", "8"]
    assert cli.main(argv) == 0
    meta = read_params(str(model_dir), encoder_only=True)[2]
    assert meta["model_family"] == family
    _check(embed.load_model(str(model_dir)), expected, sequences, f"{family}/hf")
