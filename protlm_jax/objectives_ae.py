"""Objectives of the auto-encoder family: masked LM and replaced-token detection.

Each is its own callable with the trainer's protocol (as
:class:`protlm_jax.objectives.EncDecObjective`)::

    objective(model, params, batch, rng, deterministic) -> (Σ loss, dict of sums)

returning *sums* plus ``weight``, the count the trainer divides the gradient
by, so gradient accumulation and data parallelism normalise exactly as one
large batch. Batches come from the ``{corpus}_mlm`` tasks through
``MLMFeatureConverter``: ``encoder_input_tokens`` (corrupted, ``[CLS] seq
[SEP]``), ``encoder_target_tokens`` (original) and ``encoder_loss_weights``
(1 at the scored 15 %: BERT's 80 % ``[MASK]`` / 10 % random / 10 % unchanged),
plus ``encoder_segment_ids``/``encoder_positions`` when packed.

Shapes: B batch rows, L length, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from protlm_jax.objectives import finalize_metrics as base_finalize_metrics
from protlm_jax.objectives import token_losses, weighted_sums


def _encoder_kwargs(batch: Mapping[str, jax.Array]) -> dict:
    return dict(encoder_segment_ids=batch.get("encoder_segment_ids"),
                encoder_positions=batch.get("encoder_positions"))


def _real_tokens(batch: Mapping[str, jax.Array], pad_id: int) -> jax.Array:
    """1 at real (non-padding) positions: packed rows by segment, else by id."""
    if batch.get("encoder_segment_ids") is not None:
        return (batch["encoder_segment_ids"] > 0).astype(jnp.float32)
    return (batch["encoder_target_tokens"] != pad_id).astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class MLMObjective:
    """BERT/ALBERT masked-LM cross-entropy at the scored positions.

    ``loss``/``weight`` is the mean cross-entropy over the scored positions
    (``encoder_loss_weights``); ``masked_*`` repeats it (every scored position
    is a corrupted one), so the trainer's summary line reads as for ProtT5.

    Attributes:
      z_loss: coefficient of the auxiliary ``log(Z)^2`` loss (BERT: none).
    """

    z_loss: float = 0.0

    def __call__(self, model, params, batch: Mapping[str, jax.Array], rng,
                 deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (Σ loss to differentiate, dict of metric sums)."""
        logits_BxLxV = model.apply({"params": params}, batch["encoder_input_tokens"],
                                   **_encoder_kwargs(batch), deterministic=deterministic,
                                   rngs={"dropout": rng})
        tokens = token_losses(logits_BxLxV, batch["encoder_target_tokens"])
        sums = weighted_sums(tokens, batch["encoder_loss_weights"], self.z_loss)
        sums.update(masked_loss=sums["loss"], masked_correct=sums["correct"],
                    masked_weight=sums["weight"], masked_loss_sq=sums.pop("loss_sq"))
        return sums["loss"] + sums["z_loss"], sums


@dataclasses.dataclass(frozen=True)
class ElectraObjective:
    """ELECTRA: generator MLM + ``rtd_weight`` x discriminator replaced-token detection.

    The generator (``model.generator_logits``) predicts the scored positions
    of the MLM input; at those positions a token is sampled from its softmax
    (Gumbel-max via ``jax.random.categorical`` with a key split from the step
    rng, under ``stop_gradient``: no gradient flows through sampling). The
    discriminator (``model.discriminator_logits``) sees the original sequence
    with the sampled tokens in place and classifies every real position as
    replaced (sampled token != original) or not, with a sigmoid
    cross-entropy. As in the ELECTRA paper the objective is

        mean_scored(CE_gen) + rtd_weight * mean_tokens(BCE_disc),  rtd_weight = 50.

    The trainer divides by ``weight`` = the number of scored positions, so
    the discriminator sum is scaled by (scored / real tokens) of the batch
    (the whole batch; with gradient accumulation, of each microbatch).

    Metric sums: ``loss`` (the objective above x scored count), ``correct``
    and ``masked_*`` (generator MLM), ``disc_loss``, ``disc_correct``,
    ``disc_weight`` (real tokens) and ``replaced`` (positions whose sample
    differs from the original).
    """

    rtd_weight: float = 50.0
    pad_id: int = 0

    def __call__(self, model, params, batch: Mapping[str, jax.Array], rng,
                 deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (Σ loss to differentiate, dict of metric sums)."""
        gen_rng, sample_rng, disc_rng = jax.random.split(rng, 3)
        inputs = batch["encoder_input_tokens"]
        targets = batch["encoder_target_tokens"]
        scored = batch["encoder_loss_weights"].astype(jnp.float32)
        kwargs = _encoder_kwargs(batch)

        gen_logits_BxLxV = model.apply({"params": params}, inputs, **kwargs,
                                       deterministic=deterministic, rngs={"dropout": gen_rng},
                                       method="generator_logits")
        gen = weighted_sums(token_losses(gen_logits_BxLxV, targets), scored)

        sampled = jax.random.categorical(
            sample_rng, jax.lax.stop_gradient(gen_logits_BxLxV).astype(jnp.float32), axis=-1)
        fake_BxL = jnp.where(scored > 0, sampled.astype(targets.dtype), targets)
        replaced_BxL = (fake_BxL != targets).astype(jnp.float32)

        disc_logits_BxL = model.apply({"params": params}, fake_BxL, **kwargs,
                                      deterministic=deterministic, rngs={"dropout": disc_rng},
                                      method="discriminator_logits").astype(jnp.float32)
        real = _real_tokens(batch, self.pad_id)
        bce = (jnp.maximum(disc_logits_BxL, 0) - disc_logits_BxL * replaced_BxL
               + jnp.log1p(jnp.exp(-jnp.abs(disc_logits_BxL))))
        disc_loss = jnp.sum(bce * real)
        disc_correct = jnp.sum(((disc_logits_BxL > 0) == (replaced_BxL > 0)) * real)
        n_real = jnp.sum(real)
        scale = self.rtd_weight * gen["weight"] / jnp.maximum(n_real, 1.0)
        total = gen["loss"] + scale * disc_loss
        sums = {
            "loss": total, "z_loss": jnp.zeros_like(total), "correct": gen["correct"],
            "weight": gen["weight"], "masked_loss": gen["loss"],
            "masked_correct": gen["correct"], "masked_weight": gen["weight"],
            "masked_loss_sq": gen["loss_sq"], "disc_loss": disc_loss, "disc_correct": disc_correct, "disc_weight": n_real,
            "replaced": jnp.sum(replaced_BxL * real),
        }
        return total, sums

    def finalize_metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        """Means of the sums, the discriminator's included (the trainer calls this)."""
        return finalize_metrics(sums)


def finalize_metrics(sums: Mapping[str, Any]) -> dict[str, float]:
    """Per-token means, including the discriminator's when present.

    ``objectives.finalize_metrics`` plus ``disc_loss``, ``disc_accuracy`` and
    ``replaced_fraction`` (of real tokens) for :class:`ElectraObjective` sums.
    """
    out = base_finalize_metrics(sums)
    if "disc_weight" in sums:
        n = float(sums["disc_weight"])
        out["disc_loss"] = float(sums["disc_loss"]) / n if n else float("nan")
        out["disc_accuracy"] = float(sums["disc_correct"]) / n if n else float("nan")
        out["replaced_fraction"] = float(sums["replaced"]) / n if n else float("nan")
    return out
