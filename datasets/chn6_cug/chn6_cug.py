"""TFDS builder for CHN6-CUG (binary road extraction, 512x512 tiles, 0.5 m, six Chinese cities).

manual_dir is the unzipped dataset as distributed:

  <manual_dir>/train/images/<name>_sat.jpg   <manual_dir>/train/gt/<name>_mask.png
  <manual_dir>/val/images/<name>_sat.jpg     <manual_dir>/val/gt/<name>_mask.png

The held-out 903 tiles are the TFDS `test` split (folder `test/` if present, else `val/`).
Masks are 0 (background) / 255 or 1 (road); label = mask != 0, as the original's binary rule.
Ids are image stems (`<name>_sat`).
"""
from __future__ import annotations

from idgbr_datasets import _common


class Chn6Cug(_common.PairedFolderBuilder):
  """CHN6-CUG road extraction: 0 background, 1 road."""

  name = "chn6_cug"
  BUILDER_CONFIGS = [_common.PairedConfig(name="default", description="0/255 masks -> {0, 1}.")]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  SPLITS = {"train": (("train",), True), "test": (("test", "val"), True)}
  IMAGE_DIR = "images"
  LABEL_DIR = "gt"
  IMAGE_SUFFIX = "_sat"
  LABEL_SUFFIX = "_mask"
  CLASS_NAMES = ("background", "road")
  DESCRIPTION = ("CHN6-CUG: 4,511 512x512 satellite tiles (0.5 m) of six Chinese cities with road "
                 "masks; 3,608 train / 903 test.")
  HOMEPAGE = "https://www.ncdc.ac.cn/portal/metadata/b46613f7-b7d2-407c-9e55-e33220011585"
  CITATION = ("Zhu et al., A global context-aware and batch-independent network for road "
              "extraction from VHR satellite imagery, ISPRS J. Photogramm. Remote Sens., 2021.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download CHN6-CUG from https://www.ncdc.ac.cn/portal/metadata/b46613f7-b7d2-407c-9e55-e33220011585
and unzip it so that manual_dir holds:
  train/images/<name>_sat.jpg   train/gt/<name>_mask.png
  val/images/<name>_sat.jpg     val/gt/<name>_mask.png     (or test/ instead of val/)
"""
