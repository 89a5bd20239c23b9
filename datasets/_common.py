"""Shared pieces of the manual-download TFDS builders (CHN6-CUG, FGFD, WHU, ISPRS, IDGBR package).

Every builder reads a `manual_dir` laid out exactly as the dataset is distributed, writes
ArrayRecord (random access, readable by grain) with lossless PNG `Image` features, and yields
records with the pipeline's contract:

  image (H,W,3 uint8), label (H,W,1 uint8 class indices, 255 = ignore), id (str)

`id` is the image file's stem (tiles: `<stem>_y<row>_x<col>`), so coarse maps written by any
segmenter as `<coarse_dir>/<split>/<id>.png` attach by name. Bad manual_dir content (missing
folder, unmatched image/label, unknown value or colour, size mismatch, unreadable file) raises
`ManualDataError` naming the file.

Build from the shell with `python -m idgbr_datasets.<package> --manual_dir=... --data_dir=...`
(see `main`), or from Python with `build(...)`. Both folders may be local or URLs that
`etils.epath` handles (`gs://...`): files are read through `idgbr_jax.paths`, and a remote
`data_dir` is built in a local temporary folder and then uploaded (TFDS' ArrayRecord writer
only writes local files; see `prepare`).
"""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import io
import os
import tempfile
from typing import Callable, Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image
from tensorflow_datasets.core import utils as tfds_utils

from idgbr_jax import paths

IGNORE = 255
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTS = (".tif", ".tiff")


class ManualDataError(ValueError):
  """The manual_dir content is missing or invalid; the message names the file or folder."""


# ----------------------------------------------------------------------------------------------
# Files.


def join(path: str | os.PathLike, *parts: str) -> str:
  """`path/parts...` as a string: a URL stays a URL, a local path stays as given (not made
  absolute, so messages name what the user passed)."""
  return os.fspath(epath.Path(os.fspath(path)).joinpath(*parts))


def is_file(path: str) -> bool:
  return paths.resolve(path).is_file()


def require_dir(path: str, what: str) -> str:
  """`path` if it is a directory, else a ManualDataError saying what was expected there."""
  if not paths.isdir(path):
    raise ManualDataError(f"missing folder {path} ({what})")
  return path


def list_images(folder: str, exts: Sequence[str] = IMAGE_EXTS) -> list[str]:
  """Sorted file names in `folder` with one of `exts` (case-insensitive); hidden files skipped."""
  return sorted(f for f in paths.listdir(folder)
                if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts)


def _strip(stem: str, suffix: str) -> str | None:
  if not suffix:
    return stem
  return stem[:-len(suffix)] if stem.endswith(suffix) and len(stem) > len(suffix) else None


def pair_files(image_dir: str, label_dir: str, *, image_suffix: str = "",
               label_suffix: str = "", exts: Sequence[str] = IMAGE_EXTS
               ) -> list[tuple[str, str, str]]:
  """Pairs `<key><image_suffix>.<ext>` in image_dir with `<key><label_suffix>.<ext>` in label_dir.

  Returns (id, image_path, label_path) sorted by key, where id is the image file's stem.

  Raises:
    ManualDataError: an image without a label or a label without an image (names the file), a
      file whose name lacks the expected suffix, two files with the same key, or no files.
  """
  def index(folder, suffix, kind):
    out = {}
    for name in list_images(folder, exts):
      stem = os.path.splitext(name)[0]
      key = _strip(stem, suffix)
      if key is None:
        raise ManualDataError(f"{kind} file {join(folder, name)} does not end in "
                              f"'{suffix}' + extension")
      if key in out:
        raise ManualDataError(f"two {kind} files for '{key}': {out[key]} and "
                              f"{join(folder, name)}")
      out[key] = join(folder, name)
    return out

  images = index(image_dir, image_suffix, "image")
  labels = index(label_dir, label_suffix, "label")
  for key in sorted(images.keys() - labels.keys()):
    raise ManualDataError(f"image {images[key]} has no label '{key}{label_suffix}.*' in "
                          f"{label_dir}")
  for key in sorted(labels.keys() - images.keys()):
    raise ManualDataError(f"label {labels[key]} has no image '{key}{image_suffix}.*' in "
                          f"{image_dir}")
  if not images:
    raise ManualDataError(f"no images ({', '.join(exts)}) in {image_dir}: expected at least one "
                          "image (and its label) per split")
  return [(epath.Path(images[k]).stem, images[k], labels[k]) for k in sorted(images)]


def read_array(path: str) -> np.ndarray:
  """The pixel array of an image file (PNG/JPEG/TIFF...), uint8 only; errors name the file.

  TIFFs go through `tifffile` when it is installed (it reads 4-band RGBIR and very large tiles
  that PIL may reject), else PIL. `path` is local or a URL (the file is read whole, then decoded).
  """
  if not is_file(path):
    raise ManualDataError(f"missing file {path}")
  try:
    data = paths.read_bytes(path)
    if epath.Path(path).suffix.lower() in TIFF_EXTS:
      try:
        import tifffile  # pylint: disable=import-outside-toplevel
      except ImportError:
        tifffile = None
      if tifffile is not None:
        array = np.asarray(tifffile.imread(io.BytesIO(data)))
        if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
          array = np.moveaxis(array, 0, -1)  # planar (C,H,W) storage
        return _check_uint8(array, path)
    with Image.open(io.BytesIO(data)) as im:
      if im.mode == "P":  # palette PNGs: the colours are the labels
        im = im.convert("RGB")
      elif im.mode in ("I;16", "I", "F"):
        raise ManualDataError(f"{path}: pixel mode {im.mode}, expected 8-bit")
      array = np.asarray(im)
  except ManualDataError:
    raise
  except Exception as e:  # noqa: BLE001 - reported with the file's name
    raise ManualDataError(f"cannot read {path}: {type(e).__name__}: {e}") from e
  return _check_uint8(array, path)


def _check_uint8(array: np.ndarray, path: str) -> np.ndarray:
  if array.dtype == np.bool_:
    array = array.astype(np.uint8)
  if array.dtype != np.uint8:
    raise ManualDataError(f"{path}: dtype {array.dtype}, expected 8-bit")
  if array.ndim not in (2, 3):
    raise ManualDataError(f"{path}: array shape {array.shape}, expected (H,W) or (H,W,C)")
  return array


def read_rgb(path: str, channels: int = 3) -> np.ndarray:
  """(H,W,channels) uint8 image; a grey image is replicated, extra alpha dropped for 3."""
  array = read_array(path)
  if array.ndim == 2:
    array = np.repeat(array[..., None], 3, axis=-1)
  if array.shape[-1] == 4 and channels == 3:
    array = array[..., :3]
  if array.shape[-1] != channels:
    raise ManualDataError(f"{path}: {array.shape[-1]} channels, expected {channels}")
  return np.ascontiguousarray(array)


def to_grey(array: np.ndarray, path: str) -> np.ndarray:
  """(H,W) uint8 single-band map; a 3/4-channel map must have equal R, G, B."""
  if array.ndim == 3:
    if not (np.array_equal(array[..., 0], array[..., 1])
            and np.array_equal(array[..., 0], array[..., 2])):
      raise ManualDataError(f"{path}: a {array.shape[-1]}-channel mask with differing "
                            f"channels; expected a single-band (grey) mask")
    array = array[..., 0]
  return np.ascontiguousarray(array)


def check_same_size(image: np.ndarray, label: np.ndarray, image_path: str, label_path: str
                    ) -> None:
  if image.shape[:2] != label.shape[:2]:
    raise ManualDataError(f"size mismatch: image {image_path} is {image.shape[1]}x"
                          f"{image.shape[0]} (WxH), label {label_path} is {label.shape[1]}x"
                          f"{label.shape[0]}")


# ----------------------------------------------------------------------------------------------
# Label encodings.


def binary_mask(raw: np.ndarray, path: str, strict: bool = True) -> np.ndarray:
  """0 -> 0 and nonzero -> 1 (the original's `label != 0` for 2-class data).

  With `strict`, values outside {0, 1, 255} are an error naming the file (they usually mean a
  wrong file, e.g. a JPEG-compressed or colour mask).
  """
  if strict:
    bad = np.setdiff1d(np.unique(raw), [0, 1, 255])
    if bad.size:
      raise ManualDataError(f"{path}: mask values {bad[:10].tolist()} not in {{0, 1, 255}} "
                            f"(pass strict_values=False to map every nonzero value to 1)")
  return (raw != 0).astype(np.uint8)


def _colour_keys(colours: np.ndarray) -> np.ndarray:
  colours = np.asarray(colours, np.int64).reshape(-1, 3)
  return (colours[:, 0] << 16) | (colours[:, 1] << 8) | colours[:, 2]


def colours_to_index(rgb: np.ndarray, colours: Sequence[Sequence[int]],
                     indices: Sequence[int], path: str, *, unknown: str = "error"
                     ) -> np.ndarray:
  """(H,W,3) colour label -> (H,W) uint8 index: `colours[i]` becomes `indices[i]`.

  Args:
    rgb: colour label map.
    colours: the palette, one RGB triple per entry.
    indices: the index (or IGNORE) each palette entry maps to.
    path: the file, for error messages.
    unknown: "error" (a colour not in the palette raises, naming the file, the colours and a
      pixel where the first occurs) or "ignore" (such pixels become IGNORE).
  """
  if unknown not in ("error", "ignore"):
    raise ValueError(f"unknown={unknown!r}; allowed: error, ignore")
  if rgb.ndim != 3 or rgb.shape[-1] < 3:
    raise ManualDataError(f"{path}: label shape {rgb.shape}, expected an (H,W,3) colour map")
  rgb = rgb[..., :3]
  keys = (rgb[..., 0].astype(np.int32) << 16) | (rgb[..., 1].astype(np.int32) << 8) | rgb[..., 2]
  palette = _colour_keys(colours)
  order = np.argsort(palette)
  sorted_keys = palette[order]
  pos = np.clip(np.searchsorted(sorted_keys, keys), 0, len(sorted_keys) - 1)
  known = sorted_keys[pos] == keys
  out = np.asarray(indices, np.uint8)[order][pos]
  if not known.all():
    if unknown == "error":
      bad_keys = np.unique(keys[~known])[:5]
      bad = [((k >> 16) & 255, (k >> 8) & 255, k & 255) for k in bad_keys.tolist()]
      y, x = np.argwhere(~known)[0]
      raise ManualDataError(f"{path}: colours {bad} (first at row {y}, col {x}) are not in the "
                            f"palette {[tuple(c) for c in np.asarray(colours).tolist()]}")
    out = np.where(known, out, IGNORE).astype(np.uint8)
  return out


# ----------------------------------------------------------------------------------------------
# Tiling.


def tile_starts(length: int, size: int, stride: int) -> list[int]:
  """Window starts along one axis: every `stride`, plus one flush with the far edge so that the
  whole extent is covered (the last window overlaps its neighbour instead of being dropped)."""
  if size <= 0 or stride <= 0:
    raise ValueError(f"tile size {size} and stride {stride} must be positive")
  if length < size:
    return []
  starts = list(range(0, length - size + 1, stride))
  if starts[-1] + size < length:
    starts.append(length - size)
  return starts


def tiles(height: int, width: int, size: int, stride: int) -> list[tuple[int, int]]:
  """(y, x) top-left corners, row-major."""
  return [(y, x) for y in tile_starts(height, size, stride) for x in tile_starts(width, size,
                                                                                 stride)]


def tile_id(stem: str, y: int, x: int) -> str:
  return f"{stem}_y{y:05d}_x{x:05d}"


# ----------------------------------------------------------------------------------------------
# Builder base.


class ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base of the manual-download builders: ArrayRecord by default, records in a fixed order."""

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord: random access (`as_data_source`, grain); TFRecord, tfds' default, has none.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' lookup for a builder inside an installed package probes the `importlib_resources`
    # backport, which is not installed: ModuleNotFoundError on prepare.
    return epath.Path(inspect.getfile(cls))

  def _manual_root(self, dl_manager) -> str:
    try:
      root = os.fspath(dl_manager.manual_dir)
    except AssertionError as e:  # tfds' own check: missing or empty folder
      where = getattr(dl_manager, "_manual_dir", None) or "(not set)"
      raise ManualDataError(f"missing or empty folder {where} (manual_dir of {self.name}); "
                            f"expected:\n{self.MANUAL_DOWNLOAD_INSTRUCTIONS}") from e
    return require_dir(root, f"manual_dir of {self.name}")


def segmentation_features(shape_hw: tuple[int | None, int | None] = (None, None),
                          channels: int = 3, coarse: bool = False, **extra
                          ) -> tfds.features.FeaturesDict:
  """image + label (+ coarse) as lossless PNG images, the string id, and any extra features."""
  h, w = shape_hw
  features = {
      "image": tfds.features.Image(shape=(h, w, channels)),
      "label": tfds.features.Image(shape=(h, w, 1)),
      "id": tfds.features.Text(),
  }
  if coarse:
    features["coarse"] = tfds.features.Image(shape=(h, w, 1))
  features.update(extra)
  return tfds.features.FeaturesDict(features)


def config_overrides(config_cls, base: tfds.core.BuilderConfig | None, **params):
  """A new config of `config_cls` from `base`'s fields with `params` replaced, named by them."""
  fields = {f.name for f in dataclasses.fields(config_cls)} - {
      "name", "version", "release_notes", "supported_versions", "description", "tags"}
  unknown = set(params) - fields
  if unknown:
    raise ValueError(f"unknown {config_cls.__name__} fields {sorted(unknown)}; allowed: "
                     f"{sorted(fields)}")
  values = {k: getattr(base, k) for k in fields} if base is not None else {}
  values.update(params)
  return values


def build(builder_cls, manual_dir: str, data_dir: str, config: str | tfds.core.BuilderConfig
          | None = None, **params) -> tfds.core.DatasetBuilder:
  """Prepares `builder_cls` from `manual_dir` into `data_dir` (no-op if already prepared).

  Args:
    builder_cls: one of the builder classes.
    manual_dir: the folder laid out as the builder's MANUAL_DOWNLOAD_INSTRUCTIONS say.
    data_dir: TFDS data dir to write `<name>/<config>/<version>/` into.
    config: a predefined config name or a BuilderConfig (default: the builder's default).
    **params: config fields to override (e.g. tile_size=256); the config is then renamed by
      `builder_cls.config_name(...)` so differently parameterised builds never collide.
  """
  if params:
    base = (builder_cls.builder_configs[config] if isinstance(config, str) else config) or \
        builder_cls.builder_configs[builder_cls.DEFAULT_BUILDER_CONFIG_NAME]
    config = builder_cls.make_config(**config_overrides(type(base), base, **params))
  download_config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
  return prepare(lambda d: builder_cls(config=config, data_dir=d, file_format="array_record"),
                 data_dir, download_config)


def prepare(make_builder: Callable[[str], tfds.core.DatasetBuilder], data_dir: str,
            download_config: tfds.download.DownloadConfig | None = None
            ) -> tfds.core.DatasetBuilder:
  """`make_builder(data_dir)`, prepared (a no-op when its files are there already).

  A URL `data_dir` (`gs://...`): TFDS' ArrayRecord writer only writes local files, so when the
  dataset is not prepared there yet it is built into a local temporary folder and its version
  folder (`<name>/<config>/<version>/`) is uploaded to the same place under `data_dir`; the
  returned builder reads from `data_dir`. `dataset_info.json`, which marks a prepared dataset
  for TFDS, is uploaded last. (Hosts that find it unprepared at the same time each build and
  upload it; build a large dataset once, on one host, before a multi-host run.)
  """
  builder = make_builder(data_dir)
  if not paths.is_url(data_dir) or builder.is_prepared():
    builder.download_and_prepare(download_config=download_config)
    return builder
  with tempfile.TemporaryDirectory(prefix="idgbr_tfds_") as tmp:
    local = make_builder(tmp)
    local.download_and_prepare(download_config=download_config)
    local_dir = epath.Path(local.data_dir)
    remote_dir = paths.resolve(data_dir) / local_dir.relative_to(tmp)
    files = sorted(paths.list_files(local_dir),
                   key=lambda p: (p.name == "dataset_info.json", os.fspath(p)))
    for path in files:
      paths.write_bytes(remote_dir / path.relative_to(local_dir), path.read_bytes())
  builder = make_builder(data_dir)
  builder.download_and_prepare(download_config=download_config)  # finds it prepared
  return builder


def main(builder_cls, argv: Iterable[str] | None = None) -> tfds.core.DatasetBuilder:
  """Shell entry point shared by `python -m idgbr_datasets.<package>`. Bad input (a
  ManualDataError naming the file, an unknown --set field) prints `error: <message>` and exits
  with status 1, without a traceback (the `idgbr` command's error boundary)."""
  from idgbr_jax import cli  # pylint: disable=import-outside-toplevel
  out = cli.guarded(lambda _: _build_from_args(builder_cls, argv))([])
  if isinstance(out, int):
    import sys  # pylint: disable=import-outside-toplevel
    sys.exit(out)
  return out


def _build_from_args(builder_cls, argv: Iterable[str] | None) -> tfds.core.DatasetBuilder:
  parser = argparse.ArgumentParser(
      prog=f"python -m {builder_cls.__module__.rsplit('.', 1)[0]}",
      description=f"Build the {builder_cls.name} TFDS dataset (ArrayRecord) from manual_dir.",
      epilog=builder_cls.MANUAL_DOWNLOAD_INSTRUCTIONS,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--manual_dir", required=True, help="the downloaded dataset folder")
  parser.add_argument("--data_dir", default=os.environ.get(
      "TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets")))
  parser.add_argument("--config", default=None, help="predefined config: " + ", ".join(
      builder_cls.builder_configs))
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="override a config field, e.g. --set tile_size=256 (repeatable)")
  args = parser.parse_args(list(argv) if argv is not None else None)
  base = builder_cls.builder_configs[args.config or builder_cls.DEFAULT_BUILDER_CONFIG_NAME]
  params = {}
  for item in args.set:
    key, sep, value = item.partition("=")
    if not sep or not hasattr(base, key):
      parser.error(f"--set {item!r}: expected FIELD=VALUE with FIELD a field of "
                   f"{type(base).__name__}")
    default = getattr(base, key)
    if isinstance(default, bool):
      params[key] = value.lower() in ("1", "true", "yes")
    elif isinstance(default, int):
      params[key] = int(value)
    else:
      params[key] = value
  builder = build(builder_cls, args.manual_dir, args.data_dir, base.name, **params)
  info = builder.info
  print(f"built {info.full_name} in {builder.data_dir}: " + ", ".join(
      f"{k}={v.num_examples}" for k, v in sorted(info.splits.items())))
  print(f"config name for configs: config.data.tfds_config = {builder.builder_config.name!r}")
  return builder


# ----------------------------------------------------------------------------------------------
# Image/label folder pairs (CHN6-CUG, WHU-Building, FGFD).


@dataclasses.dataclass(eq=False)
class PairedConfig(tfds.core.BuilderConfig):
  """How label files become class indices.

  Attributes:
    strict_values: binary masks: values outside {0, 1, 255} are an error (else nonzero -> 1).
    foreground: colour-label datasets (FGFD): which palette entries are class 1.
    unknown_colour: colour-label datasets: "error" or "ignore" (-> 255) for colours not in the
      palette.
  """
  strict_values: bool = True
  foreground: str = "all"
  unknown_colour: str = "error"


class PairedFolderBuilder(ManualBuilder, skip_registration=True):
  """Pairs `<split>/<IMAGE_DIR>/<key><IMAGE_SUFFIX>.*` with `<LABEL_DIR>/<key><LABEL_SUFFIX>.*`.

  Subclasses set SPLITS ({tfds split: (candidate folder names, required)}), the folder and suffix
  names, and `decode_label(raw, path) -> (H,W) uint8`.
  """

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {}
  IMAGE_DIR = "images"
  LABEL_DIR = "labels"
  IMAGE_SUFFIX = ""
  LABEL_SUFFIX = ""
  CLASS_NAMES: tuple[str, ...] = ("background", "foreground")
  DESCRIPTION = ""
  HOMEPAGE = ""
  CITATION = ""

  @classmethod
  def make_config(cls, **fields) -> PairedConfig:
    strict = fields.get("strict_values", True)
    name = "default" if strict else "nonstrict"
    if fields.get("foreground", "all") != "all":
      name += f"_fg-{fields['foreground']}"
    if fields.get("unknown_colour", "error") != "error":
      name += f"_unknown-{fields['unknown_colour']}"
    return PairedConfig(name=name, **fields)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
        citation=self.CITATION,
        features=segmentation_features(),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # record i is the i-th file in name order
        metadata=tfds.core.MetadataDict(
            class_names=list(self.CLASS_NAMES), num_classes=len(self.CLASS_NAMES),
            label_values=list(range(len(self.CLASS_NAMES))), ignore_index=IGNORE),
    )

  def split_folder(self, root: str, split: str) -> str | None:
    candidates, required = self.SPLITS[split]
    for name in candidates:
      if paths.isdir(join(root, name)):
        return join(root, name)
    if required:
      raise ManualDataError(f"missing folder {join(root, candidates[0])} (the {split} "
                            f"split of {self.name}; expected one of {list(candidates)} in "
                            f"{root})")
    return None

  def _split_generators(self, dl_manager):
    root = self._manual_root(dl_manager)
    out = {}
    for split in self.SPLITS:
      folder = self.split_folder(root, split)
      if folder is None:
        continue
      image_dir = require_dir(join(folder, self.IMAGE_DIR), f"{split} images")
      label_dir = require_dir(join(folder, self.LABEL_DIR), f"{split} labels")
      pairs = pair_files(image_dir, label_dir, image_suffix=self.IMAGE_SUFFIX,
                         label_suffix=self.LABEL_SUFFIX)
      out[split] = self._generate_examples(pairs)
    return out

  def _generate_examples(self, pairs):
    for index, (example_id, image_path, label_path) in enumerate(pairs):
      image = read_rgb(image_path)
      label = self.decode_label(read_array(label_path), label_path)
      check_same_size(image, label, image_path, label_path)
      yield index, {"image": image, "label": label[..., None], "id": example_id}

  def decode_label(self, raw: np.ndarray, path: str) -> np.ndarray:
    """Binary masks (0/255 or 0/1, grey or equal-channel RGB) -> {0, 1}."""
    return binary_mask(to_grey(raw, path), path, self.builder_config.strict_values)
