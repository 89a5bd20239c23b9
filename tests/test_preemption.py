"""Preemption and crashes, for real, in subprocesses: SIGTERM mid-run saves at the next step
boundary and exits 0 with where to resume; SIGKILL at a random step loses only the steps since
the last checkpoint. Resuming either way ends bit-identical to an uninterrupted run (same
machine, same devices, same program: XLA on CPU is deterministic, so exact equality holds)."""
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from idgbr_jax import checkpoints

pytestmark = pytest.mark.slow  # trainers in subprocesses, interrupted and resumed: minutes

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)


def _drive(*args, expect_rc=0):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  res = subprocess.run([sys.executable, os.path.join(HERE, "train_driver.py"), *args], cwd=REPO,
                       env=env, capture_output=True, text=True, timeout=900)
  assert res.returncode == expect_rc, (res.returncode, res.stdout[-2000:], res.stderr[-4000:])
  return res


def _latest(workdir):
  ckpt = checkpoints.Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
  try:
    return ckpt.latest_step()
  finally:
    ckpt.close()


def _assert_same_final(a, b):
  with np.load(os.path.join(a, "final.npz")) as fa, np.load(os.path.join(b, "final.npz")) as fb:
    assert sorted(fa.files) == sorted(fb.files)
    for k in fa.files:
      np.testing.assert_array_equal(fa[k], fb[k], err_msg=k)


def _assert_interrupted_runs_match(stage, tmp_path, data_args, steps):
  full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
  _drive(stage, full, *data_args, f"--steps={steps}")

  # SIGTERM while step 4 loads: step 4 runs, is saved (checkpoints are every 3 steps), exit 0.
  res = _drive(stage, broken, *data_args, f"--steps={steps}", "--signal=TERM", "--at=4")
  assert "preempted: saved step 4" in res.stdout and "run the same command again" in res.stdout
  assert _latest(broken) == 4 and not os.path.exists(os.path.join(broken, "final.npz"))

  # SIGKILL at a random later step: the process dies without saving; the steps since the last
  # periodic checkpoint are lost and redone.
  kill_at = random.Random(f"{stage}-{steps}").randint(6, steps - 1)
  _drive(stage, broken, *data_args, f"--steps={steps}", "--signal=KILL", f"--at={kill_at}",
         expect_rc=-9)
  # Saves are asynchronous: a checkpoint whose save the kill interrupted is not committed and
  # is ignored, so the last one is any of the periodic ones before the kill.
  assert _latest(broken) in {s for s in (4, 6, 9) if s < kill_at}

  _drive(stage, broken, *data_args, f"--steps={steps}")
  assert _latest(broken) == steps
  _assert_same_final(full, broken)


def test_stage1_sigterm_and_kill_resume_bit_identical(tmp_path):
  _assert_interrupted_runs_match("stage1", tmp_path, (str(tmp_path / "tfds"),), steps=10)


def test_stage2_sigterm_and_kill_resume_bit_identical(tmp_path):
  from test_stage2 import _write_split, small_config  # pylint: disable=import-outside-toplevel
  config = small_config()
  config.data.data_dir = str(tmp_path / "tfds")
  coarse = str(tmp_path / "coarse")
  _write_split(config, "train", coarse, lambda l: np.roll(l, 1, axis=0))
  _assert_interrupted_runs_match("stage2", tmp_path, (config.data.data_dir, coarse), steps=8)
