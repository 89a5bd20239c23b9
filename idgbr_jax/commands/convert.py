"""idgbr convert --from=diffusers|dinov2|idgbr|clip --src=PATH --dst=PATH

Converts PyTorch-side weights into params checkpoints (`params/` + `meta.json`) that Stage II
configs point at:

  --from=diffusers  a diffusers UNet2DConditionModel or AutoencoderKL folder (e.g. SD-1.5's
                    unet/ or vae/)             -> DST  (--config.init.unet / init.autoencoder)
  --from=dinov2     official dinov2_vit*14_pretrain.pth, or a transformers Dinov2Model folder
                                               -> DST  (--config.init.teacher)
  --from=idgbr      an original IDGBR checkpoint-N/ or pipeline folder, or our
                    `idgbr export --to=idgbr` folder -> DST, a whole refiner:
                    DST/{unet,guidance,label_embed,vae,unet_ori[,projector]}, DST/context.npy,
                    DST/refiner.json (`idgbr refine --checkpoint=DST`,
                    `idgbr train --config.init.refiner=DST`). The frozen parts are found as the
                    original's inference finds them: in the folder, its experiment root, else
                    --base (its --base_model_name_or_path) / --label_embed (--label_embed_dir).
                    Or a labelembednet{2,8} folder / .safetensors -> DST (init.label_embed)
  --from=clip       a Stable Diffusion folder (text_encoder/ + tokenizer/) or a CLIPTextModel
                    folder with --tokenizer    -> DST, a .npy of the empty-prompt context
                                                  (--config.init.context)

Nothing is downloaded from a model hub. --src, --dst and --tokenizer are local paths or URLs
that etils.epath handles (gs://bucket/..., s3://...): e.g. convert straight from a bucket into
one. (transformers only reads local folders, so --from=clip copies a remote text encoder and
tokenizer into a temporary folder first.)
"""
import sys

from absl import flags

from idgbr_jax.commands import _runtime

_FROM = flags.DEFINE_enum("from", None, ["diffusers", "dinov2", "idgbr", "clip"],
                          "Format of --src.")
_SRC = flags.DEFINE_string("src", None, "Input folder or file (local or a gs:// URL).")
_DST = flags.DEFINE_string("dst", None, "Output checkpoint directory (a .npy for --from=clip); "
                           "local or a gs:// URL.")
_TOKENIZER = flags.DEFINE_string("tokenizer", None,
                                 "--from=clip: tokenizer folder, when --src has none.")
_NUM_HEADS = flags.DEFINE_integer("num_heads", None,
                                  "--from=dinov2 with a .pth: attention heads (default "
                                  "embed_dim // 64, as every official backbone).")
_BASE = flags.DEFINE_string(
    "base", None, "--from=idgbr: the SD-1.5 (or pipeline) folder the run was trained from, for "
    "the vae/, unet_ori/ (or unet/), scheduler/ and text encoder its checkpoint lacks.")
_LABEL_EMBED = flags.DEFINE_string(
    "label_embed", None, "--from=idgbr: the LabelEmbedNet folder, when the run has none.")
flags.mark_flags_as_required(["from", "src", "dst"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup(tensorflow=False)
  from idgbr_jax.convert import checkpoint_io, files  # pylint: disable=import-outside-toplevel
  try:
    written = checkpoint_io.convert_to_checkpoints(
        _FROM.value, _SRC.value, _DST.value, tokenizer=_TOKENIZER.value,
        num_heads=_NUM_HEADS.value, base=_BASE.value, label_embed=_LABEL_EMBED.value,
        warn=lambda message: print(f"warning: {message}", file=sys.stderr))
  except files.ConversionError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  for part, path in written.items():
    print(f"{part}: {path}")
  return 0
