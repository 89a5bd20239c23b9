"""idgbr predict --workdir=STAGE1_DIR [--splits=train,test] [--out_dir=DIR] [--num_folds=K]
idgbr predict --workdir=STAGE1_DIR --images=DIR --out=DIR [--overlap=PX] [--scale=auto]

Split mode: writes Stage I coarse maps as index PNGs `<out_dir>/<split>/<id>.png` (default
`<workdir>/coarse`). `--num_folds=K` cross-fits the train split (K fold models are trained
under `<workdir>/folds/` if missing) so train coarse maps look like test ones.

Image mode (`--images`): every image in DIR (PNG/JPEG/TIFF/GeoTIFF of any size, with the model's
`config.data.in_channels` bands, 3 by default) is predicted in sliding windows of the model's
tile size (config.data.image_size), `--overlap` pixels apart (default a quarter tile), the
windows' class probabilities blended with a raised-cosine ramp (inference/windows.py). Writes
`<out>/<stem>.png`, or `<out>/<stem>.tif` for a georeferenced TIFF: a uint8 GeoTIFF with the
source's CRS and transform, its nodata pixels marked (idgbr_jax/rasters.py). Non-uint8 images
are scaled to 0..255 by `--scale` (auto: per-band 2-98 percentiles of the scene).
"""

from absl import flags

from idgbr_jax.commands import _runtime

_WORKDIR = flags.DEFINE_string("workdir", None, "Stage I run directory (with checkpoints/).")
_SPLITS = flags.DEFINE_list("splits", ["train", "test"], "Splits to predict.")
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Output directory (default <workdir>/coarse).")
_NUM_FOLDS = flags.DEFINE_integer("num_folds", 0, "k-fold cross-fitting of the train split.")
_IMAGES = flags.DEFINE_string(
    "images", None, "Image mode: a folder of images of any size (PNG/JPEG/TIFF/GeoTIFF) to "
    "predict in sliding windows instead of dataset splits.")
_OUT = flags.DEFINE_string("out", None, "Image mode: output folder (<stem>.png, or <stem>.tif "
                           "for a georeferenced TIFF).")
_OVERLAP = flags.DEFINE_integer("overlap", None, "Image mode: pixels shared by neighbouring "
                                "windows (default: a quarter of the tile size).")
_SCALE = flags.DEFINE_string(
    "scale", "auto", "Image mode: non-uint8 images to 0..255. auto: per band, the scene's "
    "2nd..98th percentile to 0..255; none: values taken as 0..255 (clipped); a number M: "
    "value / M * 255 (e.g. 65535, 10000). uint8 images are used as stored under auto and none.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup()
  from idgbr_jax.inference import stage1 as infer  # pylint: disable=import-outside-toplevel
  from idgbr_jax import checkpoints, paths  # pylint: disable=import-outside-toplevel
  workdir = str(paths.resolve(_WORKDIR.value))
  config = checkpoints.load_config(paths.join(workdir, "checkpoints"))
  if _IMAGES.value:
    return predict_images(workdir, config)
  out_dir = _OUT_DIR.value or paths.join(workdir, "coarse")
  paths.ensure_writable_dir(out_dir, "--out_dir")  # before any prediction
  for split in _SPLITS.value:
    if split == config.data.train_split and _NUM_FOLDS.value:
      from idgbr_jax.train import stage1  # pylint: disable=import-outside-toplevel
      n = stage1.predict_cross_fitted(workdir, out_dir, _NUM_FOLDS.value, config)
    else:
      n = infer.predict_split(workdir, split, out_dir, config=config)
    print(f"{split}: {n} coarse maps -> {paths.join(out_dir, split)}")


def predict_images(workdir: str, config) -> int:
  """Image mode: every image checked (readable, band count) before the model is loaded."""
  # pylint: disable=import-outside-toplevel
  import jax
  from idgbr_jax import paths, progress, rasters
  from idgbr_jax.assembly import stage1 as assembly
  from idgbr_jax.data import sources, transforms
  from idgbr_jax.inference import stage1 as infer
  from idgbr_jax.inference import windows
  out = _OUT.value or _OUT_DIR.value
  if not out:
    raise ValueError("--images needs --out=DIR, the folder for the class maps")
  tile = int(config.data.image_size)
  overlap = windows.default_overlap(tile) if _OVERLAP.value is None else _OVERLAP.value
  windows.check_overlap(overlap, tile)
  scale = rasters.parse_scale(_SCALE.value)
  channels = int(config.data.get("in_channels", 3))
  num_classes = sources.num_classes(config.data)
  files = rasters.list_images(_IMAGES.value)
  total = 0
  for _, path in files:
    with rasters.open_raster(path, "image") as r:
      rasters.check_image_bands(r, channels)
      total += len(windows.Tiling(r.height, r.width, tile, overlap))
  paths.ensure_writable_dir(out, "--out")
  model, variables, config, mesh = assembly.load_segmenter(workdir, config)
  rules = tuple(config.sharding_rules)
  fn = infer.make_scores_fn(model, jax.tree.map(lambda x: x.sharding, variables), mesh, rules)
  normalization = config.data.normalization
  writes = jax.process_index() == 0  # every process computes every map; one writes it

  def scenes():
    for stem, path in files:
      raster = rasters.open_raster(path, "image")
      source = rasters.ImageWindows(raster, scale,
                                    lambda a: transforms.normalize_image(a, normalization))
      tiling = windows.Tiling(raster.height, raster.width, tile, overlap)
      nodata = rasters.output_nodata(
          raster.nodata if raster.nodata is not None or raster.dtype.kind != "f"
          else float("nan"), num_classes)
      writer = rasters.MapWriter(paths.join(out, rasters.output_name(stem, raster)),
                                 raster.height, raster.width, like=raster,
                                 nodata=nodata) if writes else None
      sink = rasters.ClassMapSink(writer, source.invalid_rows if source.has_nodata() else None,
                                  nodata)

      def finish(writer=writer, raster=raster):
        if writer is not None:
          writer.close()
        raster.close()
      yield windows.Scene(tiling, lambda w, s=source, t=tiling: {"image": s.window(t, w)},
                          sink.write, finish)

  with progress.Progress(total, "predict", unit="window") as bar:
    windows.run(scenes(), infer.scene_predictor(fn, variables, mesh, rules),
                int(config.eval_batch_size), num_classes, bar)
  print(f"{len(files)} coarse maps ({total} windows of {tile} px, overlap {overlap}) -> {out}")
  return 0
