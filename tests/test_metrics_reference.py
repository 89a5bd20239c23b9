"""numpy / scipy / OpenCV reference of the original IDGBR evaluator (test oracle and bench baseline).

A straightforward re-statement of IDGBR's `evaluation/{encodings,metrics,edge_generator,boundary,
wfmeasure}.py` definitions (not a copy), used to check `idgbr_jax.metrics` and as the benchmark
baseline. The tests at the bottom check the oracle itself against pysodmetrics.
"""

import numpy as np
import pytest

cv2 = pytest.importorskip("cv2")
from scipy import ndimage  # noqa: E402


def ref_encode(raw, num_classes, label_values):
  raw = np.asarray(raw)
  if num_classes == 2 and (label_values is None or set(label_values) <= {0, 1, 255}):
    raw = (raw > 0).astype(np.uint8)
  raw = raw.astype(np.int64)
  if label_values is None:
    return raw, (raw >= 0) & (raw < num_classes)
  enc = np.full(raw.shape, -1, np.int64)
  for i, v in enumerate(label_values):
    enc[raw == v] = i
  return enc, enc >= 0


def ref_region(preds, labels, num_classes, label_values):
  confm = np.zeros((num_classes, num_classes), np.int64)
  for p, l in zip(preds, labels):
    le, lm = ref_encode(l, num_classes, label_values)
    pe, pm = ref_encode(p, num_classes, label_values)
    m = lm & pm
    confm += np.bincount(num_classes * le[m] + pe[m],
                         minlength=num_classes**2).reshape(num_classes, num_classes)
  c = confm.astype(np.float64)
  total = c.sum()
  inter, gt, pr = np.diag(c), c.sum(1), c.sum(0)
  union = gt + pr - inter
  iou = np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)
  prec = np.divide(inter, pr, out=np.zeros_like(inter), where=pr > 0)
  rec = np.divide(inter, gt, out=np.zeros_like(inter), where=gt > 0)
  f1 = np.divide(2 * prec * rec, prec + rec, out=np.zeros_like(inter), where=prec + rec > 0)
  pa = inter.sum() / total
  pe = (pr * gt).sum() / total**2
  return {"confusion": confm, "per_class_iou": iou, "per_class_f1": f1, "miou": iou.mean(),
          "mf1": f1.mean(), "oa": pa, "kappa": (pa - pe) / (1 - pe + 1e-10),
          "fw_iou": float(np.sum(iou * gt / total))}


def ref_band(raw, edge_size=3):
  """edge_generator.extract_edge_map + boundary._binarize('lt255')."""
  u8 = np.uint8(raw)
  gx = cv2.Sobel(u8, cv2.CV_64F, 1, 0, ksize=3)
  gy = cv2.Sobel(u8, cv2.CV_64F, 0, 1, ksize=3)
  edge = np.uint8(np.sqrt(gx**2 + gy**2) > 0)
  edge = cv2.dilate(edge, np.ones((edge_size, edge_size), np.uint8), iterations=1)
  out = np.copy(raw)
  out[edge == 0] = 255
  return (out < 255).astype(np.uint8)


def ref_wfm(candidate, gt):
  """Margolin weighted F (beta=1) with scipy's EDT, as in the original `weighted_f_beta_score`."""
  candidate = candidate.astype(np.float64)
  gt_mask = gt.astype(bool)
  not_gt = ~gt_mask
  g = gt_mask.astype(np.float64)
  err = np.abs(candidate - g)
  dist, idx = ndimage.distance_transform_edt(not_gt, return_indices=True)
  et = np.array(err)
  et[not_gt] = err[idx[0, not_gt], idx[1, not_gt]]
  ea = ndimage.gaussian_filter(et, sigma=5.0, truncate=3 / 5.0, mode="constant", cval=0.0)
  min_e = np.minimum(err, ea, where=gt_mask, out=np.array(err))
  b = np.ones(gt.shape)
  b[not_gt] = 2 - np.exp(np.log(1 - 0.5) / 5 * dist[not_gt])
  ew = min_e * b
  eps = np.spacing(1)
  tpw = np.sum(g) - np.sum(ew[gt_mask])
  fpw = np.sum(ew[not_gt])
  r = 1 - np.mean(ew[gt_mask])
  p = tpw / (eps + tpw + fpw)
  return 2 * r * p / (eps + r + p)


def ref_wf(preds, labels, edge_size=3):
  """compute_wfm_for_edge_size: per-class mean over images, drop zeros, min and mean."""
  scores, counts = {}, {}
  for p, l in zip(preds, labels):
    gt = ref_band(l, edge_size)
    fm = ref_band(p, edge_size)
    for c in np.unique(gt):
      s = ref_wfm(fm == c, gt == c)
      scores[int(c)] = scores.get(int(c), 0.0) + float(s)
      counts[int(c)] = counts.get(int(c), 0) + 1
  ids = sorted(scores)
  per = [scores[c] / counts[c] for c in ids]
  valid = [s for s in per if s > 0]
  return {"wf_class_ids": ids, "wf_per_class": per,
          "wf_min": float(np.min(valid)) if valid else 0.0,
          "wf_mean": float(np.mean(valid)) if valid else 0.0}


def random_blocky(rng, shape, values, block=8):
  """Piecewise-constant random label map (realistic boundaries) with the given values."""
  h, w = shape
  small = rng.choice(np.asarray(values), size=(-(-h // block), -(-w // block)))
  full = np.kron(small, np.ones((block, block), small.dtype))[:h, :w]
  return np.ascontiguousarray(full).astype(np.uint8)


def perturb(rng, label, values, p=0.1, block=4):
  """A prediction: the label with a fraction p of random blocks replaced by random values."""
  noise = random_blocky(rng, label.shape, values, block)
  mask = random_blocky(rng, label.shape, np.arange(100), block) < 100 * p
  return np.where(mask, noise, label).astype(np.uint8)


# ---- tests of the oracle itself -----------------------------------------------------------------


@pytest.mark.torch
def test_reference_wfm_matches_pysodmetrics():
  sod = pytest.importorskip("py_sod_metrics")
  rng = np.random.default_rng(0)
  wfm = sod.WeightedFmeasure()
  for _ in range(10):
    gt = random_blocky(rng, (40, 50), [0, 1], 5).astype(bool)
    pred = rng.random((40, 50))
    assert abs(ref_wfm(pred, gt) - wfm.cal_wfm(pred, gt)) < 1e-12


def test_reference_band_marks_both_sides():
  lab = np.zeros((6, 12), np.uint8)
  lab[:, 6:] = 1
  band = ref_band(lab, 1)
  assert band[:, 5:7].all() and band.sum() == 12
  assert ref_band(lab, 3)[:, 4:8].all() and ref_band(lab, 3).sum() == 24
