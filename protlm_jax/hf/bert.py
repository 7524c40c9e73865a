"""Hugging Face BERT / ALBERT / ELECTRA <-> protlm-jax: key tables, configs, head rules.

The engine (:mod:`protlm_jax.hf.engine`) checks, assembles and writes; this
module holds the BERT family's own rules:

* one key table per family (and ELECTRA tower): HF names without their
  ``bert.``/``albert.``/``electra.`` prefix (which ``*Model`` checkpoints
  lack) <-> our parameter paths;
* tied decoder weights (``cls.predictions.decoder.weight``,
  ``predictions.decoder.weight``, ``generator_lm_head.weight``) are not stored
  by us: on import they must equal the word embeddings; on export they are
  left out and transformers ties them again; a decoder bias stands in for a
  missing head bias;
* unknown tensors inside the network (``embeddings.``, ``encoder.``) are
  errors; heads we do not model (pooler, NSP/SOP, task heads) are skipped with
  a warning;
* BERT/ALBERT export as ``*ForMaskedLM`` (``*Model`` without the head);
  ELECTRA as the discriminator (``ElectraForPreTraining``) in HF_DIR and the
  generator (``ElectraForMaskedLM``) in ``HF_DIR/generator``;
* tokenizers: ``vocab.txt`` with ``do_lower_case=False`` (BERT, ELECTRA) or
  an ALBERT ``spiece.model``; an imported checkpoint keeps its own.

ProtAlbert's SentencePiece model has 34 ids whose order REFERENCE marks
UNVERIFIED. The one written here (:func:`tokenizers.albert_pieces`) is:
0 ``<pad>``, 1 ``<unk>``, 2 ``[CLS]``, 3 ``[SEP]``, 4 ``[MASK]`` (ALBERT's
usual special ids), 5-29 the residues ``▁L ▁A ▁G …`` in ProtBert's order (so
residue and special ids equal ProtBert's and the ``*_mlm`` tasks feed ALBERT
unchanged), 30 ``▁`` and 31-33 unused pieces.

Shape legend: V vocab (Vp padded), E embedding size, D hidden, H heads,
K head size, F intermediate, N layers.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import jax
import numpy as np

from protlm_jax.data.vocabularies import VocabTxtVocabulary
from protlm_jax.errors import ProtlmError
from protlm_jax.hf import cards, engine, files, tokenizers
from protlm_jax.hf.engine import Rule
from protlm_jax.models import bert, electra
from protlm_jax.models.bert import BertConfig
from protlm_jax.models.electra import ElectraConfig
from protlm_jax.models.family import flat_paths

ModelConfig = Union[BertConfig, ElectraConfig]

# ------------------------------------------------------------ key tables ---

# One BERT/ELECTRA encoder layer (HF ``encoder.layer.{i}``), relative to it.
_BERT_LAYER = (
    Rule("attention.self.{proj}.weight", "attention/{proj}/kernel", "heads_in"),
    Rule("attention.self.{proj}.bias", "attention/{proj}/bias", "heads_bias"),
    Rule("attention.output.dense.weight", "attention/out/kernel", "heads_out"),
    Rule("attention.output.dense.bias", "attention/out/bias"),
    Rule("attention.output.LayerNorm.{ln}", "attention_layer_norm/{ln}"),
    Rule("intermediate.dense.weight", "mlp/wi/kernel", "T"),
    Rule("intermediate.dense.bias", "mlp/wi/bias"),
    Rule("output.dense.weight", "mlp/wo/kernel", "T"),
    Rule("output.dense.bias", "mlp/wo/bias"),
    Rule("output.LayerNorm.{ln}", "mlp_layer_norm/{ln}"),
)
# One ALBERT layer (``albert_layer_groups.{g}.albert_layers.{j}``).
_ALBERT_LAYER = (
    Rule("attention.{proj}.weight", "attention/{proj}/kernel", "heads_in"),
    Rule("attention.{proj}.bias", "attention/{proj}/bias", "heads_bias"),
    Rule("attention.dense.weight", "attention/out/kernel", "heads_out"),
    Rule("attention.dense.bias", "attention/out/bias"),
    Rule("attention.LayerNorm.{ln}", "attention_layer_norm/{ln}"),
    Rule("ffn.weight", "mlp/wi/kernel", "T"),
    Rule("ffn.bias", "mlp/wi/bias"),
    Rule("ffn_output.weight", "mlp/wo/kernel", "T"),
    Rule("ffn_output.bias", "mlp/wo/bias"),
    Rule("full_layer_layer_norm.{ln}", "mlp_layer_norm/{ln}"),
)
_EMBEDDINGS = (
    Rule("embeddings.word_embeddings.weight", "embeddings/word_embeddings/embedding",
         "vocab_rows"),
    Rule("embeddings.position_embeddings.weight", "embeddings/position_embeddings"),
    Rule("embeddings.token_type_embeddings.weight", "embeddings/token_type_embeddings"),
    Rule("embeddings.LayerNorm.{ln}", "embeddings/layer_norm/{ln}"),
)
_PLACEHOLDERS = {"proj": {"query": "query", "key": "key", "value": "value"},
                 # weight/bias written; gamma/beta read (old TF conversions).
                 "ln": {"weight": "scale", "bias": "bias", "gamma": "scale", "beta": "bias"}}


def _nested(hf_prefix: str, our_prefix: str, rules: Sequence[Rule]) -> Tuple[Rule, ...]:
    return tuple(Rule(f"{hf_prefix}.{r.hf}", f"{our_prefix}/{r.ours}", r.transform, r.head)
                 for r in rules)


def _heads(hf_prefix: str, our_prefix: str, names: Sequence[Tuple[str, str, str]]):
    return tuple(Rule(f"{hf_prefix}{h}", f"{our_prefix}/{o}", t, head=True)
                 for h, o, t in names)


_MLM_HEAD = (("dense.weight", "dense/kernel", "T"), ("dense.bias", "dense/bias", "copy"),
             ("LayerNorm.{ln}", "layer_norm/{ln}", "copy"))


@functools.lru_cache(maxsize=None)
def key_table(family: str, tower: str = "") -> engine.KeyTable:
    """The key table of one family ("bert", "albert", "electra"; ELECTRA: of one
    tower, "discriminator" or "generator", whose paths it prefixes)."""
    if family == "bert":
        rules = _EMBEDDINGS + _nested("encoder.layer.{i}", "encoder/layers_{i}", _BERT_LAYER) \
            + _heads("cls.predictions.transform.", "mlm_head", _MLM_HEAD) \
            + (Rule("cls.predictions.bias", "mlm_head/bias", "vocab_vec", head=True),)
    elif family == "albert":
        rules = _EMBEDDINGS + (
            Rule("encoder.embedding_hidden_mapping_in.weight", "embedding_projection/kernel", "T"),
            Rule("encoder.embedding_hidden_mapping_in.bias", "embedding_projection/bias"),
        ) + _nested("encoder.albert_layer_groups.{g}.albert_layers.{j}",
                    "encoder/groups_{g}/layers_{j}", _ALBERT_LAYER) \
            + _heads("predictions.", "mlm_head", _MLM_HEAD) \
            + (Rule("predictions.bias", "mlm_head/bias", "vocab_vec", head=True),)
    elif family == "electra" and tower in ("discriminator", "generator"):
        rules = _EMBEDDINGS + (
            Rule("embeddings_project.weight", f"{tower}/embedding_projection/kernel", "T"),
            Rule("embeddings_project.bias", f"{tower}/embedding_projection/bias"),
        ) + _nested("encoder.layer.{i}", f"{tower}/encoder/layers_{{i}}", _BERT_LAYER)
        if tower == "discriminator":
            rules += _heads("discriminator_predictions.", "discriminator_head", (
                ("dense.weight", "dense/kernel", "T"), ("dense.bias", "dense/bias", "copy"),
                ("dense_prediction.weight", "prediction/kernel", "T"),
                ("dense_prediction.bias", "prediction/bias", "copy")))
        else:
            rules += _heads("generator_predictions.", "generator_head", _MLM_HEAD) + (
                Rule("generator_lm_head.bias", "generator_head/bias", "vocab_vec", head=True),)
    else:
        raise ValueError(f"no key table for family {family!r} tower {tower!r}")
    # ``{{i}}`` above survives the f-string as ``{i}``.
    return engine.KeyTable(rules, _PLACEHOLDERS, base_prefix=f"{family}.")


# Buffers, not parameters: read past silently.
_BUFFERS = (r".*position_ids", r".*token_type_ids")
# Unknown tensors under these are inside the network: an error.
_BODY = ("embeddings.", "embeddings_project.", "encoder.")
_WORD = "embeddings.word_embeddings.weight"
_TIED = {"bert": ((r"cls\.predictions\.decoder\.weight", _WORD),),
         "albert": ((r"predictions\.decoder\.weight", _WORD),),
         "electra": ((r"generator_lm_head\.weight", _WORD),)}
_STAND_INS = {"bert": (("cls.predictions.decoder.bias", "cls.predictions.bias"),),
              "albert": (("predictions.decoder.bias", "predictions.bias"),),
              "electra": ()}
_ARCHITECTURES = {
    "bert": ("BertForMaskedLM", "BertModel"),
    "albert": ("AlbertForMaskedLM", "AlbertModel"),
    "electra": ("ElectraForPreTraining", "ElectraModel"),
}
_HEADS = ("mlm_head/", "discriminator_head/", "generator_head/")


def _tower_config(config: ModelConfig, tower: str) -> BertConfig:
    return getattr(config, tower or "discriminator") if isinstance(config, ElectraConfig) \
        else config


def _abstract(config: ModelConfig) -> Any:
    return (electra.abstract_params if isinstance(config, ElectraConfig)
            else bert.abstract_params)(config)


def _unscanned(config: ModelConfig) -> ModelConfig:
    if isinstance(config, ElectraConfig):
        return ElectraConfig(discriminator=config.discriminator.replace(scan_layers=False),
                             generator=config.generator.replace(scan_layers=False))
    return config.replace(scan_layers=False)


@functools.lru_cache(maxsize=16)
def _abstract_unscanned(config: ModelConfig) -> Dict[str, Any]:
    return flat_paths(_abstract(_unscanned(config)))


def expected_tensors(config: ModelConfig, tower: str = "", *, with_head: bool = True,
                     prefixed: bool = False) -> Dict[str, engine.Tensor]:
    """Every HF tensor of one model directory (ELECTRA: of one ``tower``)."""
    cfg = _tower_config(config, tower)
    flat = _abstract_unscanned(config)
    if isinstance(config, ElectraConfig):
        flat = {k: v for k, v in flat.items()
                if k.startswith(("embeddings/", f"{tower}/", f"{tower}_head/"))}
    return engine.expected_tensors(key_table(cfg.family, tower if cfg.family == "electra"
                                             else ""), flat,
                                   vocab_size=cfg.vocab_size, with_head=with_head,
                                   prefixed=prefixed)


def _policy(family: str, require_head: Optional[bool] = None) -> engine.Policy:
    return engine.Policy(label=family, ignored=_BUFFERS, tied=_TIED[family],
                         stand_ins=_STAND_INS[family], body=_BODY, require_head=require_head)


def check_tensors(reader: Any, config: ModelConfig, *, tower: str = "",
                  where: str = "state dict", require_head: Optional[bool] = None):
    """Checks one directory's tensors (see :func:`engine.check`)."""
    cfg = _tower_config(config, tower)
    table = key_table(cfg.family, tower if cfg.family == "electra" else "")
    return engine.check(reader, table, expected_tensors(config, tower),
                        _policy(cfg.family, require_head), where=where)


def params_from_state_dict(state_dict: Mapping[str, Any], config: ModelConfig, *,
                           tower: str = "", where: str = "state dict",
                           require_head: Optional[bool] = None) -> Dict[str, Any]:
    """An in-memory HF state dict as our params (float32 numpy; only the parts
    it provides)."""
    sources, _ = check_tensors(files.StateDictReader(state_dict), config,
                               tower=tower or ("discriminator" if isinstance(
                                   config, ElectraConfig) else ""),
                               where=where, require_head=require_head)
    return engine.assemble(sources, _abstract(config))


# --------------------------------------------------------------- configs ---

_BERT_LAYERS = {"num_hidden_layers": r"encoder\.layer\.(\d+)\..*"}
CONFIG_RULES = {family: engine.ConfigRules(
    positive=("vocab_size", "hidden_size", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "type_vocab_size", "embedding_size"),
    integers=("pad_token_id",),
    reals=("layer_norm_eps", "hidden_dropout_prob", "attention_probs_dropout_prob",
           "initializer_range", "classifier_dropout_prob"),
    layers=layers) for family, layers in (
        ("bert", _BERT_LAYERS), ("electra", _BERT_LAYERS),
        ("albert", {"num_hidden_layers": None,  # layers share the groups' weights
                    "num_hidden_groups": r"encoder\.albert_layer_groups\.(\d+)\..*",
                    "inner_group_num":
                        r"encoder\.albert_layer_groups\.\d+\.albert_layers\.(\d+)\..*"}))}


def check_config(hf: Mapping[str, Any], reader: Any, where: str) -> None:
    """An untrusted ``config.json``'s values against the tensors present
    (:func:`engine.check_config`), before anything is built; an unknown
    ``model_type`` is left to :func:`config_from_hf` to name."""
    family = hf.get("model_type")
    if family in CONFIG_RULES:
        table = key_table(family, "discriminator" if family == "electra" else "")
        engine.check_config(hf, reader, table, CONFIG_RULES[family], where=where)


def config_from_hf(hf: Mapping[str, Any], where: str = "config.json") -> BertConfig:
    """Our ``BertConfig`` (family from ``model_type``) from a HF ``config.json`` dict.

    Raises:
      ProtlmError: one line listing unsupported options.
    """
    family = hf.get("model_type")
    if family not in _ARCHITECTURES:
        raise ProtlmError(f"{where}: model_type {family!r} is not bert, albert or electra")
    problems = []
    if hf.get("position_embedding_type", "absolute") != "absolute":
        problems.append(f"position_embedding_type {hf['position_embedding_type']!r} "
                        "(only 'absolute')")
    if hf.get("is_decoder") or hf.get("add_cross_attention"):
        problems.append("decoder / cross-attention BERTs")
    act = hf.get("hidden_act", "gelu_new" if family == "albert" else "gelu")
    if act not in bert.ACTIVATIONS:
        problems.append(f"hidden_act {act!r} (supported: {sorted(bert.ACTIVATIONS)})")
    if hf.get("tie_word_embeddings") is False:
        problems.append("tie_word_embeddings false (untied MLM decoder)")
    if family != "albert" and hf.get("num_hidden_groups", 1) != 1:
        problems.append("num_hidden_groups outside ALBERT")
    if problems:
        raise ProtlmError(f"{where}: unsupported {family} config: {'; '.join(problems)}")
    defaults = {"bert": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                             intermediate_size=3072, max_position_embeddings=512),
                "albert": dict(hidden_size=4096, num_hidden_layers=12, num_attention_heads=64,
                               intermediate_size=16384, max_position_embeddings=512,
                               embedding_size=128),
                "electra": dict(hidden_size=256, num_hidden_layers=12, num_attention_heads=4,
                                intermediate_size=1024, max_position_embeddings=512,
                                embedding_size=128)}[family]
    get = lambda k, d=None: hf.get(k, defaults.get(k, d))  # noqa: E731
    try:
        return BertConfig(
            family=family, vocab_size=int(get("vocab_size", 30522)),
            hidden_size=int(get("hidden_size")), num_hidden_layers=int(get("num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads")),
            intermediate_size=int(get("intermediate_size")), hidden_act=act,
            max_position_embeddings=int(get("max_position_embeddings")),
            type_vocab_size=int(get("type_vocab_size", 2)),
            layer_norm_eps=float(get("layer_norm_eps", 1e-12)),
            hidden_dropout_prob=float(get("hidden_dropout_prob", 0.0 if family == "albert"
                                          else 0.1)),
            attention_probs_dropout_prob=float(get("attention_probs_dropout_prob",
                                                   0.0 if family == "albert" else 0.1)),
            initializer_range=float(get("initializer_range", 0.02)),
            embedding_size=(int(get("embedding_size")) if family != "bert" else None),
            num_hidden_groups=int(get("num_hidden_groups", 1)),
            inner_group_num=int(get("inner_group_num", 1)),
            pad_id=int(hf.get("pad_token_id") if hf.get("pad_token_id") is not None else 0))
    except ValueError as e:
        raise ProtlmError(f"{where}: {e}") from None


def hf_config_dict(config: BertConfig, architecture: str) -> Dict[str, Any]:
    """``config.json`` contents for ``config`` (loads alike in transformers 4 and 5)."""
    d: Dict[str, Any] = {
        "architectures": [architecture], "model_type": config.family,
        "vocab_size": config.vocab_size, "hidden_size": config.hidden_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "intermediate_size": config.intermediate_size, "hidden_act": config.hidden_act,
        "max_position_embeddings": config.max_position_embeddings,
        "type_vocab_size": config.type_vocab_size, "layer_norm_eps": config.layer_norm_eps,
        "hidden_dropout_prob": config.hidden_dropout_prob,
        "attention_probs_dropout_prob": config.attention_probs_dropout_prob,
        "initializer_range": config.initializer_range,
        "position_embedding_type": "absolute", "pad_token_id": config.pad_id,
        "tie_word_embeddings": True,
    }
    if config.family != "bert":
        d["embedding_size"] = config.emb_size
    if config.family == "albert":
        d.update(num_hidden_groups=config.num_hidden_groups,
                 inner_group_num=config.inner_group_num, classifier_dropout_prob=0.1,
                 bos_token_id=2, eos_token_id=3)
    return d




def _vocabulary(directory: str, family: str) -> VocabTxtVocabulary:
    """The checkpoint's own vocabulary; ProtBert's / our ALBERT pieces without one."""
    default = ([p for p, _ in tokenizers.albert_pieces()] if family == "albert"
               else tokenizers.protbert_vocab_tokens())
    return tokenizers.checkpoint_tokens(directory) or VocabTxtVocabulary(default)


# ----------------------------------------------------------------- import ---

def load(directory: str, *, generator: Optional[str] = None,
         mesh: Optional[jax.sharding.Mesh] = None, rules: Optional[Sequence] = None,
         encoder_only: Optional[bool] = None, vocab_pad_to_multiple: Optional[int] = None,
         **overrides) -> engine.Imported:
    """Imports a HF BERT/ALBERT/ELECTRA directory (``*ForMaskedLM``, ``*Model``,
    ``ElectraForPreTraining``; an ``ElectraForMaskedLM`` generator too).

    Args:
      directory: the HF model directory. For ELECTRA, a discriminator
        (``ElectraForPreTraining`` / ``ElectraModel``) or, alone, a generator.
      generator: ELECTRA: the generator directory to pair with the
        discriminator (their embeddings must be equal).
      mesh, rules: where the params go (numpy leaves without a mesh).
      encoder_only: unused (every tower loads whole; embedding reads only
        what it needs).
      vocab_pad_to_multiple: pad the vocabulary rows to a multiple of this.
      **overrides: ``BertConfig`` fields to set (``dtype``, ``scan_layers``).

    Returns:
      An :class:`engine.Imported`; for a lone ELECTRA tower the config's
      other tower is a copy of it and its params are absent.

    Raises:
      ProtlmError: one line on unsupported configs and bad tensors.
    """
    del encoder_only
    if vocab_pad_to_multiple is not None:
        if vocab_pad_to_multiple < 1:
            raise ProtlmError(f"--vocab_pad_to_multiple must be positive, got "
                              f"{vocab_pad_to_multiple}")
        overrides["vocab_pad_to_multiple"] = vocab_pad_to_multiple
    hf = files.read_config(directory)
    reader = files.CheckpointReader(directory)
    check_config(hf, reader, os.path.join(directory, "config.json"))
    cfg = config_from_hf(hf, os.path.join(directory, "config.json")).replace(**overrides)
    if mesh is not None:
        model = mesh.shape["model"]
        if cfg.padded_vocab_size % model:
            raise ProtlmError(f"{directory}: the vocabulary ({cfg.vocab_size} rows) does not "
                              f"split over --model_parallel_size {model}; add "
                              f"--vocab_pad_to_multiple {model} (padding rows are never "
                              f"used, nor exported)")
    arch = (hf.get("architectures") or [_ARCHITECTURES[cfg.family][0]])[0]
    vocabulary = _vocabulary(directory, cfg.family)
    if cfg.family != "electra":
        if generator is not None:
            raise ProtlmError(f"{generator}: a generator goes with an ELECTRA "
                              f"discriminator, not with a {cfg.family} model")
        config: ModelConfig = cfg
        sources, skipped = check_tensors(reader, cfg, where=directory)
        has_head = any(p.startswith("mlm_head/") for p in sources)
    elif generator is None:
        tower = "generator" if arch == "ElectraForMaskedLM" else "discriminator"
        config = ElectraConfig(discriminator=cfg, generator=cfg)
        sources, skipped = check_tensors(reader, config, tower=tower, where=directory)
        has_head = any(p.startswith(f"{tower}_head/") for p in sources)
    else:
        if arch == "ElectraForMaskedLM":
            raise ProtlmError(f"{directory}: an ElectraForMaskedLM (a generator); give the "
                              f"discriminator as the model and this as the generator")
        ghf, greader = files.read_config(generator), files.CheckpointReader(generator)
        check_config(ghf, greader, os.path.join(generator, "config.json"))
        gcfg = config_from_hf(ghf, os.path.join(generator, "config.json")).replace(**overrides)
        try:
            config = ElectraConfig(discriminator=cfg, generator=gcfg)
        except ValueError as e:
            raise ProtlmError(f"{generator}: {e}") from None
        sources, skipped = check_tensors(reader, config, tower="discriminator", where=directory)
        gsources, gskipped = check_tensors(greader, config,
                                           tower="generator", where=generator)
        for path, (greader, gname, t) in gsources.items():
            if not path.startswith("embeddings/"):
                sources[path] = (greader, gname, t)
                continue
            dreader, dname, _ = sources[path]
            if not np.array_equal(greader.get(gname), dreader.get(dname)):
                raise ProtlmError(f"{generator}: {path} differs from the "
                                  "discriminator's; ELECTRA towers share their embeddings")
        skipped += gskipped
        has_head = all(any(p.startswith(h) for p in sources)
                       for h in ("discriminator_head/", "generator_head/"))
    params = engine.assemble(sources, _abstract(config), mesh=mesh, rules=rules)
    return engine.Imported(
        config, params, vocabulary, arch, has_head, skipped=skipped, weights=reader.kind,
        described=arch + (" + ElectraForMaskedLM" if generator else ""),
        metadata={"architecture": arch, "has_head": has_head, "param_collections": sorted(params),
                  "vocabulary": list(vocabulary.tokens)},
        source={"generator": os.path.abspath(generator) if generator else None})


# ----------------------------------------------------------------- export ---

def architecture(config: ModelConfig, tower: str = "discriminator",
                 with_head: bool = True) -> str:
    """The transformers class a tower exports as (``*ForMaskedLM``, ``*Model``, ...)."""
    cfg = _tower_config(config, tower)
    if cfg.family == "electra" and with_head:
        return "ElectraForPreTraining" if tower == "discriminator" else "ElectraForMaskedLM"
    return _ARCHITECTURES[cfg.family][0 if with_head else 1]


def hf_tensors(params: Any, config: ModelConfig, *, tower: str = "", with_head: bool = True):
    """Our params -> (HF name, array) of one directory, in HF order; tied
    decoder weights are left out (transformers ties them again)."""
    return engine.hf_tensors(params, expected_tensors(config, tower, with_head=with_head,
                                                      prefixed=with_head))


def save_pretrained(params: Any, config: ModelConfig, directory: str, *,
                    tower: str = "discriminator", with_head: bool = True,
                    dtype: str = "float32", max_shard_size: Optional[int] = None,
                    vocabulary: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Writes one Hugging Face model directory: config.json, safetensors, tokenizer.

    Args:
      params, config: ours (ELECTRA: both towers' config; ``tower`` picks one).
      directory: created; weight files of an earlier export there are removed.
      tower: ELECTRA: "discriminator" (``ElectraForPreTraining``) or
        "generator" (``ElectraForMaskedLM``); each gets a copy of the shared
        embeddings.
      with_head: ``*ForMaskedLM`` / ``ElectraForPreTraining``; else ``*Model``.
      dtype: weight dtype in the files ("float32", "float16", "bfloat16").
      max_shard_size: bytes per safetensors shard (default 5 GB).
      vocabulary: the tokenizer's tokens in id order (an imported checkpoint's
        own); None: ProtBert's / our ALBERT pieces.

    Returns:
      ``{"directory", "architecture", "files", "parameters"}``.
    """
    cfg = _tower_config(config, tower)
    arch = architecture(config, tower, with_head)
    counted: Dict[str, int] = {}
    os.makedirs(directory, exist_ok=True)
    files.remove_stale_weights(directory)
    written = files.write_safetensors(
        engine.counting(hf_tensors(params, config, tower=tower if cfg.family == "electra"
                                   else "", with_head=with_head), counted),
        directory, dtype=dtype, max_shard_size=max_shard_size or files.DEFAULT_MAX_SHARD_SIZE)
    files.write_json(os.path.join(directory, "config.json"),
                     dict(hf_config_dict(cfg, arch), torch_dtype=dtype))
    if cfg.family == "albert":
        written += ["config.json"] + tokenizers.write_albert_tokenizer(
            directory, vocabulary, cfg.max_position_embeddings)
    else:
        written += ["config.json"] + tokenizers.write_vocab_txt(
            directory, vocabulary or tokenizers.protbert_vocab_tokens(),
            "ElectraTokenizer" if cfg.family == "electra" else "BertTokenizer",
            cfg.max_position_embeddings)
    return {"directory": directory, "architecture": arch, "files": written,
            "parameters": counted.get("parameters", 0)}


def export(params: Any, config: ModelConfig, output: str, *, encoder_only: bool, dtype: str,
           max_shard_size: int, step: int, source: str,
           meta: Mapping[str, Any]) -> Dict[str, Any]:
    """BERT/ALBERT as one directory; ELECTRA's discriminator in ``output`` and
    its generator in ``output/generator`` (a checkpoint with one tower writes
    that one); ``encoder_only``: the ``*Model`` without heads (ELECTRA: the
    discriminator's). A model card with the ProtBert snippet goes on top."""
    family = _tower_config(config, "").family
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
            kind = architecture(config, headless[0] or "discriminator", with_head=False)
            raise ProtlmError(f"{source}: checkpoint has no {heads[headless[0]]} (imported "
                              f"from a {kind}); export it with --encoder_only")
    vocabulary = meta.get("vocabulary")
    written, all_files = [], []
    for i, tower in enumerate(towers):
        where = output if i == 0 else os.path.join(output, "generator")
        out = save_pretrained(params, config, where, tower=tower or "discriminator",
                              with_head=not encoder_only, dtype=dtype,
                              max_shard_size=max_shard_size, vocabulary=vocabulary)
        written.append((os.path.relpath(where, output), tower, out))
        all_files += [os.path.normpath(os.path.join(os.path.relpath(where, output), f))
                      for f in out["files"]]
    with open(os.path.join(output, "README.md"), "w", encoding="utf-8") as f:
        f.write(model_card(config, written, dtype=dtype, step=step, source=source,
                           vocab_size=len(vocabulary) if vocabulary else None))
    all_files.append("README.md")
    return {"files": all_files, "parameters": written[0][2]["parameters"],
            "architectures": {w: out["architecture"] for w, _, out in written}}


# What hf.convert.prottrans_embeddings runs: the checkpoint's own tokenizer
# (WordPiece or ALBERT's SentencePiece) and base model.
REFERENCE_CLASSES = ("AutoTokenizer", "AutoModel", 1)
_TITLES = {"bert": "ProtBert", "albert": "ProtAlbert", "electra": "ProtElectra"}
_SNIPPET_CLASSES = {"bert": ("BertTokenizer", "BertModel"),
                    "albert": ("AlbertTokenizer", "AlbertModel"),
                    "electra": ("ElectraTokenizer", "ElectraModel")}


def model_card(config: ModelConfig, written: Sequence[Tuple[str, str, Dict[str, Any]]], *,
               dtype: str, step: int, source: str, vocab_size: Optional[int] = None) -> str:
    """README.md of an exported BERT-family model, with the ProtBert usage snippet.

    Args:
      config: ``BertConfig`` or ``ElectraConfig``.
      written: (folder relative to HF_DIR, ELECTRA tower or "", summary of
        :func:`save_pretrained`) of each model directory written.
      dtype, step, source: what the card states.
      vocab_size: tokens of the checkpoint's own vocabulary, when it has one.
    """
    family = _tower_config(config, "").family
    rows = []
    for folder, tower, out in written:
        cfg = _tower_config(config, tower)
        name = f"{tower} " if tower else ""
        where = "this folder" if folder == "." else f"`{folder}/`"
        embedding = f", embedding {cfg.emb_size}" if cfg.family != "bert" else ""
        sharing = (f", {cfg.num_hidden_groups} shared layer group(s)"
                   if cfg.family == "albert" else "")
        rows.append((f"{name}`{out['architecture']}` ({where})",
                     f"{cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
                     f"{cfg.num_attention_heads} heads, intermediate {cfg.intermediate_size}"
                     f"{embedding}{sharing}, {cfg.hidden_act}; {out['parameters']:,} "
                     f"parameters"))
    cfg = _tower_config(config, written[0][1])
    ids = ("0 `<pad>`, 1 `<unk>`, 2 `[CLS]`, 3 `[SEP]`, 4 `[MASK]`, 5–29 residues in "
           "ProtBert's order" if family == "albert" else
           "ProtBert ids: 0 `[PAD]`, 1 `[UNK]`, 2 `[CLS]`, 3 `[SEP]`, 4 `[MASK]`, 5–29 residues")
    vocabulary = (f"{vocab_size} (the imported checkpoint's own tokenizer)" if vocab_size
                  else f"{cfg.vocab_size} ({ids})")
    objective = {"bert": "masked language modelling (15 % of residues; 80/10/10)",
                 "albert": "masked language modelling (15 % of residues; 80/10/10)",
                 "electra": "replaced-token detection by the discriminator on residues "
                            "sampled from the masked-LM generator"}[family]
    embeds_with = " ProtTrans embeds with the discriminator." if family == "electra" else ""
    article = {"bert": "A BERT", "albert": "An ALBERT", "electra": "An ELECTRA"}[family]
    title = _TITLES[family]
    return cards.render(
        title=title, heading=f"{title} exported by protlm-jax",
        intro=f"{article} protein language model trained with protlm-jax (JAX/Flax) and "
              f"exported with `protlm export-hf` from `{source}` (step {step}).",
        header=("model", "shape"), rows=rows,
        details=f"Maximum length {cfg.max_position_embeddings} tokens (learned absolute "
                f"positions);\nvocabulary {vocabulary}; weights {dtype} safetensors. "
                f"Pretraining objective:\n{objective}.{embeds_with}",
        snippet_name="ProtBert", snippet=(*_SNIPPET_CLASSES[family], 1),
        outro="`protlm import-hf` turns this directory back into a protlm MODEL_DIR.")


def encoder_tensors(config: ModelConfig) -> Dict[str, engine.Tensor]:
    """The HF tensors of the encoder-only export (``BertModel``/``AlbertModel``;
    PEFT adapters name their modules after these). ELECTRA: None (its encoder
    view is the discriminator tower, laid out under another prefix)."""
    if isinstance(config, ElectraConfig):
        return None
    return expected_tensors(config, with_head=False)
