"""ProtT5, ProtBert, ProtXLNet and ProtTXL vocabularies as ``seqio.Vocabulary`` subclasses.

Ids are exactly those of the published Hugging Face tokenizers (REFERENCE §2),
so checkpoints move between protlm-jax and transformers unchanged.

Both vocabularies are character level: every character of the input is one
residue, white space is ignored (so ``"A E T"`` and ``"AET"`` encode alike, as
the Hugging Face tokenizers see space-separated residues), and any character
without its own id maps to the model's unknown id. Rare residues (U Z O B) have
ids of their own; mapping them to X is a preprocessing step
(:func:`protlm_jax.data.preprocessors.map_rare_residues`), as ProtTrans does.

The Python (``encode``/``decode``) and TensorFlow (``encode_tf``/``decode_tf``)
paths share one lookup table and agree on every input. ``decode`` renders
sentinels and special tokens by their names (``<extra_id_0>``, ``[MASK]``) and
drops padding, ``[CLS]`` and everything from EOS on.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence, Union

import numpy as np
import seqio
import tensorflow as tf

WHITESPACE = " \t\n\r\v\f"
# Characters outside this range all map to the unknown id.
_TABLE_SIZE = 256
_SKIP = -1  # Table marker for characters that are dropped (white space).

# ProtT5 (SentencePiece pieces ▁A, ▁L, …): ids 3..27, then 100 sentinels.
PROTT5_RESIDUES = "ALGVSREDTIPKFQNYMHWCXBOUZ"
# ProtBert (WordPiece vocab.txt): ids 5..29.
PROTBERT_RESIDUES = "LAGVESIKRDTPNQFYMHCWXUBZO"


class _CharVocabulary(seqio.Vocabulary):
    """A character-level vocabulary: fixed special ids, one id per residue."""

    def __init__(self, specials: Sequence[str], residues: str, *, eos_id: int,
                 unk_id: int, hidden: Sequence[int], extra_ids: int = 0):
        """Builds the tables.

        Args:
          specials: names of the special tokens occupying ids 0..len-1.
          residues: residue letters, taking the ids that follow the specials.
          eos_id: the end-of-sequence id (decoding stops there).
          unk_id: the id of characters without one of their own.
          hidden: ids that ``decode`` drops (padding and control tokens).
          extra_ids: sentinel ids appended after the residues (T5 style:
            ``<extra_id_0>`` is the highest id).
        """
        super().__init__(extra_ids=extra_ids)
        self._eos_id = eos_id
        self._unk_id = unk_id
        self._pieces = list(specials) + list(residues)
        self._pieces += [f"<extra_id_{extra_ids - 1 - i}>" for i in range(extra_ids)]
        for i in hidden:
            self._pieces[i] = ""
        table = np.full([_TABLE_SIZE], unk_id, dtype=np.int32)
        for i, residue in enumerate(residues, start=len(specials)):
            table[ord(residue)] = i
        for c in WHITESPACE:
            table[ord(c)] = _SKIP
        self._char_to_id = table
        self._encode_map = {chr(c): int(i) for c, i in enumerate(table)}
        self._base_size = len(specials) + len(residues)
        # Tables for the TF path are built lazily inside the calling graph.
        self._num_specials = len(specials)

    # --- seqio.Vocabulary interface ---------------------------------------

    @property
    def eos_id(self) -> Optional[int]:
        return self._eos_id

    @property
    def unk_id(self) -> Optional[int]:
        return self._unk_id

    @property
    def _base_vocab_size(self) -> int:
        return self._base_size

    def _encode(self, s: str) -> Sequence[int]:
        table = self._encode_map
        unk = self._unk_id
        return [i for i in (table.get(c, unk) for c in s) if i != _SKIP]

    def _encode_tf(self, s: tf.Tensor) -> tf.Tensor:
        codes = tf.strings.unicode_decode(s, "UTF-8", errors="replace")
        codes = tf.where(codes < _TABLE_SIZE, codes, 0)  # 0 → unk via the table.
        ids = tf.gather(tf.constant(self._char_to_id), codes)
        keep = tf.not_equal(ids, _SKIP)
        if isinstance(ids, tf.RaggedTensor):
            return tf.ragged.boolean_mask(ids, keep)
        return tf.boolean_mask(ids, keep)

    def _decode(self, ids: Iterable[int]) -> str:
        pieces = self._pieces
        return "".join(pieces[i] for i in ids)

    def _decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        pieces = tf.gather(tf.constant(self._pieces), ids)
        return tf.strings.reduce_join(pieces, axis=-1)

    def _clean(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        return np.where((ids < 0) | (ids >= self.vocab_size), self._unk_id, ids)

    def decode(self, ids: Iterable[int]) -> str:
        """Detokenizes ids up to the first EOS; sentinels keep their names."""
        if isinstance(ids, tf.Tensor):
            ids = ids.numpy()
        clean = self._clean(list(ids)).tolist()
        if self._eos_id in clean:
            clean = clean[: clean.index(self._eos_id)]
        return self._decode(clean)

    def decode_tf(self, ids: tf.Tensor) -> tf.Tensor:
        """TF twin of :meth:`decode` for ids of any rank (joins the last axis)."""
        ids = tf.cast(ids, tf.int32)
        if ids.shape.rank is not None and ids.shape.num_elements() == 0:
            return tf.strings.reduce_join(tf.zeros_like(ids, tf.string), axis=-1)
        ids = tf.where((ids < 0) | (ids >= self.vocab_size), self._unk_id, ids)
        after_eos = tf.cumsum(tf.cast(tf.equal(ids, self._eos_id), tf.int32),
                              axis=-1)
        ids = tf.where(after_eos > 0, self.pad_id, ids)
        return self._decode_tf(ids)

    # --- conveniences -----------------------------------------------------

    def id_of(self, piece: str) -> int:
        """The id of a residue letter or a named special token."""
        if len(piece) == 1 and piece not in WHITESPACE:
            return self._encode_map.get(piece, self._unk_id)
        names = self.special_names()
        if piece not in names:
            raise KeyError(piece)
        return names[piece]

    def residue_ids(self) -> dict[str, int]:
        """Residue letter → id."""
        return {p: i for i, p in enumerate(self._pieces[: self._base_size])
                if i >= self._num_specials}

    def special_names(self) -> dict[str, int]:
        """Name → id of special tokens and sentinels (see subclasses)."""
        raise NotImplementedError

    def __eq__(self, other):
        return type(self) is type(other) and self.extra_ids == other.extra_ids

    def __hash__(self):
        return hash((type(self).__name__, self.extra_ids))

    def __repr__(self):
        return f"{type(self).__name__}(vocab_size={self.vocab_size})"


class ProtT5Vocabulary(_CharVocabulary):
    """The ProtT5 vocabulary: 128 ids.

    0 ``<pad>``, 1 ``</s>``, 2 ``<unk>``, 3..27 residues (A L G V S R E D T I P K
    F Q N Y M H W C X B O U Z), 28..127 sentinels with ``<extra_id_0>`` = 127
    counting down, as in T5.
    """

    PAD_ID, EOS_ID, UNK_ID = 0, 1, 2

    def __init__(self, extra_ids: int = 100):
        super().__init__(["<pad>", "</s>", "<unk>"], PROTT5_RESIDUES,
                         eos_id=self.EOS_ID, unk_id=self.UNK_ID, hidden=(0, 1),
                         extra_ids=extra_ids)

    def sentinel_id(self, i: Union[int, tf.Tensor]):
        """Id of ``<extra_id_i>`` (i-th sentinel, counting down from the top)."""
        return self.vocab_size - 1 - i

    def special_names(self) -> dict[str, int]:
        names = {"<pad>": 0, "</s>": 1, "<unk>": 2}
        names.update({f"<extra_id_{i}>": self.sentinel_id(i)
                      for i in range(self.extra_ids)})
        return names


class ProtBertVocabulary(_CharVocabulary):
    """The ProtBert vocabulary (also ProtElectra's): 30 ids.

    0 ``[PAD]``, 1 ``[UNK]``, 2 ``[CLS]``, 3 ``[SEP]``, 4 ``[MASK]``, 5..29
    residues (L A G V E S I K R D T P N Q F Y M H C W X U B Z O). ``[SEP]`` is
    the EOS id; ``[CLS]`` is added by the MLM preprocessor, not by ``encode``.
    """

    PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = 0, 1, 2, 3, 4

    def __init__(self):
        super().__init__(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                         PROTBERT_RESIDUES, eos_id=self.SEP_ID, unk_id=self.UNK_ID,
                         hidden=(0, 2, 3))

    def special_names(self) -> dict[str, int]:
        return {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4}

    @property
    def standard_residue_ids(self) -> range:
        """Ids of the 20 standard amino acids (used for random replacement)."""
        return range(5, 25)


class VocabTxtVocabulary(_CharVocabulary):
    """A checkpoint's own character-level vocabulary, from its ``vocab.txt`` or
    SentencePiece pieces (imported Hugging Face BERT/ALBERT/ELECTRA models).

    Other protein BERTs order their residues differently from ProtBert, so an
    imported model tokenizes with the table it was trained with: every
    one-character token (``A``, or ``▁A`` in a SentencePiece model) is a
    residue; ``[PAD]``/``<pad>``, ``[UNK]``/``<unk>``, ``[CLS]``, ``[SEP]``
    and ``[MASK]`` (and ProtTXL's ``<eos>``) are found by name. Characters without a token map to the
    unknown id, white space is skipped (as in :class:`ProtBertVocabulary`).
    """

    def __init__(self, tokens: Sequence[str]):
        seqio.Vocabulary.__init__(self, extra_ids=0)
        tokens = [t[1:] if len(t) == 2 and t[0] == "\u2581" else t for t in tokens]
        self.tokens = tuple(tokens)
        index = {}
        for i, t in enumerate(tokens):
            index.setdefault(t, i)

        def find(*names):
            return next((index[n] for n in names if n in index), None)

        self.PAD_ID = find("[PAD]", "<pad>")
        self.UNK_ID = find("[UNK]", "<unk>")
        self.CLS_ID = find("[CLS]", "<cls>", "<s>")
        self.SEP_ID = find("[SEP]", "<sep>", "</s>")
        self.MASK_ID = find("[MASK]", "<mask>")
        if self.UNK_ID is None:
            raise ValueError("vocabulary has no [UNK] or <unk> token")
        # BERT-style [SEP]/</s>, else a causal LM's <eos> (ProtTXL) ends a sequence.
        self._eos_id = self.SEP_ID if self.SEP_ID is not None else find("<eos>")
        self._unk_id = self.UNK_ID
        table = np.full([_TABLE_SIZE], self.UNK_ID, dtype=np.int32)
        for t, i in index.items():
            if len(t) == 1 and t not in WHITESPACE and ord(t) < _TABLE_SIZE:
                table[ord(t)] = i
        for c in WHITESPACE:
            table[ord(c)] = _SKIP
        self._char_to_id = table
        self._encode_map = {chr(c): int(i) for c, i in enumerate(table)}
        hidden = {self.PAD_ID, self.CLS_ID, self.SEP_ID, self._eos_id} - {None}
        self._pieces = ["" if i in hidden else t for i, t in enumerate(tokens)]
        self._base_size = len(tokens)
        self._num_specials = 0

    @classmethod
    def from_vocab_txt(cls, path: str) -> "VocabTxtVocabulary":
        """Reads a WordPiece ``vocab.txt`` (one token per line, id = line number)."""
        with open(path, encoding="utf-8") as f:
            return cls([line.rstrip("\r\n") for line in f])

    @classmethod
    def from_spiece_model(cls, path: str) -> "VocabTxtVocabulary":
        """Reads the pieces of a SentencePiece ``.model`` (id = piece index)."""
        from sentencepiece import sentencepiece_model_pb2 as pb

        model = pb.ModelProto()
        with open(path, "rb") as f:
            model.ParseFromString(f.read())
        return cls([p.piece for p in model.pieces])

    def residue_ids(self) -> dict[str, int]:
        """Residue letter -> id (every one-character token)."""
        return {t: i for i, t in enumerate(self.tokens)
                if len(t) == 1 and t not in WHITESPACE}

    def special_names(self) -> dict[str, int]:
        return {t: i for i, t in enumerate(self.tokens) if len(t) != 1}

    def __eq__(self, other):
        return type(self) is type(other) and self.tokens == other.tokens

    def __hash__(self):
        return hash((type(self).__name__, self.tokens))


# ProtXLNet: the 20 standard residues (rare ones and X are <unk>, as ProtTrans
# maps [UZOBX] to <unk> for XLNet).
PROTXLNET_RESIDUES = "LAGVESIKRDTPNQFYMHCW"
PROTXLNET_SPECIALS = ("<unk>", "<s>", "</s>", "<cls>", "<sep>", "<pad>", "<mask>", "<eod>",
                      "<eop>")


class ProtXLNetVocabulary(_CharVocabulary):
    """The ProtXLNet vocabulary of protlm-jax: 32 ids.

    XLNet's standard special ids 0 ``<unk>``, 1 ``<s>``, 2 ``</s>``, 3
    ``<cls>``, 4 ``<sep>``, 5 ``<pad>``, 6 ``<mask>``, 7 ``<eod>``, 8
    ``<eop>``; 9..28 the 20 standard residues (ProtBert's order); 29..31
    unused (the table splits 2, 4 or 8 ways). U Z O B and X are ``<unk>``.
    A protein is ``residues <sep> <cls>`` (``<sep>`` is the EOS id),
    padded on the left. The published ProtXLNet's own piece ids are
    UNVERIFIED: an imported checkpoint tokenizes with its ``spiece.model``.
    """

    UNK_ID, BOS_ID, EOS_ID, CLS_ID, SEP_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4, 5, 6
    UNUSED = 3

    def __init__(self):
        super().__init__(list(PROTXLNET_SPECIALS), PROTXLNET_RESIDUES, eos_id=self.SEP_ID,
                         unk_id=self.UNK_ID, hidden=(1, 2, 3, 4, 5))
        self._pieces += [f"<unused{i}>" for i in range(self.UNUSED)]
        self._base_size += self.UNUSED

    def special_names(self) -> dict[str, int]:
        names = {name: i for i, name in enumerate(PROTXLNET_SPECIALS)}
        names.update({f"<unused{i}>": self._base_size - self.UNUSED + i
                      for i in range(self.UNUSED)})
        return names

    def residue_ids(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(PROTXLNET_RESIDUES, start=len(PROTXLNET_SPECIALS))}

    @property
    def pad_id(self) -> int:
        return self.PAD_ID


PROTTXL_SPECIALS = ("<eos>", "<unk>")


class ProtTXLVocabulary(_CharVocabulary):
    """The ProtTXL vocabulary of protlm-jax: 32 ids.

    0 ``<eos>`` (ends every protein of the stream; also the padding id of
    embedding batches, which causal attention never looks ahead to), 1
    ``<unk>``, 2..26 the 25 residue letters in ProtBert's order (X U B Z O
    included), 27..31 unused (the table splits 2, 4 or 8 ways). ProtTXL was
    never published, so no original ids exist to follow.
    """

    EOS_ID, UNK_ID, PAD_ID = 0, 1, 0
    UNUSED = 5

    def __init__(self):
        super().__init__(list(PROTTXL_SPECIALS), PROTBERT_RESIDUES, eos_id=self.EOS_ID,
                         unk_id=self.UNK_ID, hidden=(self.EOS_ID,))
        self._pieces += [f"<unused{i}>" for i in range(self.UNUSED)]
        self._base_size += self.UNUSED

    def special_names(self) -> dict[str, int]:
        names = {name: i for i, name in enumerate(PROTTXL_SPECIALS)}
        names.update({f"<unused{i}>": self._base_size - self.UNUSED + i
                      for i in range(self.UNUSED)})
        return names

    def residue_ids(self) -> dict[str, int]:
        return {r: i for i, r in enumerate(PROTBERT_RESIDUES, start=len(PROTTXL_SPECIALS))}

    @property
    def pad_id(self) -> int:
        return self.PAD_ID
