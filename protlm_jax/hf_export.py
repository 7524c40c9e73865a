"""``protlm export-hf``: a protlm MODEL_DIR checkpoint → a Hugging Face directory.

The model family follows the checkpoint's ``model_config`` (T5, BERT, ALBERT,
ELECTRA; ``models.family_of``). For T5, writes into HF_DIR:

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

The BERT family (``hf_bert`` key tables, same safetensors writer and
sharding): BERT/ALBERT as ``BertForMaskedLM`` / ``AlbertForMaskedLM``;
ELECTRA as the discriminator (``ElectraForPreTraining``) in HF_DIR and the
generator (``ElectraForMaskedLM``) in ``HF_DIR/generator`` (a checkpoint with
one tower writes that tower into HF_DIR). ``encoder_only`` writes the
``*Model`` without heads (ELECTRA: the discriminator's). The tokenizer is
ProtBert's ``vocab.txt`` / our ALBERT ``spiece.model``, or an imported
checkpoint's own vocabulary (its metadata's ``vocabulary``); the model card
shows the ProtBert snippet.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import jax
import numpy as np

from protlm_jax import hf_bert, hf_t5, hf_tokenizer
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


def stored_collections(model_dir: str, step: Optional[int] = None) -> Optional[List[str]]:
    """The top-level params an imported checkpoint holds, from its metadata's
    ``param_collections`` (a ``BertModel`` import has no ``mlm_head``, a lone
    ELECTRA discriminator no generator); None: all of its config's (training
    checkpoints). Problems are left to ``checkpoints.read_params`` to report.
    """
    import orbax.checkpoint as ocp

    directory = os.path.join(os.path.abspath(model_dir) if "://" not in model_dir
                             else model_dir, "checkpoints")
    if "://" not in directory and not os.path.isdir(directory):
        return None
    absl_log = logging.getLogger("absl")
    level = absl_log.level
    absl_log.setLevel(logging.ERROR)  # read_params repeats orbax's read-only notices
    try:
        manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
            read_only=True, create=False))
        try:
            steps = sorted(manager.all_steps())
            step = steps[-1] if step is None else step
            meta = manager.restore(step, args=ocp.args.Composite(
                metadata=ocp.args.JsonRestore()))["metadata"]
        finally:
            manager.close()
    except Exception:  # no or unknown step, unreadable metadata: read_params says which
        return None
    finally:
        absl_log.setLevel(level)
    collections = meta.get("param_collections") if isinstance(meta, dict) else None
    return list(collections) if collections else None


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
sequences = [" ".join(re.sub(r"[UZOB]", "X", s)) for s in sequences]
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

{usage_snippet(T5_SNIPPET)}
The same embeddings in JAX: `protlm embed --model path/to/this/model ...`
(`protlm import-hf` turns this directory back into a protlm MODEL_DIR).
"""


def export_hf(model_dir: str, output: str, *, encoder_only: bool = False,
              dtype: str = "float32", step: Optional[int] = None,
              max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> Dict[str, Any]:
    """Exports a MODEL_DIR checkpoint as a Hugging Face directory (any family).

    Args:
      model_dir: a protlm MODEL_DIR (trained or imported).
      output: the Hugging Face directory to write (created; our files in it
        are replaced).
      encoder_only: write a ``T5EncoderModel`` / ``BertModel`` /
        ``AlbertModel`` / ``ElectraModel`` (no heads).
      dtype: weight dtype in the files ("float32", "float16", "bfloat16").
      step: checkpoint step (default: the latest).
      max_shard_size: bytes per safetensors shard before splitting.

    Returns:
      A summary: files, step, parameter count, bytes.
    """
    from protlm_jax.checkpoints import read_params
    from protlm_jax.models import family_of

    if dtype not in DTYPES:
        raise ProtlmError(f"--dtype: expected one of {', '.join(DTYPES)}, got {dtype!r}")
    config, params, meta, read_step = read_params(
        model_dir, step, encoder_only=encoder_only, keep=stored_collections(model_dir, step))
    meta.setdefault("step", read_step)
    if family_of(config) != "t5":
        return _export_bert_family(model_dir, output, config, params, meta,
                                   encoder_only=encoder_only, dtype=dtype,
                                   max_shard_size=max_shard_size)
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


# ----------------------------------------------------------- BERT family ---

_TITLES = {"bert": "ProtBert", "albert": "ProtAlbert", "electra": "ProtElectra"}
# (tokenizer class, base model class) of the usage snippet.
_SNIPPET_CLASSES = {"bert": ("BertTokenizer", "BertModel"),
                    "albert": ("AlbertTokenizer", "AlbertModel"),
                    "electra": ("ElectraTokenizer", "ElectraModel")}


def _export_bert_family(model_dir: str, output: str, config: Any, params: Any,
                        meta: Dict[str, Any], *, encoder_only: bool, dtype: str,
                        max_shard_size: int) -> Dict[str, Any]:
    """BERT / ALBERT / ELECTRA params -> HF directories (see the module docstring)."""
    from protlm_jax.models import family_of

    family = family_of(config)
    step = int(meta["step"])
    if family == "electra":
        towers = [t for t in ("discriminator", "generator") if t in params]
        heads = {t: f"{t}_head" for t in towers}
    else:
        towers, heads = [""], {"": "mlm_head"}
    if encoder_only:
        towers = towers[:1]
    else:
        headless = [t for t in towers if heads[t] not in params]
        if headless:
            kind = "ElectraModel" if family == "electra" else hf_bert.architecture(
                config, with_head=False)
            raise ProtlmError(f"{model_dir}: checkpoint has no {heads[headless[0]]} (imported "
                              f"from a {kind}); export it with --encoder_only")
    if jax.process_index() != 0:
        return {"step": step}  # only process 0 writes
    vocabulary = meta.get("vocabulary")
    written, files = [], []
    for i, tower in enumerate(towers):
        where = output if i == 0 else os.path.join(output, "generator")
        out = hf_bert.write_pretrained(params, config, where, tower=tower or "discriminator",
                                       with_head=not encoder_only, dtype=dtype,
                                       max_shard_size=max_shard_size, vocabulary=vocabulary)
        written.append((os.path.relpath(where, output), tower, out))
        files += [os.path.normpath(os.path.join(os.path.relpath(where, output), f))
                  for f in out["files"]]
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write(bert_model_card(config, written, dtype=dtype, step=step,
                                source=os.path.abspath(model_dir),
                                vocab_size=len(vocabulary) if vocabulary else None))
    files.append("README.md")
    return {"output": output, "step": step, "files": files,
            "parameters": written[0][2]["parameters"], "encoder_only": encoder_only,
            "dtype": dtype, "architectures": {w: out["architecture"] for w, _, out in written}}


def bert_model_card(config: Any, written: Sequence[Tuple[str, str, Dict[str, Any]]], *,
                    dtype: str, step: int, source: str,
                    vocab_size: Optional[int] = None) -> str:
    """README.md of an exported BERT-family model, with the ProtBert usage snippet.

    Args:
      config: ``BertConfig`` or ``ElectraConfig``.
      written: (folder relative to HF_DIR, ELECTRA tower or "", summary of
        ``hf_bert.write_pretrained``) of each model directory written.
      dtype, step, source: what the card states.
      vocab_size: tokens of the checkpoint's own vocabulary, when it has one.
    """
    from protlm_jax.models import family_of

    family = family_of(config)
    title = _TITLES[family]
    tokenizer_class, model_class = _SNIPPET_CLASSES[family]
    rows = []
    for folder, tower, out in written:
        cfg = hf_bert._tower_config(config, tower or "discriminator")
        name = f"{tower} " if tower else ""
        where = "this folder" if folder == "." else f"`{folder}/`"
        embedding = (f", embedding {cfg.emb_size}" if cfg.family != "bert" else "")
        sharing = (f", {cfg.num_hidden_groups} shared layer group(s)"
                   if cfg.family == "albert" else "")
        rows.append(f"| {name}`{out['architecture']}` ({where}) | {cfg.num_hidden_layers} "
                    f"layers, hidden {cfg.hidden_size}, {cfg.num_attention_heads} heads, "
                    f"intermediate {cfg.intermediate_size}{embedding}{sharing}, "
                    f"{cfg.hidden_act}; {out['parameters']:,} parameters |")
    cfg = hf_bert._tower_config(config, written[0][1] or "discriminator")
    ids = ("0 `<pad>`, 1 `<unk>`, 2 `[CLS]`, 3 `[SEP]`, 4 `[MASK]`, 5–29 residues in "
           "ProtBert's order" if family == "albert" else
           "ProtBert ids: 0 `[PAD]`, 1 `[UNK]`, 2 `[CLS]`, 3 `[SEP]`, 4 `[MASK]`, 5–29 residues")
    vocabulary = (f"{vocab_size} (the imported checkpoint's own tokenizer)" if vocab_size
                  else f"{cfg.vocab_size} ({ids})")
    objective = {"bert": "masked language modelling (15 % of residues; 80/10/10)",
                 "albert": "masked language modelling (15 % of residues; 80/10/10)",
                 "electra": "replaced-token detection by the discriminator on residues "
                            "sampled from the masked-LM generator"}[family]
    embeds_with = (" ProtTrans embeds with the discriminator." if family == "electra" else "")
    article = {"bert": "A BERT", "albert": "An ALBERT", "electra": "An ELECTRA"}[family]
    return f"""---
library_name: transformers
tags:
- protein language model
- {title}
- protlm-jax
---

# {title} exported by protlm-jax

{article} protein language model trained with protlm-jax (JAX/Flax) and exported with `protlm export-hf` from `{source}` (step {step}).

| model | shape |
|---|---|
{chr(10).join(rows)}

Maximum length {cfg.max_position_embeddings} tokens (learned absolute positions);
vocabulary {vocabulary}; weights {dtype} safetensors. Pretraining objective:
{objective}.{embeds_with}

## Per-residue and per-protein embeddings (the ProtBert snippet)

{usage_snippet((tokenizer_class, model_class, 1))}
`protlm import-hf` turns this directory back into a protlm MODEL_DIR.
"""


def prottrans_embeddings(hf_dir: str, sequences: Sequence[str]) -> List[np.ndarray]:
    """Per-residue embeddings the way the published snippets compute them (torch CPU).

    ProtT5 (``model_type`` t5): ``T5Tokenizer(do_lower_case=False)``,
    ``T5EncoderModel``, residues ``[:L]``. ProtBert and the BERT family: the
    checkpoint's tokenizer (``BertTokenizer``; ALBERT's SentencePiece one) and
    base model through ``AutoTokenizer``/``AutoModel``, residues ``[1:L+1]``.
    Both: spaces between residues, U Z O B → X, padding to the longest. Used by
    the demo to compare against ``protlm embed``.

    Returns:
      One float32 [L, D] array per sequence.
    """
    import torch
    from transformers import AutoModel, AutoTokenizer, T5EncoderModel, T5Tokenizer

    if hf_t5.read_hf_config(hf_dir).get("model_type", "t5") == "t5":
        tokenizer = T5Tokenizer.from_pretrained(hf_dir, do_lower_case=False)
        model, first = T5EncoderModel.from_pretrained(hf_dir), 0
    else:  # [CLS] first
        tokenizer = AutoTokenizer.from_pretrained(hf_dir, do_lower_case=False)
        model, first = AutoModel.from_pretrained(hf_dir), 1
    model = model.float().eval()
    prepared = [" ".join(re.sub(r"[UZOB]", "X", s)) for s in sequences]
    ids = tokenizer(prepared, add_special_tokens=True, padding="longest")
    input_ids = torch.tensor(ids["input_ids"])
    attention_mask = torch.tensor(ids["attention_mask"])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    return [out.last_hidden_state[i, first:first + len(s)].numpy()
            for i, s in enumerate(sequences)]
