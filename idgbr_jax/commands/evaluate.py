"""`idgbr evaluate`: evaluates a directory of segmentation maps against label maps.

  idgbr evaluate --pred_dir=P --label_dir=L --num_classes=K [--label_values=1,2,3,4,5]
      [--edge_size=3] [--output=report.json] [--coarse_dir=C [--repair_class=1] [--repair_k=1]]

Files are matched by stem (PNG or TIF); any segmenter's class-index maps work. Prints a table and
writes the JSON report (see `idgbr_jax.metrics.evaluate.report_from_totals` for the keys).
With --coarse_dir (the maps that P refines, same stems) the report adds the original README's
repair analysis: IoU_RTm, IoU_RFm, IoU_imp of one class, and images per repair category.
"""

import sys

from absl import app
from absl import flags

flags.DEFINE_string("pred_dir", None, "Directory of predicted class-index maps (PNG/TIF).")
flags.DEFINE_string("label_dir", None, "Directory of label maps (PNG/TIF), matched by stem.")
flags.DEFINE_integer("num_classes", None, "Number of classes.")
flags.DEFINE_list("label_values", None,
                  "Raw map value of each class, e.g. 1,2,3,4,5 (Potsdam); default: value = class.")
flags.DEFINE_integer("edge_size", 3, "Dilation size of the WF edge band (original: 3).")
flags.DEFINE_string("output", "report.json", "Where to write the JSON report ('' to skip).")
flags.DEFINE_integer("eval_batch_size", 0, "Maps per jitted evaluation call (0: one per CPU "
                     "device, 8 per accelerator; rounded up to a multiple of the devices).")
flags.DEFINE_float("bf_tolerance", 2.0, "Boundary F-score tolerance in pixels.")
flags.DEFINE_bool("strict", False, "Fail if a map holds values outside --label_values.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_string("coarse_dir", None,
                    "Coarse maps refined into --pred_dir (same stems): adds the repair analysis.")
flags.DEFINE_integer("repair_class", 1, "Class index of the repair analysis.")
flags.DEFINE_float("repair_k", 1.0, "k of IoU_imp = IoU_RFm - k (1 - IoU_RTm).")

FLAGS = flags.FLAGS


def main(argv):
  """Runs the evaluation described by the flags; returns a non-zero status on bad input."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("pred_dir", "label_dir", "num_classes"):
    if getattr(FLAGS, name) is None:
      raise app.UsageError(f"--{name} is required")
  # Imported here so `--help` stays fast.
  from idgbr_jax import metrics  # pylint: disable=g-import-not-at-top
  try:
    label_values = ([int(v) for v in FLAGS.label_values]
                    if FLAGS.label_values else None)
  except ValueError as e:
    raise app.UsageError(f"--label_values must be integers: {FLAGS.label_values}") from e
  if FLAGS.output:  # a report that cannot be written is an error before the evaluation
    import os  # pylint: disable=g-import-not-at-top
    from idgbr_jax import paths  # pylint: disable=g-import-not-at-top
    parent = os.path.dirname(FLAGS.output)
    if parent:
      paths.ensure_writable_dir(parent, f"the folder of --output={FLAGS.output}")
    if paths.isdir(FLAGS.output):
      raise ValueError(f"--output={FLAGS.output} is a folder; expected a file name for the "
                       "JSON report")
  try:
    report = metrics.evaluate_dirs(
        FLAGS.pred_dir, FLAGS.label_dir, FLAGS.num_classes, label_values=label_values,
        edge_size=FLAGS.edge_size, progress=FLAGS.progress,
        batch_size=FLAGS.eval_batch_size or None,
        bf_tolerance=FLAGS.bf_tolerance, strict=FLAGS.strict, coarse_dir=FLAGS.coarse_dir,
        repair_class=FLAGS.repair_class, repair_k=FLAGS.repair_k)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  print(metrics.format_report(report))
  if FLAGS.output:
    from idgbr_jax import paths  # pylint: disable=import-outside-toplevel
    paths.write_json(FLAGS.output, report)
    print(f"wrote {FLAGS.output}")
  return 0


if __name__ == "__main__":
  from idgbr_jax import cli  # pylint: disable=g-import-not-at-top
  app.run(cli.guarded(main), flags_parser=cli.parse_flags)
