"""Model families of protlm-jax (Flax linen) and their registry.

Each family defines its :class:`~protlm_jax.models.family.Family` record next to
its network (``t5.FAMILY``, ``bert.BERT_FAMILY``/``bert.ALBERT_FAMILY``,
``electra.FAMILY``); ``FAMILIES`` below is the one place they are registered.
Library code outside ``models/`` (and the families' own Hugging Face modules)
looks a family up here — by name, by config or by Hugging Face ``model_type``
— and never branches on a family name or config class.

Shape legend: B batch, L/T lengths, D embed, H heads, K d_kv, F mlp, V vocab.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

from protlm_jax.errors import ProtlmError
from protlm_jax.models import bert, electra, t5, txl, xlnet
from protlm_jax.models.family import EncoderView, Family, LoraTarget, TokenLayout

# The registry: one line per family.
FAMILIES: Dict[str, Family] = {f.name: f for f in (
    t5.FAMILY,
    bert.BERT_FAMILY,
    bert.ALBERT_FAMILY,
    electra.FAMILY,
    xlnet.FAMILY,
    txl.FAMILY,
)}

__all__ = ["FAMILIES", "Family", "EncoderView", "LoraTarget", "TokenLayout", "lookup", "family_for",
           "family_for_hf", "build_model", "config_from_dict"]


def lookup(name: str) -> Family:
    """The family registered as ``name``.

    Raises:
      ProtlmError: no such family.
    """
    try:
        return FAMILIES[name]
    except KeyError:
        raise ProtlmError(f"unknown model family {name!r} (known: "
                          f"{', '.join(FAMILIES)})") from None


def family_for(config: Any) -> Family:
    """The family of a model config (``config.family`` names it)."""
    fam = FAMILIES.get(getattr(config, "family", None))
    if fam is None or not fam.accepts(config):
        raise TypeError(f"no model family for config {type(config).__name__}"
                        f"(family={getattr(config, 'family', None)!r})")
    return fam


def family_for_hf(model_type: str, where: str = "config.json") -> Family:
    """The family reading Hugging Face checkpoints of ``model_type``."""
    for fam in FAMILIES.values():
        if model_type in fam.hf_model_types:
            return fam
    known = sorted(t for f in FAMILIES.values() for t in f.hf_model_types)
    raise ProtlmError(f"{where}: model_type {model_type!r} is not supported "
                      f"({', '.join(known)})")


def build_model(config: Any):
    """The Flax module for a model config and the batch features its ``init`` takes.

    Returns:
      (module, init_inputs): ``init_inputs`` names the features, in order.
    """
    return family_for(config).build(config)


def _guess_family(fields: Mapping[str, Any]) -> str:
    """The family of a checkpoint written before metadata stored ``model_family``
    (from which fields its config has)."""
    if "discriminator" in fields or "generator" in fields:
        return "electra"
    if "same_length" in fields:
        return "txl"
    if "n_layer" in fields:
        return "xlnet"
    if "family" in fields:
        return str(fields["family"])
    return "t5"  # written before the BERT family existed


def _build(cls: type, values: Mapping[str, Any], where: str, name: str) -> Any:
    """``cls(**values)``; fields whose default is a config are built recursively."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise ProtlmError(f"{where}: {name} has fields {cls.__name__} does not know: "
                          f"{', '.join(unknown)}")
    kwargs = {}
    for key, value in values.items():
        default = fields[key].default
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            value = _build(type(default), value, where, f"{name}.{key}")
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ProtlmError(f"{where}: {name}: {e}") from None


def config_from_dict(fields: Any, where: str = "model_config",
                     family_name: Optional[str] = None) -> Any:
    """A model config from ``dataclasses.asdict`` of one (checkpoint metadata).

    Args:
      fields: the stored ``model_config``.
      where: names the checkpoint in messages.
      family_name: the stored ``model_family``; None (checkpoints written
        before it was stored): guessed from the fields.

    Raises:
      ProtlmError: no config, an unknown family, fields the config class does
        not know, or bad values.
    """
    if not isinstance(fields, dict):
        raise ProtlmError(f"{where}: checkpoint metadata has no model_config")
    fam = lookup(family_name or _guess_family(fields))
    config = _build(fam.config_class, fields, where, "model_config")
    if not fam.accepts(config):
        raise ProtlmError(f"{where}: model_config is not a {fam.name} config")
    return config
