"""seqio tasks: registration, data location, packing converters, offline cache."""

import os
import subprocess
import sys

import numpy as np
import seqio

import protlm_tasks  # noqa: F401  (registers the tasks)
from protlm_jax.data import sources as data_sources
from protlm_jax.data.feature_converters import MLMFeatureConverter

# Long rows: most real proteins are longer than 256, so shorter rows rarely pack.
LENGTHS = {"inputs": 1024, "targets": 1024}


def test_every_corpus_and_objective_is_registered():
    for corpus in ("uniref50", "uniref100", "bfd"):
        for objective in ("prott5", "t5_span_corruption", "mlm"):
            task = seqio.get_mixture_or_task(f"{corpus}_{objective}")
            vocab = task.output_features["inputs"].vocabulary
            assert vocab.vocab_size == (30 if objective == "mlm" else 128)


def test_data_location_is_one_setting(monkeypatch):
    task = seqio.get_mixture_or_task("uniref50_prott5")
    patterns = task.source._split_to_filepattern  # resolved at every lookup
    monkeypatch.setenv("PROTLM_DATA_DIR", "gs://bucket/protlm")
    assert patterns["train"] == "gs://bucket/protlm/uniref50/train.tfrecord-*"
    data_sources.set_data_dir("/local/data")
    try:
        assert patterns["validation"] == "/local/data/uniref50/validation.tfrecord-*"
    finally:
        data_sources.set_data_dir(None)
    monkeypatch.setenv("PROTLM_DATA_DIR_UNIREF50", "/elsewhere")
    assert patterns["train"] == "/elsewhere/train.tfrecord-*"


def _batches(task, converter, prepared_sample, n=3):
    ds = seqio.get_dataset(task, LENGTHS, dataset_split="train", shuffle=False,
                           feature_converter=converter, seed=5)
    return list(ds.take(n).as_numpy_iterator())


def test_prott5_packing(prepared_sample):
    batches = _batches("uniprot_sample_prott5", seqio.EncDecFeatureConverter(pack=True),
                       prepared_sample, n=16)
    assert max(b["encoder_segment_ids"].max() for b in batches) >= 2  # rows are shared
    for ex in batches:
        seg = ex["encoder_segment_ids"]
        # Each packed protein ends with EOS, in inputs and in targets.
        for s in range(1, seg.max() + 1):
            assert ex["encoder_input_tokens"][seg == s][-1] == 1
            assert ex["decoder_target_tokens"][ex["decoder_segment_ids"] == s][-1] == 1
        # Decoder inputs are targets shifted right within each segment (start 0).
        starts = ex["decoder_positions"] == 0
        assert np.all(ex["decoder_input_tokens"][starts & (ex["decoder_segment_ids"] > 0)] == 0)


def test_span_corruption_packing(prepared_sample):
    batches = _batches("uniprot_sample_t5_span_corruption",
                       seqio.EncDecFeatureConverter(pack=True), prepared_sample, n=16)
    assert max(b["decoder_segment_ids"].max() for b in batches) >= 2
    for ex in batches:  # span-corruption targets are short: rows fill up with several
        assert np.mean(ex["decoder_target_tokens"] != 0) < np.mean(
            ex["encoder_input_tokens"] != 0)


def test_mlm_packing_scores_exactly_the_chosen_positions(prepared_sample):
    plain = seqio.get_mixture_or_task("uniprot_sample_mlm").get_dataset(
        LENGTHS, split="train", shuffle=False, seed=5)
    first = next(plain.as_numpy_iterator())
    batches = _batches("uniprot_sample_mlm", MLMFeatureConverter(pack=True),
                       prepared_sample, n=16)
    assert max(b["encoder_segment_ids"].max() for b in batches) >= 2
    ex = batches[0]
    seg = ex["encoder_segment_ids"]
    n = len(first["inputs"])
    np.testing.assert_array_equal(ex["encoder_input_tokens"][:n], first["inputs"])
    np.testing.assert_array_equal(ex["encoder_loss_weights"][:n], first["mlm_weights"])
    # Random and unchanged scored positions count too, not only [MASK].
    scored = ex["encoder_loss_weights"] == 1
    assert np.any(scored & (ex["encoder_input_tokens"] != 4))
    assert not np.any(ex["encoder_loss_weights"][seg == 0])


def test_offline_cache_with_seqio_cache_tasks(prepared_sample, tmp_path):
    root, _ = prepared_sample
    cache = tmp_path / "cache"
    env = dict(os.environ, PROTLM_DATA_DIR=str(root))
    proc = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "seqio_cache_tasks"),
         "--module_import=protlm_tasks", "--tasks=uniprot_sample_prott5",
         f"--output_cache_dir={cache}", "--min_shards=2"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    seqio.add_global_cache_dirs([str(cache)])
    task = seqio.get_mixture_or_task("uniprot_sample_prott5")
    assert task.cache_dir
    runs = [list(task.get_dataset(LENGTHS, split="validation", use_cached=True,
                                  shuffle=False, seed=seed).as_numpy_iterator())
            for seed in (1, 2)]
    uncached = list(task.get_dataset(LENGTHS, split="validation", shuffle=False,
                                     seed=1).as_numpy_iterator())
    assert len(runs[0]) == len(uncached) > 50
    # Cached tokens are the same proteins; masking still happens after the cache.
    assert sorted(e["id"] for e in runs[0]) == sorted(e["id"] for e in uncached)
    differs = [not np.array_equal(a["inputs"], b["inputs"])
               for a, b in zip(runs[0], runs[1])]
    assert any(differs)


def test_a_finite_pass_keeps_every_example(prepared_sample):
    """Eval batches that do not divide the split are padded with zero rows,
    over two data shards, so no held-out protein is dropped."""
    from protlm_jax.data import pipeline as data_pipeline

    _, stats = prepared_sample
    config = data_pipeline.DataConfig(
        task="uniprot_sample_prott5", feature_lengths={"inputs": 64, "targets": 64},
        split="validation", pack=False, shuffle=False, num_data_shards=2)
    rows = [b for b in data_pipeline.batches(config, 24, seed=0, num_epochs=1)]
    assert all(b["decoder_target_tokens"].shape == (24, 64) for b in rows)
    real = sum(int((b["decoder_target_tokens"] != 0).any(axis=1).sum()) for b in rows)
    assert real == stats["splits"]["validation"]
    assert len(rows) * 24 > real  # the split does not fill whole batches
