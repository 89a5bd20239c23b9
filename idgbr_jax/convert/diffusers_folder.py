"""diffusers model folders (`config.json` + `diffusion_pytorch_model.{safetensors,bin}`) in and out.

    module, params = load_diffusers("sd-v1-5/unet")   # UNet2DConditionModel, params tree
    module, params = load_diffusers("sd-v1-5/vae")    # AutoencoderKL
    save_diffusers("out/unet", module.config, params) # loads with diffusers' from_pretrained

config.json <-> our configs: `denoiser_config_from_diffusers` / `unet_config_json` (UNet) and
`autoencoder_config_from_diffusers` / `vae_config_json` (VAE); the state dicts go through
`diffusers_unet` / `diffusers_vae`.

The kind comes from `_class_name` in config.json. The original IDGBR saves its trained denoiser
as `UNet2DConditionNewModel` (a subclass that only adds methods), which is read as a UNet.
Architecture fields this port adds (`remat`, `attention_implementation`, the VAE's
`sample_posterior`) are run-time choices that diffusers does not record; they come back at
their defaults.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import numpy as np

from idgbr_jax import paths
from idgbr_jax.convert import diffusers_unet, diffusers_vae, files
from idgbr_jax.convert.files import ConversionError
from idgbr_jax.models.autoencoder import AutoencoderConfig, AutoencoderKL, replace_checked
from idgbr_jax.models.denoiser import DenoiserConfig, UNet2DConditionModel

WEIGHTS_STEM = "diffusion_pytorch_model"
# diffusers version written into exported config.json files (informational for diffusers).
DIFFUSERS_VERSION = "0.30.3"  # what the original IDGBR pins

UNET_CLASSES = ("UNet2DConditionModel", "UNet2DConditionNewModel")
VAE_CLASSES = ("AutoencoderKL",)


# ----- config.json <-> DenoiserConfig / AutoencoderConfig ----------------------------------------

def denoiser_config_from_diffusers(config_json: Mapping[str, Any],
                                   **overrides) -> DenoiserConfig:
  """Builds a config from a diffusers `UNet2DConditionModel` `config.json` dict.

  Keys starting with '_' and `sample_size` are informational and ignored. Keys that change the
  architecture in ways `models.denoiser` does not implement must have their default value.

  Raises:
    ValueError: naming every unknown key and every unsupported (key, value).
  """
  cfg = dict(config_json)
  class_name = cfg.get("_class_name", "UNet2DConditionModel")
  if class_name != "UNet2DConditionModel":
    raise ValueError(f"_class_name {class_name!r} is not UNet2DConditionModel")
  cfg = {k: v for k, v in cfg.items() if not k.startswith("_") and k != "sample_size"}
  problems = []
  for key, allowed in _DIFFUSERS_FIXED.items():
    if key in cfg:
      value = cfg.pop(key)
      if value not in allowed:
        problems.append(f"{key}={value!r} (supported: {allowed})")
  heads = cfg.pop("num_attention_heads", None)
  head_dim = cfg.pop("attention_head_dim", 8)
  # diffusers: num_attention_heads = num_attention_heads or attention_head_dim (naming bug #2011).
  heads = heads if heads is not None else head_dim
  kwargs = {"num_heads": tuple(heads) if isinstance(heads, (list, tuple)) else int(heads)}
  for key in _DIFFUSERS_MAPPED:
    if key in cfg:
      kwargs[key] = cfg.pop(key)
  cross = kwargs.get("cross_attention_dim")
  if isinstance(cross, (list, tuple)):
    if len(set(cross)) != 1:
      problems.append(f"cross_attention_dim={cross!r} (per-block widths not supported)")
    else:
      kwargs["cross_attention_dim"] = cross[0]
  tl = kwargs.get("transformer_layers_per_block")
  if isinstance(tl, (list, tuple)) and any(isinstance(x, (list, tuple)) for x in tl):
    problems.append(f"transformer_layers_per_block={tl!r} (nested per-layer lists unsupported)")
  if cfg:
    problems.append(f"unknown keys {sorted(cfg)}")
  if problems:
    raise ValueError("unsupported diffusers UNet config: " + "; ".join(problems))
  for key in ("block_out_channels", "down_block_types", "up_block_types",
              "transformer_layers_per_block"):
    if isinstance(kwargs.get(key), list):
      kwargs[key] = tuple(kwargs[key])
  if isinstance(kwargs.get("layers_per_block"), (list, tuple)):
    lpb = set(kwargs["layers_per_block"])
    if len(lpb) != 1:
      raise ValueError(f"unsupported diffusers UNet config: per-block layers_per_block "
                       f"{kwargs['layers_per_block']!r}")
    kwargs["layers_per_block"] = lpb.pop()
  kwargs.update(overrides)
  return DenoiserConfig(**kwargs)


# diffusers keys copied straight into DenoiserConfig.
_DIFFUSERS_MAPPED = ("in_channels", "out_channels", "block_out_channels", "layers_per_block",
                     "down_block_types", "up_block_types", "cross_attention_dim", "norm_num_groups",
                     "norm_eps", "flip_sin_to_cos", "freq_shift", "use_linear_projection",
                     "transformer_layers_per_block", "upcast_attention")

# diffusers keys whose value must be one of these (their defaults): anything else changes the
# architecture in a way `models.denoiser` does not implement.
_DIFFUSERS_FIXED: dict[str, tuple] = {
    "center_input_sample": (False,),
    "mid_block_type": ("UNetMidBlock2DCrossAttn",),
    "only_cross_attention": (False,),
    "downsample_padding": (1,),
    "mid_block_scale_factor": (1, 1.0),
    "dropout": (0, 0.0),
    "act_fn": ("silu",),
    "reverse_transformer_layers_per_block": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "addition_embed_type": (None,),
    "addition_time_embed_dim": (None,),
    "num_class_embeds": (None,),
    "resnet_time_scale_shift": ("default",),
    "resnet_skip_time_act": (False,),
    "resnet_out_scale_factor": (1, 1.0),
    "time_embedding_type": ("positional",),
    "time_embedding_dim": (None,),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "time_cond_proj_dim": (None,),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "projection_class_embeddings_input_dim": (None,),
    "attention_type": ("default",),
    "class_embeddings_concat": (False,),
    "mid_block_only_cross_attention": (None, False),
    "cross_attention_norm": (None,),
    "addition_embed_type_num_heads": (64,),  # unused without addition_embed_type
}


def unet_config_json(config: DenoiserConfig, class_name: str = "UNet2DConditionModel",
                     sample_size: int = 64) -> dict[str, Any]:
  """diffusers `config.json` for a denoiser config (inverse of
  `denoiser_config_from_diffusers`).

  The head count goes to `attention_head_dim`, as SD-1.x configs do (diffusers reads it as the
  number of heads when `num_attention_heads` is absent)."""
  heads = config.num_heads
  tl = config.transformer_layers_per_block
  return {
      "_class_name": class_name,
      "_diffusers_version": DIFFUSERS_VERSION,
      "act_fn": "silu",
      "attention_head_dim": list(heads) if isinstance(heads, tuple) else int(heads),
      "block_out_channels": list(config.block_out_channels),
      "center_input_sample": False,
      "cross_attention_dim": int(config.cross_attention_dim),
      "down_block_types": list(config.down_block_types),
      "downsample_padding": 1,
      "flip_sin_to_cos": bool(config.flip_sin_to_cos),
      "freq_shift": config.freq_shift,
      "in_channels": int(config.in_channels),
      "layers_per_block": int(config.layers_per_block),
      "mid_block_scale_factor": 1,
      "norm_eps": float(config.norm_eps),
      "norm_num_groups": int(config.norm_num_groups),
      "out_channels": int(config.out_channels),
      "sample_size": int(sample_size),
      "transformer_layers_per_block": list(tl) if isinstance(tl, tuple) else int(tl),
      "up_block_types": list(config.up_block_types),
      "upcast_attention": bool(config.upcast_attention),
      "use_linear_projection": bool(config.use_linear_projection),
  }


def autoencoder_config_from_diffusers(config_json: Mapping[str, Any] | str | os.PathLike,
                                      **overrides) -> AutoencoderConfig:
  """Builds a config from a diffusers `AutoencoderKL` config (dict or path to config.json).

  Keys absent from the dict take diffusers' `AutoencoderKL.__init__` defaults (old SD-1.5
  configs omit e.g. `scaling_factor`). Settings this port does not implement raise ValueError.

  Args:
    config_json: the parsed config.json, or its path.
    **overrides: fields that diffusers does not record (`sample_posterior`, `remat`, ...).
  """
  if not isinstance(config_json, Mapping):
    config_json = paths.read_json(config_json)
  cfg = dict(config_json)
  class_name = cfg.get("_class_name", "AutoencoderKL")
  if class_name != "AutoencoderKL":
    raise ValueError(f"expected an AutoencoderKL config, got _class_name={class_name!r}")
  block_out_channels = tuple(cfg.get("block_out_channels", (64,)))
  n = len(block_out_channels)
  down = tuple(cfg.get("down_block_types", ("DownEncoderBlock2D",) * n))
  up = tuple(cfg.get("up_block_types", ("UpDecoderBlock2D",) * n))
  if down != ("DownEncoderBlock2D",) * n:
    raise ValueError(f"unsupported down_block_types {down}: need {n} x 'DownEncoderBlock2D'")
  if up != ("UpDecoderBlock2D",) * n:
    raise ValueError(f"unsupported up_block_types {up}: need {n} x 'UpDecoderBlock2D'")
  if cfg.get("act_fn", "silu") != "silu":
    raise ValueError(f"unsupported act_fn {cfg['act_fn']!r}: only 'silu'")
  for key in ("shift_factor", "latents_mean", "latents_std"):
    if cfg.get(key) is not None:
      raise ValueError(f"unsupported diffusers setting {key}={cfg[key]!r} (not SD-1.5 layout)")
  fields = dict(
      in_channels=int(cfg.get("in_channels", 3)),
      out_channels=int(cfg.get("out_channels", 3)),
      block_out_channels=block_out_channels,
      layers_per_block=int(cfg.get("layers_per_block", 1)),
      latent_channels=int(cfg.get("latent_channels", 4)),
      norm_num_groups=int(cfg.get("norm_num_groups", 32)),
      scaling_factor=float(cfg.get("scaling_factor", 0.18215)),
      mid_block_attention=bool(cfg.get("mid_block_add_attention", True)),
      use_quant_conv=bool(cfg.get("use_quant_conv", True)),
      use_post_quant_conv=bool(cfg.get("use_post_quant_conv", True)),
  )
  return replace_checked(AutoencoderConfig(**fields), overrides)


def vae_config_json(config: AutoencoderConfig, sample_size: int = 512) -> dict[str, Any]:
  """diffusers `config.json` for an autoencoder config (inverse of
  `autoencoder_config_from_diffusers`)."""
  if config.norm_eps != 1e-6:
    raise ConversionError(f"AutoencoderConfig.norm_eps={config.norm_eps}: diffusers' "
                          "AutoencoderKL hard-codes 1e-6, so this model has no diffusers twin")
  n = len(config.block_out_channels)
  return {
      "_class_name": "AutoencoderKL",
      "_diffusers_version": DIFFUSERS_VERSION,
      "act_fn": "silu",
      "block_out_channels": list(config.block_out_channels),
      "down_block_types": ["DownEncoderBlock2D"] * n,
      "in_channels": int(config.in_channels),
      "latent_channels": int(config.latent_channels),
      "layers_per_block": int(config.layers_per_block),
      "mid_block_add_attention": bool(config.mid_block_attention),
      "norm_num_groups": int(config.norm_num_groups),
      "out_channels": int(config.out_channels),
      "sample_size": int(sample_size),
      "scaling_factor": float(config.scaling_factor),
      "up_block_types": ["UpDecoderBlock2D"] * n,
      "use_post_quant_conv": bool(config.use_post_quant_conv),
      "use_quant_conv": bool(config.use_quant_conv),
  }


# ----- import ------------------------------------------------------------------------------------

def read_config(path: str) -> dict[str, Any]:
  """`<path>/config.json` of a model folder, with a clear error for a pipeline root."""
  if not files.is_dir(path):
    raise ConversionError(f"{path}: not a directory (expected a diffusers model folder with "
                          "config.json)")
  config_path = files.join(path, "config.json")
  if not files.is_file(config_path):
    subdirs = [d for d in ("unet", "vae", "text_encoder") if files.is_dir(files.join(path, d))]
    hint = (f"; this looks like a pipeline folder, pass one of its model folders: "
            f"{[files.join(path, d) for d in subdirs]}" if subdirs else "")
    raise ConversionError(f"{config_path}: not found{hint}")
  return files.read_json(config_path)


def model_kind(config_json: Mapping[str, Any], where: str = "config.json") -> str:
  """'unet' or 'vae' from a diffusers config's `_class_name`."""
  name = config_json.get("_class_name")
  if name in UNET_CLASSES:
    return "unet"
  if name in VAE_CLASSES:
    return "vae"
  raise ConversionError(f"{where}: _class_name {name!r} is not a supported diffusers model "
                        f"(supported: {UNET_CLASSES + VAE_CLASSES})")


def _config_from_json(kind: str, cfg: Mapping[str, Any], where: str):
  try:
    if kind == "unet":
      return denoiser_config_from_diffusers({**cfg, "_class_name": "UNet2DConditionModel"})
    return autoencoder_config_from_diffusers(dict(cfg))
  except ValueError as e:
    raise ConversionError(f"{where}: {e}") from e


def params_from_state_dict(kind: str, state_dict: Mapping[str, Any], config,
                           where: str = "state dict") -> dict:
  """UNet / VAE params from a diffusers state dict, errors prefixed with `where` (the file)."""
  try:
    if kind == "unet":
      return diffusers_unet.unet_params_from_torch(
          {k: files.to_numpy(v).astype(np.float32) for k, v in state_dict.items()}, config)
    params = diffusers_vae.vae_params_from_torch(state_dict, config)
    return _tree_to_float32(params)
  except (ValueError, KeyError) as e:
    raise ConversionError(f"{where}: {e}") from e


def _tree_to_float32(tree):
  if isinstance(tree, Mapping):
    return {k: _tree_to_float32(v) for k, v in tree.items()}
  return np.asarray(tree, np.float32)


def load_diffusers(path: str | os.PathLike, *, dtype=None, **config_overrides):
  """Reads a diffusers UNet2DConditionModel or AutoencoderKL folder.

  Args:
    path: the model folder (e.g. `stable-diffusion-v1-5/unet`), holding `config.json` and
      `diffusion_pytorch_model.safetensors` (or `.bin`, or a sharded safetensors index).
    dtype: compute dtype of the returned module (params are always float32).
    **config_overrides: fields of our config that diffusers does not record (e.g. `remat=True`,
      `sample_posterior=False`).

  Returns:
    (module, params): an `UNet2DConditionModel` or `AutoencoderKL` (Linen, NHWC) whose
    `.config` was built from config.json, and its float32 params tree (the inner
    `variables['params']`).

  Raises:
    ConversionError: wrong folder, unsupported config, missing / unexpected key or shape
      mismatch, naming the file and the key.
  """
  path = os.fspath(path)
  cfg_json = read_config(path)
  where = files.join(path, "config.json")
  kind = model_kind(cfg_json, where)
  config = _config_from_json(kind, cfg_json, where)
  if config_overrides:
    try:
      config = dataclasses.replace(config, **config_overrides)
    except TypeError as e:
      raise ConversionError(f"unknown config override: {e}") from e
  weights = files.find_weights(path, (WEIGHTS_STEM,))
  params = params_from_state_dict(kind, files.read_state_dict(weights), config, weights)
  kw = {} if dtype is None else {"dtype": dtype}
  module = (UNet2DConditionModel(config, **kw) if kind == "unet" else AutoencoderKL(config, **kw))
  return module, params


# ----- export ------------------------------------------------------------------------------------

def state_dict_from_params(config, params) -> dict[str, np.ndarray]:
  """diffusers state dict (numpy) of UNet or VAE params, by the config's type."""
  params = _tree_to_float32(_inner(params))
  try:
    if isinstance(config, DenoiserConfig):
      return diffusers_unet.unet_params_to_torch(params, config)
    if isinstance(config, AutoencoderConfig):
      return diffusers_vae.vae_params_to_torch(params, config)
  except (ValueError, KeyError) as e:
    raise ConversionError(f"params do not fit {type(config).__name__}: {e}") from e
  raise ConversionError(f"no diffusers export for {type(config).__name__}")


def _inner(params):
  from flax import linen as nn  # pylint: disable=import-outside-toplevel
  params = nn.meta.unbox(params)
  if isinstance(params, Mapping) and set(params) == {"params"}:
    params = params["params"]
  return params


def save_diffusers(path: str | os.PathLike, config, params, *,
                   class_name: str | None = None) -> str:
  """Writes a diffusers model folder: config.json + diffusion_pytorch_model.safetensors.

  Args:
    path: output folder (created).
    config: the `DenoiserConfig` or `AutoencoderConfig` of `params` (e.g. `module.config`).
    params: the params tree (inner, `{'params': ...}`, boxed or not; jax or numpy leaves).
    class_name: override `_class_name` (e.g. the original IDGBR's `UNet2DConditionNewModel`).

  Returns:
    The folder; `diffusers.UNet2DConditionModel.from_pretrained(path)` (or AutoencoderKL) loads
    it, and `load_diffusers(path)` gives back exactly `params`.
  """
  path = os.fspath(path)
  if isinstance(config, DenoiserConfig):
    cfg_json = unet_config_json(config, class_name or "UNet2DConditionModel")
  elif isinstance(config, AutoencoderConfig):
    cfg_json = vae_config_json(config)
    if class_name:
      cfg_json["_class_name"] = class_name
  else:
    raise ConversionError(f"no diffusers export for {type(config).__name__}")
  state_dict = state_dict_from_params(config, params)
  paths.makedirs(path)
  files.write_safetensors(files.join(path, WEIGHTS_STEM + ".safetensors"), state_dict)
  files.write_json(files.join(path, "config.json"), cfg_json)
  return path
