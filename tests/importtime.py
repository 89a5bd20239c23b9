"""Which modules a subprocess imported, read from `python -X importtime` output on stderr."""
from __future__ import annotations

import re

_LINE = re.compile(r"^import time:\s+\d+\s+\|\s+\d+\s+\|\s*(\S+)\s*$")


def imported_modules(stderr: str) -> set[str]:
  mods = {m.group(1) for m in map(_LINE.match, stderr.splitlines()) if m}
  assert mods, "no -X importtime lines in the output (was the subprocess run with -X importtime?)"
  return mods


def assert_not_imported(stderr: str, prefixes: tuple[str, ...]) -> None:
  """Fails naming the modules under any of `prefixes` that the subprocess imported."""
  mods = imported_modules(stderr)
  bad = sorted(m for m in mods for p in prefixes if m == p or m.startswith(p + "."))
  assert not bad, f"imported {bad[:10]}"
