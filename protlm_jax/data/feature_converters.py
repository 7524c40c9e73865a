"""Feature converters beyond seqio's.

seqio's ``EncoderFeatureConverter`` scores only positions whose input is the
mask id, which misses BERT's 10 % random and 10 % unchanged positions.
:class:`MLMFeatureConverter` takes the scored positions from the task's
``mlm_weights`` feature instead (packing supported).
"""

from __future__ import annotations

from typing import Mapping

import seqio
import tensorflow as tf


class MLMFeatureConverter(seqio.FeatureConverter):
    """Encoder-only (BERT-style) converter with explicit scored positions.

    Task features ``inputs``, ``targets``, ``mlm_weights`` (aligned) become
    ``encoder_input_tokens``, ``encoder_target_tokens``, ``encoder_loss_weights``
    and, when packing, ``encoder_segment_ids``/``encoder_positions``. The length
    of ``mlm_weights`` follows ``inputs``; task lengths need only name
    ``inputs`` (and optionally ``targets``).
    """

    TASK_FEATURES = {
        "inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "targets": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "mlm_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        "encoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "encoder_target_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "encoder_loss_weights": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {
        "encoder_segment_ids": tf.int32,
        "encoder_positions": tf.int32,
    }

    def __call__(self, ds: tf.data.Dataset,
                 task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        lengths = dict(task_feature_lengths)
        lengths.setdefault("targets", lengths["inputs"])
        lengths["mlm_weights"] = lengths["inputs"]
        return super().__call__(ds, lengths)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        if self.pack:
            # seqio's packer takes a feature's length to be its count of
            # non-zero values, which would cut a 0/1 weight vector short; shift
            # the weights to 1/2 while packing and back afterwards.
            ds = ds.map(lambda x: {**x, "mlm_weights": x["mlm_weights"] + 1},
                        num_parallel_calls=tf.data.AUTOTUNE)
        ds = self._pack_or_pad(ds, task_feature_lengths)

        def convert(x):
            weights = x["mlm_weights"]
            if self.pack:
                weights = tf.maximum(weights - 1, 0)  # padding stays 0
            out = {
                "encoder_input_tokens": x["inputs"],
                "encoder_target_tokens": x["targets"],
                "encoder_loss_weights": weights,
            }
            if self.pack:
                out["encoder_segment_ids"] = x["inputs_segment_ids"]
                out["encoder_positions"] = x["inputs_positions"]
            return out

        return ds.map(convert, num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(
            self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        length = task_feature_lengths["inputs"]
        names = list(self.MODEL_FEATURES)
        if self.pack:
            names += list(self.PACKING_FEATURE_DTYPES)
        return {name: length for name in names}


class PLMFeatureConverter(seqio.FeatureConverter):
    """XLNet permutation-LM converter (the ``{corpus}_plm`` tasks), one protein per row.

    Task features ``inputs``, ``perm_index`` (aligned) and ``target_positions``
    become ``encoder_input_tokens``, ``encoder_perm_index`` and
    ``encoder_target_positions``, zero-padded: a real position has
    ``perm_index >= 1``, a target slot ``target_positions >= 1``. The
    objective (:class:`protlm_jax.objectives_xlnet.PLMObjective`) builds
    ``perm_mask`` and ``target_mapping`` from them on the device. Task lengths
    name ``inputs`` and ``target_positions`` (``num_predict``). Packing is not
    offered: each row is one protein, as at embedding time (rows never see
    each other, and no mask across packed proteins is needed).
    """

    TASK_FEATURES = {
        "inputs": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "perm_index": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "target_positions": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    MODEL_FEATURES = {
        "encoder_input_tokens": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "encoder_perm_index": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
        "encoder_target_positions": seqio.FeatureConverter.FeatureSpec(dtype=tf.int32),
    }
    PACKING_FEATURE_DTYPES = {}

    def __init__(self, pack: bool = False, **kwargs):
        if pack:
            raise ValueError("permutation-LM tasks are not packed: set DataConfig.pack = False")
        super().__init__(pack=False, **kwargs)

    def __call__(self, ds: tf.data.Dataset,
                 task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        lengths = dict(task_feature_lengths)
        lengths["perm_index"] = lengths["inputs"]
        return super().__call__(ds, lengths)

    def _convert_features(self, ds: tf.data.Dataset,
                          task_feature_lengths: Mapping[str, int]) -> tf.data.Dataset:
        ds = self._pack_or_pad(ds, task_feature_lengths)
        return ds.map(lambda x: {"encoder_input_tokens": x["inputs"],
                                 "encoder_perm_index": x["perm_index"],
                                 "encoder_target_positions": x["target_positions"]},
                      num_parallel_calls=tf.data.AUTOTUNE)

    def get_model_feature_lengths(
            self, task_feature_lengths: Mapping[str, int]) -> Mapping[str, int]:
        return {"encoder_input_tokens": task_feature_lengths["inputs"],
                "encoder_perm_index": task_feature_lengths["inputs"],
                "encoder_target_positions": task_feature_lengths["target_positions"]}


class StreamConverter:
    """The causal-LM layout of the ``{corpus}_clm`` tasks (not a seqio converter).

    A task whose output feature is ``stream`` (residues then ``<eos>``, one
    protein per example) is read as one token stream per batch row (a
    *column*) and cut into contiguous segments of the ``stream`` length S;
    :func:`protlm_jax.data.pipeline.batches` does that. Model features, all
    [B, S]: ``inputs`` (a segment), ``targets`` (the next token of each) and
    ``weights`` (1; 0 on the padding a finite pass ends with).
    """

    MODEL_FEATURES = ("inputs", "targets", "weights")

    def get_model_feature_lengths(self, task_feature_lengths: Mapping[str, int]
                                  ) -> dict[str, int]:
        if "stream" not in task_feature_lengths:
            raise ValueError("a stream task needs the feature length 'stream' (the segment "
                             f"length), got {dict(task_feature_lengths)}")
        n = int(task_feature_lengths["stream"])
        return {k: n for k in self.MODEL_FEATURES}
