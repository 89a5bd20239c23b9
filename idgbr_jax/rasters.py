"""Images and class maps of any size on disk or in a bucket: PNG/JPEG (whole, through PIL) and
TIFF/GeoTIFF (windowed, through rasterio/GDAL), read and written through `paths` so gs:// works.

Reading: `open_raster(path, "image" | "coarse map" | ...)` reads the header (a PNG/JPEG is decoded
whole, which also checks it); `read(y0, y1, x0, x1)` returns (h, w, bands) in the file's dtype
(maps: (h, w)). A TIFF at a URL is first copied to a local temporary file (GDAL reads local
files; the copy is removed on `close`), so a 6000 x 6000 scene is never held in memory whole.

Scaling of image values to the uint8 range the models were trained on (`--scale`):
  * `auto` (default): uint8 as stored; any other dtype (uint16, int, float) per band from the
    scene's 2nd..98th percentile to 0..255 (clipped; percentiles of the valid pixels of a
    decimated read of at most ~1024 x 1024 samples);
  * `none`: values taken as 0..255 (clipped);
  * a number M (e.g. `65535`, `10000`): value / M * 255 (clipped).
The scaled values are rounded to uint8, so a uint8 GeoTIFF gives what the same pixels as PNG give.

Writing: `MapWriter` writes a single-band uint8 class map in row bands. Beside a georeferenced
TIFF it is a GeoTIFF with the source's CRS and transform (DEFLATE, 256 x 256 tiles) written band
by band through GDAL into a local temporary file, then moved (or uploaded) into place whole;
otherwise a PNG assembled in memory (uint8, H x W). Nodata: where every band of a source pixel is
the source's nodata value, the map holds `output_nodata(...)` (the source's value when it is an
integer in [num_classes, 255], else 255, the ignore label) and declares it as its nodata.
"""
from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from typing import Optional

import numpy as np

from idgbr_jax import paths

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
MAP_EXTENSIONS = (".png", ".tif", ".tiff")
TIFF_EXTENSIONS = (".tif", ".tiff")
IGNORE_LABEL = 255
_STATS_SAMPLES = 1024  # longest side of the decimated read behind `--scale=auto` percentiles


def is_tiff(path: paths.PathLike) -> bool:
  return os.path.splitext(os.fspath(path))[1].lower() in TIFF_EXTENSIONS


# ----- reading --------------------------------------------------------------------------------
class Raster:
  """An opened image or map. `georeferenced` TIFFs keep their rasterio dataset open."""

  def __init__(self, path: str, what: str):
    self.path, self.what = path, what
    self._stack = contextlib.ExitStack()
    self._array: Optional[np.ndarray] = None
    self._ds = None
    self.mode: Optional[str] = None
    try:
      if is_tiff(path):
        self._open_tiff()
      else:
        self._open_pil()
    except ValueError:
      self.close()
      raise
    except Exception as e:  # noqa: BLE001 - any decoder error, reported with the file name
      self.close()
      raise ValueError(f"cannot read {what} {path}: {type(e).__name__}: {e}; expected a PNG/JPEG "
                       "or a (Geo)TIFF") from e

  def _open_pil(self):
    im = paths.read_image(self.path)
    if im.mode == "P" and self.what == "image":
      im = im.convert("RGB")
    self.mode = im.mode
    a = np.asarray(im)
    self._array = a if a.ndim == 3 else a[..., None]
    self.height, self.width, self.count = self._array.shape
    self.dtype, self.nodata, self.georeferenced = self._array.dtype, None, False
    self.crs = self.transform = None

  def _open_tiff(self):
    import rasterio  # pylint: disable=import-outside-toplevel
    local = self._stack.enter_context(paths.local_copy(self.path))
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
      self._ds = self._stack.enter_context(rasterio.open(local))
    ds = self._ds
    self.height, self.width, self.count = ds.height, ds.width, ds.count
    self.dtype = np.dtype(ds.dtypes[0])
    self.nodata = ds.nodata
    self.crs, self.transform = ds.crs, ds.transform
    self.georeferenced = ds.crs is not None or not ds.transform.is_identity

  def read(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    """(y1 - y0, x1 - x0, bands) in the file's dtype."""
    if self._array is not None:
      return self._array[y0:y1, x0:x1]
    from rasterio.windows import Window  # pylint: disable=import-outside-toplevel
    try:
      a = self._ds.read(window=Window(x0, y0, x1 - x0, y1 - y0))
    except Exception as e:  # noqa: BLE001 - a truncated/corrupt block, named
      raise ValueError(f"cannot read {self.what} {self.path} (rows {y0}..{y1}, columns "
                       f"{x0}..{x1}): {type(e).__name__}: {e}") from e
    return np.moveaxis(a, 0, -1)

  def read_decimated(self, step: int) -> np.ndarray:
    """array[::step, ::step] of the whole raster, read in row bands (bounded memory)."""
    if self._array is not None:
      return self._array[::step, ::step]
    rows = []
    band = max(step, (512 // step) * step)
    for y in range(0, self.height, band):
      rows.append(self.read(y, min(y + band, self.height), 0, self.width)[::step, ::step])
    return np.concatenate(rows)

  def invalid(self, array: np.ndarray) -> np.ndarray:
    """(h, w) bool: pixels whose every band is the nodata value (or not finite)."""
    bad = np.zeros(array.shape[:2], bool)
    if array.dtype.kind == "f":
      bad |= ~np.isfinite(array).all(-1)
    if self.nodata is not None:
      nd = self.nodata
      same = np.isnan(array) if (isinstance(nd, float) and math.isnan(nd)) else array == nd
      bad |= same.all(-1)
    return bad

  def close(self):
    self._stack.close()
    self._ds = None

  def __enter__(self) -> "Raster":
    return self

  def __exit__(self, *exc):
    self.close()


def open_raster(path: str, what: str) -> Raster:
  return Raster(path, what)


def check_image_bands(raster: Raster, channels: int) -> None:
  if raster.count != channels:
    how = f" (mode {raster.mode})" if raster.mode else ""
    rgb = " (RGB, as the model's training images)" if channels == 3 else \
        " (config.data.in_channels)"
    raise ValueError(f"image {raster.path} has {raster.count} band(s){how}; expected "
                     f"{channels}{rgb}")


def map_values(raster: Raster, array: np.ndarray) -> np.ndarray:
  """(h, w) class indices of a map window: one band, or a grey PNG stored as equal channels."""
  if array.shape[-1] == 1:
    return array[..., 0]
  if not all(np.array_equal(array[..., 0], array[..., c]) for c in range(array.shape[-1])):
    raise ValueError(f"{raster.what} {raster.path} is a {array.shape[-1]}-channel colour image; "
                     "expected a single-band map of class indices (an index PNG)")
  return array[..., 0]


# ----- scaling to uint8 -----------------------------------------------------------------------
def parse_scale(value: str) -> str | float:
  """`--scale`: 'auto', 'none' or a positive number (the value shown as 255)."""
  v = str(value).strip().lower()
  if v in ("auto", "none"):
    return v
  try:
    m = float(v)
  except ValueError:
    m = float("nan")
  if not m > 0 or not math.isfinite(m):
    raise ValueError(f"--scale={value!r}; expected 'auto', 'none' or a positive number (the "
                     "value mapped to 255, e.g. 65535 or 10000)")
  return m


def scale_stats(raster: Raster, scale: str | float) -> Optional[np.ndarray]:
  """(bands, 2) low/high values for `auto` on a non-uint8 image, else None."""
  if scale != "auto" or raster.dtype == np.uint8:
    return None
  step = max(1, math.ceil(max(raster.height, raster.width) / _STATS_SAMPLES))
  sample = raster.read_decimated(step).astype(np.float64)
  valid = ~raster.invalid(sample)
  stats = np.zeros((raster.count, 2))
  for b in range(raster.count):
    v = sample[..., b][valid]
    if v.size:
      stats[b] = np.percentile(v, [2, 98])
    stats[b, 1] = max(stats[b, 1], stats[b, 0] + 1e-6)
  return stats


def to_uint8(array: np.ndarray, scale: str | float, stats: Optional[np.ndarray]) -> np.ndarray:
  if array.dtype == np.uint8 and scale in ("auto", "none"):
    return array
  x = np.nan_to_num(array.astype(np.float64))
  if stats is not None:
    x = (x - stats[:, 0]) / (stats[:, 1] - stats[:, 0]) * 255.0
  elif scale != "none":
    x = x / float(scale) * 255.0
  return np.round(np.clip(x, 0, 255)).astype(np.uint8)


# ----- writing --------------------------------------------------------------------------------
def output_nodata(source_nodata, num_classes: int) -> Optional[int]:
  if source_nodata is None:
    return None
  if (not math.isnan(source_nodata) and float(source_nodata).is_integer()
      and num_classes <= source_nodata <= 255):
    return int(source_nodata)
  return IGNORE_LABEL


def output_name(stem: str, source: Raster) -> str:
  return stem + (".tif" if source.georeferenced else ".png")


class MapWriter:
  """A single-band uint8 class map, written in row bands (`write(y0, rows)`), committed by
  `close()` (nothing appears at `path` before; `abort()` drops it)."""

  def __init__(self, path: str, height: int, width: int, like: Optional[Raster] = None,
               nodata: Optional[int] = None):
    self.path, self.height, self.width, self.nodata = path, height, width, nodata
    self._tmp = self._ds = self._array = None
    if like is not None and like.georeferenced:
      import rasterio  # pylint: disable=import-outside-toplevel
      self._tmp = tempfile.TemporaryDirectory(prefix="idgbr_map_")
      profile = dict(driver="GTiff", height=height, width=width, count=1, dtype="uint8",
                     crs=like.crs, transform=like.transform, nodata=nodata, compress="deflate",
                     tiled=True, blockxsize=256, blockysize=256)
      self._local = os.path.join(self._tmp.name, os.path.basename(os.fspath(path)))
      with warnings.catch_warnings():  # a source with a CRS and an identity transform
        warnings.simplefilter("ignore", rasterio.errors.NotGeoreferencedWarning)
        self._ds = rasterio.open(self._local, "w", **profile)
    else:
      self._array = np.zeros((height, width), np.uint8)

  def write(self, y0: int, rows: np.ndarray) -> None:
    rows = np.asarray(rows, np.uint8)
    if self._ds is None:
      self._array[y0:y0 + rows.shape[0]] = rows
      return
    from rasterio.windows import Window  # pylint: disable=import-outside-toplevel
    self._ds.write(rows, 1, window=Window(0, y0, rows.shape[1], rows.shape[0]))

  def close(self) -> None:
    if self._ds is None:
      paths.write_png(self.path, self._array)
      return
    self._ds.close()
    self._ds = None
    with open(self._local, "rb") as f:  # our temporary file, not a user path
      paths.write_bytes(self.path, f.read())
    self._tmp.cleanup()

  def abort(self) -> None:
    if self._ds is not None:
      self._ds.close()
      self._ds = None
    if self._tmp is not None:
      self._tmp.cleanup()


# ----- scenes: model inputs per window, class maps out ------------------------------------------
class ImageWindows:
  """The model inputs of an image's windows: scaled to uint8 (`--scale`), reflect-padded to the
  tile where the image is smaller, then `normalize`d (the training images' normalisation)."""

  def __init__(self, raster: Raster, scale: str | float, normalize):
    self.raster, self.scale, self.normalize = raster, scale, normalize
    self.stats = scale_stats(raster, scale)

  def uint8(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    return to_uint8(self.raster.read(y0, y1, x0, x1), self.scale, self.stats)

  def window(self, tiling, window) -> np.ndarray:
    from idgbr_jax.inference import windows  # pylint: disable=import-outside-toplevel
    y0, y1, x0, x1 = tiling.source_box(window)
    return self.normalize(windows.pad_to_tile(self.uint8(y0, y1, x0, x1), tiling.tile))

  def decimated(self, step: int) -> np.ndarray:
    return to_uint8(self.raster.read_decimated(step), self.scale, self.stats)

  def has_nodata(self) -> bool:
    return self.raster.nodata is not None or self.raster.dtype.kind == "f"

  def invalid_rows(self, y0: int, y1: int) -> np.ndarray:
    return self.raster.invalid(self.raster.read(y0, y1, 0, self.raster.width))


class ClassMapSink:
  """`Scene.write` for class maps: argmax of the blended scores, `nodata` where `invalid(y0, y1)`
  says so, rows to `writer` (None on processes that do not write), and optionally every
  `keep`-th row and column kept for a picture."""

  def __init__(self, writer: Optional[MapWriter], invalid=None, nodata: Optional[int] = None,
               keep: int = 0):
    self.writer, self.invalid, self.nodata, self.keep = writer, invalid, nodata, keep
    self._kept: list[np.ndarray] = []

  def write(self, y0: int, y1: int, scores: np.ndarray) -> None:
    classes = np.asarray(scores).argmax(-1).astype(np.uint8)
    if self.invalid is not None:
      bad = self.invalid(y0, y1)
      if bad is not None and bad.any():
        classes[bad] = IGNORE_LABEL if self.nodata is None else self.nodata
    if self.writer is not None:
      self.writer.write(y0, classes)
    if self.keep:
      self._kept.append(classes[(-y0) % self.keep::self.keep, ::self.keep])

  def kept(self) -> np.ndarray:
    return np.concatenate(self._kept)


def list_images(directory: str) -> list[tuple[str, str]]:
  """(stem, path) of every image (IMAGE_EXTENSIONS) in `directory`, sorted by name."""
  if not paths.isdir(directory):
    raise ValueError(f"directory not found: {directory}")
  out = []
  for name in paths.listdir(directory):
    stem, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTENSIONS:
      out.append((stem, paths.join(directory, name)))
  if not out:
    raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
  return out


def check_map(raster: Raster, height: int, width: int, num_classes: Optional[int],
              image_path: str, stem: str) -> None:
  """A coarse map / label: its image's size, one band, class values (nodata aside) < K."""
  if (raster.height, raster.width) != (height, width):
    raise ValueError(f"{stem}: {raster.what} {raster.path} is {raster.width}x{raster.height} "
                     f"(WxH) and image {image_path} is {width}x{height}; the {raster.what} "
                     f"must be {width}x{height}, its image's size")
  if num_classes is None:
    return
  top = -1
  bad: set[int] = set()
  for y in range(0, raster.height, 512):
    a = map_values(raster, raster.read(y, min(y + 512, raster.height), 0, raster.width))
    if raster.nodata is not None:
      a = a[a != raster.nodata]
    if a.size:
      top = max(top, int(a.max()))
      if top >= num_classes:
        bad.update(int(v) for v in np.unique(a[a >= num_classes]))
  if bad:
    raise ValueError(f"{raster.what} {raster.path} has values {sorted(bad)[:10]} outside the "
                     f"refiner's {num_classes} classes [0, {num_classes})")


def map_window(raster: Raster, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
  """(h, w) int32 class indices; the map's nodata pixels read as class 0 (their output pixels
  are nodata anyway)."""
  a = map_values(raster, raster.read(y0, y1, x0, x1)).astype(np.int32)
  if raster.nodata is not None:
    a = np.where(a == int(raster.nodata), 0, a)
  return a
