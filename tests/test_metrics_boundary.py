"""Boundary IoU, boundary F, mBA and repair analysis against OpenCV references / hand counts."""

import jax
import numpy as np
import pytest

from idgbr_jax.metrics import boundary
from idgbr_jax.metrics import boundary_iou
from idgbr_jax.metrics import repair
from test_metrics_reference import perturb, random_blocky

cv2 = pytest.importorskip("cv2")


def _ref_mask_to_boundary(mask, dilation_ratio=0.02):
  """boundary-iou-api's mask_to_boundary (zero pad, cv2.erode d iterations)."""
  h, w = mask.shape
  d = max(1, int(round(dilation_ratio * np.sqrt(h**2 + w**2))))
  padded = cv2.copyMakeBorder(mask.astype(np.uint8), 1, 1, 1, 1, cv2.BORDER_CONSTANT, value=0)
  eroded = cv2.erode(padded, np.ones((3, 3), np.uint8), iterations=d)[1:h + 1, 1:w + 1]
  return mask.astype(np.uint8) - eroded


def _ref_mba(gt, seg):
  """CascadePSP compute_boundary_acc_multi_class with class ids shifted so 0 is void."""
  gt = gt + 1
  seg = seg + 1
  h, w = gt.shape
  accs = []
  for i in range(5):
    r = 1 + int(((w + h) / 300 - 1) / 5 * i)
    kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    band = np.zeros_like(gt)
    for c in np.unique(gt):
      if c == 0:
        continue
      band += cv2.morphologyEx((gt == c).astype(np.uint8), cv2.MORPH_GRADIENT, kernel)
    band = band > 0
    g, s = gt[band], seg[band]
    void = (g == 0).sum()
    accs.append(((g == s).sum() - void) / (band.sum() - void))
  return sum(accs) / 5


def test_ellipse_kernel_matches_opencv():
  for r in range(0, 16):
    ref = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))
    np.testing.assert_array_equal(boundary.ellipse_kernel(r), ref)


def test_boundary_iou_matches_reference():
  rng = np.random.default_rng(0)
  labels = np.stack([random_blocky(rng, (60, 90), [0, 1, 2], 9) for _ in range(4)]).astype(np.int32)
  preds = np.stack([perturb(rng, l, [0, 1, 2], 0.3, 5) for l in labels]).astype(np.int32)
  valid = np.ones(labels.shape, bool)
  inter, union = jax.jit(boundary_iou.boundary_iou_stats, static_argnums=3)(
      labels, preds, valid, 3)
  for i in range(4):
    for c in range(3):
      gb = _ref_mask_to_boundary(labels[i] == c).astype(bool)
      pb = _ref_mask_to_boundary(preds[i] == c).astype(bool)
      assert int(inter[i, c]) == (gb & pb).sum() and int(union[i, c]) == (gb | pb).sum()


def test_mba_matches_cascadepsp():
  rng = np.random.default_rng(1)
  labels = np.stack([random_blocky(rng, (200, 260), [0, 1, 2], 13) for _ in range(3)])
  preds = np.stack([perturb(rng, l, [0, 1, 2], 0.3, 4) for l in labels])
  labels, preds = labels.astype(np.int32), preds.astype(np.int32)
  assert boundary_iou.mba_radii(200, 260) == [1, 1, 1, 1, 1]
  with jax.enable_x64(True):
    mba, defined = jax.jit(boundary_iou.mba_stats)(labels, preds, labels >= 0)
  for i in range(3):
    assert bool(defined[i]) and abs(float(mba[i]) - _ref_mba(labels[i], preds[i])) < 1e-12
  big = np.kron(labels[:1], np.ones((1, 3, 3), np.int32))  # radii 1, 1, 2, 3, 4
  pbig = np.kron(preds[:1], np.ones((1, 3, 3), np.int32))
  with jax.enable_x64(True):
    mba, _ = jax.jit(boundary_iou.mba_stats)(big, pbig, big >= 0)
  assert abs(float(mba[0]) - _ref_mba(big[0], pbig[0])) < 1e-12


def test_boundary_f_hand_computed():
  gt = np.zeros((1, 12, 12), np.int32)
  gt[0, 3:9, 3:9] = 1  # 6x6 square: inner boundary of 20 pixels
  shifted = np.zeros_like(gt)
  shifted[0, 3:9, 6:12] = 1  # shifted 3 px right (beyond a 2 px tolerance on one side)
  valid = np.ones_like(gt, bool)
  with jax.enable_x64(True):
    f, counted = boundary_iou.boundary_f_stats(gt, gt, valid, 2, 2.0)
    assert np.allclose(np.asarray(f), 1.0) and np.asarray(counted).all()
    f, _ = boundary_iou.boundary_f_stats(gt, shifted, valid, 2, 2.0)
  # Class 1: prediction boundary = 2 columns (rows 3..8) + top/bottom rows of cols 6..11; the
  # right edge at column 11 touches the image border, which is not a boundary: 5 + 5 + 6 = 16 px.
  pred_b = np.asarray(boundary_iou._thin_boundary(shifted[0] == 1))
  gt_b = np.asarray(boundary_iou._thin_boundary(gt[0] == 1))
  assert gt_b.sum() == 20 and pred_b.sum() == 16
  near = lambda b: np.asarray(boundary.window_reduce(b, boundary.disk_offsets(2.0), "max", False))
  p = (pred_b & near(gt_b)).sum() / 16
  r = (gt_b & near(pred_b)).sum() / 20
  assert abs(float(f[0, 1]) - 2 * p * r / (p + r)) < 1e-12


def test_repair_hand_computed():
  t = np.array([[[1, 1, 1, 0, 0, 0]]])
  r = np.array([[[1, 1, 0, 0, 1, 0]]])   # RTm = cols 0,1; RFm = cols 2, 4
  re = np.array([[[1, 0, 1, 0, 0, 0]]])  # keeps col 0, loses col 1; repairs cols 2 and 4
  inter, union = repair.repair_stats(t, r, re, np.ones_like(t, bool))
  np.testing.assert_array_equal(np.asarray(inter)[0], [1, 1])
  np.testing.assert_array_equal(np.asarray(union)[0], [2, 1])
  scores = repair.repair_scores(np.asarray(inter)[0], np.asarray(union)[0], k=0.5)
  assert scores["iou_rtm"] == 0.5 and scores["iou_rfm"] == 1.0
  assert scores["iou_imp"] == 1.0 - 0.5 * 0.5
  assert repair.repair_category(0.75) == "partial" and repair.repair_category(-0.1) == "error"
  assert repair.repair_category(0.8) == "complete"
