"""Progress with an ETA for long commands (predict, refine, evaluate, sweep, dataset builds).

One wrapper over tqdm (which TFDS already brings) so every command reports the same way: on
stderr, from process 0 only (a pod's other hosts stay quiet), a bar with rate and ETA on a
terminal, and a plain line every `IDGBR_PROGRESS_INTERVAL` seconds (default 30) in a log file or
under Slurm, where carriage-return bars would turn into megabytes of noise. `IDGBR_PROGRESS=0`
turns it off. Imports nothing heavy (no JAX unless it is already imported).
"""
from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, Optional, TypeVar

T = TypeVar("T")


def _process_index() -> int:
  # JAX, when a command already uses it, knows which host this is; the env var covers the
  # launchers' view before JAX starts (and keeps this module importable without JAX).
  jax = sys.modules.get("jax")
  if jax is not None:
    try:
      return int(jax.process_index())
    except Exception:  # pylint: disable=broad-except
      pass
  return int(os.environ.get("IDGBR_PROCESS_ID", "0") or 0)


def enabled() -> bool:
  return os.environ.get("IDGBR_PROGRESS", "1") != "0" and _process_index() == 0


class Progress:
  """A counter with an ETA: `with Progress(total, "refine", unit="map") as p: ...; p.update(n)`.

  `total` may be None (no ETA, only a rate). Disabled (no output at all) on hosts other than
  process 0 and with IDGBR_PROGRESS=0; `count` is kept either way.
  """

  def __init__(self, total: Optional[int], desc: str, *, unit: str = "it", stream=None):
    self.total, self.desc, self.unit, self.count = total, desc, unit, 0
    self._bar = None
    if enabled():
      from tqdm import tqdm  # pylint: disable=import-outside-toplevel
      stream = stream or sys.stderr
      tty = hasattr(stream, "isatty") and stream.isatty()
      interval = 0.1 if tty else float(os.environ.get("IDGBR_PROGRESS_INTERVAL", "30"))
      self._bar = tqdm(total=total, desc=desc, unit=unit, file=stream, dynamic_ncols=tty,
                       mininterval=interval, maxinterval=max(interval, 10.0),
                       ascii=not tty, leave=True)

  def update(self, n: int = 1) -> None:
    self.count += n
    if self._bar is not None:
      self._bar.update(n)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None

  def __enter__(self) -> "Progress":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def track(iterable: Iterable[T], desc: str, *, total: Optional[int] = None,
          unit: str = "it") -> Iterator[T]:
  """Yields from `iterable`, counting one per item (`total` defaults to its len when it has one)."""
  if total is None and hasattr(iterable, "__len__"):
    total = len(iterable)  # type: ignore[arg-type]
  with Progress(total, desc, unit=unit) as p:
    for item in iterable:
      yield item
      p.update(1)
