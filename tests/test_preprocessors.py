"""Objective preprocessors: exact outputs on fixed masks and seeds, and
statistical properties over the real sample (hundreds of thousands of residues).
"""

import numpy as np
import pytest
import seqio
import tensorflow as tf
from seqio import test_utils

from protlm_jax.data import preprocessors as pp
from protlm_jax.data.vocabularies import ProtBertVocabulary, ProtT5Vocabulary

T5 = ProtT5Vocabulary()
BERT = ProtBertVocabulary()
# The first 20 residues of a real protein (sp|P69905, HBA_HUMAN, minus Met):
SEQ = "VLSPADKTNVKAAWGKVGAH"
T5_TOKENS = [T5.id_of(c) for c in SEQ]
BERT_TOKENS = [BERT.id_of(c) for c in SEQ]


def _one(features):
    return tf.data.Dataset.from_tensors(
        {k: tf.constant(v, tf.int32 if not isinstance(v, str) else tf.string)
         for k, v in features.items()})


# --- deterministic pieces, exact -----------------------------------------

def test_map_rare_residues_exact():
    ds = pp.map_rare_residues(_one({"sequence": "MUKZOBX"}))
    test_utils.assert_dataset(ds, [{"sequence": "MXKXXXX"}])


def test_prott5_inputs_from_mask_exact():
    tokens = tf.constant([3, 4, 5, 6, 7])
    mask = tf.constant([False, True, False, True, True])
    got = pp.prott5_inputs_from_mask(tokens, mask, 128).numpy().tolist()
    assert got == [3, 127, 5, 126, 125]


def test_replace_spans_with_sentinels_exact():
    tokens = tf.constant([10, 11, 12, 13, 14, 15, 16])
    mask = tf.constant([0, 0, 1, 1, 0, 0, 1]) > 0
    assert pp.replace_spans_with_sentinels(tokens, mask, 128).numpy().tolist() == [
        10, 11, 127, 14, 15, 126]
    assert pp.replace_spans_with_sentinels(tokens, ~mask, 128).numpy().tolist() == [
        127, 12, 13, 126, 16]


def test_bert_inputs_from_mask_exact():
    tokens = tf.constant([5, 6, 7, 8, 9])
    selected = tf.constant([True, True, True, False, False])
    action = tf.constant([0, 1, 2, 0, 1])
    random_tokens = tf.constant([20, 21, 22, 23, 24])
    got = pp.bert_inputs_from_mask(tokens, selected, action, random_tokens, 4)
    assert got.numpy().tolist() == [4, 21, 7, 8, 9]


def test_random_crop_leaves_short_sequences_alone():
    ds = pp.random_crop(_one({"targets": T5_TOKENS}), {"targets": 21})
    test_utils.assert_dataset(ds, [{"targets": T5_TOKENS}])


# --- random preprocessors: golden outputs under a fixed seed --------------

def test_prott5_denoise_golden():
    with seqio.utils.map_seed_manager(7):
        ds = pp.prott5_denoise(_one({"targets": T5_TOKENS}))
    inputs = list(T5_TOKENS)
    inputs[3], inputs[16], inputs[19] = 127, 126, 125  # round(0.15·20) = 3
    test_utils.assert_dataset(ds, [{"targets": T5_TOKENS, "inputs": inputs}])


def test_t5_span_corruption_golden():
    with seqio.utils.map_seed_manager(7):
        ds = pp.t5_span_corruption(_one({"targets": T5_TOKENS}))
    # 3 noise tokens in round(3/3) = 1 span; here the last three residues.
    test_utils.assert_dataset(ds, [{"inputs": T5_TOKENS[:17] + [127],
                                    "targets": [127] + T5_TOKENS[17:]}])


def test_bert_mlm_golden():
    with seqio.utils.map_seed_manager(7):
        ds = pp.bert_mlm(_one({"targets": BERT_TOKENS}))
    targets = [2] + BERT_TOKENS + [3]
    inputs = list(targets)
    inputs[4] = inputs[20] = 4  # [MASK]; position 17 is scored but unchanged.
    weights = [0] * 22
    weights[4] = weights[17] = weights[20] = 1
    test_utils.assert_dataset(ds, [{"inputs": inputs, "targets": targets,
                                    "mlm_weights": weights}])


def test_random_crop_golden():
    with seqio.utils.map_seed_manager(7):
        ds = pp.random_crop(_one({"targets": T5_TOKENS}), {"targets": 9})
    test_utils.assert_dataset(ds, [{"targets": T5_TOKENS[1:9]}])


# --- masks -----------------------------------------------------------------

@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 20, 100, 511, 1000])
def test_exact_rate_mask_counts(n):
    mask = pp.exact_rate_mask(tf.constant(n), 0.15, tf.constant([1, 2])).numpy()
    expected = 0 if n < 2 else min(max(round(0.15 * n), 1), n - 1)
    assert mask.shape == (n,) and mask.sum() == expected
    capped = pp.exact_rate_mask(tf.constant(n), 0.15, tf.constant([1, 2]), max_count=100)
    assert capped.numpy().sum() == min(expected, 100)


@pytest.mark.parametrize("n", [2, 3, 10, 64, 511])
def test_random_spans_noise_mask(n):
    for s in range(5):
        mask = pp.random_spans_noise_mask(tf.constant(n), 0.15, 3.0,
                                          tf.constant([s, n])).numpy()
        noise = min(max(round(0.15 * n), 1), n - 1)
        assert mask.sum() == noise and not mask[0]
        starts = np.sum(mask[1:] & ~mask[:-1])
        assert starts == min(max(round(noise / 3), 1), noise, n - noise)


# --- properties over the real sample ---------------------------------------

LENGTHS = {"inputs": 512, "targets": 512}


def _examples(task_name, prepared_sample):
    import protlm_tasks  # noqa: F401

    task = seqio.get_mixture_or_task(task_name)
    ds = task.get_dataset(LENGTHS, split="train", shuffle=False, seed=123)
    return list(ds.as_numpy_iterator())


def _cleaned_tokens(vocab, seq):
    return np.array(vocab.encode(seq.translate(str.maketrans("UZOB", "XXXX"))))


def test_prott5_task_properties(prepared_sample, sample_records):
    examples = _examples("uniprot_sample_prott5", prepared_sample)
    by_id = dict(sample_records)
    residues = masked = 0
    for ex in examples:
        inputs, targets = ex["inputs"], ex["targets"]
        assert targets[-1] == 1 and inputs[-1] == 1 and len(inputs) == len(targets)
        body = targets[:-1]
        original = _cleaned_tokens(T5, by_id[ex["id"].decode()])
        if len(original) <= 511:
            np.testing.assert_array_equal(body, original)  # the whole sequence
        else:  # a random window of it
            assert len(body) == 511
            windows = np.lib.stride_tricks.sliding_window_view(original, 511)
            assert (windows == body).all(axis=1).any()
        sentinel = inputs[:-1] >= 28
        ids = inputs[:-1][sentinel]
        assert len(set(ids.tolist())) == len(ids)  # unique within the example
        np.testing.assert_array_equal(ids, 127 - np.arange(len(ids)))  # in order
        np.testing.assert_array_equal(inputs[:-1][~sentinel], body[~sentinel])
        residues += len(body)
        masked += sentinel.sum()
    assert residues > 10_000
    assert abs(masked / residues - 0.15) < 0.01


def test_span_corruption_task_properties(prepared_sample):
    examples = _examples("uniprot_sample_t5_span_corruption", prepared_sample)
    residues = noise = 0
    for ex in examples:
        inputs, targets = ex["inputs"][:-1], ex["targets"][:-1]
        in_sent, tg_sent = inputs[inputs >= 28], targets[targets >= 28]
        # Each noise span in inputs has its sentinel announcing it in targets.
        np.testing.assert_array_equal(in_sent, 127 - np.arange(len(in_sent)))
        np.testing.assert_array_equal(tg_sent, 127 - np.arange(len(tg_sent)))
        assert len(tg_sent) in (len(in_sent), len(in_sent) + 1)
        n_noise = np.sum(targets < 28)
        residues += np.sum(inputs < 28) + n_noise
        noise += n_noise
    assert residues > 10_000
    assert abs(noise / residues - 0.15) < 0.01


def test_mlm_task_properties(prepared_sample):
    examples = _examples("uniprot_sample_mlm", prepared_sample)
    residues = scored = masked = randomised = unchanged = 0
    for ex in examples:
        inputs, targets, w = ex["inputs"], ex["targets"], ex["mlm_weights"].astype(bool)
        assert inputs[0] == targets[0] == 2 and inputs[-1] == targets[-1] == 3
        assert not w[0] and not w[-1]
        np.testing.assert_array_equal(inputs[~w], targets[~w])  # unscored untouched
        assert np.all((targets[1:-1] >= 5) & (targets[1:-1] <= 29))
        s_in, s_tg = inputs[w], targets[w]
        residues += len(inputs) - 2
        scored += w.sum()
        masked += np.sum(s_in == 4)
        changed = (s_in != 4) & (s_in != s_tg)
        assert np.all((s_in[changed] >= 5) & (s_in[changed] <= 24))  # standard residues
        randomised += changed.sum()
        unchanged += np.sum(s_in == s_tg)
    assert residues > 10_000
    assert abs(scored / residues - 0.15) < 0.01
    assert abs(masked / scored - 0.80) < 0.02
    # A random residue equals the original 1 time in 20: 9.5 % changed, 10.5 % same.
    assert abs(randomised / scored - 0.10) < 0.02
    assert abs(unchanged / scored - 0.10) < 0.02
