"""The IDGBR refiner assembled from its networks, as pure functions of explicit param trees.

Param trees (each passed to jit as an argument, never captured):

* trainable: `unet` (the denoiser, "unet_gen"), `guidance` (the CG net) and `projector` (REPA,
  used only during the alignment warm-up);
* frozen: `vae`, `label_embed`, `unet_ori` (the encoder half of the *initial* UNet weights),
  `teacher` (DINOv2, optional) and `context` (the empty-prompt text states, (1, L, D)).

Compute layout, and where it differs from the original on purpose:

* The frozen image / coarse features (`unet_ori.encode` at t=1) do not depend on the diffusion
  step: `encode_conditions` runs once per image, and the sampler reuses them for all steps.
* The denoiser's encoder runs once per step: its skips feed the CG net and then the up path
  (`UNet2DConditionModel.decode`); the original runs the encoder a second time inside the full
  forward. Same numbers, one encoder pass fewer.
* Control-CFG: the unconditional branch is the same UNet with zero residuals, so it shares the
  encoder pass too; only the up path runs on a 2B batch (`eps_cfg`).

Multispectral images (C bands): the VAE encodes them through its image stem and label colours
through its 3-band one (`models/autoencoder.py`), so the latents, the denoiser and the CG net
are the same for any C; the DINOv2 teacher reads the three bands `teacher_bands` (R, G, B).
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from idgbr_jax.models import autoencoder, denoiser, dinov2, guidance, label_embedding, repa

Params = Any
T_COND = 1  # the original encodes image and coarse latents with unet_ori at timestep 1


@dataclasses.dataclass(frozen=True)
class RefinerConfig:
  """Architecture of every Stage II network."""
  denoiser: denoiser.DenoiserConfig
  autoencoder: autoencoder.AutoencoderConfig
  guidance: guidance.GuidanceConfig
  label_embed: label_embedding.LabelEmbedConfig
  teacher: dinov2.DinoV2Config | None = None
  projector_hidden: int = 2048
  context_length: int = 77
  teacher_bands: tuple[int, ...] = (0, 1, 2)  # the image bands DINOv2 reads (R, G, B)

  def __post_init__(self):
    object.__setattr__(self, "teacher_bands", tuple(int(b) for b in self.teacher_bands))
    if len(self.teacher_bands) != 3:
      raise ValueError(f"teacher_bands {self.teacher_bands} must name 3 image bands (R, G, B)")
    if self.guidance.skip_channels != tuple(self.denoiser.skip_channels):
      raise ValueError(f"guidance skip_channels {self.guidance.skip_channels} do not match the "
                       f"denoiser's {tuple(self.denoiser.skip_channels)}")
    if self.autoencoder.latent_channels != self.denoiser.in_channels:
      raise ValueError(f"autoencoder latent_channels {self.autoencoder.latent_channels} != "
                       f"denoiser in_channels {self.denoiser.in_channels}")


class Conditions(NamedTuple):
  """Frozen-encoder features of the image and coarse-map latents (computed once per image)."""
  img_skips: tuple
  img_mid: jax.Array
  coarse_skips: tuple
  coarse_mid: jax.Array
  coarse_latent: jax.Array | None = None  # the VAE latent of the coarse map (img2img starts)


class Refiner:
  """Holds the Linen modules (no params) and the refiner's pure functions."""

  def __init__(self, config: RefinerConfig, dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    self.unet = denoiser.UNet2DConditionModel(config.denoiser, dtype=dtype)
    self.vae = autoencoder.AutoencoderKL(config.autoencoder, dtype=dtype)
    self.guidance = guidance.GuidanceNet(config.guidance, dtype=dtype)
    self.label_embed = label_embedding.LabelEmbedding(config.label_embed)
    self.teacher = dinov2.DinoV2(config.teacher, dtype=dtype) if config.teacher else None
    self.projector = (repa.Projector(config.projector_hidden, config.teacher.embed_dim,
                                     dtype=dtype) if config.teacher else None)

  # ----- init -----------------------------------------------------------------------------------
  def latent_size(self, image_size: int) -> int:
    factor = self.config.autoencoder.downsample_factor
    if image_size % factor:
      raise ValueError(f"image size {image_size} not divisible by the autoencoder factor {factor}")
    return image_size // factor

  def _init_inputs(self, image_size: int):
    h = self.latent_size(image_size)
    cfg = self.config
    z = jnp.zeros((1, h, h, cfg.denoiser.in_channels), jnp.float32)
    ctx = jnp.zeros((1, cfg.context_length, cfg.denoiser.cross_attention_dim), jnp.float32)
    return z, jnp.zeros((1,), jnp.int32), ctx

  def init_unet(self, rng: jax.Array, image_size: int) -> Params:
    """The denoiser part of `init_trainable(rng, image_size)` (the same values), alone."""
    r_unet = jax.random.split(rng, 3)[0]
    return self.unet.init(r_unet, *self._init_inputs(image_size))["params"]

  def init_trainable(self, rng: jax.Array, image_size: int) -> Params:
    """Boxed (logically partitioned) params of the denoiser, CG net and projector."""
    _, r_guid, r_proj = jax.random.split(rng, 3)
    z, t, ctx = self._init_inputs(image_size)
    unet_params = self.init_unet(rng, image_size)
    skips, mid = jax.eval_shape(
        lambda p: self.unet.apply({"params": p}, z, t, ctx, method=self.unet.encode), unet_params)
    zeros = lambda s: jnp.zeros(s.shape, jnp.float32)  # noqa: E731
    sk, md = tuple(map(zeros, skips)), zeros(mid)
    out = {"unet": unet_params,
           "guidance": self.guidance.init(r_guid, sk, md, sk, md, sk, md)["params"]}
    if self.projector is not None:
      out["projector"] = self.projector.init(r_proj, jnp.zeros((1, 1, 1, sk[-1].shape[-1])))[
          "params"]
    return out

  # ----- frozen encoders --------------------------------------------------------------------
  # The VAE posterior is kept as its moments (mean ‖ logvar on channels) so it can be cached per
  # example (train/latent_cache.py); the latent is drawn from them at every use, as the original.
  def image_moments(self, frozen: Params, image: jax.Array) -> jax.Array:
    posterior = self.vae.apply({"params": frozen["vae"]}, image, method=self.vae.encode)
    return jnp.concatenate([posterior.mean, posterior.logvar], axis=-1)

  def label_moments(self, frozen: Params, labels: jax.Array) -> jax.Array:
    colours = self.label_embed.apply({"params": frozen["label_embed"]}, labels,
                                     method=self.label_embed.encode)
    return self.image_moments(frozen, colours.astype(self.dtype))

  def latent_from_moments(self, moments: jax.Array, rng: jax.Array | None) -> jax.Array:
    """Diffusion latent (× scaling factor): a posterior sample, or its mean when the config
    says `sample_posterior=False`."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
    posterior = autoencoder.DiagonalGaussian(mean=mean, logvar=logvar)
    if self.config.autoencoder.sample_posterior:
      if rng is None:
        raise ValueError("sampling the posterior needs an rng (or sample_posterior=False)")
      z = posterior.sample(rng)
    else:
      z = posterior.mode()
    return z * self.config.autoencoder.scaling_factor

  def encode_image(self, frozen: Params, image: jax.Array, rng: jax.Array | None) -> jax.Array:
    return self.latent_from_moments(self.image_moments(frozen, image), rng)

  def encode_labels(self, frozen: Params, labels: jax.Array, rng: jax.Array | None) -> jax.Array:
    return self.latent_from_moments(self.label_moments(frozen, labels), rng)

  def context(self, frozen: Params, batch: int) -> jax.Array:
    ctx = frozen["context"]
    return jnp.broadcast_to(ctx, (batch,) + ctx.shape[1:]).astype(self.dtype)

  def encode_conditions(self, frozen: Params, image: jax.Array, coarse: jax.Array,
                        rng: jax.Array, use_coarse: bool = True, *,
                        image_moments: jax.Array | None = None,
                        coarse_moments: jax.Array | None = None) -> Conditions:
    """VAE latents of image and coarse map -> frozen UNet-encoder features at t=1.

    `use_coarse=False` is the original's `no_rough` ablation: the coarse latent is zeros.
    Cached posterior moments, when given, replace the VAE encoder passes (same draws).
    """
    r_img, r_coarse = jax.random.split(rng)
    if image_moments is None:
      image_moments = self.image_moments(frozen, image)
    z_img = self.latent_from_moments(image_moments, r_img)
    if use_coarse:
      if coarse_moments is None:
        coarse_moments = self.label_moments(frozen, coarse)
      z_coarse = self.latent_from_moments(coarse_moments, r_coarse)
    else:
      z_coarse = jnp.zeros_like(z_img)
    b = z_img.shape[0]
    z = jnp.concatenate([z_img, z_coarse])  # one batched pass through unet_ori
    t = jnp.full((2 * b,), T_COND, jnp.int32)
    skips, mid = self.unet.apply({"params": frozen["unet_ori"]}, z, t, self.context(frozen, 2 * b),
                                 method=self.unet.encode)
    skips = jax.lax.stop_gradient(skips)
    mid = jax.lax.stop_gradient(mid)
    return Conditions(tuple(s[:b] for s in skips), mid[:b], tuple(s[b:] for s in skips), mid[b:],
                      z_coarse)

  # ----- the noise predictor ------------------------------------------------------------------
  def _guided(self, trainable: Params, frozen: Params, z_t, t, cond: Conditions, keep=None):
    b = z_t.shape[0]
    ctx = self.context(frozen, b)
    skips, mid = self.unet.apply({"params": trainable["unet"]}, z_t, t, ctx,
                                 method=self.unet.encode)
    residuals, mid_res = self.guidance.apply(
        {"params": trainable["guidance"]}, skips, mid, cond.img_skips, cond.img_mid,
        cond.coarse_skips, cond.coarse_mid)
    if keep is not None:  # dropped examples get zero residuals: the unconditional branch
      residuals = [r * keep[:, None, None, None].astype(r.dtype) for r in residuals]
      mid_res = mid_res * keep[:, None, None, None].astype(mid_res.dtype)
    # The REPA student is the last residual as the up path receives it (after the dropout).
    return skips, mid, residuals, mid_res, ctx, residuals[-1]

  def eps(self, trainable: Params, frozen: Params, z_t, t, cond: Conditions, keep=None):
    """Conditional ε̂(z_t, t) and the CG net's last skip residual (the REPA student feature).

    `keep` (B,) of 0/1, optional: 0 drops an example's condition (zero residuals), as
    condition dropout does in training so the unconditional CFG branch is learned.
    """
    skips, mid, residuals, mid_res, ctx, student = self._guided(trainable, frozen, z_t, t, cond,
                                                                keep)
    eps = self.unet.apply({"params": trainable["unet"]}, skips, mid, t, ctx, residuals, mid_res,
                          method=self.unet.decode)
    return eps, student

  def eps_cfg(self, trainable: Params, frozen: Params, z_t, t, cond: Conditions):
    """(ε_c, ε_0) in one batched up-path call; ε_0 is the same UNet with zero residuals."""
    b = z_t.shape[0]
    skips, mid, residuals, mid_res, ctx, _ = self._guided(trainable, frozen, z_t, t, cond)
    two = lambda x: jnp.concatenate([x, x])  # noqa: E731
    res2 = [jnp.concatenate([r, jnp.zeros_like(r)]) for r in residuals]
    mid2 = jnp.concatenate([mid_res, jnp.zeros_like(mid_res)])
    t2 = jnp.concatenate([jnp.broadcast_to(t, (b,))] * 2)
    eps = self.unet.apply({"params": trainable["unet"]}, [two(s) for s in skips], two(mid), t2,
                          two(ctx), res2, mid2, method=self.unet.decode)
    return eps[:b], eps[b:]

  def losses(self, trainable: Params, frozen: Params, z_t, t, noise, cond: Conditions, *,
             keep=None, image=None, align=None, teacher=None):
    """The training terms (mse, repa) for one noised batch.

    mse: mean squared error of ε̂ against `noise` (float32). repa: the REPA alignment of the
    CG net's last residual with the teacher's tokens of `image`, computed only when `align` (a
    traced bool, e.g. step < warm-up) is true and the refiner has a teacher; else 0.
    `teacher`: those tokens (`teacher_tokens`) when the caller computed them already (the
    train step does, with the conditions, outside the gradient); else they are computed here.
    """
    eps, student = self.eps(trainable, frozen, z_t, t, cond, keep)
    mse = jnp.mean(jnp.square(eps.astype(jnp.float32) - noise))
    if align is None or self.teacher is None:
      return mse, jnp.zeros((), jnp.float32)
    repa_term = jax.lax.cond(
        align, lambda: self.repa_loss(trainable, frozen, student, image, teacher),
        lambda: jnp.zeros((), jnp.float32))
    return mse, repa_term

  # ----- outputs ---------------------------------------------------------------------------
  def decode_logits(self, frozen: Params, z0: jax.Array) -> jax.Array:
    """Latent -> VAE decode -> label-embedding decoder logits (B, H, W, K)."""
    colours = self.vae.apply({"params": frozen["vae"]}, z0, method=self.vae.decode_latents)
    return self.label_embed.apply({"params": frozen["label_embed"]}, colours.astype(jnp.float32),
                                  method=self.label_embed.decode)

  def teacher_tokens(self, frozen: Params, image: jax.Array) -> jax.Array:
    bands = self.config.teacher_bands
    if image.shape[-1] != 3 or bands != (0, 1, 2):
      if max(bands) >= image.shape[-1]:
        raise ValueError(f"teacher_bands {bands} (config.data.rgb_bands) out of range for "
                         f"{image.shape[-1]}-band images")
      image = image[..., list(bands)]
    x = repa.teacher_input(image, self.config.teacher.patch_size)
    return self.teacher.apply({"params": frozen["teacher"]}, x)["x_norm_patchtokens"]

  def repa_loss(self, trainable: Params, frozen: Params, student: jax.Array, image: jax.Array,
                teacher: jax.Array | None = None):
    if teacher is None:
      teacher = self.teacher_tokens(frozen, image)
    teacher = jax.lax.stop_gradient(teacher)
    p = self.config.teacher.patch_size
    th, tw = repa.teacher_input_size(image.shape[1:3], p)
    proj = self.projector.apply({"params": trainable["projector"]}, student)
    return repa.repa_loss(repa.align_tokens(proj, (th // p, tw // p)), teacher)
