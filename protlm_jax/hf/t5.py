"""Hugging Face T5 <-> protlm-jax ProtT5: key table, config translation, head rules.

The engine (:mod:`protlm_jax.hf.engine`) does the checking, assembly and
writing; this module holds what is T5's own:

* ``TABLE``: every HF parameter name pattern -> our parameter path and layout;
* ``config_from_hf`` / ``hf_config_dict`` (transformers 4 and 5 read the
  ``config.json`` written here the same way);
* the head rules (REFERENCE §9). Configs written by transformers 4 have no
  ``scale_decoder_outputs``; there ``tie_word_embeddings`` (default true)
  decides the d_model**-0.5 scaling. transformers 5 ties the head unless the
  checkpoint's ``lm_head.weight`` differs from ``shared.weight``; so a
  published ProtT5 checkpoint (no ``tie_word_embeddings``, its own
  ``lm_head.weight``) imports untied *and* scaled, as transformers 5 loads it.
  On export a tied head is written scaled (T5 v1.0) and an untied one
  unscaled (T5 v1.1): an untied scaled head gets d_model**-0.5 folded into
  ``lm_head.weight``, and a tied unscaled one a copy of the embedding, so both
  ``config.json`` conventions give the same model;
* ``T5EncoderModel`` directories (``shared`` + ``encoder.*``) load encoder
  only, like the published half-precision ProtT5 encoder.

Shape legend: D d_model, H heads, K d_kv, F d_ff, V vocab, R relpos buckets.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence

import jax
import numpy as np

from protlm_jax.errors import ProtlmError
from protlm_jax.hf import cards, engine, files, tokenizers
from protlm_jax.hf.engine import Rule
from protlm_jax.models import t5
from protlm_jax.models.t5 import T5Config

_BLOCK = "{stack}.block.{i}.layer"
TABLE = engine.KeyTable((
    Rule("shared.weight", "token_embedder/embedding"),
    Rule("{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight",
         "{stack}/relpos_bias/rel_embedding", "T"),
    # Encoder block: layer.0 self-attention, layer.1 feed-forward.
    Rule("encoder.block.{i}.layer.0.SelfAttention.{proj}.weight",
         "encoder/layers_{i}/attention/{proj}/kernel", "heads_in"),
    Rule("encoder.block.{i}.layer.0.SelfAttention.o.weight",
         "encoder/layers_{i}/attention/out/kernel", "heads_out"),
    Rule("encoder.block.{i}.layer.0.layer_norm.weight",
         "encoder/layers_{i}/pre_attention_layer_norm/scale"),
    Rule("encoder.block.{i}.layer.1.DenseReluDense.{wi}.weight",
         "encoder/layers_{i}/mlp/{wi}/kernel", "T"),
    Rule("encoder.block.{i}.layer.1.layer_norm.weight",
         "encoder/layers_{i}/pre_mlp_layer_norm/scale"),
    Rule("encoder.final_layer_norm.weight", "encoder/encoder_norm/scale"),
    # Decoder block: layer.0 self-attention, layer.1 cross-attention, layer.2 FF.
    Rule("decoder.block.{i}.layer.0.SelfAttention.{proj}.weight",
         "decoder/layers_{i}/self_attention/{proj}/kernel", "heads_in"),
    Rule("decoder.block.{i}.layer.0.SelfAttention.o.weight",
         "decoder/layers_{i}/self_attention/out/kernel", "heads_out"),
    Rule("decoder.block.{i}.layer.0.layer_norm.weight",
         "decoder/layers_{i}/pre_self_attention_layer_norm/scale"),
    Rule("decoder.block.{i}.layer.1.EncDecAttention.{proj}.weight",
         "decoder/layers_{i}/encoder_decoder_attention/{proj}/kernel", "heads_in"),
    Rule("decoder.block.{i}.layer.1.EncDecAttention.o.weight",
         "decoder/layers_{i}/encoder_decoder_attention/out/kernel", "heads_out"),
    Rule("decoder.block.{i}.layer.1.layer_norm.weight",
         "decoder/layers_{i}/pre_cross_attention_layer_norm/scale"),
    Rule("decoder.block.{i}.layer.2.DenseReluDense.{wi}.weight",
         "decoder/layers_{i}/mlp/{wi}/kernel", "T"),
    Rule("decoder.block.{i}.layer.2.layer_norm.weight",
         "decoder/layers_{i}/pre_mlp_layer_norm/scale"),
    Rule("decoder.final_layer_norm.weight", "decoder/decoder_norm/scale"),
    Rule("lm_head.weight", "decoder/logits_dense/kernel", "T"),
), placeholders={"stack": {"encoder": "encoder", "decoder": "decoder"},
                 "proj": {"q": "query", "k": "key", "v": "value"},
                 "wi": {"wi": "wi", "wi_0": "wi_0", "wi_1": "wi_1", "wo": "wo"}})

# Read past: a cross-attention bias some old checkpoints hold (unused by
# transformers too).
_IGNORED = (r"decoder\.block\.0\.layer\.1\.EncDecAttention\.relative_attention_bias\.weight",)
# The stacks' copies of the shared embedding: checked equal to it.
_TIED = ((r"(encoder|decoder)\.embed_tokens\.weight", "shared.weight"),)
_BODY = ("shared.", "encoder.", "decoder.")

# HF (is_gated_act, dense_act_fn) -> our feed_forward_proj.
_ACTIVATIONS = {(False, "relu"): "relu", (True, "gelu_new"): "gated-gelu",
                (True, "silu"): "gated-silu"}
# transformers.T5Config defaults, for keys a config.json leaves out.
_HF_DEFAULTS = dict(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6,
                    num_heads=8, relative_attention_num_buckets=32,
                    relative_attention_max_distance=128, dropout_rate=0.1,
                    layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1,
                    decoder_start_token_id=0)


# ---------------------------------------------------------------- configs ---

def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> T5Config:
    """Our ``T5Config`` for a Hugging Face T5 ``config.json`` (transformers 4 or 5).

    ``scale_decoder_outputs`` is the file's own key when present (transformers
    5), else ``tie_word_embeddings`` (default true; transformers 4). The head is
    returned tied; whether it is really tied depends on the checkpoint's
    tensors (:func:`load` decides).

    Args:
      hf: the parsed ``config.json``.
      where: the file, for messages.

    Returns:
      The config (float32 activations, unscanned).

    Raises:
      ProtlmError: one line listing every unsupported option.
    """
    problems: List[str] = []
    model_type = hf.get("model_type", "t5")
    if model_type not in ("t5", "mt5"):
        problems.append(f"model_type {model_type!r} (only T5 and mT5 share the T5 "
                        f"architecture modelled here)")
    ffp = str(hf.get("feed_forward_proj", "relu"))
    parts = ffp.split("-")
    if (len(parts) > 1 and parts[0] != "gated") or len(parts) > 2:
        problems.append(f"feed_forward_proj {ffp!r} is not of the form ACT or gated-ACT")
    gated = parts[0] == "gated"
    act = "gelu_new" if ffp == "gated-gelu" else parts[-1]
    # transformers 5 lets explicit is_gated_act / dense_act_fn keys win.
    gated = bool(hf.get("is_gated_act", gated))
    act = str(hf.get("dense_act_fn", act))
    kind = _ACTIVATIONS.get((gated, act))
    if kind is None:
        problems.append(
            f"feed-forward activation {'gated ' if gated else ''}{act!r} (feed_forward_proj "
            f"{ffp!r}) is not supported; supported: relu, gated-gelu (gelu_new), gated-silu")
    values = {k: hf.get(k, default) for k, default in _HF_DEFAULTS.items()}
    num_decoder_layers = hf.get("num_decoder_layers")  # None: as many as the encoder
    values["num_decoder_layers"] = (values["num_layers"] if num_decoder_layers is None
                                    else num_decoder_layers)
    for key in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
        v = values[key]
        if isinstance(v, list) and len(v) == 1:
            values[key] = v[0]
    for key in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers",
                "num_heads", "relative_attention_num_buckets",
                "relative_attention_max_distance"):
        v = values[key]
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            problems.append(f"{key} {v!r} (a positive integer is needed)")
    for key in ("eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if not isinstance(values[key], int) or isinstance(values[key], bool):
            problems.append(f"{key} {values[key]!r} (one integer id is needed)")
    buckets = values["relative_attention_num_buckets"]
    if isinstance(buckets, int) and buckets % 2:
        problems.append(f"relative_attention_num_buckets {buckets} (odd counts split "
                        f"unevenly between the encoder's two directions)")
    if hf.get("is_decoder"):
        problems.append("is_decoder true (a decoder-only T5 stack)")
    if problems:
        raise ProtlmError(f"{where}: unsupported T5 config: {'; '.join(problems)}")
    scale = hf.get("scale_decoder_outputs")
    if scale is None:
        scale = hf.get("tie_word_embeddings", True) is not False
    return T5Config(
        vocab_size=values["vocab_size"], d_model=values["d_model"], num_heads=values["num_heads"],
        d_kv=values["d_kv"], d_ff=values["d_ff"], num_encoder_layers=values["num_layers"],
        num_decoder_layers=values["num_decoder_layers"],
        relative_attention_num_buckets=buckets,
        relative_attention_max_distance=values["relative_attention_max_distance"],
        dropout_rate=float(values["dropout_rate"]),
        layer_norm_epsilon=float(values["layer_norm_epsilon"]), feed_forward_proj=kind,
        tie_word_embeddings=True, scale_decoder_outputs=bool(scale),
        pad_id=values["pad_token_id"], eos_id=values["eos_token_id"],
        decoder_start_token_id=values["decoder_start_token_id"])


def hf_config_dict(config: T5Config, *, encoder_only: bool = False,
                   torch_dtype: str = "float32") -> Dict[str, Any]:
    """A ``config.json`` that transformers 4 and 5 read the same way.

    Written for the head as exported (:func:`export`): tied heads are scaled
    (T5 v1.0), untied heads unscaled (T5 v1.1), so ``tie_word_embeddings``
    and ``scale_decoder_outputs`` always agree and both conventions (REFERENCE
    §9) give the same model. The exporter folds a scaled untied head into the
    weights and writes a copy of the embedding for an unscaled tied one.
    """
    import transformers  # local: the library is usable without transformers

    tie = config.tie_word_embeddings and config.scale_decoder_outputs
    gated = config.feed_forward_proj.startswith("gated")
    return {
        "architectures": ["T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"],
        "model_type": "t5",
        "vocab_size": config.vocab_size, "d_model": config.d_model, "d_kv": config.d_kv,
        "d_ff": config.d_ff, "num_layers": config.num_encoder_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "dropout_rate": config.dropout_rate, "layer_norm_epsilon": config.layer_norm_epsilon,
        "initializer_factor": 1.0,
        "feed_forward_proj": config.feed_forward_proj,
        "dense_act_fn": {"relu": "relu", "gated-gelu": "gelu_new",
                         "gated-silu": "silu"}[config.feed_forward_proj],
        "is_gated_act": gated,
        "is_encoder_decoder": True, "use_cache": True,
        "pad_token_id": config.pad_id, "eos_token_id": config.eos_id,
        "decoder_start_token_id": config.decoder_start_token_id,
        "tie_word_embeddings": tie, "scale_decoder_outputs": tie,
        "dtype": torch_dtype, "torch_dtype": torch_dtype,
        "transformers_version": transformers.__version__,
    }


def hf_config_from_t5config(config: T5Config):
    """The ``transformers.T5Config`` of the same architecture (transformers 5).

    ``scale_decoder_outputs`` is set explicitly. ``tie_word_embeddings`` stays
    True in the returned object: in transformers 5 it also ties the stacks'
    ``embed_tokens`` to ``shared``, and an untied LM head comes from a
    checkpoint whose ``lm_head.weight`` differs from ``shared.weight``. (The
    ``config.json`` the exporter writes is ``hf_config_dict``.)

    Args:
      config: our config.

    Returns:
      A ``transformers.T5Config``.
    """
    import transformers  # local: the library is usable without transformers

    hf = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.d_kv,
        d_ff=config.d_ff, num_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relative_attention_num_buckets,
        relative_attention_max_distance=config.relative_attention_max_distance,
        dropout_rate=config.dropout_rate, layer_norm_epsilon=config.layer_norm_epsilon,
        feed_forward_proj=config.feed_forward_proj, pad_token_id=config.pad_id,
        eos_token_id=config.eos_id, decoder_start_token_id=config.decoder_start_token_id,
        scale_decoder_outputs=config.scale_decoder_outputs)
    return hf




# ---------------------------------------------------- architecture, check ---

def _unscanned(config: T5Config) -> T5Config:
    return config.replace(scan_layers=False, dtype="float32", remat_policy="none",
                          dropout_rate=0.0)


def expected_tensors(config: T5Config, encoder_only: bool = False) -> Dict[str, engine.Tensor]:
    """Every HF tensor of the architecture (``lm_head`` only when untied)."""
    return _expected(_unscanned(config), encoder_only)


@functools.lru_cache(maxsize=16)
def _expected(config: T5Config, encoder_only: bool) -> Dict[str, engine.Tensor]:
    # Traced once per shape (eval_shape of a 3B model takes seconds).
    abstract = t5.abstract_params(config, encoder_only=encoder_only)
    return engine.expected_tensors(TABLE, abstract)


CONFIG_RULES = engine.ConfigRules(
    positive=("vocab_size", "d_model", "d_kv", "d_ff", "num_heads",
              "relative_attention_num_buckets", "relative_attention_max_distance"),
    integers=("eos_token_id", "pad_token_id", "decoder_start_token_id"),
    reals=("dropout_rate", "layer_norm_epsilon", "initializer_factor"),
    layers={"num_layers": r"encoder\.block\.(\d+)\..*",
            "num_decoder_layers": r"decoder\.block\.(\d+)\..*"})


def _policy(encoder_only: bool, tied: bool) -> engine.Policy:
    not_needed = ((lambda n: n.startswith("decoder.") or n == "lm_head.weight")
                  if encoder_only else (lambda n: False))
    head_tie = ((r"lm_head\.weight", "shared.weight"),) if tied else ()
    return engine.Policy(label="T5", ignored=_IGNORED, not_needed=not_needed,
                         tied=_TIED + head_tie, body=_BODY)


def _read(reader, config: T5Config, encoder_only: Optional[bool], where: str):
    """Decides encoder_only and tying from the tensors, then checks them all."""
    names = set(reader.keys())
    has_decoder = any(n.startswith("decoder.") for n in names)
    if encoder_only is None:
        encoder_only = not has_decoder
    elif not encoder_only and not has_decoder:
        raise ProtlmError(f"{where}: an encoder-only checkpoint (T5EncoderModel: no "
                          f"decoder tensors); it loads only as an encoder")
    tied = True
    if not encoder_only and "lm_head.weight" in names and "shared.weight" in names:
        shared = reader.get("shared.weight")
        tied = reader.shape("lm_head.weight") == shared.shape and np.array_equal(
            reader.get("lm_head.weight"), shared)
    config = config.replace(tie_word_embeddings=tied)
    sources, skipped = engine.check(reader, TABLE, expected_tensors(config, encoder_only),
                                    _policy(encoder_only, tied), where=where)
    return config, encoder_only, sources, skipped


def load(hf_dir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
         rules: Optional[Sequence] = None, encoder_only: Optional[bool] = True,
         **overrides: Any) -> engine.Imported:
    """Loads a Hugging Face T5 directory (e.g. ProtT5-XL) as our config and params.

    Everything is checked from names and shapes first (one line listing every
    problem); tensors are then read one at a time straight into their
    shardings on ``mesh`` (numpy leaves without one).

    Args:
      hf_dir: ``T5ForConditionalGeneration`` or ``T5EncoderModel`` directory.
      mesh, rules: where the params go.
      encoder_only: params of the encoder half (True), of the whole model
        (False), or whatever the checkpoint holds (None).
      **overrides: ``T5Config`` fields to change, e.g. ``scan_layers=True`` or
        ``dtype="bfloat16"`` (shapes stay). ``generator`` and
        ``vocab_pad_to_multiple`` (other families' options) are refused.

    Raises:
      ProtlmError: one line on unsupported options and bad tensors.
    """
    hf = files.read_config(hf_dir)
    if overrides.pop("generator", None) is not None:
        raise ProtlmError(f"--generator: only for ELECTRA; {hf_dir} is model_type "
                          f"{hf.get('model_type', 't5')!r}")
    if overrides.pop("vocab_pad_to_multiple", None) not in (None, 1):
        raise ProtlmError("--vocab_pad_to_multiple: only for the BERT family (T5 "
                          "vocabularies are stored as they are)")
    reader = files.CheckpointReader(hf_dir)
    engine.check_config(hf, reader, TABLE, CONFIG_RULES,
                        where=os.path.join(hf_dir, "config.json"))
    config = config_from_hf(hf, os.path.join(hf_dir, "config.json"))
    config, encoder_only, sources, skipped = _read(reader, config, encoder_only, hf_dir)
    config = config.replace(**overrides)
    params = engine.assemble(sources, t5.abstract_params(config, encoder_only=encoder_only),
                             mesh=mesh, rules=rules)
    arch = "T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"
    return engine.Imported(config, params, None, arch, has_head=not encoder_only,
                           encoder_only=encoder_only, skipped=skipped, weights=reader.kind)


def params_from_state_dict(state_dict: Mapping[str, Any], config: T5Config,
                           encoder_only: bool = False) -> Dict[str, Any]:
    """An in-memory HF T5 ``state_dict`` as our params (float32 numpy).

    The head's tying follows ``config.tie_word_embeddings``; decoder keys are
    read past when ``encoder_only``; ``config.scan_layers`` stacks the layers.

    Raises:
      ProtlmError: unknown keys inside the network, missing or misshapen ones.
    """
    reader = files.StateDictReader(state_dict)
    tied = config.tie_word_embeddings
    sources, _ = engine.check(reader, TABLE, expected_tensors(config, encoder_only),
                              _policy(encoder_only, tied), where="state dict")
    return engine.assemble(sources, t5.abstract_params(config, encoder_only=encoder_only))


# ----------------------------------------------------------------- export ---

def hf_tensors(params: Any, config: T5Config, encoder_only: bool = False):
    """HF tensors of the model as exported (head folded as the module says)."""
    shared = None
    for name, w in engine.hf_tensors(params, expected_tensors(config, encoder_only)):
        if name == "shared.weight":
            shared = w
        if name == "lm_head.weight" and config.scale_decoder_outputs:
            # (y * s) @ W == y @ (s * W); exact when s is a power of two.
            w = (w * np.float32(config.d_model ** -0.5)).astype(np.float32)
        yield name, w
    if (not encoder_only and config.tie_word_embeddings
            and not config.scale_decoder_outputs):
        yield "lm_head.weight", shared.copy()


def export(params: Any, config: T5Config, output: str, *, encoder_only: bool, dtype: str,
           max_shard_size: int, step: int, source: str,
           meta: Mapping[str, Any]) -> Dict[str, Any]:
    """Writes a ``T5ForConditionalGeneration`` (or ``T5EncoderModel``) directory:
    weights, ``config.json``, ``generation_config.json``, the ProtT5 tokenizer
    and a model card."""
    os.makedirs(output, exist_ok=True)
    files.remove_stale_weights(output)
    counted: Dict[str, int] = {}
    written = files.write_safetensors(
        engine.counting(hf_tensors(params, config, encoder_only), counted), output,
        dtype=dtype, max_shard_size=max_shard_size)
    files.write_json(os.path.join(output, "config.json"), hf_config_dict(
        config, encoder_only=encoder_only, torch_dtype=dtype))
    files.write_json(os.path.join(output, "generation_config.json"), {
        "decoder_start_token_id": config.decoder_start_token_id,
        "eos_token_id": config.eos_id, "pad_token_id": config.pad_id})
    written += ["config.json", "generation_config.json"]
    written += tokenizers.write_prott5_tokenizer(output)
    n = counted.get("parameters", 0)
    if not encoder_only and config.tie_word_embeddings and not config.scale_decoder_outputs:
        n -= config.vocab_size * config.d_model  # the lm_head copy is not a parameter
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, encoder_only=encoder_only, dtype=dtype, source=source,
                           step=step, num_params=n))
    written.append("README.md")
    return {"files": written, "parameters": n,
            "architecture": "T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"}


# (tokenizer class, model class, index of the first residue token) of ProtT5's snippet.
SNIPPET = ("T5Tokenizer", "T5EncoderModel", 0)
# What hf.convert.prottrans_embeddings runs: the snippet's own classes.
REFERENCE_CLASSES = SNIPPET


def model_card(config: T5Config, *, encoder_only: bool, dtype: str, source: str,
               step: int, num_params: int) -> str:
    """README.md of the exported model, with the ProtTrans usage snippet."""
    model_class = "T5EncoderModel" if encoder_only else "T5ForConditionalGeneration"
    decoder = "" if encoder_only else f" + {config.num_decoder_layers} decoder"
    return cards.render(
        title="ProtT5",
        heading=f"ProtT5 ({'encoder only' if encoder_only else 'encoder-decoder'}) "
                f"exported by protlm-jax",
        intro=f"A T5 protein language model trained with protlm-jax (JAX/Flax) and exported "
              f"with `protlm export-hf` from `{source}` (step {step}).",
        header=("", ""),
        rows=[("class", f"`{model_class}`"),
              ("layers", f"{config.num_encoder_layers} encoder{decoder}"),
              ("d_model / heads × d_kv / d_ff", f"{config.d_model} / {config.num_heads} × "
               f"{config.d_kv} / {config.d_ff}"),
              ("feed-forward", config.feed_forward_proj),
              ("relative position buckets / max distance",
               f"{config.relative_attention_num_buckets} / "
               f"{config.relative_attention_max_distance}"),
              ("vocabulary", f"{config.vocab_size} (ProtT5 ids: 0 pad, 1 `</s>`, 2 unk, 3–27 "
               f"residues, 28–127 sentinels)"),
              ("parameters", f"{num_params:,}"),
              ("weights", f"{dtype} safetensors")],
        details="Pretraining objective (ProtT5): 15 % of residues are each replaced by their "
                "own\nsentinel in the encoder input; the decoder reconstructs the whole "
                "sequence.",
        snippet_name="ProtTrans", snippet=SNIPPET,
        outro="The same embeddings in JAX: `protlm embed --model path/to/this/model ...`\n"
              "(`protlm import-hf` turns this directory back into a protlm MODEL_DIR).")


def encoder_tensors(config: T5Config) -> Dict[str, engine.Tensor]:
    """The HF tensors of the encoder-only export (``T5EncoderModel``; PEFT
    adapters name their modules after these)."""
    return expected_tensors(config, encoder_only=True)
