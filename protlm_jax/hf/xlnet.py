"""Hugging Face XLNet <-> protlm-jax (ProtXLNet): key table, config, tokenizer, card.

The engine (:mod:`protlm_jax.hf.engine`) checks, assembles and writes; this
module holds XLNet's own rules:

* one key table: HF names without the ``transformer.`` prefix (which
  ``XLNetModel`` checkpoints lack) <-> our parameter paths; the attention
  tensors ``q k v o r`` [d_model, n_head, d_head], the biases and
  ``seg_embed`` have the same layout on both sides, ``ff.layer_*`` are
  transposed;
* ``lm_loss.weight`` is tied to the word embedding: on import it must equal
  it, on export it is left out (transformers ties it again);
  ``lm_loss.bias`` is the head;
* unknown tensors inside the network (``word_embedding``, ``mask_emb``,
  ``layer.``) are errors; heads we do not model (sequence summary, QA and
  classification heads) are skipped with a warning;
* export as ``XLNetLMHeadModel`` (``XLNetModel`` without the head), with a
  SentencePiece ``spiece.model`` (one piece per residue) and the ProtTrans
  XLNet usage snippet; an imported checkpoint keeps its own pieces;
* configs: ``attn_type`` "bi" only, ``same_length`` false; ``untie_r`` is
  read past (transformers keeps per-layer biases either way).

Shape legend: V vocab, D d_model, N heads, K d_head, F d_inner.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax

from protlm_jax.data.vocabularies import (PROTXLNET_RESIDUES, PROTXLNET_SPECIALS,
                                          ProtXLNetVocabulary, VocabTxtVocabulary)
from protlm_jax.errors import ProtlmError
from protlm_jax.hf import cards, engine, files, tokenizers
from protlm_jax.hf.engine import Rule
from protlm_jax.models import xlnet
from protlm_jax.models.family import flat_paths
from protlm_jax.models.xlnet import XLNetConfig

_LAYER = (
    Rule("rel_attn.{proj}", "rel_attn/{proj}"),
    Rule("rel_attn.layer_norm.{ln}", "rel_attn/layer_norm/{ln}"),
    Rule("ff.layer_{n}.weight", "ff/layer_{n}/kernel", "T"),
    Rule("ff.layer_{n}.bias", "ff/layer_{n}/bias"),
    Rule("ff.layer_norm.{ln}", "ff/layer_norm/{ln}"),
)
_PLACEHOLDERS = {
    "proj": {p: p for p in ("q", "k", "v", "o", "r", "r_w_bias", "r_r_bias", "r_s_bias",
                            "seg_embed")},
    "ln": {"weight": "scale", "bias": "bias"},
    "n": {"1": "1", "2": "2"},
}
TABLE = engine.KeyTable(
    (Rule("word_embedding.weight", "word_embedding/embedding"),
     Rule("mask_emb", "mask_emb"))
    + tuple(Rule(f"layer.{{i}}.{r.hf}", f"encoder/layers_{{i}}/{r.ours}", r.transform)
            for r in _LAYER)
    + (Rule("lm_loss.bias", "lm_loss/bias", head=True),),
    _PLACEHOLDERS, base_prefix="transformer.")

_POLICY = dict(label="XLNet", tied=((r"lm_loss\.weight", "word_embedding.weight"),),
               body=("word_embedding", "mask_emb", "layer."))
CONFIG_RULES = engine.ConfigRules(
    positive=("vocab_size", "d_model", "n_head", "d_head", "d_inner", "d_embed"),
    integers=("mem_len", "reuse_len", "clamp_len", "pad_token_id"),
    reals=("layer_norm_eps", "dropout", "initializer_range"),
    layers={"n_layer": r"layer\.(\d+)\..*"})
ARCHITECTURES = ("XLNetLMHeadModel", "XLNetModel")
# The ProtTrans notebooks map the rare residues (and X) to <unk> for ProtXLNet.
RARE_RESIDUES = ("[UZOBX]", "<unk>")


@functools.lru_cache(maxsize=16)
def _abstract_unscanned(config: XLNetConfig) -> Dict[str, Any]:
    return flat_paths(xlnet.abstract_params(config.replace(scan_layers=False)))


def expected_tensors(config: XLNetConfig, *, with_head: bool = True,
                     prefixed: bool = False) -> Dict[str, engine.Tensor]:
    """Every HF tensor of an ``XLNetLMHeadModel`` (``XLNetModel`` without the head)."""
    return engine.expected_tensors(TABLE, _abstract_unscanned(config),
                                   vocab_size=config.vocab_size, with_head=with_head,
                                   prefixed=prefixed)


def check_tensors(reader: Any, config: XLNetConfig, *, where: str = "state dict",
                  require_head: Optional[bool] = None):
    """Checks one directory's tensors (see :func:`engine.check`)."""
    return engine.check(reader, TABLE, expected_tensors(config),
                        engine.Policy(require_head=require_head, **_POLICY), where=where)


def params_from_state_dict(state_dict: Mapping[str, Any], config: XLNetConfig, *,
                           where: str = "state dict") -> Dict[str, Any]:
    """An in-memory HF state dict as our params (float32 numpy)."""
    sources, _ = check_tensors(files.StateDictReader(state_dict), config, where=where)
    return engine.assemble(sources, xlnet.abstract_params(config))


# --------------------------------------------------------------- configs ---

def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> XLNetConfig:
    """Our ``XLNetConfig`` from a HF ``config.json`` dict.

    Raises:
      ProtlmError: one line listing unsupported options.
    """
    problems = []
    if hf.get("attn_type", "bi") != "bi":
        problems.append(f"attn_type {hf['attn_type']!r} (only 'bi')")
    if hf.get("same_length"):
        problems.append("same_length true")
    act = hf.get("ff_activation", "gelu")
    if act not in xlnet.bert.ACTIVATIONS:
        problems.append(f"ff_activation {act!r} (supported: {sorted(xlnet.bert.ACTIVATIONS)})")
    if hf.get("tie_word_embeddings") is False:
        problems.append("tie_word_embeddings false (untied LM head)")
    if problems:
        raise ProtlmError(f"{where}: unsupported xlnet config: {'; '.join(problems)}")

    def optional(key):
        value = hf.get(key)
        return int(value) if value else None

    try:
        d_model, n_head = int(hf.get("d_model", 1024)), int(hf.get("n_head", 16))
        return XLNetConfig(
            vocab_size=int(hf.get("vocab_size", 32000)), d_model=d_model,
            n_layer=int(hf.get("n_layer", 24)), n_head=n_head,
            d_head=int(hf.get("d_head", d_model // max(n_head, 1))),
            d_inner=int(hf.get("d_inner", 4096)), ff_activation=act,
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            dropout=float(hf.get("dropout", 0.1)),
            initializer_range=float(hf.get("initializer_range", 0.02)),
            mem_len=optional("mem_len"), reuse_len=optional("reuse_len"),
            clamp_len=int(hf.get("clamp_len", -1)), bi_data=bool(hf.get("bi_data", False)),
            pad_id=int(hf["pad_token_id"]) if hf.get("pad_token_id") is not None else 5)
    except (TypeError, ValueError) as e:
        raise ProtlmError(f"{where}: {e}") from None


def hf_config_dict(config: XLNetConfig, architecture: str) -> Dict[str, Any]:
    """``config.json`` contents for ``config``."""
    return {
        "architectures": [architecture], "model_type": "xlnet",
        "vocab_size": config.vocab_size, "d_model": config.d_model, "n_layer": config.n_layer,
        "n_head": config.n_head, "d_head": config.d_head, "d_inner": config.d_inner,
        "ff_activation": config.ff_activation, "untie_r": True, "attn_type": "bi",
        "initializer_range": config.initializer_range,
        "layer_norm_eps": config.layer_norm_eps, "dropout": config.dropout,
        "mem_len": config.mem_len, "reuse_len": config.reuse_len,
        "use_mems_eval": True, "use_mems_train": False, "bi_data": config.bi_data,
        "clamp_len": config.clamp_len, "same_length": False,
        "summary_type": "last", "summary_use_proj": True, "summary_activation": "tanh",
        "summary_last_dropout": 0.1, "start_n_top": 5, "end_n_top": 5,
        "pad_token_id": config.pad_id, "bos_token_id": ProtXLNetVocabulary.BOS_ID,
        "eos_token_id": ProtXLNetVocabulary.EOS_ID, "tie_word_embeddings": True,
    }


# -------------------------------------------------------------- tokenizer ---

def vocabulary_tokens() -> List[str]:
    """Our ProtXLNet tokens in id order (residues without ``▁``)."""
    v = ProtXLNetVocabulary()
    return list(PROTXLNET_SPECIALS) + list(PROTXLNET_RESIDUES) + [
        f"<unused{i}>" for i in range(v.UNUSED)]


def write_tokenizer(directory: str, tokens: Optional[Sequence[str]] = None) -> List[str]:
    """``spiece.model`` (one piece per residue) and the XLNet tokenizer config."""
    tokens = list(tokens) if tokens is not None else vocabulary_tokens()
    tokenizers.write_spiece(os.path.join(directory, "spiece.model"),
                            tokenizers.spiece_pieces(tokens), unk_id=tokens.index("<unk>"),
                            bos_id=tokens.index("<s>") if "<s>" in tokens else -1,
                            eos_id=tokens.index("</s>") if "</s>" in tokens else -1,
                            pad_id=tokens.index("<pad>") if "<pad>" in tokens else -1)
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                "sep_token": "<sep>", "pad_token": "<pad>", "cls_token": "<cls>",
                "mask_token": "<mask>", "additional_special_tokens": ["<eop>", "<eod>"]}
    files.write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "XLNetTokenizer", "do_lower_case": False, "remove_space": True,
        "keep_accents": False, "padding_side": "left", "model_max_length": 1_000_000_000,
        **specials})
    files.write_json(os.path.join(directory, "special_tokens_map.json"), specials)
    return ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"]


# ----------------------------------------------------------------- import ---

def load(directory: str, *, mesh: Optional[jax.sharding.Mesh] = None,
         rules: Optional[Sequence] = None, encoder_only: Optional[bool] = None,
         **overrides) -> engine.Imported:
    """Imports a HF XLNet directory (``XLNetLMHeadModel`` or ``XLNetModel``).

    Args:
      directory: the HF model directory.
      mesh, rules: where the params go (numpy leaves without a mesh).
      encoder_only: unused (the whole model loads; embedding reads what it needs).
      **overrides: ``XLNetConfig`` fields to set (``dtype``, ``scan_layers``).

    Raises:
      ProtlmError: one line on unsupported configs and bad tensors.
    """
    del encoder_only
    if overrides.pop("vocab_pad_to_multiple", None) is not None:
        raise ProtlmError(f"{directory}: --vocab_pad_to_multiple applies to the BERT family; "
                          "XLNet's 32-row vocabulary splits 2, 4 or 8 ways as it is")
    hf = files.read_config(directory)
    reader = files.CheckpointReader(directory)
    engine.check_config(hf, reader, TABLE, CONFIG_RULES,
                        where=os.path.join(directory, "config.json"))
    try:
        cfg = config_from_hf(hf, os.path.join(directory, "config.json")).replace(**overrides)
    except (TypeError, ValueError) as e:
        raise ProtlmError(f"{directory}: {e}") from None
    arch = (hf.get("architectures") or [ARCHITECTURES[0]])[0]
    vocabulary = tokenizers.checkpoint_tokens(directory) or VocabTxtVocabulary(
        vocabulary_tokens())
    sources, skipped = check_tensors(reader, cfg, where=directory)
    has_head = "lm_loss/bias" in sources
    params = engine.assemble(sources, xlnet.abstract_params(cfg), mesh=mesh, rules=rules)
    return engine.Imported(
        cfg, params, vocabulary, arch, has_head, skipped=skipped, weights=reader.kind,
        metadata={"architecture": arch, "has_head": has_head,
                  "param_collections": sorted(params),
                  "vocabulary": list(vocabulary.tokens)})


# ----------------------------------------------------------------- export ---

def export(params: Any, config: XLNetConfig, output: str, *, encoder_only: bool, dtype: str,
           max_shard_size: int, step: int, source: str,
           meta: Mapping[str, Any]) -> Dict[str, Any]:
    """One directory: ``XLNetLMHeadModel`` (``encoder_only``: ``XLNetModel``),
    safetensors, ``spiece.model`` and a model card with the ProtTrans snippet."""
    tree = params.get("params", params)
    if not encoder_only and "lm_loss" not in tree:
        raise ProtlmError(f"{source}: checkpoint has no lm_loss (imported from an "
                          f"XLNetModel); export it with --encoder_only")
    arch = ARCHITECTURES[1 if encoder_only else 0]
    os.makedirs(output, exist_ok=True)
    files.remove_stale_weights(output)
    counted: Dict[str, int] = {}
    tensors = engine.hf_tensors(tree, expected_tensors(config, with_head=not encoder_only,
                                                       prefixed=not encoder_only))
    written = files.write_safetensors(engine.counting(tensors, counted), output, dtype=dtype,
                                      max_shard_size=max_shard_size
                                      or files.DEFAULT_MAX_SHARD_SIZE)
    files.write_json(os.path.join(output, "config.json"),
                     dict(hf_config_dict(config, arch), torch_dtype=dtype))
    written += ["config.json"] + write_tokenizer(output, meta.get("vocabulary"))
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, arch, counted.get("parameters", 0), dtype=dtype, step=step,
                           source=source))
    written.append("README.md")
    return {"files": written, "parameters": counted.get("parameters", 0),
            "architectures": {".": arch}}


# What hf.convert.prottrans_embeddings runs: the checkpoint's tokenizer and base model.
REFERENCE_CLASSES = ("XLNetTokenizer", "XLNetModel", 0)

SNIPPET = """```python
import re
import torch
from transformers import XLNetTokenizer, XLNetModel

tokenizer = XLNetTokenizer.from_pretrained("path/to/this/model", do_lower_case=False)
model = XLNetModel.from_pretrained("path/to/this/model").eval()

sequences = ["PRTEINO", "SEQWENCE"]
# one space between residues, rare residues U Z O B (and X) -> <unk>
sequences = [re.sub(r"[UZOBX]", "<unk>", " ".join(s)) for s in sequences]
# residues <sep> <cls>, padded on the LEFT
ids = tokenizer(sequences, add_special_tokens=True, padding="longest")
input_ids = torch.tensor(ids["input_ids"])
attention_mask = torch.tensor(ids["attention_mask"])
with torch.no_grad():
    out = model(input_ids=input_ids, attention_mask=attention_mask, mems=None)
L = input_ids.shape[1]
emb_0 = out.last_hidden_state[0, L - 7 - 2 : L - 2]  # per residue: drop padding, <sep>, <cls>
emb_1 = out.last_hidden_state[1, L - 8 - 2 : L - 2]
protein_0 = emb_0.mean(dim=0)  # per protein: mean over residues only
```
"""


def model_card(config: XLNetConfig, architecture: str, parameters: int, *, dtype: str,
               step: int, source: str) -> str:
    """README.md of an exported ProtXLNet, with the ProtTrans XLNet snippet."""
    rows = [(f"`{architecture}` (this folder)",
             f"{config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads x "
             f"{config.d_head}, d_inner {config.d_inner}, {config.ff_activation}; "
             f"{parameters:,} parameters")]
    return cards.render(
        title="ProtXLNet", heading="ProtXLNet exported by protlm-jax",
        intro=f"An XLNet protein language model trained with protlm-jax (JAX/Flax) and "
              f"exported with `protlm export-hf` from `{source}` (step {step}).",
        header=("model", "shape"), rows=rows,
        details=f"Relative positions (no length limit; `mem_len` {config.mem_len}); "
                f"vocabulary {config.vocab_size} ids (XLNet's special ids 0-8, residues "
                f"from 9; U Z O B X are `<unk>`); weights {dtype} safetensors.\n"
                "Pretraining objective: permutation language modelling (zihangdai/xlnet "
                "span sampling and local permutations, two-stream attention).",
        snippet_name="ProtTrans XLNet", snippet=SNIPPET,
        outro="`protlm import-hf` turns this directory back into a protlm MODEL_DIR; "
              "`protlm generate --model` samples new sequences from it.")
