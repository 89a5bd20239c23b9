"""Run N JAX processes on this machine as one multi-host job (CPU devices, gloo collectives).

    results = run_processes(CODE, num_processes=2, devices_per_process=4)
    values = [r.json for r in results]       # each process printed `emit({...})`

Each process gets `JAX_PLATFORMS=cpu`, `XLA_FLAGS` with
`--xla_force_host_platform_device_count=devices_per_process` (other flags kept), and
`IDGBR_COORDINATOR=127.0.0.1:<free port>`, `IDGBR_NUM_PROCESSES`, `IDGBR_PROCESS_ID`, which
`idgbr_jax.parallel.distributed.initialize()` reads. The code runs as `python -c CODE` (or
`-m module`); a prelude defines `emit(obj)`, which prints one `MP_RESULT <json>` line.

When any process fails the others are stopped at once (a peer waiting on the coordinator would
otherwise hang until its heartbeat timeout) and `MultiprocessError` carries every process' output.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import subprocess
import sys
import tempfile
import time
from typing import Mapping, Optional, Sequence

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TESTS = pathlib.Path(__file__).resolve().parent
RESULT_PREFIX = "MP_RESULT "

PRELUDE = f"""
import json as _json, sys as _sys
def emit(obj):
  print({RESULT_PREFIX!r} + _json.dumps(obj), flush=True)
"""


@dataclasses.dataclass
class ProcessResult:
  process_id: int
  returncode: Optional[int]
  stdout: str
  stderr: str
  seconds: float

  @property
  def results(self) -> list:
    """Every object the process passed to `emit`, in order."""
    return [json.loads(line[len(RESULT_PREFIX):]) for line in self.stdout.splitlines()
            if line.startswith(RESULT_PREFIX)]

  @property
  def json(self):
    """The last object the process passed to `emit` (None if none)."""
    r = self.results
    return r[-1] if r else None

  def describe(self, tail: int = 6000) -> str:
    return (f"--- process {self.process_id}: returncode={self.returncode} "
            f"({self.seconds:.1f} s)\n[stdout]\n{self.stdout[-tail:]}\n"
            f"[stderr]\n{self.stderr[-tail:]}")


class MultiprocessError(AssertionError):
  def __init__(self, message: str, results: Sequence[ProcessResult]):
    self.results = list(results)
    super().__init__(message + "\n" + "\n".join(r.describe() for r in results))


def free_port() -> int:
  import portpicker  # pylint: disable=import-outside-toplevel
  return portpicker.pick_unused_port()


def process_env(process_id: int, num_processes: int, devices_per_process: int, port: int,
                extra: Optional[Mapping[str, str]] = None,
                base: Optional[Mapping[str, str]] = None) -> dict[str, str]:
  """The environment of one process of the job."""
  env = dict(os.environ if base is None else base)
  flags = re.sub(r"--xla_force_host_platform_device_count=\S*", "", env.get("XLA_FLAGS", ""))
  env["XLA_FLAGS"] = " ".join(
      flags.split() + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["CUDA_VISIBLE_DEVICES"] = ""
  env["TF_CPP_MIN_LOG_LEVEL"] = env.get("TF_CPP_MIN_LOG_LEVEL", "3")
  env["PYTHONUNBUFFERED"] = "1"
  env["PYTHONPATH"] = os.pathsep.join(
      [str(_ROOT), str(_TESTS)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
  env.pop("IDGBR_DISTRIBUTED", None)
  env.update({"IDGBR_COORDINATOR": f"127.0.0.1:{port}",
              "IDGBR_NUM_PROCESSES": str(num_processes),
              "IDGBR_PROCESS_ID": str(process_id)})
  env.update(extra or {})
  return env


def run_processes(code: Optional[str] = None, *, module: Optional[str] = None,
                  args: Sequence[str] = (), num_processes: int = 2,
                  devices_per_process: int = 4, timeout: float = 180.0,
                  env: Optional[Mapping[str, str]] = None,
                  per_process_env: Optional[Sequence[Mapping[str, str]]] = None,
                  cwd: Optional[str] = None, check: bool = True,
                  grace: float = 10.0) -> list[ProcessResult]:
  """Starts `num_processes` copies of `python -c PRELUDE+code` (or `python -m module args`),
  waits for all, returns their results in process-id order.

  Args:
    env / per_process_env: extra variables for all processes / for process i.
    timeout: for the whole job; then every process is killed and MultiprocessError raised.
    check: raise MultiprocessError unless every process exits 0.
    grace: seconds the others get to finish after one process failed, before being killed.
  """
  if (code is None) == (module is None):
    raise ValueError("give exactly one of code= or module=")
  port = free_port()
  argv = ([sys.executable, "-c", PRELUDE + code] if code is not None
          else [sys.executable, "-m", module]) + list(args)
  procs, outs, starts = [], [], []
  ends: list[Optional[float]] = [None] * num_processes
  reason = ""
  with tempfile.TemporaryDirectory(prefix="idgbr_mp_") as tmp:
    try:
      for pid in range(num_processes):
        extra = dict(env or {})
        if per_process_env is not None:
          extra.update(per_process_env[pid])
        out = open(os.path.join(tmp, f"{pid}.out"), "w+", encoding="utf-8")  # noqa: SIM115
        err = open(os.path.join(tmp, f"{pid}.err"), "w+", encoding="utf-8")  # noqa: SIM115
        outs.append((out, err))
        starts.append(time.monotonic())
        procs.append(subprocess.Popen(
            argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL, cwd=cwd or str(_ROOT),
            env=process_env(pid, num_processes, devices_per_process, port, extra)))
      deadline = time.monotonic() + timeout
      failed_at = None
      while any(p.poll() is None for p in procs):
        now = time.monotonic()
        for i, p in enumerate(procs):
          if p.poll() is not None and ends[i] is None:
            ends[i] = now
            if p.returncode != 0 and failed_at is None:
              failed_at = now
              reason = f"process {i} exited with {p.returncode}"
        if now > deadline:
          reason = reason or f"timed out after {timeout:.0f} s"
          break
        if failed_at is not None and now > failed_at + grace:
          break
        time.sleep(0.05)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
      for p in procs:
        p.wait()
    now = time.monotonic()
    results = []
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
      out.seek(0)
      err.seek(0)
      results.append(ProcessResult(i, p.returncode, out.read(), err.read(),
                                   (ends[i] or now) - starts[i]))
      out.close()
      err.close()
  if check and (reason or any(r.returncode != 0 for r in results)):
    raise MultiprocessError(
        f"multi-process job failed: {reason or 'a process exited non-zero'}", results)
  return results
