"""Hugging Face both ways: one engine (``engine``, ``files``), one small module
per family (``t5``, ``bert``: key table, config and tokenizer/head rules),
tokenizer files (``tokenizers``), model cards (``cards``) and the commands
(``convert``: ``export-hf``, ``import-hf``, loading for embedding)."""
