"""Preemption: SIGTERM (spot / preemptible VMs, Slurm, Kubernetes) saves at the next step boundary.

Single process: a SIGTERM handler sets a flag; the train loop checks `guard.reached(step)` after
each step, saves that step's checkpoint, waits for it and returns, so the command exits 0 with a
line saying where to resume. A second SIGTERM while saving is ignored (the save finishes).

Multi-process: every host must save the same step, or the collective save hangs. With
`jax.distributed` initialised, JAX's preemption sync manager (it listens for SIGTERM itself)
agrees on the step: `multihost_utils.reached_preemption_sync_point`. Where that service is off,
each host's flag is all-gathered every step and any host's notice stops all of them.
"""
from __future__ import annotations

import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils


def _sync_manager_available() -> bool:
  from jax._src import distributed  # pylint: disable=import-outside-toplevel
  state = distributed.global_state
  return state.client is not None and getattr(state, "preemption_sync_manager", None) is not None


class PreemptionGuard:
  """Context manager around a train loop; `reached(step)` says: save now and stop."""

  def __init__(self, signals=(signal.SIGTERM,)):
    self._signals = signals
    self._requested = threading.Event()
    self._previous = {}
    self._use_sync_manager = False

  def __enter__(self) -> "PreemptionGuard":
    self._use_sync_manager = _sync_manager_available()
    if not self._use_sync_manager and threading.current_thread() is threading.main_thread():
      for sig in self._signals:
        self._previous[sig] = signal.signal(sig, self._on_signal)
    return self

  def __exit__(self, *exc) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous.clear()

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    if not self._requested.is_set():
      logging.warning("received signal %d: saving a checkpoint at the next step boundary",
                      signum)
    self._requested.set()

  def request(self) -> None:
    """What a signal does (for callers with their own notice, e.g. a maintenance event)."""
    self._requested.set()

  def reached(self, step: int) -> bool:
    """True on every process at the same step once any of them got a preemption notice."""
    if self._use_sync_manager:
      return bool(multihost_utils.reached_preemption_sync_point(step))
    local = self._requested.is_set()
    if jax.process_count() == 1:
      return local
    flags = multihost_utils.process_allgather(np.asarray([local], np.int32))
    return bool(np.any(flags))


def resume_message(step: int, checkpoint_dir: str) -> str:
  return (f"preempted: saved step {step} to {checkpoint_dir}; run the same command again to "
          "resume from it")
