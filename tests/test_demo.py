"""`idgbr demo` end to end at its smoke-test size (`configs/demo.py:runlocal`): every stage runs,
the report holds the evaluation suite's keys for coarse, refined and the no-diffusion control,
and its numbers are those of the maps it wrote."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from idgbr_jax import metrics, visualize

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _read_dir(path):
  return {os.path.splitext(f)[0]: np.asarray(Image.open(os.path.join(path, f)))
          for f in sorted(os.listdir(path))}


@pytest.mark.slow
def test_demo_runlocal_writes_a_consistent_report(tmp_path):
  # Skipping XLA's optimisation passes halves compile time, which is all of a smoke-size run.
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
  env.pop("XLA_FLAGS", None)  # one device, as a user's run
  res = subprocess.run(
      [sys.executable, "-m", "idgbr_jax.cli", "demo", f"--workdir={tmp_path}",
       f"--config={os.path.join(REPO, 'configs', 'demo.py')}:runlocal"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == 0, res.stderr[-4000:]
  assert "| WF min (boundary band)" in res.stdout and "AE only" in res.stdout
  with open(tmp_path / "report.json") as f:
    report = json.load(f)
  keys = {"miou", "mf1", "oa", "kappa", "fw_iou", "per_class_iou", "per_class_f1", "wf_min",
          "wf_mean", "biou", "bf", "missing_predictions"}
  labels = _read_dir(tmp_path / "labels" / "test")
  assert len(labels) == 8  # runlocal: 8 test images
  for name, folder in (("coarse", "coarse"), ("refined", "refined"),
                       ("coarse_autoencoded", "autoencoded")):
    assert keys <= set(report[name]), (name, keys - set(report[name]))
    assert report[name]["missing_predictions"] == 0
    maps = _read_dir(tmp_path / folder / "test")
    assert sorted(maps) == sorted(labels)
    assert all(m.shape == (32, 32) and m.max() <= 1 for m in maps.values())  # binary_roads
    # The report's numbers are the evaluation suite's on the maps the demo wrote.
    again = metrics.evaluate_maps([maps[k] for k in sorted(maps)],
                                  [labels[k] for k in sorted(maps)], num_classes=2)
    for key in ("miou", "wf_min", "wf_mean", "biou"):
      np.testing.assert_allclose(report[name][key], again[key], rtol=1e-9, atol=1e-12)
  # The refined report carries the repair analysis against the coarse maps.
  coarse, refined = (_read_dir(tmp_path / d / "test") for d in ("coarse", "refined"))
  stems = sorted(labels)
  again = metrics.evaluate_maps([refined[k] for k in stems], [labels[k] for k in stems], 2,
                                coarse=[coarse[k] for k in stems])
  assert report["refined"]["repair"] == again["repair"] and "Repair analysis" in res.stdout
  assert sum(report["refined"]["repair"]["images"].values()) == 8
  assert report["seconds"] > 0
  # What produced the numbers: the runlocal demo config's refinement and training lengths.
  from idgbr_configs import demo  # pylint: disable=import-outside-toplevel
  cfg = demo.get_config("runlocal")
  d = cfg.stage2.diffusion
  assert report["settings"] == {
      "strength": d.strength, "start": d.start, "num_inference_steps": d.num_inference_steps,
      "guidance_scale": d.guidance_scale, "cond_dropout": d.cond_dropout,
      "train_max_timestep": d.train_max_timestep, "stage1_steps": cfg.stage1.num_train_steps,
      "stage2_steps": cfg.stage2.num_train_steps}
  # Panels: the 4 test images refinement changed most, then 2 random ones, 5 columns each.
  panels = sorted(os.listdir(tmp_path / "panels"))
  assert len(panels) == 6 and f"-> {tmp_path / 'panels'}" in res.stdout
  changed = {k: int(np.sum(refined[k] != coarse[k])) for k in stems}
  assert panels[:4] == [f"{i}_most_changed_{k}.png" for i, (k, _) in
                        enumerate(visualize.select_panels(changed, 4, 2)[:4])]
  assert all("_random_" in p for p in panels[4:])
  with Image.open(tmp_path / "panels" / panels[0]) as im:
    assert im.size == (5 * 128 + 4 * 2, 128 + 14)  # 32 px tiles zoomed x4 for display
  assert "demo" in res.stderr and "stage" in res.stderr  # the stage bar (progress with ETA)

