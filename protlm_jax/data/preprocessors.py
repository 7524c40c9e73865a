"""seqio preprocessors for protein pretraining objectives.

Every preprocessor is a pure ``tf.data.Dataset → tf.data.Dataset`` function.
Random ones draw from stateless RNGs seeded by seqio (``map_over_dataset`` with
``num_seeds``), so ``task.get_dataset(seed=…)`` is reproducible.

Objectives (REFERENCE §3):
  * :func:`prott5_denoise` — ProtT5: 15 % of residues each replaced by its own
    sentinel in ``inputs``; ``targets`` is the whole original sequence.
  * :func:`t5_span_corruption` — standard T5 span corruption: noise spans
    (density 0.15, mean length 3) replaced by one sentinel each in ``inputs``;
    ``targets`` are ``<extra_id_0> span0 <extra_id_1> span1 …``.
  * :func:`bert_mlm` — BERT masking with the ProtBert vocabulary: 15 % of
    residues scored; of those 80 % ``[MASK]``, 10 % a random standard residue,
    10 % unchanged; ``mlm_weights`` marks the scored positions.
  * :func:`xlnet_plm` — XLNet permutation LM (zihangdai/xlnet ``_sample_mask``
    and ``_local_perm``): ``residues <sep> <cls>``, span-sampled targets and
    a factorisation order as per-position ranks.

The mask-to-example transforms (``*_from_mask``) are separate deterministic
functions so that they can be tested exactly on hand-written masks.

Shapes: ``L`` is the number of residue tokens of one example.
"""

from __future__ import annotations

from typing import Mapping, Optional, Tuple

import numpy as np

import seqio
import tensorflow as tf

from protlm_jax.data.residues import RARE_RESIDUES, RARE_RESIDUES_PATTERN  # noqa: F401
from protlm_jax.data.vocabularies import ProtBertVocabulary, ProtT5Vocabulary, ProtXLNetVocabulary


# ---------------------------------------------------------------------------
# Cleaning and cropping
# ---------------------------------------------------------------------------

def map_rare_residues(dataset: tf.data.Dataset,
                      key: str = "sequence") -> tf.data.Dataset:
    """Maps the rare residues U Z O B to X, as every ProtTrans model expects."""

    def fn(x):
        x = dict(x)
        x[key] = tf.strings.regex_replace(x[key], RARE_RESIDUES_PATTERN, "X")
        return x

    return dataset.map(fn, num_parallel_calls=tf.data.AUTOTUNE)


def random_crop_tokens(tokens: tf.Tensor, max_length: int,
                       seed: tf.Tensor) -> tf.Tensor:
    """A uniformly random window of at most ``max_length`` tokens."""
    n = tf.size(tokens)
    max_start = tf.maximum(n - max_length, 0)
    start = tf.random.stateless_uniform([], seed, minval=0, maxval=max_start + 1,
                                        dtype=tf.int32)
    return tokens[start:start + max_length]


def random_crop(dataset: tf.data.Dataset,
                sequence_length: Optional[Mapping[str, int]],
                feature_key: str = "targets", length_key: Optional[str] = None,
                reserved: int = 1) -> tf.data.Dataset:
    """Crops long token sequences to a random window of the feature length.

    ProtTrans trained at 512 tokens; longer proteins contribute a random window
    each epoch rather than always their N-terminus.

    Args:
      dataset: examples with an int token feature ``feature_key``.
      sequence_length: the task feature lengths (None: no cropping).
      feature_key: the feature to crop.
      length_key: which feature length applies (default ``feature_key``).
      reserved: tokens kept free for special tokens added later (1 for EOS,
        2 for ``[CLS]``/``[SEP]``).

    Returns:
      The cropped dataset.
    """
    if not sequence_length:
        return dataset
    length = sequence_length.get(length_key or feature_key)
    if length is None:
        return dataset
    max_length = length - reserved
    if max_length < 1:
        raise ValueError(f"feature length {length} leaves no room for residues")

    @seqio.map_over_dataset(num_seeds=1)
    def crop(x, seed):
        x = dict(x)
        x[feature_key] = random_crop_tokens(x[feature_key], max_length, seed)
        return x

    return crop(dataset)


# ---------------------------------------------------------------------------
# Random masks
# ---------------------------------------------------------------------------

def _clamped_count(n: tf.Tensor, rate: float, low: int, high: tf.Tensor):
    count = tf.cast(tf.round(tf.cast(n, tf.float32) * rate), tf.int32)
    return tf.clip_by_value(count, tf.minimum(low, high), high)


def exact_rate_mask(n: tf.Tensor, rate: float, seed: tf.Tensor,
                    max_count: Optional[int] = None) -> tf.Tensor:
    """A bool mask over ``n`` positions with exactly ``round(rate·n)`` set.

    At least one position is chosen when ``n ≥ 2`` and never all of them, as in
    T5; ``max_count`` caps the count (e.g. the number of sentinels).
    """
    high = tf.maximum(n - 1, 0)
    if max_count is not None:
        high = tf.minimum(high, max_count)
    k = _clamped_count(n, rate, 1, high)
    scores = tf.random.stateless_uniform([n], seed)
    chosen = tf.math.top_k(scores, k=k).indices
    return tf.scatter_nd(chosen[:, None], tf.ones([k], tf.bool), [n])


def _random_segmentation(num_items: tf.Tensor, num_segments: tf.Tensor,
                         seed: tf.Tensor) -> tf.Tensor:
    """Random lengths (each ≥ 1) of ``num_segments`` parts summing to num_items."""
    starts = tf.concat([tf.ones([num_segments - 1], tf.int32),
                        tf.zeros([num_items - num_segments], tf.int32)], axis=0)
    order = tf.argsort(tf.random.stateless_uniform([num_items - 1], seed))
    starts = tf.gather(starts, order)
    segment_ids = tf.cumsum(tf.concat([[0], starts], axis=0))
    return tf.math.unsorted_segment_sum(tf.ones([num_items], tf.int32), segment_ids,
                                        num_segments)


def random_spans_noise_mask(n: tf.Tensor, noise_density: float,
                            mean_noise_span_length: float,
                            seed: tf.Tensor) -> tf.Tensor:
    """T5's noise mask: alternating non-noise/noise spans, noise spans random.

    ``round(n·density)`` noise tokens (clipped to [1, n-1]) in
    ``round(noise/mean_span)`` spans (at least one); the first span is never
    noise. Sequences shorter than two tokens get no noise.
    """
    seeds = tf.random.experimental.stateless_split(seed, 2)

    def mask():
        num_noise = _clamped_count(n, noise_density, 1, n - 1)
        num_spans = tf.maximum(tf.cast(tf.round(
            tf.cast(num_noise, tf.float32) / mean_noise_span_length), tf.int32), 1)
        num_spans = tf.minimum(num_spans, tf.minimum(num_noise, n - num_noise))
        noise_lengths = _random_segmentation(num_noise, num_spans, seeds[0])
        keep_lengths = _random_segmentation(n - num_noise, num_spans, seeds[1])
        interleaved = tf.reshape(tf.stack([keep_lengths, noise_lengths], axis=1), [-1])
        span_starts = tf.cumsum(interleaved)[:-1]
        indicator = tf.scatter_nd(span_starts[:, None],
                                  tf.ones_like(span_starts), [n])
        return tf.equal(tf.math.floormod(tf.cumsum(indicator), 2), 1)

    return tf.cond(n >= 2, mask, lambda: tf.zeros([n], tf.bool))


# ---------------------------------------------------------------------------
# Objectives: mask → example (deterministic)
# ---------------------------------------------------------------------------

def prott5_inputs_from_mask(tokens: tf.Tensor, mask: tf.Tensor,
                            vocab_size: int) -> tf.Tensor:
    """Each masked token becomes its own sentinel (``<extra_id_0>`` first)."""
    order = tf.cumsum(tf.cast(mask, tf.int32)) - 1
    return tf.where(mask, vocab_size - 1 - order, tokens)


def replace_spans_with_sentinels(tokens: tf.Tensor, mask: tf.Tensor,
                                 vocab_size: int) -> tf.Tensor:
    """Each run of masked tokens becomes one sentinel, numbered in order."""
    previous = tf.concat([[False], mask[:-1]], axis=0)
    first = mask & ~previous
    sentinels = vocab_size - tf.cumsum(tf.cast(first, tf.int32))
    out = tf.where(first, sentinels, tokens)
    return tf.boolean_mask(out, first | ~mask)


def bert_inputs_from_mask(tokens: tf.Tensor, selected: tf.Tensor,
                          action: tf.Tensor, random_tokens: tf.Tensor,
                          mask_id: int) -> tf.Tensor:
    """BERT corruption of the selected positions.

    Args:
      tokens: [L] residue ids.
      selected: [L] bool, positions that are scored.
      action: [L] int, 0 → ``[MASK]``, 1 → random residue, 2 → unchanged.
      random_tokens: [L] ids used where ``action == 1``.
      mask_id: the ``[MASK]`` id.

    Returns:
      [L] corrupted ids.
    """
    corrupted = tf.where(tf.equal(action, 0), mask_id,
                         tf.where(tf.equal(action, 1), random_tokens, tokens))
    return tf.where(selected, corrupted, tokens)


# ---------------------------------------------------------------------------
# Objectives as preprocessors
# ---------------------------------------------------------------------------

def prott5_denoise(dataset: tf.data.Dataset, noise_density: float = 0.15,
                   vocabulary: Optional[ProtT5Vocabulary] = None) -> tf.data.Dataset:
    """ProtT5's objective: per-residue sentinels in, whole sequence out.

    Expects ``targets`` as residue ids without EOS; adds ``inputs``. At most as
    many residues are masked as there are sentinels (100 covers 15 % of 666
    residues, above ProtTrans's 512).
    """
    vocabulary = vocabulary or ProtT5Vocabulary()

    @seqio.map_over_dataset(num_seeds=1)
    def fn(x, seed):
        x = dict(x)
        tokens = x["targets"]
        mask = exact_rate_mask(tf.size(tokens), noise_density, seed,
                               max_count=vocabulary.extra_ids)
        x["inputs"] = prott5_inputs_from_mask(tokens, mask, vocabulary.vocab_size)
        return x

    return fn(dataset)


def t5_span_corruption(dataset: tf.data.Dataset, noise_density: float = 0.15,
                       mean_noise_span_length: float = 3.0,
                       vocabulary: Optional[ProtT5Vocabulary] = None) -> tf.data.Dataset:
    """Standard T5 span corruption on residue ids (``targets`` without EOS).

    ``inputs``: non-noise tokens with one sentinel per noise span;
    ``targets``: one sentinel per non-noise span followed by the noise tokens,
    i.e. ``<extra_id_0> span0 <extra_id_1> span1 …`` (each sentinel announces
    the span that follows it).
    """
    vocabulary = vocabulary or ProtT5Vocabulary()

    @seqio.map_over_dataset(num_seeds=1)
    def fn(x, seed):
        x = dict(x)
        tokens = x["targets"]
        mask = random_spans_noise_mask(tf.size(tokens), noise_density,
                                       mean_noise_span_length, seed)
        x["inputs"] = replace_spans_with_sentinels(tokens, mask, vocabulary.vocab_size)
        x["targets"] = replace_spans_with_sentinels(tokens, ~mask,
                                                    vocabulary.vocab_size)
        return x

    return fn(dataset)


def bert_mlm(dataset: tf.data.Dataset, mask_rate: float = 0.15,
             mask_token_rate: float = 0.8, random_token_rate: float = 0.1,
             vocabulary: Optional[ProtBertVocabulary] = None) -> tf.data.Dataset:
    """BERT masked-LM examples: ``[CLS] seq [SEP]`` with scored positions.

    Expects ``targets`` as ProtBert residue ids. Outputs ``inputs`` (corrupted),
    ``targets`` (original, with ``[CLS]``/``[SEP]``) and ``mlm_weights`` (1 at
    the scored positions, never at ``[CLS]``/``[SEP]``).
    """
    vocabulary = vocabulary or ProtBertVocabulary()
    standard = vocabulary.standard_residue_ids

    @seqio.map_over_dataset(num_seeds=3)
    def fn(x, seeds):
        x = dict(x)
        tokens = x["targets"]
        n = tf.size(tokens)
        selected = exact_rate_mask(n, mask_rate, seeds[0])
        u = tf.random.stateless_uniform([n], seeds[1])
        action = tf.where(u < mask_token_rate, 0,
                          tf.where(u < mask_token_rate + random_token_rate, 1, 2))
        random_tokens = tf.random.stateless_uniform(
            [n], seeds[2], minval=standard.start, maxval=standard.stop, dtype=tf.int32)
        corrupted = bert_inputs_from_mask(tokens, selected, action, random_tokens,
                                          vocabulary.MASK_ID)
        cls = tf.constant([vocabulary.CLS_ID], tf.int32)
        sep = tf.constant([vocabulary.SEP_ID], tf.int32)
        zero = tf.zeros([1], tf.int32)
        x["inputs"] = tf.concat([cls, tf.cast(corrupted, tf.int32), sep], axis=0)
        x["targets"] = tf.concat([cls, tf.cast(tokens, tf.int32), sep], axis=0)
        x["mlm_weights"] = tf.concat([zero, tf.cast(selected, tf.int32), zero], axis=0)
        return x

    return fn(dataset)


# ---------------------------------------------------------------------------
# XLNet permutation language modelling
# ---------------------------------------------------------------------------

def xlnet_span_mask(n: int, goal: int, rng: np.random.Generator, *, max_gram: int = 5,
                    mask_alpha: int = 6, mask_beta: int = 1) -> Tuple[np.ndarray, np.ndarray]:
    """zihangdai/xlnet ``_sample_mask`` on ``n`` residues (one piece each).

    Spans of n-gram length ``g`` in 1..``max_gram`` with P(g) ∝ 1/g (cut to
    what ``goal`` leaves), each inside a context of ``g * alpha // beta``
    tokens with its start uniform in the context; spans never touch. When
    the spans stop short of ``goal`` (the sequence ended), single random
    positions fill up to it.

    Returns:
      (mask [n] bool with exactly ``min(goal, n)`` True, span mask before the fill).
    """
    mask = np.zeros(n, bool)
    grams = np.arange(1, max_gram + 1)
    p = 1.0 / grams
    p /= p.sum()
    count, cur = 0, 0
    while cur < n and count < goal:
        g = min(int(rng.choice(grams, p=p)), goal - count)
        ctx = (g * mask_alpha) // mask_beta
        left = int(rng.integers(ctx))
        beg = cur + left
        end = beg + g
        if end >= n:  # as the original: a span reaching the end is not taken
            break
        mask[beg:end] = True
        count += g
        cur = end + ctx - left
    spans = mask.copy()
    free = np.flatnonzero(~mask)
    need = min(goal, n) - count
    if need > 0:
        mask[rng.choice(free, size=need, replace=False)] = True
    return mask, spans


def xlnet_local_perm(length: int, is_masked: np.ndarray, functional: np.ndarray,
                     perm_size: int, rng: np.random.Generator) -> np.ndarray:
    """zihangdai/xlnet ``_local_perm``: the factorisation order as ranks.

    One permutation of ``perm_size`` offsets, shared by every block of
    ``perm_size`` positions (blocks keep their order). Tokens that are
    neither masked nor functional get rank -1: every position sees them and
    they see no masked or functional token.

    Returns:
      [length] int32 ``rev_index``: -1, or the rank.
    """
    blocks = -(-length // perm_size)
    sigma = rng.permutation(perm_size)
    index = (np.arange(blocks)[:, None] * perm_size + sigma[None, :]).reshape(-1)[:length]
    visible = ~is_masked & ~functional
    return np.where(visible, -1, index).astype(np.int32)


def plm_masks_from_ranks(rev_index: np.ndarray, is_target: np.ndarray) -> np.ndarray:
    """``perm_mask`` [L, L] (1 = i cannot attend j) from ranks, as ``_local_perm``.

    Targets cannot see themselves; other tokens can. ``i`` cannot attend
    ``j`` iff ``self_rank[i] <= rank[j]`` and ``j`` is masked or functional.
    The model builds the same mask from the ``perm_index`` feature
    (:func:`protlm_jax.objectives_xlnet.perm_mask`); this is the reference.
    """
    self_rev = np.where(is_target, rev_index, rev_index + 1)
    return ((self_rev[:, None] <= rev_index[None, :]) & (rev_index[None, :] >= 0)).astype(
        np.int32)


def xlnet_plm(dataset: tf.data.Dataset, sequence_length: Optional[Mapping[str, int]] = None,
              num_predict: int = 85, perm_size: int = 256, mask_alpha: int = 6,
              mask_beta: int = 1, max_gram: int = 5,
              vocabulary: Optional[ProtXLNetVocabulary] = None) -> tf.data.Dataset:
    """XLNet permutation-LM examples: ``residues <sep> <cls>`` with an order and targets.

    Expects ``inputs`` as ProtXLNet residue ids (cropped to leave 2 tokens).
    A protein of n residues gets ``round(n * num_predict / length)`` targets
    (at least 1, at most ``num_predict``: the share ``num_predict / length``
    of the XLNet recipe, for proteins of every length) chosen by
    :func:`xlnet_span_mask`, and a factorisation order by
    :func:`xlnet_local_perm` (``<sep>``/``<cls>`` are functional). Outputs:

    * ``inputs``: [n + 2] ids;
    * ``perm_index``: [n + 2] ``rev_index + 2`` (1: visible context, >= 2:
      rank + 2 of masked and functional tokens; padding 0);
    * ``target_positions``: [targets] position + 1 of each target, ascending.

    ``num_predict`` is the ``target_positions`` feature length when given.
    The random part uses seqio's per-example seeds (new each epoch).
    """
    vocabulary = vocabulary or ProtXLNetVocabulary()
    lengths = dict(sequence_length or {})
    num_predict = int(lengths.get("target_positions", num_predict))
    seq_len = int(lengths.get("inputs", 512))
    sep, cls = vocabulary.SEP_ID, vocabulary.CLS_ID

    def build(tokens, seed):
        rng = np.random.default_rng(np.asarray(seed, np.int64) & 0xFFFFFFFF)
        n = len(tokens)
        goal = min(num_predict, max(1, int(round(n * num_predict / seq_len))))
        mask, _ = xlnet_span_mask(n, goal, rng, max_gram=max_gram, mask_alpha=mask_alpha,
                                  mask_beta=mask_beta)
        ids = np.concatenate([tokens.astype(np.int32), np.array([sep, cls], np.int32)])
        is_masked = np.concatenate([mask, [False, False]])
        functional = np.zeros(n + 2, bool)
        functional[-2:] = True
        rev = xlnet_local_perm(n + 2, is_masked, functional, perm_size, rng)
        targets = np.flatnonzero(is_masked & ~functional)[:num_predict] + 1
        return ids, (rev + 2).astype(np.int32), targets.astype(np.int32)

    @seqio.map_over_dataset(num_seeds=1)
    def fn(x, seed):
        x = dict(x)
        ids, perm, targets = tf.numpy_function(build, [x["inputs"], seed],
                                               [tf.int32, tf.int32, tf.int32], stateful=False)
        x["inputs"] = tf.ensure_shape(ids, [None])
        x["perm_index"] = tf.ensure_shape(perm, [None])
        x["target_positions"] = tf.ensure_shape(targets, [None])
        return x

    return fn(dataset)
