"""idgbr demo --workdir=DIR [--config=configs/demo.py[:runlocal]]

Builds the embedded synthetic dataset, trains a small Stage I segmenter, writes its coarse maps
for the train and test splits, and prints the evaluation table (also `DIR/report.json`).
"""
import json
import os
import time

from absl import flags
from ml_collections import config_flags

from idgbr_jax.commands import _runtime

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "demo.py")
_CONFIG = config_flags.DEFINE_config_file("config", os.path.normpath(_DEFAULT_CONFIG),
                                          "Demo config.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo", "Directory for everything the demo writes.")


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup()
  # pylint: disable=import-outside-toplevel
  from idgbr_jax import metrics
  from idgbr_jax.data import sources
  from idgbr_jax.inference import stage1 as infer
  from idgbr_jax.train import common, stage1
  config = _CONFIG.value
  workdir = common.ensure_workdir(_WORKDIR.value)
  s1 = config.stage1
  with s1.unlocked():
    if s1.data.data_dir is None:
      s1.data.data_dir = os.path.join(workdir, "tensorflow_datasets")
  t0 = time.time()
  num_classes = sources.num_classes(s1.data)
  print(f"[demo] dataset synthetic_rs/{s1.data.task}: {len(sources.get_source(s1.data, 'train'))} "
        f"train / {len(sources.get_source(s1.data, 'test'))} test at {s1.data.image_size}px "
        f"({time.time() - t0:.0f}s)", flush=True)

  t1 = time.time()
  stage1_dir = os.path.join(workdir, "stage1")
  stage1.train_and_evaluate(s1, stage1_dir)
  print(f"[demo] stage I {s1.model.backbone}/{s1.model.variant}: {s1.num_train_steps} steps "
        f"({time.time() - t1:.0f}s)", flush=True)

  t2 = time.time()
  coarse_dir = os.path.join(workdir, "coarse")
  if config.num_folds:
    infer.predict_cross_fitted(stage1_dir, coarse_dir, config.num_folds, s1)
  else:
    infer.predict_split(stage1_dir, s1.data.train_split, coarse_dir, config=s1)
  infer.predict_split(stage1_dir, s1.data.eval_split, coarse_dir, config=s1)
  print(f"[demo] coarse maps -> {coarse_dir} ({time.time() - t2:.0f}s)", flush=True)

  label_dir = os.path.join(workdir, "labels", s1.data.eval_split)
  _export_labels(s1, s1.data.eval_split, label_dir)
  coarse = metrics.evaluate_dirs(os.path.join(coarse_dir, s1.data.eval_split), label_dir,
                                 num_classes=num_classes, edge_size=config.edge_size,
                                 progress=False)
  report = {"coarse": coarse, "seconds": round(time.time() - t0, 1)}
  with open(os.path.join(workdir, "report.json"), "w") as f:
    json.dump(report, f, indent=2)
  print(metrics.format_report(coarse))
  print(f"[demo] total {time.time() - t0:.0f}s; report: {os.path.join(workdir, 'report.json')}")


def _export_labels(cfg, split, out_dir):
  """Ground-truth index PNGs of a split, so the evaluation reads files like any user's."""
  from idgbr_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from idgbr_jax.inference.stage1 import write_png  # pylint: disable=import-outside-toplevel
  ds = pipeline.eval_dataset(cfg, split, sources.num_classes(cfg.data), normalize=False)
  for i in range(len(ds)):
    example = ds[i]
    write_png(os.path.join(out_dir, f"{example['id']}.png"), example["label"])
