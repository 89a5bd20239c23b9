"""Evaluation suite: region metrics, the original's WF edge-band metric, boundary metrics.

Public API (used by the CLI, training and other tools):
  evaluate_maps(preds, labels, num_classes, label_values=None, edge_size=3, batch_size=None,
                devices=None) -> dict
  evaluate_dirs(pred_dir, label_dir, num_classes, label_values=None, edge_size=3, progress=True)
  format_report(report) -> str
All heavy computation is JAX (jit, batched); see `evaluate.py` for precision and shape handling.
"""

from idgbr_jax.metrics.distance import distance_transform_edt
from idgbr_jax.metrics.distance import feature_transform
from idgbr_jax.metrics.evaluate import batch_statistics
from idgbr_jax.metrics.evaluate import evaluate_dirs
from idgbr_jax.metrics.evaluate import evaluate_maps
from idgbr_jax.metrics.evaluate import format_report
from idgbr_jax.metrics.evaluate import report_from_totals
from idgbr_jax.metrics.evaluate import sum_statistics
from idgbr_jax.metrics.wfmeasure import weighted_fmeasure

__all__ = [
    "batch_statistics", "distance_transform_edt", "evaluate_dirs", "evaluate_maps",
    "feature_transform", "format_report", "report_from_totals", "sum_statistics",
    "weighted_fmeasure",
]
