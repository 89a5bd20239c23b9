"""Repair analysis from the IDGBR README: IoU_RTm, IoU_RFm and IoU_imp.

For a foreground class, with M_t the ground truth, M_r the rough (coarse input) prediction and M_re
the refined one (binary masks of that class):
  M_RTm = M_t & M_r                       (truly predicted region)
  M_RFm = (M_t | M_r) - (M_t & M_r)       (falsely predicted region)
  IoU_X = |M_t & M_re & X| / |(M_t & X) | (M_re & X)|   for X in {M_RTm, M_RFm}
  IoU_imp = IoU_RFm - k * (1 - IoU_RTm)
Categories (README): complete repair IoU_imp >= 0.8, partial 0 <= IoU_imp < 0.8, error < 0.
The README does not give k; the default here is 1.0 (pass the paper's value when known).
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def repair_stats(label, rough, refined, valid, foreground: int = 1):
  """Per-image intersections / unions inside M_RTm and M_RFm, int32 [B, 2] each (RTm, RFm)."""
  t = (label == foreground) & valid
  r = (rough == foreground) & valid
  re = (refined == foreground) & valid
  inters, unions = [], []
  for region in (t & r, (t | r) & ~(t & r)):
    inters.append(jnp.sum(t & re & region, axis=(-2, -1), dtype=jnp.int32))
    unions.append(jnp.sum((t & region) | (re & region), axis=(-2, -1), dtype=jnp.int32))
  return jnp.stack(inters, -1), jnp.stack(unions, -1)


def repair_scores(inter, union, k: float = 1.0) -> dict:
  """IoU_RTm, IoU_RFm, IoU_imp from (summed or per-image) statistics; NaN where a union is 0."""
  inter = np.asarray(inter, np.float64)
  union = np.asarray(union, np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.where(union > 0, inter / np.where(union > 0, union, 1), np.nan)
  iou_rt, iou_rf = iou[..., 0], iou[..., 1]
  return {"iou_rtm": iou_rt, "iou_rfm": iou_rf, "iou_imp": iou_rf - k * (1 - iou_rt)}


def repair_category(iou_imp: float) -> str:
  """README's categories: 'complete' (>= 0.8), 'partial' (0..0.8), 'error' (< 0), 'undefined'."""
  if not np.isfinite(iou_imp):
    return "undefined"
  if iou_imp >= 0.8:
    return "complete"
  if iou_imp >= 0:
    return "partial"
  return "error"
