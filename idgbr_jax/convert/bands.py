"""Adapt 3-band (RGB) pretrained weights to C-band (e.g. RGBIR) input.

The rule for a first conv (the kernel algebra is `models.autoencoder.expand_input_kernel`):
with W_c the kernel of RGB band c and E = C - 3 extra bands,

    extra band kernel  V   = mean_c W_c
    RGB band kernel    W'_c = W_c - (E / 3) V

so y' = sum_c W_c x_c + V * sum_e (x_e - mean_c x_c): the output is exactly the 3-band output
whenever every extra band equals the mean of the RGB bands (at the conv's input, i.e. after
normalisation), a grey image in particular, and an extra band enters through how far it departs
from the RGB mean (for NIR: vegetation is bright, water dark). Biases are unchanged.

* `adapt_backbone(variables, name, channels)`: a Stage I segmenter's variables (e.g. from
  `segformer_hf.segformer_params_from_hf`) with its first conv expanded;
* `adapt_autoencoder_checkpoint(src, dst, channels)`: a 3-band autoencoder params checkpoint
  (e.g. converted SD-1.5) rewritten with the C-band image stem Stage II uses
  (`models.autoencoder.with_image_stem`). Stage II does the same on load when
  `config.init.autoencoder` is 3-band and `config.data.in_channels` is not, so this is only
  needed to keep an adapted copy.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from flax import traverse_util

from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.convert.files import ConversionError
from idgbr_jax.models import autoencoder

# Backbone name -> path (under 'params') of the conv that reads the image.
FIRST_CONV: dict[str, tuple[str, ...]] = {
    "unet": ("down0", "block0", "conv", "kernel"),
    "deeplabv3plus": ("encoder", "conv1", "kernel"),
    "segformer": ("encoder", "patch_embed1", "kernel"),
}


def adapt_first_conv(params: Any, path: Sequence[str], channels: int,
                     rgb_bands: Sequence[int] = autoencoder.RGB_BANDS) -> Any:
  """`params` (a nested dict, numpy or jax leaves) with the HWIO kernel at `path` expanded from
  3 input bands to `channels` (see the module doc); other leaves are shared, not copied."""
  flat = traverse_util.flatten_dict(dict(params))
  path = tuple(path)
  if path not in flat:
    raise ConversionError(f"no first-conv kernel at {'/'.join(path)}; params have "
                          f"{sorted('/'.join(k) for k in flat)[:8]}...")
  flat[path] = autoencoder.expand_input_kernel(np.asarray(flat[path]), channels, rgb_bands)
  return traverse_util.unflatten_dict(flat)


def adapt_backbone(variables: dict[str, Any], name: str, channels: int,
                   rgb_bands: Sequence[int] = autoencoder.RGB_BANDS) -> dict[str, Any]:
  """Stage I variables {'params', ['batch_stats']} of backbone `name` taking 3 bands -> the same
  network taking `channels` bands (build it with `in_channels=channels`)."""
  if name not in FIRST_CONV:
    raise ConversionError(f"unknown backbone {name!r}; known: {sorted(FIRST_CONV)}")
  out = dict(variables)
  out["params"] = adapt_first_conv(variables["params"], FIRST_CONV[name], channels, rgb_bands)
  return out


def adapt_autoencoder_checkpoint(src: str, dst: str, channels: int,
                                 rgb_bands: Sequence[int] = autoencoder.RGB_BANDS) -> str:
  """Writes to `dst` the autoencoder params checkpoint `src` (3-band, no image stem) with an
  image stem for `channels` bands; returns `dst`."""
  meta = params_ckpt.load_meta(src)
  if meta.get("kind") != "autoencoder":
    raise ConversionError(f"{src} holds a {meta.get('kind')!r} checkpoint, expected "
                          "'autoencoder'")
  fields = {f.name for f in dataclasses.fields(autoencoder.AutoencoderConfig)}
  cfg = autoencoder.AutoencoderConfig(**{
      k: tuple(v) if isinstance(v, list) else v for k, v in meta["config"].items()
      if k in fields})
  if cfg.has_image_stem:
    raise ConversionError(f"{src} already has an image stem for {cfg.image_channels} bands")
  cfg = dataclasses.replace(cfg, image_channels=int(channels))
  params = autoencoder.with_image_stem(params_ckpt.load_params(src), cfg, rgb_bands)
  new_meta = {**meta, "config": dataclasses.asdict(cfg),
              "adapted_from": {"checkpoint": str(src), "rgb_bands": [int(b) for b in rgb_bands]}}
  return params_ckpt.save_params(dst, params, new_meta)
