"""Region metrics from one confusion matrix, with the original IDGBR value encoding.

Encoding (IDGBR `evaluation/encodings.py`, `ValueEncoder.encode`), applied to labels and predictions
alike:
  * binary mode, when num_classes == 2 and label_values is None or a subset of {0, 1, 255}: the map
    is first binarised with `value > 0`, then mapped. (Quirk kept: label_values=[0, 255] then maps
    only class 0, because 255 became 1 before the lookup; use [0, 1].)
  * label_values given: raw value label_values[i] -> class i, anything else -> unmapped.
  * label_values None: the raw value is the class if 0 <= value < num_classes, else unmapped.
A pixel enters the confusion matrix only if **both** its label and its prediction are mapped (the
original masks with `label_mask & pred_mask`). So 255 (or any value outside label_values) is ignored
on either side, except in binary mode where every value > 0 is foreground.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from idgbr_jax.metrics import boundary


def is_binary_mode(num_classes: int, label_values: Optional[Sequence[int]]) -> bool:
  """Whether the original binarises maps with `> 0` before mapping values."""
  return num_classes == 2 and (label_values is None
                               or set(int(v) for v in label_values).issubset({0, 1, 255}))


def encode(raw: jax.Array, num_classes: int, label_values: Optional[Sequence[int]] = None):
  """Raw map values -> class indices and a 'mapped' mask.

  Args:
    raw: integer maps [..., H, W].
    num_classes: number of classes K.
    label_values: raw value of each class, or None.

  Returns:
    (classes int32 [..., H, W] with -1 where unmapped, mapped bool [..., H, W]).
  """
  x = jnp.asarray(raw).astype(jnp.int32)
  if is_binary_mode(num_classes, label_values):
    x = (x > 0).astype(jnp.int32)
  if label_values is None:
    mapped = (x >= 0) & (x < num_classes)
    return jnp.where(mapped, x, -1), mapped
  classes = jnp.full(x.shape, -1, jnp.int32)
  # Later entries win on duplicate values, like the original's dict {value: index}.
  for index, value in enumerate(label_values):
    classes = jnp.where(x == int(value), index, classes)
  return classes, classes >= 0


def confusion_matrix(label: jax.Array, pred: jax.Array, valid: jax.Array,
                     num_classes: int) -> jax.Array:
  """Per-map confusion matrices [..., K, K] (rows = label, cols = prediction), int32.

  One scatter-add histogram of `label * K + pred` over valid pixels (exact integer counts; on
  CPU several times faster than a one-hot matmul with K this small).
  """
  k = num_classes
  label = jnp.asarray(label).astype(jnp.int32)
  pred = jnp.asarray(pred).astype(jnp.int32)
  ok = valid & (label >= 0) & (label < k) & (pred >= 0) & (pred < k)
  code = jnp.where(ok, label * k + pred, -1)
  return boundary.histogram(code, k * k).reshape(label.shape[:-2] + (k, k))


def metrics_from_confusion(confm) -> dict:
  """The original's `compute_metrics` on a [K, K] matrix, in float64 numpy.

  IoU / precision / recall / F1 are 0 where undefined; mIoU and mF1 average over **all** K classes
  (an absent class counts as 0); Kappa has the original's +1e-10 in the denominator.
  """
  confm = np.asarray(confm).astype(np.float64)
  num_classes = confm.shape[0]
  total = confm.sum()
  if total == 0:
    zeros = [0.0] * num_classes
    return {
        "per_class_iou": zeros, "per_class_f1": zeros, "per_class_precision": zeros,
        "per_class_recall": zeros, "miou": 0.0, "mf1": 0.0, "oa": 0.0, "kappa": 0.0,
        "fw_iou": 0.0, "support": [0] * num_classes,
    }
  inter = np.diag(confm)
  gt_sum = confm.sum(axis=1)
  pred_sum = confm.sum(axis=0)
  union = gt_sum + pred_sum - inter
  zero = np.zeros_like(inter)
  with np.errstate(divide="ignore", invalid="ignore"):
    iou = np.divide(inter, union, out=zero.copy(), where=union > 0)
    precision = np.divide(inter, pred_sum, out=zero.copy(), where=pred_sum > 0)
    recall = np.divide(inter, gt_sum, out=zero.copy(), where=gt_sum > 0)
    f1 = np.divide(2 * precision * recall, precision + recall, out=zero.copy(),
                   where=(precision + recall) > 0)
  pa = inter.sum() / total
  pe = (pred_sum * gt_sum).sum() / (total**2)
  return {
      "per_class_iou": iou.tolist(),
      "per_class_f1": f1.tolist(),
      "per_class_precision": precision.tolist(),
      "per_class_recall": recall.tolist(),
      "miou": float(np.mean(iou)),
      "mf1": float(np.mean(f1)),
      "oa": float(inter.sum() / total),
      "kappa": float((pa - pe) / (1 - pe + 1e-10)),
      "fw_iou": float(np.sum(iou * (gt_sum / total))),
      "support": [int(v) for v in gt_sum],
  }
