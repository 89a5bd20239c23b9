"""idgbr train --config=configs/<experiment>.py[:arg] --workdir=DIR [--config.key=value ...]

Trains the stage named by `config.stage` and resumes from `DIR/checkpoints` if it exists.
"""
from absl import flags
from ml_collections import config_flags

from idgbr_jax.commands import _runtime

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints and logs.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = {
    "stage1": "idgbr_jax.train.stage1",
    "stage2": "idgbr_jax.train.stage2",
}


def run(config, workdir: str) -> dict:
  """Trains `config.stage`; after a preemption notice (SIGTERM) prints where to resume. The
  process then exits 0: the work is saved, and rerunning the same command resumes it."""
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; allowed: {sorted(STAGES)}")
  import importlib  # pylint: disable=import-outside-toplevel
  trainer = importlib.import_module(STAGES[config.stage])
  out = trainer.train_and_evaluate(config, workdir)
  if out.get("preempted_at") is not None:
    from idgbr_jax.train import preemption  # pylint: disable=import-outside-toplevel
    print(preemption.resume_message(out["preempted_at"], out["checkpoint_dir"]), flush=True)
  return out


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup()
  run(_CONFIG.value, _WORKDIR.value)
  return 0
