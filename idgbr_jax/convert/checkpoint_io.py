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

import numpy as np

from idgbr_jax import paths
from idgbr_jax.convert import clip_context, diffusers_folder, files, idgbr
from idgbr_jax.convert import dinov2 as dinov2_convert
from idgbr_jax.convert.files import ConversionError
from idgbr_jax.assembly import parts
from idgbr_jax.checkpoints import CheckpointError
from idgbr_jax.models import denoiser

FORMATS = ("diffusers", "dinov2", "idgbr", "clip")
EXPORT_FORMATS = ("diffusers", "idgbr")

def save_checkpoint(directory: str, config, params, source: str) -> str:
  """A params checkpoint with meta {"kind", "config", "source"} (float32 numpy leaves)."""
  from idgbr_jax.checkpoints import params as params_ckpt  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  kind = parts.kind_of(config)
  cfg = config if kind == parts.PROJECTOR else dataclasses.asdict(config)
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)
  params_ckpt.save_params(directory, params, {"kind": kind, "config": cfg,
                                              "source": os.fspath(paths.resolve(source))})
  return os.fspath(paths.resolve(directory))


def convert_to_checkpoints(source_format: str, src: str, dst: str, *,
                           tokenizer: str | None = None, num_heads: int | None = None
                           ) -> dict[str, str]:
  """Converts PyTorch-side weights at `src`; returns {part: written path}.

  Args:
    source_format: "diffusers" (a UNet2DConditionModel or AutoencoderKL folder -> one
      checkpoint at `dst`), "dinov2" (official .pth or transformers folder -> `dst`), "idgbr"
      (an original checkpoint-N / pipeline folder -> `dst/{unet,guidance,label_embed,vae,
      projector}`; or a LabelEmbedNet folder / safetensors -> `dst`), "clip" (a Stable
      Diffusion folder or CLIPTextModel folder -> the empty-prompt context `dst`, a .npy).
    src: input path.
    dst: output directory (a .npy path for "clip").
    tokenizer: "clip" only: the tokenizer folder when `src` has none.
    num_heads: "dinov2" .pth only: heads, when not embed_dim // 64.
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
  parts = idgbr.load_idgbr(src)
  out = {}
  for name, part in (("unet", parts.unet), ("guidance", parts.guidance),
                     ("label_embed", parts.label_embed), ("vae", parts.vae),
                     ("projector", parts.projector)):
    if part is None:
      continue
    module, params = part
    config = ({"hidden_dim": module.hidden_dim, "out_dim": module.out_dim}
              if name == "projector" else module.config)
    out[name] = save_checkpoint(files.join(dst, name), config, params, src)
  return out


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


def export_checkpoint(checkpoint: str, to: str, dst: str) -> dict[str, str]:
  """Writes PyTorch-side weights from a params checkpoint or a Stage II run directory.

  Args:
    checkpoint: a params checkpoint (`meta.json` + `params/`, e.g. written by `idgbr convert`
      or the pretraining commands) or a Stage II run directory (with `checkpoints/`).
    to: "diffusers" (UNet / VAE folders) or "idgbr" (the original's layout, see
      `convert.idgbr`).
    dst: output folder. A Stage II run gives `dst/unet` + `dst/vae` (diffusers) or
      `dst/{unet_gen,interact_net,label_embed_net,vae}` + `dst/projectors.safetensors` (idgbr).

  Returns:
    {part: written path}.
  """
  if to not in EXPORT_FORMATS:
    raise ConversionError(f"unknown export format {to!r}; known: {EXPORT_FORMATS}")
  checkpoint, dst = os.fspath(checkpoint), os.fspath(dst)
  if files.is_file(files.join(checkpoint, "meta.json")):
    return _export_params_checkpoint(checkpoint, to, dst)
  if files.is_dir(files.join(checkpoint, "checkpoints")):
    return _export_stage2(checkpoint, to, dst)
  raise ConversionError(f"{checkpoint}: neither a params checkpoint (meta.json) nor a Stage II "
                        "run directory (checkpoints/)")


def _export_params_checkpoint(checkpoint: str, to: str, dst: str) -> dict[str, str]:
  kind, config, params = _load_params_checkpoint(checkpoint)
  if kind in ("denoiser", "autoencoder"):
    class_name = "UNet2DConditionNewModel" if (to == "idgbr" and kind == "denoiser") else None
    return {kind: diffusers_folder.save_diffusers(dst, config, params, class_name=class_name)}
  if to != "idgbr":
    raise ConversionError(f"{checkpoint}: a {kind!r} checkpoint has no diffusers form; use "
                          "--to=idgbr")
  if kind == "label_embed":
    return {kind: idgbr.save_label_embed(dst, params)}
  if kind == "guidance":
    return {kind: idgbr.save_interactnet(dst, config, params)}
  if kind == "projector":
    paths.makedirs(dst)
    return {kind: files.write_safetensors(files.join(dst, idgbr.PROJECTOR_FILE),
                                          idgbr.projector_params_to_torch(params))}
  raise ConversionError(f"{checkpoint}: no export for a {kind!r} checkpoint (DINOv2 is only "
                        "imported; use the original .pth)")


def _export_stage2(workdir: str, to: str, dst: str) -> dict[str, str]:
  from idgbr_jax.assembly import stage2  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  ref, trainable, frozen, _, _ = stage2.load_refiner(os.fspath(paths.resolve(workdir)),
                                                     with_projector=to == "idgbr")
  host = lambda tree: jax.tree.map(np.asarray, jax.device_get(tree))  # noqa: E731
  cfg = ref.config
  if to == "diffusers":
    return {"unet": diffusers_folder.save_diffusers(files.join(dst, "unet"), cfg.denoiser,
                                                    host(trainable["unet"])),
            "vae": diffusers_folder.save_diffusers(files.join(dst, "vae"), cfg.autoencoder,
                                                   host(frozen["vae"]))}
  path = idgbr.export_idgbr(
      dst, unet_config=cfg.denoiser, unet_params=host(trainable["unet"]),
      guidance_config=cfg.guidance, guidance_params=host(trainable["guidance"]),
      projector_params=host(trainable["projector"]) if "projector" in trainable else None,
      label_embed_params=host(frozen["label_embed"]), vae_config=cfg.autoencoder,
      vae_params=host(frozen["vae"]))
  out = {"unet": files.join(path, idgbr.UNET_DIR),
         "guidance": files.join(path, idgbr.GUIDANCE_DIR),
         "label_embed": files.join(path, idgbr.LABEL_EMBED_DIR),
         "vae": files.join(path, idgbr.VAE_DIR)}
  if "projector" in trainable:
    out["projector"] = files.join(path, idgbr.PROJECTOR_FILE)
  return out
