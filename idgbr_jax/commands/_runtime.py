"""Process setup shared by the commands: compilation cache, quiet TF, log to stderr."""
from __future__ import annotations

import logging as py_logging
import os
import sys

import jax
from absl import logging

_NOISY = (f"{os.sep}orbax{os.sep}", f"{os.sep}tensorflow_datasets{os.sep}", f"{os.sep}grain{os.sep}")


class _QuietLibraries(py_logging.Filter):
  """Keeps orbax/tfds/grain INFO chatter out of the console; their warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return record.levelno >= py_logging.WARNING or not any(n in record.pathname for n in _NOISY)


def setup(cache_dir: str | None = None) -> None:
  """Multi-host init when asked, JAX's persistent compilation cache, logs to stderr.

  Set IDGBR_DISTRIBUTED=1 on every host of a TPU pod / Slurm job (see launch/): it calls
  `jax.distributed.initialize()`, which reads the coordinator from the environment.
  """
  if os.environ.get("IDGBR_DISTRIBUTED") == "1":
    jax.distributed.initialize()
  cache_dir = cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(
      "~/.cache/idgbr_jax/xla")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stderr
  handler.addFilter(_QuietLibraries())
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()
  except ImportError:
    pass
  try:  # TF is imported only for TFDS PNG coding / TensorBoard; keep it off accelerators.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # noqa: BLE001 - TF is optional at run time
    pass
