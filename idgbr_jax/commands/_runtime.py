"""Process setup shared by the commands: compilation cache, quiet TF, log to stderr."""
from __future__ import annotations

import logging as py_logging
import os
import sys

import jax
from absl import flags, logging

from idgbr_jax.parallel import distributed

# Multi-host: every command takes these (or IDGBR_COORDINATOR / IDGBR_NUM_PROCESSES /
# IDGBR_PROCESS_ID; IDGBR_DISTRIBUTED=1 alone auto-detects on TPU pods, Slurm, Kubernetes).
_COORDINATOR = flags.DEFINE_string("coordinator", None,
                                   "host:port of process 0's coordinator (multi-host).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-host job.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")

_NOISY = tuple(f"{os.sep}{name}{os.sep}" for name in ("orbax", "tensorflow_datasets", "grain"))


# A failed checkpoint save for lack of space is reported once, by the command's error boundary
# (`checkpoints.CheckpointError`): orbax's background threads would log its traceback per thread.
_REPORTED_BY_US = ("No space left on device", "Disk quota exceeded", "Read-only file system")


class _QuietLibraries(py_logging.Filter):
  """Keeps orbax/tfds/grain INFO chatter out of the console; their warnings still show."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    noisy = any(n in record.pathname for n in _NOISY)
    if noisy and record.levelno >= py_logging.ERROR and \
        f"{os.sep}orbax{os.sep}" in record.pathname and _about_a_full_disk(record):
      return False
    return record.levelno >= py_logging.WARNING or not noisy


def _about_a_full_disk(record: py_logging.LogRecord) -> bool:
  texts = [str(record.getMessage())]
  e = record.exc_info[1] if record.exc_info else None
  while e is not None and len(texts) < 20:
    texts.append(str(e))
    e = e.__cause__ or e.__context__
  return any(r in t for r in _REPORTED_BY_US for t in texts)


def _quiet_unraisable(previous):
  """After a failed asynchronous checkpoint save (e.g. a full disk), tensorstore may complete
  writes on the event loop orbax has already closed: each prints a `RuntimeError: Event loop is
  closed` traceback from a callback. The failure itself is reported once, as `error: ...`."""
  def hook(unraisable):
    e = unraisable.exc_value
    if isinstance(e, RuntimeError) and str(e) == "Event loop is closed":
      return
    previous(unraisable)
  return hook


def setup(cache_dir: str | None = None, *, tensorflow: bool = True) -> None:
  """Multi-host init when asked (flags or IDGBR_* variables, see `parallel.distributed`), JAX's
  persistent compilation cache, logs to stderr.

  `tensorflow=False` is for commands that never need TF (refine, export, convert): TF is then
  not imported at all (it is ~1 GB of host memory and seconds of start-up).

  Set IDGBR_DISTRIBUTED=1 on every host of a TPU pod / Slurm job (see launch/): it calls
  `jax.distributed.initialize()`, which reads the coordinator from the environment.
  """
  distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  cache_dir = cache_dir or os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.expanduser(
      "~/.cache/idgbr_jax/xla")
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  logging.use_absl_handler()
  handler = logging.get_absl_handler()
  handler.python_handler.stream = sys.stderr
  handler.addFilter(_QuietLibraries())
  sys.unraisablehook = _quiet_unraisable(sys.unraisablehook)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    tfds.disable_progress_bar()
  except ImportError:
    pass
  if not tensorflow:
    return
  try:  # TF is imported only for TFDS PNG coding / TensorBoard; keep it off accelerators.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    tf.config.set_visible_devices([], "GPU")
  except Exception:  # noqa: BLE001 - TF is optional at run time
    pass
