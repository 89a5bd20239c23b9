"""Random-access data sources (TFDS ArrayRecord through `as_data_source`), with clear errors.

A source yields dicts with `image` (H,W,C uint8; C = `config.data.in_channels`, 3 by default, 4
for RGBIR), `label` (H,W[,1] uint8 class indices) and `id` (and `coarse` for datasets that store
coarse maps). `synthetic_rs` is built on first use (it ships with the repo); the real datasets
(`DATASETS`: CHN6-CUG, FGFD, WHU-Building, Potsdam, Vaihingen, the original's data package) must
already be prepared in `data_dir` from their manual downloads
(see datasets/, installed as the package `idgbr_datasets`, and the README). Their builder modules
are imported here, so `tfds.builder` finds them by name.
"""
from __future__ import annotations

import dataclasses
import importlib
import os
from typing import Any

import ml_collections
import numpy as np

from idgbr_jax import paths


class DataError(RuntimeError):
  """A dataset record or file could not be read or is invalid; the message names it."""


def default_data_dir() -> str:
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


class CheckedSource:
  """Wraps a random-access source so that a failing read names the dataset, split and record."""

  def __init__(self, source, name: str):
    self._source = source
    self.name = name

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    try:
      return self._source[index]
    except Exception as e:  # noqa: BLE001 - re-raised with the record's name
      raise DataError(f"{self.name}: cannot read record {index}: {type(e).__name__}: {e}") from e

  def __repr__(self) -> str:
    return f"CheckedSource({self.name}, {len(self)} records)"


class Subset:
  """The records of `source` at `indices` (k-fold subsets)."""

  def __init__(self, source, indices):
    self._source = source
    self._indices = np.asarray(indices, np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self._source[int(self._indices[index])]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """What the configs need to know about a real dataset, and where its TFDS builder lives.

  Attributes:
    module: importing it registers the builder with TFDS.
    tfds_config: the default builder config.
    num_classes: logits the model predicts.
    image_size: side of the stored examples (tiles) under the default config.
    eval_label_values: label value of each scored class (Potsdam/Vaihingen: clutter excluded).
    train_split, eval_split: TFDS split names.
    stored_coarse: the records carry `coarse` (Stage II needs no coarse_dir).
    build_command: how to prepare it (for error messages and the README).
  """
  module: str
  tfds_config: str
  num_classes: int
  image_size: int
  eval_label_values: tuple[int, ...]
  train_split: str = "train"
  eval_split: str = "test"
  stored_coarse: bool = False
  build_command: str = ""


DATASETS: dict[str, DatasetSpec] = {
    "chn6_cug": DatasetSpec("idgbr_datasets.chn6_cug", "default", 2, 512, (0, 1),
                            build_command="python -m idgbr_datasets.chn6_cug --manual_dir=DIR"),
    "fgfd": DatasetSpec("idgbr_datasets.fgfd", "default", 2, 512, (0, 1),
                        build_command="python -m idgbr_datasets.fgfd --manual_dir=DIR"),
    "whu_building": DatasetSpec(
        "idgbr_datasets.whu_building", "default", 2, 512, (0, 1),
        build_command="python -m idgbr_datasets.whu_building --manual_dir=DIR"),
    # class_order "idgbr": clutter 0, impervious 1 .. car 5; scored on 1..5 as the original.
    "potsdam": DatasetSpec("idgbr_datasets.isprs", "irrg_t512_s512", 6, 512, (1, 2, 3, 4, 5),
                           build_command="python -m idgbr_datasets.isprs potsdam --manual_dir=DIR"),
    "vaihingen": DatasetSpec(
        "idgbr_datasets.isprs", "irrg_t512_s512", 6, 512, (1, 2, 3, 4, 5),
        build_command="python -m idgbr_datasets.isprs vaihingen --manual_dir=DIR"),
    # The original's repo-ready package; config "chn6_cug" (2 classes) or "potsdam" (6).
    "idgbr_package": DatasetSpec(
        "idgbr_datasets.idgbr_package", "chn6_cug", 2, 512, (0, 1), stored_coarse=True,
        build_command="python -m idgbr_datasets.idgbr_package --manual_dir=examples/<Dataset>"),
}


def register_builder(name: str) -> None:
  """Imports the builder module of a known dataset so `tfds.builder(name)` resolves it."""
  spec = DATASETS.get(name)
  if spec is not None:
    importlib.import_module(spec.module)


def _prepared_dir(data_dir: str, name: str, config: str | None) -> str | None:
  """`<data_dir>/<name>/<config>/<newest version>` if a build is there, else None."""
  base = paths.resolve(data_dir).joinpath(name, *([config] if config else []))
  if not base.is_dir():
    return None
  versions = [v.name for v in base.iterdir() if (v / "dataset_info.json").exists()]
  if not versions:
    return None
  newest = max(versions, key=lambda v: tuple(int(p) if p.isdigit() else 0
                                             for p in v.split(".")))
  return str(base / newest)


def _synthetic_kwargs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  # in_channels 4 builds the RGB + NIR variant (its own config name; the RGB bands are the same).
  return dict(task=cfg.task, image_size=cfg.image_size, num_train=cfg.num_train,
              num_test=cfg.num_test, seed=cfg.dataset_seed,
              channels=int(cfg.get("in_channels", 3)))


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  """Number of classes the model predicts for this data config."""
  if cfg.name == "synthetic_rs":
    from idgbr_datasets.synthetic_rs import CLASS_NAMES  # pylint: disable=import-outside-toplevel
    if cfg.task not in CLASS_NAMES:
      raise ValueError(f"config.data.task={cfg.task!r} unknown; allowed: {sorted(CLASS_NAMES)}")
    return len(CLASS_NAMES[cfg.task])
  if "num_classes" in cfg:
    return int(cfg.num_classes)
  raise ValueError(f"config.data.num_classes is required for dataset {cfg.name!r}")


def get_source(cfg: ml_collections.ConfigDict, split: str) -> CheckedSource:
  """Random-access source for `split` of the dataset named in `cfg` (config.data)."""
  data_dir = cfg.data_dir or default_data_dir()
  if cfg.name == "synthetic_rs":
    from idgbr_datasets import synthetic_rs  # pylint: disable=import-outside-toplevel
    builder = synthetic_rs.build(data_dir, **_synthetic_kwargs(cfg))
  else:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    config_name = cfg.get("tfds_config") or None
    name = cfg.name if not config_name else f"{cfg.name}/{config_name}"
    register_builder(cfg.name)
    spec = DATASETS.get(cfg.name)
    how = (f"build it with `{spec.build_command} --data_dir={data_dir}"
           f"{' --config=' + config_name if config_name else ''}`" if spec else
           "build it first")
    prepared = _prepared_dir(data_dir, cfg.name, config_name)
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # noqa: BLE001
      if prepared is None:
        raise DataError(f"dataset {name!r} not found in {data_dir}: {e}; {how} "
                        f"(see datasets/ and the README)") from e
      # A build with non-predefined parameters (e.g. another tile size): read it from its
      # directory; no builder class is needed to read prepared files.
      builder = tfds.builder_from_directory(prepared)
    if not builder.is_prepared():
      raise DataError(f"dataset {name!r} is not prepared in {data_dir}; {how} "
                      f"(see datasets/ and the README)")
  if split not in builder.info.splits:
    raise DataError(f"split {split!r} not in {builder.info.full_name}; "
                    f"available: {sorted(builder.info.splits)}")
  return CheckedSource(builder.as_data_source(split), f"{builder.info.full_name}[{split}]")


def data_config(name: str, **overrides) -> ml_collections.ConfigDict:
  """`config.data` for a real dataset of `DATASETS`, with the pipeline's defaults.

  Fields beyond the synthetic configs': `tfds_config` (the TFDS builder config), `resize`
  (0: keep the stored size), `eval_num_classes` / `eval_label_values` (what the original scores,
  e.g. Potsdam 5 classes on values 1..5), `stored_coarse` (records carry `coarse`).

  Every data config (these and the synthetic ones) has `in_channels`, the image bands the
  models take (3; 4 for Potsdam `rgbir`), and `rgb_bands`, the positions of R, G, B among them
  (the REPA teacher reads those three; a 3-band pretrained first conv is expanded around them).
  Readers of configs saved before these keys use `config.data.get("in_channels", 3)`.
  """
  if name not in DATASETS:
    raise ValueError(f"unknown dataset {name!r}; known: {sorted(DATASETS)}")
  spec = DATASETS[name]
  data = ml_collections.ConfigDict()
  data.name = name
  data.tfds_config = spec.tfds_config
  data.data_dir = ml_collections.FieldReference(None, field_type=str)
  data.num_classes = spec.num_classes
  data.image_size = spec.image_size      # the side the model sees (after `resize`)
  data.resize = 0                        # >0: resize (image bilinear, maps nearest) to this
  data.eval_num_classes = len(spec.eval_label_values)
  data.eval_label_values = tuple(spec.eval_label_values)
  data.train_split = spec.train_split
  data.eval_split = spec.eval_split
  data.coarse_dir = ml_collections.FieldReference(None, field_type=str)  # <dir>/<split>/<id>.png
  data.stored_coarse = spec.stored_coarse
  data.crop_size = 0
  data.augment = "fliprot"
  data.normalization = "imagenet"
  data.in_channels = 3                   # image bands the models take (4: RGBIR)
  data.rgb_bands = (0, 1, 2)             # which of them are R, G, B (the teacher's input)
  data.binarize_labels = False           # builders already store class indices
  data.ignore_index = 255
  data.num_folds = 0
  data.fold = 0
  data.num_workers = 0
  for key, value in overrides.items():
    if key not in data:
      raise ValueError(f"unknown data config field {key!r}; allowed: {sorted(data)}")
    data[key] = value
  return data


def as_label_map(label: np.ndarray) -> np.ndarray:
  """(H,W,1) or (H,W) -> (H,W) int32."""
  label = np.asarray(label)
  if label.ndim == 3:
    label = label[..., 0]
  return label.astype(np.int32)


def eval_kwargs(data_config, num_classes: int) -> dict[str, Any]:
  """`metrics.evaluate_maps` arguments for a dataset: the classes the original scores (Potsdam
  and Vaihingen: index values 1..5, clutter excluded) when the data config names them."""
  values = data_config.get("eval_label_values")
  if not values:
    return {"num_classes": num_classes}
  return {"num_classes": int(data_config.get("eval_num_classes") or len(values)),
          "label_values": tuple(int(v) for v in values)}
