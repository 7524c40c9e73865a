"""The embedding engine: sequences -> per-residue / per-protein arrays.

What ProtTrans users do most, done fast and exactly, for any registered
family; the engine knows no model's insides (the family's ``EncoderView`` and
``TokenLayout`` say what it needs):

* Sequences are cleaned as every ProtTrans model expects (REFERENCE §2):
  upper case, no gaps or white space, rare residues -> X
  (:mod:`protlm_jax.data.residues`).
* Batches are built by a token budget over length-sorted sequences padded to a
  small, fixed set of bucket lengths (1.25x steps from 16), so XLA compiles a
  bounded number of programs; a batch is split over the mesh's ``data`` axis.
* Long proteins run the encoder with exact chunked attention (and
  feed-forward, where the family chunks it): memory grows linearly with the
  length, so a 35,000-residue protein embeds whole.
* The family's token layout puts its special tokens around the residues
  (e.g. ``seq </s>`` for ProtT5, ``[CLS] seq [SEP]`` for ProtBert) and pads on
  its side; per residue keeps the L residue positions, per protein is their
  mean: special tokens and padding never enter.

Layers are numbered like Hugging Face's ``hidden_states``: 0 the embedding
output, i (1..N-1) the output of encoder block i, N (or -1) the final output
(``last_hidden_state``); negative indices count from N. HDF5 I/O is
:mod:`protlm_jax.embed.io`.

Shape legend: B batch rows, L residues, T tokens (bucket length), D d_model,
N encoder layers, Y requested layers.
"""

from __future__ import annotations

import collections
import functools
import math
import sys
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax.core import meta as nn_meta

from protlm_jax import host_memory, models, partitioning
from protlm_jax.data.residues import RARE_TO_X
from protlm_jax.errors import ProtlmError

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
    return seq.translate(_GAPS_AND_SPACE).upper().translate(RARE_TO_X)


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


@functools.lru_cache(maxsize=32)
def _encoding_abstract(make_module, config):
    """Boxed abstract params of an encoding module (traced once per config)."""
    module = make_module(config.replace(dtype="float32"))
    tokens = jnp.ones((1, 8), jnp.int32)
    return jax.eval_shape(lambda rng: module.init(rng, tokens, method="encode"),
                          jax.random.PRNGKey(0))["params"]


class Embedder:
    """Batched, sharded, length-bucketed encoder forward passes.

    The engine knows nothing of any model's insides: the model's family
    (``models.family_for(config)``) gives its :class:`~protlm_jax.models.EncoderView`
    (which params, which module, how many layers, the longest input) and its
    token layout (special tokens around the residues, padding side).

    Args:
      config: the model's config (any registered family).
      params: the model's params: a full tree (``{"params": ...}`` wrapped or
        not) or just the part its encoder view reads; heads, the T5 decoder and
        the ELECTRA generator are not used; scanned layers are unstacked.
      vocab: a seqio vocabulary with ``encode`` and the special ids the
        family's layout names; default the family's own; an imported
        checkpoint's own vocabulary otherwise.
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

    def __init__(self, config, params, vocab=None, mesh=None, *,
                 long_length: int = LONG_LENGTH,
                 attention_chunk_size: int = ATTENTION_CHUNK,
                 mlp_chunk_size: int = MLP_CHUNK, group_tokens: int = GROUP_TOKENS):
        if config is None or params is None:
            raise ValueError("Embedder needs a config and params")
        # Attention blocks of tens of MB: reuse heap memory instead of
        # page-faulting fresh mmaps on every call (see host_memory).
        host_memory.retain_freed_memory()
        self.family = models.family_for(config)
        self.model_config = config
        self.vocab = vocab if vocab is not None else self.family.vocabulary()
        self.long_length = long_length
        self.chunk_sizes = (attention_chunk_size, mlp_chunk_size)
        self.group_tokens = group_tokens if group_tokens > 0 else 1 << 62
        self.step: Optional[int] = None  # the checkpoint step, when loaded from one
        try:
            self.prefix, self.suffix = self.family.layout.special_ids(self.vocab)
        except ValueError as e:
            raise ProtlmError(f"{self.family.name} embedding: {e}") from None
        self.left_padded = self.family.layout.padding == "left"
        view = self._view(params)
        self.config = view.config
        self.num_layers = view.num_layers
        self.max_tokens = view.max_positions
        self.pad_id = view.pad_id
        self._view_template = view
        self.mesh = mesh if mesh is not None else partitioning.create_mesh(1)
        self.rules = partitioning.standard_logical_axis_rules("1d")
        self.data_size = int(self.mesh.shape["data"])
        abstract = self._abstract(view)
        with partitioning.axis_rules(self.mesh, self.rules):
            self._param_shardings, _ = partitioning.param_shardings(
                abstract, self.mesh, self.rules)
        self.params = self._place(view)
        self._batch_sharding = partitioning.batch_sharding(self.mesh)
        self._fns: Dict[tuple, Any] = {}

    def _view(self, params):
        try:
            return self.family.encoder_view(self.model_config, params)
        except (KeyError, ValueError) as e:
            raise ProtlmError(f"params lack what the {self.family.name} encoder needs "
                              f"({e})") from None

    @staticmethod
    def _abstract(view):
        """Boxed abstract params of the view's module (its logical axes)."""
        return _encoding_abstract(view.make_module, view.config)

    def _place(self, view) -> Dict[str, Any]:
        """The view's params on the mesh."""
        return jax.device_put(jax.tree.map(jnp.asarray, dict(view.params)),
                              self._param_shardings)

    def with_params(self, params) -> "Embedder":
        """This embedder (config, mesh, compiled programs) on other weights of
        the same shapes: a training hook embeds with the live parameters at
        every probe step without compiling again."""
        import copy

        other = copy.copy(self)  # shares the dict of compiled programs
        other.params = self._place(self._view(params))
        other.step = None
        return other

    def with_random_params(self, seed: int = 0) -> "Embedder":
        """This embedder on a random initialisation of the same config (the
        family's own initialisers, seeded): the baseline an analysis compares
        trained weights against."""
        import copy

        module = self._view_template.make_module(self.config)
        boxed = module.init(jax.random.PRNGKey(seed), jnp.ones((1, 8), jnp.int32),
                            method="encode")["params"]
        other = copy.copy(self)
        other.params = jax.device_put(nn_meta.unbox(boxed), self._param_shardings)
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
        model = self._view_template.module(dtype, self.chunk_sizes if chunked else None)
        pad_id = self.pad_id
        specials = len(self.prefix) + len(self.suffix)

        def residues_mask(tokens_BT):
            """[B, T] True on the residues: the real tokens after the prefix and
            before the suffix (padding right or left)."""
            real_BT = tokens_BT != pad_id
            n_B = jnp.sum(real_BT, axis=1)
            pad_B = tokens_BT.shape[1] - n_B if self.left_padded else jnp.zeros_like(n_B)
            pos_BT = jnp.arange(tokens_BT.shape[1])[None, :] - (pad_B + len(self.prefix))[:, None]
            return (pos_BT >= 0) & (pos_BT < (n_B - specials)[:, None]), n_B - specials

        def encode(params, tokens_BT):
            out = model.apply({"params": params}, tokens_BT, tokens_BT != pad_id, layers,
                              method="encode")["representations"]
            x_BYTD = jnp.stack([out[i].astype(jnp.float32) for i in layers], axis=1)
            if not per_protein:
                return x_BYTD
            valid_BT, lengths_B = residues_mask(tokens_BT)
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
                    f"special tokens exceed the model's {self.max_tokens:,} positions "
                    "(embed --max_length, probe --max_test_length leave such proteins out)")
            items.append((ident, ids))
        specials = len(self.prefix) + len(self.suffix)
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(total=sum(len(t) - specials for _, t in items), unit="res", unit_scale=True,
                       desc="embed", file=sys.stderr, mininterval=1.0, smoothing=0.1)
        try:
            for bucket, rows, members in self._plan(items, token_budget):
                tokens = np.full((rows, bucket), self.pad_id, np.int32)
                starts = []
                for r, i in enumerate(members):
                    ids = items[i][1]
                    start = bucket - len(ids) if self.left_padded else 0
                    tokens[r, start:start + len(ids)] = ids
                    starts.append(start + len(self.prefix))
                fn = self._fn(bucket > self.long_length, layer_idx, per_protein, dtype)
                out = np.asarray(jax.device_get(fn(self.params, jax.device_put(
                    tokens, self._batch_sharding))))
                for r, i in enumerate(members):
                    ident, ids = items[i]
                    length = len(ids) - specials
                    arr = out[r] if per_protein else out[r, :, starts[r]:starts[r] + length]
                    yield ident, (arr[0] if len(layer_idx) == 1 else arr)
                    if bar is not None:
                        bar.update(length)
        finally:
            if bar is not None:
                bar.close()


