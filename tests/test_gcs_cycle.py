"""A Stage I and a Stage II train -> resume -> predict/refine -> evaluate cycle entirely on gs://
paths (a local GCS emulator, tests/gcs_emulator.py): dataset, workdirs and checkpoints, coarse
maps, images, refined maps, labels and the evaluation report all live in the bucket.

One exception, the emulator's and not the project's: TensorBoard event files are written through
TensorFlow's GCS client, whose endpoint cannot be pointed at an emulator, so `summary_dir` is a
local folder here (on real GCS the default, the workdir, works)."""
import copy
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import gcs_emulator

if not gcs_emulator.emulator_available():
  pytest.skip("needs the GCS emulator: pip install gcp-storage-emulator gcsfs (the test extra)",
              allow_module_level=True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.slow  # two trainers, resumed, and two commands: about a minute


@pytest.fixture(scope="module")
def gcs():
  with gcs_emulator.gcs_emulator() as emu:
    yield emu


def _cli(gcs, *args):
  env = {**os.environ, **gcs.env, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  res = subprocess.run([sys.executable, "-m", "idgbr_jax.cli", *args], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-4000:]
  return res


def _export_split(config, split, image_dir, label_dir):
  from idgbr_jax import paths  # pylint: disable=import-outside-toplevel
  from idgbr_jax.data import pipeline, sources  # pylint: disable=import-outside-toplevel
  ds = pipeline.eval_dataset(config, split, sources.num_classes(config.data), normalize=False)
  for i in range(len(ds)):
    ex = ds[i]
    paths.write_png(f"{image_dir}/{ex['id']}.png", np.asarray(ex["image"], np.uint8))
    paths.write_png(f"{label_dir}/{ex['id']}.png", ex["label"])
  return len(ds)


def test_stage1_and_stage2_on_gcs(gcs, tmp_path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  from test_stage1 import tiny_config  # pylint: disable=import-outside-toplevel
  from test_stage2 import small_config  # pylint: disable=import-outside-toplevel
  from idgbr_jax import checkpoints, paths  # pylint: disable=import-outside-toplevel
  from idgbr_jax.inference import stage1 as infer  # pylint: disable=import-outside-toplevel
  from idgbr_jax.train import stage1, stage2  # pylint: disable=import-outside-toplevel

  data, s1_dir, s2_dir = gcs.url("tfds"), gcs.url("runs/s1"), gcs.url("runs/s2")
  coarse = gcs.url("coarse")

  # Stage I: 2 steps, then resumed to 4 from the checkpoint in the bucket.
  cfg1 = tiny_config(data)
  cfg1.summary_dir = str(tmp_path / "tb1")
  cfg1.checkpoint_every_steps = 2
  cfg1.num_train_steps = 2
  stage1.train_and_evaluate(copy.deepcopy(cfg1), s1_dir)
  cfg1.num_train_steps = 4
  out1 = stage1.train_and_evaluate(copy.deepcopy(cfg1), s1_dir)
  assert int(out1["state"]["step"]) == 4
  ckpt = checkpoints.Checkpointer(f"{s1_dir}/checkpoints", create=False)
  assert ckpt.all_steps() == [2, 4]
  ckpt.close()
  assert not os.path.exists(s1_dir.replace("gs://", "")) and not os.path.exists("gs:")
  # Coarse maps for both splits, written into the bucket from the bucket's checkpoint.
  for split in ("train", "test"):
    assert infer.predict_split(s1_dir, split, coarse, config=cfg1) == (16 if split == "train"
                                                                       else 8)
  assert len(paths.listdir(f"{coarse}/test")) == 8

  # Stage II on the same dataset and the bucket's coarse maps; resumed once.
  cfg2 = small_config()
  cfg2.data = copy.deepcopy(cfg1.data)
  cfg2.data.coarse_dir = coarse
  cfg2.summary_dir = str(tmp_path / "tb2")
  cfg2.checkpoint_every_steps = 1
  cfg2.eval_every_steps = -1
  cfg2.num_train_steps = 1
  stage2.train_and_evaluate(copy.deepcopy(cfg2), s2_dir)
  cfg2.num_train_steps = 2
  out2 = stage2.train_and_evaluate(copy.deepcopy(cfg2), s2_dir)
  assert int(out2["state"]["step"]) == 2

  # The commands, in fresh processes, on bucket paths only.
  images, labels, refined = gcs.url("images"), gcs.url("labels"), gcs.url("refined")
  n = _export_split(cfg2, "test", images, labels)
  res = _cli(gcs, "refine", f"--checkpoint={s2_dir}", f"--images={images}",
             f"--coarse={coarse}/test", f"--out={refined}", "--num_steps=2")
  assert f"refined {n} maps" in res.stdout
  assert sorted(paths.listdir(refined)) == sorted(paths.listdir(labels))
  report_url = gcs.url("reports/refined.json")
  _cli(gcs, "evaluate", f"--pred_dir={refined}", f"--label_dir={labels}", "--num_classes=6",
       f"--coarse_dir={coarse}/test", f"--output={report_url}", "--noprogress")
  report = json.loads(epath.Path(report_url).read_text())
  assert report["num_images"] == n and report["repair"]["class"] == 1
  assert 0.0 <= report["wf_min"] <= 1.0 and report["missing_predictions"] == 0
