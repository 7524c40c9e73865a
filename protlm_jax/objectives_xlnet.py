"""The XLNet permutation-LM objective (ProtXLNet).

Batches come from the ``{corpus}_plm`` tasks through ``PLMFeatureConverter``:
``encoder_input_tokens`` (``residues <sep> <cls>``, zero-padded),
``encoder_perm_index`` (``rev_index + 2`` of zihangdai/xlnet ``_local_perm``:
1 for visible context, ``rank + 2`` for masked and functional tokens, 0 for
padding) and ``encoder_target_positions`` (position + 1 of each target, 0 for
an empty slot). On the device they become XLNet's inputs:

* ``perm_mask[b, i, j] = 1`` (i cannot attend j) iff ``self_rank[i] <=
  rank[j]`` and j is masked or functional, where ``self_rank`` is the rank for
  targets and rank + 1 for the others (targets do not see themselves);
* ``target_mapping[b, m] = one_hot(position_m)`` (zero for empty slots);
* token types 0, and 2 at ``<cls>`` (the XLNet tokenizer's);
* the target of slot m is the token at its position (the current token).

The loss is Σ CE over the targets / number of targets (the trainer divides
the sums by ``weight``).

Shapes: B batch rows, L length, M target slots (``num_predict``), V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import jax
import jax.numpy as jnp

from protlm_jax.objectives import token_losses, weighted_sums


def perm_mask(perm_index_BL: jax.Array, target_positions_BM: jax.Array) -> jax.Array:
    """[B, L, L] float32 ``perm_mask`` (1 = cannot attend) from the features."""
    rev = perm_index_BL.astype(jnp.int32) - 2
    length = perm_index_BL.shape[1]
    pos = target_positions_BM.astype(jnp.int32) - 1
    is_target = jnp.any(pos[:, :, None] == jnp.arange(length)[None, None, :], axis=1)
    self_rev = jnp.where(is_target, rev, rev + 1)
    blocked = (self_rev[:, :, None] <= rev[:, None, :]) & (rev[:, None, :] >= 0)
    return blocked.astype(jnp.float32)


def target_mapping(target_positions_BM: jax.Array, length: int) -> jax.Array:
    """[B, M, L] float32 one-hot rows of the targets (empty slots: zero rows)."""
    pos = target_positions_BM.astype(jnp.int32) - 1
    return jax.nn.one_hot(pos, length, dtype=jnp.float32)  # -1 -> all zeros


def model_inputs(batch: Mapping[str, jax.Array], cls_id: int) -> dict:
    """The XLNet call's arguments (HF names) for a PLM batch."""
    tokens = batch["encoder_input_tokens"]
    perm = batch["encoder_perm_index"]
    targets = batch["encoder_target_positions"]
    return dict(input_ids=tokens, attention_mask=(perm > 0).astype(jnp.int32),
                perm_mask=perm_mask(perm, targets),
                target_mapping=target_mapping(targets, tokens.shape[1]),
                token_type_ids=jnp.where(tokens == cls_id, 2, 0).astype(jnp.int32))


@dataclasses.dataclass(frozen=True)
class PLMObjective:
    """XLNet permutation-LM cross-entropy at the target positions (query stream).

    ``masked_*`` repeats the loss (every target is a predicted residue), so
    the trainer's summary line reads as for the other families.

    Attributes:
      cls_id: the ``<cls>`` id (token type 2).
      z_loss: coefficient of the auxiliary ``log(Z)^2`` loss (XLNet: none).
    """

    cls_id: int = 3
    z_loss: float = 0.0

    def __call__(self, model, params, batch: Mapping[str, jax.Array], rng,
                 deterministic: bool) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Returns (Σ loss to differentiate, dict of metric sums)."""
        inputs = model_inputs(batch, self.cls_id)
        out = model.apply({"params": params}, **inputs, deterministic=deterministic,
                          rngs={"dropout": rng})
        pos = batch["encoder_target_positions"].astype(jnp.int32) - 1
        targets = jnp.take_along_axis(batch["encoder_input_tokens"], jnp.maximum(pos, 0), axis=1)
        tokens = token_losses(out["logits"], targets)
        sums = weighted_sums(tokens, (pos >= 0).astype(jnp.float32), self.z_loss)
        sums.update(masked_loss=sums["loss"], masked_correct=sums["correct"],
                    masked_weight=sums["weight"], masked_loss_sq=sums.pop("loss_sq"))
        return sums["loss"] + sums["z_loss"], sums
