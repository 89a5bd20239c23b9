"""Panels (idgbr_jax.visualize) and the progress reporter (idgbr_jax.progress)."""
import io

import numpy as np
import pytest
from PIL import Image

from idgbr_jax import progress, visualize


def test_change_categories_partition_and_count_every_case():
  label = np.array([[0, 0, 1, 1, 255, 2]])
  coarse = np.array([[0, 1, 1, 0, 0, 0]])
  refined = np.array([[0, 0, 0, 2, 1, 1]])
  cats = visualize.change_categories(label, coarse, refined)
  total = sum(m.astype(int) for m in cats.values())
  np.testing.assert_array_equal(total, np.ones_like(label))  # disjoint and covering
  # pixel by pixel: right, repaired, damaged, changed-but-wrong, ignored, changed-but-wrong
  assert visualize.change_counts(label, coarse, refined) == {
      "right": 1, "repaired": 1, "damaged": 1, "changed_wrong": 2, "wrong": 0, "ignored": 1}
  colours = visualize.change_map(label, coarse, refined)
  assert tuple(colours[0, 1]) == visualize.CHANGE_COLOURS["repaired"]
  assert tuple(colours[0, 2]) == visualize.CHANGE_COLOURS["damaged"]
  assert tuple(colours[0, 4]) == visualize.CHANGE_COLOURS["ignored"]


def test_panel_columns_hold_the_maps_in_their_colours(tmp_path):
  rng = np.random.default_rng(0)
  h, w, k = 8, 10, 6
  image = rng.integers(0, 255, (h, w, 4), dtype=np.uint8)  # RGBIR: the first 3 bands show
  label, coarse, refined = (rng.integers(0, k, (h, w)) for _ in range(3))
  row = visualize.panel(image, label, coarse, refined, k, titles=False, gap=2)
  assert row.shape == (h, 5 * w + 4 * 2, 3) and row.dtype == np.uint8
  col = lambda i: row[:, i * (w + 2):i * (w + 2) + w]
  np.testing.assert_array_equal(col(0), image[..., :3])
  np.testing.assert_array_equal(col(1), visualize.ISPRS_PALETTE[label])
  np.testing.assert_array_equal(col(3), visualize.ISPRS_PALETTE[refined])
  np.testing.assert_array_equal(col(4), visualize.change_map(label, coarse, refined))
  visualize.write_panel(tmp_path / "p.png", image, None, coarse, refined, k)
  with Image.open(tmp_path / "p.png") as im:  # no label: 4 columns under a title strip
    assert im.size == (4 * w + 3 * 2, h + 14)


def test_float_images_are_stretched_and_shapes_checked():
  x = np.linspace(-3, 5, 100, dtype=np.float32).reshape(10, 10)
  rgb = visualize.image_to_rgb(x)
  assert rgb.dtype == np.uint8 and rgb.min() == 0 and rgb.max() == 255
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
  with pytest.raises(ValueError, match="same shape"):
    visualize.change_categories(np.zeros((2, 2)), np.zeros((2, 3)), np.zeros((2, 2)))
  with pytest.raises(ValueError, match="differ in size"):
    visualize.panel(np.zeros((4, 4, 3), np.uint8), None, np.zeros((5, 5), int),
                    np.zeros((5, 5), int), 2)


def test_palettes_are_distinct():
  for k in (2, 6, 7, 19):
    assert len({tuple(c) for c in visualize.palette(k)}) == k


def test_progress_counts_and_reports_an_eta(monkeypatch):
  monkeypatch.setenv("IDGBR_PROGRESS_INTERVAL", "0")
  stream = io.StringIO()
  with progress.Progress(4, "refine", unit="map", stream=stream) as p:
    for _ in range(4):
      p.update()
  out = stream.getvalue()
  assert p.count == 4 and "refine" in out and "4/4" in out and "map" in out
  monkeypatch.setenv("IDGBR_PROGRESS", "0")
  assert list(progress.track(range(3), "x")) == [0, 1, 2]
  stream = io.StringIO()
  with progress.Progress(2, "quiet", stream=stream) as p:
    p.update(2)
  assert stream.getvalue() == "" and p.count == 2
