"""Embedding I/O: models from a MODEL_DIR or a Hugging Face directory, FASTA -> HDF5.

* :func:`read_model` reads any model directory (``protlm generate`` too);
  :func:`load_model` gives an :class:`~protlm_jax.embed.engine.Embedder` for a
  training ``MODEL_DIR`` (its latest complete checkpoint, or a step; only what
  the family's encoder needs is read, straight into the mesh's shardings) or
  a Hugging Face directory (any registered family, with the checkpoint's own
  vocabulary).
* :func:`embed_fasta` writes HDF5 as ProtTrans' ``prott5_embedder.py`` does:
  one dataset per sequence keyed by the sanitised header, plus the
  ``original_id`` attribute (bio_embeddings' convention) and ``length``.

A record is complete when its ``length`` attribute is there: it is written
last, after the array and ``original_id``, so a run killed (or stopped by a
full disk) mid-record leaves a record without it, which a rerun deletes and
redoes; complete records are skipped. The file's attributes name the model
(``model``: its real path, ``step``: -1 for a Hugging Face directory,
``model_config``: JSON) and the settings; appending another model's (or
other settings') output is refused.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import time
from typing import Optional, Sequence

from protlm_jax import checkpoints, errors, partitioning
from protlm_jax.data import fasta
from protlm_jax.data.residues import RARE_RESIDUES
from protlm_jax.data.vocabularies import VocabTxtVocabulary
from protlm_jax.embed.engine import Embedder, sanitize_id
from protlm_jax.errors import InputError, ProtlmError
from protlm_jax.hf import convert

log = logging.getLogger(__name__)

# Characters HDF5 names and attributes cannot hold (NUL) or that no header
# should carry; a tab is allowed.
_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
# Longer proteins are embedded, with a warning: attention is quadratic in length.
LONG_WARNING = 40_000
# Written records are flushed to the file at least this often.
FLUSH_SECONDS = 2.0


def read_model(path: str, step: Optional[int] = None, *, encoder_only: bool = True,
               mesh=None):
    """(config, params, vocabulary or None, step or None) of a training
    ``MODEL_DIR`` or a Hugging Face directory.

    A ``MODEL_DIR`` gives its latest complete checkpoint (or ``step``);
    ``encoder_only`` reads only what the family's encoder needs (an orbax
    partial restore: no optimizer state, no decoder or heads), straight into
    the shardings of ``mesh``. The model config (any family) comes from the
    checkpoint's metadata, and so does an imported checkpoint's own
    vocabulary. A directory with ``config.json`` is read as a Hugging Face
    checkpoint (its own vocabulary).

    Raises:
      ProtlmError: no such directory, no complete checkpoint, unknown step.
    """
    if not os.path.isdir(path):
        raise ProtlmError(f"{path}: no such model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        if step is not None:
            raise ProtlmError(f"{path}: --step applies to training MODEL_DIRs, "
                              "not Hugging Face directories")
        imported = convert.load(path, mesh=mesh, encoder_only=encoder_only)
        return imported.config, imported.params, imported.vocabulary, None
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ProtlmError(f"{path}: neither a training MODEL_DIR (no checkpoints/) nor a "
                          "Hugging Face directory (no config.json)")
    mesh = mesh if mesh is not None else partitioning.create_mesh(1)
    config, params, meta, step = checkpoints.read_params(path, step, encoder_only=encoder_only,
                                                         mesh=mesh)
    vocab = VocabTxtVocabulary(meta["vocabulary"]) if meta.get("vocabulary") else None
    return config, params, vocab, step


def load_model(path: str, step: Optional[int] = None, *, mesh=None) -> Embedder:
    """An :class:`Embedder` for a training ``MODEL_DIR`` or a Hugging Face dir
    (:func:`read_model`, encoder only).

    Args:
      path: the directory.
      step: a checkpoint step (MODEL_DIR only); default the latest.
      mesh: as for :class:`Embedder`.

    Returns:
      The embedder.

    Raises:
      ProtlmError: no such directory, no complete checkpoint, unknown step.
    """
    config, params, vocab, step = read_model(path, step, encoder_only=True, mesh=mesh)
    embedder = Embedder(config, params, vocab, mesh)
    embedder.step = step
    embedder.source = os.path.realpath(path)
    return embedder


# ------------------------------------------------------------------ HDF5 ---

def _read_fasta(input_path: str, counts: collections.Counter):
    """(key, sequence, header, line) of every record; bad input -> InputError."""
    records, first_line = [], {}
    for rec in fasta.read_records(input_path, counts):
        bad = _CONTROL.search(rec.description)
        if bad:
            raise InputError(input_path, rec.line, f"header holds control character "
                             f"{bad[0]!r} (HDF5 names and attributes cannot hold it)")
        key = sanitize_id(rec.description)
        if not key:
            raise InputError(input_path, rec.line, "empty header: no id to key the embedding")
        reason = fasta.invalid_reason(rec.sequence)
        if reason:
            raise InputError(input_path, rec.line,
                             f"record {rec.id!r}: {reason.replace('_', ' ')}")
        if key in first_line:
            raise InputError(input_path, rec.line,
                             f"duplicate id {key!r} (first at line {first_line[key]}); "
                             "HDF5 keys must be unique")
        first_line[key] = rec.line
        rare = sum(rec.sequence.count(c) for c in RARE_RESIDUES)
        if rare:
            counts["rare_residues_to_X"] += rare
        records.append((key, rec.sequence, rec.description, rec.line))
    if not records:
        raise InputError(input_path, 0, "no FASTA records")
    return records


def model_identity(embedder: Embedder) -> dict:
    """The file attributes naming what wrote an embeddings file."""
    config = embedder.model_config
    config = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else config
    return {"model": getattr(embedder, "source", None) or "",
            "step": -1 if embedder.step is None else int(embedder.step),
            "model_config": json.dumps(config, sort_keys=True, default=str)}


def _refuse_mismatch(h5, output_h5: str, wanted: dict) -> None:
    """An existing file written by another model or with other settings: refused."""
    for name, value in wanted.items():
        if name not in h5.attrs:
            continue  # a file from before the attribute existed
        have = h5.attrs[name]
        if name == "layers":
            have = [int(i) for i in have]
        elif name == "per_protein":
            have = bool(have)
        elif name == "step":
            have = int(have)
        else:
            have = have.decode() if isinstance(have, bytes) else str(have)
        if have != value:
            shown = ("another model config" if name == "model_config"
                     else f"{name}={have}, asked {name}={value}")
            raise ProtlmError(f"{output_h5}: written with {shown}; use another output file")


def embed_fasta(embedder: Embedder, input_path: str, output_h5: str, *,
                per_protein: bool = False, layers: Sequence[int] = (-1,),
                dtype: str = "float32", token_budget: int = 4096,
                progress: bool = True, max_length: int = 0) -> dict:
    """Embeds a FASTA file (plain or gzip) into an HDF5 file.

    One dataset per record, keyed by :func:`sanitize_id` of its header, with
    attributes ``original_id`` (the whole header) and ``length`` (residues),
    written in that order after the array: a record without ``length`` is
    incomplete (an interrupted run) and is redone. The file's own attributes
    record the model (:func:`model_identity`), ``per_protein``, ``layers``
    and ``dtype``; appending with another model or other settings is
    refused. Complete records whose key is already in the file are skipped (a
    rerun resumes an interrupted one). The whole input is validated before
    anything is written: a duplicate key, a control character in a header,
    an empty or invalid sequence stops the run with the file and line.

    Args:
      embedder: from :func:`load_model` or built directly.
      input_path: FASTA (plain or .gz), local or remote.
      output_h5: the HDF5 file (created or appended to).
      per_protein, layers, dtype, token_budget, progress: see
        :meth:`Embedder.embed`.
      max_length: leave out (and count) proteins longer than this many
        residues; 0 embeds every length.

    Returns:
      Counts: ``embedded``, ``skipped_existing``, ``redone_incomplete``,
      ``too_long`` (left out by ``max_length``), ``residues`` (embedded ones)
      and ``normalised`` (what the reader and clean-up changed).
    """
    import h5py

    if max_length < 0:
        raise ProtlmError(f"--max_length must be >= 0, got {max_length}")
    counts: collections.Counter = collections.Counter()
    records = _read_fasta(input_path, counts)
    kept = [r for r in records if not max_length or len(r[1]) <= max_length]
    too_long, records = len(records) - len(kept), kept
    longest = max(records, key=lambda r: len(r[1]), default=None)
    if longest is not None and len(longest[1]) > LONG_WARNING:
        log.warning("%s: %s has %s residues: attention time grows with the square of the "
                    "length (--max_length leaves such proteins out)", input_path,
                    longest[0], f"{len(longest[1]):,}")
    settings = {**model_identity(embedder), "per_protein": bool(per_protein),
                "layers": [int(i) for i in layers], "dtype": dtype}
    try:
        if not os.path.exists(output_h5):
            # Created whole, then renamed: a kill at any moment leaves no
            # half-created file that HDF5 cannot open.
            tmp = f"{output_h5}.creating-{os.getpid()}"
            with h5py.File(tmp, "w") as h5:
                for name, value in settings.items():
                    h5.attrs[name] = value
            os.replace(tmp, output_h5)
        h5 = h5py.File(output_h5, "a")
    except OSError as e:
        raise ProtlmError(f"{output_h5}: cannot open for writing ("
                          f"{errors.from_environment(e)})") from None
    try:
        with h5:
            return _write_records(h5, embedder, records, too_long, counts, settings,
                                  output_h5, per_protein=per_protein, layers=layers,
                                  dtype=dtype, token_budget=token_budget, progress=progress)
    except OSError as e:  # a full disk: what is complete stays, a rerun goes on
        raise ProtlmError(f"{output_h5}: write failed ({errors.from_environment(e)}); "
                          "a rerun keeps the complete records and redoes the rest") from None


def _write_records(h5, embedder, records, too_long, counts, settings, output_h5, *,
                   per_protein, layers, dtype, token_budget, progress) -> dict:
    """Checks the file, deletes incomplete records and writes the missing ones."""
    _refuse_mismatch(h5, output_h5, settings)
    for name, value in settings.items():
        h5.attrs[name] = value
    incomplete = [k for k in h5 if "length" not in h5[k].attrs]
    for k in incomplete:  # an interrupted write: redone below
        del h5[k]
    todo = [r for r in records if r[0] not in h5]
    meta = {key: (header, len(seq)) for key, seq, header, _ in todo}
    stats = {"embedded": 0, "skipped_existing": len(records) - len(todo),
             "redone_incomplete": len(incomplete), "too_long": too_long,
             "residues": 0}
    pending, flushed = 0, time.monotonic()
    for key, arr in embedder.embed(((k, s) for k, s, _, _ in todo),
                                   per_protein=per_protein, layers=layers, dtype=dtype,
                                   token_budget=token_budget, progress=progress):
        header, length = meta[key]
        ds = h5.create_dataset(key, data=arr)
        ds.attrs["original_id"] = header
        ds.attrs["length"] = length  # last: the record is complete
        stats["embedded"] += 1
        stats["residues"] += length
        pending += length
        if pending >= 1_000_000 or time.monotonic() - flushed > FLUSH_SECONDS:
            h5.flush()  # bound what an interruption can lose
            pending, flushed = 0, time.monotonic()
    stats["normalised"] = dict(counts)
    return stats
