"""TFDS builder for the embedded synthetic remote-sensing segmentation dataset (no download).

Two tasks: `binary_roads` (CHN6-CUG-like road extraction) and `multiclass6` (the ISPRS
Vaihingen/Potsdam taxonomy). Examples come from `scenes.generate_example`, so every example is
a pure function of (task, image size, seed, split, index). Stored as ArrayRecord with PNG
`Image` features (encoding needs TensorFlow; reading needs only pillow), read back by random
access with `as_data_source` (and so by grain).

Typical use, from the input pipeline or the CLI:

  builder = build("/data/tfds", task="binary_roads", image_size=128)
  source = builder.as_data_source("train")   # or data_source("/data/tfds", "train", ...)
  example = source[0]  # {"image": (S,S,3) uint8, "label": (S,S,1) uint8, "id": b"train_000000"}

`channels=4` builds the RGB + NIR variant (`scenes._near_infrared`) under its own config name
(suffix `_c4`); its RGB bands and labels equal the 3-band build's.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import utils as tfds_utils

from idgbr_datasets import _common
from idgbr_datasets.synthetic_rs import scenes

DEFAULT_IMAGE_SIZE = 128
DEFAULT_NUM_TRAIN = 256
DEFAULT_NUM_TEST = 64


@dataclasses.dataclass(eq=False)
class SyntheticRSConfig(tfds.core.BuilderConfig):
  """Which task, at what size, how many examples, from which seed."""
  task: str = "multiclass6"
  image_size: int = DEFAULT_IMAGE_SIZE
  num_train: int = DEFAULT_NUM_TRAIN
  num_test: int = DEFAULT_NUM_TEST
  seed: int = 0
  channels: int = 3  # 3: RGB; 4: RGB + NIR

  def __post_init__(self):
    scenes.check_task(self.task)
    if self.channels not in scenes.CHANNELS:
      raise ValueError(f"synthetic_rs channels={self.channels!r} (config.data.in_channels); "
                       f"allowed: 3 (RGB) or 4 (RGB + NIR)")
    if self.image_size < 8 or self.num_train < 1 or self.num_test < 1:
      raise ValueError(f"Need image_size >= 8 and at least one example per split; got "
                       f"image_size={self.image_size}, num_train={self.num_train}, "
                       f"num_test={self.num_test}.")


def config_name(task: str, image_size: int, num_train: int, num_test: int, seed: int,
                channels: int = 3) -> str:
  """Name that encodes every parameter, so differently sized builds never share a directory
  (3-band builds keep the name they had before `channels` existed)."""
  bands = "" if channels == 3 else f"_c{channels}"
  return f"{task}_s{image_size}_tr{num_train}_te{num_test}_seed{seed}{bands}"


class SyntheticRs(tfds.core.GeneratorBasedBuilder):
  """Procedural aerial scenes with road or ISPRS six-class labels."""

  name = "synthetic_rs"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      SyntheticRSConfig(name="binary_roads", task="binary_roads",
                        description="Road extraction (CHN6-CUG-like): 0 background, 1 road."),
      SyntheticRSConfig(name="multiclass6", task="multiclass6",
                        description="ISPRS taxonomy: impervious surfaces, building, low "
                                    "vegetation, tree, car, clutter."),
  ]
  DEFAULT_BUILDER_CONFIG_NAME = "multiclass6"

  def __init__(self, *, file_format=None, **kwargs):
    # Default to ArrayRecord so that `tfds.data_source("synthetic_rs/...")` works without
    # builder_kwargs: tfds' default, TFRecord, has no random access.
    super().__init__(file_format=file_format or "array_record", **kwargs)

  @tfds_utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # tfds' own lookup, for a builder inside an installed package, probes the
    # `importlib_resources` backport, which is not installed: ModuleNotFoundError on prepare.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    s = cfg.image_size
    bands = {} if cfg.channels == 3 else {"bands": "rgbn"}  # 3-band info as before
    return tfds.core.DatasetInfo(
        builder=self,
        description=("Synthetic aerial scenes (textured ground, roads with markings, buildings "
                     "with shaded roofs and cast shadows, trees, water, cars, clutter) for "
                     "segmentation and boundary refinement tests; generated, not downloaded."),
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(s, s, cfg.channels)),
            # Class indices stored as a one-channel PNG: lossless and compact.
            "label": tfds.features.Image(shape=(s, s, 1)),
            "id": tfds.features.Text(),
        }),
        supervised_keys=("image", "label"),
        # Record i of a split is example i, so ids, indices and the generator agree.
        disable_shuffling=True,
        metadata=tfds.core.MetadataDict(
            task=cfg.task, class_names=list(scenes.CLASS_NAMES[cfg.task]),
            palette=scenes.PALETTE[cfg.task].tolist(), seed=cfg.seed, **bands),
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {
        "train": self._generate_examples("train", cfg.num_train),
        "test": self._generate_examples("test", cfg.num_test),
    }

  def _generate_examples(self, split: str, num_examples: int):
    cfg = self.builder_config
    for index in range(num_examples):
      image, label = scenes.generate_example(cfg.task, cfg.image_size, cfg.seed, split, index,
                                             cfg.channels)
      yield index, {"image": image, "label": label[..., None], "id": f"{split}_{index:06d}"}


def get_builder(data_dir: str, task: str = "multiclass6", image_size: int = DEFAULT_IMAGE_SIZE,
                num_train: int = DEFAULT_NUM_TRAIN, num_test: int = DEFAULT_NUM_TEST,
                seed: int = 0, channels: int = 3) -> SyntheticRs:
  """The (possibly not yet prepared) builder for these parameters, writing ArrayRecord."""
  scenes.check_task(task)
  config = SyntheticRSConfig(
      name=config_name(task, image_size, num_train, num_test, seed, channels), task=task,
      image_size=image_size, num_train=num_train, num_test=num_test, seed=seed,
      channels=channels)
  return SyntheticRs(config=config, data_dir=data_dir, file_format="array_record")


def build(data_dir: str, task: str = "multiclass6", image_size: int = DEFAULT_IMAGE_SIZE,
          num_train: int = DEFAULT_NUM_TRAIN, num_test: int = DEFAULT_NUM_TEST,
          seed: int = 0, channels: int = 3) -> tfds.core.DatasetBuilder:
  """Generates the dataset into `data_dir` unless already there; returns the prepared builder.

  The config is named by `config_name(...)`, e.g. `multiclass6_s128_tr256_te64_seed0`, under
  `data_dir/synthetic_rs/<config>/1.0.0`. `data_dir` may be a URL (`gs://...`): the dataset is
  then generated locally and uploaded (`_common.prepare`).

  Raises:
    ValueError: unknown `task` (the message names the allowed ones) or empty splits.
  """
  # A no-op when the prepared files exist.
  return _common.prepare(
      lambda d: get_builder(d, task, image_size, num_train, num_test, seed, channels), data_dir)


def data_source(data_dir: str, split: str, task: str = "multiclass6",
                image_size: int = DEFAULT_IMAGE_SIZE, num_train: int = DEFAULT_NUM_TRAIN,
                num_test: int = DEFAULT_NUM_TEST, seed: int = 0, channels: int = 3):
  """Random-access source (`len`, `[i]`, readable by grain) of one split; builds if needed."""
  return build(data_dir, task, image_size, num_train, num_test, seed,
               channels).as_data_source(split)


def label_map(example: dict) -> np.ndarray:
  """The (S,S) class-index map of a decoded example (drops the PNG channel axis)."""
  return np.asarray(example["label"])[..., 0]
