"""Runs a command and kills its process group when its resident memory passes a limit.

  python bench/watchdog.py --limit_gib=12 -- idgbr plan --config=...

Polls every 0.5 s the summed VmRSS of the command and its descendants (/proc); above the limit,
or when the machine's MemAvailable falls under `--min_available_gib` (others' work shares it),
it kills the whole group, prints what it saw and exits 137. Prints the peak RSS at the end.
For compiling large configs on a shared machine: an out-of-memory kill would hit everyone.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time


def _children(pid: int) -> list[int]:
  out = []
  try:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
      kids = [int(c) for c in f.read().split()]
  except OSError:
    return out
  for k in kids:
    out += [k] + _children(k)
  return out


def _rss_bytes(pid: int) -> int:
  try:
    with open(f"/proc/{pid}/status") as f:
      for line in f:
        if line.startswith("VmRSS:"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return 0


def _available_bytes() -> int:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) * 1024
  return 1 << 62


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--limit_gib", type=float, default=12.0)
  parser.add_argument("--min_available_gib", type=float, default=1.5)
  parser.add_argument("command", nargs=argparse.REMAINDER)
  args = parser.parse_args()
  command = args.command[1:] if args.command[:1] == ["--"] else args.command
  if not command:
    parser.error("no command")
  limit = int(args.limit_gib * (1 << 30))
  proc = subprocess.Popen(command, start_new_session=True)
  peak = 0
  start = time.time()
  while proc.poll() is None:
    rss = sum(_rss_bytes(p) for p in [proc.pid] + _children(proc.pid))
    peak = max(peak, rss)
    available = _available_bytes()
    if rss > limit or available < args.min_available_gib * (1 << 30):
      os.killpg(proc.pid, signal.SIGKILL)
      proc.wait()
      why = (f"{rss / (1 << 30):.2f} GiB RSS > {args.limit_gib} GiB" if rss > limit else
             f"the machine's MemAvailable {available / (1 << 30):.2f} GiB < "
             f"{args.min_available_gib} GiB (RSS {rss / (1 << 30):.2f} GiB)")
      print(f"watchdog: killed {command[0]} at {why} after {time.time() - start:.0f} s",
            file=sys.stderr, flush=True)
      return 137
    time.sleep(0.5)
  print(f"watchdog: peak RSS {peak / (1 << 30):.2f} GiB, {time.time() - start:.0f} s, "
        f"exit {proc.returncode}", file=sys.stderr, flush=True)
  return proc.returncode


if __name__ == "__main__":
  sys.exit(main())
