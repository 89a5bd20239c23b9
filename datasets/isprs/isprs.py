"""TFDS builders for ISPRS Potsdam and Vaihingen (2D semantic labelling), tiled into patches.

Both share this code: RGB colour labels -> class indices, the image composite (Potsdam: IRRG,
RGB or RGBIR; Vaihingen: IRRG only), tiling of the large tiles into `tile_size` patches every
`stride` pixels (the last row/column of patches is shifted flush with the border so nothing is
dropped), the standard train/test tile lists, and the eroded-boundary labels (`eroded=True`;
the eroded boundary, black in those files, becomes 255 = ignore).

Class indices (`class_order`):
  * "idgbr" (default): clutter 0, impervious surfaces 1, building 2, low vegetation 3, tree 4,
    car 5. The original evaluates Potsdam on label values 1..5 with value 0 excluded
    [CODE evaluation/configs/Potsdam/*.yaml]; reading 0 as clutter matches the usual ISPRS
    protocol (five classes, clutter not scored) [INFER: the package's mapping is not documented].
  * "isprs": impervious 0, building 1, low vegetation 2, tree 3, car 4, clutter 5 (the
    benchmark's class order, as `synthetic_rs/multiclass6` and mmsegmentation).
Clutter (`clutter`): "class" keeps it as a class; "ignore" maps it to 255 (not trained on).

Each record: image (S,S,3) uint8 ((S,S,4) for RGBIR: R,G,B,IR), label (S,S,1) uint8, id
`<tile>_y<row>_x<col>` (e.g. `top_potsdam_2_10_y00512_x01024`; the composite is not part of the
id, so coarse maps from IRRG and RGB models share names), tile (the source tile name), y, x (the
patch's top-left pixel in the tile, to stitch predictions back).
"""
from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import tensorflow_datasets as tfds

from idgbr_datasets import _common

CLASS_NAMES = ("impervious_surfaces", "building", "low_vegetation", "tree", "car", "clutter")
COLOURS = ((255, 255, 255), (0, 0, 255), (0, 255, 255), (0, 255, 0), (255, 255, 0), (255, 0, 0))
BOUNDARY_COLOUR = (0, 0, 0)  # the eroded labels' boundary band
# Index of each ISPRS class (CLASS_NAMES order) under each class order.
CLASS_ORDERS = {"idgbr": (1, 2, 3, 4, 5, 0), "isprs": (0, 1, 2, 3, 4, 5)}
CLUTTER = ("class", "ignore")

# The standard split (ISPRS benchmark / mmsegmentation): labelled training tiles vs. the tiles
# whose labels were held back for the benchmark's test.
POTSDAM_TILES = {
    "train": ("2_10", "2_11", "2_12", "3_10", "3_11", "3_12", "4_10", "4_11", "4_12", "5_10",
              "5_11", "5_12", "6_10", "6_11", "6_12", "6_7", "6_8", "6_9", "7_10", "7_11",
              "7_12", "7_7", "7_8", "7_9"),
    "test": ("2_13", "2_14", "3_13", "3_14", "4_13", "4_14", "4_15", "5_13", "5_14", "5_15",
             "6_13", "6_14", "6_15", "7_13"),
}
VAIHINGEN_TILES = {
    "train": ("1", "3", "5", "7", "11", "13", "15", "17", "21", "23", "26", "28", "30", "32",
              "34", "37"),
    "test": ("2", "4", "6", "8", "10", "12", "14", "16", "20", "22", "24", "27", "29", "31",
             "33", "35", "38"),
}


def class_names(class_order: str = "idgbr", clutter: str = "class") -> list[str]:
  """Names by index under this encoding (an index left without a class is named 'unused')."""
  order = CLASS_ORDERS[class_order]
  names = ["unused"] * (max(order) + 1)
  for name, index in zip(CLASS_NAMES, order):
    if name != "clutter" or clutter == "class":
      names[index] = name
  while names[-1] == "unused":  # "isprs" with clutter ignored: 5 classes
    names.pop()
  return names


def num_classes(class_order: str = "idgbr", clutter: str = "class") -> int:
  """Logit count ("idgbr" keeps 6 with clutter ignored: index 0 unused, classes 1..5)."""
  return len(class_names(class_order, clutter))


def eval_label_values(class_order: str = "idgbr") -> list[int]:
  """The five scored classes (clutter excluded), as the ISPRS protocol and the original."""
  order = CLASS_ORDERS[class_order]
  return [order[i] for i in range(5)]


def colour_table(class_order: str, clutter: str, eroded: bool
                 ) -> tuple[list[tuple[int, int, int]], list[int]]:
  """Palette colours and the index each becomes."""
  if class_order not in CLASS_ORDERS:
    raise ValueError(f"class_order={class_order!r}; allowed: {sorted(CLASS_ORDERS)}")
  if clutter not in CLUTTER:
    raise ValueError(f"clutter={clutter!r}; allowed: {CLUTTER}")
  colours, indices = list(COLOURS), list(CLASS_ORDERS[class_order])
  if clutter == "ignore":
    indices[CLASS_NAMES.index("clutter")] = _common.IGNORE
  if eroded:
    colours.append(BOUNDARY_COLOUR)
    indices.append(_common.IGNORE)
  return colours, indices


def encode_label(rgb: np.ndarray, path: str, class_order: str = "idgbr", clutter: str = "class",
                 eroded: bool = False, unknown: str = "error") -> np.ndarray:
  """(H,W,3) ISPRS colour label -> (H,W) uint8 class indices (255 = ignore)."""
  colours, indices = colour_table(class_order, clutter, eroded)
  return _common.colours_to_index(rgb, colours, indices, path, unknown=unknown)


@dataclasses.dataclass(eq=False)
class IsprsConfig(tfds.core.BuilderConfig):
  """Composite, tiling and label encoding of an ISPRS build.

  Attributes:
    channels: "irrg" (the original's choice), "rgb" or "rgbir" (Potsdam only; 4 channels).
    tile_size: patch side in pixels.
    stride: step between patches (< tile_size overlaps).
    eroded: use the eroded-boundary labels (boundary pixels -> 255).
    class_order: "idgbr" or "isprs" (see the module docstring).
    clutter: "class" or "ignore".
    unknown_colour: "error" or "ignore" (-> 255) for label colours outside the palette.
    train_tiles, test_tiles: comma-separated tile names replacing the standard lists ("" =
      standard), e.g. "2_10,2_11" (Potsdam) or "1,3" (Vaihingen).
  """
  channels: str = "irrg"
  tile_size: int = 512
  stride: int = 512
  eroded: bool = False
  class_order: str = "idgbr"
  clutter: str = "class"
  unknown_colour: str = "error"
  train_tiles: str = ""
  test_tiles: str = ""


def config_name(channels="irrg", tile_size=512, stride=512, eroded=False, class_order="idgbr",
                clutter="class", unknown_colour="error", train_tiles="", test_tiles="") -> str:
  """Name that encodes every parameter, so differently cut builds never share a directory."""
  name = f"{channels}_t{tile_size}_s{stride}"
  if eroded:
    name += "_eroded"
  if class_order != "idgbr":
    name += f"_{class_order}"
  if clutter != "class":
    name += f"_clutter-{clutter}"
  if unknown_colour != "error":
    name += f"_unknown-{unknown_colour}"
  if train_tiles or test_tiles:
    digest = hashlib.sha1(f"{train_tiles}|{test_tiles}".encode()).hexdigest()[:8]
    name += f"_tiles-{digest}"
  return name


def _config(description: str, **fields) -> IsprsConfig:
  return IsprsConfig(name=config_name(**fields), description=description, **fields)


class IsprsBuilder(_common.ManualBuilder, skip_registration=True):
  """Shared Potsdam / Vaihingen logic; subclasses give the file layout and tile lists."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  TILES: dict[str, tuple[str, ...]] = {}
  CHANNEL_FILES: dict[str, tuple[str, str]] = {}  # channels -> (folder, file name pattern)
  LABEL_FILES: tuple[str, str] = ("", "")
  ERODED_FILES: tuple[str, str] = ("", "")
  TILE_NAME = "{}"  # tile name (id prefix) from a list entry
  DESCRIPTION = ""
  HOMEPAGE = ""

  @classmethod
  def make_config(cls, **fields) -> IsprsConfig:
    return IsprsConfig(name=config_name(**fields), **fields)

  def _check_config(self) -> IsprsConfig:
    cfg = self.builder_config
    if cfg.channels not in self.CHANNEL_FILES:
      raise ValueError(f"{self.name}: channels={cfg.channels!r}; allowed: "
                       f"{sorted(self.CHANNEL_FILES)}")
    if cfg.tile_size < 1 or cfg.stride < 1:
      raise ValueError(f"{self.name}: tile_size={cfg.tile_size} and stride={cfg.stride} must "
                       f"be positive")
    colour_table(cfg.class_order, cfg.clutter, cfg.eroded)  # validates the names
    return cfg

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self._check_config()
    s = cfg.tile_size
    channels = 4 if cfg.channels == "rgbir" else 3
    return tfds.core.DatasetInfo(
        builder=self, description=self.DESCRIPTION, homepage=self.HOMEPAGE,
        features=_common.segmentation_features(
            (s, s), channels, tile=tfds.features.Text(),
            y=tfds.features.Scalar(dtype=np.int32), x=tfds.features.Scalar(dtype=np.int32)),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # tiles in list order, patches row-major
        metadata=tfds.core.MetadataDict(
            class_names=class_names(cfg.class_order, cfg.clutter),
            num_classes=num_classes(cfg.class_order, cfg.clutter),
            eval_label_values=eval_label_values(cfg.class_order),
            palette=[list(c) for c in COLOURS], ignore_index=_common.IGNORE,
            channels=cfg.channels),
    )

  def tile_list(self, split: str) -> tuple[str, ...]:
    override = getattr(self.builder_config, f"{split}_tiles")
    if override:
      return tuple(t.strip() for t in override.split(",") if t.strip())
    return self.TILES[split]

  def tile_files(self, root: str, tile: str) -> tuple[str, str]:
    """(image path, label path) of one listed tile; folders must exist."""
    cfg = self.builder_config
    folder, pattern = self.CHANNEL_FILES[cfg.channels]
    label_folder, label_pattern = self.ERODED_FILES if cfg.eroded else self.LABEL_FILES
    image_dir = _common.require_dir(_common.join(root, folder), f"{cfg.channels} images")
    label_dir = _common.require_dir(_common.join(root, label_folder),
                                    "eroded labels" if cfg.eroded else "labels")
    return (_common.join(image_dir, pattern.format(tile)),
            _common.join(label_dir, label_pattern.format(tile)))

  def _split_generators(self, dl_manager):
    self._check_config()
    root = self._manual_root(dl_manager)
    splits = {}
    for split in ("train", "test"):
      files = []
      for tile in self.tile_list(split):
        image_path, label_path = self.tile_files(root, tile)
        for path in (image_path, label_path):
          if not _common.is_file(path):
            raise _common.ManualDataError(f"missing file {path} (tile {tile} of the {split} "
                                          f"split)")
        files.append((self.TILE_NAME.format(tile), image_path, label_path))
      splits[split] = self._generate_examples(files)
    return splits

  def _generate_examples(self, files):
    cfg = self.builder_config
    channels = 4 if cfg.channels == "rgbir" else 3
    for name, image_path, label_path in files:
      image = _common.read_rgb(image_path, channels)
      label = encode_label(_common.read_array(label_path), label_path, cfg.class_order,
                           cfg.clutter, cfg.eroded, cfg.unknown_colour)
      _common.check_same_size(image, label, image_path, label_path)
      h, w = label.shape
      positions = _common.tiles(h, w, cfg.tile_size, cfg.stride)
      if not positions:
        raise _common.ManualDataError(f"{image_path} is {w}x{h}, smaller than tile_size "
                                      f"{cfg.tile_size}")
      for y, x in positions:
        window = (slice(y, y + cfg.tile_size), slice(x, x + cfg.tile_size))
        example_id = _common.tile_id(name, y, x)
        yield example_id, {
            "image": np.ascontiguousarray(image[window]),
            "label": np.ascontiguousarray(label[window])[..., None],
            "id": example_id, "tile": name, "y": y, "x": x,
        }


class Potsdam(IsprsBuilder):
  """ISPRS Potsdam: 38 6000x6000 tiles at 5 cm, six classes, cut into patches."""

  name = "potsdam"
  TILES = POTSDAM_TILES
  CHANNEL_FILES = {"irrg": ("3_Ortho_IRRG", "top_potsdam_{}_IRRG.tif"),
                   "rgb": ("2_Ortho_RGB", "top_potsdam_{}_RGB.tif"),
                   "rgbir": ("4_Ortho_RGBIR", "top_potsdam_{}_RGBIR.tif")}
  LABEL_FILES = ("5_Labels_all", "top_potsdam_{}_label.tif")
  ERODED_FILES = ("5_Labels_all_noBoundary", "top_potsdam_{}_label_noBoundary.tif")
  TILE_NAME = "top_potsdam_{}"
  BUILDER_CONFIGS = [
      _config("IRRG 512x512 patches, stride 512 (the original's composite)."),
      _config("IRRG 512x512 patches, eroded-boundary labels.", eroded=True),
      _config("RGB 512x512 patches.", channels="rgb"),
      _config("RGBIR (4-channel) 512x512 patches.", channels="rgbir"),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = config_name()
  DESCRIPTION = ("ISPRS 2D semantic labelling, Potsdam: 38 true orthophoto tiles of 6000x6000 px "
                 "at 5 cm; impervious surfaces, building, low vegetation, tree, car, clutter. "
                 "24 train / 14 test tiles.")
  HOMEPAGE = ("https://www.isprs.org/resources/datasets/benchmarks/UrbanSemLab/"
              "2d-sem-label-potsdam.aspx")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request ISPRS Potsdam (https://www.isprs.org/resources/datasets/benchmarks/UrbanSemLab/) and unzip
into manual_dir (only the composite you build and the labels you use are needed):
  3_Ortho_IRRG/top_potsdam_<r>_<c>_IRRG.tif        (channels=irrg, default)
  2_Ortho_RGB/top_potsdam_<r>_<c>_RGB.tif          (channels=rgb)
  4_Ortho_RGBIR/top_potsdam_<r>_<c>_RGBIR.tif      (channels=rgbir)
  5_Labels_all/top_potsdam_<r>_<c>_label.tif
  5_Labels_all_noBoundary/top_potsdam_<r>_<c>_label_noBoundary.tif   (eroded=True)
"""


class Vaihingen(IsprsBuilder):
  """ISPRS Vaihingen: 33 IRRG tiles (~2500x2000) at 9 cm, six classes, cut into patches."""

  name = "vaihingen"
  TILES = VAIHINGEN_TILES
  CHANNEL_FILES = {"irrg": ("top", "top_mosaic_09cm_area{}.tif")}
  LABEL_FILES = ("ground_truth_COMPLETE", "top_mosaic_09cm_area{}.tif")
  ERODED_FILES = ("ground_truth_eroded_COMPLETE", "top_mosaic_09cm_area{}_noBoundary.tif")
  TILE_NAME = "top_mosaic_09cm_area{}"
  BUILDER_CONFIGS = [
      _config("IRRG 512x512 patches, stride 512."),
      _config("IRRG 512x512 patches, eroded-boundary labels.", eroded=True),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = config_name()
  DESCRIPTION = ("ISPRS 2D semantic labelling, Vaihingen: 33 IRRG true orthophoto tiles "
                 "(~2500x2000 px) at 9 cm; six classes. 16 train / 17 test tiles.")
  HOMEPAGE = ("https://www.isprs.org/resources/datasets/benchmarks/UrbanSemLab/"
              "2d-sem-label-vaihingen.aspx")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Request ISPRS Vaihingen (https://www.isprs.org/resources/datasets/benchmarks/UrbanSemLab/) and
lay out manual_dir as
  top/top_mosaic_09cm_area<N>.tif        (from ISPRS_semantic_labeling_Vaihingen.zip)
  ground_truth_COMPLETE/top_mosaic_09cm_area<N>.tif     (from ..._ground_truth_COMPLETE.zip)
  ground_truth_eroded_COMPLETE/top_mosaic_09cm_area<N>_noBoundary.tif
                                         (from ..._ground_truth_eroded_COMPLETE.zip; eroded=True)
"""
