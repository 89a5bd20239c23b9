"""DeepLabv3+ (Chen et al., ECCV 2018) with a ResNet encoder.

Layout follows the common PyTorch ports (VainF/DeepLabV3Plus-Pytorch, torchvision's ASPP):

* encoder: ResNet with `replace_stride_with_dilation` (False, False, True) for output stride 16,
  (False, True, True) for 8;
* ASPP on layer4: 1x1 conv, three 3x3 atrous convs (rates (6, 12, 18) at OS16, doubled at OS8)
  and image pooling (global mean -> 1x1 conv -> broadcast), each conv + BN + ReLU, then a 1x1
  projection of the concatenation;
* decoder: layer1 (stride 4) projected to 48 channels, ASPP output bilinearly upsampled to
  stride 4 and concatenated, two 3x3 conv + BN + ReLU (as in the paper's decoder), 1x1 classifier;
* logits upsampled bilinearly to the input resolution.

Input H and W must be divisible by the output stride (16 or 8).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from idgbr_jax.models import layers
from idgbr_jax.models.backbones import resnet

Array = jax.Array
Dtype = Any


@dataclasses.dataclass(frozen=True)
class DeepLabV3PlusConfig:
  """DeepLabv3+ encoder choice, output stride and head widths."""
  encoder: resnet.ResNetConfig = resnet.VARIANTS["r50"]
  output_stride: int = 16                 # 16 or 8
  aspp_features: int = 256
  aspp_rates: tuple[int, int, int] = (6, 12, 18)  # at output stride 16; doubled at 8
  low_level_features: int = 48
  decoder_features: int = 256
  decoder_convs: int = 2                  # 3x3 conv + BN + ReLU layers after the concat
  in_channels: int = 3                    # image bands (4 for RGBIR)

  def __post_init__(self):
    if isinstance(self.encoder, str):  # allow get_config(..., encoder="r101")
      object.__setattr__(self, "encoder", resnet.get_config(self.encoder))
    if self.output_stride not in (8, 16):
      raise ValueError(f"DeepLabV3PlusConfig.output_stride must be 8 or 16, got "
                       f"{self.output_stride}")

  @property
  def total_stride(self) -> int:
    return self.output_stride

  @property
  def atrous_rates(self) -> tuple[int, ...]:
    return tuple(r * 16 // self.output_stride for r in self.aspp_rates)

  @property
  def replace_stride_with_dilation(self) -> tuple[bool, bool, bool]:
    return (False, False, True) if self.output_stride == 16 else (False, True, True)


VARIANTS: dict[str, DeepLabV3PlusConfig] = {
    "r50": DeepLabV3PlusConfig(encoder=resnet.VARIANTS["r50"]),
    "r101": DeepLabV3PlusConfig(encoder=resnet.VARIANTS["r101"]),
    "r18": DeepLabV3PlusConfig(encoder=resnet.VARIANTS["r18"]),
    "tiny": DeepLabV3PlusConfig(encoder=resnet.VARIANTS["tiny"], aspp_features=16,
                                low_level_features=8, decoder_features=16),
}


def get_config(variant: str, **overrides) -> DeepLabV3PlusConfig:
  """Named DeepLabv3+ variant with optional field overrides (`encoder` may be a ResNet name)."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown DeepLabv3+ variant {variant!r}; allowed: {sorted(VARIANTS)}")
  return resnet.replace_config(VARIANTS[variant], overrides, "DeepLabV3PlusConfig")


class ASPP(nn.Module):
  """Atrous spatial pyramid pooling: 1x1, three atrous 3x3, image pooling, 1x1 projection."""
  features: int
  rates: tuple[int, ...]
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    branches = [resnet.ConvBN(self.features, 1, name="conv_1x1", **kw)(x, train=train)]
    for i, rate in enumerate(self.rates):
      branches.append(resnet.ConvBN(self.features, 3, dilation=rate, name=f"atrous_{i}", **kw)(
          x, train=train))
    pooled = jnp.mean(x, axis=(1, 2), keepdims=True)
    pooled = resnet.ConvBN(self.features, 1, name="pool", **kw)(pooled, train=train)
    # Upsampling a 1x1 map bilinearly is a broadcast.
    branches.append(jnp.broadcast_to(pooled, branches[0].shape))
    y = jnp.concatenate(branches, axis=-1)
    return resnet.ConvBN(self.features, 1, name="project", **kw)(y, train=train)


class DeepLabV3Plus(nn.Module):
  """DeepLabv3+ segmenter: images [B,H,W,in_channels] -> logits [B,H,W,num_classes]."""
  config: DeepLabV3PlusConfig
  num_classes: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def total_stride(self) -> int:
    return self.config.total_stride

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> Array:
    cfg = self.config
    b, h, w, _ = images.shape
    resnet.check_bands("DeepLabV3Plus", cfg.in_channels, images)
    s = cfg.total_stride
    if h % s or w % s:
      raise ValueError(f"DeepLabV3Plus (output_stride {s}) needs H and W divisible by {s}, "
                       f"got {h}x{w}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = resnet.ResNet(cfg.encoder, cfg.replace_stride_with_dilation, name="encoder", **kw)(
        images.astype(self.dtype), train=train)
    high = ASPP(cfg.aspp_features, cfg.atrous_rates, name="aspp", **kw)(feats["layer4"],
                                                                         train=train)
    low = resnet.ConvBN(cfg.low_level_features, 1, name="low_level_project", **kw)(
        feats["layer1"], train=train)
    high = jax.image.resize(high, (b,) + low.shape[1:3] + (high.shape[-1],), "bilinear")
    y = jnp.concatenate([low, high], axis=-1)
    for i in range(cfg.decoder_convs):
      y = resnet.ConvBN(cfg.decoder_features, 3, name=f"decoder_conv{i}", **kw)(y, train=train)
    logits = layers.Conv(self.num_classes, 1, out_axis="classes", name="classifier", **kw)(y)
    # Upsample in float32: these logits feed the loss directly.
    logits = logits.astype(jnp.float32)
    return jax.image.resize(logits, (b, h, w, self.num_classes), "bilinear")
