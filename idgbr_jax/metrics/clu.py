"""clu metrics for in-training evaluation that give exactly the CLI's numbers.

`make_segmentation_metric(...)` returns a `clu.metrics.Metric` class whose state is the summed
sufficient statistics of `evaluate.batch_statistics` (confusion matrix, WF band score sums and
counts, boundary IoU / F sums, mBA sums). `from_model_output` runs inside jit; `merge` adds; across
devices use `Collection.gather_from_model_output` (all_gather + `reduce`, which merges); across hosts
all-gather the state the same way (or `jax.experimental.multihost_utils.process_allgather` and sum).
`compute()` runs on the host and returns the same dict as `evaluate_maps`, minus the file-level
entries.

Dtypes follow `jax_enable_x64`: with it, floats are float64 and counts int64, and `compute()` equals
the CLI to ~1e-12. Without it, floats are float32 (WF to ~1e-5) and int32 counts overflow after
2^31 pixels per confusion cell, so periodically `compute()` or keep x64 for long evaluations.
"""

from __future__ import annotations

from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np
from clu import metrics as clu_metrics

from idgbr_jax.metrics import evaluate


def make_segmentation_metric(num_classes: int, label_values: Optional[Sequence[int]] = None,
                             edge_size: int = 3, bf_tolerance: float = evaluate.BF_TOLERANCE,
                             dilation_ratio: float = evaluate.DILATION_RATIO,
                             pred_key: str = "pred_map", label_key: str = "label_map",
                             mask_key: str = "image_mask"):
  """Builds a clu Metric class for one encoding.

  Args:
    num_classes, label_values, edge_size, bf_tolerance, dilation_ratio: as in `evaluate_maps`.
    pred_key, label_key: names of the model outputs holding raw maps [B, H, W] (integers).
    mask_key: optional bool [B] output; False marks padding images that must not count.

  Returns:
    A `clu.metrics.Metric` subclass (a flax struct dataclass).
  """
  label_values = None if label_values is None else tuple(int(v) for v in label_values)
  config = dict(num_classes=num_classes, label_values=label_values, edge_size=int(edge_size),
                bf_tolerance=float(bf_tolerance), dilation_ratio=float(dilation_ratio))

  @flax.struct.dataclass
  class SegmentationMetric(clu_metrics.Metric):
    """Summed per-image segmentation statistics; compute() gives the evaluation report."""
    confusion: jnp.ndarray
    wf_score: jnp.ndarray
    wf_present: jnp.ndarray
    biou_inter: jnp.ndarray
    biou_union: jnp.ndarray
    bf_score: jnp.ndarray
    bf_counted: jnp.ndarray
    mba: jnp.ndarray
    mba_defined: jnp.ndarray
    unmapped_label: jnp.ndarray
    unmapped_pred: jnp.ndarray
    num_images: jnp.ndarray

    @classmethod
    def empty(cls):
      zeros = evaluate.empty_totals(num_classes)
      f = jnp.result_type(float)
      i = jnp.result_type(int)
      return cls(**{k: jnp.asarray(v, f if v.dtype.kind == "f" else i)
                    for k, v in zeros.items()})

    @classmethod
    def from_model_output(cls, **outputs):
      pred = outputs[pred_key]
      label = outputs[label_key]
      mask = outputs.get(mask_key)
      stats = evaluate.batch_statistics(pred, label, **config)
      summed = evaluate.sum_statistics(stats, mask)
      f = jnp.result_type(float)
      i = jnp.result_type(int)
      return cls(**{k: v.astype(f if jnp.issubdtype(v.dtype, jnp.floating) else i)
                    for k, v in summed.items()})

    def merge(self, other):
      return jax.tree_util.tree_map(jnp.add, self, other)

    def compute(self):
      totals = {k: np.asarray(jax.device_get(getattr(self, k)))
                for k in self.__dataclass_fields__}
      return evaluate.report_from_totals(totals, num_classes, label_values, config["edge_size"],
                                         config["bf_tolerance"])

  SegmentationMetric.config = config
  return SegmentationMetric
