"""Model cards (``README.md``) of exported directories, with the ProtTrans snippet.

The snippet is the published usage (ProtTrans README / ProtBert model card):
tokenizer without lower-casing, spaces between residues, rare residues -> X,
the encoder, residues sliced out of ``last_hidden_state`` around the special
tokens, per protein the mean over residues only.
"""

from __future__ import annotations

from typing import Sequence, Tuple, Union

from protlm_jax.data.residues import RARE_RESIDUES_PATTERN

# (tokenizer class, model class, index of the first residue token) of ProtT5's snippet.
T5_SNIPPET = ("T5Tokenizer", "T5EncoderModel", 0)


def usage_snippet(spec: Tuple[str, str, int]) -> str:
    """The published usage snippet (ProtTrans README / ProtBert model card) as a
    fenced code block for a model card: tokenizer without lower-casing, spaces
    between residues, U Z O B -> X, the encoder, residues sliced out of
    ``last_hidden_state`` from ``first`` (0: ProtT5, ``[:L]``; 1: after
    ``[CLS]``, ``[1:L+1]``)."""
    tokenizer_class, model_class, first = spec
    half = ("# model = model.half()  # on a GPU only; keep float32 on CPU\n"
            if first == 0 else "")
    drop = "</s>" if first == 0 else "[CLS], [SEP]"
    sl = (lambda n: f":{n}") if first == 0 else (lambda n: f"1:{n} + 1")
    rule = ":L" if first == 0 else "1:L+1"
    return f"""```python
import re
import torch
from transformers import {tokenizer_class}, {model_class}

tokenizer = {tokenizer_class}.from_pretrained("path/to/this/model", do_lower_case=False)
model = {model_class}.from_pretrained("path/to/this/model").eval()
{half}
sequences = ["PRTEINO", "SEQWENCE"]
# one space between residues, rare residues U Z O B -> X
sequences = [" ".join(re.sub(r"{RARE_RESIDUES_PATTERN}", "X", s)) for s in sequences]
ids = tokenizer(sequences, add_special_tokens=True, padding="longest")
input_ids = torch.tensor(ids["input_ids"])
attention_mask = torch.tensor(ids["attention_mask"])
with torch.no_grad():
    out = model(input_ids=input_ids, attention_mask=attention_mask)
emb_0 = out.last_hidden_state[0, {sl(7)}]  # per residue: drop {drop} and padding ([{rule}])
emb_1 = out.last_hidden_state[1, {sl(8)}]
protein_0 = emb_0.mean(dim=0)  # per protein: mean over residues only
```
"""


def render(*, title: str, heading: str, intro: str, header: Tuple[str, str],
           rows: Sequence[Tuple[str, str]], details: str, snippet_name: str,
           snippet: Union[Tuple[str, str, int], str], outro: str) -> str:
    """A model card: front matter, a table, a paragraph, the usage snippet.

    Args:
      title: the model's name (also a tag), e.g. "ProtT5".
      heading: the card's title line.
      intro: the first paragraph (what it is, where it came from).
      header, rows: the table (two columns).
      details: a paragraph after the table (objective, vocabulary, …).
      snippet_name: whose snippet ("ProtTrans", "ProtBert").
      snippet: :func:`usage_snippet`'s spec, or a family's own fenced snippet.
      outro: the closing lines.
    """
    table = "\n".join(f"| {a} | {b} |" for a, b in rows)
    return f"""---
library_name: transformers
tags:
- protein language model
- {title}
- protlm-jax
---

# {heading}

{intro}

| {header[0]} | {header[1]} |
|---|---|
{table}

{details}

## Per-residue and per-protein embeddings (the {snippet_name} snippet)

{snippet if isinstance(snippet, str) else usage_snippet(snippet)}
{outro}
"""
