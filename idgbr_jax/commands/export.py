"""idgbr export --checkpoint=DIR --to=diffusers|idgbr --dst=PATH

Writes our weights for PyTorch:

  --checkpoint  a params checkpoint (meta.json + params/, e.g. from `idgbr convert`) or a
                Stage II run directory (with checkpoints/; its latest step is exported)
  --to=diffusers  UNet / VAE as diffusers folders (config.json + safetensors); a Stage II run
                  gives DST/unet and DST/vae
  --to=idgbr      the original IDGBR layout, loadable by its code: DST/unet_gen,
                  DST/interact_net, DST/label_embed_net, DST/vae, DST/projectors.safetensors

--checkpoint and --dst are local paths or URLs that etils.epath handles (gs://bucket/...).

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
flags.mark_flags_as_required(["checkpoint", "to", "dst"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup(tensorflow=False)
  # pylint: disable=import-outside-toplevel
  from idgbr_jax import checkpoints
  from idgbr_jax.convert import checkpoint_io, files
  try:
    written = checkpoint_io.export_checkpoint(_CHECKPOINT.value, _TO.value, _DST.value)
  except (files.ConversionError, checkpoints.CheckpointError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for part, path in written.items():
    print(f"{part}: {path}")
  return 0
