"""SegFormer (Xie et al., NeurIPS 2021): Mix Transformer (MiT-B0..B5) encoder + all-MLP decoder.

Per stage i: overlapping patch embedding (conv k=7/s=4/p=3 for stage 1, k=3/s=2/p=1 after, then
LayerNorm), `depths[i]` blocks of x + EfficientAttention(LN(x)) and x + MixFFN(LN(x)), a final
LayerNorm. Efficient self-attention reduces keys/values by a strided conv (kernel = stride =
sr_ratio) + LayerNorm. Mix-FFN is Dense -> 3x3 depthwise conv -> GELU (exact) -> Dense.
The decoder projects each stage to `decoder_dim` with a Dense, upsamples to stride 4, concatenates
in the order (stage4, stage3, stage2, stage1), fuses with 1x1 conv (no bias) + BatchNorm + ReLU
(BatchNorm as in the reference mmseg/NVlabs/HF decoder), and classifies with a 1x1 conv.

Depths, widths, heads and ratios are those of NVlabs/SegFormer and mmseg; the decoder width is 256
for B0 and B1 and 768 for B2..B5 (paper Table 1 / NVlabs configs; 768 on B1 would add 2.5M params
and contradict the published 13.7M). Everything runs in NHWC; tokens are never flattened except
inside attention. Input H and W must be divisible by 32.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from idgbr_jax.models import layers
from idgbr_jax.models.backbones import resnet

Array = jax.Array
Dtype = Any

# NVlabs/mmseg init: Linear trunc_normal(std=0.02); Conv normal(0, sqrt(2 / fan_out)) where
# fan_out = k*k*out_channels / groups.
dense_init = nn.initializers.truncated_normal(0.02)


def conv_init(kernel_size: int, out_features: int, groups: int = 1):
  return nn.initializers.normal(math.sqrt(2.0 / (kernel_size * kernel_size * out_features
                                                 // groups)))


@dataclasses.dataclass(frozen=True)
class SegFormerConfig:
  """MiT encoder shape per stage and the decoder width."""
  embed_dims: tuple[int, ...] = (32, 64, 160, 256)
  depths: tuple[int, ...] = (2, 2, 2, 2)
  num_heads: tuple[int, ...] = (1, 2, 5, 8)
  sr_ratios: tuple[int, ...] = (8, 4, 2, 1)
  patch_sizes: tuple[int, ...] = (7, 3, 3, 3)
  strides: tuple[int, ...] = (4, 2, 2, 2)
  mlp_ratio: int = 4
  qkv_bias: bool = True
  decoder_dim: int = 256
  layer_norm_eps: float = 1e-6       # mmseg/NVlabs MiT; HF transformers uses 1e-5
  # Regularisers (mmseg trains with drop_path 0.1 and decoder dropout 0.1). Off by default; when
  # on, `apply` needs rngs={'dropout': key} in train mode.
  drop_path_rate: float = 0.0
  decoder_dropout: float = 0.0
  in_channels: int = 3               # image bands (4 for RGBIR): patch_embed1 reads them

  def __post_init__(self):
    n = len(self.embed_dims)
    for name in ("depths", "num_heads", "sr_ratios", "patch_sizes", "strides"):
      if len(getattr(self, name)) != n:
        raise ValueError(f"SegFormerConfig.{name} needs {n} entries (one per stage), got "
                         f"{getattr(self, name)}")
    for d, h in zip(self.embed_dims, self.num_heads):
      if d % h:
        raise ValueError(f"SegFormerConfig: embed dim {d} not divisible by {h} heads")

  @property
  def total_stride(self) -> int:
    """Smallest input multiple: every stage and its key/value reduction must divide evenly."""
    multiple, stride = 1, 1
    for s, r in zip(self.strides, self.sr_ratios):
      stride *= s
      multiple = math.lcm(multiple, stride * r)
    return multiple


_B1_5_DIMS = (64, 128, 320, 512)
VARIANTS: dict[str, SegFormerConfig] = {
    "b0": SegFormerConfig(),
    "b1": SegFormerConfig(embed_dims=_B1_5_DIMS, depths=(2, 2, 2, 2), decoder_dim=256),
    "b2": SegFormerConfig(embed_dims=_B1_5_DIMS, depths=(3, 4, 6, 3), decoder_dim=768),
    "b3": SegFormerConfig(embed_dims=_B1_5_DIMS, depths=(3, 4, 18, 3), decoder_dim=768),
    "b4": SegFormerConfig(embed_dims=_B1_5_DIMS, depths=(3, 8, 27, 3), decoder_dim=768),
    "b5": SegFormerConfig(embed_dims=_B1_5_DIMS, depths=(3, 6, 40, 3), decoder_dim=768),
    # Test-sized: one block per stage, 8..32 channels.
    "tiny": SegFormerConfig(embed_dims=(8, 16, 24, 32), depths=(1, 1, 1, 1),
                            num_heads=(1, 2, 2, 4), decoder_dim=16),
}


def get_config(variant: str, **overrides) -> SegFormerConfig:
  """Named SegFormer variant with optional field overrides."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown SegFormer variant {variant!r}; allowed: {sorted(VARIANTS)}")
  return resnet.replace_config(VARIANTS[variant], overrides, "SegFormerConfig")


class EfficientSelfAttention(nn.Module):
  """Multi-head self-attention whose keys/values come from a spatially reduced map."""
  num_heads: int
  sr_ratio: int
  qkv_bias: bool = True
  layer_norm_eps: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    b, h, w, c = x.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    dense = lambda name: layers.Dense(  # noqa: E731
        c, use_bias=self.qkv_bias, kernel_init=dense_init, name=name, **kw)
    head_dim = c // self.num_heads
    q = dense("query")(x).reshape(b, h * w, self.num_heads, head_dim)
    kv = x
    if self.sr_ratio > 1:
      kv = layers.Conv(c, self.sr_ratio, self.sr_ratio, 0, kernel_init=conv_init(self.sr_ratio, c),
                       name="sr", **kw)(kv)
      kv = layers.LayerNorm(self.layer_norm_eps, name="sr_norm", **kw)(kv)
    kv = kv.reshape(b, -1, c)
    k = dense("key")(kv).reshape(b, -1, self.num_heads, head_dim)
    v = dense("value")(kv).reshape(b, -1, self.num_heads, head_dim)
    y = layers.attention(q, k, v)
    y = y.reshape(b, h, w, c)
    # Output projections map the sharded hidden axis back to the model axis.
    return layers.Dense(c, kernel_init=dense_init, in_axis="mlp", out_axis="embed", name="proj",
                        **kw)(y)


class MixFFN(nn.Module):
  """Dense -> 3x3 depthwise conv (positional information) -> GELU -> Dense."""
  hidden: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    y = layers.Dense(self.hidden, kernel_init=dense_init, name="fc1", **kw)(x)
    y = layers.Conv(self.hidden, 3, feature_group_count=self.hidden, in_axis=None,
                    kernel_init=conv_init(3, self.hidden, self.hidden), name="dwconv", **kw)(y)
    y = nn.gelu(y, approximate=False)  # torch.nn.GELU() is the exact erf form
    return layers.Dense(c, kernel_init=dense_init, in_axis="mlp", out_axis="embed", name="fc2",
                        **kw)(y)


class DropPath(nn.Module):
  """Stochastic depth: drops the whole residual branch per sample (needs the 'dropout' RNG)."""
  rate: float

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    if not train or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
    return jnp.where(mask, x / keep, 0).astype(x.dtype)


class MiTBlock(nn.Module):
  """Pre-norm transformer block: efficient attention then Mix-FFN, each residual."""
  num_heads: int
  sr_ratio: int
  mlp_ratio: int
  qkv_bias: bool
  layer_norm_eps: float
  drop_path: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    y = layers.LayerNorm(self.layer_norm_eps, name="norm1", **kw)(x)
    y = EfficientSelfAttention(self.num_heads, self.sr_ratio, self.qkv_bias, self.layer_norm_eps,
                               name="attn", **kw)(y)
    x = x + DropPath(self.drop_path)(y, train=train)
    y = layers.LayerNorm(self.layer_norm_eps, name="norm2", **kw)(x)
    y = MixFFN(c * self.mlp_ratio, name="mlp", **kw)(y)
    return x + DropPath(self.drop_path)(y, train=train)


class MixTransformer(nn.Module):
  """MiT encoder returning the four stage outputs (strides 4, 8, 16, 32), NHWC."""
  config: SegFormerConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, *, train: bool) -> list[Array]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    total_blocks = sum(cfg.depths)
    block_index = 0
    outputs = []
    for i, dim in enumerate(cfg.embed_dims):
      k = cfg.patch_sizes[i]
      x = layers.Conv(dim, k, cfg.strides[i], k // 2, kernel_init=conv_init(k, dim),
                      name=f"patch_embed{i + 1}", **kw)(x)
      x = layers.LayerNorm(cfg.layer_norm_eps, name=f"patch_embed{i + 1}_norm", **kw)(x)
      for j in range(cfg.depths[i]):
        # Stochastic-depth rate grows linearly with block index, as in the reference.
        rate = cfg.drop_path_rate * block_index / max(total_blocks - 1, 1)
        x = MiTBlock(cfg.num_heads[i], cfg.sr_ratios[i], cfg.mlp_ratio, cfg.qkv_bias,
                     cfg.layer_norm_eps, rate, name=f"block{i + 1}_{j}", **kw)(x, train=train)
        block_index += 1
      x = layers.LayerNorm(cfg.layer_norm_eps, name=f"norm{i + 1}", **kw)(x)
      outputs.append(x)
    return outputs


class SegFormer(nn.Module):
  """SegFormer segmenter: images [B,H,W,in_channels] -> logits [B,H,W,num_classes]."""
  config: SegFormerConfig
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
    resnet.check_bands("SegFormer", cfg.in_channels, images)
    s = cfg.total_stride
    if h % s or w % s:
      raise ValueError(f"SegFormer needs H and W divisible by {s}, got {h}x{w}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    feats = MixTransformer(cfg, name="encoder", **kw)(images.astype(self.dtype), train=train)
    size = feats[0].shape[1:3]
    projected = []
    for i, f in enumerate(feats):
      y = layers.Dense(cfg.decoder_dim, kernel_init=dense_init, name=f"linear_c{i + 1}", **kw)(f)
      projected.append(jax.image.resize(y, (b,) + size + (cfg.decoder_dim,), "bilinear"))
    y = jnp.concatenate(projected[::-1], axis=-1)
    y = layers.Conv(cfg.decoder_dim, 1, use_bias=False, kernel_init=conv_init(1, cfg.decoder_dim),
                    name="linear_fuse", **kw)(y)
    y = layers.BatchNorm(name="linear_fuse_bn", **kw)(y, use_running_average=not train)
    y = nn.relu(y)
    y = nn.Dropout(cfg.decoder_dropout, deterministic=not train)(y)
    logits = layers.Conv(self.num_classes, 1, out_axis="classes",
                         kernel_init=conv_init(1, self.num_classes), name="classifier", **kw)(y)
    logits = logits.astype(jnp.float32)
    return jax.image.resize(logits, (b, h, w, self.num_classes), "bilinear")
