"""Human-readable views of seqio task examples (used by ``protlm examples``)."""

from __future__ import annotations

from typing import Mapping, Optional

import numpy as np
import seqio

from protlm_jax.data import pipeline
from protlm_jax.data import sources as data_sources
from protlm_jax.errors import ProtlmError


def _wrap(label: str, text: str, width: int = 100) -> str:
    lines = [text[i:i + width] for i in range(0, max(len(text), 1), width)]
    pad = " " * (len(label) + 2)
    return "\n".join((f"  {label}" if i == 0 else pad) + line
                     for i, line in enumerate(lines))


def _plm_lines(ex, vocab) -> list:
    """A permutation-LM example: residues, the targets marked, their order."""
    inputs, perm = ex["inputs"], ex["perm_index"]
    targets = ex["target_positions"] - 1
    n = len(inputs) - 2  # residues <sep> <cls>
    marks = np.full(n, " ")
    marks[targets[targets < n]] = "^"
    order = targets[np.argsort(perm[targets], kind="stable")]
    return [f"- {ex['id'].decode()}  inputs {len(inputs)} tokens (residues <sep> <cls>), "
            f"{len(targets)} targets",
            _wrap("inputs : ", vocab.decode(inputs.tolist())),
            _wrap("targets: ", "".join(marks)),
            f"  predicted {len(targets)} of {n} residues ({len(targets) / max(n, 1):.1%}); "
            f"factorisation order of the targets (positions): "
            f"{' '.join(map(str, order[:12].tolist()))}{' …' if len(order) > 12 else ''}"]


def format_examples(task_name: str, feature_lengths: Mapping[str, int], *,
                    split: str = "train", num: int = 2, seed: int = 0,
                    data_dir: Optional[str] = None) -> str:
    """Decodes ``num`` examples of a registered task into a printable block.

    Args:
      task_name: a seqio task (``protlm_tasks`` is imported first).
      feature_lengths: task feature lengths, e.g. ``{"inputs": 64, "targets": 64}``.
      split: which split to read.
      num: how many examples.
      seed: the seqio seed (the same seed shows the same examples).
      data_dir: overrides the data directory for this call.

    Returns:
      Text with, per example, its id, the decoded inputs and targets, and the
      share of corrupted (or, for MLM, scored) residues.
    """
    if data_dir:
        data_sources.set_data_dir(data_dir)
    try:
        task = seqio.get_mixture_or_task(task_name)
    except ValueError:
        raise ProtlmError(f"unknown task {task_name!r}") from None
    if "stream" in task.output_features:
        return _stream_lines(task_name, feature_lengths, split, num, seed)
    try:
        ds = task.get_dataset(dict(feature_lengths), split=split, shuffle=False,
                              seed=seed)
        examples = list(ds.take(num).as_numpy_iterator())
    except Exception as e:  # Missing shards surface as TF errors.
        raise ProtlmError(f"{task_name}: cannot read split {split!r} "
                          f"({' '.join(str(e).split())[:200]})") from None
    vocab = task.output_features["inputs"].vocabulary
    out = [f"== {task_name} ({split}, lengths {dict(feature_lengths)}) =="]
    for ex in examples:
        if "perm_index" in ex:
            out += _plm_lines(ex, vocab)
            continue
        inputs, targets = ex["inputs"], ex["targets"]
        out.append(f"- {ex['id'].decode()}  inputs {len(inputs)} tokens, "
                   f"targets {len(targets)} tokens")
        out.append(_wrap("inputs : ", vocab.decode(inputs.tolist())))
        out.append(_wrap("targets: ", vocab.decode(targets.tolist())))
        if "mlm_weights" in ex:
            w = ex["mlm_weights"]
            marks = "".join("^" if x else " " for x in w[1:-1])
            out.append(_wrap("scored : ", marks))
            changed = np.mean(inputs[w == 1] != targets[w == 1]) if w.any() else 0
            out.append(f"  scored {w.sum()} of {len(w) - 2} residues "
                       f"({w.sum() / max(len(w) - 2, 1):.1%}); {changed:.0%} of them changed")
        else:
            sentinels = int(np.sum(inputs >= vocab.vocab_size - vocab.extra_ids))
            out.append(f"  {sentinels} sentinels in inputs")
    return "\n".join(out)


def _stream_lines(task_name: str, feature_lengths: Mapping[str, int], split: str, num: int,
                  seed: int) -> str:
    """A causal-LM stream task: ``num`` consecutive segments of the first of two
    columns (``|`` marks the ``<eos>`` that ends each protein)."""
    vocab = seqio.get_mixture_or_task(task_name).output_features["stream"].vocabulary
    names = {i: r for r, i in vocab.residue_ids().items()}
    config = pipeline.DataConfig(task_name, dict(feature_lengths), split=split, pack=False,
                                 shuffle=False)
    try:
        batches = pipeline.batches(config, 2, seed=seed, num_epochs=1)
        segments = [next(batches) for _ in range(num)]
    except StopIteration:
        raise ProtlmError(f"{task_name}: split {split!r} has fewer than {num} segments") from None
    except Exception as e:
        raise ProtlmError(f"{task_name}: cannot read split {split!r} "
                          f"({' '.join(str(e).split())[:200]})") from None
    out = [f"== {task_name} ({split}, lengths {dict(feature_lengths)}): each batch row is "
           f"one column of the token stream; segment t + 1 continues segment t =="]
    for t, b in enumerate(segments):
        text = "".join(names.get(int(i), "|" if int(i) == vocab.eos_id else "?")
                       for i in b["inputs"][0][b["weights"][0] > 0])
        out.append(f"- column 0, segment {t}: {int(b['weights'][0].sum())} tokens")
        out.append(_wrap("inputs : ", text))
    return "\n".join(out)
