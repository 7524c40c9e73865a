"""Embeddings at scale: the engine (``engine``: buckets, token budget, sharding,
chunks; no model's insides) and its I/O (``io``: loading a model, FASTA -> HDF5)."""

from protlm_jax.embed.engine import (ATTENTION_CHUNK, GROUP_TOKENS, LONG_LENGTH,  # noqa: F401
                                     MLP_CHUNK, Embedder, bucket_length, clean_sequence,
                                     sanitize_id)
from protlm_jax.embed.io import embed_fasta, load_model  # noqa: F401
from protlm_jax.errors import InputError, ProtlmError  # noqa: F401
