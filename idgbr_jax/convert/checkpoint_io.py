"""What `idgbr convert` and `idgbr export` do: PyTorch-side files <-> our params checkpoints.

`convert_to_checkpoints` writes params checkpoints (`idgbr_jax.checkpoints.params`: `params/`
+ `meta.json` = {"kind", "config", "source"}) whose `kind` is what Stage II's
`config.init.*` expects: "denoiser" (init.unet), "autoencoder" (init.autoencoder),
"label_embed" (init.label_embed), "dinov2" (init.teacher); the CLIP context is a `.npy`
(init.context). "guidance" and "projector" checkpoints hold the rest of an original IDGBR run.

`export_checkpoint` reads a params checkpoint or a Stage II run directory and writes diffusers
folders or the original IDGBR layout.

Every source and destination is a local path or a URL that `etils.epath` handles (`gs://...`).
"""
from __future__ import annotations

import dataclasses
import os
from typing import Callable

import numpy as np
from absl import logging

from idgbr_jax import paths
from idgbr_jax.convert import clip_context, diffusers_folder, files, idgbr
from idgbr_jax.convert import dinov2 as dinov2_convert
from idgbr_jax.convert.files import ConversionError
from idgbr_jax.assembly import parts
from idgbr_jax.checkpoints import CheckpointError
from idgbr_jax.models import denoiser

FORMATS = ("diffusers", "dinov2", "idgbr", "clip")
EXPORT_FORMATS = ("diffusers", "idgbr")

def save_checkpoint(directory: str, config, params, source: str, **meta) -> str:
  """A params checkpoint with meta {"kind", "config", "source", **meta} (float32 leaves)."""
  from idgbr_jax.checkpoints import params as params_ckpt  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  kind = parts.kind_of(config)
  cfg = config if kind == parts.PROJECTOR else dataclasses.asdict(config)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  params_ckpt.save_params(directory, params, {"kind": kind, "config": cfg,
                                              "source": os.fspath(paths.resolve(source)),
                                              **meta})
  return os.fspath(paths.resolve(directory))


def _warn_default(message: str) -> None:
  logging.warning("%s", message)


def convert_to_checkpoints(source_format: str, src: str, dst: str, *,
                           tokenizer: str | None = None, num_heads: int | None = None,
                           base: str | None = None, label_embed: str | None = None,
                           warn: Callable[[str], None] | None = None) -> dict[str, str]:
  """Converts PyTorch-side weights at `src`; returns {part: written path}.

  Args:
    source_format: "diffusers" (a UNet2DConditionModel or AutoencoderKL folder -> one
      checkpoint at `dst`), "dinov2" (official .pth or transformers folder -> `dst`), "idgbr"
      (an original checkpoint-N / pipeline folder, or our `export --to=idgbr` -> a refiner
      folder, see below; or a LabelEmbedNet folder / safetensors -> `dst`), "clip" (a Stable
      Diffusion folder or CLIPTextModel folder -> the empty-prompt context `dst`, a .npy).
    src: input path.
    dst: output directory (a .npy path for "clip").
    tokenizer: "clip" only: the tokenizer folder when `src` has none.
    num_heads: "dinov2" .pth only: heads, when not embed_dim // 64.
    base: "idgbr" only: the folder the original's inference would take the frozen parts from
      when the run's experiment root lacks them (`--base_model_name_or_path`: the SD-1.5 folder
      the run was trained from, or its final pipeline folder).
    label_embed: "idgbr" only: the LabelEmbedNet folder when the run has none
      (`--label_embed_dir`).
    warn: called with a message for each part an "idgbr" import could not find.

  An "idgbr" import writes a whole refiner (see `assembly.stage2`): `dst/{unet,guidance,
  label_embed,vae,unet_ori[,projector]}`, `dst/context.npy` and `dst/refiner.json`, which
  `idgbr refine --checkpoint=dst` refines with and `--config.init.refiner=dst` fine-tunes.
  """
  src, dst = os.fspath(src), os.fspath(dst)
  if source_format not in FORMATS:
    raise ConversionError(f"unknown source format {source_format!r}; known: {FORMATS}")
  if not paths.exists(src):
    raise ConversionError(f"{src}: not found")
  if source_format == "clip":
    return {"context": clip_context.save_context(
        dst, clip_context.empty_prompt_context(src, tokenizer))}
  if source_format == "diffusers":
    module, params = diffusers_folder.load_diffusers(src)
    return {"unet" if isinstance(module.config, denoiser.DenoiserConfig) else "vae":
            save_checkpoint(dst, module.config, params, src)}
  if source_format == "dinov2":
    module, params = dinov2_convert.load_dinov2(src, num_heads=num_heads)
    return {"teacher": save_checkpoint(dst, module.config, params, src)}
  # idgbr
  if _is_label_embed(src):
    module, params = idgbr.load_label_embed(src)
    return {"label_embed": save_checkpoint(dst, module.config, params, src)}
  return _import_refiner(src, dst, base, label_embed, warn or _warn_default)


def _import_refiner(src: str, dst: str, base, label_embed, warn) -> dict[str, str]:
  from idgbr_jax.assembly import stage2  # pylint: disable=import-outside-toplevel
  found = idgbr.load_idgbr(src, base=base, label_embed=label_embed)
  out = {}
  for name, part in (("unet", found.unet), ("guidance", found.guidance),
                     ("label_embed", found.label_embed), ("vae", found.vae),
                     ("projector", found.projector), ("unet_ori", found.unet_ori)):
    if part is None:
      continue
    module, params = part
    config = ({"hidden_dim": module.hidden_dim, "out_dim": module.out_dim}
              if name == "projector" else module.config)
    extra = {"encoder_only": True} if name == "unet_ori" and found.unet_ori_encoder_only else {}
    out[name] = save_checkpoint(files.join(dst, name), config, params,
                                (found.sources or {}).get(_SOURCE_KEYS.get(name, name), src),
                                **extra)
  if found.context is not None:
    out["context"] = clip_context.save_context(files.join(dst, stage2.REFINER_CONTEXT),
                                               found.context)
  lacking = [what for what, present in (
      ("label_embed_net/ (pass --label_embed=DIR)", found.label_embed is not None),
      ("vae/", found.vae is not None), ("unet_ori/", found.unet_ori is not None),
      ("the text context (text_encoder/ + tokenizer/, or context.npy)",
       found.context is not None)) if not present]
  if not lacking:
    # A whole refiner: its refinement settings are our export's, else the original's inference
    # defaults; the schedule is the run's scheduler/ when there is one.
    settings = stage2.merged_settings(found.settings)
    if found.schedule is not None:
      settings["diffusion"].update(found.schedule)
    if not settings["image_size"]:
      settings["image_size"] = (found.guidance[0].config.skip_resolutions[0]
                                * found.vae[0].config.downsample_factor)
    settings["source"] = os.fspath(paths.resolve(src))
    out["settings"] = files.join(dst, stage2.REFINER_SETTINGS)
    paths.write_json(out["settings"], settings)
  else:
    warn(f"{src}: found no {', '.join(lacking)} (looked in it, its experiment root"
         + (f" and {base}" if base else "") + "), which the original's inference takes from "
         "--base_model_name_or_path / --label_embed_dir. Without them "
         f"{dst} cannot refine or fine-tune as a whole (its unet/ still serves as init.unet): "
         "pass --base=<the SD folder or pipeline folder the run was trained from>")
  return out


# Part -> the key of `IdgbrParts.sources` it was read from.
_SOURCE_KEYS = {"label_embed": idgbr.LABEL_EMBED_DIR, "vae": idgbr.VAE_DIR,
                "unet_ori": idgbr.UNET_ORI_DIR, "projector": idgbr.PROJECTOR_FILE}


def _is_label_embed(src: str) -> bool:
  if files.is_file(src):
    return src.endswith(".safetensors")
  cfg = files.join(src, "config.json")
  return files.is_file(cfg) and files.read_json(cfg).get("_class_name") == "LabelEmbedNet"


# ----- export ------------------------------------------------------------------------------------

def _load_params_checkpoint(directory: str):
  from idgbr_jax.checkpoints import params as params_ckpt  # pylint: disable=import-outside-toplevel
  meta = params_ckpt.load_meta(directory)
  try:
    config = parts.config_from_meta(meta, files.join(directory, "meta.json"))
  except CheckpointError as e:
    raise ConversionError(str(e)) from e
  params = params_ckpt.load_params(directory)
  return meta["kind"], config, params


def export_checkpoint(checkpoint: str, to: str, dst: str, *, allow_unloadable: bool = False,
                      warn: Callable[[str], None] | None = None) -> dict[str, str]:
  """Writes PyTorch-side weights from a params checkpoint, a Stage II run directory or an
  imported refiner folder (`idgbr convert --from=idgbr`).

  Args:
    checkpoint: a params checkpoint (`meta.json` + `params/`, e.g. written by `idgbr convert`
      or the pretraining commands), a Stage II run directory (with `checkpoints/`; its latest
      step) or an imported refiner folder.
    to: "diffusers" (UNet / VAE folders) or "idgbr" (the original's layout, see
      `convert.idgbr`).
    dst: output folder. A refiner gives `dst/unet` + `dst/vae` (diffusers) or the original's
      folder (idgbr): `unet_gen/`, `interact_net/`, `label_embed_net/`, `vae/`, `unet_ori/`,
      `scheduler/`, `text_encoder/`, `tokenizer/`, plus `projectors.safetensors`,
      `context.npy`, `idgbr_jax.json` (see `idgbr.export_idgbr`).
    allow_unloadable: "idgbr": write a refiner the original cannot load (its hard-coded
      sizes, `idgbr.original_load_problems`) with a warning, instead of refusing. (A lone
      guidance / label-embedding checkpoint is always written, with the warning.)
    warn: called with each warning (default: absl logging).

  Returns:
    {part: written path}.

  Raises:
    ConversionError: bad input, or (without `allow_unloadable`) nets the original cannot load.
  """
  if to not in EXPORT_FORMATS:
    raise ConversionError(f"unknown export format {to!r}; known: {EXPORT_FORMATS}")
  warn = warn or _warn_default
  checkpoint, dst = os.fspath(checkpoint), os.fspath(dst)
  if files.is_file(files.join(checkpoint, "meta.json")):
    return _export_params_checkpoint(checkpoint, to, dst, allow_unloadable, warn)
  from idgbr_jax.assembly import stage2  # pylint: disable=import-outside-toplevel
  if (files.is_dir(files.join(checkpoint, "checkpoints"))
      or stage2.is_imported_refiner(checkpoint)):
    return _export_stage2(checkpoint, to, dst, allow_unloadable, warn)
  raise ConversionError(f"{checkpoint}: neither a params checkpoint (meta.json), a Stage II "
                        "run directory (checkpoints/) nor an imported refiner (refiner.json)")


def _check_loadable(what: str, problems: list[str], allow_unloadable: bool, warn) -> None:
  if not problems:
    return
  text = f"{what}: the original IDGBR cannot load this export: " + "; ".join(problems)
  if not allow_unloadable:
    raise ConversionError(text + ". Pass --allow_unloadable to write it anyway (our `idgbr "
                          "convert --from=idgbr` reads it back; the original does not).")
  warn(text + " (written anyway).")


def _export_params_checkpoint(checkpoint: str, to: str, dst: str, allow_unloadable: bool,
                              warn) -> dict[str, str]:
  kind, config, params = _load_params_checkpoint(checkpoint)
  if kind in ("denoiser", "autoencoder"):
    class_name = "UNet2DConditionNewModel" if (to == "idgbr" and kind == "denoiser") else None
    return {kind: diffusers_folder.save_diffusers(dst, config, params, class_name=class_name)}
  if to != "idgbr":
    raise ConversionError(f"{checkpoint}: a {kind!r} checkpoint has no diffusers form; use "
                          "--to=idgbr")
  # A lone net is a part, not a run the original loads: what it cannot load is a warning.
  if kind == "label_embed":
    _check_loadable(checkpoint, idgbr.original_load_problems(None, config), True, warn)
    return {kind: idgbr.save_label_embed(dst, params)}
  if kind == "guidance":
    _check_loadable(checkpoint, idgbr.original_load_problems(config), True, warn)
    return {kind: idgbr.save_interactnet(dst, config, params)}
  if kind == "projector":
    paths.makedirs(dst)
    return {kind: files.write_safetensors(files.join(dst, idgbr.PROJECTOR_FILE),
                                          idgbr.projector_params_to_torch(params))}
  raise ConversionError(f"{checkpoint}: no export for a {kind!r} checkpoint (DINOv2 is only "
                        "imported; use the original .pth)")


def _export_stage2(workdir: str, to: str, dst: str, allow_unloadable: bool,
                   warn) -> dict[str, str]:
  from idgbr_jax.assembly import stage2  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  workdir = os.fspath(paths.resolve(workdir))
  config = stage2.load_config(workdir)
  if to == "idgbr" and not allow_unloadable:  # refuse before reading any weights
    cfg = stage2.build_refiner(config).config
    _check_loadable(workdir, idgbr.original_load_problems(cfg.guidance, cfg.label_embed),
                    allow_unloadable, warn)
  # Frozen parts as read (float32), whatever the run's model.frozen_dtype.
  ref, trainable, frozen, config, mesh = stage2.load_refiner(workdir, config,
                                                             with_projector=to == "idgbr",
                                                             full_precision=True)
  host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
  cfg = ref.config
  if to == "diffusers":
    return {"unet": diffusers_folder.save_diffusers(files.join(dst, "unet"), cfg.denoiser,
                                                    host(trainable["unet"])),
            "vae": diffusers_folder.save_diffusers(files.join(dst, "vae"), cfg.autoencoder,
                                                   host(frozen["vae"]))}
  problems = idgbr.original_load_problems(cfg.guidance, cfg.label_embed)
  context = host(frozen["context"])
  try:
    clip_context.constant_text_encoder(context)
    text_encoder = True
  except ConversionError as e:
    text_encoder = False
    problems.append(f"the run's text context cannot be written as the text encoder the "
                    f"original builds its prompt states with ({e})")
  _check_loadable(workdir, problems, allow_unloadable, warn)
  for difference in stage2.original_refine_differences(config):
    warn(f"{workdir}: the original loads this export but refines differently: {difference}")
  unet_ori, encoder_only = stage2.initial_unet(ref, config, mesh, tuple(config.sharding_rules))
  path = idgbr.export_idgbr(
      dst, unet_config=cfg.denoiser, unet_params=host(trainable["unet"]),
      guidance_config=cfg.guidance, guidance_params=host(trainable["guidance"]),
      projector_params=host(trainable["projector"]) if "projector" in trainable else None,
      label_embed_params=host(frozen["label_embed"]), vae_config=cfg.autoencoder,
      vae_params=host(frozen["vae"]), unet_ori_params=host(unet_ori),
      unet_ori_encoder_only=encoder_only, context=context,
      settings=stage2.refine_settings(config), text_encoder=text_encoder)
  return idgbr.exported_parts(path)
