"""TFDS builder for the original IDGBR data package (images, labels and SegFormer coarse maps).

The package (Google Drive, linked from the IDGBR README) holds one folder per dataset with
`metadata_i2s_segformer_{train,test}.jsonl`, one JSON object per line whose `image`,
`label_index` and `rough_label_index` are paths relative to that folder, e.g.

  examples/CHN6-CUG/   metadata_i2s_segformer_train.jsonl, train/images, train/labels,
                       train/rough_labels, test/...
  examples/Potsdam/    metadata_i2s_segformer_train.jsonl, images_IRRG/{train,test},
                       label_index/{train,test}, rough_label_index_segformer/{train,test}

manual_dir is that dataset folder. Records carry the pipeline's `image`, `label`, `id` (the
image's stem) plus `coarse`, the rough map, so Stage II needs no coarse_dir. As the original
loader (`I2SDataset`), 2-class data is binarised with `value != 0` (labels and rough labels);
`resize` > 0 resizes as its `ResizeI2S` (image bilinear, maps nearest, PIL).
"""
from __future__ import annotations

import dataclasses
import io
import json
import os

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from idgbr_datasets import _common
from idgbr_jax import paths

SPLITS = ("train", "test")


@dataclasses.dataclass(eq=False)
class IdgbrPackageConfig(tfds.core.BuilderConfig):
  """Which metadata files, how many classes, optional resize.

  Attributes:
    metadata_prefix: the jsonl files are `<manual_dir>/<metadata_prefix>_<split>.jsonl`.
    num_classes: 2 binarises maps with `!= 0`; otherwise values must be < num_classes or 255.
    resize: 0 keeps the native size; S > 0 resizes every example to SxS (the original: 512).
  """
  metadata_prefix: str = "metadata_i2s_segformer"
  num_classes: int = 2
  resize: int = 0


def config_name(metadata_prefix: str = "metadata_i2s_segformer", num_classes: int = 2,
                resize: int = 0) -> str:
  return f"k{num_classes}_{metadata_prefix}" + (f"_r{resize}" if resize else "")


class IdgbrPackage(_common.ManualBuilder):
  """The original's repo-ready examples: image, label and coarse (rough) map per record."""

  name = "idgbr_package"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      IdgbrPackageConfig(name="chn6_cug", num_classes=2,
                         description="examples/CHN6-CUG: road vs background, binarised."),
      IdgbrPackageConfig(name="potsdam", num_classes=6,
                         description="examples/Potsdam: label_index values 0..5 "
                                     "(evaluated on 1..5)."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "chn6_cug"
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Download the IDGBR example package (Google Drive folder linked from
https://github.com/KeyanHu-git/IDGBR, "Preparing the Datasets") and pass one dataset folder
(e.g. examples/CHN6-CUG or examples/Potsdam) as manual_dir. It must hold
metadata_i2s_segformer_train.jsonl and metadata_i2s_segformer_test.jsonl whose lines name
"image", "label_index" and "rough_label_index" files relative to that folder.
"""

  @classmethod
  def make_config(cls, **fields) -> IdgbrPackageConfig:
    return IdgbrPackageConfig(name=config_name(**fields), **fields)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    size = (cfg.resize, cfg.resize) if cfg.resize else (None, None)
    return tfds.core.DatasetInfo(
        builder=self,
        description=("IDGBR's repo-ready example package: images, labels and SegFormer rough "
                     "labels (coarse maps) with the project-specific train/test split."),
        homepage="https://github.com/KeyanHu-git/IDGBR",
        features=_common.segmentation_features(size, coarse=True),
        supervised_keys=("image", "label"),
        disable_shuffling=True,  # record i is jsonl line i
        metadata=tfds.core.MetadataDict(num_classes=cfg.num_classes,
                                        metadata_prefix=cfg.metadata_prefix),
    )

  def _split_generators(self, dl_manager):
    cfg = self.builder_config
    if cfg.num_classes < 2 or cfg.resize < 0:
      raise ValueError(f"idgbr_package: num_classes={cfg.num_classes} must be >= 2 and "
                       f"resize={cfg.resize} >= 0")
    root = self._manual_root(dl_manager)
    out = {}
    for split in SPLITS:
      path = _common.join(root, f"{cfg.metadata_prefix}_{split}.jsonl")
      if not _common.is_file(path):
        raise _common.ManualDataError(f"missing file {path} (the {split} metadata)")
      out[split] = self._generate_examples(root, path, read_metadata(path))
    return out

  def _map(self, path: str) -> np.ndarray:
    cfg = self.builder_config
    raw = _common.to_grey(_common.read_array(path), path)
    if cfg.num_classes == 2:
      return (raw != 0).astype(np.uint8)  # the original's binary rule, rough maps included
    bad = np.setdiff1d(np.unique(raw), np.r_[np.arange(cfg.num_classes), _common.IGNORE])
    if bad.size:
      raise _common.ManualDataError(f"{path}: values {bad[:10].tolist()} outside "
                                    f"[0, {cfg.num_classes}) and not 255")
    return raw

  def _generate_examples(self, root: str, metadata_path: str, entries):
    cfg = self.builder_config
    seen = {}
    for index, (line, entry) in enumerate(entries):
      where = f"{metadata_path}:{line}"
      image_path = _common.join(root, entry["image"])
      label_path = _common.join(root, entry["label_index"])
      coarse_path = _common.join(root, entry["rough_label_index"])
      example_id = os.path.splitext(os.path.basename(entry["image"]))[0]
      if example_id in seen:
        raise _common.ManualDataError(f"{where}: image stem '{example_id}' repeats line "
                                      f"{seen[example_id]}; ids must be unique")
      seen[example_id] = line
      image = _common.read_rgb(image_path)
      label, coarse = self._map(label_path), self._map(coarse_path)
      _common.check_same_size(image, label, image_path, label_path)
      _common.check_same_size(image, coarse, image_path, coarse_path)
      if cfg.resize:
        size = (cfg.resize, cfg.resize)
        image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        coarse = np.asarray(Image.fromarray(coarse).resize(size, Image.NEAREST))
      yield index, {"image": image, "label": label[..., None], "coarse": coarse[..., None],
                    "id": example_id}


def read_metadata(path: str) -> list[tuple[int, dict]]:
  """(line number, entry) of a metadata jsonl (local or a URL); errors name the file and line."""
  entries = []
  with io.TextIOWrapper(io.BytesIO(paths.read_bytes(path)), encoding="utf-8") as f:
    for line_no, text in enumerate(f, 1):
      if not text.strip():
        continue
      try:
        entry = json.loads(text)
      except json.JSONDecodeError as e:
        raise _common.ManualDataError(f"{path}:{line_no}: not JSON ({e})") from e
      missing = [k for k in ("image", "label_index", "rough_label_index")
                 if not isinstance(entry, dict) or k not in entry]
      if missing:
        raise _common.ManualDataError(f"{path}:{line_no}: missing keys {missing}")
      entries.append((line_no, entry))
  if not entries:
    raise _common.ManualDataError(f"{path}: no entries")
  return entries
