"""Boundary IoU, boundary F-score and mBA on encoded class maps (batched, jit-able).

Inputs are class maps [B, H, W] from `region.encode` (-1 = unmapped) and the joint 'valid' mask
(label and prediction both mapped). Each function returns per-image sufficient statistics so they
can be summed over a split, across devices and hosts.

* Boundary IoU (Cheng et al., CVPR 2021; boundary-iou-api `mask_to_boundary`): per class c, the inner
  band of width d = max(1, round(0.02 * diagonal)) of the binary mask, with the image border counted
  as background (zero padding). BIoU_c = |Gb & Pb| / |Gb | Pb| with intersections and unions summed
  over the split and over valid pixels; the mean runs over classes with a non-empty union.
* Boundary F-score (Csurka et al. 2013, as in openseg / DAVIS): per class and image, 1-px inner
  boundaries (image border not a boundary), precision / recall with a pixel tolerance
  (Euclidean disk), F = 2PR / (P + R). Both boundaries empty -> F = 1 (openseg); the image counts for
  class c only if c occurs in its label or prediction. Per-class mean over images, then mean over
  classes that occurred.
* mBA (CascadePSP `compute_boundary_acc_multi_class`): 5 radii r_i = 1 + int((r_max - 1) / 5 * i),
  r_max = (H + W) / 300; the band is the union over classes of the morphological gradient of
  (label == c) with OpenCV's elliptic kernel (border ignored), accuracy = share of band pixels with
  a mapped label where prediction == label; mean over radii, then over images. An image whose band
  is empty (CascadePSP divides by zero) is skipped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax.metrics import boundary
from idgbr_jax.metrics import fusion


# Largest joint histogram (bins per image) built in one scatter; beyond it, one per side.
_MAX_JOINT_BINS = 1 << 16


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
  """boundary-iou-api: max(1, round(ratio * image diagonal)) (Python's round)."""
  diag = np.sqrt(height**2 + width**2)
  return max(1, int(round(dilation_ratio * diag)))


def mask_to_boundary(mask: jax.Array, dilation: int) -> jax.Array:
  """Inner boundary band: mask minus its erosion by `dilation` 3x3 steps, zero outside the map."""
  mask = jnp.asarray(mask, bool)
  return mask & ~boundary.erode_square(mask, dilation, border_value=False)


def _compact(classes: jax.Array, num_classes: int) -> jax.Array:
  """Class maps with every value outside [0, K) set to -1 (it belongs to no class either way),
  in the narrowest integer type: the window filters are memory-bound, so int8 maps make them
  several times cheaper."""
  classes = jnp.asarray(classes)
  dtype = jnp.int8 if num_classes <= 120 else jnp.int32
  in_range = (classes >= 0) & (classes < num_classes)
  return jnp.where(in_range, classes, -1).astype(dtype)


def boundary_iou_stats(label, pred, valid, num_classes: int, dilation_ratio: float = 0.02):
  """Per-image, per-class boundary intersections and unions, int32 [B, K] each.

  All classes in one pass: class c's band is `(map == c) & ~uniform`, where `uniform` marks
  pixels whose (2d+1)^2 window lies in the map and holds one value (= the erosion of every
  class mask at once), and the counts come from one histogram of (label, pred, in label band,
  in pred band) over valid pixels.
  """
  k = num_classes
  code = boundary_iou_codes(label, pred, valid, k, dilation_ratio)
  hist = boundary.histogram(code, 4 * k * k)
  return boundary_iou_from_counts(hist.reshape(label.shape[:-2] + (k, k, 2, 2)))


def boundary_iou_codes(label, pred, valid, num_classes: int, dilation_ratio: float = 0.02):
  """Per-pixel code ((label * K + pred) * 2 + in label band) * 2 + in pred band, in [0, 4K^2),
  or -1 where the pixel is not valid or either map is unmapped (int32 [B, H, W]).

  Its histogram gives boundary IoU (`boundary_iou_from_counts`) and, summed over the band bits,
  the confusion matrix of the same pixels.
  """
  height, width = label.shape[-2:]
  k = num_classes
  d = boundary_dilation(height, width, dilation_ratio)
  label8 = _compact(label, k)
  pred8 = _compact(pred, k)
  in_gb = ~boundary.uniform_square(label8, d)
  in_pb = ~boundary.uniform_square(pred8, d)
  lab = label8.astype(jnp.int32)
  prd = pred8.astype(jnp.int32)
  code = ((lab * k + prd) * 2 + in_gb.astype(jnp.int32)) * 2 + in_pb.astype(jnp.int32)
  return jnp.where(valid & (lab >= 0) & (prd >= 0), code, -1)


def boundary_iou_from_counts(hist):
  """(intersections, unions) [B, K] from counts [B, K, K, 2, 2] of `boundary_iou_codes`."""
  k = hist.shape[-3]
  classes = jnp.arange(k)
  inter = hist[..., classes, classes, 1, 1]
  in_label_band = jnp.sum(hist[..., 1, :], axis=(-2, -1))
  in_pred_band = jnp.sum(hist[..., :, 1], axis=(-3, -1))
  return inter, in_label_band + in_pred_band - inter


def _thin_boundary(mask: jax.Array) -> jax.Array:
  """1-px inner boundary; outside the map counts as inside so the border is not a boundary."""
  return mask & ~boundary.erode_square(mask, 1, border_value=True)


def _near_boundary(own, other, other_edge, offsets):
  """True where a boundary pixel of the other map with the pixel's own class lies within the
  tolerance disk (given as offsets); outside the map nothing is near."""
  height, width = own.shape[-2:]
  r = max(max(abs(dy), abs(dx)) for dy, dx in offsets)
  # The other map's class where it is a boundary pixel, -2 elsewhere, -3 outside the map: a
  # match with own == c >= 0 is exactly "a boundary pixel of class c at this offset".
  other_b = jnp.where(other_edge, other, jnp.asarray(-2, other.dtype))
  padded = fusion.materialize(
      jnp.pad(other_b, [(0, 0)] * (own.ndim - 2) + [(r, r), (r, r)], constant_values=-3))
  near = None
  for dy, dx in offsets:
    hit = padded[..., r + dy:r + dy + height, r + dx:r + dx + width] == own
    near = hit if near is None else near | hit
  return near


def _side_codes(own, own_edge, other, other_edge, offsets):
  """Per-pixel code ((own + 1) * 2 + on own boundary) * 2 + near, in [0, 4(K + 1)): `near` is
  a boundary pixel of `other` with the pixel's class within the tolerance disk."""
  near = _near_boundary(own, other, other_edge, offsets)
  own32 = own.astype(jnp.int32)
  return ((own32 + 1) * 2 + own_edge.astype(jnp.int32)) * 2 + near.astype(jnp.int32)


def _side_from_hist(hist):
  """(present, on boundary, on boundary and near) per class from counts [B, K+1, 2, 2] over
  (class + 1, on boundary, near)."""
  hist = hist[..., 1:, :, :]
  present = jnp.sum(hist, axis=(-2, -1)) > 0
  on_edge = hist[..., 1, 0] + hist[..., 1, 1]
  return present, on_edge, hist[..., 1, 1]


def _bf_from_counts(any_g, n_g, hit_g, any_p, n_p, hit_p):
  """Boundary F per class from integer counts (the float arithmetic of both code paths)."""
  dtype = jnp.result_type(float)
  n_g, n_p = n_g.astype(dtype), n_p.astype(dtype)
  hit_g, hit_p = hit_g.astype(dtype), hit_p.astype(dtype)
  prec = jnp.where(n_p > 0, hit_p / jnp.maximum(n_p, 1), 0.0)
  rec = jnp.where(n_g > 0, hit_g / jnp.maximum(n_g, 1), 0.0)
  f = jnp.where(prec + rec > 0, 2 * prec * rec / jnp.maximum(prec + rec, 1e-30), 0.0)
  f = jnp.where((n_p == 0) & (n_g == 0), 1.0, f)
  return f, any_g | any_p


def boundary_f_stats(label, pred, valid, num_classes: int, tolerance: float = 2.0):
  """Per-image, per-class boundary F-score and whether the image counts, [B, K] each.

  All classes in one pass: the 1-px boundary of class c is `(map == c) & differs`, where
  `differs` marks pixels with an in-map 8-neighbour of another value, and "within the tolerance
  of a class-c boundary pixel of the other map" is tested against the other map's class, so no
  per-class masks are built. Both sides' counts come from one histogram.
  """
  side = 4 * (num_classes + 1)
  label_code, pred_code = boundary_f_codes(label, pred, valid, num_classes, tolerance)
  if side * side <= _MAX_JOINT_BINS:
    hist = boundary.histogram(label_code * side + pred_code, side * side)
    hist = hist.reshape(hist.shape[:-1] + (side, side))
    label_hist, pred_hist = jnp.sum(hist, axis=-1), jnp.sum(hist, axis=-2)
  else:
    label_hist = boundary.histogram(label_code, side)
    pred_hist = boundary.histogram(pred_code, side)
  return boundary_f_from_counts(label_hist, pred_hist, num_classes)


def boundary_f_codes(label, pred, valid, num_classes: int, tolerance: float = 2.0):
  """Per-pixel codes of the label side and of the prediction side (see `_side_codes`), each in
  [0, 4 (K + 1)), int32 [B, H, W]."""
  del valid  # Boundaries come from the class maps; unmapped pixels belong to no class.
  disk = boundary.disk_offsets(tolerance)
  label8 = _compact(label, num_classes)
  pred8 = _compact(pred, num_classes)
  # Each boundary map has several readers: computed once (see `fusion`).
  gb, pb = fusion.materialize((boundary.differs_from_neighbour(label8),
                               boundary.differs_from_neighbour(pred8)))
  return (_side_codes(label8, gb, pred8, pb, disk), _side_codes(pred8, pb, label8, gb, disk))


def boundary_f_from_counts(label_hist, pred_hist, num_classes: int):
  """(F, counted) [B, K] from the counts [B, 4 (K + 1)] of both sides' `boundary_f_codes`."""
  shape = label_hist.shape[:-1] + (num_classes + 1, 2, 2)
  any_g, n_g, hit_g = _side_from_hist(label_hist.reshape(shape))
  any_p, n_p, hit_p = _side_from_hist(pred_hist.reshape(shape))
  return _bf_from_counts(any_g, n_g, hit_g, any_p, n_p, hit_p)


def mba_radii(height: int, width: int) -> list[int]:
  """CascadePSP's five radii for an image of this size."""
  max_radius = (width + height) / 300
  return [1 + int((max_radius - 1) / 5 * i) for i in range(5)]


def mba_stats(label, pred, valid, num_classes: int | None = None):
  """Per-image mean boundary accuracy and whether it is defined, [B] each.

  Args:
    label, pred: class maps [B, H, W] (-1 = unmapped).
    valid: unused (the band and the accuracy use the label's own mapping).
    num_classes: if given, values outside [0, K) count as unmapped and the window filters run on
      int8 maps (several times cheaper); if None, any value >= 0 is a class.
  """
  del valid
  height, width = label.shape[-2:]
  if num_classes is not None:
    label = _compact(label, num_classes)
    pred = _compact(pred, num_classes)
  else:
    label = jnp.asarray(label).astype(jnp.int32)
    pred = jnp.asarray(pred).astype(jnp.int32)
  hist = boundary.histogram(_mba_code(label, pred), mba_bins(height, width))
  return mba_from_counts(hist, height, width)


def mba_bins(height: int, width: int) -> int:
  """Number of distinct `mba_codes` for an image of this size: 2^(distinct radii + 1)."""
  return 2 ** (len(set(mba_radii(height, width))) + 1)


def mba_codes(label, pred, num_classes: int):
  """Per-pixel code (sum_u in band u << u) * 2 + (pred == label) over the distinct CascadePSP
  radii u, in [0, 2^(U+1)), int32 [B, H, W]; its histogram gives mBA (`mba_from_counts`)."""
  return _mba_code(_compact(label, num_classes), _compact(pred, num_classes))


def _mba_code(label, pred):
  height, width = label.shape[-2:]
  unique = sorted(set(mba_radii(height, width)))
  code = (pred == label).astype(jnp.int32)
  for u, band in enumerate(_mba_bands(label, unique)):
    code = code + band.astype(jnp.int32) * (2 << u)
  return code


def mba_from_counts(hist, height: int, width: int):
  """(mBA, defined) [B] from counts [B, 2^(U+1)] of `mba_codes`."""
  radii = mba_radii(height, width)
  unique = sorted(set(radii))
  codes = np.arange(hist.shape[-1])
  n_band, good = [], []
  for u in range(len(unique)):
    in_band = (codes >> (u + 1)) & 1 == 1
    n_band.append(jnp.sum(hist[..., in_band], axis=-1))
    good.append(jnp.sum(hist[..., in_band & (codes & 1 == 1)], axis=-1))
  return _mba_from_counts(jnp.stack(n_band, -1), jnp.stack(good, -1), radii)


def _mba_bands(label, radii):
  """CascadePSP's band for each radius (bool [B, H, W] each)."""
  mapped = label >= 0
  bands = []
  for r in radii:
    offsets = boundary.ellipse_offsets(r)
    # Union over classes of the gradient of (label == c) = the window holds a mapped label and
    # is not uniform; pixels outside the map do not take part (OpenCV's default morphology border).
    big = jnp.iinfo(label.dtype).max
    hi = boundary.window_reduce(label, offsets, "max", -big)
    lo = boundary.window_reduce(label, offsets, "min", big)
    bands.append((hi != lo) & (hi >= 0) & mapped)
  return bands


def _mba_from_counts(n_band, good, radii):
  """Mean boundary accuracy from band / correct counts [B, U] of the distinct radii."""
  dtype = jnp.result_type(float)
  unique = sorted(set(radii))
  n_band = n_band.astype(dtype)
  good = good.astype(dtype)
  accs = [good[..., unique.index(r)] / jnp.maximum(n_band[..., unique.index(r)], 1)
          for r in radii]
  defined = n_band[..., unique.index(radii[0])] > 0
  return jnp.where(defined, sum(accs) / len(accs), 0.0), defined

