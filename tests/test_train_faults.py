"""Faults during training: a non-finite loss never reaches a checkpoint (config.nan_policy stop /
skip), a half-written checkpoint is ignored on resume, a full disk during a save leaves the
previous checkpoint intact and stops with a clear message. Stage I on the tiny config of
tests/test_stage1.py (its compiled step is shared through the persistent compilation cache)."""
import copy
import errno
import logging
import os
import shutil
import subprocess

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from idgbr_jax import checkpoints, cli
from idgbr_jax.commands import train as train_command
from idgbr_jax.data import pipeline, sources
from idgbr_jax.train import stage1
from test_stage1 import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  sources.get_source(tiny_config(d).data, "train")  # build once
  return d


def _config(data_dir, tmp_path, **kw):
  config = tiny_config(data_dir)
  config.summary_dir = str(tmp_path / "tensorboard")
  for k, v in kw.items():
    setattr(config, k, v)
  return config


def _run(config, workdir, capsys=None):
  """`idgbr train` as the command runs it: through the CLI's error boundary. Returns (exit
  status or the trainer's output, stderr)."""
  out = {}

  def main(_):
    out["result"] = train_command.run(copy.deepcopy(config), str(workdir))
    return 0
  status = cli.guarded(main)(["idgbr train"])
  err = capsys.readouterr().err if capsys is not None else ""
  return (status if status else out["result"]), err


def _nan_at(monkeypatch, steps):
  """Makes the batches of these train steps NaN images (the k-th `to_global` call of a run)."""
  real, calls = pipeline.to_global, {"n": 0}

  def to_global(batch, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] in steps:
      batch = {**batch, "image": np.full_like(batch["image"], np.nan)}
    return real(batch, *args, **kwargs)
  monkeypatch.setattr(pipeline, "to_global", to_global)


def _batch_ids(config, step):
  it = iter(pipeline.train_dataset(config, sources.num_classes(config.data)))
  for _ in range(step - 1):
    next(it)
  return [str(i) for i in next(it)["id"]]


def _restore(workdir, step):
  with ocp.StandardCheckpointer() as c:
    return c.restore(os.path.join(workdir, "checkpoints", str(step), "state"))


def _finite(tree):
  return all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(tree)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


def test_nan_stop_keeps_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
  """nan_policy="stop" (the default): a NaN batch at step 5 stops the run before the step-6 save;
  the message names the step and the batch's ids; step 4, the last checkpoint, is intact."""
  config = _config(data_dir, tmp_path, num_train_steps=6, checkpoint_every_steps=2,
                   log_every_steps=100)
  assert config.nan_policy == "stop"
  _nan_at(monkeypatch, {5})
  status, err = _run(config, tmp_path / "run", capsys)
  assert status == 1 and "Traceback" not in err
  assert "error: non-finite loss or gradient at step 5" in err
  ids = _batch_ids(config, 5)
  assert all(i in err for i in ids), (ids, err)
  assert "the last checkpoint (step 4)" in err
  ckpt = checkpoints.Checkpointer(str(tmp_path / "run" / "checkpoints"), create=False)
  assert ckpt.all_steps() == [2, 4]  # step 6 was never saved
  ckpt.close()
  state = _restore(str(tmp_path / "run"), 4)
  assert int(state["step"]) == 4 and _finite(state)


def test_nan_skip_leaves_the_update_out_and_stops_past_the_limit(data_dir, tmp_path, monkeypatch,
                                                                 capsys, caplog):
  """nan_policy="skip": the NaN steps' updates are left out (params and optimizer state of step
  3 are those of step 2, bit for bit), the run goes on and counts them; one more than
  nan_max_skips stops the run like "stop"."""
  config = _config(data_dir, tmp_path, num_train_steps=6, checkpoint_every_steps=1,
                   max_checkpoints_to_keep=10, log_every_steps=2, nan_policy="skip",
                   nan_max_skips=2)
  _nan_at(monkeypatch, {3, 5})
  with caplog.at_level(logging.WARNING):
    out, _ = _run(config, tmp_path / "skip", capsys)
  assert out["skipped_steps"] == [3, 5] and int(out["state"]["step"]) == 6
  assert "step 3: non-finite loss or gradient; update skipped" in caplog.text
  assert _batch_ids(config, 3)[0] in caplog.text
  s2, s3, s4 = (_restore(str(tmp_path / "skip"), s) for s in (2, 3, 4))
  assert int(s3["step"]) == 3 and all(_finite(s) for s in (s2, s3, s4))
  for key in ("params", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, s3[key], s2[key])  # step 3 left out
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(s4["params"]),
                                                      jax.tree.leaves(s3["params"])))
  assert _finite(out["state"])
  # One skip allowed: the second non-finite step (5) ends the run before its checkpoint.
  monkeypatch.undo()
  _nan_at(monkeypatch, {3, 5})
  config.nan_max_skips = 1
  status, err = _run(config, tmp_path / "limit", capsys)
  assert status == 1 and "Traceback" not in err
  assert "step 5 (2 non-finite steps (3, 5) > config.nan_max_skips=1)" in err
  ckpt = checkpoints.Checkpointer(str(tmp_path / "limit" / "checkpoints"), create=False)
  assert ckpt.all_steps() == [1, 2, 3, 4]
  ckpt.close()


def test_a_bad_nan_policy_is_an_error_before_any_work(data_dir, tmp_path, capsys):
  status, err = _run(_config(data_dir, tmp_path, nan_policy="ignore"), tmp_path / "x", capsys)
  assert status == 1 and "config.nan_policy='ignore'; allowed: stop, skip" in err
  assert not (tmp_path / "x").exists()


def test_half_written_checkpoints_are_ignored_on_resume(data_dir, tmp_path, monkeypatch,
                                                        caplog):
  """A step folder without orbax's commit_success.txt (a copy or save that stopped midway) and
  a `<step>.orbax-checkpoint-tmp-*` folder (a save killed midway) are ignored with a warning:
  the run resumes from the previous complete step and ends as the uninterrupted run does."""
  config = _config(data_dir, tmp_path, num_train_steps=6, checkpoint_every_steps=2)
  run = tmp_path / "run"
  real, calls = pipeline.to_global, {"n": 0}

  def crash_at_step_5(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt("killed")
    return real(*args, **kwargs)
  monkeypatch.setattr(pipeline, "to_global", crash_at_step_5)
  with pytest.raises(KeyboardInterrupt):
    stage1.train_and_evaluate(copy.deepcopy(config), str(run))
  monkeypatch.undo()
  ckpts = run / "checkpoints"
  assert sorted(os.listdir(ckpts)) == ["2", "4"]
  shutil.copytree(ckpts / "4", ckpts / "6")
  os.remove(ckpts / "6" / "commit_success.txt")        # looks finished to orbax on a local disk
  shutil.copytree(ckpts / "4", ckpts / "8.orbax-checkpoint-tmp-1234")
  shutil.rmtree(ckpts / "8.orbax-checkpoint-tmp-1234" / "state")
  with caplog.at_level(logging.WARNING):
    resumed = stage1.train_and_evaluate(copy.deepcopy(config), str(run))
  assert "ignoring the incomplete checkpoint" in caplog.text and "/6 " in caplog.text
  assert "ignoring the half-written checkpoint" in caplog.text and "8.orbax" in caplog.text
  assert "moved aside to 6.incomplete" in caplog.text
  assert sorted(os.listdir(ckpts)) == ["4", "6", "6.incomplete", "8.orbax-checkpoint-tmp-1234"]
  assert (ckpts / "6" / "commit_success.txt").exists()
  full = stage1.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "full"))
  for a, b in zip(jax.tree.leaves(jax.device_get(full["state"])),
                  jax.tree.leaves(jax.device_get(resumed["state"]))):
    np.testing.assert_array_equal(a, b)  # resumed from 4, not from the half-written 6


def _snapshot(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    for f in files:
      p = os.path.join(dirpath, f)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = fh.read()
  return out


def _mount_tmpfs(path, size):
  """A size-limited tmpfs at `path` (needs root and mount rights), or False."""
  os.makedirs(path, exist_ok=True)
  try:
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return proc.returncode == 0


# After the failed save, tensorstore completes writes on orbax's closed event loop ("Event loop
# is closed" from a callback); the `idgbr` command silences those (commands/_runtime.py).
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_disk_full_during_a_save_keeps_the_previous_checkpoint(data_dir, tmp_path, monkeypatch,
                                                               capsys):
  """A save that runs out of space stops the run with a message saying so; the previous
  checkpoint is byte-identical and the unfinished step is removed. A real full disk (a tmpfs
  shrunk to 1.5x what the first checkpoint takes) where mounting is allowed, else an injected
  OSError(ENOSPC) from the save."""
  mnt = tmp_path / "disk"
  real_disk = _mount_tmpfs(mnt, "64m")
  try:
    config = _config(data_dir, tmp_path, num_train_steps=2, checkpoint_every_steps=2)
    run = mnt / "run"
    stage1.train_and_evaluate(copy.deepcopy(config), str(run))
    before = _snapshot(run / "checkpoints")
    if real_disk:
      # Room for a quarter of a checkpoint beyond what is stored now (tmpfs counts whole pages
      # per file): the next save cannot fit, whatever else the run keeps on this disk.
      st = os.statvfs(mnt)
      used = (st.f_blocks - st.f_bfree) * st.f_frsize
      page = os.sysconf("SC_PAGE_SIZE")
      ckpt_bytes = sum(-(-len(b) // page) * page for b in before.values())
      subprocess.run(["mount", "-o", f"remount,size={used + ckpt_bytes // 4}", "tmpfs",
                      str(mnt)], check=True, timeout=30)
    else:
      real_save = ocp.CheckpointManager.save

      def full_disk(self, step, *args, **kwargs):
        if step == 4:
          raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(self, step, *args, **kwargs)
      monkeypatch.setattr(ocp.CheckpointManager, "save", full_disk)
    config.num_train_steps = 4
    status, err = _run(config, run, capsys)
    assert status == 1
    assert (f"error: cannot save step 4 to {run / 'checkpoints'}: No space left on device"
            in err), err
    assert "the last complete checkpoint, step 2, is intact" in err
    assert sorted(os.listdir(run / "checkpoints")) == ["2"]
    assert _snapshot(run / "checkpoints") == before
  finally:
    if real_disk:
      subprocess.run(["umount", str(mnt)], check=False, timeout=60)
  print(f"disk full simulated with {'a tmpfs' if real_disk else 'an injected OSError'}")
