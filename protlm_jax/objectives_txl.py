"""The Transformer-XL causal-LM objective (ProtTXL): a recurrent objective.

Batches come from the ``{corpus}_clm`` tasks (:func:`protlm_jax.data.pipeline.
column_segments`): ``inputs`` [B, S] (segment t of each row's token stream),
``targets`` (the next tokens) and ``weights``. Row b of step t + 1 continues
row b of step t, so the memory of a row is carried from step to step as the
*carry* of the train state (the trainer's general mechanism for recurrent
objectives: :meth:`CLMObjective.init_carry` gives its shape; ``__call__``
takes the carry and returns the next one). The loss is Σ CE over the
segment's tokens / their number.

Evaluation also scores the same segments without memory (``*_no_memory``)
and the per-row paired difference, so what memory is worth is a number with
a standard error (:meth:`CLMObjective.finalize_metrics`).

Shapes: B rows (columns), S segment length, L layers, M memory slots, D width.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp

from protlm_jax.objectives import finalize_metrics, token_losses, weighted_sums


@dataclasses.dataclass(frozen=True)
class CLMObjective:
    """Next-token cross-entropy over a segment, with the memory carried.

    Attributes:
      z_loss: coefficient of the auxiliary ``log(Z)^2`` loss (Transformer-XL: none).
      compare_without_memory: evaluation also scores each segment without
        memory (a second forward pass).
    """

    z_loss: float = 0.0
    compare_without_memory: bool = True

    def init_carry(self, model, rows: int, training: bool = True) -> dict:
        """The empty memory of ``rows`` streams: ``mems`` [B, L, M, D] and
        ``mem_valid`` [B] (0: nothing to attend to yet). M is the model's
        ``mem_len`` in training, ``inference_mem_len`` otherwise."""
        cfg = model.config
        m = cfg.mem_len if training else cfg.inference_mem_len
        return {"mems": jnp.zeros((rows, cfg.n_layer, m, cfg.d_model), cfg.activation_dtype),
                "mem_valid": jnp.zeros((rows,), jnp.int32)}

    def __call__(self, model, params, batch: Mapping[str, jax.Array], rng,
                 deterministic: bool, carry: Any = None):
        """Returns (Σ loss to differentiate, dict of metric sums, next carry)."""
        m = 0 if carry is None else int(carry["mems"].shape[2])
        mems = carry["mems"] if m else None
        valid = carry["mem_valid"] if m else None
        out = model.apply({"params": params}, batch["inputs"], mems, valid,
                          deterministic=deterministic, new_mem_len=m, rngs={"dropout": rng})
        targets, weights = batch["targets"], batch["weights"].astype(jnp.float32)
        tokens = token_losses(out["logits"], targets)
        sums = weighted_sums(tokens, weights, self.z_loss)
        sums.update(masked_loss=sums["loss"], masked_correct=sums["correct"],
                    masked_weight=sums["weight"], masked_loss_sq=sums.pop("loss_sq"))
        if deterministic and self.compare_without_memory and m:
            plain = model.apply({"params": params}, batch["inputs"], deterministic=True)
            ce0 = token_losses(plain["logits"], targets)[0]
            row_mem = jnp.sum(tokens[0] * weights, axis=1)
            row_plain = jnp.sum(ce0 * weights, axis=1)
            gain = row_plain - row_mem
            sums.update(loss_no_memory=jnp.sum(row_plain), gain_sq=jnp.sum(gain * gain),
                        gain_rows=jnp.sum((jnp.sum(weights, axis=1) > 0).astype(jnp.float32)))
        new_carry = carry
        if m:
            # Rows without data (a finite pass's padding) keep nothing.
            has = jnp.any(weights > 0, axis=1)
            new_carry = {"mems": out["mems"],
                         "mem_valid": jnp.where(has, out["mem_valid"], 0).astype(jnp.int32)}
        return sums["loss"] + sums["z_loss"], sums, new_carry

    def finalize_metrics(self, sums: Mapping[str, Any]) -> dict[str, float]:
        """Means plus ``perplexity`` (exp of the per-token loss), ``bits_per_residue``
        and, when scored, the same without memory, ``memory_gain`` (nats per
        token) and its standard error over rows (segments)."""
        out = finalize_metrics(sums)
        out["perplexity"] = math.exp(out["loss"]) if out["loss"] == out["loss"] else out["loss"]
        out["bits_per_residue"] = out["loss"] / math.log(2)
        if "loss_no_memory" in sums and float(sums["weight"]):
            w = float(sums["weight"])
            plain = float(sums["loss_no_memory"]) / w
            out["loss_no_memory"] = plain
            out["perplexity_no_memory"] = math.exp(plain)
            out["bits_per_residue_no_memory"] = plain / math.log(2)
            rows = float(sums["gain_rows"])
            total_gain = float(sums["loss_no_memory"]) - float(sums["loss"])
            out["memory_gain"] = total_gain / w
            if rows > 1:
                mean = total_gain / rows
                var = max(float(sums["gain_sq"]) / rows - mean * mean, 0.0) * rows / (rows - 1)
                out["memory_gain_stderr"] = math.sqrt(var * rows) / w
        return out
