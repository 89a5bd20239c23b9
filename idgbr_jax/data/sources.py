"""Random-access data sources (TFDS ArrayRecord through `as_data_source`), with clear errors.

A source yields dicts with `image` (H,W,3 uint8), `label` (H,W[,1] uint8 class indices) and `id`.
`synthetic_rs` is built on first use (it ships with the repo); other TFDS datasets must already be
prepared in `data_dir` (see datasets/ for the builders).
"""
from __future__ import annotations

import os
from typing import Any

import ml_collections
import numpy as np


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


def _synthetic_kwargs(cfg: ml_collections.ConfigDict) -> dict[str, Any]:
  return dict(task=cfg.task, image_size=cfg.image_size, num_train=cfg.num_train,
              num_test=cfg.num_test, seed=cfg.dataset_seed)


def num_classes(cfg: ml_collections.ConfigDict) -> int:
  """Number of classes the model predicts for this data config."""
  if cfg.name == "synthetic_rs":
    from datasets.synthetic_rs import CLASS_NAMES  # pylint: disable=import-outside-toplevel
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
    from datasets import synthetic_rs  # pylint: disable=import-outside-toplevel
    builder = synthetic_rs.build(data_dir, **_synthetic_kwargs(cfg))
  else:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    name = cfg.name if not cfg.get("tfds_config") else f"{cfg.name}/{cfg.tfds_config}"
    try:
      builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    except Exception as e:  # noqa: BLE001
      raise DataError(f"dataset {name!r} not found in {data_dir}: {e}") from e
    if not builder.is_prepared():
      raise DataError(f"dataset {name!r} is not prepared in {data_dir}; build it first "
                      f"(see datasets/ and the README)")
  if split not in builder.info.splits:
    raise DataError(f"split {split!r} not in {builder.info.full_name}; "
                    f"available: {sorted(builder.info.splits)}")
  return CheckedSource(builder.as_data_source(split), f"{builder.info.full_name}[{split}]")


def as_label_map(label: np.ndarray) -> np.ndarray:
  """(H,W,1) or (H,W) -> (H,W) int32."""
  label = np.asarray(label)
  if label.ndim == 3:
    label = label[..., 0]
  return label.astype(np.int32)
