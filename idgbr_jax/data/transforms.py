"""grain transforms. Image, label and coarse map are augmented together (paired).

Images may have any band count C (`config.data.in_channels`, e.g. 4 for RGBIR); see
`normalize_image` for what bands beyond the third get.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np
from PIL import Image

from idgbr_jax import paths
from idgbr_jax.data.sources import DataError, as_label_map

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)
# 'imagenet' normalisation of bands beyond the third (NIR, ...): ImageNet's grey statistics, the
# mean of its RGB means and stds. A band equal to the RGB pixel mean then normalises to about the
# mean of the normalised RGB bands, which is what a first conv expanded from RGB weights treats
# as "no extra information" (`models.autoencoder.expand_input_kernel`).
EXTRA_BAND_MEAN = float(np.mean(IMAGENET_MEAN))   # 0.449
EXTRA_BAND_STD = float(np.mean(IMAGENET_STD))     # 0.226
NORMALIZATIONS = ("imagenet", "minus_one_one", "unit")

Example = dict[str, Any]


def _id(example: Example) -> str:
  value = example.get("id", "?")
  return value.decode() if isinstance(value, bytes) else str(value)


# `ignore_index` value meaning "no ignore value": every label pixel must be a class. Training that
# feeds labels through the label embedding uses it (Stage II, autoencoder pretraining): the
# original's Embedding(K, 3) cannot take 255 either, and here it would become NaN colours.
NO_IGNORE = -1


def check_label(label: np.ndarray, num_classes: int, ignore_index: int, where: str) -> None:
  """Raises DataError naming `where` for values outside [0, num_classes) other than the ignore
  value; `ignore_index < 0` means none is allowed (Stage II training colours every pixel)."""
  bad = (label >= num_classes) & (label != ignore_index) | (label < 0)
  if bad.any():
    values = sorted(set(np.unique(label[bad]).tolist()))
    why = (f"ignore_index={ignore_index}" if ignore_index >= 0 else
           "no ignore value here: Stage II training colours every label pixel with the label "
           "embedding; train on labels without one (not the eroded ISPRS ones; clutter as a "
           "class)")
    raise DataError(f"{where}: label values {values[:10]} outside [0, {num_classes}) ({why})")


@dataclasses.dataclass(frozen=True)
class ParseExample(grain.transforms.Map):
  """TFDS record -> {'image': uint8 HWC, 'label': int32 HW, 'id': str[, 'coarse': int32 HW]}.

  A stored `coarse` map (e.g. the original's data package) is kept, binarised like the label
  when `binarize_labels`, and checked against `num_classes`.
  """
  num_classes: int
  ignore_index: int = 255
  binarize_labels: bool = False
  num_channels: int = 3       # config.data.in_channels
  source: str = ""            # the dataset and split, for error messages

  def map(self, element: Example) -> Example:
    image = np.asarray(element["image"])
    if image.ndim != 3 or image.shape[-1] != self.num_channels:
      where = f"{self.source}: " if self.source else ""
      bands = f"; the record has {image.shape[-1]} bands" if image.ndim == 3 else ""
      raise DataError(f"{where}example {_id(element)}: image shape {image.shape}, expected "
                      f"(H,W,{self.num_channels}) (config.data.in_channels={self.num_channels}"
                      f"{bands}): set config.data.in_channels to the dataset's band count, or "
                      "use a build of the dataset with that many bands")
    label = as_label_map(element["label"])
    if label.shape != image.shape[:2]:
      raise DataError(f"example {_id(element)}: label shape {label.shape} != image "
                      f"{image.shape[:2]}")
    if self.binarize_labels:
      label = np.where(label == self.ignore_index, label, (label != 0).astype(np.int32))
    check_label(label, self.num_classes, self.ignore_index, f"example {_id(element)}")
    out = {"image": image, "label": label, "id": _id(element)}
    if "coarse" in element:
      coarse = as_label_map(element["coarse"])
      if coarse.shape != label.shape:
        raise DataError(f"example {_id(element)}: stored coarse shape {coarse.shape} != label "
                        f"{label.shape}")
      if self.binarize_labels:
        coarse = (coarse != 0).astype(np.int32)
      check_label(coarse, self.num_classes, -1, f"example {_id(element)} (stored coarse)")
      out["coarse"] = coarse
    return out


@dataclasses.dataclass(frozen=True)
class AttachCoarse(grain.transforms.Map):
  """Adds `coarse` (a Stage I map) read from `<coarse_dir>/<id>.png`; a missing file is an error.

  A map whose size differs from the label's is an error, unless `resize_mismatched` (set when
  the pipeline resizes examples): then it is resized to the label's size, nearest neighbour.
  """
  coarse_dir: str
  num_classes: int
  resize_mismatched: bool = False

  def map(self, element: Example) -> Example:
    path = paths.join(self.coarse_dir, f"{element['id']}.png")
    try:
      coarse = np.asarray(paths.read_image(path)).astype(np.int32)
    except FileNotFoundError as e:
      raise DataError(f"coarse map missing for example {element['id']}: {path}") from e
    except Exception as e:  # noqa: BLE001
      raise DataError(f"cannot read coarse map {path}: {e}") from e
    if coarse.ndim == 3:
      coarse = coarse[..., 0]
    if coarse.shape != element["label"].shape:
      if not self.resize_mismatched:
        raise DataError(f"coarse map {path} has shape {coarse.shape}, label has "
                        f"{element['label'].shape}")
      h, w = element["label"].shape
      coarse = np.asarray(Image.fromarray(coarse.astype(np.uint8)).resize(
          (w, h), Image.NEAREST)).astype(np.int32)
    check_label(coarse, self.num_classes, -1, f"coarse map {path}")
    return {**element, "coarse": coarse}


_SPATIAL_KEYS = ("image", "label", "coarse")


@dataclasses.dataclass(frozen=True)
class Resize(grain.transforms.Map):
  """Resizes to size x size as the original's ResizeI2S: image bilinear, maps nearest (PIL)."""
  size: int

  def map(self, element: Example) -> Example:
    target = (self.size, self.size)
    out = dict(element)
    for key in _SPATIAL_KEYS:
      if key not in element or element[key].shape[:2] == target:
        continue
      value = element[key]
      if key == "image" and value.shape[-1] != 3:
        # Band by band: PIL would take 4 bands as RGBA and premultiply them by the 4th.
        out[key] = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(value[..., c]))
                                        .resize(target, Image.BILINEAR))
                             for c in range(value.shape[-1])], axis=-1)
      elif key == "image":
        out[key] = np.asarray(Image.fromarray(value).resize(target, Image.BILINEAR))
      else:  # class maps: nearest keeps them valid indices (255 stays 255)
        out[key] = np.asarray(Image.fromarray(value.astype(np.uint8)).resize(
            target, Image.NEAREST)).astype(value.dtype)
    return out


def _apply(element: Example, fn) -> Example:
  return {k: (np.ascontiguousarray(fn(v)) if k in _SPATIAL_KEYS else v) for k, v in element.items()}


# The dihedral element rot90(hflip^f(a), r) has code 4 f + r. The codes each augmentation reaches:
DIHEDRAL_CODES = {"none": (0,), "flip": (0, 2, 4, 6), "fliprot": tuple(range(8))}


def dihedral(a: np.ndarray, code: int) -> np.ndarray:
  """Applies dihedral element `code` (see DIHEDRAL_CODES) to the leading two axes of `a`."""
  flip, r = divmod(int(code), 4)
  if flip:
    a = a[:, ::-1]
  return np.rot90(a, r, axes=(0, 1)) if r else a


@dataclasses.dataclass(frozen=True)
class RandomFlipRot(grain.transforms.RandomMap):
  """Paired flip in {h, v, both, none, none} (the original's legacy loader) and rot90 k in 0..3.

  `emit_code` adds `dihedral`, the code of the element applied (v-flip = h-flip then rot180,
  both = rot180), so cached per-variant latents can be looked up (train/latent_cache.py).
  """
  rotate: bool = True
  emit_code: bool = False

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    choice = rng.integers(5)
    k = int(rng.integers(4)) if self.rotate else 0
    if element["label"].shape[0] != element["label"].shape[1]:
      k = 0  # rot90 of a non-square example would change its shape
    def fn(a):
      if choice in (0, 2):
        a = a[:, ::-1]
      if choice in (1, 2):
        a = a[::-1]
      if k:
        a = np.rot90(a, k, axes=(0, 1))
      return a
    out = _apply(element, fn)
    if self.emit_code:
      flip, r = {0: (1, k), 1: (1, k + 2), 2: (0, k + 2)}.get(int(choice), (0, k))
      out["dihedral"] = np.int32(4 * flip + r % 4)
    return out


@dataclasses.dataclass(frozen=True)
class RandomCrop(grain.transforms.RandomMap):
  """Paired random crop to size x size (no-op when the example is already that size)."""
  size: int

  def random_map(self, element: Example, rng: np.random.Generator) -> Example:
    h, w = element["label"].shape
    if h < self.size or w < self.size:
      raise DataError(f"example {element.get('id')}: {h}x{w} smaller than crop {self.size}")
    y = int(rng.integers(h - self.size + 1))
    x = int(rng.integers(w - self.size + 1))
    return _apply(element, lambda a: a[y:y + self.size, x:x + self.size])


def band_statistics(channels: int) -> tuple[np.ndarray, np.ndarray]:
  """'imagenet' (mean, std) of `channels` bands: ImageNet's for bands 0..2 (whatever they hold:
  Potsdam IRRG feeds IR as R, as the original does), EXTRA_BAND_MEAN / STD for the others."""
  if channels == 3:
    return IMAGENET_MEAN, IMAGENET_STD
  n = 3 if channels > 3 else 0  # 1 or 2 bands (panchromatic, SAR): grey statistics for all
  mean = np.concatenate([IMAGENET_MEAN[:n], np.full(channels - n, EXTRA_BAND_MEAN, np.float32)])
  std = np.concatenate([IMAGENET_STD[:n], np.full(channels - n, EXTRA_BAND_STD, np.float32)])
  return mean, std


def normalize_image(image: np.ndarray, mode: str) -> np.ndarray:
  """uint8 HWC -> float32. 'imagenet' reproduces the original, which feeds the same tensor to
  the SD VAE (that expects [-1, 1]) and to DINOv2; extra bands get `band_statistics`. The other
  modes treat every band alike."""
  x = image.astype(np.float32) / 255.0
  if mode == "imagenet":
    mean, std = band_statistics(image.shape[-1])
    return (x - mean) / std
  if mode == "minus_one_one":
    return x * 2.0 - 1.0
  if mode == "unit":
    return x
  raise ValueError(f"config.data.normalization={mode!r}; allowed: {NORMALIZATIONS}")


@dataclasses.dataclass(frozen=True)
class Normalize(grain.transforms.Map):
  """Image to float32 with the configured normalisation; optionally drops the string id."""
  mode: str = "imagenet"
  keep_id: bool = False

  def map(self, element: Example) -> Example:
    out = {k: v for k, v in element.items() if k != "id" or self.keep_id}
    out["image"] = normalize_image(element["image"], self.mode)
    return out
