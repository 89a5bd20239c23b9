"""Runs one tiny Stage I / Stage II training through `idgbr train`'s code path in a fresh process
and can interrupt it for real: the preemption tests (`test_preemption.py`) launch it.

  python tests/train_driver.py STAGE WORKDIR DATA_DIR [COARSE_DIR] [--steps N]
      [--signal TERM|KILL --at STEP]

`--signal` sends that signal to this process while the batch of global step STEP loads (SIGTERM
is what a preemptible VM gets; SIGKILL is a crash). A finished run writes WORKDIR/final.npz,
its params and optimizer state, for bit-for-bit comparison.
"""
import argparse
import os
import signal
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (8 CPU devices, compile cache: the test process's settings)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from idgbr_jax import checkpoints  # noqa: E402
from idgbr_jax.commands import train as train_command  # noqa: E402
from idgbr_jax.data import pipeline  # noqa: E402


def config_for(stage: str, data_dir: str, coarse_dir: str | None, steps: int):
  if stage == "stage1":
    from test_stage1 import tiny_config  # pylint: disable=import-outside-toplevel
    config = tiny_config(data_dir, data=4, fsdp=2)
  else:
    from test_stage2 import small_config  # pylint: disable=import-outside-toplevel
    config = small_config(data=4, fsdp=2)
    config.data.data_dir = data_dir
    config.data.coarse_dir = coarse_dir
    config.eval_every_steps = -1
  config.num_train_steps = steps
  config.checkpoint_every_steps = 3
  config.log_every_steps = 1
  return config


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("stage", choices=("stage1", "stage2"))
  parser.add_argument("workdir")
  parser.add_argument("data_dir")
  parser.add_argument("coarse_dir", nargs="?")
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--signal", choices=("TERM", "KILL"))
  parser.add_argument("--at", type=int, default=0)
  args = parser.parse_args()
  config = config_for(args.stage, args.data_dir, args.coarse_dir, args.steps)

  if args.signal:
    ckpt_dir = os.path.join(args.workdir, "checkpoints")
    start = 0
    if os.path.isdir(ckpt_dir):
      ckpt = checkpoints.Checkpointer(ckpt_dir, create=False)
      start = ckpt.latest_step() or 0
      ckpt.close()
    calls = {"n": start}
    real_to_global = pipeline.to_global

    def to_global(*a, **kw):
      calls["n"] += 1  # the batch of global step calls["n"]
      if calls["n"] == args.at:
        os.kill(os.getpid(), getattr(signal, f"SIG{args.signal}"))
      return real_to_global(*a, **kw)
    pipeline.to_global = to_global

  out = train_command.run(config, args.workdir)
  if out["preempted_at"] is None:
    leaves = jax.tree_util.tree_flatten_with_path(out["state"])[0]
    np.savez(os.path.join(args.workdir, "final.npz"),
             **{jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves})


if __name__ == "__main__":
  main()
