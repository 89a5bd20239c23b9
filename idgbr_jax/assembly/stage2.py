"""A Stage II refiner from a config: the one place that builds it.

* `refiner_config` / `build_refiner`: the architecture (pretrained parts take theirs from their
  checkpoints' meta.json) and the `Refiner`;
* `make_schedule`: the training noise schedule;
* `trainable_init_fn`, `init_frozen`, `initial_unet_encoder`: param trees, created sharded;
* `load_refiner`: a trained refiner for refinement or export, **params only**: the trainable
  params are restored into abstract targets (no random init is materialised, no optimizer state
  is read), and the frozen tree has no DINOv2 teacher (REPA is a training-time term).

The frozen `unet_ori` is the encoder half of the denoiser's weights *before* training: a params
checkpoint (`config.init.unet`, e.g. converted SD-1.5) or the random init of `config.seed`. It is
rebuilt from that source rather than stored with every Stage II checkpoint.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from idgbr_jax import checkpoints, diffusion, paths
from idgbr_jax.assembly import common, parts
from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.data import sources
from idgbr_jax.models import autoencoder, denoiser, dinov2, guidance, label_embedding, refiner
from idgbr_jax.parallel import sharding

Params = Any
# Seeds derived from config.seed: the trainable init (denoiser, CG net, projector) and the random
# frozen parts (VAE, label embedding, teacher when no checkpoint is given).
TRAINABLE_SEED_OFFSET = 0
FROZEN_SEED_OFFSET = 2


# ----- architecture ------------------------------------------------------------------------------
def refiner_config(config: ml_collections.ConfigDict, num_classes: int) -> refiner.RefinerConfig:
  """Stage II architecture: pretrained parts take theirs from their checkpoints' meta.json."""
  m = config.model
  if config.init.unet:
    den = parts.part_config(config.init.unet, "denoiser")
  else:
    den = denoiser.get_config(m.denoiser, **m.denoiser_overrides.to_dict())
  den = dataclasses.replace(den, remat=m.remat)
  if config.init.autoencoder:
    ae = parts.part_config(config.init.autoencoder, "autoencoder")
  else:
    ae = autoencoder.get_config("tiny")
  ae = dataclasses.replace(ae, sample_posterior=config.diffusion.sample_posterior)
  if config.init.label_embed:
    le = parts.part_config(config.init.label_embed, "label_embed")
  else:
    le = label_embedding.LabelEmbedConfig(num_classes=num_classes)
  if le.num_classes < num_classes:
    raise ValueError(f"label embedding has {le.num_classes} rows < {num_classes} classes")
  latent = config.data.image_size // ae.downsample_factor
  guid = guidance.GuidanceConfig.for_denoiser(
      den.block_out_channels, den.layers_per_block, latent, width=m.guidance_width,
      heads=m.guidance_heads, init_mode=m.guidance_init_mode,
      skip_inert_attention=m.guidance_init_mode == "code")
  teacher = None
  if config.repa.enabled and m.teacher:
    teacher = (parts.part_config(config.init.teacher, "dinov2")
               if config.init.teacher else dinov2.get_config(m.teacher))
  return refiner.RefinerConfig(denoiser=den, autoencoder=ae, guidance=guid, label_embed=le,
                               teacher=teacher, projector_hidden=config.repa.projector_hidden,
                               context_length=m.context_length)


def build_refiner(config: ml_collections.ConfigDict, num_classes: int | None = None
                  ) -> refiner.Refiner:
  """The `Refiner` (modules, no params) a Stage II config describes."""
  if num_classes is None:
    num_classes = sources.num_classes(config.data)
  return refiner.Refiner(refiner_config(config, num_classes),
                         common.dtype_from_name(config.model.dtype))


def make_schedule(config: ml_collections.ConfigDict) -> diffusion.NoiseSchedule:
  d = config.diffusion
  return diffusion.make_schedule(d.beta_schedule, d.beta_start, d.beta_end, d.num_train_timesteps)


# ----- params ------------------------------------------------------------------------------------
def trainable_key(config: ml_collections.ConfigDict) -> jax.Array:
  return common.init_key(config.seed + TRAINABLE_SEED_OFFSET)


def trainable_init_fn(ref: refiner.Refiner, config: ml_collections.ConfigDict
                      ) -> Callable[[jax.Array], Params]:
  """rng -> boxed trainable params {unet, guidance[, projector]} at the config's image size."""
  return lambda rng: ref.init_trainable(rng, config.data.image_size)


def load_init_unet(config: ml_collections.ConfigDict, target, shardings, *,
                   partial: bool = False) -> Params:
  """The denoiser init of `config.init.unet` (a params checkpoint) placed on `shardings`."""
  return params_ckpt.load_params(config.init.unet, target, shardings, partial=partial)


def initial_unet_encoder(ref: refiner.Refiner, config: ml_collections.ConfigDict, mesh, rules
                         ) -> tuple[Params, Any]:
  """`unet_ori` without a trained state at hand: the encoder half of `config.init.unet`, or of
  the random denoiser init of `config.seed` (only that half is computed)."""
  size = config.data.image_size
  abstract, shardings = sharding.abstract_sharded(
      lambda r: ref.init_unet(r, size), trainable_key(config), mesh, rules)
  enc_abstract, enc_sh = denoiser.encoder_params(abstract), denoiser.encoder_params(shardings)
  if config.init.unet:
    return load_init_unet(config, enc_abstract, enc_sh, partial=True), enc_sh
  with jax.set_mesh(mesh):
    encoder = jax.jit(lambda r: denoiser.encoder_params(nn.meta.unbox(ref.init_unet(r, size))),
                      out_shardings=enc_sh)(trainable_key(config))
  return encoder, enc_sh


def _load_or_init(directory, init_fn, rng, mesh, rules):
  """Sharded params: restored from a params checkpoint when `directory` is set, else init."""
  if not directory:
    return sharding.create_sharded(init_fn, rng, mesh, rules)
  abstract, shardings = sharding.abstract_sharded(init_fn, rng, mesh, rules)
  return params_ckpt.load_params(directory, abstract, shardings), shardings


def init_frozen(ref: refiner.Refiner, config: ml_collections.ConfigDict, mesh, rules, *,
                unet_ori: tuple[Params, Any], with_teacher: bool = True
                ) -> tuple[Params, Any]:
  """Frozen params {vae, label_embed, unet_ori, context[, teacher]} and their shardings.

  `unet_ori` is (params, shardings) of the encoder half of the initial denoiser (see
  `initial_unet_encoder`; a trainer passes a copy of its freshly initialised state's). The
  teacher is only built with `with_teacher` and a config that has one.
  """
  r_vae, r_le, r_teacher = jax.random.split(common.init_key(config.seed + FROZEN_SEED_OFFSET), 3)
  size = config.data.image_size
  frozen, f_sh = {}, {}
  frozen["vae"], f_sh["vae"] = _load_or_init(
      config.init.autoencoder,
      lambda r: ref.vae.init(r, jnp.zeros((1, size, size, ref.config.autoencoder.in_channels)),
                             None, False)["params"], r_vae, mesh, rules)
  frozen["label_embed"], f_sh["label_embed"] = _load_or_init(
      config.init.label_embed,
      lambda r: ref.label_embed.init(r, jnp.zeros((1, 2, 2), jnp.int32))["params"], r_le, mesh,
      rules)
  if with_teacher and ref.teacher is not None:
    p = ref.config.teacher.patch_size
    frozen["teacher"], f_sh["teacher"] = _load_or_init(
        config.init.teacher, lambda r: ref.teacher.init(r, jnp.zeros((1, p, p, 3)))["params"],
        r_teacher, mesh, rules)
  frozen["unet_ori"], f_sh["unet_ori"] = unet_ori
  d = ref.config.denoiser
  ctx = (paths.load_npy(config.init.context) if config.init.context else
         np.zeros((1, ref.config.context_length, d.cross_attention_dim), np.float32))
  ctx = ctx[None] if ctx.ndim == 2 else ctx
  if ctx.ndim != 3 or ctx.shape[-1] != d.cross_attention_dim:
    raise ValueError(f"context {config.init.context} has shape {ctx.shape}; the denoiser "
                     f"expects (1, L, {d.cross_attention_dim})")
  f_sh["context"] = sharding.replicated(mesh)
  # Every process holds the same host array: place it without device_put's cross-process
  # equality check (a collective, for a value read from the same file on every host).
  ctx = np.asarray(ctx, np.float32)
  frozen["context"] = jax.make_array_from_callback(ctx.shape, f_sh["context"], lambda i: ctx[i])
  return frozen, f_sh


# ----- a trained refiner -------------------------------------------------------------------------
class LoadedRefiner(NamedTuple):
  refiner: refiner.Refiner
  trainable: Params   # {unet, guidance[, projector]}, sharded on `mesh`
  frozen: Params      # {vae, label_embed, unet_ori, context}: no teacher
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh


def load_refiner(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                 with_projector: bool = False, step: int | None = None) -> LoadedRefiner:
  """A trained refiner from `<workdir>/checkpoints`, params only.

  The trainable params are restored into abstract targets (no random init, no optimizer
  state); the frozen parts are re-read from the paths recorded in the run's config, without the
  teacher. `with_projector` also restores the REPA projector (export to the original's layout).
  """
  ckpt_dir = paths.join(workdir, "checkpoints")
  config = config or checkpoints.load_config(ckpt_dir, step)
  mesh = sharding.mesh_from_config(config)
  rules = tuple(config.sharding_rules)
  ref = build_refiner(config)
  abstract, shardings = sharding.abstract_sharded(trainable_init_fn(ref, config),
                                                  trainable_key(config), mesh, rules)
  if not with_projector:
    abstract.pop("projector", None)
    shardings.pop("projector", None)
  ckpt = checkpoints.Checkpointer(ckpt_dir, create=False)
  try:
    trainable = ckpt.restore_partial(step, {"params": abstract},
                                     shardings={"params": shardings})["params"]
  finally:
    ckpt.close()
  frozen, _ = init_frozen(ref, config, mesh, rules,
                          unet_ori=initial_unet_encoder(ref, config, mesh, rules),
                          with_teacher=False)
  return LoadedRefiner(ref, trainable, frozen, config, mesh)


def coarse_dir_for(config: ml_collections.ConfigDict, split: str) -> str | None:
  """`<coarse_dir>/<split>`, or None when the records carry their own `coarse` maps."""
  if not config.data.coarse_dir:
    if config.data.get("stored_coarse"):
      return None  # e.g. the original's data package (rough_label_index); ParseExample keeps it
    raise ValueError("config.data.coarse_dir is required for Stage II (Stage I coarse maps, "
                     "<coarse_dir>/<split>/<id>.png; see `idgbr predict`)")
  path = paths.join(config.data.coarse_dir, split)
  if not paths.isdir(path):
    raise FileNotFoundError(f"coarse maps for split {split!r} not found: {path}")
  return path
