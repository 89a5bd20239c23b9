"""idgbr demo --workdir=DIR [--config=configs/demo.py[:runlocal]]

The whole method on the embedded synthetic dataset: Stage I -> coarse maps -> label embedding
-> autoencoder -> Stage II -> refined test maps, and a table of coarse vs refined metrics (also
`DIR/report.json`), and pictures of a few test images (`DIR/panels/`: image | ground truth |
coarse | refined | repaired/damaged). Every stage resumes / skips when its output already exists
in DIR.
"""
import copy
import dataclasses
import importlib.util
import os
import time

import numpy as np
from absl import flags
from ml_collections import config_flags

from idgbr_jax.commands import _runtime

# Panels: the test images whose maps refinement changed most, and a few random others.
NUM_CHANGED_PANELS = 4
NUM_RANDOM_PANELS = 2
# What the stage bar (progress with an ETA, on stderr) counts: dataset, stage I, coarse maps,
# label embedding, autoencoder, stage II, refinement, evaluation and panels.
NUM_STAGES = 8


def _default_config() -> str:
  """configs/demo.py wherever it is installed (as the package `idgbr_configs`; a wheel puts it
  in site-packages, not beside idgbr_jax/)."""
  try:
    spec = importlib.util.find_spec("idgbr_configs.demo")
  except ModuleNotFoundError:
    spec = None
  if spec is not None and spec.origin:
    return spec.origin
  return os.path.normpath(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                       "demo.py"))


_CONFIG = config_flags.DEFINE_config_file("config", _default_config(), "Demo config.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", "workdir/demo",
                               "Directory for everything the demo writes.")


def _say(t0, msg):
  print(f"[demo {time.time() - t0:5.0f}s] {msg}", flush=True)


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup()
  from idgbr_jax.train import common  # pylint: disable=import-outside-toplevel
  workdir = common.ensure_workdir(_WORKDIR.value)
  t0 = time.time()
  run(_CONFIG.value, DemoDirs.under(workdir), say=lambda msg: _say(t0, msg))


@dataclasses.dataclass(frozen=True)
class DemoDirs:
  """Where each stage reads and writes. `under(workdir)`: the demo's layout; `bench/claim.py`
  shares the dataset and the autoencoder between runs and the coarse maps between variants."""
  data: str
  stage1: str
  coarse: str
  label_embed: str
  autoencoder: str
  stage2: str
  refined: str       # <refined>/<eval split>/<id>.png: the refined maps
  autoencoded: str   # the control: the coarse maps through the autoencoder only (same layout)
  labels: str        # the eval split's ground truth as index PNGs (same layout)
  panels: str
  report: str        # report.json

  @classmethod
  def under(cls, workdir: str, **overrides) -> "DemoDirs":
    from idgbr_jax import paths  # pylint: disable=import-outside-toplevel
    j = lambda *p: paths.join(workdir, *p)  # noqa: E731
    dirs = dict(data=j("tensorflow_datasets"), stage1=j("stage1"), coarse=j("coarse"),
                label_embed=j("label_embed"), autoencoder=j("autoencoder"), stage2=j("stage2"),
                refined=j("refined"), autoencoded=j("autoencoded"), labels=j("labels"),
                panels=j("panels"), report=j("report.json"))
    return cls(**{**dirs, **overrides})


def run(config, dirs: DemoDirs, *, say=print, panels: bool = True) -> dict:
  """The whole method: returns the report (also written to `dirs.report`). Every stage skips
  or resumes when its output already exists."""
  # pylint: disable=import-outside-toplevel
  import jax
  from idgbr_jax import metrics, paths, progress
  from idgbr_jax.data import sources
  from idgbr_jax.inference import refine as refine_lib
  from idgbr_jax.inference import stage1 as infer
  from idgbr_jax.train import pretrain, stage1, stage2

  t0 = time.time()
  config = copy.deepcopy(config)
  s1, s2 = config.stage1, config.stage2
  data_dir = s1.data.data_dir or dirs.data
  with s1.unlocked(), s2.unlocked():
    s1.data.data_dir = s2.data.data_dir = data_dir
    s2.data.coarse_dir = dirs.coarse
    s2.init.label_embed = dirs.label_embed
    s2.init.autoencoder = dirs.autoencoder
  stages = progress.Progress(NUM_STAGES, "demo", unit="stage")
  num_classes = sources.num_classes(s1.data)
  n_train = len(sources.get_source(s1.data, s1.data.train_split))
  n_test = len(sources.get_source(s1.data, s1.data.eval_split))
  say(f"dataset synthetic_rs/{s1.data.task}: {n_train} train / {n_test} test, "
      f"{s1.data.image_size}px, {num_classes} classes")
  stages.update()

  stage1.train_and_evaluate(s1, dirs.stage1)
  say(f"stage I {s1.model.backbone}/{s1.model.variant} trained ({s1.num_train_steps} steps)")
  stages.update()
  if config.num_folds:
    stage1.predict_cross_fitted(dirs.stage1, dirs.coarse, config.num_folds, s1)
  else:
    infer.predict_split(dirs.stage1, s1.data.train_split, dirs.coarse, config=s1)
  infer.predict_split(dirs.stage1, s1.data.eval_split, dirs.coarse, config=s1)
  say(f"coarse maps -> {dirs.coarse} (train split cross-fitted over {config.num_folds} folds)"
      if config.num_folds else f"coarse maps -> {dirs.coarse}")
  stages.update()

  if not paths.exists(paths.join(dirs.label_embed, "meta.json")):
    le_cfg = config.label_embed
    with le_cfg.unlocked():
      le_cfg.num_classes = num_classes
    le = pretrain.train_label_embedding(le_cfg, dirs.label_embed)
    say(f"label embedding trained (noisy-decode accuracy {le['accuracy']:.3f})")
  stages.update()
  if not paths.exists(paths.join(dirs.autoencoder, "meta.json")):
    ae = pretrain.train_autoencoder(config.autoencoder, s2, dirs.label_embed, dirs.autoencoder)
    say(f"autoencoder trained (L1 {ae['l1']:.3f}, label round-trip pixel accuracy "
        f"{ae['label_accuracy']:.3f})")
  stages.update()

  out = stage2.train_and_evaluate(s2, dirs.stage2)
  say(f"stage II trained ({s2.num_train_steps} steps)")
  stages.update()

  split = s2.data.eval_split
  refined_dir = paths.join(dirs.refined, split)
  autoencoded_dir = paths.join(dirs.autoencoded, split)
  label_dir = paths.join(dirs.labels, split)
  ref, mesh = out["refiner"], out["mesh"]
  trainable, frozen = out["state"]["params"], out["frozen"]
  shardings = (jax.tree.map(lambda x: x.sharding, trainable),
               jax.tree.map(lambda x: x.sharding, frozen))
  maps = {}  # id -> (index, refined, coarse, label): the panels' input
  for out_dir, only_ae in ((refined_dir, False), (autoencoded_dir, True)):
    fn = refine_lib.make_refine_fn(ref, s2, mesh, *shardings, autoencode_only=only_ae)
    results = refine_lib.refine_dataset(fn, trainable, frozen,
                                        refine_lib.eval_split_dataset(s2), s2, mesh)
    for index, (example_id, refined, coarse, label) in enumerate(progress.track(
        results, "autoencode (control)" if only_ae else "refine", total=n_test, unit="map")):
      infer.write_png(paths.join(out_dir, f"{example_id}.png"), refined)
      if not only_ae:
        maps[example_id] = (index, refined, coarse, label)
  stages.update()
  d = s2.diffusion
  start = ("pure noise" if d.strength >= 1 or d.get("start", "coarse") == "noise"
           else "the noised coarse latent")
  say(f"refined test maps -> {refined_dir} ({d.num_inference_steps} DDIM steps at strength "
      f"{d.strength} from {start}, guidance {d.guidance_scale}); control without diffusion "
      f"(coarse maps through the autoencoder only) -> {autoencoded_dir}")

  _export_labels(s1, split, label_dir)
  report = {}
  coarse_split_dir = paths.join(dirs.coarse, split)
  for name, pred_dir in (("coarse", coarse_split_dir), ("refined", refined_dir),
                         ("coarse_autoencoded", autoencoded_dir)):
    # Refined maps and the control also get the repair analysis against the coarse maps.
    report[name] = metrics.evaluate_dirs(
        pred_dir, label_dir, num_classes=num_classes, edge_size=config.edge_size,
        progress=False, coarse_dir=None if name == "coarse" else coarse_split_dir)
  report["settings"] = demo_settings(s1, s2)
  report["seconds"] = round(time.time() - t0, 1)
  if jax.process_index() == 0:
    paths.write_json(dirs.report, report)
  print(comparison_table(report))
  if panels and jax.process_index() == 0:
    n = _write_panels(s1, split, maps, dirs.panels, num_classes)
    say(f"{n} panels (image | ground truth | coarse | refined | repaired green / damaged red) "
        f"of the test images refinement changed most and of random ones -> {dirs.panels}")
  stages.update()
  stages.close()
  say(f"report -> {dirs.report}")
  return report


def demo_settings(s1, s2) -> dict:
  """What produced the refined maps, for a reader of report.json: the refinement's settings
  (strength 1 with start "noise" is the original's pure-noise start; < 1 from "coarse" is ours,
  img2img) and the training lengths."""
  d = s2.diffusion
  return {"strength": float(d.strength), "start": str(d.get("start", "coarse")),
          "num_inference_steps": int(d.num_inference_steps),
          "guidance_scale": float(d.guidance_scale), "cond_dropout": float(d.cond_dropout),
          "train_max_timestep": int(d.get("train_max_timestep", 0)),
          "stage1_steps": int(s1.num_train_steps), "stage2_steps": int(s2.num_train_steps)}


def comparison_table(report) -> str:
  """coarse vs refined, and the no-diffusion control (coarse through the autoencoder) if any."""
  rows = [("mIoU", "miou"), ("mF1", "mf1"), ("OA", "oa"), ("WF min (boundary band)", "wf_min"),
          ("WF mean", "wf_mean"), ("Boundary IoU", "biou"), ("Boundary F", "bf")]
  control = report.get("coarse_autoencoded")
  head = f"| {'metric':<24} | {'coarse':>8} | {'refined':>8} | {'delta':>8} |"
  rule = f"|{'-' * 26}|{'-' * 10}|{'-' * 10}|{'-' * 10}|"
  if control is not None:
    head += f" {'AE only':>8} |"
    rule += f"{'-' * 10}|"
  lines = ["", head, rule]
  for title, key in rows:
    c, r = report["coarse"].get(key), report["refined"].get(key)
    if c is None or r is None:
      continue
    line = f"| {title:<24} | {c:8.4f} | {r:8.4f} | {r - c:+8.4f} |"
    if control is not None and control.get(key) is not None:
      line += f" {control[key]:8.4f} |"
    lines.append(line)
  if control is not None:
    lines.append("AE only: the coarse maps through the label embedding and autoencoder, no "
                 "diffusion (the control).")
  rep = report["refined"].get("repair")
  if rep:
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    images = ", ".join(f"{k} {v}" for k, v in rep["images"].items())
    lines.append(f"Repair analysis (class {rep['class']}, k={rep['k']:g}): IoU_RTm "
                 f"{fmt(rep['iou_rtm'])}, IoU_RFm {fmt(rep['iou_rfm'])}, IoU_imp "
                 f"{fmt(rep['iou_imp'])}; images: {images}.")
  return "\n".join(lines)


def _write_panels(cfg, split, maps, out_dir, num_classes) -> int:
  """Panels (image | ground truth | coarse | refined | repaired/damaged) of the images
  `visualize.select_panels` picks, as `<out_dir>/<rank>_<tag>_<id>.png`. `maps`: id -> (index
  in the split, refined, coarse, label)."""
  from idgbr_jax import paths, visualize  # pylint: disable=import-outside-toplevel
  from idgbr_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  ds = pipeline.eval_dataset(cfg, split, num_classes, normalize=False)  # images as stored
  picks = visualize.select_panels({k: int(np.sum(m[1] != m[2])) for k, m in maps.items()},
                                  NUM_CHANGED_PANELS, NUM_RANDOM_PANELS)
  for rank, (example_id, tag) in enumerate(picks):
    index, refined, coarse, label = maps[example_id]
    example = ds[index]
    assert example["id"] == example_id, (example["id"], example_id)  # same split, same order
    visualize.write_panel(paths.join(out_dir, f"{rank}_{tag}_{example_id}.png"),
                          example["image"], label, coarse, refined, num_classes,
                          ignore_label=cfg.data.ignore_index,
                          scale=visualize.display_scale(label.shape[1]))
  return len(picks)


def _export_labels(cfg, split, out_dir):
  """Ground-truth index PNGs of a split, so the evaluation reads files like any user's."""
  from idgbr_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  from idgbr_jax import paths  # pylint: disable=import-outside-toplevel
  from idgbr_jax.inference.stage1 import write_png  # pylint: disable=import-outside-toplevel
  ds = pipeline.eval_dataset(cfg, split, sources.num_classes(cfg.data), normalize=False)
  for i in range(len(ds)):
    example = ds[i]
    write_png(paths.join(out_dir, f"{example['id']}.png"), example["label"])
