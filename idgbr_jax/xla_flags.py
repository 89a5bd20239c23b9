"""XLA settings this project applies by default, through XLA_FLAGS (and LIBTPU_INIT_ARGS for
TPU's compiler), before JAX starts.

Importing this module does not import JAX: call `apply_defaults()` first thing in an entry point
(the `idgbr` command, the benchmarks and the tests do), because XLA reads XLA_FLAGS once, when
its first backend starts, and libtpu reads LIBTPU_INIT_ARGS once, when it loads.

`--xla_cpu_experimental_ynn_fusion_type=` (empty: no YNNPACK fusions) sends the CPU backend's
convolutions and matrix products back to its default kernels. With jaxlib 0.10.2 on this
project's 2-core x86 CPU that made the Stage II train step 1.15-1.3x and refinement 1.6x faster
(`bench/bench_stage2.py`, same run conditions) and left the metrics unchanged; numbers agree with
the YNNPACK path to float rounding. It only concerns the CPU backend, so GPU/TPU hosts are
unaffected.

On TPU, `TPU_DEFAULT_FLAGS` turn off XLA's "windowed einsum" (collective matmul) for
all-gathers and reduce-scatters. libtpu 0.0.42 applies it by default to every matmul and
convolution whose weight is sharded, as all of them are under FSDP (the sd15 configs'
`fsdp=-1`): each becomes a loop of collective-permutes and partial products, unrolled, and the
program grows with it. Compiled for a v5e-8 from this project's 2-core, 24 GiB host, the sd15
Stage II step never finished (over 21 GiB of host memory after 20-30 min); the tiny Stage I
step under fsdp=8 took 112 s instead of 14 s. Without it each weight is all-gathered whole
before its layer and its gradient reduce-scattered after, the usual FSDP program, whose
collectives XLA's latency-hiding scheduler overlaps with compute. What it does to step time on
a real TPU is not measured here (no TPU); `idgbr plan` compiles with the same flags as
`idgbr train`, so its figures describe the program that runs.

A flag the user already put in XLA_FLAGS or LIBTPU_INIT_ARGS wins; `IDGBR_XLA_DEFAULTS=0` turns
all of this off.

`idgbr evaluate` also asks for one CPU device per core (`cpu_device_flags`): evaluation is
image-parallel, and `evaluate_maps` runs one map per device side by side, which uses the cores
better than XLA's own threading inside one device (measured 1.25x on 2 cores). It only creates
host devices; on a GPU/TPU host the accelerators stay the default devices.
"""
from __future__ import annotations

import os
from typing import MutableMapping

DEFAULT_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=",)
TPU_DEFAULT_FLAGS = ("--xla_tpu_enable_windowed_einsum_for_all_gather=false",
                     "--xla_tpu_enable_windowed_einsum_for_reduce_scatter=false")


def usable_cores() -> int:
  """CPU cores this process may use: its affinity mask, capped by a cgroup v2 CPU quota (a
  container limited to 2 CPUs on a 64-core host gets 2)."""
  count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  count = count or 1
  try:
    with open("/sys/fs/cgroup/cpu.max", encoding="ascii") as f:
      quota, period = f.read().split()[:2]
    if quota != "max":
      count = min(count, max(1, -(-int(quota) // int(period))))
  except (OSError, ValueError):
    pass
  return count


def cpu_device_flags(count: int | None = None) -> tuple[str, ...]:
  """The flag that splits the host into `count` CPU devices (default: `usable_cores()`)."""
  count = usable_cores() if count is None else count
  return (f"--xla_force_host_platform_device_count={max(1, int(count))}",)


def apply_defaults(environ: MutableMapping[str, str] | None = None,
                   extra: tuple[str, ...] = ()) -> str:
  """Adds each of DEFAULT_FLAGS (and `extra`) to XLA_FLAGS and each of TPU_DEFAULT_FLAGS to
  LIBTPU_INIT_ARGS, unless that flag is already set there; returns XLA_FLAGS."""
  environ = os.environ if environ is None else environ
  if environ.get("IDGBR_XLA_DEFAULTS", "1") == "0":
    return environ.get("XLA_FLAGS", "")
  environ["LIBTPU_INIT_ARGS"] = _merged(environ.get("LIBTPU_INIT_ARGS", ""), TPU_DEFAULT_FLAGS)
  environ["XLA_FLAGS"] = _merged(environ.get("XLA_FLAGS", ""), DEFAULT_FLAGS + tuple(extra))
  return environ["XLA_FLAGS"]


def _merged(flags: str, defaults: tuple[str, ...]) -> str:
  """`flags` plus each default whose name it does not already set."""
  names = {f.split("=", 1)[0] for f in flags.split()}
  for flag in defaults:
    if flag.split("=", 1)[0] not in names:
      flags = f"{flags} {flag}".strip()
  return flags
