"""CHN6-CUG, WHU-Building and FGFD builders: tiny fake files in each dataset's native layout are
built with TFDS, read back through `get_source`, and bad manual_dir content names the file."""
import os

import numpy as np
import pytest
from PIL import Image

from idgbr_datasets import _common
from idgbr_datasets.chn6_cug import Chn6Cug
from idgbr_datasets.fgfd import Fgfd
from idgbr_datasets.whu_building import WhuBuilding
from idgbr_jax.data import sources

S = 32


def _image(rng):
  return rng.integers(0, 256, (S, S, 3), dtype=np.uint8)


def _mask(index, fg=255):
  """A vertical road / building band whose position encodes the example index."""
  mask = np.zeros((S, S), np.uint8)
  mask[:, index + 2:index + 6] = fg
  return mask


def _write_chn6(root, splits=(("train", 3), ("val", 2))):
  rng = np.random.default_rng(0)
  for split, n in splits:
    os.makedirs(os.path.join(root, split, "images"), exist_ok=True)
    os.makedirs(os.path.join(root, split, "gt"), exist_ok=True)
    for i in range(n):
      Image.fromarray(_image(rng)).save(os.path.join(root, split, "images", f"bj{i:02d}_sat.jpg"))
      Image.fromarray(_mask(i)).save(os.path.join(root, split, "gt", f"bj{i:02d}_mask.png"))


def _write_whu(root):
  rng = np.random.default_rng(1)
  for split, n in (("train", 2), ("val", 1), ("test", 2)):
    for sub in ("image", "label"):
      os.makedirs(os.path.join(root, split, sub), exist_ok=True)
    for i in range(n):
      Image.fromarray(_image(rng)).save(os.path.join(root, split, "image", f"{i + 10}.tif"))
      Image.fromarray(_mask(i)).save(os.path.join(root, split, "label", f"{i + 10}.tif"))


FGFD_COLOURS = np.array([(0, 0, 0), (128, 0, 0), (0, 128, 0)], np.uint8)


def _fgfd_label(i):
  """Left third black, middle red (farmland w/o crops), right green (with crops), shifted."""
  index = np.zeros((S, S), np.uint8)
  index[:, 10 + i:20 + i] = 1
  index[:, 20 + i:] = 2
  return index


def _write_fgfd(root):
  rng = np.random.default_rng(2)
  for split, n in (("train", 2), ("test", 2)):
    for sub in ("img", "label"):
      os.makedirs(os.path.join(root, split, sub), exist_ok=True)
    for i in range(n):
      Image.fromarray(_image(rng)).save(os.path.join(root, split, "img", f"f{i}.png"))
      index = _fgfd_label(i)
      if i == 1:  # a palette PNG: its colours, not its palette indices, are the labels
        im = Image.fromarray(index, mode="P")
        im.putpalette(FGFD_COLOURS.ravel().tolist())
        im.save(os.path.join(root, split, "label", f"f{i}.png"))
      else:
        Image.fromarray(FGFD_COLOURS[index]).save(os.path.join(root, split, "label", f"f{i}.tif"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  """One data_dir with the three datasets built from their fake manual_dirs."""
  base = tmp_path_factory.mktemp("binary")
  data_dir = str(base / "tfds")
  roots = {name: str(base / name) for name in ("chn6", "whu", "fgfd")}
  _write_chn6(roots["chn6"])
  _write_whu(roots["whu"])
  _write_fgfd(roots["fgfd"])
  _common.build(Chn6Cug, roots["chn6"], data_dir)
  _common.build(WhuBuilding, roots["whu"], data_dir)
  _common.build(Fgfd, roots["fgfd"], data_dir)
  _common.build(Fgfd, roots["fgfd"], data_dir, config="default_fg-green")
  return data_dir, roots


def _source(name, data_dir, split, **kw):
  return sources.get_source(sources.data_config(name, data_dir=data_dir, **kw), split)


def test_chn6_cug_reads_back_images_masks_and_stems(built):
  data_dir, roots = built
  train, test = _source("chn6_cug", data_dir, "train"), _source("chn6_cug", data_dir, "test")
  assert len(train) == 3 and len(test) == 2  # the official held-out set sits in val/
  for split, source, folder in (("train", train, "train"), ("test", test, "val")):
    for i in range(len(source)):
      ex = source[i]
      assert ex["id"] == f"bj{i:02d}_sat".encode()
      want = np.asarray(Image.open(os.path.join(roots["chn6"], folder, "images",
                                                f"bj{i:02d}_sat.jpg")))
      np.testing.assert_array_equal(ex["image"], want)  # the decoded JPEG, losslessly stored
      np.testing.assert_array_equal(ex["label"][..., 0], _mask(i, fg=1))


def test_whu_building_splits_and_tiff_reading(built):
  data_dir, roots = built
  counts = {split: len(_source("whu_building", data_dir, split))
            for split in ("train", "validation", "test")}
  assert counts == {"train": 2, "validation": 1, "test": 2}
  ex = _source("whu_building", data_dir, "test")[1]
  assert ex["id"] == b"11"
  want = np.asarray(Image.open(os.path.join(roots["whu"], "test", "image", "11.tif")))
  np.testing.assert_array_equal(ex["image"], want)
  np.testing.assert_array_equal(ex["label"][..., 0], _mask(1, fg=1))


def test_fgfd_colours_map_to_farmland(built):
  data_dir, _ = built
  default = _source("fgfd", data_dir, "test")
  green = _source("fgfd", data_dir, "test", tfds_config="default_fg-green")
  for i in range(2):  # i == 1 is a palette PNG
    index = _fgfd_label(i)
    assert default[i]["id"] == f"f{i}".encode()
    np.testing.assert_array_equal(default[i]["label"][..., 0], (index > 0).astype(np.uint8))
    np.testing.assert_array_equal(green[i]["label"][..., 0], (index == 2).astype(np.uint8))


def test_sources_name_the_build_command_when_not_prepared(tmp_path):
  with pytest.raises(sources.DataError, match=r"python -m idgbr_datasets.whu_building"):
    _source("whu_building", str(tmp_path), "train")


# ----------------------------------------------------------------------------------------------
# Bad manual_dir content: the error names the file or folder.


def _build_fails(builder_cls, root, tmp_path, match, **params):
  with pytest.raises(_common.ManualDataError, match=match):
    _common.build(builder_cls, str(root), str(tmp_path / "tfds"), **params)


def test_missing_split_folder(tmp_path):
  root = tmp_path / "chn6"
  _write_chn6(str(root), splits=(("train", 1),))
  _build_fails(Chn6Cug, root, tmp_path, r"missing folder .*chn6/test")
  _build_fails(WhuBuilding, tmp_path / "nothing", tmp_path, r"missing or empty folder .*nothing")


def test_unmatched_image_and_label(tmp_path):
  root = tmp_path / "chn6"
  _write_chn6(str(root))
  os.remove(root / "val" / "gt" / "bj01_mask.png")
  _build_fails(Chn6Cug, root, tmp_path, r"image .*val/images/bj01_sat\.jpg has no label")
  _write_chn6(str(root))
  Image.fromarray(_mask(0)).save(root / "train" / "gt" / "zz_mask.png")
  _build_fails(Chn6Cug, root, tmp_path, r"label .*train/gt/zz_mask\.png has no image")


def test_mask_values_and_colours_outside_the_palette(tmp_path):
  root = tmp_path / "whu"
  _write_whu(str(root))
  bad = _mask(0)
  bad[0, 0] = 128
  Image.fromarray(bad).save(root / "test" / "label" / "11.tif")
  _build_fails(WhuBuilding, root, tmp_path, r"test/label/11\.tif: mask values \[128\]")
  root = tmp_path / "fgfd"
  _write_fgfd(str(root))
  label = FGFD_COLOURS[_fgfd_label(0)]
  label[3, 5] = (0, 0, 255)
  Image.fromarray(label).save(root / "test" / "label" / "f0.tif")
  _build_fails(Fgfd, root, tmp_path, r"test/label/f0\.tif: colours \[\(0, 0, 255\)\] "
                                     r"\(first at row 3, col 5\)")


def test_size_mismatch_and_unreadable_file(tmp_path):
  root = tmp_path / "whu"
  _write_whu(str(root))
  Image.fromarray(np.zeros((S, S + 8), np.uint8)).save(root / "train" / "label" / "10.tif")
  _build_fails(WhuBuilding, root, tmp_path, r"size mismatch: image .*train/image/10\.tif is "
                                            r"32x32 .*label .*train/label/10\.tif is 40x32")
  root = tmp_path / "chn6"
  _write_chn6(str(root))
  (root / "train" / "images" / "bj01_sat.jpg").write_bytes(b"not a jpeg")
  _build_fails(Chn6Cug, root, tmp_path, r"cannot read .*train/images/bj01_sat\.jpg")
