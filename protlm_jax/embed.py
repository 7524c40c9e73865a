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
* Each family's input convention: ProtT5 ``seq </s>`` (per residue ``[:L]``);
  ProtBert, ProtAlbert, ProtElectra ``[CLS] seq [SEP]`` (per residue
  ``[1:L+1]``). Per-protein output is the mean over the L residue positions
  only: special tokens and padding never enter.
* HDF5 output as ProtTrans' ``prott5_embedder.py`` writes it: one dataset per
  sequence keyed by the sanitised header, plus the ``original_id`` attribute
  (bio_embeddings' convention) and ``length``. Rerunning skips ids present.

Layers are numbered like Hugging Face's ``hidden_states``: 0 is the token
embedding (BERT family: the embedding output after its LayerNorm and, for
ALBERT/ELECTRA, the projection to the hidden width), i (1..N-1) the output of
encoder block i, N (or -1) the final output (``last_hidden_state``); negative
indices count from N.

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
# A batch runs in groups of rows holding about this many tokens per device.
GROUP_TOKENS = 1024


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


def _rows_per_group(rows: int, length: int, group_tokens: int) -> int:
    """The largest divisor of ``rows`` whose rows hold <= ``group_tokens`` tokens
    (at least one row)."""
    want = max(1, group_tokens // max(1, length))
    return max(d for d in range(1, rows + 1) if rows % d == 0 and d <= want)


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


def _electra_tower(params: Dict[str, Any]) -> str:
    """The ELECTRA tower to embed with: the discriminator (the model ProtTrans
    publishes), or the generator when only that tower is present."""
    return "generator" if "generator" in params and "discriminator" not in params \
        else "discriminator"


def _encoder_tree(family: str, params: Dict[str, Any], num_layers: int) -> Dict[str, Any]:
    """The params an encoder forward pass needs, unscanned.

    T5: ``token_embedder`` and ``encoder``. BERT/ALBERT: ``embeddings``,
    ``embedding_projection`` and ``encoder`` (no MLM head). ELECTRA: the shared
    ``embeddings`` with the chosen tower's subtree, shaped like BERT's.
    """
    tree = params.get("params", params)
    if family == "t5":
        tree = {"token_embedder": tree["token_embedder"], "encoder": tree["encoder"]}
    else:
        if family == "electra" and "encoder" not in tree:
            tower = _electra_tower(tree)
            if tower not in tree:
                raise ProtlmError("ELECTRA params have neither a discriminator nor a generator")
            tree = {"embeddings": tree["embeddings"], **tree[tower]}
        tree = {k: v for k, v in tree.items()
                if k in ("embeddings", "embedding_projection", "encoder")}
    return _unscan(tree, num_layers)


def _default_vocab(family: str):
    from protlm_jax.vocabularies import ProtBertVocabulary, ProtT5Vocabulary

    # ProtAlbert's pieces put [PAD] [UNK] [CLS] [SEP] [MASK] and the residues at
    # ProtBert's ids (our ALBERT trains on ProtBert ids; 30..33 are unused).
    return ProtT5Vocabulary() if family == "t5" else ProtBertVocabulary()


class Embedder:
    """Batched, sharded, length-bucketed encoder forward passes.

    Args:
      family: "t5", "bert", "albert" or "electra"; None: follow ``config``.
      config: the model's config (``T5Config``, ``BertConfig`` or
        ``ElectraConfig``).
      params: the model's params: a full tree (``{"params": ...}`` wrapped or
        not) or just its encoder part; heads, the T5 decoder and the ELECTRA
        generator are not used; scanned layers are unstacked.
      vocab: a seqio vocabulary with ``encode`` (and, for the BERT family,
        ``CLS_ID``/``SEP_ID``): ProtT5's or ProtBert's by default; an
        imported checkpoint's own vocabulary otherwise.
      mesh: a mesh with a ``data`` axis (and optionally ``model``); default:
        all devices on ``data``.
      long_length: bucket lengths above this run the chunked encoder.
      attention_chunk_size: its query/key block length.
      mlp_chunk_size: its feed-forward block length (T5).
      group_tokens: a batch runs as consecutive groups of rows holding about
        this many tokens per device (faster on CPU: one group's activations
        stay in cache); 0 runs every batch whole.

    Constructing one sets the process's glibc allocator to keep freed memory
    (:func:`protlm_jax.host_memory.retain_freed_memory`;
    ``PROTLM_MALLOC_TUNING=0`` opts out).
    """

    def __init__(self, family: Optional[str] = None, config=None, params=None, vocab=None,
                 mesh=None, *, long_length: int = LONG_LENGTH,
                 attention_chunk_size: int = ATTENTION_CHUNK,
                 mlp_chunk_size: int = MLP_CHUNK, group_tokens: int = GROUP_TOKENS):
        from protlm_jax import host_memory, partitioning
        from protlm_jax.models import bert, family_of, t5

        if config is None or params is None:
            raise ValueError("Embedder needs a config and params")
        # Attention blocks of tens of MB: reuse heap memory instead of
        # page-faulting fresh mmaps on every call (see host_memory).
        host_memory.retain_freed_memory()
        model_family = family_of(config)
        if family is not None and family != model_family:
            raise ProtlmError(f"Embedder: family {family!r} but a {model_family} config")
        self.family = model_family
        self.vocab = vocab if vocab is not None else _default_vocab(model_family)
        self.long_length = long_length
        self.chunk_sizes = (attention_chunk_size, mlp_chunk_size)
        self.group_tokens = group_tokens if group_tokens > 0 else 1 << 62
        self.step: Optional[int] = None  # the checkpoint step, when loaded from one
        # Inference: no dropout, no remat; layers unrolled so every block's
        # output can be captured.
        if model_family == "t5":
            self.config = config.replace(dropout_rate=0.0, remat_policy="none",
                                         scan_layers=False, attention_chunk_size=None,
                                         mlp_chunk_size=None)
            self.num_layers = self.config.num_encoder_layers
            self.max_tokens = None  # relative positions: any length
            # seq </s>: residues are the first L tokens.
            self.prefix, self.suffix = [], [self.vocab.eos_id]
            abstract = t5.abstract_params(self.config, encoder_only=True)
        else:
            tower = config
            if model_family == "electra":
                tower = getattr(config, _electra_tower(params.get("params", params)))
            self.config = tower.replace(hidden_dropout_prob=0.0,
                                        attention_probs_dropout_prob=0.0,
                                        remat_policy="none", scan_layers=False,
                                        attention_chunk_size=None)
            self.num_layers = self.config.num_hidden_layers
            self.max_tokens = self.config.max_position_embeddings
            cls_id, sep_id = getattr(self.vocab, "CLS_ID", None), getattr(self.vocab, "SEP_ID", None)
            if cls_id is None or sep_id is None:
                raise ProtlmError(f"{self.family} embedding needs [CLS] and [SEP] in the "
                                  f"vocabulary {self.vocab!r}")
            self.prefix, self.suffix = [int(cls_id)], [int(sep_id)]
            abstract = {k: v for k, v in bert.abstract_params(self.config).items()
                        if k in ("embeddings", "embedding_projection", "encoder")}
        self._tree_keys = tuple(abstract)
        self.mesh = mesh if mesh is not None else partitioning.create_mesh(1)
        self.rules = partitioning.standard_logical_axis_rules("1d")
        self.data_size = int(self.mesh.shape["data"])
        with partitioning.axis_rules(self.mesh, self.rules):
            self._param_shardings, _ = partitioning.param_shardings(
                abstract, self.mesh, self.rules)
        self.params = self._place(params)
        self._batch_sharding = partitioning.batch_sharding(self.mesh)
        self._fns: Dict[tuple, Any] = {}

    def _place(self, params) -> Dict[str, Any]:
        """The encoder part of ``params``, unscanned, on the mesh."""
        tree = _encoder_tree(self.family, params, self.num_layers)
        missing = [k for k in self._tree_keys if k not in tree]
        if missing:
            raise ProtlmError(f"params lack {', '.join(missing)}")
        tree = {k: tree[k] for k in self._tree_keys}
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

    def _module_and_captures(self, chunked: bool, dtype: str, layers: Tuple[int, ...]):
        """(module, apply method, capture filter, getter) of one forward program.

        The getter maps (final output, captured intermediates, layer index) to
        that layer's [B, T, D] representation (HF ``hidden_states`` numbering).
        """
        from protlm_jax.models import bert, t5

        n = self.num_layers
        if self.family == "t5":
            cfg = self.config.replace(dtype=dtype)
            if chunked:
                cfg = cfg.replace(attention_chunk_size=self.chunk_sizes[0],
                                  mlp_chunk_size=self.chunk_sizes[1])
            wanted = {f"layers_{i - 1}" for i in layers if 0 < i < n}
            first = "token_embedder"

            def get(final, inter, i):
                if i == n:
                    return final
                if i == 0:
                    return inter[first]["__call__"][0]
                return inter["encoder"][f"layers_{i - 1}"]["__call__"][0][0]

            return t5.T5EncoderOnly(cfg), "__call__", wanted, first, get
        cfg = self.config.replace(dtype=dtype)
        if chunked:
            cfg = cfg.replace(attention_chunk_size=self.chunk_sizes[0])
        first = "embedding_projection" if cfg.has_embedding_projection else "embeddings"
        if cfg.family == "albert":
            # Shared groups: layer j runs group g(j) (as HF); its k-th call is
            # the k-th entry of that group's captured calls.
            groups = [int(j / (n / cfg.num_hidden_groups)) for j in range(n)]
            calls = [groups[:j].count(groups[j]) for j in range(n)]
            wanted = {f"groups_{groups[i - 1]}" for i in layers if 0 < i < n}

            def block(inter, j):
                return inter["encoder"][f"groups_{groups[j]}"]["__call__"][calls[j]][0]
        else:
            wanted = {f"layers_{i - 1}" for i in layers if 0 < i < n}

            def block(inter, j):
                return inter["encoder"][f"layers_{j}"]["__call__"][0][0]

        def get(final, inter, i):
            if i == n:
                return final
            if i == 0:
                return inter[first]["__call__"][0]
            return block(inter, i - 1)

        return bert.Bert(cfg), "encode", wanted, first, get

    def _fn(self, chunked: bool, layers: Tuple[int, ...], per_protein: bool, dtype: str):
        key = (chunked, layers, per_protein, dtype)
        if key in self._fns:
            return self._fns[key]
        from protlm_jax import partitioning

        model, method, wanted, first, get = self._module_and_captures(chunked, dtype, layers)
        capture_first = 0 in layers
        pad_id = self.config.pad_id
        offset, specials = len(self.prefix), len(self.prefix) + len(self.suffix)

        def keep(mdl, method_name):
            return method_name == "__call__" and (
                mdl.name in wanted or (capture_first and mdl.name == first))

        def encode(params, tokens_BT):
            if wanted or capture_first:
                final, state = model.apply({"params": params}, tokens_BT, method=method,
                                           capture_intermediates=keep)
                inter = state["intermediates"]
            else:
                final, inter = model.apply({"params": params}, tokens_BT, method=method), {}
            x_BYTD = jnp.stack([get(final, inter, i).astype(jnp.float32) for i in layers],
                               axis=1)
            if not per_protein:
                return x_BYTD
            # Residues: the L non-pad tokens after the prefix, before the suffix.
            lengths_B = jnp.sum(tokens_BT != pad_id, axis=1) - specials
            pos_T = jnp.arange(tokens_BT.shape[1]) - offset
            valid_BT = (pos_T[None, :] >= 0) & (pos_T[None, :] < lengths_B[:, None])
            total_BYD = jnp.einsum("byld,bl->byd", x_BYTD, valid_BT.astype(jnp.float32))
            return total_BYD / jnp.maximum(lengths_B, 1)[:, None, None].astype(jnp.float32)

        def forward(params, tokens_BT):
            rows, length = tokens_BT.shape
            local = rows // self.data_size
            per_group = _rows_per_group(local, length, self.group_tokens)
            if per_group == local:
                return encode(params, tokens_BT)
            # G groups of R rows run one after the other (lax.map): each holds
            # ~group_tokens tokens per device, so a big batch keeps the
            # activations of one group in cache instead of streaming [B, T, F]
            # through memory. Row r = a * G + g goes to group g, position a:
            # with rows split over ``data`` in contiguous blocks, every group
            # keeps R / data rows on each device.
            groups = local // per_group
            tokens_GRT = tokens_BT.reshape(rows // groups, groups, length).swapaxes(0, 1)
            out_G = jax.lax.map(lambda t: encode(params, t), tokens_GRT)
            return out_G.swapaxes(0, 1).reshape(rows, *out_G.shape[2:])

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
            bucket = bucket_length(len(items[i][1]))
            if self.max_tokens is not None:  # learned positions end there
                bucket = min(bucket, self.max_tokens)
            by_bucket[bucket].append(i)
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
        items = []
        for ident, seq in records:
            seq = clean_sequence(seq)
            if not seq or not seq.isascii() or not seq.isalpha():
                raise ProtlmError(f"sequence {ident!r}: "
                                  f"{'empty' if not seq else 'characters other than letters'}")
            ids = self.prefix + list(self.vocab.encode(seq)) + self.suffix
            if self.max_tokens is not None and len(ids) > self.max_tokens:
                raise ProtlmError(
                    f"sequence {ident!r}: {len(seq):,} residues + {len(ids) - len(seq)} "
                    f"special tokens exceed the model's {self.max_tokens:,} positions")
            items.append((ident, ids))
        offset, specials = len(self.prefix), len(self.prefix) + len(self.suffix)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(t) - specials for _, t in items), unit="res", unit_scale=True,
                       desc="embed", file=sys.stderr, mininterval=1.0, smoothing=0.1)
        try:
            for bucket, rows, members in self._plan(items, token_budget):
                tokens = np.full((rows, bucket), self.config.pad_id, np.int32)
                for r, i in enumerate(members):
                    ids = items[i][1]
                    tokens[r, :len(ids)] = ids
                fn = self._fn(bucket > self.long_length, layer_idx, per_protein, dtype)
                out = np.asarray(jax.device_get(fn(self.params, jax.device_put(
                    tokens, self._batch_sharding))))
                for r, i in enumerate(members):
                    ident, ids = items[i]
                    length = len(ids) - specials
                    arr = out[r] if per_protein else out[r, :, offset:offset + length]
                    yield ident, (arr[0] if len(layer_idx) == 1 else arr)
                    if bar is not None:
                        bar.update(length)
        finally:
            if bar is not None:
                bar.close()


# --------------------------------------------------------------- loading ---

def _hf_model_type(path: str) -> str:
    import json

    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path) as f:
            return str(json.load(f).get("model_type", "t5"))
    except (OSError, ValueError) as e:
        raise ProtlmError(f"{config_path}: cannot read ({e})") from None


def _load_hf(path: str, mesh) -> Embedder:
    """A Hugging Face directory: T5 (encoder only) or a BERT-family model with
    the checkpoint's own vocabulary (``vocab.txt`` / ``spiece.model``)."""
    model_type = _hf_model_type(path)
    if model_type == "t5":
        from protlm_jax import hf_t5

        config, params = hf_t5.load_pretrained(path, mesh=mesh, encoder_only=True)
        return Embedder("t5", config, params, None, mesh)
    if model_type in ("bert", "albert", "electra"):
        from protlm_jax import hf_bert

        imported = hf_bert.load_pretrained(path)
        return Embedder(None, imported.config, imported.params, imported.vocabulary, mesh)
    raise ProtlmError(f"{path}/config.json: model_type {model_type!r} is not supported "
                      "(t5, bert, albert, electra)")


def load_model(path: str, step: Optional[int] = None, *, mesh=None) -> Embedder:
    """An :class:`Embedder` for a training ``MODEL_DIR`` or a Hugging Face dir.

    A ``MODEL_DIR`` gives its latest complete checkpoint (or ``step``); only
    what the encoder needs is read from it (an orbax partial restore: no
    optimizer state, no decoder or heads), straight into the shardings of
    ``mesh``. The model config (any family) comes from the checkpoint's
    metadata, and so does an imported checkpoint's own vocabulary. A
    directory with ``config.json`` is read as a Hugging Face checkpoint
    (``model_type`` t5, bert, albert or electra).

    Args:
      path: the directory.
      step: a checkpoint step (MODEL_DIR only); default the latest.
      mesh: as for :class:`Embedder`.

    Returns:
      The embedder.

    Raises:
      ProtlmError: no such directory, no complete checkpoint, unknown step.
    """
    from protlm_jax import checkpoints, partitioning
    from protlm_jax.models import family_of
    from protlm_jax.vocabularies import VocabTxtVocabulary

    if not os.path.isdir(path):
        raise ProtlmError(f"{path}: no such model directory")
    if os.path.isfile(os.path.join(path, "config.json")):
        if step is not None:
            raise ProtlmError(f"{path}: --step applies to training MODEL_DIRs, "
                              "not Hugging Face directories")
        return _load_hf(path, mesh)
    if not os.path.isdir(os.path.join(path, "checkpoints")):
        raise ProtlmError(f"{path}: neither a training MODEL_DIR (no checkpoints/) nor a "
                          "Hugging Face directory (no config.json)")
    mesh = mesh if mesh is not None else partitioning.create_mesh(1)
    # Only what an encoder pass needs: T5's token embedding and encoder; the
    # BERT family's embeddings, projection and encoder; ELECTRA's
    # discriminator (no heads, no decoder, no generator, no optimizer state).
    config, params, meta, step = checkpoints.read_params(
        path, step, encoder_only=True, mesh=mesh,
        keep=("token_embedder", "encoder", "embeddings", "embedding_projection",
              "discriminator"))
    vocab = VocabTxtVocabulary(meta["vocabulary"]) if meta.get("vocabulary") else None
    embedder = Embedder(family_of(config), config, params, vocab, mesh)
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
