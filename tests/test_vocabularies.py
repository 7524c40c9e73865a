"""The ProtT5 and ProtBert vocabularies reproduce the published ids exactly."""

import numpy as np
import pytest
import tensorflow as tf

from protlm_jax.data.vocabularies import ProtBertVocabulary, ProtT5Vocabulary

# REFERENCE.md §2, written out by hand from the published tokenizers.
PROTT5_IDS = {"<pad>": 0, "</s>": 1, "<unk>": 2, "A": 3, "L": 4, "G": 5, "V": 6,
              "S": 7, "R": 8, "E": 9, "D": 10, "T": 11, "I": 12, "P": 13, "K": 14,
              "F": 15, "Q": 16, "N": 17, "Y": 18, "M": 19, "H": 20, "W": 21,
              "C": 22, "X": 23, "B": 24, "O": 25, "U": 26, "Z": 27}
PROTBERT_IDS = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, "[MASK]": 4,
                "L": 5, "A": 6, "G": 7, "V": 8, "E": 9, "S": 10, "I": 11, "K": 12,
                "R": 13, "D": 14, "T": 15, "P": 16, "N": 17, "Q": 18, "F": 19,
                "Y": 20, "M": 21, "H": 22, "C": 23, "W": 24, "X": 25, "U": 26,
                "B": 27, "Z": 28, "O": 29}


@pytest.fixture(scope="module")
def t5():
    return ProtT5Vocabulary()


@pytest.fixture(scope="module")
def bert():
    return ProtBertVocabulary()


def test_sizes_and_special_ids(t5, bert):
    assert t5.vocab_size == 128 and t5.extra_ids == 100
    assert (t5.pad_id, t5.eos_id, t5.unk_id) == (0, 1, 2)
    assert bert.vocab_size == 30
    assert (bert.pad_id, bert.unk_id, bert.eos_id) == (0, 1, 3)
    assert (bert.CLS_ID, bert.SEP_ID, bert.MASK_ID) == (2, 3, 4)


def test_reference_examples(t5):
    # "A E T C X A X" → [3, 9, 11, 22, 23, 3, 23, 1] with the tokenizer's </s>.
    for text in ("A E T C X A X", "AETCXAX"):
        assert list(t5.encode(text)) + [t5.eos_id] == [3, 9, 11, 22, 23, 3, 23, 1]
    assert list(t5.encode("S K T X P")) + [t5.eos_id] == [7, 14, 11, 23, 13, 1]


@pytest.mark.parametrize("name", ["t5", "bert"])
def test_every_residue_id(name, t5, bert):
    vocab, table = (t5, PROTT5_IDS) if name == "t5" else (bert, PROTBERT_IDS)
    residues = "".join(k for k in table if len(k) == 1)
    assert list(vocab.encode(residues)) == [table[c] for c in residues]
    assert vocab.residue_ids() == {k: v for k, v in table.items() if len(k) == 1}
    for special in (k for k in table if len(k) > 1):
        assert vocab.id_of(special) == table[special]


def test_sentinels_count_down_from_127(t5):
    assert t5.sentinel_id(0) == 127 and t5.sentinel_id(99) == 28
    assert t5.id_of("<extra_id_0>") == 127 and t5.id_of("<extra_id_99>") == 28
    assert t5.decode([127, 3, 126]) == "<extra_id_0>A<extra_id_1>"


@pytest.mark.parametrize("text", ["J", "1", "*", "é", "a"])
def test_unknown_characters_map_to_unk(text, t5, bert):
    assert list(t5.encode(text)) == [2]
    assert list(bert.encode(text)) == [1]
    assert t5.encode_tf(tf.constant(text)).numpy().tolist() == [2]
    assert bert.encode_tf(tf.constant(text)).numpy().tolist() == [1]


STRINGS = ["MKTAYIAKQRQISFVKSHFSRQ", "A E T C X A X", "UZOBX", "mkta", "J1*é-",
           "", " \t\n", "LLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLLL"]


@pytest.mark.parametrize("name", ["t5", "bert"])
def test_python_and_tf_paths_agree(name, t5, bert, sample_records):
    vocab = t5 if name == "t5" else bert
    texts = STRINGS + [s for _, s in sample_records[:50]]
    for text in texts:
        py = list(vocab.encode(text))
        tf_ids = vocab.encode_tf(tf.constant(text)).numpy().tolist()
        assert py == tf_ids, text
        assert vocab.decode(py) == vocab.decode_tf(tf.constant(py, tf.int32)).numpy().decode()
    # Batched (ragged) TF encoding equals per-string encoding.
    batch = vocab.encode_tf(tf.constant(texts))
    assert [row.tolist() for row in batch.numpy()] == [list(vocab.encode(t)) for t in texts]


def test_decode_round_trip_and_eos(t5, bert, sample_records):
    for _, seq in sample_records[:100]:
        assert t5.decode(t5.encode(seq)) == seq
        assert bert.decode(bert.encode(seq)) == seq
    # Decoding stops at EOS, drops padding, names specials.
    assert t5.decode([3, 4, 2, 1, 5, 6]) == "AL<unk>"
    assert bert.decode([2, 6, 4, 5, 3, 0, 0]) == "A[MASK]L"
    ids = tf.constant([[3, 4, 1, 5], [127, 3, 0, 0]], tf.int32)
    assert [s.decode() for s in t5.decode_tf(ids).numpy()] == ["AL", "<extra_id_0>A"]
    # Ids beyond the vocabulary decode as unknown in both paths.
    assert t5.decode([3, 500]) == "A<unk>"
    assert t5.decode_tf(tf.constant([3, 500])).numpy().decode() == "A<unk>"


def test_vocabularies_work_as_seqio_features(t5):
    import seqio

    feature = seqio.Feature(t5, add_eos=True)
    assert feature.vocabulary.vocab_size == 128
    assert np.array_equal(t5.encode_tf(tf.constant("AL")).numpy(), [3, 4])
