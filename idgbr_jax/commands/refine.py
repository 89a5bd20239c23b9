"""idgbr refine --checkpoint=STAGE2_DIR --images=DIR --coarse=DIR --out=DIR
                [--num_steps=25] [--guidance_scale=3.0] [--batch_size=8] [--seed=42]
                [--overlap=PX] [--scale=auto] [--visualize [--labels=DIR]]

Refines coarse maps (index maps from any segmenter) with a trained Stage II refiner and writes
refined index maps. Images (PNG/JPEG/TIFF/GeoTIFF, any size) and coarse maps (PNG or TIFF) are
matched by file stem and must have the same size. Scenes larger than the refiner's training size
are refined in sliding windows `--overlap` pixels apart (default a quarter window), the label
decoder's class probabilities blended with a raised-cosine ramp; smaller ones are padded
(reflect) and cropped back. Each window's sampling noise is seeded by (seed, image stem, window
index), so a map does not depend on the batch or on the other images in the folder.

Outputs: `<out>/<stem>.png`, or `<out>/<stem>.tif` for a georeferenced TIFF image: a uint8 GeoTIFF
with the image's CRS and transform, pixels that are nodata in the image (every band) or in the
coarse map marked as nodata. Non-uint8 images are scaled by `--scale` (see `idgbr predict`).
`--visualize` also writes `<out>/panels/<stem>.png`: image | ground truth (with `--labels`) |
coarse | refined | changed (repaired green / damaged red against the ground truth; without it,
white where refinement changed the map), at most 512 px a column (larger scenes decimated).
"""
import math
import os

from absl import flags

from idgbr_jax.commands import _runtime

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "Stage II run directory (with checkpoints/).")
_IMAGES = flags.DEFINE_string("images", None, "Directory of input images.")
_COARSE = flags.DEFINE_string("coarse", None, "Directory of coarse index maps (PNG or TIFF).")
_OUT = flags.DEFINE_string("out", None, "Output directory for refined index maps.")
_NUM_STEPS = flags.DEFINE_integer("num_steps", None, "DDIM steps (default: the run's config).")
_SCALE = flags.DEFINE_float("guidance_scale", None, "Control-CFG scale (default: config).")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Windows per refinement call.")
_SEED = flags.DEFINE_integer("seed", None, "Sampling seed (default: config).")
_OVERLAP = flags.DEFINE_integer("overlap", None, "Pixels shared by neighbouring windows "
                                "(default: a quarter of the refiner's training size).")
_VALUE_SCALE = flags.DEFINE_string(
    "scale", "auto", "Non-uint8 images to 0..255. auto: per band, the scene's 2nd..98th "
    "percentile to 0..255; none: values taken as 0..255 (clipped); a number M: value / M * 255 "
    "(e.g. 65535, 10000). uint8 images are used as stored under auto and none.")
_VISUALIZE = flags.DEFINE_bool("visualize", False, "Also write a PNG panel per image to "
                               "<out>/panels/<stem>.png.")
_LABELS = flags.DEFINE_string("labels", None, "With --visualize: ground-truth index maps "
                              "(matched by stem), shown with repaired/damaged pixels coloured.")
flags.mark_flags_as_required(["checkpoint", "images", "coarse", "out"])

PANEL_SIZE = 512  # longest side of a panel column; larger scenes are shown decimated


def pair_files(images_dir: str, coarse_dir: str) -> list[tuple[str, str, str]]:
  """(stem, image path, coarse path) for every image; a missing coarse map is an error."""
  from idgbr_jax import paths, rasters  # pylint: disable=import-outside-toplevel
  if not paths.isdir(coarse_dir):
    raise ValueError(f"directory not found: {coarse_dir}")
  coarse_names = set(paths.listdir(coarse_dir))
  pairs = []
  for stem, image in rasters.list_images(images_dir):
    names = [stem + ext for ext in rasters.MAP_EXTENSIONS if stem + ext in coarse_names]
    if not names:
      raise ValueError(f"no coarse map for image {os.path.basename(image)}: "
                       f"{paths.join(coarse_dir, stem + '.png')} is missing (nor .tif/.tiff)")
    pairs.append((stem, image, paths.join(coarse_dir, names[0])))
  return pairs


def check_inputs(pairs, labels_dir, channels: int, num_classes: int, tile: int, overlap: int
                 ) -> tuple[dict[str, str], int]:
  """Checks every image, coarse map (and label) before any model is loaded: readable, the
  image's band count, the same size, coarse values within the classes. Returns the labels by
  stem and the number of windows."""
  from idgbr_jax import paths, rasters  # pylint: disable=import-outside-toplevel
  from idgbr_jax.inference import windows  # pylint: disable=import-outside-toplevel
  labels, total = {}, 0
  if labels_dir and not paths.isdir(labels_dir):
    raise ValueError(f"--labels: directory not found: {labels_dir}")
  label_names = set(paths.listdir(labels_dir)) if labels_dir else set()
  for stem, image_path, coarse_path in pairs:
    with rasters.open_raster(image_path, "image") as image:
      rasters.check_image_bands(image, channels)
      h, w = image.height, image.width
    with rasters.open_raster(coarse_path, "coarse map") as coarse:
      rasters.check_map(coarse, h, w, num_classes, image_path, stem)
    if labels_dir:
      names = [stem + e for e in rasters.MAP_EXTENSIONS if stem + e in label_names]
      if not names:
        raise ValueError(f"--labels: no ground truth for image {os.path.basename(image_path)}: "
                         f"{paths.join(labels_dir, stem + '.png')} is missing (nor .tif/.tiff)")
      labels[stem] = paths.join(labels_dir, names[0])
      with rasters.open_raster(labels[stem], "label") as label:
        rasters.check_map(label, h, w, None, image_path, stem)
    total += len(windows.Tiling(h, w, tile, overlap))
  return labels, total


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup(tensorflow=False)
  # pylint: disable=import-outside-toplevel
  import jax
  from idgbr_jax import paths, progress, rasters
  from idgbr_jax.assembly import stage2 as assembly
  from idgbr_jax.data import transforms
  from idgbr_jax.inference import refine as refine_lib
  from idgbr_jax.inference import windows
  # Everything that can be wrong with the inputs is checked before any params are loaded: the
  # run's config, every image and coarse map, the output folder.
  config = assembly.load_config(_CHECKPOINT.value)
  num_classes = assembly.build_refiner(config).config.label_embed.num_classes
  tile = int(config.data.image_size)
  overlap = windows.default_overlap(tile) if _OVERLAP.value is None else _OVERLAP.value
  windows.check_overlap(overlap, tile)
  scale = rasters.parse_scale(_VALUE_SCALE.value)
  if _LABELS.value and not _VISUALIZE.value:
    raise ValueError("--labels is used by --visualize (the panels' ground truth); add "
                     "--visualize or drop --labels")
  pairs = pair_files(_IMAGES.value, _COARSE.value)
  labels, total = check_inputs(pairs, _LABELS.value, int(config.data.get("in_channels", 3)),
                               num_classes, tile, overlap)
  paths.ensure_writable_dir(_OUT.value, "--out")
  panels = paths.join(_OUT.value, "panels")
  if _VISUALIZE.value:
    paths.ensure_writable_dir(panels, "--out (its panels/ folder)")
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
                                        jax.tree.map(lambda x: x.sharding, frozen),
                                        output="probs")
  normalization = config.data.normalization
  writes = jax.process_index() == 0  # every process computes every map; one writes it

  def scenes():
    for stem, image_path, coarse_path in pairs:
      image = rasters.open_raster(image_path, "image")
      coarse = rasters.open_raster(coarse_path, "coarse map")
      source = rasters.ImageWindows(image, scale,
                                    lambda a: transforms.normalize_image(a, normalization))
      tiling = windows.Tiling(image.height, image.width, tile, overlap)
      nodata = rasters.output_nodata(
          image.nodata if image.nodata is not None or image.dtype.kind != "f" else float("nan"),
          num_classes)
      if nodata is None and coarse.nodata is not None:
        nodata = rasters.output_nodata(coarse.nodata, num_classes)
      like = image if image.georeferenced or not coarse.georeferenced else coarse
      name = rasters.output_name(stem, like)
      writer = rasters.MapWriter(paths.join(_OUT.value, name), image.height, image.width,
                                 like=like, nodata=nodata) if writes else None

      def invalid(y0, y1, source=source, coarse=coarse):
        bad = source.invalid_rows(y0, y1) if source.has_nodata() else None
        if coarse.nodata is not None:
          c = rasters.map_values(coarse, coarse.read(y0, y1, 0, coarse.width)) == coarse.nodata
          bad = c if bad is None else bad | c
        return bad
      step = max(1, math.ceil(max(image.height, image.width) / PANEL_SIZE))
      sink = rasters.ClassMapSink(writer, invalid, nodata,
                                  keep=step if _VISUALIZE.value and writes else 0)

      def read(window, source=source, coarse=coarse, tiling=tiling):
        y0, y1, x0, x1 = tiling.source_box(window)
        c = windows.pad_to_tile(rasters.map_window(coarse, y0, y1, x0, x1), tiling.tile)
        return {"image": source.window(tiling, window), "coarse": c}

      def finish(stem=stem, writer=writer, sink=sink, source=source, image=image, coarse=coarse,
                 step=step):
        if writer is not None:
          writer.close()
        if sink.keep:
          _write_panel(paths.join(panels, f"{stem}.png"), source, coarse, labels.get(stem),
                       sink.kept(), step, num_classes)
        image.close()
        coarse.close()
      yield windows.Scene(tiling, read, sink.write, finish, key=refine_lib.example_key(stem))

  with progress.Progress(total, "refine", unit="window") as bar:
    windows.run(scenes(), refine_lib.scene_predictor(refine_fn, trainable, frozen, config, mesh),
                int(config.eval_batch_size), num_classes, bar)
  print(f"refined {len(pairs)} maps ({total} windows of {tile} px, overlap {overlap}) -> "
        f"{_OUT.value} ({config.diffusion.num_inference_steps} DDIM steps, "
        f"guidance {config.diffusion.guidance_scale})")
  return 0


def _write_panel(path, source, coarse, label_path, refined, step, num_classes):
  """image | [ground truth] | coarse | refined | changed, every `step`-th pixel."""
  # pylint: disable=import-outside-toplevel
  from idgbr_jax import rasters, visualize
  label = None
  if label_path:
    with rasters.open_raster(label_path, "label") as r:
      label = rasters.map_values(r, r.read_decimated(step))
  coarse_map = rasters.map_values(coarse, coarse.read_decimated(step))
  visualize.write_panel(path, source.decimated(step), label, coarse_map, refined, num_classes)
