"""Tests of the synthetic remote-sensing dataset: scene statistics and the TFDS builder."""
import itertools
import os
import time
from collections import Counter

import numpy as np
import pytest
import tensorflow_datasets as tfds

from idgbr_datasets import synthetic_rs as srs
from idgbr_datasets.synthetic_rs import scenes


def _examples(task, size, n, seed=0, split="train"):
  return [scenes.generate_example(task, size, seed, split, i) for i in range(n)]


@pytest.fixture(scope="module")
def multiclass64():
  return _examples("multiclass6", 64, 8)


@pytest.fixture(scope="module")
def roads64():
  return _examples("binary_roads", 64, 8)


def _arrays(source):
  return [(np.asarray(ex["image"]), np.asarray(ex["label"]), ex["id"]) for ex in source]


# ----------------------------------------------------------------------------------------------
# The generator.


@pytest.mark.parametrize("task", scenes.TASKS)
def test_generator_dtypes_shapes_and_label_range(task):
  num_classes = len(srs.CLASS_NAMES[task])
  for size in (32, 48):
    image, label = scenes.generate_example(task, size, 0, "train", 0)
    assert image.dtype == np.uint8 and image.shape == (size, size, 3)
    assert label.dtype == np.uint8 and label.shape == (size, size)
    assert label.max() < num_classes
    assert image.std() > 10  # textured, not a flat fill
  assert srs.PALETTE[task].shape == (num_classes, 3) and srs.PALETTE[task].dtype == np.uint8


def test_generator_is_deterministic_per_example_and_order_independent():
  direct = scenes.generate_example("multiclass6", 32, 3, "test", 5)
  _examples("multiclass6", 32, 5, seed=3, split="test")  # other examples first: no effect
  again = scenes.generate_example("multiclass6", 32, 3, "test", 5)
  assert all(np.array_equal(a, b) for a, b in zip(direct, again))
  other_seed = scenes.generate_example("multiclass6", 32, 4, "test", 5)
  other_split = scenes.generate_example("multiclass6", 32, 3, "train", 5)
  assert not np.array_equal(direct[0], other_seed[0])
  assert not np.array_equal(direct[0], other_split[0])


def test_multiclass6_covers_the_isprs_classes(multiclass64):
  labels = np.stack([label for _, label in multiclass64])
  present = set(np.unique(labels).tolist())
  assert len(present) >= 5, present
  assert {0, 1, 2, 3} <= present  # impervious, building, low vegetation, tree
  fractions = np.bincount(labels.ravel(), minlength=6) / labels.size
  # Impervious does not swamp everything and the big classes all have real support.
  assert fractions[0] < 0.7 and min(fractions[1], fractions[2], fractions[3]) > 0.03, fractions


def test_binary_roads_are_thin_elongated_structures(roads64):
  ndimage = pytest.importorskip("scipy.ndimage")
  size = 64
  fractions, extents = [], []
  for _, label in roads64:
    assert set(np.unique(label).tolist()) <= {0, 1}
    road = label == 1
    fractions.append(road.mean())
    if not road.any():
      continue
    # Thin: no road pixel lies far from the background (half-width ≲ 0.1 × side) ...
    half_width = ndimage.distance_transform_edt(np.pad(road, 1)).max()
    assert half_width <= 0.1 * size, half_width
    # ... and elongated: the network spans several road widths (a blob spans about one).
    ys, xs = np.nonzero(road)
    extents.append(max(np.ptp(ys), np.ptp(xs)) + 1)
    if road.mean() > 0.02:  # skip a road that merely clips a corner
      assert extents[-1] >= 3 * 2 * half_width, (extents[-1], half_width)
  assert np.median(extents) >= 0.5 * size  # most roads cross the tile (some clip a corner)
  assert sum(f > 0 for f in fractions) >= 7  # nearly every tile has a road, as in CHN6-CUG
  assert 0.03 <= np.mean(fractions) <= 0.3, fractions


@pytest.mark.parametrize("task,min_balanced_acc", [("binary_roads", 0.6),
                                                   ("multiclass6", 0.3)])
def test_image_colour_predicts_label(task, min_balanced_acc, multiclass64, roads64):
  """Per-class mean colours differ: a nearest-mean pixel classifier beats chance clearly."""
  examples = roads64 if task == "binary_roads" else multiclass64
  num_classes = len(srs.CLASS_NAMES[task])
  pixels = np.concatenate([img.reshape(-1, 3) for img, _ in examples]).astype(np.float64)
  labels = np.concatenate([label.ravel() for _, label in examples])
  present = [k for k in range(num_classes) if (labels == k).sum() > 20]
  means = np.stack([pixels[labels == k].mean(0) for k in present])
  for a, b in itertools.combinations(range(len(present)), 2):
    assert np.abs(means[a] - means[b]).max() > 3, (present[a], present[b], means)
  pred = np.asarray(present)[((pixels[:, None] - means[None]) ** 2).sum(-1).argmin(1)]
  balanced = np.mean([(pred[labels == k] == k).mean() for k in present])
  assert balanced > min_balanced_acc, balanced  # chance is 1/num_classes
  assert balanced < 0.95  # and colour alone does not solve it


def test_trees_are_green_and_roads_neutral(multiclass64, roads64):
  pixels = np.concatenate([img.reshape(-1, 3) for img, _ in multiclass64]).astype(float)
  labels = np.concatenate([label.ravel() for _, label in multiclass64])
  tree = pixels[labels == 3].mean(0)
  impervious = pixels[labels == 0].mean(0)
  assert tree[1] > tree[0] and tree[1] > tree[2] and tree.sum() < impervious.sum()
  pixels = np.concatenate([img.reshape(-1, 3) for img, _ in roads64]).astype(float)
  labels = np.concatenate([label.ravel() for _, label in roads64])
  road = pixels[labels == 1].mean(0)
  assert np.ptp(road) < 12  # asphalt is grey; the background is green/brown


def test_two_by_two_label_vote_is_a_mode():
  for values in itertools.product(range(3), repeat=4):
    got = scenes._mode_downsample_2x2(np.array(values, np.uint8).reshape(2, 2))[0, 0]
    counts = Counter(values)
    assert counts[got] == max(counts.values()), (values, got)


def test_colorize_uses_the_isprs_palette():
  label = np.array([[0, 1, 2], [3, 4, 5]], np.uint8)
  rgb = srs.colorize(label, "multiclass6")
  assert rgb.shape == (2, 3, 3) and rgb.dtype == np.uint8
  np.testing.assert_array_equal(rgb[0, 1], [0, 0, 255])  # building: blue
  np.testing.assert_array_equal(rgb[1, 1], [255, 255, 0])  # car: yellow
  np.testing.assert_array_equal(srs.colorize(label[:1, :2], "binary_roads")[0, 1], [255] * 3)


# ----------------------------------------------------------------------------------------------
# The TFDS builder.


def test_unknown_task_raises_naming_the_allowed_ones(tmp_path):
  with pytest.raises(ValueError, match=r"'roads'.*binary_roads.*multiclass6"):
    srs.build(str(tmp_path), task="roads", image_size=32, num_train=2, num_test=1)
  with pytest.raises(ValueError, match="roads"):
    srs.SyntheticRSConfig(name="x", task="roads")


def test_build_reads_back_exactly_what_the_generator_makes(tmp_path):
  kwargs = dict(task="binary_roads", image_size=32, num_train=5, num_test=3, seed=1)
  builder = srs.build(str(tmp_path), **kwargs)
  assert builder.builder_config.name == "binary_roads_s32_tr5_te3_seed1"
  assert builder.info.splits["train"].num_examples == 5
  assert builder.info.metadata["class_names"] == ["background", "road"]
  train = builder.as_data_source("train")
  assert len(train) == 5
  for index, (image, label, ident) in enumerate(_arrays(train)):
    assert image.dtype == np.uint8 and image.shape == (32, 32, 3)
    assert label.dtype == np.uint8 and label.shape == (32, 32, 1)
    assert ident == f"train_{index:06d}".encode()
    want_image, want_label = scenes.generate_example("binary_roads", 32, 1, "train", index)
    np.testing.assert_array_equal(image, want_image)  # PNG is lossless, record i = example i
    np.testing.assert_array_equal(label[..., 0], want_label)
  # The same files through the registry by config name, and with no Python class at all.
  test = tfds.data_source(f"synthetic_rs/{builder.builder_config.name}", data_dir=str(tmp_path),
                          split="test")
  assert len(test) == 3 and test[2]["id"] == b"test_000002"
  from_dir = tfds.builder_from_directory(str(builder.data_dir)).as_data_source("test")
  np.testing.assert_array_equal(from_dir[1]["label"], test[1]["label"])
  via_helper = srs.data_source(str(tmp_path), "test", **kwargs)
  np.testing.assert_array_equal(via_helper[0]["image"], test[0]["image"])
  grain = pytest.importorskip("grain")  # the input pipeline reads it like this
  batches = grain.MapDataset.source(train).map(srs.label_map).batch(5)
  np.testing.assert_array_equal(
      batches[0], np.stack([scenes.generate_example("binary_roads", 32, 1, "train", i)[1]
                            for i in range(5)]))


def test_builds_are_deterministic_idempotent_and_do_not_collide(tmp_path):
  kwargs = dict(task="multiclass6", image_size=32, num_train=4, num_test=2)
  first = srs.build(str(tmp_path / "a"), seed=0, **kwargs)
  second = srs.build(str(tmp_path / "b"), seed=0, **kwargs)
  other = srs.build(str(tmp_path / "a"), seed=1, **kwargs)
  bigger = srs.build(str(tmp_path / "a"), seed=0, **dict(kwargs, image_size=48))
  for split in ("train", "test"):
    a, b = _arrays(first.as_data_source(split)), _arrays(second.as_data_source(split))
    for (ia, la, _), (ib, lb, _) in zip(a, b):
      assert ia.tobytes() == ib.tobytes() and la.tobytes() == lb.tobytes()
  assert not np.array_equal(first.as_data_source("train")[0]["image"],
                            other.as_data_source("train")[0]["image"])
  assert bigger.as_data_source("train")[0]["image"].shape == (48, 48, 3)
  assert len({str(x.data_dir) for x in (first, other, bigger)}) == 3
  # Rebuilding the same parameters is a no-op: files untouched.
  files = sorted(p for p in os.listdir(first.data_dir) if "array_record" in p)
  stamps = [os.path.getmtime(os.path.join(first.data_dir, p)) for p in files]
  again = srs.build(str(tmp_path / "a"), seed=0, **kwargs)
  assert [os.path.getmtime(os.path.join(again.data_dir, p)) for p in files] == stamps
  labels = np.stack([label for _, label, _ in _arrays(again.as_data_source("train"))])
  assert labels.max() < 6


@pytest.mark.slow
def test_default_configs_build_time(tmp_path):
  """Builds the predefined configs as a user would (tfds.data_source by name) and times them."""
  for name in ("binary_roads", "multiclass6"):
    start = time.perf_counter()
    source = tfds.data_source(f"synthetic_rs/{name}", data_dir=str(tmp_path), split="train")
    seconds = time.perf_counter() - start
    cfg = srs.SyntheticRs.builder_configs[name]
    print(f"\nsynthetic_rs/{name}: {cfg.num_train}+{cfg.num_test} examples at "
          f"{cfg.image_size}px built in {seconds:.1f} s")
    assert len(source) == cfg.num_train
    assert np.asarray(source[0]["label"]).max() < len(srs.CLASS_NAMES[name])
