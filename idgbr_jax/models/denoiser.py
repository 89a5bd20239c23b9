"""Stage II denoiser: the SD-1.5-layout `UNet2DConditionModel` (diffusers parity), NHWC, Linen.

IDGBR fine-tunes a full SD-1.5 UNet ("unet_gen") and adds its Conditional-Guidance residuals to
the 12 skip tensors and to the mid-block output, ControlNet-style (dossier §1.1, §1.4). The
original runs the UNet encoder twice per step (once for the guidance features, once inside the
full forward). This module exposes the two halves so the encoder runs once:

    skips, mid = model.apply(v, z_t, t, ctx, method=UNet2DConditionModel.encode)
    down_res, mid_res = cg_net(skips, mid, ...)            # guidance residuals from f_noise
    eps = model.apply(v, skips, mid, t, ctx, down_res, mid_res, method=UNet2DConditionModel.decode)

`model.apply(v, z_t, t, ctx, down_res, mid_res)` (`__call__`) is exactly that encode + decode.
The encoder is deterministic (no dropout), so using its output twice gives the same gradients as
the original's two encoder passes.
`encode` only touches the parameters listed in `ENCODER_PARAM_KEYS` (conv_in, time embedding, down
blocks, mid block), so it also runs the frozen "unet_ori" copy from `encoder_params(params)` alone.

Parameter names mirror diffusers' state-dict keys with `.N.` folded into `_N`
(`down_blocks.0.resnets.1.conv1.weight` -> `down_blocks_0/resnets_1/conv1/kernel`); see
`idgbr_jax.convert.diffusers_unet`.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idgbr_jax.models import layers

Array = jax.Array
Dtype = Any

CROSS_ATTN_DOWN = "CrossAttnDownBlock2D"
PLAIN_DOWN = "DownBlock2D"
CROSS_ATTN_UP = "CrossAttnUpBlock2D"
PLAIN_UP = "UpBlock2D"
_DOWN_TYPES = (CROSS_ATTN_DOWN, PLAIN_DOWN)
_UP_TYPES = (CROSS_ATTN_UP, PLAIN_UP)

# Top-level params the encoder half (conv_in + time embedding + down blocks + mid) reads. The frozen
# "unet_ori" copy keeps only these.
ENCODER_PARAM_KEYS = ("conv_in", "time_embedding", "down_blocks_*", "mid_block")

_IMAGE_AXES = ("batch", "height", "width", "channels")
_TOKEN_AXES = ("batch", "length", "channels")


def _as_tuple(value, n: int, name: str) -> tuple:
  if isinstance(value, (list, tuple)):
    if len(value) != n:
      raise ValueError(f"{name} has {len(value)} entries, expected one per block ({n})")
    return tuple(value)
  return (value,) * n


@dataclasses.dataclass(frozen=True)
class DenoiserConfig:
  """Architecture of the denoiser UNet (field names follow diffusers' `config.json` where possible).

  Attributes:
    in_channels: latent channels in.
    out_channels: channels out (the epsilon prediction).
    block_out_channels: channels per resolution level.
    layers_per_block: resnets per down block (up blocks have one more).
    down_block_types: per level, "CrossAttnDownBlock2D" or "DownBlock2D".
    up_block_types: per level (deepest first), "CrossAttnUpBlock2D" or "UpBlock2D".
    num_heads: attention heads per level (int = same everywhere). NOTE diffusers' SD-1.x
      `attention_head_dim: 8` is really the number of heads (diffusers issue #2011); the head width
      is channels // num_heads. The mid block uses the last entry.
    cross_attention_dim: width of the text context.
    norm_num_groups: GroupNorm groups (resnets, Transformer2D input norm, output norm).
    norm_eps: GroupNorm eps in resnets and the output norm (Transformer2D's GroupNorm uses 1e-6,
      its LayerNorms 1e-5, as in diffusers).
    flip_sin_to_cos: timestep embedding order cos|sin (True for SD).
    freq_shift: `downscale_freq_shift` of the sinusoidal embedding (0 for SD).
    use_linear_projection: Transformer2D proj_in/out as Dense (SD-2) instead of 1x1 conv (SD-1).
    transformer_layers_per_block: BasicTransformerBlocks per attention (int or per level).
    upcast_attention: run q/k/v and the attention in float32 even under bf16 compute.
    attention_implementation: `layers.attention`'s implementation (None: ours, fastest on CPU;
      "chunked": ours over blocks of queries, for long sequences; "xla" / "cudnn":
      `jax.nn.dot_product_attention`).
    remat: gradient-checkpoint every down/mid/up block.
  """
  in_channels: int = 4
  out_channels: int = 4
  block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
  layers_per_block: int = 2
  down_block_types: tuple[str, ...] = (CROSS_ATTN_DOWN,) * 3 + (PLAIN_DOWN,)
  up_block_types: tuple[str, ...] = (PLAIN_UP,) + (CROSS_ATTN_UP,) * 3
  num_heads: int | tuple[int, ...] = 8
  cross_attention_dim: int = 768
  norm_num_groups: int = 32
  norm_eps: float = 1e-5
  flip_sin_to_cos: bool = True
  freq_shift: float = 0
  use_linear_projection: bool = False
  transformer_layers_per_block: int | tuple[int, ...] = 1
  upcast_attention: bool = False
  attention_implementation: str | None = None
  remat: bool = False

  def __post_init__(self):
    # Lists (e.g. from JSON) become tuples so the config stays hashable.
    for name in ("block_out_channels", "down_block_types", "up_block_types", "num_heads",
                 "transformer_layers_per_block"):
      value = getattr(self, name)
      if isinstance(value, list):
        object.__setattr__(self, name, tuple(value))
    n = len(self.block_out_channels)
    if len(self.down_block_types) != n or len(self.up_block_types) != n:
      raise ValueError(f"need one down and one up block type per level ({n}); got "
                       f"{self.down_block_types} / {self.up_block_types}")
    for t in self.down_block_types:
      if t not in _DOWN_TYPES:
        raise ValueError(f"unsupported down block type {t!r}; supported: {_DOWN_TYPES}")
    for t in self.up_block_types:
      if t not in _UP_TYPES:
        raise ValueError(f"unsupported up block type {t!r}; supported: {_UP_TYPES}")
    heads = self.heads_per_level
    _as_tuple(self.transformer_layers_per_block, n, "transformer_layers_per_block")
    for c, h in zip(self.block_out_channels, heads):
      if c % self.norm_num_groups:
        raise ValueError(f"channels {c} not divisible by norm_num_groups {self.norm_num_groups}")
      if c % h:
        raise ValueError(f"channels {c} not divisible by num_heads {h}")
    if self.attention_implementation not in layers.ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention_implementation must be one of "
                       f"{layers.ATTENTION_IMPLEMENTATIONS}, got {self.attention_implementation!r}")

  @property
  def heads_per_level(self) -> tuple[int, ...]:
    return _as_tuple(self.num_heads, len(self.block_out_channels), "num_heads")

  @property
  def transformer_layers_per_level(self) -> tuple[int, ...]:
    return _as_tuple(self.transformer_layers_per_block, len(self.block_out_channels),
                     "transformer_layers_per_block")

  @property
  def time_embed_dim(self) -> int:
    return 4 * self.block_out_channels[0]

  @property
  def skip_channels(self) -> tuple[int, ...]:
    """Channels of the skip tensors returned by `encode` (diffusers' down_block_res_samples)."""
    chans = [self.block_out_channels[0]]
    last = len(self.block_out_channels) - 1
    for i, c in enumerate(self.block_out_channels):
      chans += [c] * self.layers_per_block
      if i != last:
        chans.append(c)
    return tuple(chans)

  @property
  def skip_downscale(self) -> tuple[int, ...]:
    """Spatial downscale factor of each skip tensor relative to the input latent."""
    factors = [1]
    last = len(self.block_out_channels) - 1
    for i in range(len(self.block_out_channels)):
      factors += [2 ** i] * self.layers_per_block
      if i != last:
        factors.append(2 ** (i + 1))
    return tuple(factors)

  @property
  def mid_channels(self) -> int:
    return self.block_out_channels[-1]

  def skip_shapes(self, height: int, width: int) -> tuple[tuple[int, int, int], ...]:
    """(h, w, channels) of each skip tensor for a (height, width) latent; the last one is also
    the mid block's shape. Odd sizes round up at each downsampler (stride-2 conv, padding 1)."""
    shapes, h, w = [], height, width
    shapes.append((h, w, self.block_out_channels[0]))
    last = len(self.block_out_channels) - 1
    for i, c in enumerate(self.block_out_channels):
      shapes += [(h, w, c)] * self.layers_per_block
      if i != last:
        h, w = -(-h // 2), -(-w // 2)
        shapes.append((h, w, c))
    return tuple(shapes)


VARIANTS: dict[str, DenoiserConfig] = {
    # Exactly SD-1.5's unet/config.json.
    "sd15": DenoiserConfig(),
    # Same 4-level / 2-layer layout (so still 12 skips) at test size.
    "tiny": DenoiserConfig(block_out_channels=(32, 64, 64, 64), num_heads=2, cross_attention_dim=32,
                           norm_num_groups=8),
}


def get_config(variant: str, **overrides) -> DenoiserConfig:
  """Returns the named variant with `overrides` applied; clear errors for unknown names."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown denoiser variant {variant!r}; known: {sorted(VARIANTS)}")
  fields = {f.name for f in dataclasses.fields(DenoiserConfig)}
  unknown = set(overrides) - fields
  if unknown:
    raise ValueError(f"unknown DenoiserConfig fields {sorted(unknown)}; known: {sorted(fields)}")
  return dataclasses.replace(VARIANTS[variant], **overrides)


def encoder_params(params: Mapping[str, Any]) -> dict[str, Any]:
  """The subset of a UNet params tree that `encode` reads (what the frozen unet_ori keeps).

  Accepts either the inner params dict or `{'params': ...}` and returns the same form.
  """
  if set(params) == {"params"}:
    return {"params": encoder_params(params["params"])}
  return {k: v for k, v in params.items() if _is_encoder_key(k)}


def _is_encoder_key(key: str) -> bool:
  return key in ("conv_in", "time_embedding", "mid_block") or key.startswith("down_blocks_")


def timestep_embedding(timesteps: Array, dim: int, flip_sin_to_cos: bool = True,
                       freq_shift: float = 0, max_period: float = 10000.0) -> Array:
  """Sinusoidal timestep embedding, float32, identical to diffusers' `get_timestep_embedding`."""
  half = dim // 2
  exponent = -math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift)
  angles = timesteps.astype(jnp.float32)[:, None] * jnp.exp(exponent)[None, :]
  emb = jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
  if flip_sin_to_cos:
    emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
  if dim % 2:
    emb = jnp.pad(emb, ((0, 0), (0, 1)))
  return emb


def _resize_nearest(x: Array, size: tuple[int, int]) -> Array:
  """`F.interpolate(mode='nearest')` to `size` (src index = floor(dst * in / out))."""
  h, w = x.shape[1:3]
  if size == (2 * h, 2 * w):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
  rows = np.minimum(np.floor(np.arange(size[0]) * np.float32(h / size[0])), h - 1).astype(np.int32)
  cols = np.minimum(np.floor(np.arange(size[1]) * np.float32(w / size[1])), w - 1).astype(np.int32)
  return jnp.take(jnp.take(x, rows, axis=1), cols, axis=2)


class TimestepEmbedding(nn.Module):
  """Timestep MLP: Dense -> SiLU -> Dense."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, emb: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    emb = layers.Dense(self.features, name="linear_1", **kw)(emb)
    return layers.Dense(self.features, name="linear_2", **kw)(nn.silu(emb))


class ResnetBlock2D(nn.Module):
  """diffusers ResnetBlock2D: GN-SiLU-conv, + time projection, GN-SiLU-conv, residual."""
  out_channels: int
  groups: int
  eps: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = nn.silu(layers.GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
    h = layers.Conv(self.out_channels, 3, padding=1, name="conv1", **kw)(h)
    t = layers.Dense(self.out_channels, name="time_emb_proj", **kw)(nn.silu(temb))
    h = h + t[:, None, None, :]
    h = nn.silu(layers.GroupNorm(self.groups, self.eps, name="norm2", **kw)(h))
    h = layers.Conv(self.out_channels, 3, padding=1, name="conv2", **kw)(h)
    if x.shape[-1] != self.out_channels:
      x = layers.Conv(self.out_channels, 1, padding=0, name="conv_shortcut", **kw)(x)
    return x.astype(h.dtype) + h


class Attention(nn.Module):
  """Multi-head (self or cross) attention: to_q/to_k/to_v without bias, to_out_0 with bias."""
  heads: int
  head_dim: int
  upcast: bool = False
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array | None = None) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    context = x if context is None else context
    inner = self.heads * self.head_dim
    proj = lambda name: layers.Dense(inner, use_bias=False, in_axis="embed", out_axis="heads",
                                     name=name, **kw)
    q, k, v = proj("to_q")(x), proj("to_k")(context), proj("to_v")(context)
    split = lambda t: t.reshape(t.shape[:2] + (self.heads, self.head_dim))
    q, k, v = split(q), split(k), split(v)
    if self.upcast:
      q, k, v = (t.astype(jnp.float32) for t in (q, k, v))
    out = layers.attention(q, k, v, implementation=self.implementation)
    out = out.reshape(out.shape[:2] + (inner,)).astype(self.dtype)
    return layers.Dense(x.shape[-1], in_axis="heads", out_axis="embed", name="to_out_0", **kw)(out)


class GEGLU(nn.Module):
  """GEGLU input projection of the feed-forward: value * gelu(gate) (exact erf GELU)."""
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    h = layers.Dense(2 * self.features, in_axis="embed", out_axis="mlp", name="proj",
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)
    value, gate = jnp.split(h, 2, axis=-1)
    return value * jax.nn.gelu(gate, approximate=False)


class FeedForward(nn.Module):
  """Transformer feed-forward: GEGLU (net_0) then Dense back to the model width (net_2)."""
  mult: int = 4
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = GEGLU(self.mult * x.shape[-1], name="net_0", **kw)(x)
    return layers.Dense(x.shape[-1], in_axis="mlp", out_axis="embed", name="net_2", **kw)(h)


def _constrain_tokens(x: Array) -> Array:
  """Pins (B, L, C) token states to logical ('batch', 'length', 'channels').

  A no-op unless `nn.logical_axis_rules` are active. Measured on jax 0.10.2 / CPU with 8 fake
  devices: on a (data 2, fsdp 2, tensor 2) mesh with batch 4 (one example per data shard), an
  unconstrained conv -> reshape -> self-attention -> residual chain came out up to 65% wrong.
  """
  return nn.with_logical_constraint(x, _TOKEN_AXES)


class BasicTransformerBlock(nn.Module):
  """Pre-LN transformer block: self-attention, cross-attention to the context, GEGLU MLP."""
  heads: int
  head_dim: int
  upcast: bool = False
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(heads=self.heads, head_dim=self.head_dim, upcast=self.upcast,
                implementation=self.implementation, **kw)
    # Token states are pinned to (batch-sharded, channels replicated) after every residual: without
    # it XLA's SPMD partitioner has produced wrong values on a data x fsdp x tensor mesh with one
    # example per data shard (see _constrain_tokens).
    x = _constrain_tokens(x)
    x = _constrain_tokens(
        x + Attention(name="attn1", **attn)(layers.LayerNorm(1e-5, name="norm1", **kw)(x)))
    x = _constrain_tokens(
        x + Attention(name="attn2", **attn)(layers.LayerNorm(1e-5, name="norm2", **kw)(x), context))
    return _constrain_tokens(
        x + FeedForward(name="ff", **kw)(layers.LayerNorm(1e-5, name="norm3", **kw)(x)))


class Transformer2DModel(nn.Module):
  """Spatial transformer: GN(1e-6) -> proj_in -> transformer blocks on tokens -> proj_out, +x."""
  heads: int
  groups: int
  num_layers: int = 1
  use_linear_projection: bool = False
  upcast: bool = False
  implementation: str | None = None
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, context: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, c = x.shape
    # 1x1 conv and Dense are the same map in NHWC; only the stored kernel shape differs (SD-1 vs 2).
    project = ((lambda name: layers.Dense(c, name=name, **kw)) if self.use_linear_projection else
               (lambda name: layers.Conv(c, 1, padding=0, name=name, **kw)))
    y = layers.GroupNorm(self.groups, 1e-6, name="norm", **kw)(x)
    y = project("proj_in")(y)
    y = nn.with_logical_constraint(y.reshape(b, h * w, c), _TOKEN_AXES)
    for i in range(self.num_layers):
      y = BasicTransformerBlock(self.heads, c // self.heads, self.upcast, self.implementation,
                                name=f"transformer_blocks_{i}", **kw)(y, context)
    y = project("proj_out")(y.reshape(b, h, w, c))
    return y + x.astype(y.dtype)


def _attention(cfg: DenoiserConfig, level: int, name: str, dtype,
               param_dtype) -> Transformer2DModel:
  return Transformer2DModel(
      heads=cfg.heads_per_level[level], groups=cfg.norm_num_groups,
      num_layers=cfg.transformer_layers_per_level[level],
      use_linear_projection=cfg.use_linear_projection, upcast=cfg.upcast_attention,
      implementation=cfg.attention_implementation, name=name, dtype=dtype, param_dtype=param_dtype)


class Downsample2D(nn.Module):
  """Strided 3x3 conv, stride 2, symmetric padding 1 (PyTorch semantics for odd sizes)."""
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    return layers.Conv(self.channels, 3, strides=2, padding=1, name="conv", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)


class Upsample2D(nn.Module):
  """Nearest-neighbour upsampling (x2, or to `size`) followed by a 3x3 conv."""
  channels: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, size: tuple[int, int]) -> Array:
    return layers.Conv(self.channels, 3, padding=1, name="conv", dtype=self.dtype,
                       param_dtype=self.param_dtype)(_resize_nearest(x, size))


class DownBlock(nn.Module):
  """One encoder level (CrossAttnDownBlock2D or DownBlock2D); returns (h, skip tensors)."""
  config: DenoiserConfig
  level: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array) -> tuple[Array, tuple[Array, ...]]:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels = cfg.block_out_channels[self.level]
    has_attn = cfg.down_block_types[self.level] == CROSS_ATTN_DOWN
    skips = []
    for i in range(cfg.layers_per_block):
      x = ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{i}", **kw)(
          x, temb)
      if has_attn:
        x = _attention(cfg, self.level, f"attentions_{i}", **kw)(x, context)
      x = nn.with_logical_constraint(x, _IMAGE_AXES)
      skips.append(x)
    if self.level != len(cfg.block_out_channels) - 1:
      x = Downsample2D(channels, name="downsamplers_0", **kw)(x)
      x = nn.with_logical_constraint(x, _IMAGE_AXES)
      skips.append(x)
    return x, tuple(skips)


class MidBlock(nn.Module):
  """UNetMidBlock2DCrossAttn: resnet, (attention, resnet)."""
  config: DenoiserConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, temb: Array, context: Array) -> Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    channels, level = cfg.block_out_channels[-1], len(cfg.block_out_channels) - 1
    x = ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_0", **kw)(x, temb)
    x = _attention(cfg, level, "attentions_0", **kw)(x, context)
    x = ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps, name="resnets_1", **kw)(x, temb)
    return nn.with_logical_constraint(x, _IMAGE_AXES)


class UpBlock(nn.Module):
  """One decoder level (CrossAttnUpBlock2D or UpBlock2D); `index` counts from the deepest level."""
  config: DenoiserConfig
  index: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array, skips: tuple[Array, ...], temb: Array, context: Array,
               upsample_size: tuple[int, int] | None) -> Array:
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    level = len(cfg.block_out_channels) - 1 - self.index
    channels = cfg.block_out_channels[level]
    has_attn = cfg.up_block_types[self.index] == CROSS_ATTN_UP
    skips = list(skips)
    for i in range(cfg.layers_per_block + 1):
      skip = skips.pop()
      x = jnp.concatenate([x, skip.astype(x.dtype)], axis=-1)
      x = ResnetBlock2D(channels, cfg.norm_num_groups, cfg.norm_eps, name=f"resnets_{i}", **kw)(
          x, temb)
      if has_attn:
        x = _attention(cfg, level, f"attentions_{i}", **kw)(x, context)
    if upsample_size is not None:
      x = Upsample2D(channels, name="upsamplers_0", **kw)(x, upsample_size)
    return nn.with_logical_constraint(x, _IMAGE_AXES)


def _broadcast_timesteps(timesteps, batch: int) -> Array:
  t = jnp.asarray(timesteps)
  if t.ndim == 0:
    t = t[None]
  if t.ndim != 1:
    raise ValueError(f"timesteps must be a scalar or (B,), got shape {t.shape}")
  return jnp.broadcast_to(t, (batch,))


class UNet2DConditionModel(nn.Module):
  """SD-style conditional UNet (epsilon predictor) with ControlNet residual inputs, NHWC.

  Entry points (all share one params tree; use `method=` with `apply`):
    `__call__(sample, timesteps, context, down_residuals=None, mid_residual=None) -> eps`
    `encode(sample, timesteps, context) -> (skips, mid)` (reads only `ENCODER_PARAM_KEYS`)
    `decode(skips, mid, timesteps, context, down_residuals=None, mid_residual=None) -> eps`
  `__call__` == `decode(*encode(sample, timesteps, context), timesteps, context, ...)`.
  """
  config: DenoiserConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg, kw = self.config, dict(dtype=self.dtype, param_dtype=self.param_dtype)
    down_cls, mid_cls, up_cls = DownBlock, MidBlock, UpBlock
    if cfg.remat:
      down_cls, mid_cls = nn.remat(DownBlock), nn.remat(MidBlock)
      # argnums count `self` as 0: (self, x, skips, temb, context, upsample_size).
      up_cls = nn.remat(UpBlock, static_argnums=(5,))
    c0 = cfg.block_out_channels[0]
    self.conv_in = layers.Conv(c0, 3, padding=1, **kw)
    self.time_embedding = TimestepEmbedding(cfg.time_embed_dim, **kw)
    n = len(cfg.block_out_channels)
    self.down_blocks = [down_cls(cfg, i, **kw) for i in range(n)]
    self.mid_block = mid_cls(cfg, **kw)
    self.up_blocks = [up_cls(cfg, i, **kw) for i in range(n)]
    self.conv_norm_out = layers.GroupNorm(cfg.norm_num_groups, cfg.norm_eps, **kw)
    self.conv_out = layers.Conv(cfg.out_channels, 3, padding=1, **kw)

  def _time_embed(self, timesteps, batch: int) -> Array:
    cfg = self.config
    t = _broadcast_timesteps(timesteps, batch)
    emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    return self.time_embedding(emb.astype(self.dtype))

  def encode(self, sample: Array, timesteps, context: Array) -> tuple[tuple[Array, ...], Array]:
    """conv_in + down blocks + mid block.

    Args:
      sample: (B, h, w, in_channels) noisy latent.
      timesteps: (B,) or scalar, int or float.
      context: (B, L, cross_attention_dim) text states.

    Returns:
      (skips, mid): the 12 (for SD layouts) skip tensors in diffusers' `down_block_res_samples`
      order (conv_in output, each resnet/attention output, each downsampler output) and the mid
      block output (before any mid residual).
    """
    temb = self._time_embed(timesteps, sample.shape[0])
    x = nn.with_logical_constraint(self.conv_in(sample.astype(self.dtype)), _IMAGE_AXES)
    skips = [x]
    for block in self.down_blocks:
      x, block_skips = block(x, temb, context)
      skips.extend(block_skips)
    mid = self.mid_block(x, temb, context)
    return tuple(skips), mid

  def decode(self, skips: Sequence[Array], mid: Array, timesteps, context: Array,
             down_residuals: Sequence[Array] | None = None,
             mid_residual: Array | None = None) -> Array:
    """Adds the ControlNet residuals and runs the up path + output head.

    Args:
      skips: the skip tensors from `encode`.
      mid: the mid output from `encode`.
      timesteps, context: as for `encode` (the time MLP is recomputed: it is tiny).
      down_residuals: optional, one array per skip, added to it.
      mid_residual: optional, added to the mid output.

    Returns:
      (B, h, w, out_channels) epsilon prediction.
    """
    cfg = self.config
    skips = list(skips)
    if len(skips) != len(cfg.skip_channels):
      raise ValueError(f"expected {len(cfg.skip_channels)} skips, got {len(skips)}")
    if down_residuals is not None:
      if len(down_residuals) != len(skips):
        raise ValueError(f"expected {len(skips)} down_residuals, got {len(down_residuals)}")
      skips = [(s + r).astype(s.dtype) for s, r in zip(skips, down_residuals)]
    x = mid if mid_residual is None else (mid + mid_residual).astype(mid.dtype)
    temb = self._time_embed(timesteps, mid.shape[0])
    per_block = cfg.layers_per_block + 1
    for i, block in enumerate(self.up_blocks):
      block_skips, skips = tuple(skips[-per_block:]), skips[:-per_block]
      # Upsample to the next skip's size: x2 normally, exact for odd latent sizes (diffusers'
      # forward_upsample_size).
      size = tuple(skips[-1].shape[1:3]) if i != len(self.up_blocks) - 1 else None
      x = block(x, block_skips, temb, context, size)
    x = nn.silu(self.conv_norm_out(x))
    return self.conv_out(x)

  def __call__(self, sample: Array, timesteps, context: Array,
               down_residuals: Sequence[Array] | None = None,
               mid_residual: Array | None = None) -> Array:
    """Full forward: encode, add residuals, decode. Shapes as in `encode` / `decode`."""
    skips, mid = self.encode(sample, timesteps, context)
    return self.decode(skips, mid, timesteps, context, down_residuals, mid_residual)


def abstract_params(config: DenoiserConfig, dtype: Dtype = jnp.float32,
                    param_dtype: Dtype = jnp.float32):
  """Params tree of `jax.ShapeDtypeStruct` (logical-axis boxes removed) via `jax.eval_shape`."""
  model = UNet2DConditionModel(config, dtype=dtype, param_dtype=param_dtype)
  side = 2 ** (len(config.block_out_channels) - 1)
  sample = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
  context = jax.ShapeDtypeStruct((1, 1, config.cross_attention_dim), jnp.float32)
  variables = jax.eval_shape(lambda s, c: model.init(jax.random.key(0), s, jnp.zeros((1,)), c),
                             sample, context)
  return nn.unbox(variables["params"])


def count_params(params) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
