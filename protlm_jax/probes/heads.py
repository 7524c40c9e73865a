"""The downstream heads of ProtTrans (REFERENCE.md §4) in Flax linen.

Each head maps features to a dict ``output name → logits``, so one loss and one
training loop serve them all:

  * :class:`SecondaryStructureCNN` (per residue): Conv(D→32, k7, pad 3) → ReLU
    → Dropout 0.25 → two parallel Conv(32→3, k7) and Conv(32→8, k7) giving
    ``ss3`` and ``ss8``.
  * :class:`PerProteinFNN` (per protein, on the mean-pooled embedding):
    Linear(D→32) → Dropout 0.25 → ReLU → Linear(32→n) (``location``) and
    Linear(32→2) (``membrane``).
  * :class:`LightAttention` (Stärk et al. 2021, per protein, on per-residue
    features): two Conv1d(D→D, k9), values and attention logits; softmax over
    the (masked) length; attention-weighted sum ⊕ max-pool → Linear(2D→32) →
    Dropout 0.25 → ReLU → BatchNorm → Linear(32→n) (plus Linear(32→2) for
    ``membrane`` when asked).

Padding never influences a real position: inputs are zeroed outside proteins,
the CNN zeroes its hidden layer at padding before the second convolution (the
published PyTorch code does not, so its outputs near a protein's end depend on
how much padding the batch adds), and light attention masks both the softmax
and the max-pool.

Shapes: B batch, L length, D feature size, C classes.
"""

from __future__ import annotations

from typing import Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

SS3_CLASSES = ("H", "E", "C")
SS8_CLASSES = ("H", "G", "I", "E", "B", "T", "S", "C")


class SecondaryStructureCNN(nn.Module):
    """ProtTrans's two-layer CNN for 3- and 8-state secondary structure.

    ``outputs``: (name, classes) of the parallel second convolutions (the
    fine-tuning heads give their own).
    """
    hidden: int = 32
    kernel: int = 7
    dropout: float = 0.25
    outputs: Tuple[Tuple[str, int], ...] = (("ss3", len(SS3_CLASSES)),
                                            ("ss8", len(SS8_CLASSES)))

    @nn.compact
    def __call__(self, x_BLD: Array, mask_BL: Array, *, train: bool = False) -> dict:
        pad = self.kernel // 2
        x_BLD = x_BLD * mask_BL[..., None].astype(x_BLD.dtype)
        h = nn.Conv(self.hidden, (self.kernel,), padding=[(pad, pad)], name="conv")(x_BLD)
        h = nn.relu(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h_BLH = h * mask_BL[..., None].astype(h.dtype)
        return {name: nn.Conv(size, (self.kernel,), padding=[(pad, pad)], name=name)(h_BLH)
                for name, size in self.outputs}


class PerProteinFNN(nn.Module):
    """ProtTrans's localization / membrane FNN on a pooled embedding [B, D]."""
    num_classes: int = 10
    hidden: int = 32
    dropout: float = 0.25
    membrane: bool = True

    @nn.compact
    def __call__(self, x_BD: Array, mask: Optional[Array] = None, *,
                 train: bool = False) -> dict:
        del mask  # pooled features have no length
        h = nn.Dense(self.hidden, name="hidden")(x_BD)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.relu(h)
        out = {"location": nn.Dense(self.num_classes, name="location")(h)}
        if self.membrane:
            out["membrane"] = nn.Dense(2, name="membrane")(h)
        return out


class LightAttention(nn.Module):
    """Light attention (Stärk et al. 2021) on per-residue features [B, L, D].

    ``conv_dropout`` is the dropout Stärk et al. apply to the value
    convolution's output; it adds no parameters.
    """
    num_classes: int = 10
    hidden: int = 32
    kernel: int = 9
    dropout: float = 0.25
    conv_dropout: float = 0.25
    membrane: bool = False

    @nn.compact
    def __call__(self, x_BLD: Array, mask_BL: Array, *, train: bool = False) -> dict:
        d = x_BLD.shape[-1]
        pad = self.kernel // 2
        x_BLD = x_BLD * mask_BL[..., None].astype(x_BLD.dtype)
        values = nn.Conv(d, (self.kernel,), padding=[(pad, pad)], name="values")(x_BLD)
        values = nn.Dropout(self.conv_dropout, deterministic=not train)(values)
        logits = nn.Conv(d, (self.kernel,), padding=[(pad, pad)], name="attention")(x_BLD)
        real = mask_BL[..., None].astype(bool)
        logits = jnp.where(real, logits, -1e9)
        weights = jax.nn.softmax(logits, axis=1)
        attended_BD = jnp.sum(values * weights, axis=1)
        pooled_BD = jnp.max(jnp.where(real, values, -jnp.inf), axis=1)
        pooled_BD = jnp.where(jnp.isfinite(pooled_BD), pooled_BD, 0.0)  # empty rows
        h = jnp.concatenate([attended_BD, pooled_BD], axis=-1)
        h = nn.Dense(self.hidden, name="hidden")(h)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.relu(h)
        h = nn.BatchNorm(use_running_average=not train, name="norm")(h)
        out = {"location": nn.Dense(self.num_classes, name="location")(h)}
        if self.membrane:
            out["membrane"] = nn.Dense(2, name="membrane")(h)
        return out


HEADS = ("cnn", "fnn", "light_attention")


def make_head(name: str, num_classes: int = 10, membrane: bool = True) -> nn.Module:
    """A head by name (``cnn``, ``fnn``, ``light_attention``)."""
    if name == "cnn":
        return SecondaryStructureCNN()
    if name == "fnn":
        return PerProteinFNN(num_classes=num_classes, membrane=membrane)
    if name == "light_attention":
        return LightAttention(num_classes=num_classes, membrane=membrane)
    raise ValueError(f"unknown head {name!r}; known: {HEADS}")


def per_residue(name: str) -> bool:
    """Whether a head reads per-residue features [B, L, D] (else pooled [B, D])."""
    return name in ("cnn", "light_attention")
