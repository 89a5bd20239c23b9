"""Stage I discriminative segmenters: U-Net, DeepLabv3+ (ResNet) and SegFormer (MiT).

Every backbone maps images [B, H, W, C] (float, any normalisation; C = the config's
`in_channels`, 3 by default, 4 for RGBIR) to float32 logits [B, H, W, num_classes] at the input
resolution:

    model = get_backbone("segformer", num_classes=6, variant="b2", dtype=jnp.bfloat16)
    variables = model.init(key, images, train=False)
    logits, updates = model.apply(variables, images, train=True, mutable=["batch_stats"])

All three use BatchNorm somewhere (U-Net and ResNet/DeepLab throughout, SegFormer in its decoder
fuse layer, as the reference does), so `init` returns a `batch_stats` collection. H and W must be
divisible by `model.total_stride` (U-Net base 16, DeepLabv3+ its output stride, SegFormer 32);
otherwise the call raises ValueError, as it does for another band count than `in_channels`.
Only the first conv (U-Net `down0/block0/conv`, ResNet `conv1`, SegFormer `patch_embed1`) sees
the bands; `idgbr_jax.convert.bands.adapt_backbone` expands 3-band weights of it to C bands.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import linen as nn

from idgbr_jax.models.backbones import deeplabv3plus, resnet, segformer, unet
from idgbr_jax.models.backbones.deeplabv3plus import DeepLabV3Plus, DeepLabV3PlusConfig
from idgbr_jax.models.backbones.resnet import ResNet, ResNetConfig
from idgbr_jax.models.backbones.segformer import SegFormer, SegFormerConfig
from idgbr_jax.models.backbones.unet import UNet, UNetConfig

# name -> (module class, config class)
BACKBONES: dict[str, tuple[type[nn.Module], type]] = {
    "unet": (UNet, UNetConfig),
    "deeplabv3plus": (DeepLabV3Plus, DeepLabV3PlusConfig),
    "segformer": (SegFormer, SegFormerConfig),
}

_CONFIG_MODULES = {"unet": unet, "deeplabv3plus": deeplabv3plus, "segformer": segformer}

# Variant used when `variant` is None: the one Stage I papers usually report.
DEFAULT_VARIANTS = {"unet": "base", "deeplabv3plus": "r50", "segformer": "b0"}


def _check_name(name: str) -> None:
  if name not in BACKBONES:
    raise ValueError(f"unknown backbone {name!r}; allowed: {sorted(BACKBONES)}")


def list_variants(name: str) -> list[str]:
  """Variant names of one backbone."""
  _check_name(name)
  return sorted(_CONFIG_MODULES[name].VARIANTS)


def get_config(name: str, variant: str | None = None, **overrides) -> Any:
  """The frozen config of `name`/`variant` with field overrides applied."""
  _check_name(name)
  return _CONFIG_MODULES[name].get_config(variant or DEFAULT_VARIANTS[name], **overrides)


def get_backbone(name: str, num_classes: int, variant: str | None = None, *,
                 dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
                 **overrides) -> nn.Module:
  """Builds a Stage I segmenter.

  Args:
    name: "unet", "deeplabv3plus" or "segformer".
    num_classes: number of output classes (logit channels).
    variant: one of `list_variants(name)`; None picks `DEFAULT_VARIANTS[name]`.
    dtype: compute dtype (e.g. jnp.bfloat16); logits are always float32.
    param_dtype: parameter dtype (float32 by default).
    **overrides: config fields to replace (e.g. output_stride=8, upsample="bilinear").

  Raises:
    ValueError: unknown name, variant or config field, or num_classes < 1.
  """
  _check_name(name)
  if num_classes < 1:
    raise ValueError(f"num_classes must be >= 1, got {num_classes}")
  module_cls, _ = BACKBONES[name]
  config = get_config(name, variant, **overrides)
  return module_cls(config=config, num_classes=int(num_classes), dtype=dtype,
                    param_dtype=param_dtype)


__all__ = [
    "BACKBONES", "DEFAULT_VARIANTS", "DeepLabV3Plus", "DeepLabV3PlusConfig", "ResNet",
    "ResNetConfig", "SegFormer", "SegFormerConfig", "UNet", "UNetConfig", "get_backbone",
    "get_config", "list_variants",
]
