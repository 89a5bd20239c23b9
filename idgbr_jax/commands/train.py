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


def main(argv):
  if len(argv) > 1:
    raise ValueError(f"unexpected arguments: {argv[1:]}")
  _runtime.setup()
  config = _CONFIG.value
  if config.stage not in STAGES:
    raise ValueError(f"config.stage={config.stage!r}; allowed: {sorted(STAGES)}")
  import importlib  # pylint: disable=import-outside-toplevel
  trainer = importlib.import_module(STAGES[config.stage])
  trainer.train_and_evaluate(config, _WORKDIR.value)
