"""``protlm import-hf``: a Hugging Face T5 directory → a protlm MODEL_DIR.

Reads ``T5ForConditionalGeneration`` or ``T5EncoderModel`` directories
(``hf_t5.inspect_pretrained`` checks everything first and fails with one line;
tensors of heads we do not model are listed in a warning and skipped), loads
the weights tensor by tensor into their shardings on a mesh
(``hf_t5.params_from_reader``) and writes a *params-only* orbax checkpoint:

  MODEL_DIR/checkpoints/<step>/state     {"step", "params"} (no optimizer state)
  MODEL_DIR/checkpoints/<step>/metadata  {"params_only": true, "encoder_only",
                                          "model_config", "step", "source", …}

Loaders read ``params`` alone (orbax partial restore: ``protlm embed``,
``protlm export-hf``); ``Checkpointer.restore`` gives a train state with
those params and a fresh optimizer state (``protlm eval``, fine-tuning).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict

import jax
import jax.numpy as jnp

from protlm_jax import hf_t5, partitioning
from protlm_jax.errors import ProtlmError


def import_hf(hf_dir: str, output: str, *, step: int = 0,
              model_parallel_size: int = 1, scan_layers: bool = False) -> Dict[str, Any]:
    """Imports a Hugging Face T5 checkpoint into a protlm MODEL_DIR.

    Args:
      hf_dir: the Hugging Face directory (config.json + safetensors or .bin).
      output: the MODEL_DIR to write (must not hold a checkpoint of ``step``).
      step: the step number of the written checkpoint.
      model_parallel_size: devices of the ``model`` mesh axis the weights are
        sharded over while loading and saving (a one-row mesh: no copies).
      scan_layers: store the layers stacked (``T5Config.scan_layers``).

    Returns:
      A summary (config, encoder_only, skipped tensors, parameter count).
    """
    from protlm_jax.checkpoints import Checkpointer

    config, encoder_only, reader, skipped = hf_t5.inspect_pretrained(hf_dir, None)
    config = config.replace(scan_layers=scan_layers)
    devices = jax.devices()
    if model_parallel_size < 1 or model_parallel_size > len(devices):
        raise ProtlmError(f"--model_parallel_size {model_parallel_size}: between 1 and the "
                          f"{len(devices)} devices")
    mesh = partitioning.create_mesh(model_parallel_size, devices[:model_parallel_size])
    params = hf_t5.params_from_reader(reader, config, encoder_only, mesh=mesh)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    state = {"step": jax.device_put(jnp.asarray(step, jnp.int32), replicated),
             "params": params}
    checkpointer = Checkpointer(output, keep=1_000_000, async_save=False)
    if step in checkpointer.all_steps():
        checkpointer.close()
        raise ProtlmError(f"{checkpointer.directory}: already has a checkpoint of step "
                          f"{step}; choose another --output or --step")
    num_params = sum(int(x.size) for x in jax.tree.leaves(params))
    meta = {
        "step": step, "params_only": True, "encoder_only": encoder_only,
        "model_config": dataclasses.asdict(config),
        "source": {"huggingface": os.path.abspath(hf_dir), "weights": reader.kind,
                   "skipped_tensors": skipped},
        "hf_config": hf_t5.read_hf_config(hf_dir),
    }
    checkpointer.save(step, state, meta)
    checkpointer.close()
    return {"output": output, "step": step, "encoder_only": encoder_only,
            "parameters": num_params, "skipped_tensors": skipped,
            "model_config": dataclasses.asdict(config)}

