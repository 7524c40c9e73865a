"""Tokenizer files of exported models, built from the vocabularies (no download).

* ProtT5: a real SentencePiece model (``spiece.model``: a unigram
  ``ModelProto`` built piece by piece) with ``tokenizer_config.json`` and
  ``special_tokens_map.json``, so ``T5Tokenizer.from_pretrained(dir,
  do_lower_case=False)`` and ``AutoTokenizer`` (transformers 4 and 5) give the
  ProtT5 ids of REFERENCE §2 for space-separated sequences: 0 <pad>, 1 </s>,
  2 <unk>, 3.. ▁A ▁L ▁G … ▁Z (``PROTT5_RESIDUES`` order), then the
  tokenizer's ``extra_ids=100`` sentinels counting down from 127. Only
  ``</s>`` is appended; there is no BOS.
* ProtBert-style ``vocab.txt`` (WordPiece, ``do_lower_case=False``).
* SentencePiece models of one piece per residue (:func:`write_spiece`; ALBERT's:
  :func:`albert_pieces`, :func:`write_albert_spiece`; XLNet's in ``hf/xlnet.py``).
* :func:`checkpoint_tokens`: the vocabulary a checkpoint ships.
"""

from __future__ import annotations

import os
import re
from typing import Dict, List, Optional, Sequence, Tuple

from protlm_jax.data.vocabularies import PROTBERT_RESIDUES, PROTT5_RESIDUES, VocabTxtVocabulary
from protlm_jax.hf import files

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
    files.write_json(os.path.join(directory, "tokenizer_config.json"), config)
    files.write_json(os.path.join(directory, "special_tokens_map.json"), {
        "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "additional_special_tokens": config["additional_special_tokens"]})
    return ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"]


PROTBERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def protbert_vocab_tokens() -> List[str]:
    """The 30 lines of ProtBert's ``vocab.txt`` (REFERENCE §2)."""
    return list(PROTBERT_SPECIALS) + list(PROTBERT_RESIDUES)


def albert_pieces(tokens: Optional[Sequence[str]] = None) -> List[Tuple[str, int]]:
    """(piece, sentencepiece type) of an ALBERT SentencePiece model.

    Args:
      tokens: a checkpoint's vocabulary in id order (``VocabTxtVocabulary.tokens``:
        residues without their ``▁``); None: our 34-id model (order: module
        docstring). Residues become ``▁X`` pieces, ``<unk>`` the unknown
        piece, ``[MASK]`` user-defined, ``<unusedN>`` unused, other bracketed
        names control pieces.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    t = pb.ModelProto.SentencePiece
    if tokens is None:
        pieces = [("<pad>", t.CONTROL), ("<unk>", t.UNKNOWN), ("[CLS]", t.CONTROL),
                  ("[SEP]", t.CONTROL), ("[MASK]", t.USER_DEFINED)]
        pieces += [("\u2581" + r, t.NORMAL) for r in PROTBERT_RESIDUES]
        pieces += [("\u2581", t.NORMAL)] + [(f"<unused{i}>", t.UNUSED) for i in range(3)]
        return pieces
    pieces = []
    for token in tokens:
        if len(token) == 1 and token != "\u2581":
            pieces.append(("\u2581" + token, t.NORMAL))
        elif token == "<unk>":
            pieces.append((token, t.UNKNOWN))
        elif token == "[MASK]":
            pieces.append((token, t.USER_DEFINED))
        elif re.fullmatch(r"<unused\d+>", token):
            pieces.append((token, t.UNUSED))
        elif re.fullmatch(r"<.*>|\[.*\]", token):
            pieces.append((token, t.CONTROL))
        else:
            pieces.append((token, t.NORMAL))
    return pieces


def spiece_pieces(tokens: Sequence[str]) -> List[Tuple[str, int]]:
    """(piece, sentencepiece type) of a checkpoint's tokens in id order: residues
    (one character) become ``▁X`` pieces, ``<unk>`` the unknown piece,
    ``[MASK]`` user-defined, ``<unusedN>`` unused, other ``<…>``/``[…]`` names
    control pieces."""
    return albert_pieces(tokens)


def write_spiece(path: str, pieces: Sequence[Tuple[str, int]], *, unk_id: int,
                 pad_id: int = -1, bos_id: int = -1, eos_id: int = -1) -> None:
    """Writes a unigram SentencePiece model of ``pieces`` (no lower-casing, no
    normalisation: ids depend on upper-case residues)."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    model = pb.ModelProto()
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    model.trainer_spec.vocab_size = len(pieces)
    model.trainer_spec.pad_id, model.trainer_spec.unk_id = pad_id, unk_id
    model.trainer_spec.bos_id, model.trainer_spec.eos_id = bos_id, eos_id
    model.normalizer_spec.name = "identity"
    model.normalizer_spec.add_dummy_prefix = True
    model.normalizer_spec.remove_extra_whitespaces = True
    model.normalizer_spec.escape_whitespaces = True
    for piece, kind in pieces:
        sp = model.pieces.add()
        sp.piece, sp.type = piece, kind
        sp.score = -10.0 if piece == "\u2581" else 0.0
    with open(path, "wb") as f:
        f.write(model.SerializeToString())


def write_albert_spiece(path: str, tokens: Optional[Sequence[str]] = None) -> None:
    """Writes the ALBERT SentencePiece model (unigram, no lower-casing);
    ``tokens`` as :func:`albert_pieces`."""
    write_spiece(path, albert_pieces(tokens), unk_id=1, pad_id=0)


def write_vocab_txt(directory: str, tokens: Sequence[str], tokenizer_class: str,
                    max_length: int) -> List[str]:
    """A WordPiece ``vocab.txt`` tokenizer (BERT, ELECTRA), no lower-casing."""
    with open(os.path.join(directory, "vocab.txt"), "w") as f:
        f.write("\n".join(tokens) + "\n")
    specials = {"unk_token": "[UNK]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "sep_token": "[SEP]", "mask_token": "[MASK]"}
    files.write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": tokenizer_class, "do_lower_case": False,
        "model_max_length": max_length, **specials})
    files.write_json(os.path.join(directory, "special_tokens_map.json"), specials)
    return ["vocab.txt", "tokenizer_config.json", "special_tokens_map.json"]


def write_albert_tokenizer(directory: str, tokens: Optional[Sequence[str]],
                           max_length: int) -> List[str]:
    """An ALBERT SentencePiece tokenizer (``tokens`` as :func:`albert_pieces`)."""
    write_albert_spiece(os.path.join(directory, "spiece.model"), tokens)
    specials = {"unk_token": "<unk>", "pad_token": "<pad>", "cls_token": "[CLS]",
                "sep_token": "[SEP]", "mask_token": "[MASK]", "bos_token": "[CLS]",
                "eos_token": "[SEP]"}
    files.write_json(os.path.join(directory, "tokenizer_config.json"), {
        "tokenizer_class": "AlbertTokenizer", "do_lower_case": False,
        "keep_accents": True, "remove_space": True, "model_max_length": max_length,
        **specials})
    files.write_json(os.path.join(directory, "special_tokens_map.json"), specials)
    return ["spiece.model", "tokenizer_config.json", "special_tokens_map.json"]


def checkpoint_tokens(directory: str) -> Optional[VocabTxtVocabulary]:
    """The vocabulary a checkpoint ships (``vocab.txt`` or ``spiece.model``), or None."""
    txt = os.path.join(directory, "vocab.txt")
    spm = os.path.join(directory, "spiece.model")
    if os.path.isfile(txt):
        return VocabTxtVocabulary.from_vocab_txt(txt)
    if os.path.isfile(spm):
        return VocabTxtVocabulary.from_spiece_model(spm)
    return None
