"""Hugging Face files: reading checkpoints and ``config.json``, writing safetensors.

* :class:`CheckpointReader` gives tensor-by-tensor access to a directory's
  weights: ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
  ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``, in that order.
  safetensors are memory-mapped; ``.bin`` files go only through
  ``torch.load(weights_only=True)``, never a full unpickler (untrusted files
  never execute code). :class:`StateDictReader` is the same interface over an
  in-memory state dict.
* :func:`read_config` reads ``config.json`` (the one reader of it).
* :func:`write_safetensors` writes ``model.safetensors`` or
  ``model-0000i-of-0000N.safetensors`` shards + ``model.safetensors.index.json``
  (transformers' layout) from tensors produced one at a time.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple

import numpy as np

from protlm_jax.errors import ProtlmError

_MAX_LISTED = 12


def listing(items: Sequence[str]) -> str:
    """At most a dozen names, then how many more."""
    items = list(items)
    shown = ", ".join(items[:_MAX_LISTED])
    more = len(items) - _MAX_LISTED
    return shown + (f" (+{more} more)" if more > 0 else "")


def to_numpy(w: Any) -> np.ndarray:
    """torch tensors (possibly bfloat16) and numpy arrays alike, as float32 numpy."""
    if hasattr(w, "detach"):
        w = w.detach().cpu()
        w = (w if w.dtype.is_floating_point else w.double()).float().numpy()
    return np.asarray(w, dtype=np.float32)


def weights(w: Any, name: str, where: str) -> np.ndarray:
    """An untrusted weight tensor as float32 numpy: floating point and finite, or a
    one-line error (an integer table cast to float, or a NaN that reaches every
    embedding, would otherwise load silently)."""
    dtype = getattr(w, "dtype", None)
    floating = (dtype.is_floating_point if hasattr(dtype, "is_floating_point")
                else np.issubdtype(np.asarray(w).dtype, np.floating))
    if not floating:
        raise ProtlmError(f"{where}: tensor {name} has dtype {str(dtype).replace('torch.', '')}"
                          "; weights must be floating point")
    a = to_numpy(w)
    bad = a.size - int(np.count_nonzero(np.isfinite(a)))
    if bad:
        raise ProtlmError(f"{where}: tensor {name} holds {bad:,} non-finite values "
                          "(NaN or infinity)")
    return a


def write_json(path: str, obj: Any) -> None:
    """Pretty, key-sorted JSON with a final newline."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


DTYPES = ("float32", "float16", "bfloat16")
DEFAULT_MAX_SHARD_SIZE = 5 * 1000 ** 3  # transformers' "5GB"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 1000, "MB": 1000 ** 2, "GB": 1000 ** 3,
               "KIB": 1024, "MIB": 1024 ** 2, "GIB": 1024 ** 3}


def parse_size(text: str) -> int:
    """``"5GB"``, ``"500MB"``, ``"200KiB"`` or a byte count → bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ProtlmError(f"--max_shard_size: expected e.g. 5GB, 500MB or a byte count, "
                          f"got {text!r}")
    return int(float(m[1]) * _SIZE_UNITS[(m[2] or "").upper()])


class CheckpointReader:
    """Lazy, tensor-by-tensor access to the weights of a Hugging Face directory.

    Reads ``model.safetensors.index.json`` (sharded), ``model.safetensors``,
    ``pytorch_model.bin.index.json`` or ``pytorch_model.bin``, in that order of
    preference. safetensors files are memory-mapped and read one tensor at a
    time; ``.bin`` files go only through ``torch.load(weights_only=True)``
    (memory-mapped when the file allows), never a full unpickler.
    """

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        self._files: Dict[str, str] = {}     # tensor name -> file
        self._open: Dict[str, Any] = {}      # file -> safe_open handle or state dict
        self._shapes: Dict[str, Tuple[int, ...]] = {}
        candidates = [("model.safetensors.index.json", "safetensors"),
                      ("model.safetensors", "safetensors"),
                      ("pytorch_model.bin.index.json", "bin"),
                      ("pytorch_model.bin", "bin")]
        for filename, kind in candidates:
            path = os.path.join(hf_dir, filename)
            if os.path.isfile(path):
                break
        else:
            raise ProtlmError(f"{hf_dir}: no model.safetensors(.index.json) or "
                              f"pytorch_model.bin(.index.json) in this directory")
        self.kind = kind
        if filename.endswith(".index.json"):
            index = read_json(path)
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise ProtlmError(f"{path}: no 'weight_map' of tensor name -> file")
            files = {name: _shard_path(hf_dir, path, name, shard)
                     for name, shard in weight_map.items()}
            missing = sorted({f for f in files.values() if not os.path.isfile(f)})
            if missing:
                raise ProtlmError(f"{path}: shard files missing: "
                                  f"{listing([os.path.basename(f) for f in missing])}")
        else:
            files = None
        shard_files = sorted(set(files.values())) if files else [path]
        for shard in shard_files:
            for name, shape in self._scan(shard).items():
                if files is not None and files.get(name) != shard:
                    continue  # the index says another shard holds it (or none)
                self._files[name] = shard
                self._shapes[name] = shape
        if files is not None:
            absent = sorted(n for n in files if n not in self._files)
            if absent:
                raise ProtlmError(f"{path}: tensors listed in the index are not in their "
                                  f"shard files: {listing(absent)}")

    def _scan(self, path: str) -> Dict[str, Tuple[int, ...]]:
        """Opens one file lazily; returns its tensor names and shapes."""
        if self.kind == "safetensors":
            from safetensors import safe_open

            _check_safetensors_extent(path)
            try:
                handle = safe_open(path, framework="pt")
                shapes = {n: tuple(handle.get_slice(n).get_shape()) for n in handle.keys()}
            except Exception as e:  # safetensors raises its own error types
                raise ProtlmError(f"{path}: not a readable safetensors file "
                                  f"({type(e).__name__}: {e})") from None
            self._open[path] = handle
            return shapes
        import pickle

        import torch

        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) files cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
            raise ProtlmError(f"{path}: cannot be read with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {e})") from None
        if not isinstance(state, dict):
            raise ProtlmError(f"{path}: holds a {type(state).__name__}, not a state dict")
        if "state_dict" in state and isinstance(state["state_dict"], dict):
            state = state["state_dict"]
        self._open[path] = state
        return {n: tuple(t.shape) for n, t in state.items() if hasattr(t, "shape")}

    def keys(self) -> List[str]:
        return list(self._files)

    def shape(self, name: str) -> Tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        """One tensor as float32 numpy (bfloat16/float16 upcast)."""
        path = self._files[name]
        try:
            if self.kind == "safetensors":
                tensor = self._open[path].get_tensor(name)
            else:
                tensor = self._open[path][name]
        except Exception as e:
            raise ProtlmError(f"{path}: tensor {name} cannot be read "
                              f"({type(e).__name__}: {e})") from None
        return weights(tensor, name, path)


def _shard_path(hf_dir: str, index: str, name: Any, shard: Any) -> str:
    """An index entry's file, which must be a plain name inside ``hf_dir``
    (an untrusted index must not point at files elsewhere)."""
    if not isinstance(name, str) or not isinstance(shard, str) or not shard:
        raise ProtlmError(f"{index}: weight_map entry {name!r}: {shard!r} is not a "
                          "tensor name -> file name pair of strings")
    path = os.path.join(hf_dir, shard)
    inside = os.path.realpath(hf_dir)
    if os.path.isabs(shard) or os.path.commonpath(
            [inside, os.path.realpath(path)]) != inside:
        raise ProtlmError(f"{index}: weight_map entry {name!r}: {shard!r} is outside "
                          "the model directory")
    return path


def read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ProtlmError(f"{path}: not valid JSON ({e})") from None
    except UnicodeDecodeError as e:
        raise ProtlmError(f"{path}: not UTF-8 text (byte {e.start}: {e.reason})") from None
    except RecursionError:
        raise ProtlmError(f"{path}: JSON nested too deeply") from None
    except OSError as e:
        raise ProtlmError(f"{path}: cannot be read ({e.strerror})") from None


def _check_safetensors_extent(path: str) -> None:
    """Names a truncated file as such: its header promises more bytes than it has.

    Anything else wrong with the file is left to ``safe_open`` to report.
    """
    import struct

    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            header_len = struct.unpack("<Q", f.read(8))[0]
            if header_len > size:
                raise ProtlmError(f"{path}: truncated safetensors file ({size:,} bytes, "
                                  f"shorter than its {header_len:,}-byte header)")
            header = json.loads(f.read(header_len))
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"),
                  default=0)
    except (struct.error, ValueError, TypeError, KeyError, AttributeError):
        return
    if 8 + header_len + end > size:
        raise ProtlmError(f"{path}: truncated safetensors file ({size:,} bytes; its "
                          f"header describes {8 + header_len + end:,})")


def read_config(hf_dir: str) -> Dict[str, Any]:
    """The parsed ``config.json`` of a Hugging Face directory."""
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
        raise ProtlmError(f"{path}: not found (not a Hugging Face model directory)")
    hf = read_json(path)
    if not isinstance(hf, dict):
        raise ProtlmError(f"{path}: expected a JSON object")
    return hf




class StateDictReader:
    """:class:`CheckpointReader`'s interface over an in-memory state dict."""
    kind = "state dict"

    def __init__(self, state_dict: Mapping[str, Any]):
        self._state = state_dict

    def keys(self) -> List[str]:
        return list(self._state)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._state[name].shape)

    def get(self, name: str) -> np.ndarray:
        return to_numpy(self._state[name])


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[dtype]


def write_safetensors(tensors: Iterator[Tuple[str, np.ndarray]], output: str, *,
                      dtype: str = "float32",
                      max_shard_size: int = DEFAULT_MAX_SHARD_SIZE) -> List[str]:
    """Writes ``model.safetensors`` or shards + ``model.safetensors.index.json``.

    A shard is closed when the next tensor would take it past
    ``max_shard_size`` bytes (a bigger tensor gets a shard of its own), as
    transformers does. Returns the files written.
    """
    from safetensors.torch import save_file

    torch_dtype = _torch_dtype(dtype)
    try:
        return _write_shards(tensors, output, torch_dtype, dtype, max_shard_size, save_file)
    except BaseException:  # a full disk, say: no partial shard is left behind
        for name in os.listdir(output):
            if re.fullmatch(r"\.shard-\d{5}\.tmp", name):
                os.remove(os.path.join(output, name))
        raise


def _write_shards(tensors, output, torch_dtype, dtype, max_shard_size, save_file) -> List[str]:
    import torch

    shards: List[Dict[str, Any]] = []
    current: Dict[str, Any] = {}
    current_size = total_size = 0

    def flush():
        nonlocal current, current_size
        if current:
            path = os.path.join(output, f".shard-{len(shards):05d}.tmp")
            save_file(current, path, metadata={"format": "pt"})
            shards.append({"tmp": path, "names": list(current)})
            current, current_size = {}, 0

    for name, w in tensors:
        tensor = torch.from_numpy(np.require(w, np.float32, ["C", "W"])).to(torch_dtype)
        if not torch.isfinite(tensor).all():
            raise ProtlmError(f"{name}: values overflow {dtype} (|w| up to "
                              f"{float(np.abs(w).max()):.3g}); export in float32 or bfloat16")
        size = tensor.numel() * tensor.element_size()
        if current and current_size + size > max_shard_size:
            flush()
        current[name] = tensor
        current_size += size
        total_size += size
    flush()
    if len(shards) == 1:
        final = os.path.join(output, "model.safetensors")
        os.replace(shards[0]["tmp"], final)
        return ["model.safetensors"]
    weight_map, files = {}, []
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        os.replace(shard["tmp"], os.path.join(output, filename))
        weight_map.update({n: filename for n in shard["names"]})
        files.append(filename)
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    write_json(os.path.join(output, "model.safetensors.index.json"), index)
    return files + ["model.safetensors.index.json"]


def remove_stale_weights(output: str) -> None:
    for name in os.listdir(output):
        if re.fullmatch(r"model(-\d{5}-of-\d{5})?\.safetensors(\.index\.json)?"
                        r"|\.shard-\d{5}\.tmp|pytorch_model.*\.bin(\.index\.json)?", name):
            os.remove(os.path.join(output, name))


