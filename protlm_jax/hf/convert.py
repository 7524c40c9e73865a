"""``protlm export-hf`` / ``import-hf`` and Hugging Face loading, for every family.

The family comes from the registry (:mod:`protlm_jax.models`): a MODEL_DIR's
metadata names it, a Hugging Face directory's ``config.json`` ``model_type``
finds it; its adapter (``Family.hf()``: ``hf/t5.py``, ``hf/bert.py``) does the
family's part, the engine the rest.

* :func:`export_hf`: MODEL_DIR checkpoint -> HF directory (weights one tensor at
  a time into ``model.safetensors`` or shards + index, ``config.json``, the
  tokenizer, a model card with the ProtTrans snippet). ``encoder_only`` writes
  the encoder without heads (``T5EncoderModel``, ``BertModel``, …).
* :func:`import_hf`: HF directory -> a *params-only* orbax checkpoint::

    MODEL_DIR/checkpoints/<step>/state     {"step", "params"} (no optimizer state)
    MODEL_DIR/checkpoints/<step>/metadata  {"params_only": true, "encoder_only",
                                            "model_family", "model_config", "step",
                                            "source", "hf_config", …}

  BERT-family metadata also holds ``vocabulary`` (the checkpoint's own tokens,
  which embedding tokenizes with), ``architecture`` and ``param_collections``
  (a ``BertModel`` has no ``mlm_head``, a lone ELECTRA discriminator no
  generator). Weights go tensor by tensor straight into their shardings on a
  one-row mesh (no whole-model copy on one device or twice in host memory).
* :func:`load`: an HF directory as an :class:`~protlm_jax.hf.engine.Imported`
  (``protlm embed --model HF_DIR``).
* :func:`prottrans_embeddings`: the published snippets run with torch, the
  reference ``protlm embed`` is compared against.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from protlm_jax import checkpoints, models, partitioning
from protlm_jax.data.residues import RARE_RESIDUES_PATTERN
from protlm_jax.errors import ProtlmError
from protlm_jax.hf import engine, files


def _family_of_dir(hf_dir: str, hf_config: Optional[Dict[str, Any]] = None):
    hf_config = hf_config if hf_config is not None else files.read_config(hf_dir)
    return models.family_for_hf(str(hf_config.get("model_type", "t5")),
                                os.path.join(hf_dir, "config.json"))


def load(hf_dir: str, *, mesh: Optional[jax.sharding.Mesh] = None,
         rules: Optional[Sequence] = None, encoder_only: Optional[bool] = True,
         **options: Any) -> engine.Imported:
    """A Hugging Face directory of any registered family as our config and params.

    Args:
      hf_dir: the directory (``config.json`` + safetensors or ``.bin``).
      mesh, rules: where the params go (numpy leaves without a mesh).
      encoder_only: T5: the encoder half (True), the whole model (False) or
        what the checkpoint holds (None); other families load whole.
      **options: the family's import options (``generator``,
        ``vocab_pad_to_multiple``, config overrides such as ``scan_layers``).
    """
    return _family_of_dir(hf_dir).hf().load(hf_dir, mesh=mesh, rules=rules,
                                            encoder_only=encoder_only, **options)


# ----------------------------------------------------------------- import ---

def _mesh(model_parallel_size: int) -> jax.sharding.Mesh:
    """A one-row ``(data=1, model=N)`` mesh on the first N devices."""
    devices = jax.devices()
    if model_parallel_size < 1 or model_parallel_size > len(devices):
        raise ProtlmError(f"--model_parallel_size {model_parallel_size}: between 1 and the "
                          f"{len(devices)} devices")
    return partitioning.create_mesh(model_parallel_size, devices[:model_parallel_size])


def import_hf(hf_dir: str, output: str, *, step: int = 0, model_parallel_size: int = 1,
              scan_layers: bool = False, generator: Optional[str] = None,
              vocab_pad_to_multiple: Optional[int] = None) -> Dict[str, Any]:
    """Imports a Hugging Face checkpoint (any registered family) into a MODEL_DIR.

    Args:
      hf_dir: the Hugging Face directory (config.json + safetensors or .bin).
      output: the MODEL_DIR to write (must not hold a checkpoint of ``step``).
      step: the step number of the written checkpoint.
      model_parallel_size: devices of the ``model`` mesh axis the weights are
        sharded over while loading and saving (a one-row mesh: no copies).
      scan_layers: store the layers stacked (``scan_layers`` of the config).
      generator: ELECTRA: the generator (``ElectraForMaskedLM``) directory to
        store with the discriminator ``hf_dir``.
      vocab_pad_to_multiple: BERT family: pad the vocabulary rows to a
        multiple of this (a model axis that does not divide the vocabulary).

    Returns:
      A summary (config, architecture, skipped tensors, parameter count).
    """
    hf_config = files.read_config(hf_dir)
    fam = _family_of_dir(hf_dir, hf_config)
    mesh = _mesh(model_parallel_size)
    options = {k: v for k, v in (("generator", generator),
                                 ("vocab_pad_to_multiple", vocab_pad_to_multiple))
               if v is not None}
    imported = fam.hf().load(hf_dir, mesh=mesh, encoder_only=None, scan_layers=scan_layers,
                             **options)
    config = dataclasses.asdict(imported.config)
    meta = {
        "step": step, "params_only": True, "encoder_only": imported.encoder_only,
        "model_family": fam.name, "model_config": config, **imported.metadata,
        "source": {"huggingface": os.path.abspath(hf_dir), "weights": imported.weights,
                   "skipped_tensors": imported.skipped, **imported.source},
        "hf_config": hf_config,
    }
    num_params = _save(output, step, imported.params, mesh, meta)
    return {"output": output, "step": step, "encoder_only": imported.encoder_only,
            "architecture": imported.described or imported.architecture,
            "parameters": num_params, "skipped_tensors": imported.skipped,
            "model_config": config}


def _save(output: str, step: int, params: Any, mesh: jax.sharding.Mesh,
          meta: Dict[str, Any]) -> int:
    """Writes the params-only checkpoint; returns the parameter count."""
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"step": jax.device_put(jnp.asarray(step, jnp.int32), replicated),
             "params": params}
    checkpointer = checkpoints.Checkpointer(output, keep=1_000_000, async_save=False)
    if step in checkpointer.all_steps():
        checkpointer.close()
        raise ProtlmError(f"{checkpointer.directory}: already has a checkpoint of step "
                          f"{step}; choose another --output or --step")
    checkpointer.save(step, state, meta)
    checkpointer.close()
    return sum(int(x.size) for x in jax.tree.leaves(params))


# ----------------------------------------------------------------- export ---

def export_hf(model_dir: str, output: str, *, encoder_only: bool = False,
              dtype: str = "float32", step: Optional[int] = None,
              max_shard_size: int = files.DEFAULT_MAX_SHARD_SIZE) -> Dict[str, Any]:
    """Exports a MODEL_DIR checkpoint (trained or imported) as a Hugging Face directory.

    Args:
      model_dir: a protlm MODEL_DIR.
      output: the Hugging Face directory to write (created; our files in it
        are replaced).
      encoder_only: write the encoder without heads.
      dtype: weight dtype in the files ("float32", "float16", "bfloat16").
      step: checkpoint step (default: the latest).
      max_shard_size: bytes per safetensors shard before splitting.

    Returns:
      A summary: files, step, parameter count.
    """
    if dtype not in files.DTYPES:
        raise ProtlmError(f"--dtype: expected one of {', '.join(files.DTYPES)}, got {dtype!r}")
    config, params, meta, read_step = checkpoints.read_params(model_dir, step,
                                                              encoder_only=encoder_only)
    step = int(meta.get("step", read_step))
    if jax.process_index() != 0:
        return {"step": step}  # only process 0 writes
    summary = models.family_for(config).hf().export(
        params, config, output, encoder_only=encoder_only, dtype=dtype,
        max_shard_size=max_shard_size, step=step, source=os.path.abspath(model_dir), meta=meta)
    return {"output": output, "step": step, "encoder_only": encoder_only, "dtype": dtype,
            **summary}


# -------------------------------------------------------------- reference ---

def prottrans_embeddings(hf_dir: str, sequences: Sequence[str]) -> List[np.ndarray]:
    """Per-residue embeddings the way the published snippets compute them (torch CPU).

    The checkpoint's tokenizer (without lower-casing) and base model through
    the family's ``REFERENCE_CLASSES``; spaces between residues, rare residues
    -> X (the family's ``RARE_RESIDUES`` rule where it has one: XLNet's
    ``[UZOBX]`` -> ``<unk>``), padding to the longest; residues sliced out
    around the family's special tokens and padding side (its token layout).
    A family whose HF module defines ``reference_embeddings(hf_dir, sequences)``
    runs that instead. Used by the demo to compare against ``protlm embed``.

    Returns:
      One float32 [L, D] array per sequence.
    """
    fam = _family_of_dir(hf_dir)
    own = getattr(fam.hf(), "reference_embeddings", None)
    if own is not None:  # a family transformers cannot run (ProtTXL: torch reference)
        return own(hf_dir, sequences)
    import torch  # heavy and optional: only the reference comparison needs them
    import transformers

    tokenizer_class, model_class, _ = fam.hf().REFERENCE_CLASSES
    tokenizer = getattr(transformers, tokenizer_class).from_pretrained(hf_dir,
                                                                        do_lower_case=False)
    model = getattr(transformers, model_class).from_pretrained(hf_dir).float().eval()
    layout = fam.layout
    pattern, replacement = getattr(fam.hf(), "RARE_RESIDUES", (RARE_RESIDUES_PATTERN, "X"))
    prepared = [re.sub(pattern, replacement, " ".join(s)) for s in sequences]
    ids = tokenizer(prepared, add_special_tokens=True, padding="longest")
    input_ids = torch.tensor(ids["input_ids"])
    attention_mask = torch.tensor(ids["attention_mask"])
    with torch.no_grad():
        out = model(input_ids=input_ids, attention_mask=attention_mask)
    first, specials = len(layout.prefix), len(layout.prefix) + len(layout.suffix)
    width = input_ids.shape[1]

    def start(n):  # the first residue: after the prefix, and after padding on the left
        return (width - n - specials if layout.padding == "left" else 0) + first

    return [out.last_hidden_state[i, start(len(s)):start(len(s)) + len(s)].numpy()
            for i, s in enumerate(sequences)]
