"""ProtT5's Hugging Face tokenizer files, built from the vocabulary (no download).

``write_prott5_tokenizer(dir)`` writes a real SentencePiece model
(``spiece.model``: a unigram ``ModelProto`` built piece by piece), plus
``tokenizer_config.json`` and ``special_tokens_map.json``, so that
``T5Tokenizer.from_pretrained(dir, do_lower_case=False)`` and
``AutoTokenizer.from_pretrained(dir)`` (transformers 4 and 5) give the ProtT5
ids of REFERENCE §2 for space-separated sequences:

  0 <pad>, 1 </s>, 2 <unk>, 3.. ▁A ▁L ▁G … ▁Z (``PROTT5_RESIDUES`` order),
  then the tokenizer's ``extra_ids=100`` sentinels counting down from 127
  (``<extra_id_0>`` = 127).

Only ``</s>`` is appended; there is no BOS.
"""

from __future__ import annotations

import json
import os
from typing import Dict

from protlm_jax.vocabularies import PROTT5_RESIDUES

SPECIALS = ("<pad>", "</s>", "<unk>")
EXTRA_IDS = 100


def prott5_sentencepiece_model() -> bytes:
    """The serialized SentencePiece ``ModelProto`` of ProtT5's 28 pieces."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2

    proto = spm_pb2.ModelProto()
    piece_type = spm_pb2.ModelProto.SentencePiece.Type
    for name, kind in zip(SPECIALS, (piece_type.CONTROL, piece_type.CONTROL,
                                     piece_type.UNKNOWN)):
        proto.pieces.add(piece=name, score=0.0, type=kind)
    # Each residue is exactly one piece, so the scores never compete; descending
    # scores mirror the frequency order a trained model would have.
    for i, residue in enumerate(PROTT5_RESIDUES):
        proto.pieces.add(piece=f"▁{residue}", score=-float(i + 1), type=piece_type.NORMAL)
    spec = proto.trainer_spec
    spec.model_type = spm_pb2.TrainerSpec.ModelType.UNIGRAM
    spec.vocab_size = len(proto.pieces)
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    spec.pad_piece, spec.eos_piece, spec.unk_piece = SPECIALS
    spec.byte_fallback = False
    spec.split_by_whitespace = True
    norm = proto.normalizer_spec
    # identity: no NFKC and no case folding (ids depend on upper-case residues).
    norm.name = "identity"
    norm.add_dummy_prefix = True
    norm.remove_extra_whitespaces = True
    norm.escape_whitespaces = True
    return proto.SerializeToString()


def tokenizer_config(model_max_length: int = 1_000_000_000) -> Dict:
    """``tokenizer_config.json`` of the T5 tokenizer (no length limit: relative positions)."""
    return {
        "tokenizer_class": "T5Tokenizer",
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "extra_ids": EXTRA_IDS,
        "additional_special_tokens": [f"<extra_id_{i}>" for i in range(EXTRA_IDS)],
        "do_lower_case": False,
        "model_max_length": model_max_length,
        "legacy": True,
        "clean_up_tokenization_spaces": False,
    }


def write_prott5_tokenizer(directory: str) -> list[str]:
    """Writes the tokenizer files into ``directory``; returns their names."""
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "spiece.model"), "wb") as f:
        f.write(prott5_sentencepiece_model())
    config = tokenizer_config()
    _write_json(os.path.join(directory, "tokenizer_config.json"), config)
    _write_json(os.path.join(directory, "special_tokens_map.json"), {
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "additional_special_tokens": config["additional_special_tokens"]})
    return ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"]


def _write_json(path: str, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
