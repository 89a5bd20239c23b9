"""idgbr refine --checkpoint=STAGE2_DIR --images=DIR --coarse=DIR --out=DIR
                [--num_steps=25] [--guidance_scale=3.0] [--batch_size=8] [--seed=42]

Refines coarse maps (index PNGs from any segmenter) with a trained Stage II refiner and writes
refined index PNGs `<out>/<stem>.png`. Images (PNG/JPG/TIF) and coarse maps are matched by file
stem; their size must be the refiner's training size.
"""
import os

import numpy as np
from absl import flags

from idgbr_jax.commands import _runtime

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage II run directory (with checkpoints/).")
_IMAGES = flags.DEFINE_string("images", None, "Directory of input images.")
_COARSE = flags.DEFINE_string("coarse", None, "Directory of coarse index maps (PNG).")
_OUT = flags.DEFINE_string("out", None, "Output directory for refined index PNGs.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "DDIM steps (default: the run's config).")
_SCALE = flags.DEFINE_float("guidance_scale", None, "Control-CFG scale (default: config).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Images per refinement call.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: config).")
flags.mark_flags_as_required(["checkpoint", "images", "coarse", "out"])

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _read(path: str, what: str) -> np.ndarray:
  """An image as (H, W, 3) uint8 (RGB, or a palette image's colours) or a coarse map as (H, W):
  an unreadable file, an image that is not 3-band, or a colour coarse map names the file."""
  from idgbr_jax import paths  # pylint: disable=import-outside-toplevel
  try:
    im = paths.read_image(path)
  except Exception as e:  # noqa: BLE001 - reported with the file name
    raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {e}") from e
  if what == "image":
    if im.mode == "P":
      im = im.convert("RGB")
    if im.mode != "RGB":
      raise ValueError(f"image {path} has {len(im.getbands())} band(s) (mode {im.mode}); "
                       "expected 3 (RGB, as the refiner's training images)")
    return np.asarray(im)
  coarse = np.asarray(im)
  if coarse.ndim == 3:
    if not all(np.array_equal(coarse[..., 0], coarse[..., c]) for c in range(coarse.shape[-1])):
      raise ValueError(f"coarse map {path} is a {coarse.shape[-1]}-channel colour image; "
                       "expected a single-band map of class indices (an index PNG)")
    coarse = coarse[..., 0]
  return coarse


def read_examples(pairs, size: int, num_classes: int, normalization: str) -> list[dict]:
  """Reads and checks every (image, coarse map) pair before any model is loaded: sizes must be
  the refiner's training size, coarse values its classes."""
  from idgbr_jax.data import transforms  # pylint: disable=import-outside-toplevel
  examples = []
  for stem, image_path, coarse_path in pairs:
    image, coarse = _read(image_path, "image"), _read(coarse_path, "coarse map")
    if image.shape[:2] != (size, size) or coarse.shape != (size, size):
      raise ValueError(f"{stem}: image {image_path} is {image.shape[1]}x{image.shape[0]} and "
                       f"coarse map {coarse_path} is {coarse.shape[1]}x{coarse.shape[0]} "
                       f"(WxH); both must be {size}x{size}, the refiner's training size")
    if coarse.max() >= num_classes:
      bad = sorted(int(v) for v in np.unique(coarse[coarse >= num_classes]))
      raise ValueError(f"coarse map {coarse_path} has values {bad[:10]} outside the refiner's "
                       f"{num_classes} classes [0, {num_classes})")
    examples.append({"image": transforms.normalize_image(image, normalization),
                     "label": coarse.astype(np.int32), "coarse": coarse.astype(np.int32),
                     "id": stem})
  return examples


def pair_files(images_dir: str, coarse_dir: str) -> list[tuple[str, str, str]]:
  """(stem, image path, coarse path) for every image; a missing coarse map is an error."""
  from idgbr_jax import paths  # pylint: disable=import-outside-toplevel
  for d in (images_dir, coarse_dir):
    if not paths.isdir(d):
      raise ValueError(f"directory not found: {d}")
  coarse_names = set(paths.listdir(coarse_dir))
  pairs = []
  for name in paths.listdir(images_dir):
    stem, ext = os.path.splitext(name)
    if ext.lower() not in IMAGE_EXTENSIONS:
      continue
    coarse = paths.join(coarse_dir, stem + ".png")
    if stem + ".png" not in coarse_names:
      raise ValueError(f"no coarse map for image {name}: {coarse} is missing")
    pairs.append((stem, paths.join(images_dir, name), coarse))
  if not pairs:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {images_dir}")
  return pairs


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup(tensorflow=False)
  # pylint: disable=import-outside-toplevel
  import jax
  from idgbr_jax import checkpoints, paths
  from idgbr_jax.assembly import stage2 as assembly
  from idgbr_jax.inference import refine as refine_lib
  from idgbr_jax.inference.stage1 import write_png
  # Everything that can be wrong with the inputs is checked before any params are loaded: the
  # run's config, every image and coarse map, the output folder.
  config = assembly.load_config(_CHECKPOINT.value)
  num_classes = assembly.build_refiner(config).config.label_embed.num_classes
  pairs = pair_files(_IMAGES.value, _COARSE.value)
  examples = read_examples(pairs, config.data.image_size, num_classes,
                           config.data.normalization)
  paths.ensure_writable_dir(_OUT.value, "--out")
  ref, trainable, frozen, config, mesh = assembly.load_refiner(_CHECKPOINT.value, config)
  with config.unlocked():
    if _NUM_STEPS.value is not None:
      config.diffusion.num_inference_steps = _NUM_STEPS.value
    if _SCALE.value is not None:
      config.diffusion.guidance_scale = _SCALE.value
    if _SEED.value is not None:
      config.diffusion.sampling_seed = _SEED.value
    config.eval_batch_size = _BATCH.value
  refine_fn = refine_lib.make_refine_fn(ref, config, mesh,
                                        jax.tree.map(lambda x: x.sharding, trainable),
                                        jax.tree.map(lambda x: x.sharding, frozen))
  n = 0
  for stem, refined, _, _ in refine_lib.refine_dataset(refine_fn, trainable, frozen, examples,
                                                      config, mesh):
    if jax.process_index() == 0:  # every process holds every map; one writes it
      write_png(paths.join(_OUT.value, f"{stem}.png"), refined)
    n += 1
  print(f"refined {n} maps -> {_OUT.value} ({config.diffusion.num_inference_steps} DDIM steps, "
        f"guidance {config.diffusion.guidance_scale})")
  return 0
