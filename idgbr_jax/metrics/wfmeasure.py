"""Margolin's weighted F-measure and the original IDGBR "WF (edge band)" metric, in JAX.

Definition (Margolin, Zelnik-Manor & Tal, CVPR 2014; IDGBR `evaluation/wfmeasure.py`):
  E = |D - G|; E^t = E copied from the nearest G pixel (exact EDT, scipy's tie-breaking);
  E^A = 7x7 Gaussian (sigma 5, zero padding) of E^t; E-hat = min(E, E^A) on G, E elsewhere;
  B = 1 on G, 2 - exp(ln(0.5) / 5 * dist) elsewhere; E^w = E-hat * B;
  TP^w = |G| - sum_G E^w, FP^w = sum_~G E^w, R = 1 - mean_G E^w, P = TP^w / (eps + TP^w + FP^w);
  Q = 2 R P / (eps + R + P)   (beta = 1).

Precision: the arithmetic follows the float dtype JAX gives (float64 under `jax.enable_x64`,
which `evaluate_maps` uses and which matches the numpy original to ~1e-12; float32 otherwise,
good to ~1e-5).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax.metrics import boundary
from idgbr_jax.metrics import distance
from idgbr_jax.metrics import fusion

_EPS = float(np.spacing(1))  # MATLAB eps, as in the original.
_SIGMA = 5.0
_RADIUS = 3  # scipy: int(truncate * sigma + 0.5) with truncate = 3 / sigma.


def gaussian_kernel_1d() -> np.ndarray:
  """scipy.ndimage's 7-tap kernel for sigma=5, truncate=3/5 (float64)."""
  x = np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64)
  phi = np.exp(-0.5 / (_SIGMA * _SIGMA) * x * x)
  return phi / phi.sum()


def gaussian_blur(x: jax.Array) -> jax.Array:
  """gaussian_filter(x, 5, truncate=0.6, mode='constant', cval=0) over the last two axes.

  Separable like scipy (axis -2 first, then -1); with zero padding this equals the 2-D
  MATLAB-style fspecial('gaussian', 7, 5) filter. Two 1-D convolutions (the library
  convolution is ~4x faster on CPU than summing seven shifted copies); HIGHEST precision so
  float32 runs on TPU do not drop to bfloat16 passes.
  """
  x = jnp.asarray(x)
  weights = jnp.asarray(gaussian_kernel_1d(), x.dtype)
  shape = x.shape
  y = x.reshape((-1, 1) + shape[-2:])  # [N, C=1, H, W]
  highest = jax.lax.Precision.HIGHEST
  y = jax.lax.conv_general_dilated(y, weights.reshape(1, 1, -1, 1), (1, 1),
                                   [(_RADIUS, _RADIUS), (0, 0)], precision=highest)
  y = jax.lax.conv_general_dilated(y, weights.reshape(1, 1, 1, -1), (1, 1),
                                   [(0, 0), (_RADIUS, _RADIUS)], precision=highest)
  return y.reshape(shape)


# The 7x7 blur at a ground-truth pixel reads E^t up to 3 pixels away in each axis, and such a pixel
# is at most 3 * sqrt(2) from the ground truth: its nearest seed must be exact within d^2 <= 18.
_BLUR_REACH_SQ = 2 * _RADIUS * _RADIUS
# Squared distances with a tabulated weight B (128 px; farther ones take the exp formula).
_WEIGHT_TABLE_SIZE = 128 * 128 + 1


def _fmeasure(n_gt, ew_gt, fpw):
  tpw = n_gt - ew_gt
  recall = 1.0 - ew_gt / n_gt
  precision = tpw / (_EPS + tpw + fpw)
  return 2.0 * recall * precision / (_EPS + recall + precision)


def _distance_weight(d2, dtype):
  """B = 2 - exp(ln(0.5) / 5 * d) off the ground truth (1 on it, where d = 0)."""
  dist = jnp.sqrt(jnp.maximum(d2, 0).astype(dtype))
  return 2.0 - jnp.exp(np.log(1 - 0.5) / 5 * dist)


def _binary_blur(bits: jax.Array, dtype) -> jax.Array:
  """`gaussian_blur` of a 0/1 map, bit for bit scipy's (its symmetric correlate1d order).

  Each 1-D pass is w0 * x0 + sum_j w_j * (x_-j + x_j): for 0/1 input the vertical pair sums are
  exact small integers, so only four multiply-adds per pass run in floating point. The input is
  zero-padded once, up front, and both passes work in padded coordinates: padding a computed
  float map lets XLA on CPU fuse its producer into the pad, several times slower.
  """
  w = gaussian_kernel_1d()
  height, width = bits.shape[-2:]
  lead = [(0, 0)] * (bits.ndim - 2)
  r = _RADIUS
  b = jnp.pad(bits.astype(jnp.int8), lead + [(r, r), (r, r)])

  def rows(dy):
    return b[..., r + dy:r + dy + height, :]

  v = w[r] * rows(0).astype(dtype)
  for j in range(r, 0, -1):  # outermost pair first, as scipy's loop
    v = v + w[r + j] * (rows(-j) + rows(j)).astype(dtype)

  # Computed once: XLA on CPU would otherwise redo the vertical pass for each horizontal tap.
  v = fusion.materialize(v)

  def cols(dx):
    return v[..., r + dx:r + dx + width]

  h = w[r] * cols(0)
  for j in range(r, 0, -1):
    h = h + w[r + j] * (cols(-j) + cols(j))
  return h


def weighted_fmeasure(pred: jax.Array, gt: jax.Array, window: int = 8) -> jax.Array:
  """Weighted F-measure (beta = 1) of soft maps against binary ground truth.

  Args:
    pred: float [..., H, W] in [0, 1], or bool (a binary map: the same numbers through a
      cheaper route, see `_binary_sums`).
    gt: bool [..., H, W].
    window: speed only, for binary maps: `distance.nearest_seed_bit`'s fast-path radius (0 when
      false positives are expected far from the ground truth).

  Returns:
    Q [...]. A map whose ground truth is empty gives NaN (mean over an empty set, as the
    original would); callers decide how to treat it (the WF metric never scores it).
  """
  gt = jnp.asarray(gt, bool)
  dtype = jnp.result_type(float)
  g = gt.astype(dtype)
  pred = jnp.asarray(pred)
  axes = (-2, -1)
  # Counted in integers: exact, and no float copy of the mask.
  n_gt = jnp.sum(gt, axis=axes, dtype=jnp.int32)
  if pred.dtype == bool:
    return _binary_fmeasure(pred, gt, n_gt, window)
  n_gt = n_gt.astype(dtype)
  err = jnp.abs(pred.astype(dtype) - g)
  d2, rows, cols = distance.feature_transform(gt)
  height, width = gt.shape[-2:]
  flat = err.reshape(err.shape[:-2] + (height * width,))
  index = (jnp.maximum(rows, 0) * width + jnp.maximum(cols, 0)).reshape(flat.shape)
  # Indices are in the map by construction: skip the gather's bounds handling.
  err_t = jnp.take_along_axis(flat, index, axis=-1, mode="promise_in_bounds")
  err_a = gaussian_blur(err_t.reshape(gt.shape))
  min_err = jnp.where(gt & (err_a < err), err_a, err)
  ew = min_err * jnp.where(gt, 1.0, _distance_weight(d2, dtype))
  ew_gt = jnp.sum(jnp.where(gt, ew, 0.0), axis=axes)
  fpw = jnp.sum(jnp.where(gt, 0.0, ew), axis=axes)
  return _fmeasure(n_gt, ew_gt, fpw)


def _binary_fmeasure(pred, gt, n_gt, window):
  """`weighted_fmeasure` of a binary prediction, given the int count of ground-truth pixels."""
  dtype = jnp.result_type(float)
  return _fmeasure(n_gt.astype(dtype), *_binary_sums(pred, gt, dtype, window, n_gt > 0))


def _binary_sums(pred, gt, dtype, window, any_gt=None):
  """(sum of E^w over G, sum of E^w off G) for a binary prediction.

  With E in {0, 1}: on G, E-hat = min(E, E^A) with weight 1; off G, E^w = B where E = 1 (a false
  positive) and 0 elsewhere. So the nearest seed matters only within reach of the blur (its E
  bit travels with the distance transform, no gather), and the distance only at false
  positives: the transform stops when those are settled, not at the map's farthest pixel.
  """
  err = pred != gt
  false_pos = err & ~gt
  if any_gt is not None:
    any_gt = jnp.asarray(any_gt).reshape(gt.shape[:-2] + (1, 1))
  d2, err_t = distance.nearest_seed_bit(gt, err, false_pos, _BLUR_REACH_SQ, window, any_gt)
  err_a = _binary_blur(err_t, dtype)
  axes = (-2, -1)
  # On G, E-hat = min(E, E^A) is 0 where E is 0: only the false negatives add.
  ew_gt = jnp.sum(jnp.where(gt & err, jnp.minimum(1.0, err_a), 0.0), axis=axes)
  # B at the false positives: read from a table of every squared distance up to
  # _WEIGHT_TABLE_SIZE (numpy's exp, as the original), a gather ~3x cheaper than exp on CPU;
  # the exp formula runs instead only for a batch holding a farther false positive.
  size = min(_WEIGHT_TABLE_SIZE, distance.squared_distance_upper_bound(*gt.shape[-2:]) + 1)
  table = jnp.asarray(2.0 - np.exp(np.log(0.5) / 5 * np.sqrt(np.arange(size, dtype=np.float64))),
                      dtype)
  far = jnp.any(false_pos & (d2 >= size))
  weight = jax.lax.cond(
      far, lambda d: _distance_weight(d, dtype),
      lambda d: jnp.take(table, d, mode="clip"), d2)
  fpw = jnp.sum(jnp.where(false_pos, weight, 0.0), axis=axes)
  return ew_gt, fpw


def band_wf_scores(pred_raw: jax.Array, label_raw: jax.Array, edge_size: int = 3):
  """Per-image WF of the edge band (class 1) and of its complement (class 0).

  The original loops `for i in np.unique(GT_band)` and scores `pred_band == i` against
  `GT_band == i`; a class absent from the ground-truth band map is not scored (a class present
  only in the prediction therefore never counts).

  Args:
    pred_raw, label_raw: integer maps [B, H, W] with file values.
    edge_size: dilation size of the band.

  Returns:
    scores float [B, 2] (index = class: 0 non-band, 1 band; 0 where not present) and
    present bool [B, 2].
  """
  label_band = boundary.edge_band(label_raw, edge_size)
  pred_band = boundary.edge_band(pred_raw, edge_size)
  # Both WF classes read both bands many times: compute each once (see `fusion`).
  label_band, pred_band = fusion.materialize((label_band, pred_band))
  # The classes are complements: one count gives both ground-truth sizes.
  height, width = label_band.shape[-2:]
  n_band = jnp.sum(label_band, axis=(-2, -1), dtype=jnp.int32)
  scores, present = [], []
  # One call per class, not one stacked call: the distance transform runs until the farthest
  # false positive of its batch, a few pixels for the non-band class (inside the thin band: the
  # windowed fast path settles it) and often tens for the band (the capped or full transform
  # then runs in a fallback branch).
  for cls_gt, cls_pred, n_gt in ((~label_band, ~pred_band, height * width - n_band),
                                 (label_band, pred_band, n_band)):
    has = n_gt > 0
    q = _binary_fmeasure(cls_pred, cls_gt, n_gt, 8)
    scores.append(jnp.where(has, q, 0.0))
    present.append(has)
  return jnp.stack(scores, axis=-1), jnp.stack(present, axis=-1)


def aggregate_wf(score_sums, counts) -> dict:
  """The original's aggregation: per-class mean over images, drop classes at 0, min and mean.

  Args:
    score_sums: per-class sums of per-image scores (class 0 non-band, 1 band).
    counts: per-class number of images whose ground truth contains the class.

  Returns:
    dict with `wf_class_ids`, `wf_per_class`, `wf_min`, `wf_mean` (plain Python numbers).
  """
  score_sums = np.asarray(score_sums, np.float64)
  counts = np.asarray(counts, np.int64)
  class_ids = [c for c in range(len(counts)) if counts[c] > 0]
  per_class = [float(score_sums[c] / counts[c]) for c in class_ids]
  valid = [s for s in per_class if s > 0]
  return {
      "wf_class_ids": class_ids,
      "wf_per_class": per_class,
      "wf_min": float(np.min(valid)) if valid else 0.0,
      "wf_mean": float(np.mean(valid)) if valid else 0.0,
  }
