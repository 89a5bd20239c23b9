"""Stage II latent autoencoder: the Stable-Diffusion `AutoencoderKL` (KL-regularised VAE), NHWC.

The module reproduces diffusers' `AutoencoderKL` layer for layer, so SD-1.5 weights load through
`idgbr_jax.convert.diffusers_vae` and give the same numbers (float32 parity is tested):

* Encoder: conv_in -> down blocks (ResnetBlock2D x layers_per_block, then a stride-2 conv on all
  but the last level) -> mid block (resnet, single-head self-attention, resnet) -> GN, SiLU,
  conv_out to 2 * latent_channels (mean and log-variance) -> quant_conv (1x1).
* Decoder: post_quant_conv (1x1) -> conv_in -> mid block -> up blocks (layers_per_block + 1
  resnets, then nearest x2 upsample + conv on all but the last level) -> GN, SiLU, conv_out.

Images are NHWC in [-1, 1]. IDGBR uses the frozen SD-1.5 VAE and encodes with a posterior
*sample* times 0.18215 (dossier §1.3); `AutoencoderConfig.sample_posterior` selects that or the
mean. The small variants exist so the pipeline can be trained end to end on CPU.

Multispectral images (e.g. RGBIR, `config.data.in_channels=4`). Stage II encodes two kinds of
input with the same frozen VAE: label colour maps (always 3 channels, from the label embedding)
and images (C bands). So the 3-channel path stays exactly as it is, and C-band images get their
own *image stem* (`AutoencoderConfig.image_channels`): an encoder `conv_in_image` that reads C
bands and a decoder `conv_out_image` that writes C bands; everything between is shared. `encode`
picks the stem by the input's band count; `decode(z, image=True)` picks the image head. Stage II
never decodes image latents (they only condition the denoiser); the image head exists so the
autoencoder can be pretrained on C-band reconstructions (`train/pretrain.py`).

A 3-band VAE (SD-1.5) gains the stem by `with_image_stem`: `conv_in_image` is `conv_in` expanded
by `expand_input_kernel` (exact for images whose extra bands equal the mean of R, G, B, so a
grey-ish band keeps the activations the RGB stem would give; see there), `conv_out_image` is
`conv_out` with every extra output band predicted as the mean of the RGB outputs.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from idgbr_jax.models import layers

Dtype = Any

# diffusers clips the log-variance to this range before exponentiating (DiagonalGaussianDistribution).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


@dataclasses.dataclass(frozen=True)
class AutoencoderConfig:
  """Architecture of a diffusers-layout AutoencoderKL.

  Attributes:
    in_channels: image channels fed to the encoder.
    out_channels: image channels produced by the decoder.
    block_out_channels: channels per resolution level; the spatial downsampling factor is
      2 ** (len(block_out_channels) - 1).
    layers_per_block: resnets per encoder level (the decoder uses one more per level).
    latent_channels: channels of the latent z.
    norm_num_groups: GroupNorm groups everywhere.
    norm_eps: GroupNorm epsilon (diffusers hard-codes 1e-6 inside the VAE).
    scaling_factor: z is multiplied by this before diffusion (`encode_latents`).
    sample_posterior: `encode_latents` / `__call__` draw z ~ N(mean, std) when True (what the
      original IDGBR does), and use the mean when False.
    mid_block_attention: whether the mid blocks carry the self-attention layer.
    use_quant_conv: 1x1 conv on the encoder moments (True for SD).
    use_post_quant_conv: 1x1 conv on z before the decoder (True for SD).
    remat: rematerialise every resnet block in the backward pass (saves activation memory).
    image_channels: bands of the images when they differ from `in_channels` (e.g. 4 for RGBIR
      while label colours keep 3): adds the image stem (`conv_in_image` / `conv_out_image`,
      see the module doc). 0 (or `in_channels`): images use the same stem as label colours.
  """
  in_channels: int = 3
  out_channels: int = 3
  block_out_channels: tuple[int, ...] = (128, 256, 512, 512)
  layers_per_block: int = 2
  latent_channels: int = 4
  norm_num_groups: int = 32
  norm_eps: float = 1e-6
  scaling_factor: float = 0.18215
  sample_posterior: bool = True
  mid_block_attention: bool = True
  use_quant_conv: bool = True
  use_post_quant_conv: bool = True
  remat: bool = False
  image_channels: int = 0

  def __post_init__(self):
    object.__setattr__(self, "block_out_channels", tuple(int(c) for c in self.block_out_channels))
    if self.image_channels < 0:
      raise ValueError(f"image_channels must be >= 0 (0: no image stem), got "
                       f"{self.image_channels}")
    if not self.block_out_channels:
      raise ValueError("block_out_channels must not be empty")
    bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
    if bad:
      raise ValueError(f"block_out_channels {self.block_out_channels} must all be divisible by "
                       f"norm_num_groups={self.norm_num_groups}")

  @property
  def downsample_factor(self) -> int:
    """Ratio of image size to latent size."""
    return 2 ** (len(self.block_out_channels) - 1)

  @property
  def has_image_stem(self) -> bool:
    """Whether images have their own band count, stem and head (see the module doc)."""
    return self.image_channels not in (0, self.in_channels)

  @property
  def accepted_bands(self) -> tuple[int, ...]:
    """Input band counts `encode` takes: label colours (and 3-band images), C-band images."""
    return ((self.in_channels, self.image_channels) if self.has_image_stem else
            (self.in_channels,))


def replace_checked(config: AutoencoderConfig, overrides: Mapping[str, Any]) -> AutoencoderConfig:
  """`dataclasses.replace(config, **overrides)`, naming unknown fields in a ValueError."""
  names = {f.name for f in dataclasses.fields(AutoencoderConfig)}
  unknown = sorted(set(overrides) - names)
  if unknown:
    raise ValueError(f"unknown AutoencoderConfig field(s) {unknown}; known: {sorted(names)}")
  return dataclasses.replace(config, **overrides)


VARIANTS: dict[str, AutoencoderConfig] = {
    # The exact SD-1.5 VAE (runwayml/stable-diffusion-v1-5, vae/config.json): 83,653,863 params.
    "sd15": AutoencoderConfig(),
    # Unit tests: 4 levels so the x8 latent geometry of SD holds.
    "tiny": AutoencoderConfig(block_out_channels=(16, 32, 32, 32), layers_per_block=1,
                              norm_num_groups=8),
    # CPU demo: trainable from scratch on 128-px synthetic images in a minute or two (0.98M
    # params; ~1.0 CPU-s per Adam step at batch 4 x 128 px). The 128-px levels dominate the cost,
    # so they stay narrow: (32, 64, 64, 64) costs ~3x more per step.
    "small": AutoencoderConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1,
                               norm_num_groups=8),
}


def get_config(variant: str, **overrides) -> AutoencoderConfig:
  """Named variant with field overrides; unknown variants / fields raise ValueError."""
  if variant not in VARIANTS:
    raise ValueError(f"unknown autoencoder variant {variant!r}; known: {sorted(VARIANTS)}")
  return replace_checked(VARIANTS[variant], overrides)


# ----- adapting a 3-band first / last conv to C bands ----------------------------------------
RGB_BANDS = (0, 1, 2)


def _check_bands(channels: int, rgb_bands) -> tuple[int, ...]:
  rgb = tuple(int(b) for b in rgb_bands)
  if channels < 3 or len(rgb) != 3 or len(set(rgb)) != 3 or not all(0 <= b < channels
                                                                      for b in rgb):
    raise ValueError(f"rgb_bands={tuple(rgb_bands)} must be 3 distinct band indices below "
                     f"channels={channels} (>= 3)")
  return rgb


def expand_input_kernel(kernel, channels: int, rgb_bands=RGB_BANDS):
  """HWIO kernel reading 3 bands (R, G, B) -> the kernel reading `channels` bands.

  With W_c the kernel of RGB band c and E = channels - 3 extra bands: every extra band gets
  V = mean_c W_c, and the RGB kernels give up what it adds, W'_c = W_c - (E / 3) V. Then

      conv(x', W') = conv(x_rgb, W) + sum_e conv(x_e - mean_c x_c, V),

  so the output is exactly the 3-band one whenever every extra band equals the mean of the
  RGB bands at the conv's input (a grey image in particular), and an extra band enters as its
  departure from that mean with the gain of an average RGB band (NIR: vegetation bright, water
  dark). (Rescaling all kernels by 3/C instead keeps only grey images unchanged.) `rgb_bands`
  are the positions of R, G, B among the `channels` bands; numpy or jax arrays in and out.
  """
  rgb = _check_bands(channels, rgb_bands)
  if kernel.ndim != 4 or kernel.shape[2] != 3:
    raise ValueError(f"expected an HWIO kernel over 3 input bands, got shape {kernel.shape}")
  xp = np if isinstance(kernel, np.ndarray) else jnp
  v = xp.mean(kernel, axis=2)
  extra = channels - 3
  cols = [kernel[:, :, rgb.index(b)] - (extra / 3) * v if b in rgb else v
          for b in range(channels)]
  return xp.stack(cols, axis=2).astype(kernel.dtype)


def expand_output(a, channels: int, rgb_bands=RGB_BANDS):
  """A last axis of 3 output bands (a kernel's O axis or a bias) -> `channels` bands: the RGB
  ones where `rgb_bands` says, every extra band the mean of the three (a grey estimate)."""
  rgb = _check_bands(channels, rgb_bands)
  if a.shape[-1] != 3:
    raise ValueError(f"expected 3 output bands on the last axis, got shape {a.shape}")
  xp = np if isinstance(a, np.ndarray) else jnp
  mean = xp.mean(a, axis=-1)
  return xp.stack([a[..., rgb.index(b)] if b in rgb else mean for b in range(channels)],
                  axis=-1).astype(a.dtype)


def with_image_stem(params, config: "AutoencoderConfig", rgb_bands=RGB_BANDS):
  """Params of a 3-band autoencoder (no image stem) -> params for `config` (which has one):
  the shared params are kept as they are (so label colours encode exactly as before) and
  `conv_in_image` / `conv_out_image` are built from `conv_in` / `conv_out` (module doc)."""
  if not config.has_image_stem:
    raise ValueError(f"config has no image stem (image_channels={config.image_channels}, "
                     f"in_channels={config.in_channels})")
  if "conv_in_image" in params["encoder"]:
    raise ValueError("these autoencoder params already have an image stem")
  c = config.image_channels
  cin, cout = params["encoder"]["conv_in"], params["decoder"]["conv_out"]
  encoder = {**params["encoder"], "conv_in_image": {
      "kernel": expand_input_kernel(cin["kernel"], c, rgb_bands), "bias": cin["bias"]}}
  decoder = {**params["decoder"], "conv_out_image": {
      "kernel": expand_output(cout["kernel"], c, rgb_bands),
      "bias": expand_output(cout["bias"], c, rgb_bands)}}
  return {**params, "encoder": encoder, "decoder": decoder}


@flax.struct.dataclass
class DiagonalGaussian:
  """Posterior q(z|x) = N(mean, exp(logvar)), per latent element (NHWC)."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array) -> "DiagonalGaussian":
    """Splits encoder moments (..., 2 * latent) into mean and clipped log-variance (float32)."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def sample(self, rng: jax.Array) -> jax.Array:
    """Reparameterised draw mean + std * eps (differentiable in mean and logvar)."""
    return self.mean + self.std * jax.random.normal(rng, self.mean.shape, self.mean.dtype)

  def mode(self) -> jax.Array:
    return self.mean

  def kl(self) -> jax.Array:
    """KL(q || N(0, I)) summed over H, W, C: shape (batch,)."""
    return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=(1, 2, 3))


class ResnetBlock(nn.Module):
  """diffusers ResnetBlock2D without time embedding: (GN, SiLU, conv) x 2 plus a shortcut."""
  features: int
  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.GroupNorm(self.num_groups, self.epsilon, name="norm1", **kw)(x)
    h = layers.Conv(self.features, 3, padding=1, name="conv1", **kw)(nn.silu(h))
    h = layers.GroupNorm(self.num_groups, self.epsilon, name="norm2", **kw)(h)
    # Dropout is 0 in every SD VAE, so it is omitted.
    h = layers.Conv(self.features, 3, padding=1, name="conv2", **kw)(nn.silu(h))
    if x.shape[-1] != self.features:
      x = layers.Conv(self.features, 1, padding=0, name="conv_shortcut", **kw)(x)
    return x + h


class SpatialSelfAttention(nn.Module):
  """Single-head self-attention over all H*W positions with a GN pre-norm and a residual."""
  num_groups: int
  epsilon: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    batch, height, width, channels = x.shape
    h = layers.GroupNorm(self.num_groups, self.epsilon, name="group_norm", **kw)(x)
    h = h.reshape(batch, height * width, 1, channels)  # (B, T, heads=1, head_dim=C)
    q = layers.Dense(channels, name="to_q", **kw)(h)
    k = layers.Dense(channels, name="to_k", **kw)(h)
    v = layers.Dense(channels, name="to_v", **kw)(h)
    # Softmax runs in float32 inside layers.attention, like diffusers' upcast_softmax=True.
    h = layers.attention(q, k, v)
    h = layers.Dense(channels, in_axis="mlp", out_axis="embed", name="to_out", **kw)(h)
    return x + h.reshape(batch, height, width, channels)


class MidBlock(nn.Module):
  """diffusers UNetMidBlock2D (no time embedding): resnet, [attention], resnet."""
  features: int
  num_groups: int
  epsilon: float
  attention: bool = True
  remat: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    block = nn.remat(ResnetBlock) if self.remat else ResnetBlock
    x = block(self.features, self.num_groups, self.epsilon, name="resnets_0", **kw)(x)
    if self.attention:
      x = SpatialSelfAttention(self.num_groups, self.epsilon, name="attention", **kw)(x)
    return block(self.features, self.num_groups, self.epsilon, name="resnets_1", **kw)(x)


class Encoder(nn.Module):
  """Image (B, H, W, in or image_channels) -> moments (B, H/f, W/f, 2 * latent) before
  quant_conv; the band count picks the stem (module doc)."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    block = nn.remat(ResnetBlock) if cfg.remat else ResnetBlock
    stem = layers.Conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in", **kw)
    if cfg.has_image_stem:
      image_stem = layers.Conv(cfg.block_out_channels[0], 3, padding=1, name="conv_in_image",
                               **kw)
      is_image = x.shape[-1] == cfg.image_channels
      if self.is_initializing():  # create both stems, whichever band count init was given
        other, bands = (stem, cfg.in_channels) if is_image else (image_stem, cfg.image_channels)
        other(jnp.zeros((1, 1, 1, bands), x.dtype))
      if is_image:
        stem = image_stem
    x = stem(x)
    last = len(cfg.block_out_channels) - 1
    for i, features in enumerate(cfg.block_out_channels):
      for j in range(cfg.layers_per_block):
        x = block(features, groups, eps, name=f"down_blocks_{i}_resnets_{j}", **kw)(x)
      if i != last:
        # diffusers' Downsample2D(padding=0) pads right/bottom by one, then convolves with
        # stride 2 and no padding: symmetric padding 1 would shift the sampling grid.
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        x = layers.Conv(features, 3, strides=2, padding=0, name=f"down_blocks_{i}_downsample",
                        **kw)(x)
    x = MidBlock(cfg.block_out_channels[-1], groups, eps, cfg.mid_block_attention, cfg.remat,
                 name="mid_block", **kw)(x)
    x = layers.GroupNorm(groups, eps, name="conv_norm_out", **kw)(x)
    return layers.Conv(2 * cfg.latent_channels, 3, padding=1, name="conv_out", **kw)(nn.silu(x))


class Decoder(nn.Module):
  """Latent (B, h, w, latent) after post_quant_conv -> image (B, h*f, w*f, out), or with
  `image=True` and an image stem (B, h*f, w*f, image_channels)."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, image: bool = False) -> jax.Array:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    groups, eps = cfg.norm_num_groups, cfg.norm_eps
    block = nn.remat(ResnetBlock) if cfg.remat else ResnetBlock
    channels = tuple(reversed(cfg.block_out_channels))
    x = layers.Conv(channels[0], 3, padding=1, name="conv_in", **kw)(z)
    x = MidBlock(channels[0], groups, eps, cfg.mid_block_attention, cfg.remat, name="mid_block",
                 **kw)(x)
    last = len(channels) - 1
    for i, features in enumerate(channels):
      for j in range(cfg.layers_per_block + 1):
        x = block(features, groups, eps, name=f"up_blocks_{i}_resnets_{j}", **kw)(x)
      if i != last:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)  # nearest-neighbour x2
        x = layers.Conv(features, 3, padding=1, name=f"up_blocks_{i}_upsample", **kw)(x)
    x = layers.GroupNorm(groups, eps, name="conv_norm_out", **kw)(x)
    head = layers.Conv(cfg.out_channels, 3, padding=1, name="conv_out", **kw)
    if cfg.has_image_stem:
      image_head = layers.Conv(cfg.image_channels, 3, padding=1, name="conv_out_image", **kw)
      if self.is_initializing():  # create both heads
        (head if image else image_head)(nn.silu(x))
      if image:
        head = image_head
    return head(nn.silu(x))


class AutoencoderKL(nn.Module):
  """SD-layout KL autoencoder: `encode` -> DiagonalGaussian, `decode` -> image (NHWC, [-1, 1])."""
  config: AutoencoderConfig
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    if cfg.use_quant_conv:
      self.quant_conv = layers.Conv(2 * cfg.latent_channels, 1, padding=0, **kw)
    if cfg.use_post_quant_conv:
      self.post_quant_conv = layers.Conv(cfg.latent_channels, 1, padding=0, **kw)

  def encode(self, x: jax.Array) -> DiagonalGaussian:
    """Posterior q(z|x) for x (B, H, W, in_channels or image_channels); H, W divisible by the
    factor."""
    if x.shape[-1] not in self.config.accepted_bands:
      raise ValueError(f"the autoencoder takes {' or '.join(map(str, self.config.accepted_bands))}"
                       f" bands (in_channels={self.config.in_channels}: label colours"
                       + (f", image_channels={self.config.image_channels}: images"
                          if self.config.has_image_stem else "")
                       + f"), got {x.shape[-1]} bands (input shape {x.shape})")
    factor = self.config.downsample_factor
    if x.shape[1] % factor or x.shape[2] % factor:
      raise ValueError(f"image size {x.shape[1:3]} must be divisible by {factor}")
    moments = self.encoder(x)
    if self.config.use_quant_conv:
      moments = self.quant_conv(moments)
    return DiagonalGaussian.from_moments(moments)

  def decode(self, z: jax.Array, image: bool = False) -> jax.Array:
    """Image (B, h*f, w*f, out_channels) from an unscaled latent z (B, h, w, latent); with
    `image=True` and an image stem, the image bands (B, h*f, w*f, image_channels)."""
    if self.config.use_post_quant_conv:
      z = self.post_quant_conv(z)
    return self.decoder(z, image)

  def _latent(self, posterior: DiagonalGaussian, rng: jax.Array | None,
              sample_posterior: bool | None) -> jax.Array:
    sample = self.config.sample_posterior if sample_posterior is None else sample_posterior
    if not sample:
      return posterior.mode()
    if rng is None:
      raise ValueError("sampling the posterior needs an rng (or pass sample_posterior=False)")
    return posterior.sample(rng)

  def encode_latents(self, x: jax.Array, rng: jax.Array | None = None,
                     sample_posterior: bool | None = None) -> jax.Array:
    """Diffusion latent z * scaling_factor; z is a posterior sample or its mean.

    Args:
      x: images (B, H, W, in_channels) in [-1, 1].
      rng: PRNG key, required when sampling.
      sample_posterior: overrides `config.sample_posterior` for this call.
    """
    z = self._latent(self.encode(x), rng, sample_posterior)
    return z * self.config.scaling_factor

  def decode_latents(self, z: jax.Array, image: bool = False) -> jax.Array:
    """Image from a diffusion latent: decode(z / scaling_factor, image)."""
    return self.decode(z / self.config.scaling_factor, image)

  def __call__(self, x: jax.Array, rng: jax.Array | None = None,
               sample_posterior: bool | None = None) -> tuple[jax.Array, DiagonalGaussian]:
    """Reconstruction for training: returns (decode(z), posterior) with z sampled or the mean;
    C-band images come back through the image head, with their C bands."""
    posterior = self.encode(x)
    image = self.config.has_image_stem and x.shape[-1] == self.config.image_channels
    return self.decode(self._latent(posterior, rng, sample_posterior), image), posterior


def autoencoder_loss(model: AutoencoderKL, params, images: jax.Array, rng: jax.Array,
                     kl_weight: float = 1e-6) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L1 reconstruction + kl_weight * KL for training the small autoencoder from scratch.

  L1, not MSE: it is the pixel term of the LDM/SD autoencoder objective and gives sharper
  reconstructions than MSE (which averages edges away); LDM adds LPIPS and a GAN, which need
  pretrained networks and are left out of this CPU-trainable loss. Both terms are normalised per
  image element, i.e. LDM's (sum |x - x'| + kl_weight * sum KL) / (B*H*W*C), so `kl_weight` keeps
  LDM's meaning (1e-6 in the SD autoencoder configs) while the loss reads as a per-pixel L1.

  Args:
    model: the AutoencoderKL (its config decides sampling of z; training wants sampling).
    params: the 'params' collection (or the full variables dict {'params': ...}).
    images: (B, H, W, C) in [-1, 1].
    rng: PRNG key for the posterior sample.
    kl_weight: weight of the KL term relative to the per-pixel L1 sum.

  Returns:
    (loss, aux) with aux = {'l1', 'mse', 'kl' (per-sample KL sum, batch mean), 'loss',
    'reconstruction' (float32, for extra task losses on it)}.
  """
  variables = params if "params" in params else {"params": params}
  recon, posterior = model.apply(variables, images, rng)
  images = images.astype(jnp.float32)
  recon = recon.astype(jnp.float32)
  l1 = jnp.mean(jnp.abs(images - recon))
  kl = jnp.mean(posterior.kl())
  loss = l1 + kl_weight * kl / np.prod(images.shape[1:])
  aux = {"loss": loss, "l1": l1, "mse": jnp.mean(jnp.square(images - recon)), "kl": kl,
         "reconstruction": recon}
  return loss, aux
