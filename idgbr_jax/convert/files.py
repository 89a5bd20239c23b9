"""Reading and writing PyTorch-side weight files as numpy state dicts.

Formats read: `.safetensors` (and diffusers' sharded `*.safetensors.index.json`), and pickled
`torch.save` files (`.bin`, `.pth`, `.pt`, `.ckpt`; need torch, loaded with
`weights_only=True`, so no code in the file runs). Written: `.safetensors` only, which diffusers,
transformers and the original IDGBR code all load. Nothing is downloaded from a hub; a path is
local or a URL `etils.epath` handles (`gs://...`), read and written through `idgbr_jax.paths`.

Every failure is a `ConversionError` (a ValueError) that names the file, and the key where one
is involved.
"""
from __future__ import annotations

import io
import json
import os
from typing import Any, Mapping

import numpy as np
from etils import epath

from idgbr_jax import paths

TORCH_SUFFIXES = (".bin", ".pth", ".pt", ".ckpt")
# Wrappers around a state dict in training checkpoints (dinov2, lightning, DDP, ...).
_WRAPPERS = ("state_dict", "model", "model_state_dict", "module", "teacher")


class ConversionError(ValueError):
  """A weight file or folder does not hold what the converter expects (names file and key)."""


def join(path: str | os.PathLike, *parts: str) -> str:
  """`path/parts...` as a string: a URL stays a URL, a local path stays as given (relative
  paths are not made absolute, so messages and returned paths name what the user passed)."""
  return os.fspath(epath.Path(os.fspath(path)).joinpath(*parts))


def is_file(path: str | os.PathLike) -> bool:
  return paths.resolve(path).is_file()


def is_dir(path: str | os.PathLike) -> bool:
  return paths.isdir(path)


def to_numpy(value: Any) -> np.ndarray:
  """A torch tensor (any dtype, bf16 -> float32 exactly) or array-like -> numpy array."""
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
      value = value.float()
    return value.numpy()
  return np.asarray(value)


def _is_tensor(value) -> bool:
  return hasattr(value, "detach") or isinstance(value, np.ndarray)


def _unwrap(obj: Any, path: str) -> dict[str, Any]:
  while isinstance(obj, Mapping) and obj and not any(_is_tensor(v) for v in obj.values()):
    for key in _WRAPPERS:
      if isinstance(obj.get(key), Mapping):
        obj = obj[key]
        break
    else:
      raise ConversionError(f"{path}: no tensors at the top level and no known wrapper key "
                            f"({', '.join(_WRAPPERS)}); top-level keys: {sorted(obj)[:10]}")
  if not isinstance(obj, Mapping):
    raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict")
  return dict(obj)


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  """A local file is memory-mapped (`safe_open`); a URL is read whole and parsed from bytes."""
  from safetensors import safe_open  # pylint: disable=import-outside-toplevel
  data = None
  out = {}
  try:
    if paths.is_url(path):
      import safetensors.numpy  # pylint: disable=import-outside-toplevel
      data = paths.read_bytes(path)
      try:
        out = dict(safetensors.numpy.load(data))
      except KeyError as e:  # a dtype numpy lacks (BF16): like safe_open's TypeError below
        raise TypeError(f"data type {e} not understood") from e
    else:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          out[key] = f.get_tensor(key)
  except TypeError:  # bf16 tensors: numpy cannot hold them, read through torch
    try:
      import torch  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
      raise ConversionError(f"{path}: holds bfloat16 tensors, which need torch to read") from e
    if data is not None:
      import safetensors.torch  # pylint: disable=import-outside-toplevel
      out = {key: to_numpy(v) for key, v in safetensors.torch.load(data).items()}
    else:
      with safe_open(path, framework="pt") as f:
        out = {key: to_numpy(f.get_tensor(key)) for key in f.keys()}
  except Exception as e:  # noqa: BLE001 - corrupt/truncated files: say which one
    raise ConversionError(f"{path}: cannot read as safetensors: {e}") from e
  return out


def _read_torch(path: str) -> dict[str, np.ndarray]:
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ConversionError(f"{path}: reading a torch pickle needs torch installed (pip install "
                          "torch), or convert the file to .safetensors first") from e
  try:
    # A local file is opened by torch itself; a URL is read whole into memory first.
    source = io.BytesIO(paths.read_bytes(path)) if paths.is_url(path) else path
    obj = torch.load(source, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001
    raise ConversionError(f"{path}: cannot read as a torch state dict: {e}") from e
  sd = _unwrap(obj, path)
  return {k: to_numpy(v) for k, v in sd.items() if _is_tensor(v)}


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
  """The tensors of one weight file (or a sharded safetensors index) as numpy arrays."""
  path = os.fspath(path)
  if not is_file(path):
    raise ConversionError(f"{path}: weight file not found")
  if path.endswith(".index.json"):
    weight_map = json.loads(paths.read_bytes(path)).get("weight_map")
    if not isinstance(weight_map, Mapping):
      raise ConversionError(f"{path}: no 'weight_map' in the shard index")
    out: dict[str, np.ndarray] = {}
    folder = os.fspath(epath.Path(path).parent)
    for shard in sorted(set(weight_map.values())):
      out.update(read_state_dict(join(folder, shard)))
    missing = sorted(set(weight_map) - set(out))
    if missing:
      raise ConversionError(f"{path}: keys listed in the index but absent from the shards: "
                            f"{missing[:8]}")
    return out
  if path.endswith(".safetensors"):
    return _read_safetensors(path)
  if path.endswith(TORCH_SUFFIXES):
    return _read_torch(path)
  raise ConversionError(f"{path}: unknown weight file type (expected .safetensors or one of "
                        f"{', '.join(TORCH_SUFFIXES)})")


def find_weights(folder: str, stems: tuple[str, ...]) -> str:
  """The weight file of a diffusers / transformers model folder: `<stem>.safetensors` first,
  then its shard index, then `<stem>.bin` (e.g. stems ('diffusion_pytorch_model',))."""
  candidates = []
  for stem in stems:
    candidates += [f"{stem}.safetensors", f"{stem}.safetensors.index.json", f"{stem}.bin",
                   f"{stem}.bin.index.json"]
  for name in candidates:
    path = join(folder, name)
    if is_file(path):
      if name.endswith(".bin.index.json"):
        raise ConversionError(f"{path}: sharded .bin checkpoints are not supported; save the "
                              "model with safe_serialization=True")
      return path
  present = paths.listdir(folder) if is_dir(folder) else []
  raise ConversionError(f"{folder}: no weight file ({', '.join(candidates[:3])}, ...); the "
                        f"folder holds {present[:12]}")


def read_json(path: str) -> dict[str, Any]:
  if not is_file(path):
    raise ConversionError(f"{path}: not found")
  try:
    return json.loads(paths.read_bytes(path))
  except json.JSONDecodeError as e:
    raise ConversionError(f"{path}: not valid JSON: {e}") from e


def write_json(path: str, obj: Mapping[str, Any]) -> None:
  """Indented, sorted keys, trailing newline (local or URL; the parent folder is created)."""
  paths.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def write_safetensors(path: str, state_dict: Mapping[str, Any],
                      metadata: Mapping[str, str] | None = None) -> str:
  """Writes numpy arrays (contiguous copies) as a safetensors file (local or URL; the parent
  folder is created); returns the path."""
  import safetensors.numpy  # pylint: disable=import-outside-toplevel
  tensors = {k: np.ascontiguousarray(to_numpy(v)) for k, v in state_dict.items()}
  paths.write_bytes(path, safetensors.numpy.save(tensors,
                                                 metadata=dict(metadata or {"format": "pt"})))
  return path
