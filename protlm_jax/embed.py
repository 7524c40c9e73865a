"""Embeddings at scale: FASTA -> per-residue / per-protein arrays -> HDF5.

What ProtTrans users do most, done fast and exactly:

* Sequences are cleaned as every ProtTrans model expects (REFERENCE §2):
  upper case, no gaps or white space, rare residues U Z O B -> X.
* Batches are built by a token budget over length-sorted sequences padded to a
  small, fixed set of bucket lengths (1.25x steps from 16), so XLA compiles a
  bounded number of programs; a batch is split over the mesh's ``data`` axis.
* Long proteins run the encoder with exact chunked attention and chunked
  feed-forward (``T5Config.attention_chunk_size``/``mlp_chunk_size``): memory
  grows linearly with the length, so a 35,000-residue protein embeds whole.
* Per-residue output keeps the L residue positions (T5: ``[:L]``, the ``</s>``
  is dropped); per-protein output is the mean over those positions only.
* HDF5 output as ProtTrans' ``prott5_embedder.py`` writes it: one dataset per
  sequence keyed by the sanitised header, plus the ``original_id`` attribute
  (bio_embeddings' convention) and ``length``. Rerunning skips ids present.

Layers are numbered like Hugging Face's ``hidden_states``: 0 is the token
embedding, i (1..N-1) the output of encoder block i, N (or -1) the final
layer-normed output (``last_hidden_state``); negative indices count from N.

Shape legend: B batch rows, L residues, T tokens (bucket length), D d_model,
N encoder layers, Y requested layers.
"""

from __future__ import annotations

import collections
import math
import os
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from protlm_jax.errors import InputError, ProtlmError

_RARE_TO_X = str.maketrans("UZOB", "XXXX")
_GAPS_AND_SPACE = str.maketrans("", "", "-. \t\n\r\v\f")

# Buckets: 16, 32, 48, ... growing by 1.25x, rounded up to a multiple of 16.
MIN_BUCKET = 16
BUCKET_STEP = 1.25
BUCKET_MULTIPLE = 16
# Above this many tokens the encoder runs in chunks (linear memory).
LONG_LENGTH = 2048
LONG_BUCKET_MULTIPLE = 1024
ATTENTION_CHUNK = 512
MLP_CHUNK = 2048


def clean_sequence(seq: str) -> str:
    """ProtTrans clean-up: upper case, drop gaps ``-``/``.`` and white space,
    rare residues U Z O B -> X (REFERENCE §2)."""
    return seq.translate(_GAPS_AND_SPACE).upper().translate(_RARE_TO_X)


def sanitize_id(header: str) -> str:
    """The HDF5 key ProtTrans' ``prott5_embedder.py`` gives a FASTA header.

    That script keys each embedding by the whole header line without ``>``
    (stripped), with ``/`` and ``.`` replaced by ``_`` (they are path
    separators / the current group in HDF5). The unchanged header is kept as
    the dataset's ``original_id`` attribute.
    """
    return header.replace(">", "").strip().replace("/", "_").replace(".", "_")


def bucket_length(n: int) -> int:
    """The smallest bucket length >= ``n`` tokens.

    1.25x steps from 16 (multiples of 16) up to ``LONG_LENGTH``, then
    multiples of 1024: long proteins are few, and padding costs them
    quadratically in attention.
    """
    if n > LONG_LENGTH:
        return -(-n // LONG_BUCKET_MULTIPLE) * LONG_BUCKET_MULTIPLE
    b = MIN_BUCKET
    while b < n:
        b = int(math.ceil(b * BUCKET_STEP / BUCKET_MULTIPLE)) * BUCKET_MULTIPLE
    return min(b, LONG_LENGTH)


def _next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _unscan(tree: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """Scanned encoder params (``layers`` with a leading axis) -> ``layers_{i}``."""
    enc = dict(tree["encoder"])
    if "layers" in enc:
        stacked = enc.pop("layers")
        for i in range(num_layers):
            enc[f"layers_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
    return {**tree, "encoder": enc}


class Embedder:
    """Batched, sharded, length-bucketed encoder forward passes.

    Args:
      family: the model family; only "t5" (ProtT5, ``T5EncoderOnly``) so far.
      config: the model's ``T5Config``.
      params: encoder params: ``{"token_embedder", "encoder"}`` (a full T5
        tree, or one wrapped in ``{"params": ...}``, also works; scanned
        layers are unstacked).
      vocab: a seqio vocabulary with ``encode`` and ``eos_id``
        (``ProtT5Vocabulary()`` by default).
      mesh: a mesh with a ``data`` axis (and optionally ``model``); default:
        all devices on ``data``.
      long_length: bucket lengths above this run the chunked encoder.
      attention_chunk_size: its query/key block length.
      mlp_chunk_size: its feed-forward block length.
    """

    def __init__(self, family: str = "t5", config=None, params=None, vocab=None,
                 mesh=None, *, long_length: int = LONG_LENGTH,
                 attention_chunk_size: int = ATTENTION_CHUNK,
                 mlp_chunk_size: int = MLP_CHUNK):
        from protlm_jax import partitioning
        from protlm_jax.models import t5

        if family != "t5":
            raise ProtlmError(f"embedding supports the t5 family, not {family!r}")
        if config is None or params is None:
            raise ValueError("Embedder needs a config and params")
        if vocab is None:
            from protlm_jax.vocabularies import ProtT5Vocabulary

            vocab = ProtT5Vocabulary()
        self.family = family
        self.vocab = vocab
        self.long_length = long_length
        self.chunk_sizes = (attention_chunk_size, mlp_chunk_size)
        self.step: Optional[int] = None  # the checkpoint step, when loaded from one
        # Inference: no dropout, no remat; layers unrolled so every block's
        # output can be captured.
        self.config = config.replace(dropout_rate=0.0, remat_policy="none", scan_layers=False,
                                     attention_chunk_size=None, mlp_chunk_size=None)
        self.num_layers = self.config.num_encoder_layers
        self.mesh = mesh if mesh is not None else partitioning.create_mesh(1)
        self.rules = partitioning.standard_logical_axis_rules("1d")
        self.data_size = int(self.mesh.shape["data"])
        with partitioning.axis_rules(self.mesh, self.rules):
            abstract = t5.abstract_params(self.config, encoder_only=True)
            self._param_shardings, _ = partitioning.param_shardings(
                abstract, self.mesh, self.rules)
        self.params = self._place(params)
        self._batch_sharding = partitioning.batch_sharding(self.mesh)
        self._fns: Dict[tuple, Any] = {}

    def _place(self, params) -> Dict[str, Any]:
        """The encoder part of a T5 or encoder-only tree, unscanned, on the mesh."""
        tree = params.get("params", params)
        tree = {"token_embedder": tree["token_embedder"], "encoder": tree["encoder"]}
        tree = _unscan(tree, self.num_layers)
        return jax.device_put(jax.tree.map(jnp.asarray, tree), self._param_shardings)

    def with_params(self, params) -> "Embedder":
        """This embedder (config, mesh, compiled programs) on other weights of
        the same shapes: a training hook embeds with the live parameters at
        every probe step without compiling again."""
        import copy

        other = copy.copy(self)  # shares the dict of compiled programs
        other.params = self._place(params)
        other.step = None
        return other

    # ------------------------------------------------------------ helpers ---

    def _layer_index(self, layer: int) -> int:
        n = self.num_layers
        if not -(n + 1) <= layer <= n:
            raise ProtlmError(f"--layers: {layer} is out of range for {n} encoder layers "
                              f"(0 = embeddings, {n} or -1 = final output)")
        return layer % (n + 1)

    def _fn(self, chunked: bool, layers: Tuple[int, ...], per_protein: bool, dtype: str):
        key = (chunked, layers, per_protein, dtype)
        if key in self._fns:
            return self._fns[key]
        from protlm_jax import partitioning
        from protlm_jax.models import t5

        cfg = self.config.replace(dtype=dtype)
        if chunked:
            cfg = cfg.replace(attention_chunk_size=self.chunk_sizes[0],
                              mlp_chunk_size=self.chunk_sizes[1])
        model = t5.T5EncoderOnly(cfg)
        n, pad_id = self.num_layers, cfg.pad_id
        wanted = {f"layers_{i - 1}" for i in layers if 0 < i < n}
        capture_embedding = 0 in layers

        def keep(mdl, method_name):
            return method_name == "__call__" and (
                mdl.name in wanted or (capture_embedding and mdl.name == "token_embedder"))

        def forward(params, tokens_BT):
            if wanted or capture_embedding:
                final, state = model.apply({"params": params}, tokens_BT,
                                           capture_intermediates=keep)
                inter = state["intermediates"]
            else:
                final, inter = model.apply({"params": params}, tokens_BT), {}
            reps = []
            for i in layers:
                if i == n:
                    reps.append(final)
                elif i == 0:
                    reps.append(inter["token_embedder"]["__call__"][0])
                else:
                    reps.append(inter["encoder"][f"layers_{i - 1}"]["__call__"][0][0])
            x_BYTD = jnp.stack([r.astype(jnp.float32) for r in reps], axis=1)
            # Residues are the non-pad tokens before </s>.
            lengths_B = jnp.sum(tokens_BT != pad_id, axis=1) - 1
            if not per_protein:
                return x_BYTD
            valid_BT = jnp.arange(tokens_BT.shape[1])[None, :] < lengths_B[:, None]
            total_BYD = jnp.einsum("byld,bl->byd", x_BYTD, valid_BT.astype(jnp.float32))
            return total_BYD / jnp.maximum(lengths_B, 1)[:, None, None].astype(jnp.float32)

        fn = partitioning.partitioned_jit(
            forward, self.mesh, self.rules,
            in_shardings=(self._param_shardings, self._batch_sharding),
            out_shardings=self._batch_sharding)
        self._fns[key] = fn
        return fn

    def _plan(self, items: List[Tuple[str, List[int]]], token_budget: int):
        """Length-sorted (longest first) batches: (bucket, rows, [items])."""
        order = sorted(range(len(items)), key=lambda i: -len(items[i][1]))
        by_bucket: Dict[int, List[int]] = collections.defaultdict(list)
        for i in order:
            by_bucket[bucket_length(len(items[i][1]))].append(i)
        plan = []
        for bucket in sorted(by_bucket, reverse=True):
            members = by_bucket[bucket]
            rows_max = self.data_size * max(1, token_budget // bucket)
            for start in range(0, len(members), rows_max):
                chunk = members[start:start + rows_max]
                # A short tail batch gets a power-of-two row count per device
                # (few shapes to compile, at most 2x padding on that batch).
                per_device = _next_pow2(-(-len(chunk) // self.data_size))
                rows = min(rows_max, self.data_size * per_device)
                plan.append((bucket, rows, chunk))
        return plan

    # ------------------------------------------------------------- public ---

    def embed(self, records: Iterable[Tuple[str, str]], *, per_protein: bool = False,
              layers: Sequence[int] = (-1,), dtype: str = "float32",
              token_budget: int = 4096,
              progress: bool = False) -> Iterator[Tuple[str, np.ndarray]]:
        """Embeds sequences; yields ``(id, array)`` longest first.

        The order is the processing order (by length, longest first, so a
        protein too large for memory fails at once), not the input order.

        Args:
          records: (id, sequence) pairs; sequences are cleaned with
            :func:`clean_sequence`.
          per_protein: mean over residues ([D]) instead of per residue ([L, D]).
          layers: which representations (HF ``hidden_states`` numbering, see
            the module docstring). One layer gives [L, D] / [D]; several give
            [Y, L, D] / [Y, D] in the order asked.
          dtype: activation dtype, "float32" or "bfloat16"; arrays are
            returned as float32 either way.
          token_budget: padded tokens per device per batch (rows per batch =
            devices * max(1, budget // bucket length)).
          progress: show a tqdm bar counting residues (residues/s).

        Yields:
          (id, float32 array) pairs.

        Raises:
          ProtlmError: an empty sequence or one with characters that are not
            letters, or a bad ``layers``/``dtype``.
        """
        if dtype not in ("float32", "bfloat16"):
            raise ProtlmError(f"--dtype must be float32 or bfloat16, got {dtype!r}")
        if not layers:
            raise ProtlmError("--layers: give at least one layer")
        layer_idx = tuple(self._layer_index(i) for i in layers)
        eos = self.vocab.eos_id
        items = []
        for ident, seq in records:
            seq = clean_sequence(seq)
            if not seq or not seq.isascii() or not seq.isalpha():
                raise ProtlmError(f"sequence {ident!r}: "
                                  f"{'empty' if not seq else 'characters other than letters'}")
            items.append((ident, list(self.vocab.encode(seq)) + [eos]))
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(t) - 1 for _, t in items), unit="res", unit_scale=True,
                       desc="embed", file=sys.stderr, mininterval=1.0, smoothing=0.1)
        try:
            for bucket, rows, members in self._plan(items, token_budget):
                tokens = np.zeros((rows, bucket), np.int32)
                for r, i in enumerate(members):
                    ids = items[i][1]
                    tokens[r, :len(ids)] = ids
                fn = self._fn(bucket > self.long_length, layer_idx, per_protein, dtype)
                out = np.asarray(jax.device_get(fn(self.params, jax.device_put(
                    tokens, self._batch_sharding))))
                for r, i in enumerate(members):
                    ident, ids = items[i]
                    arr = out[r] if per_protein else out[r, :, :len(ids) - 1]
                    yield ident, (arr[0] if len(layer_idx) == 1 else arr)
                    if bar is not None:
                        bar.update(len(ids) - 1)
        finally:
            if bar is not None:
                bar.close()


# --------------------------------------------------------------- loading ---

def _t5_config_from_metadata(model_config: dict):
    import dataclasses

    from protlm_jax.models import t5

    known = {f.name for f in dataclasses.fields(t5.T5Config)}
    return t5.T5Config(**{k: v for k, v in model_config.items() if k in known})


def load_model(path: str, step: Optional[int] = None, *, mesh=None) -> Embedder:
    """An :class:`Embedder` for a training ``MODEL_DIR`` or a Hugging Face dir.

    A ``MODEL_DIR`` gives its latest complete checkpoint (or ``step``); only
    the token embedding and encoder are read from it (an orbax partial
    restore: no optimizer state, no decoder), straight into the shardings of
    ``mesh``. The model config comes from the checkpoint's metadata. A
    directory with ``config.json`` is read as a Hugging Face checkpoint.

    Args:
      path: the directory.
      step: a checkpoint step (MODEL_DIR only); default the latest.
      mesh: as for :class:`Embedder`.

    Returns:
      The embedder.

    Raises:
      ProtlmError: no such directory, no complete checkpoint, unknown step.
    """
    import orbax.checkpoint as ocp

    from protlm_jax import partitioning
    from protlm_jax.models import t5
    from protlm_jax.vocabularies import ProtT5Vocabulary

    if not os.path.isdir(path):
        raise ProtlmError(f"{path}: no such model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        from protlm_jax import hf_t5

        if step is not None:
            raise ProtlmError(f"{path}: --step applies to training MODEL_DIRs, "
                              "not Hugging Face directories")
        if not hasattr(hf_t5, "load_pretrained"):
            raise ProtlmError(f"{path}: Hugging Face directories need "
                              "protlm_jax.hf_t5.load_pretrained")
        config, params = hf_t5.load_pretrained(path, mesh=mesh, encoder_only=True)
        return Embedder("t5", config, params, ProtT5Vocabulary(), mesh)
    directory = os.path.join(os.path.abspath(path), "checkpoints")
    if not os.path.isdir(directory):
        raise ProtlmError(f"{path}: neither a training MODEL_DIR (no checkpoints/) nor a "
                          "Hugging Face directory (no config.json)")
    manager = ocp.CheckpointManager(directory, options=ocp.CheckpointManagerOptions(
        read_only=True, create=False))
    steps = sorted(manager.all_steps())
    if not steps:
        raise ProtlmError(f"{directory}: no complete checkpoint")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise ProtlmError(f"{directory}: no checkpoint for step {step} (have {steps})")
    meta = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    meta = dict(meta["metadata"])
    if "model_config" not in meta:
        raise ProtlmError(f"{directory}/{step}: checkpoint metadata has no model_config")
    config = _t5_config_from_metadata(meta["model_config"])
    mesh = mesh if mesh is not None else partitioning.create_mesh(1)
    rules = partitioning.standard_logical_axis_rules("1d")
    with partitioning.axis_rules(mesh, rules):
        shardings, abstract = partitioning.param_shardings(
            t5.abstract_params(config, encoder_only=True), mesh, rules)
    target = {"params": jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)}
    restore_args = jax.tree.map(lambda s: ocp.ArrayRestoreArgs(sharding=s),
                                {"params": shardings})
    state_dir = os.path.join(directory, str(step), "state")
    restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
    manager.close()
    embedder = Embedder("t5", config, restored["params"], ProtT5Vocabulary(), mesh)
    embedder.step = step
    return embedder


# ------------------------------------------------------------------ HDF5 ---

def _read_fasta(input_path: str, counts: collections.Counter):
    """(key, sequence, header, line) of every record; bad input -> InputError."""
    from protlm_jax import fasta

    records, first_line = [], {}
    for rec in fasta.read_records(input_path, counts):
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
        rare = sum(rec.sequence.count(c) for c in "UZOB")
        if rare:
            counts["rare_residues_to_X"] += rare
        records.append((key, rec.sequence, rec.description, rec.line))
    if not records:
        raise InputError(input_path, 0, "no FASTA records")
    return records


def embed_fasta(embedder: Embedder, input_path: str, output_h5: str, *,
                per_protein: bool = False, layers: Sequence[int] = (-1,),
                dtype: str = "float32", token_budget: int = 4096,
                progress: bool = True) -> dict:
    """Embeds a FASTA file (plain or gzip) into an HDF5 file.

    One dataset per record, keyed by :func:`sanitize_id` of its header, with
    attributes ``original_id`` (the whole header) and ``length`` (residues).
    The file's own attributes record ``per_protein``, ``layers`` and
    ``dtype``; appending with other settings is refused. Records whose key is
    already in the file are skipped (a rerun resumes an interrupted one).
    The whole input is validated before anything is computed: a duplicate
    key, an empty or invalid sequence stops the run with the file and line.

    Args:
      embedder: from :func:`load_model` or built directly.
      input_path: FASTA (plain or .gz), local or remote.
      output_h5: the HDF5 file (created or appended to).
      per_protein, layers, dtype, token_budget, progress: see
        :meth:`Embedder.embed`.

    Returns:
      Counts: ``embedded``, ``skipped_existing``, ``residues`` (embedded
      ones) and ``normalised`` (what the reader and clean-up changed).
    """
    import h5py

    counts: collections.Counter = collections.Counter()
    records = _read_fasta(input_path, counts)
    settings = {"per_protein": bool(per_protein), "layers": [int(i) for i in layers],
                "dtype": dtype}
    try:
        h5 = h5py.File(output_h5, "a")
    except OSError as e:
        raise ProtlmError(f"{output_h5}: cannot open for writing ({e})") from None
    with h5:
        if len(h5.keys()):
            for name, value in settings.items():
                if name in h5.attrs:
                    have = h5.attrs[name]
                    have = [int(i) for i in have] if name == "layers" else (
                        bool(have) if name == "per_protein" else str(have))
                    if have != value:
                        raise ProtlmError(f"{output_h5}: written with {name}={have}, "
                                          f"asked {name}={value}; use another output file")
        for name, value in settings.items():
            h5.attrs[name] = value
        todo = [r for r in records if r[0] not in h5]
        meta = {key: (header, len(seq)) for key, seq, header, _ in todo}
        stats = {"embedded": 0, "skipped_existing": len(records) - len(todo), "residues": 0}
        pending = 0
        for key, arr in embedder.embed(((k, s) for k, s, _, _ in todo),
                                       per_protein=per_protein, layers=layers, dtype=dtype,
                                       token_budget=token_budget, progress=progress):
            header, length = meta[key]
            ds = h5.create_dataset(key, data=arr)
            ds.attrs["original_id"] = header
            ds.attrs["length"] = length
            stats["embedded"] += 1
            stats["residues"] += length
            pending += length
            if pending >= 1_000_000:  # bound what an interruption can lose
                h5.flush()
                pending = 0
    stats["normalised"] = dict(counts)
    return stats
