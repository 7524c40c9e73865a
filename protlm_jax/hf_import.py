"""``protlm import-hf``: a Hugging Face directory → a protlm MODEL_DIR.

The family follows ``config.json``'s ``model_type``:

* ``t5``: ``T5ForConditionalGeneration`` or ``T5EncoderModel``
  (``hf_t5.inspect_pretrained`` checks everything first and fails with one
  line), loaded by ``hf_t5.params_from_reader``;
* ``bert``, ``albert``, ``electra``: ``*ForMaskedLM``, ``*Model``,
  ``ElectraForPreTraining`` (a discriminator; ``generator`` adds its
  ``ElectraForMaskedLM``), checked and loaded by ``hf_bert.load_pretrained``.

Either way tensors of heads we do not model are listed in a warning and
skipped, and the weights go tensor by tensor straight into their shardings on
a mesh (no whole-model copy on one device or twice in host memory). The
result is a *params-only* orbax checkpoint:

  MODEL_DIR/checkpoints/<step>/state     {"step", "params"} (no optimizer state)
  MODEL_DIR/checkpoints/<step>/metadata  {"params_only": true, "encoder_only",
                                          "model_config", "step", "source", …}

BERT-family metadata also holds ``vocabulary`` (the checkpoint's own tokens in
id order, from its ``vocab.txt`` / ``spiece.model``: embedding tokenizes with
them), ``architecture`` and ``param_collections`` (the top-level params
stored: a ``BertModel`` has no ``mlm_head``, a lone ELECTRA discriminator no
generator).

Loaders read ``params`` alone (orbax partial restore: ``protlm embed``,
``protlm export-hf``); ``Checkpointer.restore`` gives a train state with
those params and a fresh optimizer state (``protlm eval``, fine-tuning).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp

from protlm_jax import hf_t5, partitioning
from protlm_jax.errors import ProtlmError

BERT_FAMILY = ("bert", "albert", "electra")


def import_hf(hf_dir: str, output: str, *, step: int = 0,
              model_parallel_size: int = 1, scan_layers: bool = False,
              generator: Optional[str] = None,
              vocab_pad_to_multiple: Optional[int] = None) -> Dict[str, Any]:
    """Imports a Hugging Face T5 / BERT / ALBERT / ELECTRA checkpoint into a MODEL_DIR.

    Args:
      hf_dir: the Hugging Face directory (config.json + safetensors or .bin).
      output: the MODEL_DIR to write (must not hold a checkpoint of ``step``).
      step: the step number of the written checkpoint.
      model_parallel_size: devices of the ``model`` mesh axis the weights are
        sharded over while loading and saving (a one-row mesh: no copies).
      scan_layers: store the layers stacked (``scan_layers`` of the config).
      generator: ELECTRA: the generator (``ElectraForMaskedLM``) directory to
        store with the discriminator ``hf_dir``; without it only the
        discriminator is stored (enough to embed).
      vocab_pad_to_multiple: BERT family: pad the vocabulary rows to a
        multiple of this (``BertConfig.vocab_pad_to_multiple``; needed when
        the model axis does not divide the vocabulary, and to match a gin
        config that pads); default 1.

    Returns:
      A summary (config, architecture or encoder_only, skipped tensors,
      parameter count).
    """
    hf_config = hf_t5.read_hf_config(hf_dir)
    mesh = _mesh(model_parallel_size)
    if hf_config.get("model_type") in BERT_FAMILY:
        return _import_bert_family(hf_dir, output, hf_config, mesh, step=step,
                                   scan_layers=scan_layers, generator=generator,
                                   vocab_pad_to_multiple=vocab_pad_to_multiple or 1)
    if generator is not None:
        raise ProtlmError(f"--generator: only for ELECTRA; {hf_dir} is model_type "
                          f"{hf_config.get('model_type', 't5')!r}")
    if vocab_pad_to_multiple not in (None, 1):
        raise ProtlmError("--vocab_pad_to_multiple: only for the BERT family (T5 "
                          "vocabularies are stored as they are)")
    config, encoder_only, reader, skipped = hf_t5.inspect_pretrained(hf_dir, None)
    config = config.replace(scan_layers=scan_layers)
    params = hf_t5.params_from_reader(reader, config, encoder_only, mesh=mesh)
    meta = {
        "step": step, "params_only": True, "encoder_only": encoder_only,
        "model_config": dataclasses.asdict(config),
        "source": {"huggingface": os.path.abspath(hf_dir), "weights": reader.kind,
                   "skipped_tensors": skipped},
        "hf_config": hf_t5.read_hf_config(hf_dir),
    }
    num_params = _save(output, step, params, mesh, meta)
    return {"output": output, "step": step, "encoder_only": encoder_only,
            "parameters": num_params, "skipped_tensors": skipped,
            "model_config": dataclasses.asdict(config)}


def _mesh(model_parallel_size: int) -> jax.sharding.Mesh:
    """A one-row ``(data=1, model=N)`` mesh on the first N devices."""
    devices = jax.devices()
    if model_parallel_size < 1 or model_parallel_size > len(devices):
        raise ProtlmError(f"--model_parallel_size {model_parallel_size}: between 1 and the "
                          f"{len(devices)} devices")
    return partitioning.create_mesh(model_parallel_size, devices[:model_parallel_size])


def _save(output: str, step: int, params: Any, mesh: jax.sharding.Mesh,
          meta: Dict[str, Any]) -> int:
    """Writes the params-only checkpoint; returns the parameter count."""
    from protlm_jax.checkpoints import Checkpointer

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"step": jax.device_put(jnp.asarray(step, jnp.int32), replicated),
             "params": params}
    checkpointer = Checkpointer(output, keep=1_000_000, async_save=False)
    if step in checkpointer.all_steps():
        checkpointer.close()
        raise ProtlmError(f"{checkpointer.directory}: already has a checkpoint of step "
                          f"{step}; choose another --output or --step")
    checkpointer.save(step, state, meta)
    checkpointer.close()
    return sum(int(x.size) for x in jax.tree.leaves(params))


def _import_bert_family(hf_dir: str, output: str, hf_config: Dict[str, Any],
                        mesh: jax.sharding.Mesh, *, step: int, scan_layers: bool,
                        generator: Optional[str], vocab_pad_to_multiple: int) -> Dict[str, Any]:
    """BERT / ALBERT / ELECTRA directories (see the module docstring)."""
    from protlm_jax import hf_bert

    if vocab_pad_to_multiple < 1:
        raise ProtlmError(f"--vocab_pad_to_multiple must be positive, got "
                          f"{vocab_pad_to_multiple}")
    model = mesh.shape["model"]
    vocab_size = hf_config.get("vocab_size")
    if isinstance(vocab_size, int) and -(-vocab_size // vocab_pad_to_multiple) \
            * vocab_pad_to_multiple % model:
        raise ProtlmError(f"{hf_dir}: the vocabulary ({vocab_size} rows) does not split over "
                          f"--model_parallel_size {model}; add --vocab_pad_to_multiple "
                          f"{model} (padding rows are never used, nor exported)")
    imported = hf_bert.load_pretrained(hf_dir, generator_directory=generator, mesh=mesh,
                                       scan_layers=scan_layers,
                                       vocab_pad_to_multiple=vocab_pad_to_multiple)
    config = dataclasses.asdict(imported.config)
    meta = {
        "step": step, "params_only": True, "encoder_only": False,
        "model_config": config,
        "architecture": imported.architecture, "has_head": imported.has_head,
        "param_collections": sorted(imported.params),
        "vocabulary": list(imported.vocabulary.tokens),
        "source": {"huggingface": os.path.abspath(hf_dir), "weights": imported.weights,
                   "generator": os.path.abspath(generator) if generator else None,
                   "skipped_tensors": imported.skipped},
        "hf_config": hf_config,
    }
    num_params = _save(output, step, imported.params, mesh, meta)
    return {"output": output, "step": step, "encoder_only": False,
            "architecture": imported.architecture + (" + ElectraForMaskedLM" if generator
                                                     else ""),
            "parameters": num_params, "skipped_tensors": imported.skipped,
            "model_config": config}
