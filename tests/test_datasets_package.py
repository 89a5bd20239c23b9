"""The original's data package (metadata_i2s_*.jsonl) builder, the pipeline with stored or
attached coarse maps and resizing, and the real-dataset configs."""
import importlib
import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from idgbr_datasets import _common
from idgbr_datasets.chn6_cug import Chn6Cug
from idgbr_datasets.idgbr_package import IdgbrPackage
from idgbr_jax.data import pipeline, sources

S = 24


def _maps(i, k):
  """(label, rough) index maps whose values encode the example and class count."""
  yy, xx = np.mgrid[:S, :S]
  label = ((xx // 6 + i) % k).astype(np.uint8)
  rough = ((yy // 6 + i) % k).astype(np.uint8)
  return label, rough


def _write_package(root, k, layout="potsdam", n=(3, 2), fg=1):
  """Potsdam layout: images_IRRG/, label_index/, rough_label_index_segformer/ per split;
  CHN6-CUG layout: <split>/images, labels (0/255), rough_labels (0/255)."""
  rng = np.random.default_rng(k)
  for split, count in zip(("train", "test"), n):
    lines = []
    for i in range(count):
      name = f"{split}_{i:03d}"
      if layout == "potsdam":
        paths = (f"images_IRRG/{split}/{name}.png", f"label_index/{split}/{name}.png",
                 f"rough_label_index_segformer/{split}/{name}.png")
      else:
        paths = (f"{split}/images/{name}.png", f"{split}/labels/{name}.png",
                 f"{split}/rough_labels/{name}.png")
      for p in paths:
        os.makedirs(os.path.join(root, os.path.dirname(p)), exist_ok=True)
      label, rough = _maps(i, k)
      Image.fromarray(rng.integers(0, 256, (S, S, 3), dtype=np.uint8)).save(
          os.path.join(root, paths[0]))
      Image.fromarray(label * fg).save(os.path.join(root, paths[1]))
      Image.fromarray(rough * fg).save(os.path.join(root, paths[2]))
      lines.append(json.dumps({"image": paths[0], "label_index": paths[1],
                               "rough_label_index": paths[2]}))
    with open(os.path.join(root, f"metadata_i2s_segformer_{split}.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")


@pytest.fixture(scope="module")
def package(tmp_path_factory):
  base = tmp_path_factory.mktemp("package")
  data_dir = str(base / "tfds")
  potsdam, chn6 = str(base / "Potsdam"), str(base / "CHN6-CUG")
  _write_package(potsdam, 6)
  _write_package(chn6, 2, layout="chn6", fg=255)
  _common.build(IdgbrPackage, potsdam, data_dir, config="potsdam")
  _common.build(IdgbrPackage, chn6, data_dir, config="chn6_cug")
  return data_dir, potsdam, chn6


def _data_cfg(data_dir, **kw):
  return sources.data_config("idgbr_package", data_dir=data_dir, **kw)


def test_potsdam_package_reads_back_label_and_coarse(package):
  data_dir, root, _ = package
  train = sources.get_source(_data_cfg(data_dir, tfds_config="potsdam", num_classes=6), "train")
  assert len(train) == 3
  for i in range(3):
    ex = train[i]
    label, rough = _maps(i, 6)
    assert ex["id"] == f"train_{i:03d}".encode()
    np.testing.assert_array_equal(ex["label"][..., 0], label)
    np.testing.assert_array_equal(ex["coarse"][..., 0], rough)
    want = np.asarray(Image.open(os.path.join(root, "images_IRRG", "train", f"train_{i:03d}.png")))
    np.testing.assert_array_equal(ex["image"], want)


def test_binary_package_is_binarised_like_the_original(package):
  data_dir, _, _ = package
  test = sources.get_source(_data_cfg(data_dir), "test")  # config chn6_cug, 0/255 files
  for i in range(2):
    label, rough = _maps(i, 2)
    np.testing.assert_array_equal(test[i]["label"][..., 0], label)
    np.testing.assert_array_equal(test[i]["coarse"][..., 0], rough)


def _config(data):
  return ml_collections.ConfigDict({"data": data, "seed": 0, "batch_size": 2})


def test_pipeline_uses_the_stored_coarse_and_a_coarse_dir_replaces_it(package, tmp_path):
  data_dir, _, _ = package
  config = _config(_data_cfg(data_dir, tfds_config="potsdam", num_classes=6))
  ds = pipeline.eval_dataset(config, "test", 6, normalize=False)
  np.testing.assert_array_equal(ds[1]["coarse"], _maps(1, 6)[1])
  assert ds[1]["id"] == "test_001"
  # Maps from any segmenter, named by id, replace the stored ones.
  os.makedirs(tmp_path / "test")
  for i in range(2):
    Image.fromarray(np.full((S, S), i + 3, np.uint8)).save(tmp_path / "test" / f"test_{i:03d}.png")
  ds = pipeline.eval_dataset(config, "test", 6, coarse_dir=str(tmp_path / "test"),
                             normalize=False)
  np.testing.assert_array_equal(ds[1]["coarse"], np.full((S, S), 4))


def test_resize_follows_the_original_and_resizes_attached_maps(package, tmp_path):
  data_dir, _, _ = package
  data = _data_cfg(data_dir, tfds_config="potsdam", num_classes=6, resize=12)
  ds = pipeline.eval_dataset(_config(data), "train", 6, normalize=False)
  ex = ds[2]
  label, rough = _maps(2, 6)
  assert ex["image"].shape == (12, 12, 3) and ex["label"].shape == (12, 12)
  np.testing.assert_array_equal(ex["label"], label[::2, ::2])  # nearest: every other pixel
  np.testing.assert_array_equal(ex["coarse"], rough[::2, ::2])
  # A coarse map at another size (e.g. a Stage I run at a different resize) is resized too.
  os.makedirs(tmp_path / "train")
  coarse = np.kron(np.arange(4, dtype=np.uint8).reshape(2, 2), np.ones((3, 3), np.uint8))
  for i in range(3):
    Image.fromarray(coarse).save(tmp_path / "train" / f"train_{i:03d}.png")
  ds = pipeline.eval_dataset(_config(data), "train", 6, coarse_dir=str(tmp_path / "train"),
                             normalize=False)
  np.testing.assert_array_equal(ds[0]["coarse"], np.kron(np.arange(4).reshape(2, 2),
                                                         np.ones((6, 6), np.int64)))


def _band(i):
  mask = np.zeros((S, S), np.uint8)
  mask[:, i + 2:i + 6] = 1
  return mask


def test_coarse_maps_attach_by_stem_to_a_native_dataset(tmp_path):
  root = tmp_path / "chn6"
  for split in ("train", "val"):  # CHN6-CUG's native layout and names
    os.makedirs(root / split / "images")
    os.makedirs(root / split / "gt")
    for i in range(2):
      Image.fromarray(np.full((S, S, 3), 40 * i, np.uint8)).save(
          root / split / "images" / f"bj{i:02d}_sat.jpg")
      Image.fromarray(_band(i) * 255).save(root / split / "gt" / f"bj{i:02d}_mask.png")
  data_dir = str(tmp_path / "tfds")
  _common.build(Chn6Cug, str(tmp_path / "chn6"), data_dir)
  coarse_dir = tmp_path / "coarse" / "test"
  os.makedirs(coarse_dir)
  for i in range(2):  # a segmenter's output, named by the image stem
    Image.fromarray(_band(i + 1)).save(coarse_dir / f"bj{i:02d}_sat.png")
  data = sources.data_config("chn6_cug", data_dir=data_dir)
  ds = pipeline.eval_dataset(_config(data), "test", 2, coarse_dir=str(coarse_dir),
                             normalize=False)
  for i in range(2):
    np.testing.assert_array_equal(ds[i]["label"], _band(i))
    np.testing.assert_array_equal(ds[i]["coarse"], _band(i + 1))
  os.remove(coarse_dir / "bj01_sat.png")
  with pytest.raises(Exception, match=r"coarse map missing for example bj01_sat"):
    ds[1]  # pylint: disable=pointless-statement


# ----------------------------------------------------------------------------------------------
# Bad package content.


def _fails(root, tmp_path, match, config="potsdam"):
  with pytest.raises(_common.ManualDataError, match=match):
    _common.build(IdgbrPackage, str(root), str(tmp_path / "tfds"), config=config)


def test_package_errors_name_the_file(tmp_path):
  root = tmp_path / "Potsdam"
  _write_package(str(root), 6)
  os.remove(root / "metadata_i2s_segformer_test.jsonl")
  _fails(root, tmp_path, r"missing file .*metadata_i2s_segformer_test\.jsonl")
  _write_package(str(root), 6)
  with open(root / "metadata_i2s_segformer_train.jsonl", "a") as f:
    f.write(json.dumps({"image": "images_IRRG/train/train_000.png"}) + "\n")
  _fails(root, tmp_path, r"metadata_i2s_segformer_train\.jsonl:4: missing keys "
                         r"\['label_index', 'rough_label_index'\]")
  _write_package(str(root), 6)
  Image.fromarray(np.full((S, S), 7, np.uint8)).save(root / "label_index" / "test" / "test_001.png")
  _fails(root, tmp_path, r"label_index/test/test_001\.png: values \[7\] outside \[0, 6\)")
  _write_package(str(root), 6)
  os.remove(root / "rough_label_index_segformer" / "train" / "train_002.png")
  _fails(root, tmp_path, r"missing file .*rough_label_index_segformer/train/train_002\.png")
  _write_package(str(root), 6)
  Image.fromarray(np.zeros((S, S + 1), np.uint8)).save(
      root / "rough_label_index_segformer" / "train" / "train_000.png")
  _fails(root, tmp_path, r"size mismatch: .*train_000\.png is 24x24.*train_000\.png is 25x24")


# ----------------------------------------------------------------------------------------------
# Configs.

DATASETS = {"chn6_cug": (2, (0, 1)), "fgfd": (2, (0, 1)), "whu_building": (2, (0, 1)),
            "potsdam": (6, (1, 2, 3, 4, 5)), "vaihingen": (6, (1, 2, 3, 4, 5))}


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_dataset_configs_load_with_the_right_classes(name):
  k, values = DATASETS[name]
  stage1 = importlib.import_module(f"idgbr_configs.{name}_stage1")
  stage2 = importlib.import_module(f"idgbr_configs.{name}_stage2")
  for backbone, variant in (("unet", "base"), ("deeplabv3plus", "r50"), ("segformer", "b0")):
    config = stage1.get_config(backbone)
    assert (config.model.backbone, config.model.variant) == (backbone, variant)
    assert config.data.name == name and config.data.num_classes == k
    assert sources.num_classes(config.data) == k
    assert tuple(config.data.eval_label_values) == values
    assert config.data.eval_num_classes == len(values)
  small = stage1.get_config("segformer,variant=b2,runlocal")
  assert small.model.variant == "tiny" and small.data.resize == 64
  assert stage1.get_config("unet,variant=small").model.variant == "small"
  with pytest.raises(ValueError, match="unknown config arg 'resnet'"):
    stage1.get_config("resnet")
  config = stage2.get_config()
  assert config.data.name == name and config.data.num_classes == k
  assert (config.model.denoiser, config.model.teacher, config.data.image_size) == ("sd15",
                                                                                    "vitg14", 512)
  tiny = stage2.get_config("ablation=no_rough,runlocal")
  assert tiny.model.denoiser == "tiny" and tiny.data.resize == 32
  assert not tiny.diffusion.use_coarse
  assert config.data.tfds_config == sources.DATASETS[name].tfds_config


def test_package_stage2_config():
  mod = importlib.import_module("idgbr_configs.idgbr_package_stage2")
  potsdam = mod.get_config("dataset=potsdam")
  assert potsdam.data.tfds_config == "potsdam" and potsdam.data.num_classes == 6
  assert tuple(potsdam.data.eval_label_values) == (1, 2, 3, 4, 5)
  assert potsdam.data.stored_coarse and potsdam.data.resize == 512
  chn6 = mod.get_config()
  assert chn6.data.num_classes == 2 and tuple(chn6.data.eval_label_values) == (0, 1)
  with pytest.raises(ValueError, match="dataset 'vaihingen'"):
    mod.get_config("dataset=vaihingen")
