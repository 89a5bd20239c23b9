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


def boundary_dilation(height: int, width: int, dilation_ratio: float = 0.02) -> int:
  """boundary-iou-api: max(1, round(ratio * image diagonal)) (Python's round)."""
  diag = np.sqrt(height**2 + width**2)
  return max(1, int(round(dilation_ratio * diag)))


def mask_to_boundary(mask: jax.Array, dilation: int) -> jax.Array:
  """Inner boundary band: mask minus its erosion by `dilation` 3x3 steps, zero outside the map."""
  mask = jnp.asarray(mask, bool)
  return mask & ~boundary.erode_square(mask, dilation, border_value=False)


def boundary_iou_stats(label, pred, valid, num_classes: int, dilation_ratio: float = 0.02):
  """Per-image, per-class boundary intersections and unions, int32 [B, K] each."""
  height, width = label.shape[-2:]
  d = boundary_dilation(height, width, dilation_ratio)
  inters, unions = [], []
  for c in range(num_classes):
    gb = mask_to_boundary(label == c, d) & valid
    pb = mask_to_boundary(pred == c, d) & valid
    inters.append(jnp.sum(gb & pb, axis=(-2, -1), dtype=jnp.int32))
    unions.append(jnp.sum(gb | pb, axis=(-2, -1), dtype=jnp.int32))
  return jnp.stack(inters, -1), jnp.stack(unions, -1)


def _thin_boundary(mask: jax.Array) -> jax.Array:
  """1-px inner boundary; outside the map counts as inside so the border is not a boundary."""
  return mask & ~boundary.erode_square(mask, 1, border_value=True)


def boundary_f_stats(label, pred, valid, num_classes: int, tolerance: float = 2.0):
  """Per-image, per-class boundary F-score and whether the image counts, [B, K] each."""
  del valid  # Boundaries come from the class maps; unmapped pixels belong to no class.
  dtype = jnp.result_type(float)
  disk = boundary.disk_offsets(tolerance)
  scores, counted = [], []
  for c in range(num_classes):
    g = label == c
    p = pred == c
    gb = _thin_boundary(g)
    pb = _thin_boundary(p)
    g_near = boundary.window_reduce(gb, disk, "max", False)
    p_near = boundary.window_reduce(pb, disk, "max", False)
    n_g = jnp.sum(gb, axis=(-2, -1)).astype(dtype)
    n_p = jnp.sum(pb, axis=(-2, -1)).astype(dtype)
    hit_p = jnp.sum(pb & g_near, axis=(-2, -1)).astype(dtype)
    hit_g = jnp.sum(gb & p_near, axis=(-2, -1)).astype(dtype)
    prec = jnp.where(n_p > 0, hit_p / jnp.maximum(n_p, 1), 0.0)
    rec = jnp.where(n_g > 0, hit_g / jnp.maximum(n_g, 1), 0.0)
    f = jnp.where(prec + rec > 0, 2 * prec * rec / jnp.maximum(prec + rec, 1e-30), 0.0)
    f = jnp.where((n_p == 0) & (n_g == 0), 1.0, f)
    scores.append(f)
    counted.append(jnp.any(g, axis=(-2, -1)) | jnp.any(p, axis=(-2, -1)))
  return jnp.stack(scores, -1), jnp.stack(counted, -1)


def mba_radii(height: int, width: int) -> list[int]:
  """CascadePSP's five radii for an image of this size."""
  max_radius = (width + height) / 300
  return [1 + int((max_radius - 1) / 5 * i) for i in range(5)]


def mba_stats(label, pred, valid):
  """Per-image mean boundary accuracy and whether it is defined, [B] each."""
  del valid
  height, width = label.shape[-2:]
  dtype = jnp.result_type(float)
  mapped = label >= 0
  accs = []
  first_band = None
  for r in mba_radii(height, width):
    offsets = boundary.ellipse_offsets(r)
    # Union over classes of the gradient of (label == c) = the window holds a mapped label and
    # is not uniform; pixels outside the map do not take part (OpenCV's default morphology border).
    big = jnp.iinfo(jnp.int32).max
    hi = boundary.window_reduce(label, offsets, "max", -big)
    lo = boundary.window_reduce(label, offsets, "min", big)
    band = (hi != lo) & (hi >= 0) & mapped
    n_band = jnp.sum(band, axis=(-2, -1)).astype(dtype)
    good = jnp.sum(band & (pred == label), axis=(-2, -1)).astype(dtype)
    accs.append(good / jnp.maximum(n_band, 1))
    if first_band is None:
      first_band = n_band
  defined = first_band > 0
  return jnp.where(defined, sum(accs) / len(accs), 0.0), defined
