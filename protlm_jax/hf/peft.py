"""A ``protlm finetune`` LoRA output as a Hugging Face PEFT adapter.

Writes ``adapter_config.json`` + ``adapter_model.safetensors`` that
``peft.PeftModel.from_pretrained`` loads on top of the base's encoder-only
Hugging Face export (``protlm export-hf --encoder_only``: ``T5EncoderModel``,
``BertModel``, ``AlbertModel``). Module names come from the family's key table
(``encoder_tensors`` of its HF module), so nothing here knows a family:

* each adapted kernel ``W`` (our layout) is an HF ``Linear`` whose weight is
  ``T(W)`` (a reshape and a transpose, see :mod:`protlm_jax.hf.engine`); with
  ``A [in, r]``, ``B [r, out]`` flattened, ``T(A B) = B^T A^T``: so
  ``lora_A.weight = A^T [r, in]`` and ``lora_B.weight = B^T [out, r]``, checked
  against ``T(A B)`` for every kernel before writing;
* PEFT's scale is ``lora_alpha / r``, ours ``alpha / rank``: the same;
* ``target_modules`` is a regular expression of exactly the adapted modules;
  trained layer norms go in ``modules_to_save`` (their full weights).

The task head is not part of the adapter (PEFT adapts the encoder); it stays in
``finetuned.safetensors``.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict

import numpy as np
from safetensors.numpy import save_file

from protlm_jax.errors import ProtlmError
from protlm_jax.finetune import lora as lora_lib
from protlm_jax.finetune import run as run_lib
from protlm_jax.hf import engine

PREFIX = "base_model.model."


def export(base_path: str, adapter_dir: str, output: str) -> Dict[str, Any]:
    """Writes the PEFT adapter of ``adapter_dir`` (fitted on ``base_path``)."""
    ad = run_lib.load_adapter(base_path, adapter_dir)
    if ad.manifest.get("method") != "lora":
        raise ProtlmError(f"{adapter_dir}: a {ad.manifest.get('method')} fine-tuning output; "
                          "a PEFT adapter needs --method lora")
    base, family = ad.base, ad.base["family"]
    hf = family.hf()
    tensors = getattr(hf, "encoder_tensors", lambda _: None)(base["config"])
    if tensors is None:
        raise ProtlmError(f"{family.name}: no PEFT export (its Hugging Face attention "
                          "projections are not the Linear modules PEFT adapts)")
    by_path = {t.path: t for t in tensors.values()}
    sites, spec, tree = ad.sites, ad.spec, ad.tree
    out: Dict[str, np.ndarray] = {}
    modules = []
    for key, site in sorted(sites.items()):
        tensor = by_path.get(site.path)
        if tensor is None or site.spec.select is not None:
            raise ProtlmError(f"{site.path}: no Hugging Face Linear module to adapt")
        a = np.asarray(tree["lora"][key]["a"], np.float32)
        b = np.asarray(tree["lora"][key]["b"], np.float32)
        a_flat = a.reshape(-1, spec.rank)
        b_flat = b.reshape(spec.rank, -1)
        lora_a, lora_b = a_flat.T, b_flat.T
        full = np.asarray(lora_lib.delta(site, a, b, 1.0))
        want = np.asarray(engine.to_hf(tensor.transform, full, tensor.hf_shape))
        if want.shape != (lora_b.shape[0], lora_a.shape[1]) or not np.allclose(
                want, lora_b @ lora_a, rtol=1e-5, atol=1e-6):
            raise ProtlmError(f"{site.path}: its Hugging Face layout ({tensor.transform}) is "
                              "not a flattened Linear weight; cannot export as PEFT LoRA")
        module = tensor.local.rsplit(".", 1)[0]
        modules.append(module)
        out[f"{PREFIX}{module}.lora_A.weight"] = np.ascontiguousarray(lora_a)
        out[f"{PREFIX}{module}.lora_B.weight"] = np.ascontiguousarray(lora_b)
    saved = []
    for k, v in tree.get("norms", {}).items():
        tensor = by_path.get(k.replace(".", "/"))
        if tensor is None:
            raise ProtlmError(f"{k}: no Hugging Face tensor for this trained norm")
        module, leaf = tensor.local.rsplit(".", 1)
        out[f"{PREFIX}{tensor.local}"] = np.ascontiguousarray(
            np.asarray(engine.to_hf(tensor.transform, np.asarray(v, np.float32),
                                    tensor.hf_shape)))
        saved.append(module)
    names = sorted({m.rsplit(".", 1)[-1] for m in saved})
    config = {
        "peft_type": "LORA", "task_type": None, "r": spec.rank, "lora_alpha": spec.alpha,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True,
        "target_modules": "(" + "|".join(re.escape(m) for m in modules) + ")",
        "modules_to_save": names or None,
        "base_model_name_or_path": os.path.abspath(base_path),
        "revision": None, "use_rslora": False, "use_dora": False,
    }
    os.makedirs(output, exist_ok=True)
    save_file(out, os.path.join(output, "adapter_model.safetensors"),
              metadata={"format": "pt"})
    with open(os.path.join(output, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return {"output": output, "tensors": len(out), "modules": len(modules),
            "modules_to_save": names}
