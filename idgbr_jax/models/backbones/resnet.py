"""ResNet-18/34/50/101 encoders (torchvision "v1.5" layout) for DeepLabv3+.

The encoder returns every stage's feature map so that a segmentation head can pick the stride-4
low-level features and the deepest features. `replace_stride_with_dilation` follows torchvision:
a stage that is dilated keeps its input resolution and multiplies the dilation of its 3x3 convs
by the stride it gave up, which is how DeepLab reaches output stride 16 or 8.

Submodule names mirror torchvision's state-dict keys (`conv1`, `bn1`, `layer3_5.conv2`,
`layer2_0.downsample_conv`, ...) so a converter can map weights one to one.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from idgbr_jax.models import layers

Array = jax.Array
Dtype = Any

# torchvision initialises ResNet convs with kaiming_normal(mode='fan_out', relu); it trains
# noticeably better from scratch than PyTorch's default uniform init.
kaiming_fan_out = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """ResNet depth and widths."""
  block: str = "bottleneck"                      # "basic" (R18/34) or "bottleneck" (R50/101)
  stage_sizes: tuple[int, ...] = (3, 4, 6, 3)    # residual blocks per stage
  widths: tuple[int, ...] = (64, 128, 256, 512)  # 3x3-conv width per stage (bottleneck out = 4x)
  stem_features: int = 64

  def __post_init__(self):
    if self.block not in ("basic", "bottleneck"):
      raise ValueError(f"ResNetConfig.block must be 'basic' or 'bottleneck', got {self.block!r}")
    if len(self.stage_sizes) != 4 or len(self.widths) != 4:
      raise ValueError("ResNetConfig needs exactly 4 stage_sizes and 4 widths, got "
                       f"{self.stage_sizes} and {self.widths}")

  @property
  def expansion(self) -> int:
    return 4 if self.block == "bottleneck" else 1

  @property
  def out_features(self) -> tuple[int, ...]:
    """Channels of layer1..layer4 outputs."""
    return tuple(w * self.expansion for w in self.widths)


VARIANTS: dict[str, ResNetConfig] = {
    "r18": ResNetConfig(block="basic", stage_sizes=(2, 2, 2, 2)),
    "r34": ResNetConfig(block="basic", stage_sizes=(3, 4, 6, 3)),
    "r50": ResNetConfig(block="bottleneck", stage_sizes=(3, 4, 6, 3)),
    "r101": ResNetConfig(block="bottleneck", stage_sizes=(3, 4, 23, 3)),
    # Test-sized: one basic block per stage, 8..32 channels.
    "tiny": ResNetConfig(block="basic", stage_sizes=(1, 1, 1, 1), widths=(8, 16, 24, 32),
                         stem_features=8),
}


def replace_config(config, overrides: dict, what: str):
  """`dataclasses.replace` that names unknown fields (shared by the backbone configs)."""
  allowed = [f.name for f in dataclasses.fields(config)]
  unknown = sorted(set(overrides) - set(allowed))
  if unknown:
    raise ValueError(f"unknown {what} field(s) {unknown}; allowed: {allowed}")
  return dataclasses.replace(config, **overrides)


def check_bands(name: str, in_channels: int, images) -> None:
  """Raises ValueError naming `in_channels` when `images` (B,H,W,C) have another band count."""
  if images.shape[-1] != in_channels:
    raise ValueError(f"{name} was built for in_channels={in_channels} image bands, got "
                     f"{images.shape[-1]} (input shape {tuple(images.shape)}); set "
                     "config.data.in_channels to the dataset's band count")


def get_config(variant: str, **overrides) -> ResNetConfig:
  """Named ResNet variant with optional field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown ResNet variant {variant!r}; allowed: {sorted(VARIANTS)}")
  return replace_config(VARIANTS[variant], overrides, "ResNetConfig")


class ConvBN(nn.Module):
  """Bias-free conv + BatchNorm (+ ReLU): the unit every CNN backbone here is built from."""
  features: int
  kernel_size: int = 3
  strides: int = 1
  dilation: int = 1
  relu: bool = True
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    x = layers.Conv(self.features, self.kernel_size, self.strides, use_bias=False,
                    kernel_dilation=self.dilation, kernel_init=kaiming_fan_out, dtype=self.dtype,
                    param_dtype=self.param_dtype, name="conv")(x)
    x = layers.BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn")(
        x, use_running_average=not train)
    return nn.relu(x) if self.relu else x


class ResidualBlock(nn.Module):
  """BasicBlock (two 3x3) or Bottleneck (1x1-3x3-1x1, stride on the 3x3 as in torchvision)."""
  block: str
  width: int
  strides: int = 1
  dilation: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    conv = lambda f, k, s, d, name: layers.Conv(  # noqa: E731
        f, k, s, use_bias=False, kernel_dilation=d, kernel_init=kaiming_fan_out, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name)
    bn = lambda name: layers.BatchNorm(  # noqa: E731
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    ura = not train
    if self.block == "basic":
      out_features = self.width
      y = nn.relu(bn("bn1")(conv(self.width, 3, self.strides, self.dilation, "conv1")(x),
                            use_running_average=ura))
      y = bn("bn2")(conv(self.width, 3, 1, self.dilation, "conv2")(y), use_running_average=ura)
    else:
      out_features = self.width * 4
      y = nn.relu(bn("bn1")(conv(self.width, 1, 1, 1, "conv1")(x), use_running_average=ura))
      y = nn.relu(bn("bn2")(conv(self.width, 3, self.strides, self.dilation, "conv2")(y),
                            use_running_average=ura))
      y = bn("bn3")(conv(out_features, 1, 1, 1, "conv3")(y), use_running_average=ura)
    if self.strides != 1 or x.shape[-1] != out_features:
      x = bn("downsample_bn")(conv(out_features, 1, self.strides, 1, "downsample_conv")(x),
                              use_running_average=ura)
    return nn.relu(x + y)


class ResNet(nn.Module):
  """ResNet encoder returning {'layer1'..'layer4'} feature maps (strides 4, 8, 16, 32 undilated)."""
  config: ResNetConfig
  # One flag per stage 2..4, as torchvision's `replace_stride_with_dilation`.
  replace_stride_with_dilation: tuple[bool, bool, bool] = (False, False, False)
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def total_stride(self) -> int:
    return 32 // 2 ** sum(bool(r) for r in self.replace_stride_with_dilation)

  @nn.compact
  def __call__(self, images: Array, *, train: bool) -> dict[str, Array]:
    cfg = self.config
    x = layers.Conv(cfg.stem_features, 7, 2, 3, use_bias=False, kernel_init=kaiming_fan_out,
                    dtype=self.dtype, param_dtype=self.param_dtype, name="conv1")(images)
    x = layers.BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="bn1")(
        x, use_running_average=not train)
    x = nn.relu(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    features = {}
    dilation = 1
    for stage, (num_blocks, width) in enumerate(zip(cfg.stage_sizes, cfg.widths)):
      strides = 1 if stage == 0 else 2
      previous_dilation = dilation
      if stage > 0 and self.replace_stride_with_dilation[stage - 1]:
        dilation *= strides
        strides = 1
      for i in range(num_blocks):
        # torchvision gives the first block of a newly dilated stage the *previous* dilation.
        block = ResidualBlock(cfg.block, width, strides if i == 0 else 1,
                              previous_dilation if i == 0 else dilation, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=f"layer{stage + 1}_{i}")
        x = block(x, train=train)
      features[f"layer{stage + 1}"] = x
    return features
