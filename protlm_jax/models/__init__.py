"""Model families of protlm-jax (Flax linen).

Shape legend: B batch, L/T lengths, D embed, H heads, K d_kv, F mlp, V vocab.
"""

from protlm_jax.models.t5 import (T5, T5_PRESETS, T5Config, T5EncoderOnly,
                                  abstract_params, decoder_input_tokens_from_targets,
                                  preset)

__all__ = ["T5", "T5_PRESETS", "T5Config", "T5EncoderOnly", "abstract_params",
           "decoder_input_tokens_from_targets", "preset", "build_model"]


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
