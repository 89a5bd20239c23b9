"""TFDS builder for the WHU Building aerial dataset (binary, 512x512 tiles, 0.3 m, Christchurch).

manual_dir is the unzipped "3. The cropped aerial image tiles and raster labels" folder:

  <manual_dir>/train/image/<name>.tif   <manual_dir>/train/label/<name>.tif
  <manual_dir>/val/image/<name>.tif     <manual_dir>/val/label/<name>.tif
  <manual_dir>/test/image/<name>.tif    <manual_dir>/test/label/<name>.tif

Splits train / validation / test (4,736 / 1,036 / 2,416). Labels are 0 / 255 (building);
label = mask != 0. Ids are image stems.
"""
from __future__ import annotations

from idgbr_datasets import _common


class WhuBuilding(_common.PairedFolderBuilder):
  """WHU aerial building extraction: 0 background, 1 building."""

  name = "whu_building"
  BUILDER_CONFIGS = [_common.PairedConfig(name="default", description="0/255 masks -> {0, 1}.")]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  SPLITS = {"train": (("train",), True), "validation": (("val", "validation"), False),
            "test": (("test",), True)}
  IMAGE_DIR = "image"
  LABEL_DIR = "label"
  CLASS_NAMES = ("background", "building")
  DESCRIPTION = ("WHU Building Dataset, aerial imagery: 8,188 512x512 tiles at 0.3 m with "
                 "building masks; 4,736 train / 1,036 val / 2,416 test.")
  HOMEPAGE = "http://gpcv.whu.edu.cn/data/building_dataset.html"
  CITATION = ("Ji, Wei, Lu, Fully convolutional networks for multisource building extraction "
              "from an open aerial and satellite imagery data set, IEEE TGRS 57(1), 2019.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download "3. The cropped aerial image tiles and raster labels.zip" from
http://gpcv.whu.edu.cn/data/building_dataset.html and unzip it; manual_dir is the folder that holds
  train/image/*.tif  train/label/*.tif   val/image  val/label   test/image  test/label
"""
