"""Model families of protlm-jax (Flax linen).

Shape legend: B batch, L/T lengths, D embed, H heads, K d_kv, F mlp, V vocab.
"""

from protlm_jax.models.t5 import (T5, T5_PRESETS, T5Config, T5EncoderOnly,
                                  abstract_params, decoder_input_tokens_from_targets,
                                  preset)

__all__ = ["T5", "T5_PRESETS", "T5Config", "T5EncoderOnly", "abstract_params",
           "decoder_input_tokens_from_targets", "preset", "build_model", "family_of",
           "config_from_dict", "abstract_params_of"]


def build_model(config):
    """The Flax module for a model config and the batch features its ``init`` takes.

    Dispatches on the config class: ``T5Config`` -> ``T5``; ``BertConfig``
    (BERT, ALBERT) -> ``bert.Bert``; ``ElectraConfig`` -> ``electra.Electra``.

    Returns:
      (module, init_inputs): ``init_inputs`` names the features, in order.
    """
    from protlm_jax.models import bert, electra

    if isinstance(config, T5Config):
        return T5(config), ("encoder_input_tokens", "decoder_input_tokens")
    if isinstance(config, bert.BertConfig):
        return bert.Bert(config), ("encoder_input_tokens",)
    if isinstance(config, electra.ElectraConfig):
        return electra.Electra(config), ("encoder_input_tokens",)
    raise TypeError(f"no model for config type {type(config).__name__}")


def family_of(config) -> str:
    """The family name of a model config: "t5", "bert", "albert" or "electra"."""
    from protlm_jax.models import bert, electra

    if isinstance(config, T5Config):
        return "t5"
    if isinstance(config, bert.BertConfig):
        return config.family
    if isinstance(config, electra.ElectraConfig):
        return "electra"
    raise TypeError(f"no model family for config type {type(config).__name__}")


def config_from_dict(fields: dict, where: str = "model_config"):
    """A model config from ``dataclasses.asdict`` of one (checkpoint metadata).

    The class follows the fields: ``discriminator``/``generator`` ->
    ``ElectraConfig``; ``family`` (bert, albert) -> ``BertConfig``; otherwise
    ``T5Config`` (checkpoints written before the BERT family existed).

    Raises:
      ProtlmError: fields the config class does not know, or bad values.
    """
    import dataclasses

    from protlm_jax.errors import ProtlmError
    from protlm_jax.models import bert, electra

    if not isinstance(fields, dict):
        raise ProtlmError(f"{where}: checkpoint metadata has no model_config")

    def build(cls, values, name):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ProtlmError(f"{where}: {name} has fields {cls.__name__} does not know: "
                              f"{', '.join(unknown)}")
        try:
            return cls(**values)
        except (TypeError, ValueError) as e:
            raise ProtlmError(f"{where}: {name}: {e}") from None

    if "discriminator" in fields or "generator" in fields:
        towers = {k: build(bert.BertConfig, v, f"model_config.{k}")
                  for k, v in fields.items() if k in ("discriminator", "generator")}
        return build(electra.ElectraConfig, towers, "model_config")
    if "family" in fields:
        return build(bert.BertConfig, fields, "model_config")
    return build(T5Config, fields, "model_config")


def abstract_params_of(config, *, encoder_only: bool = False):
    """Boxed abstract params of any family (``encoder_only``: T5 encoder half)."""
    from protlm_jax.models import bert, electra

    if isinstance(config, T5Config):
        return abstract_params(config, encoder_only=encoder_only)
    if isinstance(config, bert.BertConfig):
        return bert.abstract_params(config)
    return electra.abstract_params(config)
