"""Region metrics, evaluate_maps / evaluate_dirs, the `evaluate` CLI and the clu metric."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from idgbr_jax.metrics import evaluate_dirs
from idgbr_jax.metrics import evaluate_maps
from idgbr_jax.metrics import format_report
from idgbr_jax.metrics import region
from idgbr_jax.metrics.clu import make_segmentation_metric
from test_metrics_reference import perturb, random_blocky, ref_region, ref_wf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REGION_KEYS = ("miou", "mf1", "oa", "kappa", "fw_iou")


def _dataset(seed, num_classes, n=6, shape=(40, 56)):
  rng = np.random.default_rng(seed)
  values = [0, 1] if num_classes == 2 else [1, 2, 3, 4, 5]
  raw = values + ([0, 255] if num_classes == 5 else [])
  labels = [random_blocky(rng, shape, raw, int(rng.integers(4, 10))) for _ in range(n)]
  preds = [perturb(rng, l, raw, 0.25, 3) for l in labels]
  return preds, labels, values


def _assert_matches_reference(report, preds, labels, k, values):
  ref = ref_region(preds, labels, k, values)
  np.testing.assert_array_equal(report["confusion_matrix"], ref["confusion"])
  for key in _REGION_KEYS:
    assert abs(report[key] - ref[key]) < 1e-12, key
  np.testing.assert_allclose(report["per_class_iou"], ref["per_class_iou"], atol=1e-12)
  np.testing.assert_allclose(report["per_class_f1"], ref["per_class_f1"], atol=1e-12)
  wf = ref_wf(preds, labels)
  assert abs(report["wf_min"] - wf["wf_min"]) < 1e-12
  assert abs(report["wf_mean"] - wf["wf_mean"]) < 1e-12


@pytest.mark.parametrize("num_classes", [2, 5])
def test_evaluate_maps_matches_original_definition(num_classes):
  preds, labels, values = _dataset(num_classes, num_classes)
  report = evaluate_maps(preds, labels, num_classes, values, batch_size=4)
  _assert_matches_reference(report, preds, labels, num_classes, values)
  assert report["num_images"] == 6 and report["missing_predictions"] == 0
  json.dumps(report)  # plain Python types only
  table = format_report(report)
  assert "WF (3px, min)" in table and f"{report['miou']:.6f}" in table


def test_mixed_shapes_are_grouped():
  preds, labels, values = _dataset(3, 5, n=3)
  p2, l2, _ = _dataset(4, 5, n=2, shape=(40, 56))
  l2 = [l[:33, :47].copy() for l in l2]
  p2 = [p[:33, :47].copy() for p in p2]
  report = evaluate_maps(preds + p2, labels + l2, 5, values, batch_size=4)
  _assert_matches_reference(report, preds + p2, labels + l2, 5, values)


def test_encoding_quirks():
  raw = np.array([[0, 1, 2, 255], [5, 6, 3, 4]], np.uint8)
  cls, ok = region.encode(raw, 5, [1, 2, 3, 4, 5])
  np.testing.assert_array_equal(np.asarray(cls), [[-1, 0, 1, -1], [4, -1, 2, 3]])
  cls, ok = region.encode(raw, 5, None)  # value = class when 0 <= v < K
  np.testing.assert_array_equal(np.asarray(ok), [[1, 1, 1, 0], [0, 0, 1, 1]])
  cls, ok = region.encode(raw, 2, [0, 1])  # binary mode: > 0 is foreground, 255 included
  np.testing.assert_array_equal(np.asarray(cls), [[0, 1, 1, 1], [1, 1, 1, 1]])
  cls, ok = region.encode(raw, 2, [0, 255])  # the original's quirk: 255 -> 1 -> unmapped
  np.testing.assert_array_equal(np.asarray(ok), [[1, 0, 0, 0], [0, 0, 0, 0]])


def test_hand_computed_region_metrics_and_both_masks_rule():
  label = np.array([[1, 1, 2, 2], [1, 1, 2, 0]], np.uint8)
  pred = np.array([[1, 2, 2, 2], [0, 1, 2, 2]], np.uint8)
  # Pixel (1, 0): prediction 0 is unmapped -> dropped; pixel (1, 3): label 0 -> dropped.
  report = evaluate_maps([pred], [label], 2, [1, 2])
  assert report["confusion_matrix"] == [[2, 1], [0, 3]]
  assert report["per_class_iou"] == pytest.approx([2 / 3, 3 / 4])
  assert report["oa"] == pytest.approx(5 / 6)
  pe = (2 * 3 + 4 * 3) / 36
  assert report["kappa"] == pytest.approx((5 / 6 - pe) / (1 - pe + 1e-10))
  assert report["fw_iou"] == pytest.approx(3 / 6 * 2 / 3 + 3 / 6 * 3 / 4)
  assert report["files_with_unmapped_values"] == {"0": {"label": 1, "pred": 1}}
  with pytest.raises(ValueError, match="outside the label encoding"):
    evaluate_maps([pred], [label], 2, [1, 2], strict=True)


def test_bad_input_names_the_map():
  with pytest.raises(ValueError, match="b: prediction shape"):
    evaluate_maps([np.zeros((4, 4), np.uint8)], [np.zeros((4, 5), np.uint8)], 2, names=["b"])


def _write(path, array):
  if path.endswith(".tif"):
    import tifffile
    tifffile.imwrite(path, array)
  else:
    Image.fromarray(array).save(path)


def _run_cli(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=_ROOT)
  return subprocess.run([sys.executable, "-m", "idgbr_jax.commands.evaluate", *args],
                        capture_output=True, text=True, env=env, cwd=_ROOT, timeout=300)


def test_cli_on_directories(tmp_path):
  preds, labels, values = _dataset(7, 5, n=4)
  pred_dir, label_dir = tmp_path / "pred", tmp_path / "label"
  pred_dir.mkdir()
  label_dir.mkdir()
  for i, (p, l) in enumerate(zip(preds, labels)):
    _write(str(label_dir / f"tile_{i}.png"), l)
    if i < 3:  # tile_3 has no prediction
      _write(str(pred_dir / f"tile_{i}.{'tif' if i == 1 else 'png'}"), p)
  out = tmp_path / "report.json"
  result = _run_cli(f"--pred_dir={pred_dir}", f"--label_dir={label_dir}", "--num_classes=5",
                    "--label_values=1,2,3,4,5", f"--output={out}", "--noprogress")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  assert report["missing_predictions"] == 1 and report["missing_files"] == ["tile_3"]
  assert report["num_images"] == 3
  _assert_matches_reference(report, preds[:3], labels[:3], 5, values)
  assert "mIoU" in result.stdout and "WF (3px, min)" in result.stdout
  assert report == evaluate_dirs(str(pred_dir), str(label_dir), 5, values, progress=False) | {
      "pred_dir": report["pred_dir"]}
  # Size mismatch and unreadable file are reported by name.
  _write(str(pred_dir / "tile_0.png"), preds[0][:-1])
  result = _run_cli(f"--pred_dir={pred_dir}", f"--label_dir={label_dir}", "--num_classes=5",
                    "--output=", "--noprogress")
  assert result.returncode != 0 and "tile_0" in result.stderr and "shape" in result.stderr
  (pred_dir / "tile_0.png").write_bytes(b"not an image")
  result = _run_cli(f"--pred_dir={pred_dir}", f"--label_dir={label_dir}", "--num_classes=5",
                    "--output=", "--noprogress")
  assert result.returncode != 0 and "tile_0.png" in result.stderr


def test_clu_metric_equals_evaluate_maps_across_devices():
  preds, labels, values = _dataset(11, 5, n=8)
  expected = evaluate_maps(preds, labels, 5, values, batch_size=8)
  metric_cls = make_segmentation_metric(5, values)
  n_dev = jax.local_device_count()
  assert 8 % n_dev == 0
  p = np.stack(preds).reshape(n_dev, 8 // n_dev, *preds[0].shape)
  l = np.stack(labels).reshape(n_dev, 8 // n_dev, *labels[0].shape)
  mask = np.ones((n_dev, 8 // n_dev), bool)

  def step(pred_map, label_map, image_mask):
    update = metric_cls.from_model_output(pred_map=pred_map, label_map=label_map,
                                          image_mask=image_mask)
    return jax.lax.all_gather(update, axis_name="batch").reduce()

  with jax.enable_x64(True):
    gathered = jax.pmap(step, axis_name="batch")(p, l, mask)
    metric = jax.tree_util.tree_map(lambda x: x[0], gathered)
    # A second, padded batch merged on top must not change anything.
    pad = metric_cls.from_model_output(pred_map=np.stack(preds[:2]),
                                       label_map=np.stack(labels[:2]),
                                       image_mask=np.zeros(2, bool))
    got = metric.merge(pad).merge(metric_cls.empty()).compute()
  for key, value in got.items():
    if key == "confusion_matrix":
      assert value == expected[key]
    else:
      assert value == pytest.approx(expected[key], abs=1e-12), key
