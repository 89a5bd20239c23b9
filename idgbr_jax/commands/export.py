"""idgbr export --checkpoint=DIR --to=diffusers|idgbr --dst=PATH

Writes our weights for PyTorch:

  --checkpoint  a params checkpoint (meta.json + params/, e.g. from `idgbr convert`) or a
                Stage II run directory (with checkpoints/; its latest step is exported)
  --to=diffusers  UNet / VAE as diffusers folders (config.json + safetensors); a Stage II run
                  gives DST/unet and DST/vae
  --to=idgbr      the original IDGBR layout, everything its tools/infer.py needs
                  (--model_path=DST): DST/unet_gen, interact_net, label_embed_net, vae,
                  unet_ori (the initial UNet), scheduler, text_encoder + tokenizer (whose
                  states are the run's context); and, ours, projectors.safetensors,
                  context.npy, idgbr_jax.json (the refinement settings)
  --allow_unloadable  --to=idgbr: write a refiner the original cannot load (its hard-coded
                  CG attention width 512, label-embedding width 128) with a warning instead of
                  refusing (a lone guidance / label-embedding checkpoint only warns)

--checkpoint is a params checkpoint, a Stage II run directory or an imported refiner folder
(`idgbr convert --from=idgbr`); it and --dst are local paths or URLs that etils.epath handles
(gs://bucket/...). Settings under which the original would refine differently (an img2img
start, guidance <= 1, ...) are printed as warnings.

import(export(p)) == p exactly (tested).
"""
import sys

from absl import flags

from idgbr_jax.commands import _runtime

_CHECKPOINT = flags.DEFINE_string("checkpoint", None,
                                  "Params checkpoint or Stage II run directory (local or a "
                                  "gs:// URL).")
_TO = flags.DEFINE_enum("to", None, ["diffusers", "idgbr"], "Output format.")
_DST = flags.DEFINE_string("dst", None, "Output folder (local or a gs:// URL).")
_ALLOW_UNLOADABLE = flags.DEFINE_bool(
    "allow_unloadable", False, "--to=idgbr: export nets the original cannot load (e.g. a CG "
    "attention width other than its hard-coded 512), with a warning, instead of refusing.")
flags.mark_flags_as_required(["checkpoint", "to", "dst"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup(tensorflow=False)
  # pylint: disable=import-outside-toplevel
  from idgbr_jax import checkpoints
  from idgbr_jax.convert import checkpoint_io, files
  try:
    written = checkpoint_io.export_checkpoint(
        _CHECKPOINT.value, _TO.value, _DST.value, allow_unloadable=_ALLOW_UNLOADABLE.value,
        warn=lambda message: print(f"warning: {message}", file=sys.stderr))
  except (files.ConversionError, checkpoints.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for part, path in written.items():
    print(f"{part}: {path}")
  return 0
