"""``protlm export-hf``: a protlm MODEL_DIR checkpoint → a Hugging Face T5 directory.

Writes, into HF_DIR:

* ``config.json`` (``hf_t5.hf_config_dict``: transformers 4 and 5 read it the
  same way) and ``generation_config.json``;
* ``model.safetensors``, or ``model-0000i-of-0000N.safetensors`` shards plus
  ``model.safetensors.index.json`` once the weights pass ``max_shard_size``
  (transformers' own layout); tensors are produced one at a time, so the host
  holds at most one shard;
* the ProtT5 tokenizer (``hf_tokenizer``: a real SentencePiece model);
* ``README.md``, a model card with the ProtTrans usage snippet.

``encoder_only`` writes a ``T5EncoderModel`` (``shared.weight`` + ``encoder.*``),
like the published half-precision ProtT5 encoder.

Heads (REFERENCE §9): a tied head is exported scaled (T5 v1.0) and an untied
one unscaled (T5 v1.1); an untied *scaled* head (ProtT5's own lm_head) is
exported with d_model**-0.5 folded into ``lm_head.weight``, and a tied unscaled
one with a copy of the embedding as ``lm_head.weight``, so the two
``config.json`` conventions agree.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np

from protlm_jax import hf_t5, hf_tokenizer
from protlm_jax.errors import ProtlmError
from protlm_jax.models.t5 import T5Config

DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = 5 * 1000 ** 3  # transformers' "5GB"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
               "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"200KiB"`` or a byte count → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ProtlmError(f"--max_shard_size: expected e.g. 5GB, 500MB or a byte count, "
                          f"got {text!r}")
    return int(float(m[1]) * _SIZE_UNITS[(m[2] or "").upper()])


# ------------------------------------------------------- reading MODEL_DIR ---

def restore_params(model_dir: str, step: Optional[int] = None, *, encoder_only: bool = False,
                   mesh: Optional[jax.sharding.Mesh] = None,
                   rules: Optional[Sequence] = None) -> Tuple[T5Config, Any, Dict[str, Any]]:
    """The params (only) of a T5 MODEL_DIR checkpoint: (config, params, metadata).

    ``checkpoints.read_params`` for the T5 family (others are refused).
    """
    from protlm_jax.checkpoints import read_params

    config, params, meta, step = read_params(model_dir, step, encoder_only=encoder_only,
                                             mesh=mesh, rules=rules)
    if not isinstance(config, T5Config):
        raise ProtlmError(f"{model_dir}: a {type(config).__name__} checkpoint, not T5")
    meta.setdefault("step", step)
    return config, params, meta


# --------------------------------------------------------------- writing ---

def export_tensors(params: Any, config: T5Config, encoder_only: bool
                   ) -> Iterator[Tuple[str, np.ndarray]]:
    """HF tensors of the model as exported (head folded as the module says)."""
    shared = None
    for name, w in hf_t5.hf_tensors_from_params(params, config, encoder_only):
        if name == "shared.weight":
            shared = w
        if name == "lm_head.weight" and config.scale_decoder_outputs:
            # (y * s) @ W == y @ (s * W); exact when s is a power of two.
            w = (w * np.float32(config.d_model ** -0.5)).astype(np.float32)
        yield name, w
    if (not encoder_only and config.tie_word_embeddings
            and not config.scale_decoder_outputs):
        yield "lm_head.weight", shared.copy()


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[dtype]


def write_safetensors(tensors: Iterator[Tuple[str, np.ndarray]], output: str, *,
                      dtype: str = "float32",
                      max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> List[str]:
    """Writes ``model.safetensors`` or shards + ``model.safetensors.index.json``.

    A shard is closed when the next tensor would take it past
    ``max_shard_size`` bytes (a bigger tensor gets a shard of its own), as
    transformers does. Returns the files written.
    """
    import torch
    from safetensors.torch import save_file

    torch_dtype = _torch_dtype(dtype)
    shards: List[Dict[str, Any]] = []
    current: Dict[str, Any] = {}
    current_size = total_size = 0

    def flush():
        nonlocal current, current_size
        if current:
            path = os.path.join(output, f".shard-{len(shards):05d}.tmp")
            save_file(current, path, metadata={"format": "pt"})
            shards.append({"tmp": path, "names": list(current)})
            current, current_size = {}, 0

    for name, w in tensors:
        tensor = torch.from_numpy(np.require(w, np.float32, ["C", "W"])).to(torch_dtype)
        if not torch.isfinite(tensor).all():
            raise ProtlmError(f"{name}: values overflow {dtype} (|w| up to "
                              f"{float(np.abs(w).max()):.3g}); export in float32 or bfloat16")
        size = tensor.numel() * tensor.element_size()
        if current and current_size + size > max_shard_size:
            flush()
        current[name] = tensor
        current_size += size
        total_size += size
    flush()
    if len(shards) == 1:
        final = os.path.join(output, "model.safetensors")
        os.replace(shards[0]["tmp"], final)
        return ["model.safetensors"]
    weight_map, files = {}, []
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(shard["tmp"], os.path.join(output, filename))
        weight_map.update({n: filename for n in shard["names"]})
        files.append(filename)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    hf_tokenizer._write_json(os.path.join(output, "model.safetensors.index.json"), index)
    return files + ["model.safetensors.index.json"]


def _remove_stale_weights(output: str) -> None:
    for name in os.listdir(output):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?"
                        r"|\.shard-\d{5}\.tmp|pytorch_model.*\.bin(\.index\.json)?", name):
            os.remove(os.path.join(output, name))


def model_card(config: T5Config, *, encoder_only: bool, dtype: str, source: str,
               step: int, num_params: int) -> str:
    """README.md of the exported model, with the ProtTrans usage snippet."""
    model_class = "T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"
    return f"""---
library_name: transformers
tags:
- protein language model
- ProtT5
- protlm-jax
---

# ProtT5 ({'encoder only' if encoder_only else 'encoder-decoder'}) exported by protlm-jax

A T5 protein language model trained with protlm-jax (JAX/Flax) and exported with `protlm export-hf` from `{source}` (step {step}).

| | |
|---|---|
| class | `{model_class}` |
| layers | {config.num_encoder_layers} encoder{'' if encoder_only else f' + {config.num_decoder_layers} decoder'} |
| d_model / heads × d_kv / d_ff | {config.d_model} / {config.num_heads} × {config.d_kv} / {config.d_ff} |
| feed-forward | {config.feed_forward_proj} |
| relative position buckets / max distance | {config.relative_attention_num_buckets} / {config.relative_attention_max_distance} |
| vocabulary | {config.vocab_size} (ProtT5 ids: 0 pad, 1 `</s>`, 2 unk, 3–27 residues, 28–127 sentinels) |
| parameters | {num_params:,} |
| weights | {dtype} safetensors |

Pretraining objective (ProtT5): 15 % of residues are each replaced by their own
sentinel in the encoder input; the decoder reconstructs the whole sequence.

## Per-residue and per-protein embeddings (the ProtTrans snippet)

```python
import re
import torch
from transformers import T5Tokenizer, T5EncoderModel

tokenizer = T5Tokenizer.from_pretrained("path/to/this/model", do_lower_case=False)
model = T5EncoderModel.from_pretrained("path/to/this/model").eval()
# model = model.half()  # on a GPU only; keep float32 on CPU

sequences = ["PRTEINO", "SEQWENCE"]
# one space between residues, rare residues U Z O B -> X
sequences = [" ".join(re.sub(r"[UZOB]", "X", s)) for s in sequences]
ids = tokenizer(sequences, add_special_tokens=True, padding="longest")
input_ids = torch.tensor(ids["input_ids"])
attention_mask = torch.tensor(ids["attention_mask"])
with torch.no_grad():
    out = model(input_ids=input_ids, attention_mask=attention_mask)
emb_0 = out.last_hidden_state[0, :7]  # per residue: drop </s> and padding ([:L])
emb_1 = out.last_hidden_state[1, :8]
protein_0 = emb_0.mean(dim=0)  # per protein: mean over residues only
```

The same embeddings in JAX: `protlm embed --model path/to/this/model ...`
(`protlm import-hf` turns this directory back into a protlm MODEL_DIR).
"""


def export_hf(model_dir: str, output: str, *, encoder_only: bool = False,
              dtype: str = "float32", step: Optional[int] = None,
              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Dict[str, Any]:
    """Exports a MODEL_DIR checkpoint as a Hugging Face T5 directory.

    Args:
      model_dir: a protlm MODEL_DIR (trained or imported).
      output: the Hugging Face directory to write (created; our files in it
        are replaced).
      encoder_only: write a ``T5EncoderModel``.
      dtype: weight dtype in the files ("float32", "float16", "bfloat16").
      step: checkpoint step (default: the latest).
      max_shard_size: bytes per safetensors shard before splitting.

    Returns:
      A summary: files, step, parameter count, bytes.
    """
    if dtype not in DTYPES:
        raise ProtlmError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    config, params, meta = restore_params(model_dir, step, encoder_only=encoder_only)
    step = int(meta.get("step", step if step is not None else -1))
    if jax.process_index() != 0:
        return {"step": step}  # only process 0 writes
    os.makedirs(output, exist_ok=True)
    _remove_stale_weights(output)
    counted = {"params": 0}

    def counting(tensors):
        for name, w in tensors:
            counted["params"] += w.size
            yield name, w

    files = write_safetensors(counting(export_tensors(params, config, encoder_only)),
                              output, dtype=dtype, max_shard_size=max_shard_size)
    hf_tokenizer._write_json(os.path.join(output, "config.json"), hf_t5.hf_config_dict(
        config, encoder_only=encoder_only, torch_dtype=dtype))
    hf_tokenizer._write_json(os.path.join(output, "generation_config.json"), {
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_id, "pad_token_id": config.pad_id})
    files += ["config.json", "generation_config.json"]
    files += hf_tokenizer.write_prott5_tokenizer(output)
    n = counted["params"]
    if not encoder_only and config.tie_word_embeddings and not config.scale_decoder_outputs:
        n -= config.vocab_size * config.d_model  # the lm_head copy is not a parameter
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, encoder_only=encoder_only, dtype=dtype,
                           source=os.path.abspath(model_dir), step=step, num_params=n))
    files.append("README.md")
    return {"output": output, "step": step, "files": files, "parameters": n,
            "encoder_only": encoder_only, "dtype": dtype}


def prottrans_embeddings(hf_dir: str, sequences: Sequence[str]) -> List[np.ndarray]:
    """Per-residue embeddings the way the ProtTrans README computes them (torch CPU).

    The published snippet: ``T5Tokenizer(do_lower_case=False)``, spaces between
    residues, U Z O B → X, ``T5EncoderModel``, padding to the longest, and the
    ``[:L]`` slice. Used by the demo to compare against ``protlm embed``.

    Returns:
      One float32 [L, D] array per sequence.
    """
    import torch
    from transformers import T5EncoderModel, T5Tokenizer

    tokenizer = T5Tokenizer.from_pretrained(hf_dir, do_lower_case=False)
    model = T5EncoderModel.from_pretrained(hf_dir).float().eval()
    prepared = [" ".join(re.sub(r"[UZOB]", "X", s)) for s in sequences]
    ids = tokenizer(prepared, add_special_tokens=True, padding="longest")
    input_ids = torch.tensor(ids["input_ids"])
    attention_mask = torch.tensor(ids["attention_mask"])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    return [out.last_hidden_state[i, :len(s)].numpy() for i, s in enumerate(sequences)]
