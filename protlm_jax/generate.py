"""Sampling protein sequences from an auto-regressive family (``protlm generate``).

The family gives a :class:`~protlm_jax.models.family.DecoderView` (a
``start`` over the prompt and a ``step`` per new token, both jitted once);
this module samples: greedy, or temperature, top-k and nucleus (top-p)
filtering as Hugging Face's ``generate`` applies them (temperature, then
top-k, then top-p keeping the smallest set whose probability reaches p, at
least one token), drawing with a key folded from ``seed``, the batch and the
step. ``max_length`` counts the prompt, as in Hugging Face. A sequence ends at
the family's end id (ProtXLNet: ``<sep>``) or any other special token;
``<unk>`` becomes X.

Shapes: B rows, P prompt tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from protlm_jax import models
from protlm_jax.embed import io as embed_io
from protlm_jax.embed.engine import clean_sequence
from protlm_jax.errors import ProtlmError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How tokens are drawn (the ProtTrans Generate notebook: top_p 0.9, top_k 0).

    Attributes:
      max_length: tokens per sequence, prompt included.
      top_k: keep the k most likely tokens (0: off).
      top_p: keep the smallest set reaching probability p (1.0: off).
      temperature: divides the logits (1.0: off).
      greedy: always the most likely token (ignores the three above).
      seed: the sampling seed.
    """
    max_length: int = 100
    top_k: int = 0
    top_p: float = 0.9
    temperature: float = 1.0
    greedy: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.max_length < 1:
            raise ProtlmError(f"--max_length must be positive, got {self.max_length}")
        if self.top_k < 0:
            raise ProtlmError(f"--top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ProtlmError(f"--top_p must be in (0, 1], got {self.top_p}")
        if not self.temperature > 0.0:
            raise ProtlmError(f"--temperature must be positive, got {self.temperature}")


def filter_logits(logits_BV: jax.Array, cfg: SamplingConfig) -> jax.Array:
    """Logits after temperature, top-k and top-p (removed tokens at -inf)."""
    x = logits_BV.astype(jnp.float32) / cfg.temperature
    if cfg.top_k > 0:
        k = min(cfg.top_k, x.shape[-1])
        kth = jax.lax.top_k(x, k)[0][..., -1:]
        x = jnp.where(x < kth, -jnp.inf, x)
    if cfg.top_p < 1.0:
        order = jnp.argsort(x, axis=-1)  # ascending, as HF's TopPLogitsWarper
        sorted_x = jnp.take_along_axis(x, order, axis=-1)
        cum = jnp.cumsum(jax.nn.softmax(sorted_x, axis=-1), axis=-1)
        remove_sorted = cum <= 1.0 - cfg.top_p
        remove_sorted = remove_sorted.at[..., -1].set(False)  # keep at least one
        remove = jnp.zeros_like(remove_sorted).at[
            jnp.arange(x.shape[0])[:, None], order].set(remove_sorted)
        x = jnp.where(remove, -jnp.inf, x)
    return x


class Generator:
    """Samples sequences from one model (its family's decoder view)."""

    def __init__(self, config: Any, params: Any, vocab: Any = None):
        family = models.family_for(config)
        if family.decoder is None:
            generating = [f.name for f in models.FAMILIES.values() if f.decoder is not None]
            raise ProtlmError(f"the {family.name} family does not generate sequences "
                              f"(families that do: {', '.join(generating)})")
        try:
            self.view = family.decoder(config, params)
        except (KeyError, ValueError) as e:
            raise ProtlmError(f"{family.name} generation: {e}") from None
        self.vocab = vocab if vocab is not None else family.vocabulary()
        self.family = family
        self.end_ids = {int(getattr(self.vocab, name)) for name in self.view.end_ids}
        # A family whose proteins start after special tokens (ProtTXL: <eos>) reads
        # the prompt after them, as at embedding time.
        self.prefix_ids = family.layout.special_ids(self.vocab)[0]
        self.residues = {int(i): r for r, i in self.vocab.residue_ids().items()}
        self.unk_id = int(self.vocab.unk_id)
        self._start = jax.jit(self.view.start, static_argnums=(2,))
        self._step = jax.jit(self.view.step)

    def prompt_ids(self, prompt: str) -> List[int]:
        """The prompt's ids (cleaned as for embedding, after the layout's prefix)."""
        seq = clean_sequence(prompt)
        if not seq or not seq.isascii() or not seq.isalpha():
            raise ProtlmError(f"--prompt {prompt!r}: give residue letters (at least one)")
        return list(self.prefix_ids) + [int(i) for i in self.vocab.encode(seq)]

    def token_ids(self, prompt: Sequence[int], rows: int, cfg: SamplingConfig,
                  batch_index: int = 0) -> np.ndarray:
        """[rows, max_length] ids: the prompt, then what was drawn (every row runs
        to ``max_length``: the raw stream, end tokens included)."""
        n = len(prompt)
        if n >= cfg.max_length:
            raise ProtlmError(f"--max_length {cfg.max_length} leaves no room after the "
                              f"{n}-token prompt")
        prompt_BP = jnp.asarray(np.tile(np.asarray(prompt, np.int32), (rows, 1)))
        state, logits = self._start(self.view.params, prompt_BP, cfg.max_length)
        key = jax.random.fold_in(jax.random.key(cfg.seed), batch_index)
        out = [np.asarray(prompt_BP)]
        for t in range(n, cfg.max_length):
            if cfg.greedy:
                token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
            else:
                token = jax.random.categorical(jax.random.fold_in(key, t),
                                               filter_logits(logits, cfg)).astype(jnp.int32)
            out.append(np.asarray(token)[:, None])
            if t + 1 < cfg.max_length:
                state, logits = self._step(self.view.params, state, token)
        return np.concatenate(out, axis=1)

    def to_sequence(self, ids: Sequence[int]) -> str:
        """Residues up to the first end or other special token; ``<unk>`` -> X."""
        out = []
        for i in ids:
            i = int(i)
            if i in self.residues:
                out.append(self.residues[i])
            elif i == self.unk_id:
                out.append("X")
            else:
                break
        return "".join(out)

    def sample(self, num: int, prompt: str, cfg: SamplingConfig,
               batch_size: int = 64) -> Iterator[str]:
        """``num`` sequences (each starting with ``prompt``)."""
        if num < 1:
            raise ProtlmError(f"--num must be positive, got {num}")
        ids = self.prompt_ids(prompt)
        rows = min(batch_size, num)
        done, batch = 0, 0
        while done < num:
            tokens = self.token_ids(ids, rows, cfg, batch)
            for row in tokens[:num - done]:
                yield self.to_sequence(row[len(self.prefix_ids):])
            done += rows
            batch += 1


def load_generator(path: str, step: Optional[int] = None) -> Generator:
    """A :class:`Generator` for a training ``MODEL_DIR`` or a Hugging Face directory
    (the whole model: generation needs the head)."""
    config, params, vocab, _ = embed_io.read_model(path, step, encoder_only=False)
    return Generator(config, params, vocab)


def write_fasta(path: str, sequences: Sequence[Tuple[str, str]]) -> None:
    """Writes (header, sequence) records, 60 residues a line, atomically."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        for header, seq in sequences:
            f.write(f">{header}\n")
            for i in range(0, len(seq), 60):
                f.write(seq[i:i + 60] + "\n")
            if not seq:
                f.write("\n")
    os.replace(tmp, path)
