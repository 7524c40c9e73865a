"""Hugging Face Transformer-XL <-> protlm-jax (ProtTXL): key table, config, card.

The layout is transformers 4.x ``TransfoXLLMHeadModel`` (``model_type``
"transfo-xl"; the class is gone from transformers 5, so exported folders run
in torch through :mod:`protlm_jax.hf.txl_torch`, whose module names are the
same). The engine (:mod:`protlm_jax.hf.engine`) checks, assembles and writes;
this module holds Transformer-XL's own rules:

* the key table: ``qkv_net`` [3·N·K, D] <-> ``dec_attn/qkv`` [D, 3, N, K],
  ``r_net`` [N·K, D] <-> ``dec_attn/r`` [D, N, K], ``o_net`` [D, N·K] <->
  ``dec_attn/o`` [N, K, D], ``pos_ff.CoreNet.{0,3}`` <-> ``pos_ff/layer_{1,2}``
  (transposed), the shared ``r_w_bias``/``r_r_bias`` [N, K] as they are;
* ``crit.out_layers.0.weight`` is tied to the word table (on import it must
  equal it; on export it is left out); ``crit.out_layers.0.bias`` is the head;
* configs: one softmax cluster only (``cutoffs`` [], ``div_val`` 1,
  ``d_embed`` = ``d_model``), ``attn_type`` 0, ``pre_lnorm`` false,
  ``untie_r`` false, no sampled softmax; anything else is refused in one line;
* the tokenizer is a ``vocab.txt`` of our 32 tokens (transformers 4.x's
  ``TransfoXLTokenizer`` reads a pickle, which we neither write nor read).

Shape legend: V vocab, D d_model, N heads, K d_head, F d_inner.
"""

from __future__ import annotations

import functools
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax

from protlm_jax.data.residues import RARE_RESIDUES_PATTERN
from protlm_jax.data.vocabularies import (PROTBERT_RESIDUES, PROTTXL_SPECIALS,
                                          ProtTXLVocabulary, VocabTxtVocabulary)
from protlm_jax.errors import ProtlmError
from protlm_jax.hf import cards, engine, files, tokenizers, txl_torch
from protlm_jax.hf.engine import Rule
from protlm_jax.models import txl
from protlm_jax.models.family import flat_paths
from protlm_jax.models.txl import TXLConfig

_LAYER = (
    Rule("dec_attn.qkv_net.weight", "dec_attn/qkv", "heads_in"),
    Rule("dec_attn.r_net.weight", "dec_attn/r", "heads_in"),
    Rule("dec_attn.o_net.weight", "dec_attn/o", "heads_out"),
    Rule("dec_attn.layer_norm.{ln}", "dec_attn/layer_norm/{ln}"),
    Rule("pos_ff.CoreNet.{n}.weight", "pos_ff/layer_{n}/kernel", "T"),
    Rule("pos_ff.CoreNet.{n}.bias", "pos_ff/layer_{n}/bias"),
    Rule("pos_ff.layer_norm.{ln}", "pos_ff/layer_norm/{ln}"),
)
_PLACEHOLDERS = {
    "ln": {"weight": "scale", "bias": "bias"},
    "n": {"0": "1", "3": "2"},
    "rb": {"r_w_bias": "r_w_bias", "r_r_bias": "r_r_bias"},
}
TABLE = engine.KeyTable(
    (Rule("word_emb.emb_layers.0.weight", "word_emb/embedding"),
     Rule("{rb}", "{rb}"))
    + tuple(Rule(f"layers.{{i}}.{r.hf}", f"decoder/layers_{{i}}/{r.ours}", r.transform)
            for r in _LAYER)
    + (Rule("crit.out_layers.0.bias", "crit/bias", head=True),),
    _PLACEHOLDERS, base_prefix="transformer.")

_POLICY = dict(label="transfo-xl",
               tied=((r"crit\.out_layers\.0\.weight", "word_emb.emb_layers.0.weight"),),
               body=("word_emb", "r_w_bias", "r_r_bias", "layers.", "crit."))
CONFIG_RULES = engine.ConfigRules(
    positive=("vocab_size", "d_model", "n_head", "d_head", "d_inner", "d_embed"),
    integers=("mem_len", "clamp_len", "eval_mem_len", "segment_len", "tgt_len", "pad_token_id"),
    reals=("dropout", "dropatt", "layer_norm_epsilon", "init_std"),
    layers={"n_layer": r"layers\.(\d+)\..*"})
ARCHITECTURES = ("TransfoXLLMHeadModel", "TransfoXLModel")


@functools.lru_cache(maxsize=16)
def _abstract_unscanned(config: TXLConfig) -> Dict[str, Any]:
    return flat_paths(txl.abstract_params(config.replace(scan_layers=False)))


def expected_tensors(config: TXLConfig, *, with_head: bool = True,
                     prefixed: bool = False) -> Dict[str, engine.Tensor]:
    """Every HF tensor of a ``TransfoXLLMHeadModel`` (``TransfoXLModel`` without the head)."""
    return engine.expected_tensors(TABLE, _abstract_unscanned(config),
                                   vocab_size=config.vocab_size, with_head=with_head,
                                   prefixed=prefixed)


def check_tensors(reader: Any, config: TXLConfig, *, where: str = "state dict",
                  require_head: Optional[bool] = None):
    """Checks one directory's tensors (see :func:`engine.check`)."""
    return engine.check(reader, TABLE, expected_tensors(config),
                        engine.Policy(require_head=require_head, **_POLICY), where=where)


# --------------------------------------------------------------- configs ---

def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> TXLConfig:
    """Our ``TXLConfig`` from a ``transfo-xl`` ``config.json`` dict.

    Raises:
      ProtlmError: one line listing unsupported options.
    """
    problems = []
    d_model = hf.get("d_model", 1024)
    if hf.get("cutoffs", []) not in ([], None):
        problems.append(f"cutoffs {hf['cutoffs']!r} (adaptive softmax; only [])")
    if hf.get("div_val", 1) != 1:
        problems.append(f"div_val {hf['div_val']!r} (only 1)")
    if hf.get("d_embed", d_model) != d_model:
        problems.append(f"d_embed {hf['d_embed']!r} != d_model {d_model!r}")
    if hf.get("attn_type", 0) != 0:
        problems.append(f"attn_type {hf['attn_type']!r} (only 0)")
    if hf.get("pre_lnorm"):
        problems.append("pre_lnorm true")
    if hf.get("untie_r", False):
        problems.append("untie_r true (per-layer r biases; ProtTXL shares them)")
    if (hf.get("sample_softmax") or -1) > 0:
        problems.append("sample_softmax")
    if hf.get("tie_word_embeddings") is False:
        problems.append("tie_word_embeddings false (untied output)")
    if problems:
        raise ProtlmError(f"{where}: unsupported transfo-xl config: {'; '.join(problems)}")
    try:
        n_head = int(hf.get("n_head", 16))
        d_model = int(d_model)
        mem_len = int(hf.get("mem_len") or 0)
        return TXLConfig(
            vocab_size=int(hf.get("vocab_size", 32)), d_model=d_model,
            n_layer=int(hf.get("n_layer", 30)), n_head=n_head,
            d_head=int(hf.get("d_head", d_model // max(n_head, 1))),
            d_inner=int(hf.get("d_inner", 4096)),
            dropout=float(hf.get("dropout", 0.1)), dropatt=float(hf.get("dropatt", 0.0)),
            layer_norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
            initializer_range=float(hf.get("init_std", 0.02)),
            mem_len=mem_len,
            eval_mem_len=int(hf["eval_mem_len"]) if hf.get("eval_mem_len") else None,
            clamp_len=int(hf.get("clamp_len", -1)),
            same_length=bool(hf.get("same_length", False)),
            segment_len=int(hf["segment_len"]) if hf.get("segment_len") else None)
    except (TypeError, ValueError) as e:
        raise ProtlmError(f"{where}: {e}") from None


def hf_config_dict(config: TXLConfig, architecture: str) -> Dict[str, Any]:
    """``config.json`` contents for ``config`` (transformers 4.x ``TransfoXLConfig``
    fields; ``eval_mem_len``/``segment_len`` are ours, read back on import)."""
    return {
        "architectures": [architecture], "model_type": "transfo-xl",
        "vocab_size": config.vocab_size, "cutoffs": [], "d_model": config.d_model,
        "d_embed": config.d_model, "n_head": config.n_head, "d_head": config.d_head,
        "d_inner": config.d_inner, "div_val": 1, "pre_lnorm": False,
        "n_layer": config.n_layer, "mem_len": config.mem_len, "clamp_len": config.clamp_len,
        "same_length": config.same_length, "proj_share_all_but_first": True,
        "attn_type": 0, "sample_softmax": -1, "adaptive": True,
        "dropout": config.dropout, "dropatt": config.dropatt, "untie_r": False,
        "init": "normal", "init_range": 0.01, "proj_init_std": 0.01,
        "init_std": config.initializer_range, "layer_norm_epsilon": config.layer_norm_eps,
        "eos_token_id": ProtTXLVocabulary.EOS_ID, "tie_word_embeddings": True,
        "eval_mem_len": config.inference_mem_len, "segment_len": config.segment_len,
    }


def vocabulary_tokens() -> List[str]:
    """Our ProtTXL tokens in id order."""
    return list(PROTTXL_SPECIALS) + list(PROTBERT_RESIDUES) + [
        f"<unused{i}>" for i in range(ProtTXLVocabulary.UNUSED)]


def write_tokenizer(directory: str, tokens: Optional[Sequence[str]] = None) -> List[str]:
    """``vocab.txt`` (one token per line, id order) and a tokenizer config."""
    tokens = list(tokens) if tokens is not None else vocabulary_tokens()
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    specials = {"eos_token": "<eos>", "unk_token": "<unk>"}
    files.write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "TransfoXLTokenizer", "lower_case": False,
        "model_max_length": 1_000_000_000, **specials})
    files.write_json(os.path.join(directory, "special_tokens_map.json"), specials)
    return ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]


# ----------------------------------------------------------------- import ---

def load(directory: str, *, mesh: Optional[jax.sharding.Mesh] = None,
         rules: Optional[Sequence] = None, encoder_only: Optional[bool] = None,
         **overrides) -> engine.Imported:
    """Imports a ``transfo-xl`` directory (``TransfoXLLMHeadModel`` or ``TransfoXLModel``).

    Raises:
      ProtlmError: one line on unsupported configs and bad tensors.
    """
    del encoder_only
    if overrides.pop("vocab_pad_to_multiple", None) is not None:
        raise ProtlmError(f"{directory}: --vocab_pad_to_multiple applies to the BERT family; "
                          "ProtTXL's 32-row vocabulary splits 2, 4 or 8 ways as it is")
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
    has_head = "crit/bias" in sources
    params = engine.assemble(sources, txl.abstract_params(cfg), mesh=mesh, rules=rules)
    return engine.Imported(
        cfg, params, vocabulary, arch, has_head, skipped=skipped, weights=reader.kind,
        metadata={"architecture": arch, "has_head": has_head,
                  "param_collections": sorted(params),
                  "vocabulary": list(vocabulary.tokens)})


# ----------------------------------------------------------------- export ---

def export(params: Any, config: TXLConfig, output: str, *, encoder_only: bool, dtype: str,
           max_shard_size: int, step: int, source: str,
           meta: Mapping[str, Any]) -> Dict[str, Any]:
    """One directory: ``TransfoXLLMHeadModel`` (``encoder_only``: ``TransfoXLModel``),
    safetensors, ``vocab.txt`` and a model card with the torch snippet."""
    tree = params.get("params", params)
    if not encoder_only and "crit" not in tree:
        raise ProtlmError(f"{source}: checkpoint has no crit (imported from a "
                          f"TransfoXLModel); export it with --encoder_only")
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


SNIPPET = """```python
import re
import torch
from protlm_jax.hf.txl_torch import TransfoXLReference  # transformers 5 has no TransfoXL

model = TransfoXLReference.from_pretrained("path/to/this/model").eval()
vocab = {t: i for i, t in enumerate(open("path/to/this/model/vocab.txt").read().split())}

sequence = re.sub(r"[UZOB]", "X", "PRTEINOSEQWENCE")  # rare residues -> X
ids = [vocab["<eos>"]] + [vocab.get(r, vocab["<unk>"]) for r in sequence]  # <eos> residues
with torch.no_grad():
    out, mems, chunks = None, None, []
    for start in range(0, len(ids), 512):              # long proteins: segments with memory
        out = model(torch.tensor([ids[start:start + 512]]), mems=mems, mem_len=1024)
        mems = out["mems"]
        chunks.append(out["hidden_states"][-1][0])
emb = torch.cat(chunks)[1:]        # per residue: drop the leading <eos>
protein = emb.mean(dim=0)          # per protein: mean over residues
```
"""


def model_card(config: TXLConfig, architecture: str, parameters: int, *, dtype: str,
               step: int, source: str) -> str:
    """README.md of an exported ProtTXL."""
    rows = [(f"`{architecture}` (this folder)",
             f"{config.n_layer} layers, d_model {config.d_model}, {config.n_head} heads x "
             f"{config.d_head}, d_inner {config.d_inner}, relu; {parameters:,} parameters")]
    return cards.render(
        title="ProtTXL", heading="ProtTXL exported by protlm-jax",
        intro=f"A Transformer-XL protein language model trained with protlm-jax (JAX/Flax) "
              f"and exported with `protlm export-hf` from `{source}` (step {step}), in "
              f"the transformers 4.x `TransfoXLLMHeadModel` layout.",
        header=("model", "shape"), rows=rows,
        details=f"Causal LM over a stream of proteins (`residues <eos>`), segment memory "
                f"`mem_len` {config.mem_len} (evaluation {config.inference_mem_len}); "
                f"vocabulary {config.vocab_size} ids (`<eos>` 0, `<unk>` 1, 25 residues "
                f"in ProtBert's order, U Z O B as X); weights {dtype} safetensors.",
        snippet_name="torch", snippet=SNIPPET,
        outro="`protlm import-hf` turns this directory back into a protlm MODEL_DIR; "
              "`protlm generate --model` samples new sequences from it.")


def reference_embeddings(hf_dir: str, sequences: Sequence[str]) -> List[Any]:
    """Per-residue embeddings of an exported ProtTXL the way its card's snippet
    computes them (torch, :mod:`protlm_jax.hf.txl_torch`): ``<eos> residues``,
    segments of ``segment_len`` with the evaluation memory, the leading
    ``<eos>`` dropped. What ``hf.convert.prottrans_embeddings`` runs for this
    family (transformers 5 has no Transformer-XL to run instead)."""
    import torch

    model = txl_torch.TransfoXLReference.from_pretrained(hf_dir).eval()
    config = files.read_config(hf_dir)
    vocab = tokenizers.checkpoint_tokens(hf_dir) or VocabTxtVocabulary(vocabulary_tokens())
    segment = int(config.get("segment_len") or 1 << 30)
    mem_len = int(config.get("eval_mem_len") or config.get("mem_len") or 0)
    out = []
    for seq in sequences:
        ids = [vocab.eos_id] + list(vocab.encode(re.sub(RARE_RESIDUES_PATTERN, "X", seq)))
        mems, chunks = None, []
        with torch.no_grad():
            for start in range(0, len(ids), segment):
                step = model(torch.tensor([ids[start:start + segment]]), mems=mems,
                             mem_len=mem_len)
                mems = step["mems"] if mem_len else None
                chunks.append(step["hidden_states"][-1][0])
        out.append(torch.cat(chunks)[1:].numpy())
    return out
