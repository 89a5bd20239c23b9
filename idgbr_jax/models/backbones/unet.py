"""U-Net (Ronneberger et al., MICCAI 2015) with BatchNorm, as in milesial/Pytorch-UNet.

Encoder: a double conv (3x3 conv + BN + ReLU, twice; padded, so no cropping) at each level and
2x2 max pooling between levels. Decoder: 2x upsampling by a 2x2 stride-2 transposed conv that
halves the channels (`upsample="transpose"`, the paper's up-conv) or by bilinear resizing that
keeps them (`upsample="bilinear"`), concatenation with the skip ([skip, up]), double conv. A 1x1
conv gives the logits. Input H and W must be divisible by 2**(len(features) - 1) (16 for base).
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
class UNetConfig:
  """U-Net channel widths per level and the upsampling kind."""
  features: tuple[int, ...] = (64, 128, 256, 512, 1024)  # level 0 (full res) .. bottleneck
  upsample: str = "transpose"                            # "transpose" or "bilinear"
  in_channels: int = 3                                   # image bands (4 for RGBIR)

  def __post_init__(self):
    if self.upsample not in ("transpose", "bilinear"):
      raise ValueError(f"UNetConfig.upsample must be 'transpose' or 'bilinear', got "
                       f"{self.upsample!r}")
    if len(self.features) < 2:
      raise ValueError(f"UNetConfig.features needs at least 2 levels, got {self.features}")

  @property
  def total_stride(self) -> int:
    return 2 ** (len(self.features) - 1)


VARIANTS: dict[str, UNetConfig] = {
    "base": UNetConfig(features=(64, 128, 256, 512, 1024)),
    "small": UNetConfig(features=(32, 64, 128, 256, 512)),
    "tiny": UNetConfig(features=(8, 16, 32)),
}


def get_config(variant: str, **overrides) -> UNetConfig:
  """Named U-Net variant with optional field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown UNet variant {variant!r}; allowed: {sorted(VARIANTS)}")
  return resnet.replace_config(VARIANTS[variant], overrides, "UNetConfig")


class DoubleConv(nn.Module):
  """(3x3 conv, no bias -> BN -> ReLU) x 2."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = resnet.ConvBN(self.features, 3, name="block0", **kw)(x, train=train)
    return resnet.ConvBN(self.features, 3, name="block1", **kw)(x, train=train)


class UpConv2x2(nn.Module):
  """Transposed conv with kernel 2, stride 2 (`torch.nn.ConvTranspose2d(c, f, 2, 2)`).

  With kernel == stride the output patches do not overlap, so it is one einsum plus a
  depth-to-space reshape. kernel[a, b, i, o] == torch_weight[i, o, a, b].
  """
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = layers.param_with_axes(
        self, "kernel", layers.torch_default_init, (2, 2, x.shape[-1], self.features),
        ("kernel_h", "kernel_w", "embed", "mlp"), self.param_dtype)
    bias = layers.param_with_axes(self, "bias", nn.initializers.zeros_init(), (self.features,),
                                  ("mlp",), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    b, h, w, _ = x.shape
    y = jnp.einsum("bhwi,pqio->bhpwqo", x, kernel)
    return y.reshape(b, 2 * h, 2 * w, self.features) + bias


class UNet(nn.Module):
  """U-Net segmenter: images [B,H,W,in_channels] -> logits [B,H,W,num_classes] (float32)."""
  config: UNetConfig
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
    resnet.check_bands("UNet", cfg.in_channels, images)
    s = cfg.total_stride
    if h % s or w % s:
      raise ValueError(f"UNet with {len(cfg.features)} levels needs H and W divisible by {s}, "
                       f"got {h}x{w}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = DoubleConv(cfg.features[0], name="down0", **kw)(images.astype(self.dtype), train=train)
    skips = [x]
    for level, f in enumerate(cfg.features[1:], start=1):
      x = nn.max_pool(x, (2, 2), strides=(2, 2))
      x = DoubleConv(f, name=f"down{level}", **kw)(x, train=train)
      skips.append(x)
    skips.pop()  # the bottleneck output is `x` itself
    for level in reversed(range(len(cfg.features) - 1)):
      skip = skips[level]
      if cfg.upsample == "transpose":
        x = UpConv2x2(cfg.features[level], name=f"upconv{level}", **kw)(x)
      else:
        x = jax.image.resize(x, skip.shape[:3] + (x.shape[-1],), "bilinear")
      x = jnp.concatenate([skip, x], axis=-1)
      x = DoubleConv(cfg.features[level], name=f"up{level}", **kw)(x, train=train)
    logits = layers.Conv(self.num_classes, 1, out_axis="classes", name="classifier", **kw)(x)
    return logits.astype(jnp.float32)  # already at input resolution
