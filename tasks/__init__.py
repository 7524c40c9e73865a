"""seqio task registrations for protlm-jax (installed as ``protlm_tasks``).

For each corpus in :data:`CORPORA` and each objective:

  ``{corpus}_prott5``               ProtT5: per-residue sentinels → whole sequence
  ``{corpus}_t5_span_corruption``   standard T5 span corruption (density 0.15, span 3)
  ``{corpus}_mlm``                  BERT MLM with the ProtBert vocabulary (15 %, 80/10/10)
  ``{corpus}_plm``                  XLNet permutation LM with the ProtXLNet vocabulary
                                    (``residues <sep> <cls>``; lengths ``inputs`` and
                                    ``target_positions`` = num_predict)
  ``{corpus}_clm``                  Transformer-XL causal LM with the ProtTXL vocabulary:
                                    feature ``stream`` (``residues <eos>`` per protein),
                                    read as one token stream per batch row and cut into
                                    segments of the length ``stream`` (data.pipeline)

Shards are read from ``$PROTLM_DATA_DIR/{corpus}`` (see
``protlm_jax.data.sources``). Rare residues become X, then the sequence is
tokenized; a ``seqio.CacheDatasetPlaceholder`` follows, so ``seqio_cache_tasks``
caches the deterministic part and cropping and masking stay random per epoch.
Long sequences are cropped to a random window of the feature length.
"""

import functools

import seqio

from protlm_jax.data import preprocessors as pp
from protlm_jax.data.sources import corpus_source
from protlm_jax.data.vocabularies import (ProtBertVocabulary, ProtT5Vocabulary, ProtTXLVocabulary,
                                         ProtXLNetVocabulary)

# uniprot20k: the 20,000 UniProtKB records `protlm data fetch` obtains (prepared
# with `protlm prepare`, e.g. with `--exclude` of the probe test sets).
CORPORA = ("uniref50", "uniref100", "bfd", "uniprot_sample", "uniprot20k")

PROTT5_VOCABULARY = ProtT5Vocabulary()
PROTBERT_VOCABULARY = ProtBertVocabulary()

T5_OUTPUT_FEATURES = {
    "inputs": seqio.Feature(PROTT5_VOCABULARY, add_eos=True),
    "targets": seqio.Feature(PROTT5_VOCABULARY, add_eos=True),
}
MLM_OUTPUT_FEATURES = {
    "inputs": seqio.Feature(PROTBERT_VOCABULARY, add_eos=False),
    "targets": seqio.Feature(PROTBERT_VOCABULARY, add_eos=False),
    "mlm_weights": seqio.Feature(seqio.PassThroughVocabulary(2), add_eos=False),
}

PROTXLNET_VOCABULARY = ProtXLNetVocabulary()
PLM_OUTPUT_FEATURES = {
    "inputs": seqio.Feature(PROTXLNET_VOCABULARY, add_eos=False),
    "perm_index": seqio.Feature(seqio.PassThroughVocabulary(1 << 20), add_eos=False),
    "target_positions": seqio.Feature(seqio.PassThroughVocabulary(1 << 20), add_eos=False),
}

PROTTXL_VOCABULARY = ProtTXLVocabulary()
CLM_OUTPUT_FEATURES = {"stream": seqio.Feature(PROTTXL_VOCABULARY, add_eos=True)}

_CLEAN_AND_TOKENIZE = (
    functools.partial(seqio.preprocessors.rekey,
                      key_map={"id": "id", "targets": "sequence"}),
    functools.partial(pp.map_rare_residues, key="targets"),
    functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
    seqio.CacheDatasetPlaceholder(),
)


def _register(corpus: str) -> None:
    source = corpus_source(corpus)
    seqio.TaskRegistry.add(
        f"{corpus}_prott5",
        source=source,
        preprocessors=[
            *_CLEAN_AND_TOKENIZE,
            functools.partial(pp.random_crop, feature_key="targets", reserved=1),
            pp.prott5_denoise,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=T5_OUTPUT_FEATURES,
        metric_fns=[])
    seqio.TaskRegistry.add(
        f"{corpus}_t5_span_corruption",
        source=source,
        preprocessors=[
            *_CLEAN_AND_TOKENIZE,
            # Inputs are never longer than the cropped sequence.
            functools.partial(pp.random_crop, feature_key="targets",
                              length_key="inputs", reserved=1),
            pp.t5_span_corruption,
            seqio.preprocessors.append_eos_after_trim,
        ],
        output_features=T5_OUTPUT_FEATURES,
        metric_fns=[])
    seqio.TaskRegistry.add(
        f"{corpus}_mlm",
        source=source,
        preprocessors=[
            *_CLEAN_AND_TOKENIZE,
            functools.partial(pp.random_crop, feature_key="targets",
                              length_key="inputs", reserved=2),
            pp.bert_mlm,
        ],
        output_features=MLM_OUTPUT_FEATURES,
        metric_fns=[])

    seqio.TaskRegistry.add(
        f"{corpus}_plm",
        source=source,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey,
                              key_map={"id": "id", "inputs": "sequence"}),
            functools.partial(pp.map_rare_residues, key="inputs"),  # then X -> <unk>
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.CacheDatasetPlaceholder(),
            functools.partial(pp.random_crop, feature_key="inputs", reserved=2),
            pp.xlnet_plm,
        ],
        output_features=PLM_OUTPUT_FEATURES,
        metric_fns=[])

    # Whole proteins (no cropping): the stream is cut into segments later.
    seqio.TaskRegistry.add(
        f"{corpus}_clm",
        source=source,
        preprocessors=[
            functools.partial(seqio.preprocessors.rekey,
                              key_map={"id": "id", "stream": "sequence"}),
            functools.partial(pp.map_rare_residues, key="stream"),
            functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
            seqio.CacheDatasetPlaceholder(),
            seqio.preprocessors.append_eos,
        ],
        output_features=CLM_OUTPUT_FEATURES,
        metric_fns=[])


for _corpus in CORPORA:
    _register(_corpus)

# Probe sets (labels as features): ss_casp12, scl2205.
from protlm_tasks import probe_tasks  # noqa: E402,F401
