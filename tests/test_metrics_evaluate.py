"""Region metrics, evaluate_maps / evaluate_dirs, the `evaluate` CLI and the clu metric."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from idgbr_jax.metrics import evaluate
from idgbr_jax.metrics import evaluate_dirs
from idgbr_jax.metrics import evaluate_maps
from idgbr_jax.metrics import format_report
from idgbr_jax.metrics import region
from idgbr_jax.metrics.clu import make_segmentation_metric
import numerics
from test_metrics_reference import perturb, random_blocky, ref_region, ref_wf

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_REGION_KEYS = ("miou", "mf1", "oa", "kappa", "fw_iou")
# Other device counts, batchings or transform routes, or the numpy reference: counts are exact
# integers; the scores are float64 maths over at most 3 x 40 x 300 pixels, of size ~1, so they
# agree to float64 rounding of sums that long (tests/numerics.py): ~3e-12. Measured: 1.1e-16.
_SCORE_ATOL = numerics.rounding_rtol(3 * 40 * 300, dtype=np.float64)


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
    assert abs(report[key] - ref[key]) < _SCORE_ATOL, key
  np.testing.assert_allclose(report["per_class_iou"], ref["per_class_iou"], atol=_SCORE_ATOL)
  np.testing.assert_allclose(report["per_class_f1"], ref["per_class_f1"], atol=_SCORE_ATOL)
  wf = ref_wf(preds, labels)
  assert abs(report["wf_min"] - wf["wf_min"]) < _SCORE_ATOL
  assert abs(report["wf_mean"] - wf["wf_mean"]) < _SCORE_ATOL


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


def test_evaluate_maps_over_several_devices_gives_the_same_report():
  # Each batch split over devices (shard_map, one shard per device): the same numbers as one
  # device, whatever the batch size (rounded up to whole shards) and the last batch's padding.
  preds, labels, values = _dataset(13, 5, n=5)
  devices = jax.local_devices()
  assert len(devices) >= 2
  one = evaluate_maps(preds, labels, 5, values, batch_size=2, devices=devices[:1])
  for subset, batch_size in ((devices[:2], 3), (devices[:2], None), (devices, None)):
    report = evaluate_maps(preds, labels, 5, values, batch_size=batch_size, devices=subset)
    assert report.keys() == one.keys()
    for key, value in report.items():
      if isinstance(value, float):
        assert value == pytest.approx(one[key], abs=_SCORE_ATOL), (key, len(subset), batch_size)
      elif isinstance(value, list) and any(isinstance(v, float) for v in value):
        np.testing.assert_allclose(value, one[key], rtol=0, atol=_SCORE_ATOL)  # per-class scores
      else:
        assert value == one[key], (key, len(subset), batch_size)
  assert evaluate.default_batch_size(devices[:2]) == 2  # one map per CPU device
  # Inside a trainer's mesh context (other axes): evaluation keeps its own mesh.
  trainer_mesh = jax.sharding.Mesh(np.asarray(devices).reshape(-1, 2), ("data", "fsdp"))
  with jax.set_mesh(trainer_mesh):
    inside = evaluate_maps(preds, labels, 5, values, devices=devices[:2])
  assert inside["miou"] == one["miou"] and inside["wf_min"] == pytest.approx(one["wf_min"])


def test_joint_histograms_equal_separate_histograms(monkeypatch):
  # Confusion + boundary IoU + mBA share one scatter, both BF sides another, while the joint
  # code space is small; past _MAX_JOINT_BINS each gets its own. Both routes, same counts.
  from idgbr_jax.metrics import boundary_iou  # pylint: disable=g-import-not-at-top
  preds, labels, values = _dataset(17, 5, n=3)
  p, l = np.stack(preds).astype(np.int32), np.stack(labels).astype(np.int32)
  with jax.enable_x64(True):
    joint = jax.device_get(evaluate.batch_statistics(p, l, 5, tuple(values)))
    monkeypatch.setattr(evaluate, "_MAX_JOINT_BINS", 0)
    monkeypatch.setattr(boundary_iou, "_MAX_JOINT_BINS", 0)
    split = jax.device_get(evaluate.batch_statistics(p, l, 5, tuple(values)))
  assert joint.keys() == split.keys()
  for key in joint:
    np.testing.assert_array_equal(joint[key], split[key], err_msg=key)
  assert joint["confusion"].sum() > 0 and joint["biou_union"].sum() > 0


def test_shards_taking_different_transform_routes():
  # Two devices, and images whose band false positives need different routes of the WF
  # transform: ~190 px away (past the int16 cap: keyed full transform), ~30 px (capped int16
  # transform), none far (windowed only). Each shard decides for itself; same numbers as one
  # device and as the numpy reference.
  shape = (40, 300)
  labels, preds = [], []
  for far in (190, 30, None):
    label = np.zeros(shape, np.uint8)
    label[5:30, 5:40] = 1
    pred = label.copy()
    pred[5:30, 38:44] = 1
    if far is not None:
      pred[12:20, 40 + far:48 + far] = 1
    labels.append(label)
    preds.append(pred)
  devices = jax.local_devices()[:2]
  one = evaluate_maps(preds, labels, 2, [0, 1], devices=devices[:1])
  two = evaluate_maps(preds, labels, 2, [0, 1], devices=devices)
  ref = ref_wf(preds, labels)
  for report in (one, two):
    assert abs(report["wf_min"] - ref["wf_min"]) < _SCORE_ATOL
    assert abs(report["wf_mean"] - ref["wf_mean"]) < _SCORE_ATOL


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
      assert value == pytest.approx(expected[key], abs=_SCORE_ATOL), key


def _ref_repair(preds, labels, coarses, cls):
  """The README's repair analysis in numpy: split-level (inter, union) for RTm and RFm."""
  inter, union = np.zeros(2, np.int64), np.zeros(2, np.int64)
  per_image = []
  for p, l, c in zip(preds, labels, coarses):
    t, r, re = l == cls, c == cls, p == cls
    ii, uu = [], []
    for region_mask in (t & r, (t | r) & ~(t & r)):
      ii.append(np.sum(t & re & region_mask))
      uu.append(np.sum((t & region_mask) | (re & region_mask)))
    inter += ii
    union += uu
    per_image.append((np.array(ii), np.array(uu)))
  return inter, union, per_image


def test_repair_analysis_matches_definition_and_counts_categories():
  rng = np.random.default_rng(5)
  labels = [random_blocky(rng, (32, 40), [0, 1], 6) for _ in range(5)]
  coarses = [perturb(rng, l, [0, 1], 0.3, 4) for l in labels]
  preds = [perturb(rng, c, [0, 1], 0.2, 3) for c in coarses]
  report = evaluate_maps(preds, labels, 2, coarse=coarses, batch_size=2, repair_k=0.5)
  inter, union, _ = _ref_repair(preds, labels, coarses, 1)
  rtm, rfm = inter / union
  rep = report["repair"]
  assert rep["class"] == 1 and rep["k"] == 0.5
  assert abs(rep["iou_rtm"] - rtm) < _SCORE_ATOL and abs(rep["iou_rfm"] - rfm) < _SCORE_ATOL
  assert abs(rep["iou_imp"] - (rfm - 0.5 * (1 - rtm))) < _SCORE_ATOL
  assert sum(rep["images"].values()) == 5
  # The region metrics are those of the predictions, unchanged by the extra input.
  assert report["miou"] == evaluate_maps(preds, labels, 2, batch_size=2)["miou"]

  # One image per category: fully repaired, unchanged (IoU_RFm 0, IoU_RTm 1: imp 0), broken
  # (the truly predicted region lost), and one without the class anywhere (undefined).
  label = np.zeros((8, 8), np.uint8)
  label[2:6, 2:6] = 1
  coarse = label.copy()
  coarse[2:6, 5] = 0
  broken = coarse.copy()
  broken[2:4, 2:5] = 0
  empty = np.zeros((8, 8), np.uint8)
  report = evaluate_maps([label, coarse, broken, empty], [label, label, label, empty], 2,
                         coarse=[coarse, coarse, coarse, empty])
  assert report["repair"]["images"] == {"complete": 1, "partial": 1, "error": 1, "undefined": 1}


def test_cli_repair_analysis_from_a_coarse_dir(tmp_path):
  rng = np.random.default_rng(9)
  dirs = {name: tmp_path / name for name in ("pred", "label", "coarse")}
  for d in dirs.values():
    d.mkdir()
  labels = [random_blocky(rng, (24, 24), [0, 1], 5) for _ in range(3)]
  coarses = [perturb(rng, l, [0, 1], 0.3, 3) for l in labels]
  preds = [perturb(rng, c, [0, 1], 0.2, 3) for c in coarses]
  for i in range(3):
    for name, maps in (("pred", preds), ("label", labels), ("coarse", coarses)):
      _write(str(dirs[name] / f"t{i}.png"), maps[i])
  out = tmp_path / "r.json"
  args = [f"--pred_dir={dirs['pred']}", f"--label_dir={dirs['label']}", "--num_classes=2",
          f"--coarse_dir={dirs['coarse']}", "--repair_k=0.5", "--noprogress"]
  result = _run_cli(*args, f"--output={out}")
  assert result.returncode == 0, result.stderr
  report = json.loads(out.read_text())
  expected = evaluate_maps(preds, labels, 2, coarse=coarses, repair_k=0.5)["repair"]
  assert report["repair"] == expected and "IoU_RFm" in result.stdout
  os.remove(dirs["coarse"] / "t1.png")
  result = _run_cli(*args, "--output=")
  assert result.returncode != 0 and "t1" in result.stderr and "coarse" in result.stderr
