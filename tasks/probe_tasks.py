"""seqio tasks of the probe sets (labels as features), for eval pipelines.

  ``ss_casp12``  sidechainnet DSSP labels; splits ``train`` (CASP12
                 training_30 minus the early-stopping part), ``validation``
                 (that part), ``test`` (the 211 CASP12 validation chains).
                 Features: ``inputs`` (ProtT5 ids + ``</s>``), ``ss3`` [L],
                 ``ss8`` [L] (indices into ``H E C`` / ``H G I E B T S C``),
                 ``scored`` [L] (1 where a residue counts).
  ``scl2205``    SCL2205 localization; splits ``train`` / ``validation``
                 (``evl``) / ``test``. Features: ``inputs``, ``location``
                 (scalar, 13 classes), ``membrane`` (scalar, 1 if the label
                 contains Membrane).

Labels are per residue of the *sequence* (``inputs`` has one more token, the
``</s>``). Data come from ``protlm data fetch`` (``data/fetched``, or
``fetched/`` of the data root: ``protlm_jax.data.locations``), loaded once per process when a dataset is first
built. Nothing is cropped: embedding pipelines need whole proteins.
"""

import functools

import numpy as np
import seqio
import tensorflow as tf

from protlm_jax.data import preprocessors as pp
from protlm_jax.probes import datasets
from protlm_jax.data.vocabularies import ProtT5Vocabulary

SPLITS = ("train", "validation", "test")

_VOCAB = ProtT5Vocabulary()
_LABELS = seqio.PassThroughVocabulary(256)


@functools.lru_cache(maxsize=None)
def _load(spec: str, data_dir: str) -> datasets.ProbeTask:
    return datasets.load_task(spec, data_dir)


def _split(spec: str, split: str):
    task = _load(spec, datasets.default_data_dir())
    if split == "train":
        return task.train
    if split == "validation":
        return task.valid
    if split == "test":
        return next(iter(task.tests.values()))
    raise ValueError(f"{spec}: unknown split {split!r}; known: {SPLITS}")


def _ss_dataset(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed  # one in-memory table
    ds = _split("ss_casp12", split)

    def gen():
        for i, s, y3, y8, m in zip(ds.ids, ds.sequences, ds.ss3, ds.ss8, ds.scored):
            yield {"id": i, "inputs": s, "ss3": y3.astype(np.int32),
                   "ss8": y8.astype(np.int32), "scored": m.astype(np.int32)}

    vec = tf.TensorSpec([None], tf.int32)
    return tf.data.Dataset.from_generator(gen, output_signature={
        "id": tf.TensorSpec([], tf.string), "inputs": tf.TensorSpec([], tf.string),
        "ss3": vec, "ss8": vec, "scored": vec})


def _scl_dataset(split: str, shuffle_files: bool = False, seed=None) -> tf.data.Dataset:
    del shuffle_files, seed
    ds = _split("scl2205", split)

    def gen():
        for i, s, y, m in zip(ds.ids, ds.sequences, ds.labels, ds.membrane):
            yield {"id": i, "inputs": s, "location": np.int32(y), "membrane": np.int32(m)}

    scalar = tf.TensorSpec([], tf.int32)
    return tf.data.Dataset.from_generator(gen, output_signature={
        "id": tf.TensorSpec([], tf.string), "inputs": tf.TensorSpec([], tf.string),
        "location": scalar, "membrane": scalar})


_CLEAN_AND_TOKENIZE = (
    functools.partial(pp.map_rare_residues, key="inputs"),
    functools.partial(seqio.preprocessors.tokenize, copy_pretokenized=False),
    seqio.preprocessors.append_eos,
)

seqio.TaskRegistry.add(
    "ss_casp12",
    source=seqio.FunctionDataSource(_ss_dataset, splits=SPLITS),
    preprocessors=list(_CLEAN_AND_TOKENIZE),
    output_features={
        "inputs": seqio.Feature(_VOCAB, add_eos=True),
        "ss3": seqio.Feature(_LABELS, add_eos=False),
        "ss8": seqio.Feature(_LABELS, add_eos=False),
        "scored": seqio.Feature(_LABELS, add_eos=False),
    },
    metric_fns=[])

seqio.TaskRegistry.add(
    "scl2205",
    source=seqio.FunctionDataSource(_scl_dataset, splits=SPLITS),
    preprocessors=list(_CLEAN_AND_TOKENIZE),
    output_features={
        "inputs": seqio.Feature(_VOCAB, add_eos=True),
        "location": seqio.Feature(_LABELS, add_eos=False, rank=0),
        "membrane": seqio.Feature(_LABELS, add_eos=False, rank=0),
    },
    metric_fns=[])
