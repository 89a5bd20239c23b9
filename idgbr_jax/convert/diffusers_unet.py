"""diffusers `UNet2DConditionModel` state dict <-> `idgbr_jax.models.denoiser` params (numpy only).

Names map one to one: every `.N.` in a torch key folds into the preceding name (`resnets.1` ->
`resnets_1`, `to_out.0` -> `to_out_0`, `ff.net.0.proj` -> `ff/net_0/proj`). Leaves:
4-D `weight` -> conv `kernel` (OIHW -> HWIO), 2-D `weight` -> Dense `kernel` (transposed),
1-D `weight` -> norm `scale`, `bias` -> `bias`. The expected key set and shapes come from the Flax
model itself (`jax.eval_shape`), so any missing, unexpected or mis-shaped entry is reported by name.

The params returned / accepted are the inner tree, i.e. what `variables["params"]` holds.
"""
from __future__ import annotations

import functools
import re
from typing import Any, Mapping

import numpy as np
from flax import traverse_util

from idgbr_jax.convert import torch_layout
from idgbr_jax.models.denoiser import DenoiserConfig, abstract_params

# Flax names of the form `<list>_<index>` that are `<list>.<index>` in torch. Other names with a
# digit suffix (`linear_1`, `norm1`) are torch names as they are.
_INDEXED = re.compile(
    r"^(down_blocks|up_blocks|resnets|attentions|transformer_blocks|downsamplers|upsamplers|"
    r"to_out|net)_(\d+)$")


def _torch_key(path: tuple[str, ...]) -> str:
  parts = []
  for name in path[:-1]:
    m = _INDEXED.match(name)
    parts += [m.group(1), m.group(2)] if m else [name]
  leaf = path[-1]
  if leaf in ("kernel", "scale"):
    parts.append("weight")
  elif leaf == "bias":
    parts.append("bias")
  else:
    raise ValueError(f"unexpected param leaf {'/'.join(path)}")
  return ".".join(parts)


def _to_torch_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 4:
    return torch_layout.conv_kernel_to_torch(x)
  if leaf == "kernel" and x.ndim == 2:
    return torch_layout.linear_kernel_to_torch(x)
  return np.asarray(x)


def _to_flax_layout(leaf: str, x: np.ndarray) -> np.ndarray:
  if leaf == "kernel" and x.ndim == 4:
    return torch_layout.conv_kernel_to_flax(x)
  if leaf == "kernel" and x.ndim == 2:
    return torch_layout.linear_kernel_to_flax(x)
  return np.asarray(x)


def _torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
  if leaf == "kernel" and len(shape) == 4:
    return (shape[3], shape[2], shape[0], shape[1])
  if leaf == "kernel" and len(shape) == 2:
    return (shape[1], shape[0])
  return tuple(shape)


@functools.lru_cache(maxsize=8)
def _expected(config: DenoiserConfig) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
  """torch key -> (flax path, flax shape) for every parameter (cached: tracing the model is slow).

  Callers must not mutate the returned dict."""
  flat = traverse_util.flatten_dict(abstract_params(config))
  return {_torch_key(path): (path, tuple(x.shape)) for path, x in flat.items()}


def unet_params_from_torch(state_dict: Mapping[str, Any], config: DenoiserConfig,
                           dtype=np.float32) -> dict[str, Any]:
  """Converts a diffusers UNet state dict (numpy arrays) into the Flax params tree.

  Args:
    state_dict: torch key -> array (pass `{k: v.float().numpy() for k, v in sd.items()}` for torch
      tensors; bf16 tensors cannot go through numpy).
    config: the architecture the weights belong to.
    dtype: numpy dtype of the returned leaves.

  Raises:
    ValueError: on any missing or unexpected key, or a shape mismatch (names the key and both
      shapes).
  """
  return _from_torch(state_dict, _expected(config), dtype, what="UNet state dict")


def _from_torch(state_dict: Mapping[str, Any], expected, dtype, *, what: str,
                ignored_prefixes: tuple[str, ...] = ()) -> dict[str, Any]:
  """Strict conversion of the torch keys in `expected` (torch key -> (flax path, flax shape));
  keys starting with `ignored_prefixes` may be present and are skipped."""
  missing = sorted(set(expected) - set(state_dict))
  unexpected = sorted(k for k in set(state_dict) - set(expected)
                      if not k.startswith(ignored_prefixes))
  if missing or unexpected:
    raise ValueError(f"{what} does not match the config: missing keys {missing[:20]} "
                     f"({len(missing)} in all), unexpected keys {unexpected[:20]} "
                     f"({len(unexpected)} in all)")
  flat = {}
  for key, (path, shape) in expected.items():
    value = np.asarray(state_dict[key])
    want = _torch_shape(path[-1], shape)
    if tuple(value.shape) != want:
      raise ValueError(f"shape mismatch for {key}: expected {want}, got {tuple(value.shape)}")
    flat[path] = _to_flax_layout(path[-1], value).astype(dtype, copy=False)
  return traverse_util.unflatten_dict(flat)


def unet_params_to_torch(params: Mapping[str, Any],
                         config: DenoiserConfig) -> dict[str, np.ndarray]:
  """Exact inverse of `unet_params_from_torch`: Flax params tree -> diffusers state dict (numpy).

  Accepts the inner params tree or `{'params': ...}`. Raises ValueError like the forward direction.
  """
  return _to_torch(params, _expected(config), what="params")


def _to_torch(params: Mapping[str, Any], expected_by_key, *, what: str) -> dict[str, np.ndarray]:
  """Strict inverse of `_from_torch` for the torch keys in `expected_by_key`."""
  if set(params) == {"params"}:
    params = params["params"]
  expected = {path: (key, shape) for key, (path, shape) in expected_by_key.items()}
  flat = traverse_util.flatten_dict(dict(params))
  missing = sorted("/".join(p) for p in set(expected) - set(flat))
  unexpected = sorted("/".join(p) for p in set(flat) - set(expected))
  if missing or unexpected:
    raise ValueError(f"{what} do not match the config: missing {missing[:20]} "
                     f"({len(missing)}), unexpected {unexpected[:20]} ({len(unexpected)})")
  out = {}
  for path, (key, shape) in expected.items():
    value = np.asarray(flat[path])
    if tuple(value.shape) != shape:
      raise ValueError(f"shape mismatch for {'/'.join(path)} ({key}): expected {shape}, "
                       f"got {tuple(value.shape)}")
    out[key] = _to_torch_layout(path[-1], value)
  return out


# The encoder half alone: the original's `UNet2DConditionEncodeModel` (its `unet_ori/`), which
# holds conv_in, the time embedding, the down blocks and the mid block, and no up path.
_DECODER_PREFIXES = ("up_blocks.", "conv_norm_out.", "conv_out.")


def _is_encoder_path(path: tuple[str, ...]) -> bool:
  return path[0] in ("conv_in", "time_embedding", "mid_block") or path[0].startswith(
      "down_blocks_")


def unet_encoder_params_from_torch(state_dict: Mapping[str, Any], config: DenoiserConfig,
                                   dtype=np.float32) -> dict[str, Any]:
  """The encoder half's params (what `denoiser.encoder_params` keeps) from a state dict that
  holds it: an encoder-only one or a whole UNet's (whose up path is ignored). Strict otherwise:
  missing encoder keys, keys of neither half and shape mismatches are errors."""
  return _from_torch(state_dict, _encoder_expected(config), dtype,
                     what="UNet encoder state dict", ignored_prefixes=_DECODER_PREFIXES)


def _encoder_expected(config: DenoiserConfig):
  return {k: v for k, v in _expected(config).items() if _is_encoder_path(v[0])}


def unet_encoder_params_to_torch(params: Mapping[str, Any],
                                 config: DenoiserConfig) -> dict[str, np.ndarray]:
  """Inverse of `unet_encoder_params_from_torch` (an encoder-only params tree)."""
  return _to_torch(params, _encoder_expected(config), what="encoder params")
