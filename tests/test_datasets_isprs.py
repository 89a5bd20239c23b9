"""ISPRS Potsdam / Vaihingen builders: fake 40x48 tiles in the native layout and file names are
cut into 16x16 patches; colours, composites, eroded labels, clutter handling, tile positions and
ids are checked on values; bad manual_dir content names the file."""
import os

import numpy as np
import pytest
from PIL import Image

from idgbr_datasets import _common
from idgbr_datasets import isprs
from idgbr_jax.data import sources

H, W, T = 40, 48, 16
# Patch corners of a 40x48 tile cut every 16 px: the last row is shifted flush (24), x is exact.
CORNERS = [(y, x) for y in (0, 16, 24) for x in (0, 16, 32)]
POTSDAM = dict(train_tiles="2_10,2_11", test_tiles="2_13", tile_size=T, stride=T)
VAIHINGEN = dict(train_tiles="1,3", test_tiles="2", tile_size=T, stride=T)


def _class_map(seed):
  """(H,W) ISPRS class indices in CLASS_NAMES order (0 impervious .. 5 clutter), blocky."""
  rng = np.random.default_rng(seed)
  return np.kron(rng.integers(0, 6, (H // 4, W // 4)), np.ones((4, 4), np.int64)).astype(np.uint8)


def _colour(index):
  return np.asarray(isprs.COLOURS, np.uint8)[index]


def _tile_image(seed, channels=3):
  return np.random.default_rng(100 + seed).integers(0, 256, (H, W, channels), dtype=np.uint8)


def _eroded(index):
  """An eroded label: a black band where the class changes (as the ISPRS _noBoundary files)."""
  rgb = _colour(index)
  edge = np.zeros(index.shape, bool)
  edge[:, 1:] |= index[:, 1:] != index[:, :-1]
  edge[1:] |= index[1:] != index[:-1]
  rgb[edge] = 0
  return rgb, edge


def _write_potsdam(root, tiles=("2_10", "2_11", "2_13")):
  import tifffile  # the RGBIR composite is a 4-band TIFF
  for sub in ("2_Ortho_RGB", "3_Ortho_IRRG", "4_Ortho_RGBIR", "5_Labels_all",
              "5_Labels_all_noBoundary"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  for seed, tile in enumerate(tiles):
    index = _class_map(seed)
    Image.fromarray(_tile_image(seed)).save(
        os.path.join(root, "3_Ortho_IRRG", f"top_potsdam_{tile}_IRRG.tif"))
    Image.fromarray(_tile_image(seed)[..., ::-1]).save(
        os.path.join(root, "2_Ortho_RGB", f"top_potsdam_{tile}_RGB.tif"))
    tifffile.imwrite(os.path.join(root, "4_Ortho_RGBIR", f"top_potsdam_{tile}_RGBIR.tif"),
                     _tile_image(seed, 4), photometric="rgb")
    Image.fromarray(_colour(index)).save(
        os.path.join(root, "5_Labels_all", f"top_potsdam_{tile}_label.tif"))
    Image.fromarray(_eroded(index)[0]).save(
        os.path.join(root, "5_Labels_all_noBoundary", f"top_potsdam_{tile}_label_noBoundary.tif"))


def _write_vaihingen(root, areas=("1", "3", "2")):
  for sub in ("top", "ground_truth_COMPLETE", "ground_truth_eroded_COMPLETE"):
    os.makedirs(os.path.join(root, sub), exist_ok=True)
  for seed, area in enumerate(areas):
    index = _class_map(10 + seed)
    Image.fromarray(_tile_image(10 + seed)).save(
        os.path.join(root, "top", f"top_mosaic_09cm_area{area}.tif"))
    Image.fromarray(_colour(index)).save(
        os.path.join(root, "ground_truth_COMPLETE", f"top_mosaic_09cm_area{area}.tif"))
    Image.fromarray(_eroded(index)[0]).save(os.path.join(
        root, "ground_truth_eroded_COMPLETE", f"top_mosaic_09cm_area{area}_noBoundary.tif"))


def _build_and_read(builder_cls, root, data_dir, name, split, **params):
  builder = _common.build(builder_cls, root, data_dir, **params)
  cfg = sources.data_config(name, data_dir=data_dir, tfds_config=builder.builder_config.name)
  return sources.get_source(cfg, split), builder


@pytest.fixture(scope="module")
def potsdam_root(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("potsdam"))
  pytest.importorskip("tifffile")
  _write_potsdam(root)
  return root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def test_standard_tile_lists():
  train, test = isprs.POTSDAM_TILES["train"], isprs.POTSDAM_TILES["test"]
  assert len(train) == 24 and len(test) == 14 and not set(train) & set(test)
  train, test = isprs.VAIHINGEN_TILES["train"], isprs.VAIHINGEN_TILES["test"]
  assert len(train) == 16 and len(test) == 17 and not set(train) & set(test)
  assert sorted(map(int, train + test)) == [a for a in range(1, 39) if a not in (9, 18, 19, 25,
                                                                               36)]


def test_tile_starts_cover_the_border():
  assert _common.tile_starts(40, 16, 16) == [0, 16, 24]
  assert _common.tile_starts(48, 16, 16) == [0, 16, 32]
  assert _common.tile_starts(6000, 512, 512)[-2:] == [5120, 5488]
  assert _common.tile_starts(40, 16, 8) == [0, 8, 16, 24]
  assert _common.tile_starts(10, 16, 16) == []


def test_label_encodings():
  index = np.arange(6, dtype=np.uint8)[None]
  rgb = _colour(index)
  np.testing.assert_array_equal(isprs.encode_label(rgb, "x"), [[1, 2, 3, 4, 5, 0]])  # idgbr
  np.testing.assert_array_equal(isprs.encode_label(rgb, "x", class_order="isprs"),
                                [[0, 1, 2, 3, 4, 5]])
  np.testing.assert_array_equal(isprs.encode_label(rgb, "x", clutter="ignore"),
                                [[1, 2, 3, 4, 5, 255]])
  assert isprs.num_classes("idgbr") == 6 and isprs.eval_label_values("idgbr") == [1, 2, 3, 4, 5]
  assert isprs.num_classes("isprs", "ignore") == 5
  assert isprs.class_names("idgbr")[:2] == ["clutter", "impervious_surfaces"]
  with pytest.raises(_common.ManualDataError, match=r"lab\.tif: colours \[\(0, 0, 0\)\]"):
    isprs.encode_label(np.zeros((2, 2, 3), np.uint8), "lab.tif")  # black only when eroded
  np.testing.assert_array_equal(isprs.encode_label(np.zeros((1, 1, 3), np.uint8), "x",
                                                   eroded=True), [[255]])


def test_potsdam_irrg_patches_positions_and_ids(potsdam_root, data_dir):
  train, builder = _build_and_read(isprs.Potsdam, potsdam_root, data_dir, "potsdam", "train",
                                   **POTSDAM)
  test = sources.get_source(sources.data_config(
      "potsdam", data_dir=data_dir, tfds_config=builder.builder_config.name), "test")
  assert len(train) == 2 * len(CORNERS) and len(test) == len(CORNERS)
  assert builder.info.metadata["eval_label_values"] == [1, 2, 3, 4, 5]
  for n, (seed, tile) in enumerate([(0, "2_10"), (1, "2_11")]):
    image, index = _tile_image(seed), isprs.encode_label(_colour(_class_map(seed)), "x")
    for k, (y, x) in enumerate(CORNERS):
      ex = train[n * len(CORNERS) + k]
      assert ex["id"] == f"top_potsdam_{tile}_y{y:05d}_x{x:05d}".encode()
      assert ex["tile"] == f"top_potsdam_{tile}".encode() and (ex["y"], ex["x"]) == (y, x)
      np.testing.assert_array_equal(ex["image"], image[y:y + T, x:x + T])
      np.testing.assert_array_equal(ex["label"][..., 0], index[y:y + T, x:x + T])
  # Clutter (red) is 0 under the default encoding and appears in the fake labels.
  labels = np.concatenate([train[i]["label"].ravel() for i in range(len(train))])
  assert set(np.unique(labels)) == {0, 1, 2, 3, 4, 5}


def test_potsdam_composites_eroded_and_clutter_options(potsdam_root, data_dir):
  rgbir, _ = _build_and_read(isprs.Potsdam, potsdam_root, data_dir, "potsdam", "test",
                             channels="rgbir", **POTSDAM)
  assert rgbir[4]["image"].shape == (T, T, 4)
  np.testing.assert_array_equal(rgbir[4]["image"], _tile_image(2, 4)[16:32, 16:32])
  rgb, _ = _build_and_read(isprs.Potsdam, potsdam_root, data_dir, "potsdam", "test",
                           channels="rgb", **POTSDAM)
  np.testing.assert_array_equal(rgb[0]["image"], _tile_image(2)[:T, :T, ::-1])
  eroded, _ = _build_and_read(isprs.Potsdam, potsdam_root, data_dir, "potsdam", "test",
                              eroded=True, clutter="ignore", class_order="isprs", **POTSDAM)
  index = _class_map(2)
  _, edge = _eroded(index)
  want = np.where(edge | (index == 5), 255, index)  # isprs order = CLASS_NAMES order
  for k, (y, x) in enumerate(CORNERS):
    np.testing.assert_array_equal(eroded[k]["label"][..., 0], want[y:y + T, x:x + T])


def test_overlapping_stride(potsdam_root, data_dir):
  train, _ = _build_and_read(isprs.Potsdam, potsdam_root, data_dir, "potsdam", "test",
                             **dict(POTSDAM, stride=12))
  ys, xs = _common.tile_starts(H, T, 12), _common.tile_starts(W, T, 12)
  assert ys == [0, 12, 24] and xs == [0, 12, 24, 32]
  assert [(int(train[i]["y"]), int(train[i]["x"])) for i in range(len(train))] == [
      (y, x) for y in ys for x in xs]


def test_vaihingen_irrg_and_eroded(tmp_path):
  root = str(tmp_path / "vaihingen")
  _write_vaihingen(root)
  data_dir = str(tmp_path / "tfds")
  test, _ = _build_and_read(isprs.Vaihingen, root, data_dir, "vaihingen", "test", **VAIHINGEN)
  assert len(test) == len(CORNERS)
  index = isprs.encode_label(_colour(_class_map(12)), "x")
  for k, (y, x) in enumerate(CORNERS):
    ex = test[k]
    assert ex["id"] == f"top_mosaic_09cm_area2_y{y:05d}_x{x:05d}".encode()
    np.testing.assert_array_equal(ex["image"], _tile_image(12)[y:y + T, x:x + T])
    np.testing.assert_array_equal(ex["label"][..., 0], index[y:y + T, x:x + T])
  eroded, _ = _build_and_read(isprs.Vaihingen, root, data_dir, "vaihingen", "train",
                              eroded=True, **VAIHINGEN)
  _, edge = _eroded(_class_map(10))
  got = eroded[0]["label"][..., 0]
  np.testing.assert_array_equal(got == 255, edge[:T, :T])
  with pytest.raises(ValueError, match=r"channels='rgb'; allowed: \['irrg'\]"):
    _common.build(isprs.Vaihingen, root, data_dir, channels="rgb", **VAIHINGEN)


# ----------------------------------------------------------------------------------------------
# Bad manual_dir content.


def _fails(root, tmp_path, match, builder_cls=isprs.Potsdam, **params):
  with pytest.raises(_common.ManualDataError, match=match):
    _common.build(builder_cls, str(root), str(tmp_path / "tfds"), **dict(POTSDAM, **params))


def test_missing_folder_and_missing_tile(tmp_path):
  root = tmp_path / "potsdam"
  root.mkdir()
  (root / "5_Labels_all").mkdir()
  _fails(root, tmp_path, r"missing folder .*potsdam/3_Ortho_IRRG \(irrg images\)")
  _write_vaihingen(str(tmp_path / "v"), areas=("1", "3"))
  _fails(tmp_path / "v", tmp_path, r"missing file .*top/top_mosaic_09cm_area2\.tif \(tile 2 "
                                   r"of the test split\)", builder_cls=isprs.Vaihingen,
         **{k: v for k, v in VAIHINGEN.items() if k.endswith("tiles")})


def test_wrong_colour_and_size_mismatch(tmp_path):
  root = tmp_path / "v"
  _write_vaihingen(str(root))
  label = _colour(_class_map(10))
  label[7, 9] = (10, 20, 30)
  path = root / "ground_truth_COMPLETE" / "top_mosaic_09cm_area1.tif"
  Image.fromarray(label).save(path)
  _fails(root, tmp_path, r"area1\.tif: colours \[\(10, 20, 30\)\] \(first at row 7, col 9\)",
         builder_cls=isprs.Vaihingen, **{k: v for k, v in VAIHINGEN.items() if k.endswith("s")})
  Image.fromarray(_colour(_class_map(10))[:, :40]).save(path)
  _fails(root, tmp_path, r"size mismatch: image .*top/top_mosaic_09cm_area1\.tif is 48x40 "
                         r"\(WxH\), label .*area1\.tif is 40x40", builder_cls=isprs.Vaihingen,
         **{k: v for k, v in VAIHINGEN.items() if k.endswith("s")})
