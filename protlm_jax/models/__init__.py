"""Model families of protlm-jax (Flax linen).

Shape legend: B batch, L/T lengths, D embed, H heads, K d_kv, F mlp, V vocab.
"""

from protlm_jax.models.t5 import (T5, T5_PRESETS, T5Config, T5EncoderOnly,
                                  abstract_params, decoder_input_tokens_from_targets,
                                  preset)

__all__ = ["T5", "T5_PRESETS", "T5Config", "T5EncoderOnly", "abstract_params",
           "decoder_input_tokens_from_targets", "preset"]
