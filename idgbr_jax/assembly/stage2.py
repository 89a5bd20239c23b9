"""A Stage II refiner from a config: the one place that builds it.

* `refiner_config` / `build_refiner`: the architecture (pretrained parts take theirs from their
  checkpoints' meta.json) and the `Refiner`;
* `make_schedule`: the training noise schedule;
* `trainable_init_fn`, `init_frozen`, `initial_unet_encoder`: param trees, created sharded;
* `load_refiner`: a trained refiner for refinement or export, **params only**: the trainable
  params are restored into abstract targets (no random init is materialised, no optimizer state
  is read), and the frozen tree has no DINOv2 teacher (REPA is a training-time term).

The frozen `unet_ori` is the encoder half of the denoiser's weights *before* training: a params
checkpoint (`config.init.unet`, e.g. converted SD-1.5), the `unet_ori` of an imported refiner
(`config.init.refiner`), or the random init of `config.seed`. It is rebuilt from that source
rather than stored with every Stage II checkpoint (`initial_unet` gives the whole initial UNet,
which `idgbr export --to=idgbr` writes as the original's `unet_ori/`).

An *imported refiner* is the folder `idgbr convert --from=idgbr` writes from an original IDGBR
run (or from our own `idgbr export --to=idgbr`): params checkpoints `unet/`, `guidance/`,
`vae/`, `label_embed/`, `unet_ori/` (the whole initial UNet, or its encoder half), optionally
`projector/`, the text context `context.npy`, and `refiner.json` (the refinement settings:
image size, normalisation, schedule, steps, guidance, strength and start, seed). It serves two
ways:

* `load_refiner(folder)` refines with it as it is (`idgbr refine --checkpoint=folder`), under
  `imported_refiner_config(folder)`;
* `config.init.refiner=folder` fine-tunes it: `load_initial_trainable` starts unet + guidance
  (+ projector) from it, and `unet_ori`, the VAE, the label embedding and the context come from
  it too (never the encoder of the *trained* unet).
"""
from __future__ import annotations

import copy
import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from idgbr_jax import checkpoints, diffusion, paths
from idgbr_jax.assembly import common, parts
from idgbr_jax.checkpoints import params as params_ckpt
from idgbr_jax.data import sources
from idgbr_jax.models import (autoencoder, denoiser, dinov2, guidance, label_embedding, layers,
                              refiner)
from idgbr_jax.parallel import sharding

Params = Any
# Seeds derived from config.seed: the trainable init (denoiser, CG net, projector) and the random
# frozen parts (VAE, label embedding, teacher when no checkpoint is given).
TRAINABLE_SEED_OFFSET = 0
FROZEN_SEED_OFFSET = 2


# ----- an imported refiner's folder --------------------------------------------------------------
# Part -> sub-folder of an imported refiner (what `idgbr convert --from=idgbr` writes).
REFINER_PARTS = {"unet": "unet", "guidance": "guidance", "projector": "projector",
                 "autoencoder": "vae", "label_embed": "label_embed", "unet_ori": "unet_ori"}
REFINER_CONTEXT = "context.npy"
REFINER_SETTINGS = "refiner.json"
# What an imported refiner needs to refine: every frozen part, and the trained nets.
_REFINE_NEEDS = ("unet", "guidance", "autoencoder", "label_embed", "unet_ori")

# The refinement settings a Stage II config holds beyond the weights (`refine_settings`), and
# the original's values (its configs/inference/*.yaml, SD-1.5's scheduler): what an imported
# original run refines with unless its refiner.json says otherwise.
SETTINGS_DIFFUSION_KEYS = ("beta_schedule", "beta_start", "beta_end", "num_train_timesteps",
                           "num_inference_steps", "guidance_scale", "strength", "start",
                           "sampling_seed", "use_coarse", "sample_posterior")
ORIGINAL_REFINE_SETTINGS = {
    "image_size": None,  # the guidance net's grid x the VAE's factor (512 for SD-1.5)
    "normalization": "imagenet",
    "model": {"dtype": "float32"},
    "diffusion": {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                  "num_train_timesteps": 1000, "num_inference_steps": 25,
                  "guidance_scale": 3.0, "strength": 1.0, "start": "noise",
                  "sampling_seed": 42, "use_coarse": True, "sample_posterior": True},
}


def refiner_part_dir(directory: str, part: str) -> str:
  return paths.join(directory, REFINER_PARTS[part])


def _has_params(directory: str) -> bool:
  return paths.exists(paths.join(directory, "meta.json"))


def is_imported_refiner(directory: str) -> bool:
  """A folder from `idgbr convert --from=idgbr` (not a Stage II run directory)."""
  if paths.isdir(paths.join(directory, "checkpoints")):
    return False
  return paths.exists(paths.join(directory, REFINER_SETTINGS)) or (
      _has_params(refiner_part_dir(directory, "unet"))
      and _has_params(refiner_part_dir(directory, "guidance")))


def refine_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """What of a Stage II config, beyond the weights, decides its refinement (refiner.json)."""
  d = config.diffusion
  defaults = {"strength": 1.0, "start": "coarse"}  # configs older than these keys
  return {"image_size": int(config.data.image_size),
          "normalization": str(config.data.get("normalization", "imagenet")),
          "model": {"dtype": str(config.model.dtype)},
          "diffusion": {k: d.get(k, defaults.get(k)) for k in SETTINGS_DIFFUSION_KEYS}}


def merged_settings(settings: dict[str, Any] | None) -> dict[str, Any]:
  """`settings` (a refiner.json, possibly partial) over the original's defaults."""
  out = copy.deepcopy(ORIGINAL_REFINE_SETTINGS)
  for key, value in (settings or {}).items():
    if isinstance(value, dict) and isinstance(out.get(key), dict):
      out[key].update(value)
    elif key in out:
      out[key] = value
  diffusion.check_start(out["diffusion"]["start"])
  return out


def original_refine_differences(config: ml_collections.ConfigDict) -> list[str]:
  """Settings of `config` under which the original's pipeline, given the same weights, would not
  refine the way we do (it loads them, but samples differently or fails)."""
  d = config.diffusion
  out = []
  strength, start = float(d.get("strength", 1.0)), d.get("start", "coarse")
  if strength < 1.0 and start == "coarse":
    out.append(f"diffusion.strength={strength} with start='coarse' (img2img) starts from the "
               "noised coarse latent; the original's pipeline starts from pure noise at any "
               "strength (our start='noise'): compare with --config.diffusion.start=noise, or "
               "run both at strength 1")
  if float(d.guidance_scale) <= 1.0:
    out.append(f"diffusion.guidance_scale={d.guidance_scale}: the original's pipeline fails at "
               "guidance_scale <= 1 (an undefined variable); run it with a scale > 1")
  if not d.get("sample_posterior", True):
    out.append("diffusion.sample_posterior=False (VAE mean): the original always samples the "
               "VAE posterior")
  if not d.use_coarse:
    out.append("diffusion.use_coarse=False (no_rough): run the original with "
               "--no_use_rough_guidance")
  if config.data.get("normalization", "imagenet") != "imagenet":
    out.append(f"data.normalization={config.data.normalization!r}: the original's dataset "
               "configs normalise images with ImageNet mean/std")
  return out


def imported_refiner_config(directory: str) -> ml_collections.ConfigDict:
  """A Stage II config that refines with the imported refiner at `directory` as it is.

  The schema is `configs/stage2_synthetic.py`'s; the architecture comes from the parts'
  meta.json (`config.init.refiner`), the settings from `refiner.json` over the original's
  inference defaults (`ORIGINAL_REFINE_SETTINGS`). No teacher, no REPA (refinement only).
  """
  from idgbr_configs import stage2_synthetic  # pylint: disable=import-outside-toplevel
  directory = str(directory)
  missing = [REFINER_PARTS[p] + "/" for p in _REFINE_NEEDS
             if not _has_params(refiner_part_dir(directory, p))]
  if not paths.exists(paths.join(directory, REFINER_CONTEXT)):
    missing.append(REFINER_CONTEXT)
  if missing:
    raise checkpoints.CheckpointError(
        f"{directory}: an imported refiner needs {missing} to refine (the frozen parts of the "
        "original run); convert the run again with `idgbr convert --from=idgbr "
        "--base=<the SD or pipeline folder it was trained from> [--label_embed=DIR]`, as the "
        "original's inference falls back to --base_model_name_or_path / --label_embed_dir")
  settings_path = paths.join(directory, REFINER_SETTINGS)
  settings = merged_settings(paths.read_json(settings_path)
                             if paths.exists(settings_path) else None)
  guid = parts.part_config(refiner_part_dir(directory, "guidance"), "guidance")
  ae = parts.part_config(refiner_part_dir(directory, "autoencoder"), "autoencoder")
  le = parts.part_config(refiner_part_dir(directory, "label_embed"), "label_embed")
  context = paths.load_npy(paths.join(directory, REFINER_CONTEXT))
  config = stage2_synthetic.get_config()
  config.data.name = "imported"
  config.data.num_classes = le.num_classes
  config.data.image_size = int(settings["image_size"] or
                               guid.skip_resolutions[0] * ae.downsample_factor)
  config.data.normalization = settings["normalization"]
  if ae.has_image_stem:  # a multispectral run: its images have the stem's band count
    config.data.in_channels = ae.image_channels
  config.model.dtype = settings["model"]["dtype"]
  config.model.teacher = ""
  config.model.guidance_width = guid.width
  config.model.guidance_heads = guid.heads
  config.model.guidance_init_mode = guid.init_mode
  config.model.context_length = int(context.shape[-2])
  config.repa.enabled = False
  config.init.refiner = directory
  for key, value in settings["diffusion"].items():
    config.diffusion[key] = value
  return config


# ----- architecture ------------------------------------------------------------------------------
def _refiner_dir(config: ml_collections.ConfigDict) -> str | None:
  refiner_dir = config.init.get("refiner")
  if refiner_dir and config.init.unet:
    raise ValueError(f"config.init.unet={config.init.unet} and config.init.refiner="
                     f"{refiner_dir} are both set: init.refiner brings its own denoiser and "
                     "unet_ori (the encoder of its *initial* UNet); unset init.unet")
  return refiner_dir or None


def frozen_part_dir(config: ml_collections.ConfigDict, part: str) -> str | None:
  """The params checkpoint of a frozen part ("autoencoder", "label_embed"): `config.init.<part>`,
  else the imported refiner's (which must have it), else None (random init)."""
  if config.init.get(part):
    return config.init[part]
  refiner_dir = _refiner_dir(config)
  if refiner_dir:
    directory = refiner_part_dir(refiner_dir, part)
    if not _has_params(directory):
      raise checkpoints.CheckpointError(
          f"config.init.refiner={refiner_dir} has no {REFINER_PARTS[part]}/: set "
          f"config.init.{part}, or convert the original run with --base / --label_embed")
    return directory
  return None


def context_path(config: ml_collections.ConfigDict) -> str | None:
  """`config.init.context`, else the imported refiner's context.npy, else None (zeros)."""
  if config.init.context:
    return config.init.context
  refiner_dir = _refiner_dir(config)
  if refiner_dir:
    path = paths.join(refiner_dir, REFINER_CONTEXT)
    if not paths.exists(path):
      raise checkpoints.CheckpointError(
          f"config.init.refiner={refiner_dir} has no {REFINER_CONTEXT} (the text context the "
          "run was trained with): set config.init.context (e.g. `idgbr convert --from=clip`), "
          "or convert the original run with --base=<its SD folder>")
    return path
  return None


def attention_implementation(config: ml_collections.ConfigDict) -> str | None:
  """The denoiser's and CG net's attention (`config.model.attention`, ours): "" is
  `layers.attention`'s default; "chunked" holds long sequences' logits a block of queries at a
  time (SD-1.5 at 512 px: 4096 tokens); "xla" / "cudnn" are `jax.nn.dot_product_attention`'s."""
  name = config.model.get("attention", "") or None
  if name not in layers.ATTENTION_IMPLEMENTATIONS:
    raise ValueError(f"config.model.attention={name!r}; allowed: "
                     f"{['' if n is None else n for n in layers.ATTENTION_IMPLEMENTATIONS]}")
  return name


def refiner_config(config: ml_collections.ConfigDict, num_classes: int) -> refiner.RefinerConfig:
  """Stage II architecture: pretrained parts take theirs from their checkpoints' meta.json."""
  m = config.model
  refiner_dir = _refiner_dir(config)
  if refiner_dir:
    den = parts.part_config(refiner_part_dir(refiner_dir, "unet"), "denoiser")
  elif config.init.unet:
    den = parts.part_config(config.init.unet, "denoiser")
  else:
    den = denoiser.get_config(m.denoiser, **m.denoiser_overrides.to_dict())
  attention = attention_implementation(config)
  den = dataclasses.replace(den, remat=m.remat, attention_implementation=attention)
  ae_dir = frozen_part_dir(config, "autoencoder")
  ae = parts.part_config(ae_dir, "autoencoder") if ae_dir else autoencoder.get_config("tiny")
  ae = dataclasses.replace(ae, sample_posterior=config.diffusion.sample_posterior)
  ae = _autoencoder_for_bands(ae, int(config.data.get("in_channels", 3)), ae_dir)
  le_dir = frozen_part_dir(config, "label_embed")
  if le_dir:
    le = parts.part_config(le_dir, "label_embed")
  else:
    le = label_embedding.LabelEmbedConfig(num_classes=num_classes)
  if le.num_classes < num_classes:
    raise ValueError(f"label embedding has {le.num_classes} rows < {num_classes} classes")
  latent = config.data.image_size // ae.downsample_factor
  if refiner_dir:
    # The imported CG net as it is (its width, heads and init mode come from the weights);
    # another latent grid interpolates its positional embeddings, as the original does.
    guid = parts.part_config(refiner_part_dir(refiner_dir, "guidance"), "guidance")
  else:
    guid = guidance.GuidanceConfig.for_denoiser(
        den.block_out_channels, den.layers_per_block, latent, width=m.guidance_width,
        heads=m.guidance_heads, init_mode=m.guidance_init_mode,
        skip_inert_attention=m.guidance_init_mode == "code")
  guid = dataclasses.replace(guid, attention_implementation=attention)
  teacher = None
  if config.repa.enabled and m.teacher:
    teacher = (parts.part_config(config.init.teacher, "dinov2")
               if config.init.teacher else dinov2.get_config(m.teacher))
  return refiner.RefinerConfig(denoiser=den, autoencoder=ae, guidance=guid, label_embed=le,
                               teacher=teacher, projector_hidden=config.repa.projector_hidden,
                               context_length=m.context_length,
                               teacher_bands=tuple(config.data.get("rgb_bands", (0, 1, 2))))


def _autoencoder_for_bands(ae: autoencoder.AutoencoderConfig, channels: int,
                           ae_dir: str | None) -> autoencoder.AutoencoderConfig:
  """The autoencoder for `channels`-band images (`config.data.in_channels`). Label colours keep
  its 3-band stem; other band counts need an image stem: the checkpoint's own, or one built from
  its RGB stem on load (`init_frozen`, `autoencoder.with_image_stem`)."""
  if channels == ae.in_channels or ae.image_channels == channels:
    return ae
  where = ae_dir or "the random-init autoencoder"
  if ae.has_image_stem:
    raise ValueError(f"config.data.in_channels={channels}, but the autoencoder {where} has an "
                     f"image stem for {ae.image_channels} bands")
  if ae.in_channels != 3:
    raise ValueError(f"config.data.in_channels={channels}: an image stem is built from a 3-band "
                     f"(RGB) autoencoder, {where} takes {ae.in_channels}")
  return dataclasses.replace(ae, image_channels=channels)


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


def _unet_ori_dir(ref: refiner.Refiner, refiner_dir: str) -> str:
  """The imported refiner's unet_ori checkpoint, checked against the denoiser it serves."""
  directory = refiner_part_dir(refiner_dir, "unet_ori")
  if not _has_params(directory):
    raise checkpoints.CheckpointError(
        f"config.init.refiner={refiner_dir} has no unet_ori/ (the encoder half of the run's "
        "initial UNet): convert the original run with --base=<the SD or pipeline folder it was "
        "trained from>; the trained unet's own encoder is not unet_ori")
  ori = parts.part_config(directory, "denoiser")
  den = ref.config.denoiser
  if dataclasses.replace(ori, remat=den.remat,
                         attention_implementation=den.attention_implementation) != den:
    raise checkpoints.CheckpointError(f"{directory}: unet_ori's architecture differs from the "
                                      f"denoiser's ({refiner_part_dir(refiner_dir, 'unet')})")
  return directory


def initial_unet_encoder(ref: refiner.Refiner, config: ml_collections.ConfigDict, mesh, rules
                         ) -> tuple[Params, Any]:
  """`unet_ori` without a trained state at hand: the encoder half of the imported refiner's
  `unet_ori` (`config.init.refiner`), of `config.init.unet`, or of the random denoiser init of
  `config.seed` (only that half is computed)."""
  size = config.data.image_size
  abstract, shardings = sharding.abstract_sharded(
      lambda r: ref.init_unet(r, size), trainable_key(config), mesh, rules)
  enc_abstract, enc_sh = denoiser.encoder_params(abstract), denoiser.encoder_params(shardings)
  refiner_dir = _refiner_dir(config)
  if refiner_dir:
    return params_ckpt.load_params(_unet_ori_dir(ref, refiner_dir), enc_abstract, enc_sh,
                                   partial=True), enc_sh
  if config.init.unet:
    return load_init_unet(config, enc_abstract, enc_sh, partial=True), enc_sh
  with jax.set_mesh(mesh):
    encoder = jax.jit(lambda r: denoiser.encoder_params(nn.meta.unbox(ref.init_unet(r, size))),
                      out_shardings=enc_sh)(trainable_key(config))
  return encoder, enc_sh


def initial_unet(ref: refiner.Refiner, config: ml_collections.ConfigDict, mesh, rules
                 ) -> tuple[Params, bool]:
  """The whole denoiser before training, whose encoder half is `unet_ori` (what the original
  stores as `unet_ori/`), and whether only that half exists.

  From the imported refiner's `unet_ori` (encoder-only when the original's pipeline folder held
  only that half), `config.init.unet`, or the random init of `config.seed`.
  """
  size = config.data.image_size
  abstract, shardings = sharding.abstract_sharded(
      lambda r: ref.init_unet(r, size), trainable_key(config), mesh, rules)
  refiner_dir = _refiner_dir(config)
  if refiner_dir:
    directory = _unet_ori_dir(ref, refiner_dir)
    if params_ckpt.load_meta(directory).get("encoder_only"):
      return initial_unet_encoder(ref, config, mesh, rules)[0], True
    return params_ckpt.load_params(directory, abstract, shardings), False
  if config.init.unet:
    return load_init_unet(config, abstract, shardings), False
  with jax.set_mesh(mesh):
    return jax.jit(lambda r: nn.meta.unbox(ref.init_unet(r, size)),
                   out_shardings=shardings)(trainable_key(config)), False


def load_initial_trainable(config: ml_collections.ConfigDict, params: Params, shardings
                           ) -> Params:
  """The trainable params a run starts from: `params` (the random init, sharded) with the
  denoiser replaced by `config.init.unet`, or unet + guidance (+ the projector, when its shape
  fits) by the imported refiner `config.init.refiner`. Arrays or abstract targets."""
  params = dict(params)
  refiner_dir = _refiner_dir(config)
  if config.init.unet:
    params["unet"] = load_init_unet(config, params["unet"], shardings["unet"])
  if not refiner_dir:
    return params
  for part in ("unet", "guidance"):
    params[part] = params_ckpt.load_params(refiner_part_dir(refiner_dir, part), params[part],
                                           shardings[part])
  directory = refiner_part_dir(refiner_dir, "projector")
  if "projector" in params and _has_params(directory):
    try:
      params["projector"] = params_ckpt.load_params(directory, params["projector"],
                                                    shardings["projector"])
    except checkpoints.CheckpointError as e:
      logging.warning("REPA projector of %s does not fit this config's teacher; it starts "
                      "from its random init (%s)", refiner_dir, e)
  return params


def _load_or_init(directory, init_fn, rng, mesh, rules):
  """Sharded params: restored from a params checkpoint when `directory` is set, else init."""
  if not directory:
    return sharding.create_sharded(init_fn, rng, mesh, rules)
  abstract, shardings = sharding.abstract_sharded(init_fn, rng, mesh, rules)
  return params_ckpt.load_params(directory, abstract, shardings), shardings


def _load_or_init_autoencoder(ref: refiner.Refiner, config: ml_collections.ConfigDict,
                              directory, init_fn, rng, mesh, rules):
  """`_load_or_init` for the VAE; a 3-band checkpoint under a config whose images have other
  bands gets its image stem built from the RGB one (`autoencoder.with_image_stem`)."""
  ae = ref.config.autoencoder
  if not directory or not ae.has_image_stem or parts.part_config(
      directory, "autoencoder").has_image_stem:
    return _load_or_init(directory, init_fn, rng, mesh, rules)
  abstract, shardings = sharding.abstract_sharded(init_fn, rng, mesh, rules)
  stem = {"encoder": "conv_in_image", "decoder": "conv_out_image"}
  rgb_only = lambda t: {k: ({n: v for n, v in t[k].items() if n != stem[k]}  # noqa: E731
                            if k in stem else t[k]) for k in t}
  params = params_ckpt.load_params(directory, rgb_only(abstract), rgb_only(shardings))
  bands = tuple(config.data.get("rgb_bands", (0, 1, 2)))
  with jax.set_mesh(mesh):
    params = jax.jit(lambda p: autoencoder.with_image_stem(p, ae, bands),
                     out_shardings=shardings)(params)
  logging.info("autoencoder %s: %d-band image stem built from its RGB stem", directory,
               ae.image_channels)
  return params, shardings


def frozen_init_fns(ref: refiner.Refiner, config: ml_collections.ConfigDict, *,
                    with_teacher: bool = True) -> dict[str, Callable[[jax.Array], Params]]:
  """{part: rng -> params} of the frozen parts a checkpoint may replace (vae, label_embed
  [, teacher]): `init_frozen` runs them (or restores into their shapes), `idgbr plan` traces
  them abstractly. `unet_ori` comes from the denoiser's init, the context from a file."""
  size = config.data.image_size
  channels = ref.config.autoencoder.in_channels
  fns = {"vae": lambda r: ref.vae.init(r, jnp.zeros((1, size, size, channels)), None,
                                       False)["params"],
         "label_embed": lambda r: ref.label_embed.init(r, jnp.zeros((1, 2, 2),
                                                                    jnp.int32))["params"]}
  if with_teacher and ref.teacher is not None:
    p = ref.config.teacher.patch_size
    fns["teacher"] = lambda r: ref.teacher.init(r, jnp.zeros((1, p, p, 3)))["params"]
  return fns


def context_shape(ref: refiner.Refiner) -> tuple[int, int, int]:
  """The text context's shape (1, L, cross_attention_dim); zeros when no file is given."""
  return (1, ref.config.context_length, ref.config.denoiser.cross_attention_dim)


# The frozen tree's weights (not the text context, an input) that `config.model.frozen_dtype`
# stores in a narrower dtype.
FROZEN_WEIGHTS = ("vae", "label_embed", "unet_ori", "teacher")


def frozen_dtype(config: ml_collections.ConfigDict):
  """`config.model.frozen_dtype` (ours; float32 when the key is absent, as in older runs)."""
  return common.dtype_from_name(config.model.get("frozen_dtype", "float32"))


def cast_frozen(frozen: Params, dtype) -> Params:
  """`frozen` with the floating weights of `FROZEN_WEIGHTS` in `dtype`, same shardings. Cast a
  leaf at a time, each float32 array deleted once cast (consumed: a float32 buffer cannot be
  donated to a bf16 output), so the peak is the float32 tree plus one leaf. Computation still
  runs in the model's dtype: a layer promotes bf16 weights against its float32 activations, so
  only the weights are rounded."""
  if dtype == jnp.float32:
    return frozen

  def cast(x):
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == dtype:
      return x
    y = x.astype(dtype)  # elementwise on the committed array: keeps its sharding
    x.delete()
    return y
  return {k: jax.tree.map(cast, v) if k in FROZEN_WEIGHTS else v for k, v in frozen.items()}


def init_frozen(ref: refiner.Refiner, config: ml_collections.ConfigDict, mesh, rules, *,
                unet_ori: tuple[Params, Any] | None = None, with_teacher: bool = True,
                full_precision: bool = False) -> tuple[Params, Any]:
  """Frozen params {vae, label_embed, unet_ori, context[, teacher]} and their shardings.

  `unet_ori` is (params, shardings) of the encoder half of the initial denoiser (a trainer
  passes a copy of its freshly initialised state's: consumed when cast); None computes it
  (`initial_unet_encoder`). Under `config.init.refiner` it is always the imported refiner's
  `unet_ori`, whatever is passed: a state initialised from the import holds the *trained* unet,
  whose encoder is not unet_ori. The teacher is only built with `with_teacher` and a config
  that has one. The weights are stored in `config.model.frozen_dtype` unless `full_precision`
  (export writes them as read).
  """
  if unet_ori is None or _refiner_dir(config):
    unet_ori = initial_unet_encoder(ref, config, mesh, rules)
  r_vae, r_le, r_teacher = jax.random.split(common.init_key(config.seed + FROZEN_SEED_OFFSET), 3)
  init_fns = frozen_init_fns(ref, config, with_teacher=with_teacher)
  frozen, f_sh = {}, {}
  frozen["vae"], f_sh["vae"] = _load_or_init_autoencoder(
      ref, config, frozen_part_dir(config, "autoencoder"), init_fns["vae"], r_vae, mesh, rules)
  frozen["label_embed"], f_sh["label_embed"] = _load_or_init(
      frozen_part_dir(config, "label_embed"), init_fns["label_embed"], r_le, mesh, rules)
  if "teacher" in init_fns:
    frozen["teacher"], f_sh["teacher"] = _load_or_init(
        config.init.teacher, init_fns["teacher"], r_teacher, mesh, rules)
  frozen["unet_ori"], f_sh["unet_ori"] = unet_ori
  d = ref.config.denoiser
  ctx_path = context_path(config)
  ctx = (paths.load_npy(ctx_path) if ctx_path else np.zeros(context_shape(ref), np.float32))
  ctx = ctx[None] if ctx.ndim == 2 else ctx
  if ctx.ndim != 3 or ctx.shape[-1] != d.cross_attention_dim:
    raise ValueError(f"context {ctx_path} has shape {ctx.shape}; the denoiser "
                     f"expects (1, L, {d.cross_attention_dim})")
  f_sh["context"] = sharding.replicated(mesh)
  # Every process holds the same host array: place it without device_put's cross-process
  # equality check (a collective, for a value read from the same file on every host).
  ctx = np.asarray(ctx, np.float32)
  frozen["context"] = jax.make_array_from_callback(ctx.shape, f_sh["context"], lambda i: ctx[i])
  if not full_precision:
    frozen = cast_frozen(frozen, frozen_dtype(config))
  return frozen, f_sh


# ----- a trained refiner -------------------------------------------------------------------------
class LoadedRefiner(NamedTuple):
  refiner: refiner.Refiner
  trainable: Params   # {unet, guidance[, projector]}, sharded on `mesh`
  frozen: Params      # {vae, label_embed, unet_ori, context}: no teacher
  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh


def load_refiner(workdir: str, config: ml_collections.ConfigDict | None = None, *,
                 with_projector: bool = False, step: int | None = None,
                 full_precision: bool = False) -> LoadedRefiner:
  """A trained refiner from `<workdir>/checkpoints`, or an imported refiner folder (`idgbr
  convert --from=idgbr`, see the module doc), params only.

  The trainable params are restored into abstract targets (no random init, no optimizer
  state); the frozen parts are re-read from the paths recorded in the run's config, without the
  teacher. `with_projector` also restores the REPA projector (export to the original's layout).
  An imported folder refines under `imported_refiner_config` (unless `config` is given). The
  frozen weights are in `config.model.frozen_dtype`, as in training, unless `full_precision`.
  """
  if is_imported_refiner(workdir):
    return _load_imported(str(workdir), config, with_projector, full_precision)
  ckpt_dir = paths.join(workdir, "checkpoints")
  config = config or load_config(workdir, step)
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
  frozen, _ = init_frozen(ref, config, mesh, rules, with_teacher=False,
                          full_precision=full_precision)
  return LoadedRefiner(ref, trainable, frozen, config, mesh)


def load_config(workdir: str, step: int | None = None) -> ml_collections.ConfigDict:
  """The config `load_refiner(workdir)` uses: a Stage II run's (from `<workdir>/checkpoints`),
  or `imported_refiner_config` for an imported refiner folder."""
  if is_imported_refiner(workdir):
    return imported_refiner_config(str(workdir))
  return checkpoints.load_config(paths.join(workdir, "checkpoints"), step)


def _load_imported(directory: str, config, with_projector: bool, full_precision: bool
                   ) -> LoadedRefiner:
  config = config or imported_refiner_config(directory)
  mesh = sharding.mesh_from_config(config)
  rules = tuple(config.sharding_rules)
  ref = build_refiner(config)
  abstract, shardings = sharding.abstract_sharded(trainable_init_fn(ref, config),
                                                  trainable_key(config), mesh, rules)
  projector_dir = refiner_part_dir(directory, "projector")
  if not (with_projector and "projector" in abstract and _has_params(projector_dir)):
    abstract.pop("projector", None)
    shardings.pop("projector", None)
  trainable = load_initial_trainable(config, abstract, shardings)
  if with_projector and "projector" not in trainable and _has_params(projector_dir):
    trainable["projector"] = params_ckpt.load_params(projector_dir)  # no teacher: as stored
  frozen, _ = init_frozen(ref, config, mesh, rules, with_teacher=False,
                          full_precision=full_precision)
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
