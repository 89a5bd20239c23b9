"""Pictures for a person: image | ground truth | coarse | refined | what changed.

The last column colours each pixel by what refinement did to it against the ground truth:
repaired (coarse wrong, refined right) green, damaged (coarse right, refined wrong) red,
changed but wrong before and after orange, wrong and unchanged grey, right and unchanged black,
ignored (the ignore label) dark blue. Without a ground truth the panel is image | coarse |
refined | changed (white where refined differs from coarse).

Pure NumPy + PIL (no JAX): used by `idgbr refine --visualize`, the demo and in-training
evaluation (as PNG files and TensorBoard image summaries).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from idgbr_jax import paths

IGNORE_LABEL = 255

# ISPRS Vaihingen/Potsdam colours in their class order (impervious surfaces, building, low
# vegetation, tree, car, clutter), which our ISPRS builder uses; other class counts take
# `palette`'s generated colours.
ISPRS_PALETTE = np.array([[255, 255, 255], [0, 0, 255], [0, 255, 255], [0, 255, 0],
                          [255, 255, 0], [255, 0, 0]], np.uint8)
BINARY_PALETTE = np.array([[0, 0, 0], [255, 255, 255]], np.uint8)

CHANGE_COLOURS = {
    "right": (0, 0, 0),
    "repaired": (0, 200, 0),
    "damaged": (230, 0, 0),
    "changed_wrong": (255, 150, 0),
    "wrong": (128, 128, 128),
    "ignored": (20, 20, 90),
}


def palette(num_classes: int) -> np.ndarray:
  """(num_classes, 3) uint8 colours: black/white for 2 classes, the ISPRS colours for 6, else
  well-separated hues (golden-ratio steps, alternating brightness)."""
  if num_classes == 2:
    return BINARY_PALETTE.copy()
  if num_classes == 6:
    return ISPRS_PALETTE.copy()
  import colorsys  # pylint: disable=import-outside-toplevel
  out = np.zeros((num_classes, 3), np.uint8)
  for k in range(num_classes):
    h = (k * 0.618033988749895) % 1.0
    v = 0.95 if k % 2 == 0 else 0.65
    out[k] = np.round(np.array(colorsys.hsv_to_rgb(h, 0.85, v)) * 255)
  return out


def colorize(index_map: np.ndarray, colours: np.ndarray) -> np.ndarray:
  """(H, W) class indices -> (H, W, 3) uint8; the ignore label and out-of-range values grey."""
  index_map = np.asarray(index_map)
  if index_map.ndim != 2:
    raise ValueError(f"a class-index map must be (H, W); got shape {index_map.shape}")
  out = np.full(index_map.shape + (3,), 96, np.uint8)
  valid = (index_map >= 0) & (index_map < len(colours))
  out[valid] = colours[index_map[valid].astype(np.int64)]
  return out


def image_to_rgb(image: np.ndarray, bands: Sequence[int] = (0, 1, 2)) -> np.ndarray:
  """An image for display: (H, W) or (H, W, C) of any dtype -> (H, W, 3) uint8.

  uint8 is shown as stored; other dtypes (float, uint16 GeoTIFF bands, normalised tensors) are
  stretched per band between their 2nd and 98th percentiles. More than 3 bands (RGBIR) show
  `bands` (default the first three); one band is shown as grey.
  """
  image = np.asarray(image)
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3:
    raise ValueError(f"an image must be (H, W) or (H, W, C); got shape {image.shape}")
  if image.shape[-1] == 1:
    image = np.repeat(image, 3, axis=-1)
  elif image.shape[-1] != 3:
    if max(bands) >= image.shape[-1]:
      raise ValueError(f"bands {tuple(bands)} of an image with {image.shape[-1]} bands")
    image = image[..., list(bands)]
  if image.dtype == np.uint8:
    return image
  x = image.astype(np.float64)
  lo = np.nanpercentile(x, 2, axis=(0, 1), keepdims=True)
  hi = np.nanpercentile(x, 98, axis=(0, 1), keepdims=True)
  x = (x - lo) / np.where(hi > lo, hi - lo, 1.0)
  return np.round(np.clip(np.nan_to_num(x), 0, 1) * 255).astype(np.uint8)


def change_categories(label: np.ndarray, coarse: np.ndarray, refined: np.ndarray,
                      ignore_label: int = IGNORE_LABEL) -> dict[str, np.ndarray]:
  """Boolean masks {right, repaired, damaged, changed_wrong, wrong, ignored} (disjoint, covering
  every pixel) of what refinement did against the ground truth."""
  label, coarse, refined = (np.asarray(a) for a in (label, coarse, refined))
  if not label.shape == coarse.shape == refined.shape:
    raise ValueError(f"label {label.shape}, coarse {coarse.shape} and refined {refined.shape} "
                     "maps must have the same shape")
  ignored = label == ignore_label
  c_ok, r_ok = (coarse == label) & ~ignored, (refined == label) & ~ignored
  wrong_both = ~ignored & ~c_ok & ~r_ok
  return {"right": c_ok & r_ok, "repaired": ~c_ok & r_ok & ~ignored,
          "damaged": c_ok & ~r_ok, "changed_wrong": wrong_both & (coarse != refined),
          "wrong": wrong_both & (coarse == refined), "ignored": ignored}


def change_counts(label, coarse, refined, ignore_label: int = IGNORE_LABEL) -> dict[str, int]:
  return {k: int(v.sum()) for k, v in change_categories(label, coarse, refined,
                                                        ignore_label).items()}


def change_map(label: Optional[np.ndarray], coarse: np.ndarray, refined: np.ndarray,
               ignore_label: int = IGNORE_LABEL) -> np.ndarray:
  """(H, W, 3) uint8: the change colours above; without `label`, white where refined differs."""
  if label is None:
    diff = np.asarray(coarse) != np.asarray(refined)
    return np.where(diff[..., None], np.uint8(255), np.uint8(0)).astype(np.uint8).repeat(3, -1)
  out = np.zeros(np.asarray(label).shape + (3,), np.uint8)
  for name, mask in change_categories(label, coarse, refined, ignore_label).items():
    out[mask] = CHANGE_COLOURS[name]
  return out


def _titled(tiles: list[np.ndarray], titles: list[str], gap: int) -> np.ndarray:
  from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
  h, w = tiles[0].shape[:2]
  header = 14
  canvas = np.full((h + header, len(tiles) * w + (len(tiles) - 1) * gap, 3), 255, np.uint8)
  for i, tile in enumerate(tiles):
    canvas[header:, i * (w + gap):i * (w + gap) + w] = tile
  im = Image.fromarray(canvas)
  draw = ImageDraw.Draw(im)
  for i, title in enumerate(titles):
    draw.text((i * (w + gap) + 2, 1), title, fill=(0, 0, 0))
  return np.asarray(im)


def display_scale(size: int, min_size: int = 128) -> int:
  """The integer zoom that shows a `size`-pixel tile at least `min_size` pixels wide (small
  tiles, e.g. 32-64 px, would be too small to see, and narrower than their titles)."""
  return max(1, -(-min_size // max(int(size), 1)))


def _row(tiles: list[np.ndarray], names: list[str], titles: bool, gap: int,
         scale: int) -> np.ndarray:
  if scale > 1:  # nearest-neighbour: every map pixel stays one colour block
    tiles = [np.repeat(np.repeat(t, scale, axis=0), scale, axis=1) for t in tiles]
  if titles:
    return _titled(tiles, names, gap)
  sep = np.full((tiles[0].shape[0], gap, 3), 255, np.uint8)
  row = [tiles[0]]
  for t in tiles[1:]:
    row += [sep, t]
  return np.concatenate(row, axis=1)


def panel(image: np.ndarray, label: Optional[np.ndarray], coarse: np.ndarray,
          refined: np.ndarray, num_classes: int, *, colours: Optional[np.ndarray] = None,
          bands: Sequence[int] = (0, 1, 2), ignore_label: int = IGNORE_LABEL,
          titles: bool = True, gap: int = 2, scale: int = 1) -> np.ndarray:
  """One row, (H + header, 5W + gaps, 3) uint8: image | ground truth | coarse | refined |
  changed; without `label` the ground-truth column is left out. `scale` > 1 zooms every tile
  by that integer factor."""
  colours = palette(num_classes) if colours is None else np.asarray(colours, np.uint8)
  coarse, refined = np.asarray(coarse), np.asarray(refined)
  rgb = image_to_rgb(image, bands)
  if rgb.shape[:2] != coarse.shape:
    raise ValueError(f"image {rgb.shape[:2]} and maps {coarse.shape} differ in size")
  tiles, names = [rgb], ["image"]
  if label is not None:
    tiles.append(colorize(label, colours))
    names.append("ground truth")
  tiles += [colorize(coarse, colours), colorize(refined, colours),
            change_map(label, coarse, refined, ignore_label)]
  names += ["coarse", "refined", "changed" if label is None else "repaired / damaged"]
  return _row(tiles, names, titles, gap, scale)


def select_panels(changed: dict[str, int], num_changed: int = 4, num_random: int = 2,
                  seed: int = 0) -> list[tuple[str, str]]:
  """(example id, tag) of the images to draw: the `num_changed` whose maps refinement changed
  most (`changed`: id -> changed pixels; ties by id), then `num_random` of the others drawn
  with `seed` (typical images, not only the extremes), in id order."""
  ranked = sorted(changed, key=lambda k: (-changed[k], k))
  picks = [(k, "most_changed") for k in ranked[:num_changed]]
  rest = sorted(ranked[num_changed:])
  drawn = np.random.default_rng(seed).permutation(len(rest))[:num_random]
  return picks + [(rest[i], "random") for i in sorted(drawn.tolist())]




def label_panel(image: np.ndarray, label: Optional[np.ndarray], prediction: np.ndarray,
                num_classes: int, *, colours: Optional[np.ndarray] = None,
                bands: Sequence[int] = (0, 1, 2), titles: bool = True,
                gap: int = 2, scale: int = 1) -> np.ndarray:
  """A segmenter's row (Stage I, nothing refined yet): image | ground truth | prediction;
  without `label`, image | prediction. `scale` as in `panel`."""
  colours = palette(num_classes) if colours is None else np.asarray(colours, np.uint8)
  rgb = image_to_rgb(image, bands)
  prediction = np.asarray(prediction)
  if rgb.shape[:2] != prediction.shape:
    raise ValueError(f"image {rgb.shape[:2]} and prediction {prediction.shape} differ in size")
  tiles, names = [rgb], ["image"]
  if label is not None:
    tiles.append(colorize(label, colours))
    names.append("ground truth")
  tiles.append(colorize(prediction, colours))
  names.append("prediction")
  return _row(tiles, names, titles, gap, scale)


def write_panel(path: paths.PathLike, *args, **kwargs) -> None:
  """`panel(...)` written as a PNG (local path or URL)."""
  paths.write_png(path, panel(*args, **kwargs))
