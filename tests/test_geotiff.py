"""GeoTIFF in and out, whole scenes through the commands: `idgbr predict --images` and `idgbr
refine` on GeoTIFFs larger than the model's window write single-band uint8 GeoTIFFs with the
source's CRS and transform (nodata pixels marked), whose values are the PNG path's for the same
pixels; uint16 input is scaled (`--scale`); `--visualize` writes panels; bad rasters are named."""
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

rasterio = pytest.importorskip("rasterio")
from affine import Affine  # noqa: E402

from test_windows import stage1_run, stage2_run  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CRS = "EPSG:32632"
TRANSFORM = Affine(0.5, 0.0, 500000.0, 0.0, -0.5, 5000000.0)  # 0.5 m pixels, north up
H, W = 45, 70  # larger than both tiles (32 and 16 px), a multiple of neither


def _cli(*args, ok=True):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3", "IDGBR_PROGRESS": "1"}
  res = subprocess.run([sys.executable, "-m", "idgbr_jax.cli", *map(str, args)], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  if ok:
    assert res.returncode == 0, res.stderr[-4000:]
  return res


def write_tif(path, bands_hwc, nodata=None, crs=CRS, transform=TRANSFORM):
  a = np.asarray(bands_hwc)
  if a.ndim == 2:
    a = a[..., None]
  with rasterio.open(path, "w", driver="GTiff", height=a.shape[0], width=a.shape[1],
                     count=a.shape[2], dtype=a.dtype, crs=crs, transform=transform,
                     nodata=nodata) as ds:
    ds.write(np.moveaxis(a, -1, 0))


def read_tif(path):
  with rasterio.open(path) as ds:
    return ds.read(1), ds.crs, ds.transform, ds.nodata, ds.count, ds.dtypes[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  root = tmp_path_factory.mktemp("geotiff")
  e = {"root": root, "s1": stage1_run(root), "s2": stage2_run(root)}
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (H, W, 3), dtype=np.uint8)
  image[:5, :7] = 0  # nodata (0 in every band)
  e["image"] = image
  tif, png = root / "tif", root / "png"
  tif.mkdir()
  png.mkdir()
  write_tif(tif / "scene.tif", image, nodata=0)
  Image.fromarray(image).save(png / "scene.png")
  # The same pixels as uint16 (v * 257): --scale=65535 maps them back to v exactly.
  (root / "u16").mkdir()
  write_tif(root / "u16" / "scene.tif", image.astype(np.uint16) * 257, nodata=0)
  # Stage I on both, the coarse maps then refined.
  res = _cli("predict", f"--workdir={e['s1']}", f"--images={tif}",
             f"--out={root / 'coarse_tif'}", "--overlap=8")
  e["predict_stderr"] = res.stderr
  _cli("predict", f"--workdir={e['s1']}", f"--images={png}", f"--out={root / 'coarse_png'}",
       "--overlap=8")
  return e


def test_predict_geotiff_keeps_the_georeference_and_equals_the_png_path(env):
  root = env["root"]
  cls, crs, transform, nodata, count, dtype = read_tif(root / "coarse_tif" / "scene.tif")
  assert (count, dtype, cls.shape) == (1, "uint8", (H, W))
  assert crs == rasterio.crs.CRS.from_string(CRS) and transform == TRANSFORM
  assert nodata == 255  # the source's nodata (0) is a class index: 255 marks it instead
  png = np.asarray(Image.open(root / "coarse_png" / "scene.png"))
  assert png.shape == (H, W) and png.max() < 6
  valid = np.ones((H, W), bool)
  valid[:5, :7] = False
  np.testing.assert_array_equal(cls[valid], png[valid])
  assert (cls[~valid] == 255).all()
  assert not os.path.exists(root / "coarse_tif" / "scene.png")


def test_progress_counts_windows(env):
  # 45 x 70 in 32-px windows 24 apart: 2 rows x 3 columns, the last ones on the scene's edges.
  assert "predict" in env["predict_stderr"] and "6/6" in env["predict_stderr"]
  assert "window" in env["predict_stderr"]


def test_uint16_geotiff_is_scaled(env):
  root = env["root"]
  _cli("predict", f"--workdir={env['s1']}", f"--images={root / 'u16'}",
       f"--out={root / 'coarse_u16'}", "--overlap=8", "--scale=65535")
  got = read_tif(root / "coarse_u16" / "scene.tif")[0]
  np.testing.assert_array_equal(got, read_tif(root / "coarse_tif" / "scene.tif")[0])


def test_refine_geotiff_scene_in_windows(env):
  """A 3-band GeoTIFF larger than the refiner's 16-px window, with the GeoTIFF coarse map of
  `idgbr predict`, is refined into a GeoTIFF with the same georeference; its values are the PNG
  path's (coarse nodata read as class 0 there); panels with the ground truth are written."""
  root = env["root"]
  coarse_png = np.asarray(Image.open(root / "coarse_png" / "scene.png"))
  (root / "coarse_png0").mkdir()
  coarse0 = read_tif(root / "coarse_tif" / "scene.tif")[0].copy()
  coarse0[coarse0 == 255] = 0
  Image.fromarray(coarse0).save(root / "coarse_png0" / "scene.png")
  (root / "labels").mkdir()
  Image.fromarray(coarse_png[::-1].copy()).save(root / "labels" / "scene.png")
  res = _cli("refine", f"--checkpoint={env['s2']}", f"--images={root / 'tif'}",
             f"--coarse={root / 'coarse_tif'}", f"--out={root / 'refined_tif'}", "--overlap=4",
             "--visualize", f"--labels={root / 'labels'}")
  assert "24/24" in res.stderr  # 16-px windows 12 apart: 4 rows x 6 columns
  _cli("refine", f"--checkpoint={env['s2']}", f"--images={root / 'png'}",
       f"--coarse={root / 'coarse_png0'}", f"--out={root / 'refined_png'}", "--overlap=4",
       "--visualize")
  cls, crs, transform, nodata, count, dtype = read_tif(root / "refined_tif" / "scene.tif")
  assert (count, dtype, cls.shape, nodata) == (1, "uint8", (H, W), 255)
  assert crs == rasterio.crs.CRS.from_string(CRS) and transform == TRANSFORM
  png = np.asarray(Image.open(root / "refined_png" / "scene.png"))
  valid = np.ones((H, W), bool)
  valid[:5, :7] = False
  np.testing.assert_array_equal(cls[valid], png[valid])
  assert (cls[~valid] == 255).all() and png.max() < 6
  # Panels: image | ground truth | coarse | refined | repaired/damaged, and without labels one
  # column fewer.
  with_gt = np.asarray(Image.open(root / "refined_tif" / "panels" / "scene.png"))
  without = np.asarray(Image.open(root / "refined_png" / "panels" / "scene.png"))
  assert with_gt.shape[1] == 5 * W + 4 * 2 and without.shape[1] == 4 * W + 3 * 2
  assert with_gt.shape[0] == without.shape[0] > H


def test_bad_rasters_are_named(env, tmp_path):
  root = env["root"]
  (tmp_path / "rgbi").mkdir()
  write_tif(tmp_path / "rgbi" / "four.tif", np.zeros((20, 20, 4), np.uint8))
  res = _cli("predict", f"--workdir={env['s1']}", f"--images={tmp_path / 'rgbi'}",
             f"--out={tmp_path / 'o1'}", ok=False)
  assert res.returncode == 1 and "four.tif has 4 band(s); expected 3" in res.stderr
  (tmp_path / "corrupt").mkdir()
  (tmp_path / "corrupt" / "broken.tif").write_bytes(b"II*\x00" + b"\x00garbage" * 8)
  res = _cli("predict", f"--workdir={env['s1']}", f"--images={tmp_path / 'corrupt'}",
             f"--out={tmp_path / 'o2'}", ok=False)
  assert res.returncode == 1 and "cannot read image" in res.stderr
  assert "broken.tif" in res.stderr and "Traceback" not in res.stderr
  (tmp_path / "small_coarse").mkdir()
  write_tif(tmp_path / "small_coarse" / "scene.tif", np.zeros((H, W - 1), np.uint8))
  res = _cli("refine", f"--checkpoint={env['s2']}", f"--images={root / 'tif'}",
             f"--coarse={tmp_path / 'small_coarse'}", f"--out={tmp_path / 'o3'}", ok=False)
  assert res.returncode == 1 and f"is {W - 1}x{H} (WxH)" in res.stderr
  assert f"must be {W}x{H}" in res.stderr


def test_scale_rules_and_output_nodata():
  from idgbr_jax import rasters  # pylint: disable=import-outside-toplevel
  assert rasters.parse_scale("AUTO") == "auto" and rasters.parse_scale("65535") == 65535.0
  with pytest.raises(ValueError, match="expected 'auto', 'none' or a positive number"):
    rasters.parse_scale("-3")
  u16 = np.array([[[0], [257], [65535]]], np.uint16).repeat(3, -1)
  np.testing.assert_array_equal(rasters.to_uint8(u16, 65535.0, None)[..., 0], [[0, 1, 255]])
  f = np.array([[[-5.0], [300.0], [12.4]]])
  np.testing.assert_array_equal(rasters.to_uint8(f, "none", None)[..., 0], [[0, 255, 12]])
  stats = np.array([[100.0, 200.0]])
  np.testing.assert_array_equal(
      rasters.to_uint8(np.array([[[100.0], [150.0], [250.0]]]), "auto", stats)[..., 0],
      [[0, 128, 255]])
  u8 = np.full((2, 2, 3), 7, np.uint8)
  assert rasters.to_uint8(u8, "auto", None) is u8  # uint8 as stored
  assert rasters.output_nodata(None, 6) is None
  assert rasters.output_nodata(0, 6) == 255 and rasters.output_nodata(-9999.0, 6) == 255
  assert rasters.output_nodata(200, 6) == 200 and rasters.output_nodata(float("nan"), 6) == 255
