"""Objective sums: the masked-residue loss, its standard error and the
normalisation by target tokens, on real sequences with ProtT5 masking."""

import numpy as np

from protlm_jax import objectives
from protlm_jax.data.vocabularies import ProtT5Vocabulary

from conftest import read_sample_records


def _batch(rows=4, length=48, seed=0):
    vocab = ProtT5Vocabulary()
    rng = np.random.default_rng(seed)
    targets = np.zeros((rows, length), np.int32)
    inputs = np.zeros((rows, length), np.int32)
    for row, (_, seq) in enumerate(read_sample_records(limit=rows)):
        ids = np.asarray(vocab.encode(seq), np.int32)[:length - 1]
        n = len(ids)
        masked = ids.copy()
        chosen = np.sort(rng.choice(n, size=max(1, round(0.15 * n)), replace=False))
        masked[chosen] = vocab.vocab_size - 1 - np.arange(len(chosen))
        targets[row, :n], targets[row, n] = ids, vocab.eos_id
        inputs[row, :n], inputs[row, n] = masked, vocab.eos_id
    return inputs, targets


def test_masked_loss_and_stderr_match_numpy():
    inputs, targets = _batch()
    logits = np.random.default_rng(1).normal(size=targets.shape + (128,)).astype(np.float32)
    tokens = objectives.token_losses(logits, targets)
    weights = (targets != 0).astype(np.float32)
    masked = weights * (inputs >= 28)
    sums = objectives.weighted_sums(tokens, weights, z_loss=1e-4)
    m = objectives.weighted_sums(tokens, masked)
    metrics = objectives.finalize_metrics(dict(
        sums, masked_loss=m["loss"], masked_correct=m["correct"],
        masked_weight=m["weight"], masked_loss_sq=m["loss_sq"]))

    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ce = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
    picked = ce[masked > 0]
    assert metrics["masked_tokens"] == len(picked) > 20
    np.testing.assert_allclose(metrics["loss"], ce[weights > 0].mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["masked_loss"], picked.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["masked_loss_stderr"],
                               picked.std(ddof=1) / np.sqrt(len(picked)), rtol=1e-3)
