"""TFDS builder for FGFD, the Fine-Grained Farmland Dataset (binary farmland mapping, China).

manual_dir is the unzipped dataset in the layout of its code release (Henryjiepanli/DBBANet):

  <manual_dir>/train/img/<name>.png|.tif   <manual_dir>/train/label/<name>.png|.tif
  <manual_dir>/val/img/...                 <manual_dir>/val/label/...      (optional)
  <manual_dir>/test/img/...                <manual_dir>/test/label/...

Labels are colour maps: black (0,0,0) non-farmland, red (128,0,0) farmland without crops, green
(0,128,0) farmland with crops (palette PNGs are read as their colours). The dataset's README says
only farmland vs non-farmland matters, so by default both red and green are class 1
(`foreground="all"`). DBBANet's own loader maps red to 0 and green to 1; `foreground="green"`
reproduces that. Any other colour is an error naming the file (`unknown_colour="ignore"` maps
it to 255 instead). Ids are image stems.
"""
from __future__ import annotations

import numpy as np

from idgbr_datasets import _common

PALETTE = ((0, 0, 0), (128, 0, 0), (0, 128, 0))  # non-farmland, farmland w/o crops, w/ crops
FOREGROUND = {"all": (0, 1, 1), "green": (0, 0, 1)}


class Fgfd(_common.PairedFolderBuilder):
  """Fine-Grained Farmland Dataset: 0 non-farmland, 1 farmland."""

  name = "fgfd"
  BUILDER_CONFIGS = [
      _common.PairedConfig(name="default", foreground="all",
                           description="Red and green (both farmland) -> 1."),
      _common.PairedConfig(name="default_fg-green", foreground="green",
                           description="Only green -> 1, as DBBANet's loader."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "default"
  SPLITS = {"train": (("train",), True), "validation": (("val", "validation"), False),
            "test": (("test",), True)}
  IMAGE_DIR = "img"
  LABEL_DIR = "label"
  CLASS_NAMES = ("non-farmland", "farmland")
  DESCRIPTION = ("FGFD: fine-grained farmland masks on VHR satellite images across China "
                 "(labelled as farmland without crops / with crops).")
  HOMEPAGE = "https://github.com/Henryjiepanli/DBBANet"
  CITATION = ("Li, Wei, Wei, He, A comprehensive deep-learning framework for fine-grained "
              "farmland mapping from high-resolution images, IEEE TGRS, 2024.")
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download FGFD (Baidu disk, links in https://github.com/Henryjiepanli/DBBANet) and unzip it so that
manual_dir holds
  train/img/*.png|tif  train/label/*.png|tif   test/img  test/label   (val/img val/label optional)
with colour labels: black non-farmland, red (128,0,0) and green (0,128,0) farmland.
"""

  def decode_label(self, raw: np.ndarray, path: str) -> np.ndarray:
    cfg = self.builder_config
    if cfg.foreground not in FOREGROUND:
      raise ValueError(f"fgfd foreground={cfg.foreground!r}; allowed: {sorted(FOREGROUND)}")
    if raw.ndim == 2:
      raise _common.ManualDataError(f"{path}: single-band label; FGFD labels are colour maps "
                                    f"(black / red (128,0,0) / green (0,128,0))")
    return _common.colours_to_index(raw, PALETTE, FOREGROUND[cfg.foreground], path,
                                    unknown=cfg.unknown_colour)
