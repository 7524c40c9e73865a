"""Optimizers and learning-rate schedules (optax), T5X defaults.

* Adafactor as T5X configures it for T5 pretraining: factored second moments,
  decay rate 0.8, update clipping 1.0, step size scaled by the parameter RMS,
  no momentum (optax's defaults match).
* AdamW with decoupled weight decay (not applied to norms or biases).
* LAMB (the ProtBert/ProtAlbert/ProtElectra recipe), same weight-decay mask.
* Schedules: T5X's ``constant * rsqrt_decay`` (``base / sqrt(max(step, warmup))``),
  linear warm-up + linear decay, and linear warm-up + cosine decay.
* SGD with momentum (exactness tests, probes).
* Optional global-norm gradient clipping in front of any optimizer.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import jax.numpy as jnp
import optax


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """A learning-rate schedule.

    Attributes:
      name: "rsqrt" (T5X: ``base / sqrt(max(step, warmup_steps))``), "linear"
        or "cosine" (warm up linearly to ``base`` then decay to
        ``base * end_fraction`` at ``total_steps``), or "constant".
      base: the peak learning rate (1.0 for T5X's Adafactor rsqrt schedule, which
        then peaks at 1/sqrt(warmup)).
      warmup_steps: warm-up length.
      total_steps: schedule length (linear/cosine).
      end_fraction: final rate as a fraction of ``base`` (linear/cosine).
    """

    name: str = "rsqrt"
    base: float = 1.0
    warmup_steps: int = 10_000
    total_steps: int = 100_000
    end_fraction: float = 0.0


def make_schedule(config: ScheduleConfig) -> optax.Schedule:
    """The optax schedule for ``config``."""
    base, warmup = config.base, max(config.warmup_steps, 0)
    if config.name == "constant":
        return optax.constant_schedule(base)
    if config.name == "rsqrt":
        def rsqrt(step):
            return base / jnp.sqrt(jnp.maximum(step, max(warmup, 1)).astype(jnp.float32))
        return rsqrt
    if config.name in ("linear", "cosine"):
        decay_steps = max(config.total_steps - warmup, 1)
        if config.name == "linear":
            decay = optax.linear_schedule(base, base * config.end_fraction, decay_steps)
        else:
            decay = optax.cosine_decay_schedule(base, decay_steps, alpha=config.end_fraction)
        if warmup == 0:
            return decay
        return optax.join_schedules(
            [optax.linear_schedule(0.0, base, warmup), decay], [warmup])
    raise ValueError(f"unknown schedule {config.name!r} (rsqrt, linear, cosine, constant)")


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
    """An optimizer.

    Attributes:
      name: "adafactor", "adamw", "lamb" or "sgd" (momentum ``b1``; its update is linear
        in the gradient, which makes it the optimizer of exactness tests).
      schedule: the learning-rate schedule.
      weight_decay: AdamW/LAMB decoupled weight decay (matrices and embeddings only).
      b1, b2, eps: AdamW/LAMB moments.
      decay_rate: Adafactor second-moment decay exponent (T5X: 0.8).
      clipping_threshold: Adafactor update clipping (T5X: 1.0).
      grad_clip_norm: clip gradients to this global norm first (None: off).
    """

    name: str = "adafactor"
    schedule: ScheduleConfig = ScheduleConfig()
    weight_decay: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    decay_rate: float = 0.8
    clipping_threshold: Optional[float] = 1.0
    grad_clip_norm: Optional[float] = None


def _decay_mask(params):
    # Decay weight matrices and embeddings, not 1-D scales such as layer norms,
    # nor biases of any rank (XLNet's per-head r_w_bias/r_r_bias/r_s_bias [N, K]).
    import jax

    def decayed(path, p):
        names = "/".join(str(getattr(k, "key", k)) for k in path)
        return p.ndim >= 2 and "bias" not in names.rsplit("/", 1)[-1]

    return jax.tree_util.tree_map_with_path(decayed, params)


def make_optimizer(config: OptimizerConfig) -> optax.GradientTransformation:
    """The optax transformation for ``config`` (with its schedule)."""
    schedule = make_schedule(config.schedule)
    if config.name == "adafactor":
        opt = optax.adafactor(learning_rate=schedule, decay_rate=config.decay_rate,
                              clipping_threshold=config.clipping_threshold,
                              multiply_by_parameter_scale=True)
    elif config.name == "sgd":
        opt = optax.sgd(schedule, momentum=config.b1 or None)
    elif config.name == "adamw":
        opt = optax.adamw(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                          weight_decay=config.weight_decay, mask=_decay_mask)
    elif config.name == "lamb":
        # ProtBert/ProtAlbert/ProtElectra (BERT's recipe): layer-wise trust
        # ratio, decoupled weight decay off for biases and LayerNorm params.
        opt = optax.lamb(schedule, b1=config.b1, b2=config.b2, eps=config.eps,
                         weight_decay=config.weight_decay, mask=_decay_mask)
    else:
        raise ValueError(f"unknown optimizer {config.name!r} (adafactor, adamw, lamb, sgd)")
    if config.grad_clip_norm:
        opt = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), opt)
    return opt
