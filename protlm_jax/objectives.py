"""Loss and metric functions per model family, as sums over tokens.

Everything is returned as *sums* (and the count of target tokens) so that
gradient accumulation over microbatches and data-parallel reduction give
exactly the normalisation of one large batch: loss = Σ CE / Σ target tokens.

Shapes: B batch rows, T target length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp


def token_losses(logits_BxTxV, targets_BxT):
    """Per-token cross-entropy, log-normaliser and correctness (float32).

    Returns:
      (ce_BxT, log_z_BxT, correct_BxT): computed once per batch, then summed
      under as many weightings as needed (:func:`weighted_sums`).
    """
    logits = logits_BxTxV.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_BxT[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, axis=-1) == targets_BxT).astype(jnp.float32)
    return log_z - target_logit, log_z, correct


def weighted_sums(tokens, weights_BxT, z_loss: float = 0.0):
    """Sums of cross-entropy, z-loss and correct predictions under ``weights``.

    Args:
      tokens: the output of :func:`token_losses`.
      weights_BxT: 0/1 (or real) weights; padding has weight 0.
      z_loss: coefficient of the auxiliary ``log(Z)^2`` loss (T5X: 1e-4), which
        keeps the softmax normaliser near 1.

    Returns:
      dict of scalars: ``loss`` (Σ w·CE), ``z_loss`` (Σ w·z·logZ²), ``correct``,
      ``weight`` (Σ w), ``loss_sq`` (Σ w·CE², for the standard error).
    """
    ce, log_z, correct = tokens
    weights = weights_BxT.astype(jnp.float32)
    return {
        "loss": jnp.sum(ce * weights),
        "z_loss": jnp.sum(z_loss * jnp.square(log_z) * weights),
        "correct": jnp.sum(correct * weights),
        "weight": jnp.sum(weights),
        "loss_sq": jnp.sum(jnp.square(ce) * weights),
    }


@dataclasses.dataclass(frozen=True)
class EncDecObjective:
    """Teacher-forced seq2seq loss for T5 (ProtT5 denoising, span corruption).

    Attributes:
      z_loss: z-loss coefficient.
      first_sentinel_id: ids at or above this are sentinels (128 - 100 = 28).
      sentinel_aligned: targets align position-by-position with the inputs
        (ProtT5: the decoder rebuilds the whole sequence), so "masked" metrics
        are taken where the input holds a sentinel; otherwise (span
        corruption) every target token counts as masked.
    """

    z_loss: float = 1e-4
    first_sentinel_id: int = 28
    sentinel_aligned: bool = True

    def __call__(self, model, params, batch: Mapping[str, jax.Array], rng,
                 deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (Σ loss to differentiate, dict of metric sums)."""
        logits = model.apply(
            {"params": params},
            batch["encoder_input_tokens"], batch["decoder_input_tokens"],
            encoder_segment_ids=batch.get("encoder_segment_ids"),
            decoder_segment_ids=batch.get("decoder_segment_ids"),
            encoder_positions=batch.get("encoder_positions"),
            decoder_positions=batch.get("decoder_positions"),
            deterministic=deterministic, rngs={"dropout": rng})
        targets = batch["decoder_target_tokens"]
        weights = batch["decoder_loss_weights"]
        tokens = token_losses(logits, targets)
        sums = weighted_sums(tokens, weights, self.z_loss)
        if self.sentinel_aligned and (batch["encoder_input_tokens"].shape == targets.shape):
            masked = weights * (batch["encoder_input_tokens"] >= self.first_sentinel_id)
        else:
            masked = weights
        m = weighted_sums(tokens, masked)
        sums.update(masked_loss=m["loss"], masked_correct=m["correct"],
                    masked_weight=m["weight"], masked_loss_sq=m["loss_sq"])
        del sums["loss_sq"]
        return sums["loss"] + sums["z_loss"], sums


def finalize_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
    """Per-token means from sums (safe when a count is zero).

    With ``masked_loss_sq`` present, ``masked_loss_stderr`` is the standard
    error of the masked-token mean, sd(CE) / sqrt(N), treating tokens as
    independent (residues of one protein are not quite, so it is a floor).
    """
    def div(a, b):
        return float(a) / float(b) if float(b) else float("nan")

    out = {
        "loss": div(sums["loss"], sums["weight"]),
        "z_loss": div(sums["z_loss"], sums["weight"]),
        "accuracy": div(sums["correct"], sums["weight"]),
    }
    if "masked_weight" in sums:
        out["masked_loss"] = div(sums["masked_loss"], sums["masked_weight"])
        out["masked_accuracy"] = div(sums["masked_correct"], sums["masked_weight"])
        if "masked_loss_sq" in sums and float(sums["masked_weight"]) > 1:
            n = float(sums["masked_weight"])
            var = max(div(sums["masked_loss_sq"], n) - out["masked_loss"] ** 2, 0.0)
            out["masked_loss_stderr"] = math.sqrt(var * n / (n - 1) / n)
            out["masked_tokens"] = n
    return out
