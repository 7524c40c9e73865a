"""protlm-jax."""
