"""Features for the probes: baselines, a language model's embeddings, HDF5 files.

A *featurizer* turns ``(id, sequence)`` records into per-residue ``[L, D]`` or
per-protein ``[D]`` arrays. Three kinds:

  * :class:`OneHot`: 21 columns, the 20 standard residues
    ``ACDEFGHIKLMNPQRSTVWY`` then X; every other letter (the rare U Z O B,
    unknown X) sets the X column. Per protein, the mean over residues of the
    one-hot rows *is* the amino-acid composition baseline.
  * :class:`ModelFeatures`: embeddings from a ``protlm_jax.embed.Embedder``
    (a training checkpoint or live parameters).
  * :class:`H5Features`: embeddings already written by ``protlm embed``
    (one dataset per id; per-residue datasets are mean-pooled on demand).

Per-protein features of per-residue embeddings are the mean over residues only.
"""

from __future__ import annotations

from typing import Iterable, Optional, Sequence

import numpy as np

from protlm_jax.embed.engine import clean_sequence, sanitize_id
from protlm_jax.errors import InputError, ProtlmError

ONE_HOT_ALPHABET = "ACDEFGHIKLMNPQRSTVWY"
_ONE_HOT_INDEX = np.full(256, len(ONE_HOT_ALPHABET), np.int64)
for _i, _c in enumerate(ONE_HOT_ALPHABET):
    _ONE_HOT_INDEX[ord(_c)] = _i


def residue_indices(seq: str) -> np.ndarray:
    """Indices 0…20 into ``ONE_HOT_ALPHABET + 'X'`` (upper-cased)."""
    return _ONE_HOT_INDEX[np.frombuffer(seq.upper().encode("ascii", "replace"), np.uint8)]


def one_hot(seq: str) -> np.ndarray:
    """[L, 21] uint8 one-hot rows."""
    out = np.zeros((len(seq), len(ONE_HOT_ALPHABET) + 1), np.uint8)
    out[np.arange(len(seq)), residue_indices(seq)] = 1
    return out


def composition(seq: str) -> np.ndarray:
    """[21] float32 amino-acid composition (fractions summing to 1)."""
    counts = np.bincount(residue_indices(seq), minlength=len(ONE_HOT_ALPHABET) + 1)
    return (counts / max(len(seq), 1)).astype(np.float32)


class OneHot:
    """One-hot residues (per residue) / amino-acid composition (per protein)."""
    name = "one-hot"
    dim = len(ONE_HOT_ALPHABET) + 1

    def __call__(self, records: Sequence[tuple[str, str]], per_protein: bool) -> list:
        fn = composition if per_protein else one_hot
        return [fn(seq) for _, seq in records]


class ModelFeatures:
    """Embeddings from a ``protlm_jax.embed.Embedder`` (last layer, float32)."""

    def __init__(self, embedder, name: str = "model", token_budget: int = 4096,
                 progress: bool = False):
        self.embedder, self.name = embedder, name
        self.token_budget, self.progress = token_budget, progress

    def __call__(self, records: Sequence[tuple[str, str]], per_protein: bool) -> list:
        keyed = [(str(i), seq) for i, (_, seq) in enumerate(records)]  # ids may repeat
        out: list = [None] * len(keyed)
        # Always per residue, pooled here (the same mean over residues only):
        # per-residue and per-protein tasks then share compiled programs.
        for key, emb in self.embedder.embed(keyed, per_protein=False,
                                            token_budget=self.token_budget,
                                            progress=self.progress):
            emb = np.asarray(emb, np.float32)
            out[int(key)] = emb.mean(axis=0) if per_protein else emb
        missing = [records[i][0] for i, x in enumerate(out) if x is None]
        if missing:
            raise ProtlmError(f"the embedder returned nothing for {len(missing)} "
                              f"protein(s), e.g. {missing[0]}")
        return out


class H5Features:
    """Embeddings read from an HDF5 file written by ``protlm embed``.

    Datasets are looked up by the record id, then by the ``original_id``
    attribute (whole header or its first word), then by the id sanitised as
    ProtTrans does (``embed.sanitize_id``).
    """

    def __init__(self, path: str, name: str = "embeddings"):
        import h5py

        self.path, self.name = str(path), name
        try:
            self._file = h5py.File(self.path, "r")
        except OSError as e:
            raise InputError(self.path, 0, f"cannot open as HDF5: {e}") from None
        self._by_original = {}
        for key, ds in self._file.items():
            original = ds.attrs.get("original_id")
            if original is not None:
                original = original.decode() if isinstance(original, bytes) else str(original)
                self._by_original.setdefault(original, key)
                self._by_original.setdefault(original.split()[0], key)

    def items(self):
        """(key, h5py object) of every top-level entry of the file."""
        return self._file.items()

    def key(self, ident: str) -> Optional[str]:
        """The dataset key of protein ``ident`` (see the class docstring), or None."""
        for key in (ident, self._by_original.get(ident), sanitize_id(ident)):
            if key is not None and key in self._file:
                return key
        return None

    def _lookup(self, ident: str):
        key = self.key(ident)
        if key is None:
            raise InputError(self.path, 0, f"no embedding for protein {ident!r}")
        return self._file[key]

    def __call__(self, records: Sequence[tuple[str, str]], per_protein: bool) -> list:
        out = []
        for ident, seq in records:
            x = np.asarray(self._lookup(ident)[()], np.float32)
            if x.ndim == 2:
                if x.shape[0] != len(seq):
                    raise InputError(self.path, 0, f"{ident}: {x.shape[0]} embedded "
                                     f"residues, the data set has {len(seq)}")
                out.append(x.mean(axis=0) if per_protein else x)
            elif x.ndim == 1 and per_protein:
                out.append(x)
            else:
                raise InputError(self.path, 0, f"{ident}: shape {x.shape}; this probe "
                                 f"needs per-residue [L, D] embeddings")
        return out


def featurize(featurizer, records: Iterable[tuple[str, str]], per_protein: bool,
              clean: bool = True) -> list:
    """Features of ``records``; sequences are cleaned (REFERENCE §2) first."""
    records = list(records)
    if clean:
        records = [(i, clean_sequence(s)) for i, s in records]
    return featurizer(records, per_protein)


def feature_dim(features: list) -> Optional[int]:
    return int(features[0].shape[-1]) if features else None
