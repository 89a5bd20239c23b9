"""diffusers `AutoencoderKL` state dict <-> `idgbr_jax.models.autoencoder.AutoencoderKL` params.

Both directions walk one table built from the config (`_param_table`), so they are exact
inverses and a missing, unexpected or mis-shaped tensor is reported by name. numpy only: torch
tensors are accepted as input, and the torch-side output is a dict of numpy arrays (wrap with
`torch.from_numpy` before `load_state_dict`).

Attention keys: current diffusers names the mid-block attention `to_q/to_k/to_v/to_out.0`; older
checkpoints (diffusers < 0.14 `AttentionBlock`) use `query/key/value/proj_attn`. Either is read;
`legacy_attention_names=True` writes the old one.
"""
from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import numpy as np
from flax import linen as nn
from flax import traverse_util

from idgbr_jax.convert.torch_layout import (conv_kernel_to_flax, conv_kernel_to_torch,
                                            linear_kernel_to_flax, linear_kernel_to_torch)
from idgbr_jax.models.autoencoder import AutoencoderConfig

_LEGACY_ATTENTION = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}


class _Entry(NamedTuple):
  torch_key: str           # current diffusers name
  flax_path: tuple[str, ...]
  kind: str                # 'conv' | 'linear' | 'vector'
  torch_shape: tuple[int, ...]
  legacy_key: str | None   # old diffusers name (attention only)


def _param_table(config: AutoencoderConfig) -> list[_Entry]:
  """Every parameter of the model: torch key, flax path, layout kind and torch shape."""
  table: list[_Entry] = []

  def conv(tk, fp, cin, cout, k):
    table.append(_Entry(f"{tk}.weight", fp + ("kernel",), "conv", (cout, cin, k, k), None))
    table.append(_Entry(f"{tk}.bias", fp + ("bias",), "vector", (cout,), None))

  def norm(tk, fp, c):
    table.append(_Entry(f"{tk}.weight", fp + ("scale",), "vector", (c,), None))
    table.append(_Entry(f"{tk}.bias", fp + ("bias",), "vector", (c,), None))

  def resnet(tk, fp, cin, cout):
    norm(f"{tk}.norm1", fp + ("norm1",), cin)
    conv(f"{tk}.conv1", fp + ("conv1",), cin, cout, 3)
    norm(f"{tk}.norm2", fp + ("norm2",), cout)
    conv(f"{tk}.conv2", fp + ("conv2",), cout, cout, 3)
    if cin != cout:
      conv(f"{tk}.conv_shortcut", fp + ("conv_shortcut",), cin, cout, 1)

  def mid_block(tk, fp, c):
    resnet(f"{tk}.resnets.0", fp + ("resnets_0",), c, c)
    if config.mid_block_attention:
      atk, afp = f"{tk}.attentions.0", fp + ("attention",)
      norm(f"{atk}.group_norm", afp + ("group_norm",), c)
      for name in ("to_q", "to_k", "to_v", "to_out.0"):
        leaf = afp + (name.split(".")[0],)
        legacy = f"{atk}.{_LEGACY_ATTENTION[name]}"
        table.append(_Entry(f"{atk}.{name}.weight", leaf + ("kernel",), "linear", (c, c),
                            f"{legacy}.weight"))
        table.append(_Entry(f"{atk}.{name}.bias", leaf + ("bias",), "vector", (c,),
                            f"{legacy}.bias"))
    resnet(f"{tk}.resnets.1", fp + ("resnets_1",), c, c)

  chans = config.block_out_channels
  last = len(chans) - 1
  # Encoder.
  enc = ("encoder",)
  conv("encoder.conv_in", enc + ("conv_in",), config.in_channels, chans[0], 3)
  cin = chans[0]
  for i, cout in enumerate(chans):
    for j in range(config.layers_per_block):
      resnet(f"encoder.down_blocks.{i}.resnets.{j}", enc + (f"down_blocks_{i}_resnets_{j}",),
             cin, cout)
      cin = cout
    if i != last:
      conv(f"encoder.down_blocks.{i}.downsamplers.0.conv", enc + (f"down_blocks_{i}_downsample",),
           cout, cout, 3)
  mid_block("encoder.mid_block", enc + ("mid_block",), chans[-1])
  norm("encoder.conv_norm_out", enc + ("conv_norm_out",), chans[-1])
  conv("encoder.conv_out", enc + ("conv_out",), chans[-1], 2 * config.latent_channels, 3)
  # Decoder.
  dec = ("decoder",)
  rchans = tuple(reversed(chans))
  conv("decoder.conv_in", dec + ("conv_in",), config.latent_channels, rchans[0], 3)
  mid_block("decoder.mid_block", dec + ("mid_block",), rchans[0])
  cin = rchans[0]
  for i, cout in enumerate(rchans):
    for j in range(config.layers_per_block + 1):
      resnet(f"decoder.up_blocks.{i}.resnets.{j}", dec + (f"up_blocks_{i}_resnets_{j}",),
             cin, cout)
      cin = cout
    if i != last:
      conv(f"decoder.up_blocks.{i}.upsamplers.0.conv", dec + (f"up_blocks_{i}_upsample",),
           cout, cout, 3)
  norm("decoder.conv_norm_out", dec + ("conv_norm_out",), chans[0])
  conv("decoder.conv_out", dec + ("conv_out",), chans[0], config.out_channels, 3)
  # 1x1 convs around the latent.
  if config.use_quant_conv:
    conv("quant_conv", ("quant_conv",), 2 * config.latent_channels,
         2 * config.latent_channels, 1)
  if config.use_post_quant_conv:
    conv("post_quant_conv", ("post_quant_conv",), config.latent_channels,
         config.latent_channels, 1)
  return table


def _to_numpy(value) -> np.ndarray:
  if hasattr(value, "detach"):  # torch.Tensor, without importing torch
    value = value.detach().cpu()
    if str(value.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 is exact
      value = value.float()
    value = value.numpy()
  return np.asarray(value)


def _flax_shape(entry: _Entry) -> tuple[int, ...]:
  s = entry.torch_shape
  if entry.kind == "conv":
    return (s[2], s[3], s[1], s[0])
  if entry.kind == "linear":
    return (s[1], s[0])
  return s


def _fmt(keys, limit=8) -> str:
  keys = sorted(keys)
  more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
  return ", ".join(repr(k) for k in keys[:limit]) + more


def vae_params_from_torch(state_dict: Mapping[str, Any], config: AutoencoderConfig) -> dict:
  """Converts a diffusers AutoencoderKL state dict to this model's 'params' collection.

  Args:
    state_dict: `AutoencoderKL.state_dict()` (torch tensors or numpy arrays), with current or
      legacy mid-block attention names.
    config: the matching AutoencoderConfig (e.g.
      `diffusers_folder.autoencoder_config_from_diffusers(...)`).

  Returns:
    Nested dict of numpy arrays; use as `model.apply({'params': params}, ...)`.

  Raises:
    ValueError: naming the first missing / unexpected keys, or a key whose shape differs.
  """
  table = _param_table(config)
  missing, used, flat = [], set(), {}
  for entry in table:
    key = entry.torch_key
    if key not in state_dict and entry.legacy_key in state_dict:
      key = entry.legacy_key
    if key not in state_dict:
      missing.append(entry.torch_key)
      continue
    used.add(key)
    value = _to_numpy(state_dict[key])
    if entry.kind == "linear" and value.shape == entry.torch_shape + (1, 1):
      value = value[:, :, 0, 0]  # attention stored as 1x1 conv by some LDM -> diffusers ports
    if value.shape != entry.torch_shape:
      raise ValueError(f"shape mismatch for {key!r}: expected {entry.torch_shape}, "
                       f"got {value.shape}")
    if entry.kind == "conv":
      value = conv_kernel_to_flax(value)
    elif entry.kind == "linear":
      value = linear_kernel_to_flax(value)
    flat[entry.flax_path] = value
  if missing:
    raise ValueError(f"missing key(s) in the diffusers state dict: {_fmt(missing)}")
  unexpected = set(state_dict) - used
  if unexpected:
    raise ValueError(f"unexpected key(s) in the diffusers state dict: {_fmt(unexpected)}")
  return traverse_util.unflatten_dict(flat)


def vae_params_to_torch(params, config: AutoencoderConfig, *,
                        legacy_attention_names: bool = False) -> dict[str, np.ndarray]:
  """Inverse of `vae_params_from_torch`: params -> diffusers state dict (numpy arrays).

  Args:
    params: the 'params' collection (boxed or not), or the variables dict {'params': ...}.
    config: the model's AutoencoderConfig.
    legacy_attention_names: write `query/key/value/proj_attn` instead of `to_q/.../to_out.0`.

  Raises:
    ValueError: naming a missing / unexpected flax path or a mis-shaped leaf.
  """
  params = nn.meta.unbox(params)
  if "params" in params:
    params = params["params"]
  flat = {k: np.asarray(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
  table = _param_table(config)
  missing = ["/".join(e.flax_path) for e in table if e.flax_path not in flat]
  if missing:
    raise ValueError(f"missing flax param(s): {_fmt(missing)}")
  unexpected = set(flat) - {e.flax_path for e in table}
  if unexpected:
    raise ValueError(f"unexpected flax param(s): {_fmt('/'.join(p) for p in unexpected)}")
  state_dict = {}
  for entry in table:
    value = flat[entry.flax_path]
    if value.shape != _flax_shape(entry):
      raise ValueError(f"shape mismatch for {'/'.join(entry.flax_path)!r}: expected "
                       f"{_flax_shape(entry)}, got {value.shape}")
    if entry.kind == "conv":
      value = conv_kernel_to_torch(value)
    elif entry.kind == "linear":
      value = linear_kernel_to_torch(value)
    key = entry.legacy_key if legacy_attention_names and entry.legacy_key else entry.torch_key
    state_dict[key] = value
  return state_dict


def vae_param_count(config: AutoencoderConfig) -> int:
  """Number of parameters of the model described by `config` (from the conversion table)."""
  return int(sum(np.prod(e.torch_shape) for e in _param_table(config)))
