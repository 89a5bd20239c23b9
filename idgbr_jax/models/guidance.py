"""Conditional guidance (CG) net: the original's `InteractNet` of `DformerBlock`s.

One `GuidanceBlock` per denoiser skip tensor (12 for an SD-layout UNet) plus one for the mid
block. With C the feature channels, x the denoiser's own (noisy) features and
cond = concat[image features, coarse-map features] (2C) from the frozen encoder copy:

  res   = Conv1x1(3C -> C, bias)(concat[x, cond])                    the "zero conv" (query)
  q_tok = LN_pre_q(Conv1x1_nobias(C -> W)(res) + pos)
  k_tok = LN_pre_k(Conv1x1_nobias(2C -> W)(cond) + pos)               pos: ONE learned (HW, W)
  per layer (residual stream = the KEY tokens, not the query):
    kv = kv + MHA(LN_1q(q_tok), LN_1k(kv), LN_1v(kv))                torch nn.MultiheadAttention
    kv = kv + MLP(LN_2(kv))                                           W -> 4W QuickGELU -> W
  out   = Conv1x1_nobias(W -> C)(LN_post(kv)) + res

`init_mode="code"` reproduces the released code, which zeroes EVERY parameter of each block
(`zero_module`): then LN_post outputs 0 and the output projection is 0, so the whole attention
branch outputs 0 and receives exactly 0 gradient forever (each factor of its gradient has a zero
partner); only `res` learns. `skip_inert_attention=True` (code mode only) therefore skips that
branch's compute (the parameters still exist, for checkpoint compatibility).
`init_mode="paper"` zero-initialises only `res` and the output projection (ControlNet-style), so
the cross-attention can learn.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from idgbr_jax.models import layers
from idgbr_jax.models.repa import torch_interpolate

Dtype = Any
_INIT_MODES = ("code", "paper")


@dataclasses.dataclass(frozen=True)
class GuidanceConfig:
  """Guidance-net sizes: one (channels, grid) entry per denoiser skip, plus the mid block."""
  skip_channels: tuple[int, ...]
  mid_channels: int
  skip_resolutions: tuple[int, ...]  # grid of each block's learned positional embedding
  mid_resolution: int
  width: int = 512           # attention width W
  heads: int = 8
  mlp_ratio: int = 4
  layers: int = 1            # ResidualAttentionBlocks per guidance block
  init_mode: str = "code"    # "code": all-zero (released code); "paper": zero res + output proj
  skip_inert_attention: bool = False  # code mode only: don't compute the provably-zero branch
  attention_implementation: str | None = None  # layers.attention: None (ours), "chunked", ...

  def __post_init__(self):
    object.__setattr__(self, "skip_channels", tuple(int(c) for c in self.skip_channels))
    object.__setattr__(self, "skip_resolutions", tuple(int(r) for r in self.skip_resolutions))
    if len(self.skip_channels) != len(self.skip_resolutions):
      raise ValueError(f"skip_channels ({len(self.skip_channels)}) and skip_resolutions "
                       f"({len(self.skip_resolutions)}) need one entry per skip")
    if self.init_mode not in _INIT_MODES:
      raise ValueError(f"init_mode must be one of {_INIT_MODES}, got {self.init_mode!r}")
    if self.skip_inert_attention and self.init_mode != "code":
      raise ValueError("skip_inert_attention is only exact with init_mode='code' (all-zero "
                       "attention branch); got init_mode=" + repr(self.init_mode))
    if self.width % self.heads:
      raise ValueError(f"width {self.width} not divisible by heads {self.heads}")

  @classmethod
  def for_denoiser(cls, denoiser_block_out_channels: Sequence[int], layers_per_block: int,
                   latent_size: int, **kw) -> "GuidanceConfig":
    """Skip (channels, grid) entries of an SD-layout UNet encoder (diffusers order).

    conv_in, then per level `layers_per_block` resnet outputs and (except the last level) the
    downsampler output; the mid block sits at the last level's grid. SD-1.5 at a 64x64 latent:
    320x3@64, 320@32, 640x2@32, 640@16, 1280x2@16, 1280@8, 1280x2@8; mid 1280@8.
    """
    chans = [int(c) for c in denoiser_block_out_channels]
    res = int(latent_size)
    skip_c, skip_r = [chans[0]], [res]
    for i, c in enumerate(chans):
      skip_c += [c] * layers_per_block
      skip_r += [res] * layers_per_block
      if i < len(chans) - 1:
        res = max(1, res // 2)
        skip_c.append(c)
        skip_r.append(res)
    return cls(skip_channels=tuple(skip_c), mid_channels=chans[-1],
               skip_resolutions=tuple(skip_r), mid_resolution=res, **kw)


VARIANTS: dict[str, GuidanceConfig] = {
    # SD-1.5 denoiser at 512x512 images (64x64 latent), as the released code; the attention
    # branch is inert there, so its compute is skipped (bit-identical, see tests).
    "sd15": GuidanceConfig.for_denoiser((320, 640, 1280, 1280), 2, 64, skip_inert_attention=True),
    "sd15_paper": GuidanceConfig.for_denoiser((320, 640, 1280, 1280), 2, 64, init_mode="paper"),
    # Matches the `tiny` denoiser (4 levels x 2 layers => 12 skips).
    "tiny": GuidanceConfig.for_denoiser((32, 64, 64, 64), 2, 16, width=32, heads=4),
    "tiny_paper": GuidanceConfig.for_denoiser((32, 64, 64, 64), 2, 16, width=32, heads=4,
                                              init_mode="paper"),
}


def get_config(variant: str, **overrides) -> GuidanceConfig:
  """Returns the named variant with `overrides` applied; clear errors for unknown names."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown guidance variant {variant!r}; known: {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(GuidanceConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown GuidanceConfig fields {sorted(unknown)}; known: {sorted(fields)}")
  return dataclasses.replace(VARIANTS[variant], **overrides)


def quick_gelu(x: jax.Array) -> jax.Array:
  """CLIP's QuickGELU, x * sigmoid(1.702 x)."""
  return x * jax.nn.sigmoid(1.702 * x)


def _zeros_if(zero: bool, init):
  return nn.initializers.zeros_init() if zero else init


# torch nn.MultiheadAttention initialises its packed (3W, W) in_proj with xavier_uniform, i.e.
# bound sqrt(6 / (W + 3W)); on one (W, W) slice that is variance_scaling(0.5, fan_avg, uniform).
_mha_in_proj_init = nn.initializers.variance_scaling(0.5, "fan_avg", "uniform")


class MultiheadAttention(nn.Module):
  """torch `nn.MultiheadAttention(width, heads)` (biases on q/k/v and out) with separate q/k/v."""
  width: int
  heads: int
  zero_init: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    in_init = _zeros_if(self.zero_init, _mha_in_proj_init)
    hd = self.width // self.heads

    def proj(name, x):
      y = layers.Dense(self.width, in_axis="embed", out_axis="mlp", kernel_init=in_init,
                       name=name, **kw)(x)
      return y.reshape(*y.shape[:-1], self.heads, hd)

    out = layers.attention(proj("query", q), proj("key", k), proj("value", v),
                           implementation=self.attention_implementation)
    out = out.reshape(*out.shape[:-2], self.width)
    return layers.Dense(self.width, in_axis="mlp", out_axis="embed",
                        kernel_init=_zeros_if(self.zero_init, layers.torch_default_init),
                        name="out", **kw)(out)


class ResidualAttentionBlock(nn.Module):
  """One layer of the original's key-stream transformer (`clip.ResidualAttentionBlock`)."""
  width: int
  heads: int
  mlp_ratio: int = 4
  zero_init: bool = False
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, q: jax.Array, kv: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    z = self.zero_init
    ln = lambda name: layers.LayerNorm(
        scale_init=_zeros_if(z, nn.initializers.ones_init()), name=name, **kw)
    attn = MultiheadAttention(self.width, self.heads, zero_init=z,
                              attention_implementation=self.attention_implementation,
                              name="mha", **kw)
    kv = kv + attn(ln("ln_1q")(q), ln("ln_1k")(kv), ln("ln_1v")(kv))
    lin_init = _zeros_if(z, layers.torch_default_init)
    h = ln("ln_2")(kv)
    h = layers.Dense(self.width * self.mlp_ratio, in_axis="embed", out_axis="mlp",
                     kernel_init=lin_init, name="mlp_fc", **kw)(h)
    h = layers.Dense(self.width, in_axis="mlp", out_axis="embed", kernel_init=lin_init,
                     name="mlp_proj", **kw)(quick_gelu(h))
    return kv + h


def interpolate_pos_embedding(pos: jax.Array, base: int, grid: Sequence[int]) -> jax.Array:
  """(base*base, W) -> (gh*gw, W): torch bicubic (align_corners=False) in float32 when the grid
  differs from the configured one, as the original `_get_positional_embedding`."""
  gh, gw = int(grid[0]), int(grid[1])
  if (gh, gw) == (base, base):
    return pos
  p = pos.astype(jnp.float32).reshape(1, base, base, pos.shape[-1])
  p = torch_interpolate(p, (gh, gw), mode="bicubic")
  return p.reshape(gh * gw, pos.shape[-1]).astype(pos.dtype)


class CrossAttentionBranch(nn.Module):
  """The original's `CrossAttentionLayer` without the `+ res` (queries from res, keys from cond)."""
  out_channels: int
  resolution: int
  width: int
  heads: int
  mlp_ratio: int = 4
  layers: int = 1
  init_mode: str = "code"
  attention_implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, res: jax.Array, cond: jax.Array) -> jax.Array:
    z = self.init_mode == "code"
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, _ = res.shape
    conv_init = _zeros_if(z, layers.torch_default_init)
    # The original's init before `zero_module`: width**-0.5 * randn.
    pos = layers.param_with_axes(
        self, "pos_embedding", _zeros_if(z, nn.initializers.normal(self.width ** -0.5)),
        (self.resolution * self.resolution, self.width), ("tokens", "embed"), self.param_dtype)
    pos = interpolate_pos_embedding(pos, self.resolution, (h, w)).astype(self.dtype)
    ln = lambda name: layers.LayerNorm(
        scale_init=_zeros_if(z, nn.initializers.ones_init()), name=name, **kw)

    def tokens(x, conv_name, ln_name):
      t = layers.Conv(self.width, 1, padding=0, use_bias=False, kernel_init=conv_init,
                      name=conv_name, **kw)(x)
      return ln(ln_name)(t.reshape(b, h * w, self.width) + pos)

    q = tokens(res, "conv_q", "ln_pre_q")
    kv = tokens(cond, "conv_k", "ln_pre_k")
    for i in range(self.layers):
      kv = ResidualAttentionBlock(self.width, self.heads, self.mlp_ratio, zero_init=z,
                                  attention_implementation=self.attention_implementation,
                                  name=f"block_{i}", **kw)(q, kv)
    kv = ln("ln_post")(kv).reshape(b, h, w, self.width)
    # Zero in both modes: the branch starts as an exact no-op (code: everything is zero).
    return layers.Conv(self.out_channels, 1, padding=0, use_bias=False,
                       kernel_init=nn.initializers.zeros_init(), name="proj", **kw)(kv)


class GuidanceBlock(nn.Module):
  """res = Conv1x1(concat[x, cond]); out = res + cross-attention(queries res, keys cond)."""
  channels: int
  resolution: int
  config: GuidanceConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, cond: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if cond.shape[0] != x.shape[0]:
      cond = jnp.broadcast_to(cond, (x.shape[0],) + cond.shape[1:])
    res = layers.Conv(self.channels, 1, padding=0, kernel_init=nn.initializers.zeros_init(),
                      name="res", **kw)(jnp.concatenate([x, cond.astype(x.dtype)], axis=-1))
    # Code mode: the branch is exactly 0 with exactly 0 gradient, so skipping it changes nothing;
    # it is still built at init so the parameter tree matches the original checkpoint layout.
    if cfg.skip_inert_attention and not self.is_initializing():
      return res
    branch = CrossAttentionBranch(
        self.channels, self.resolution, cfg.width, cfg.heads, cfg.mlp_ratio, cfg.layers,
        cfg.init_mode, cfg.attention_implementation, name="attn", **kw)
    return branch(res, cond.astype(x.dtype)) + res


class GuidanceNet(nn.Module):
  """The CG net: one GuidanceBlock per denoiser skip tensor plus one for the mid block."""
  config: GuidanceConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, noisy_skips: Sequence[jax.Array], noisy_mid: jax.Array,
               img_skips: Sequence[jax.Array], img_mid: jax.Array,
               coarse_skips: Sequence[jax.Array], coarse_mid: jax.Array):
    """Residuals for the denoiser's skips and mid block.

    Args:
      noisy_skips: the denoiser's own encoder skip tensors at (z_t, t), each (B, H, W, C).
      noisy_mid: its mid-block output.
      img_skips, img_mid: frozen-encoder features of the image latent (precomputed arrays may
        be reused across sampling steps; a batch of 1 broadcasts).
      coarse_skips, coarse_mid: frozen-encoder features of the coarse-map latent.

    Returns:
      (tuple of per-skip residuals, mid residual), shapes as the noisy inputs.
    """
    cfg = self.config
    n = len(cfg.skip_channels)
    for name, seq in (("noisy_skips", noisy_skips), ("img_skips", img_skips),
                      ("coarse_skips", coarse_skips)):
      if len(seq) != n:
        raise ValueError(f"{name} has {len(seq)} tensors, config has {n} skips")
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    outs = []
    for i, (x, fi, fc) in enumerate(zip(noisy_skips, img_skips, coarse_skips)):
      if x.shape[-1] != cfg.skip_channels[i]:
        raise ValueError(f"skip {i} has {x.shape[-1]} channels, config says "
                         f"{cfg.skip_channels[i]}")
      block = GuidanceBlock(cfg.skip_channels[i], cfg.skip_resolutions[i], name=f"skip_{i}", **kw)
      outs.append(block(x, jnp.concatenate([fi, fc], axis=-1)))
    mid = GuidanceBlock(cfg.mid_channels, cfg.mid_resolution, name="mid", **kw)(
        noisy_mid, jnp.concatenate([img_mid, coarse_mid], axis=-1))
    return tuple(outs), mid
