"""Multi-host start-up: `jax.distributed.initialize` from flags or the environment.

Three ways, checked in this order:

* explicit: `coordinator`, `num_processes`, `process_id` arguments (the commands' flags), each
  falling back to `IDGBR_COORDINATOR=host:port`, `IDGBR_NUM_PROCESSES`, `IDGBR_PROCESS_ID`.
  All three are needed (or `IDGBR_DISTRIBUTED=1` lets JAX detect the missing ones).
* auto-detect: `IDGBR_DISTRIBUTED=1` alone calls `jax.distributed.initialize()` with no arguments,
  which finds the coordinator on Cloud TPU pods, Slurm, Open MPI and Kubernetes (JobSet).
* nothing configured: a no-op (one process, the usual case).

`IDGBR_DISTRIBUTED=0` turns it off whatever else is set. Call `initialize()` first thing, before
anything touches a JAX backend (`jax.devices()`, a jitted call, ...). It is idempotent: a second
call with the same settings does nothing; with different ones it raises.

On CPU the cross-process collectives are gloo (`jax_cpu_collectives_implementation`, set unless
JAX_CPU_COLLECTIVES_IMPLEMENTATION already chooses), so N local processes each with
`--xla_force_host_platform_device_count` CPU devices form one mesh: how the tests run multi-host
on one machine.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Optional

ENV_COORDINATOR = "IDGBR_COORDINATOR"
ENV_NUM_PROCESSES = "IDGBR_NUM_PROCESSES"
ENV_PROCESS_ID = "IDGBR_PROCESS_ID"
ENV_DISTRIBUTED = "IDGBR_DISTRIBUTED"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclasses.dataclass(frozen=True)
class DistributedConfig:
  """What `initialize` will do. `enabled=False`: nothing (single process)."""
  enabled: bool
  coordinator: Optional[str] = None
  num_processes: Optional[int] = None
  process_id: Optional[int] = None

  @property
  def auto_detect(self) -> bool:
    """True when JAX must find (some of) the settings itself (TPU, Slurm, Kubernetes, MPI)."""
    return self.enabled and None in (self.coordinator, self.num_processes, self.process_id)


_initialized_with: Optional[DistributedConfig] = None


def _flag(value: str, name: str) -> bool:
  v = value.strip().lower()
  if v in _TRUE:
    return True
  if v in _FALSE:
    return False
  raise ValueError(f"{name}={value!r}: expected 1 or 0 (true/false)")


def _parse_coordinator(value: Any, name: str) -> str:
  text = str(value).strip()
  host, sep, port = text.rpartition(":")
  if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
    raise ValueError(f"{name}={value!r}: expected host:port (e.g. 10.0.0.2:8476 or "
                     f"[::1]:8476) with a port in 1..65535")
  if host.startswith("[") != host.endswith("]"):
    raise ValueError(f"{name}={value!r}: unbalanced brackets around an IPv6 host")
  return text


def _parse_int(value: Any, name: str, minimum: int) -> int:
  try:
    number = int(str(value).strip()) if not isinstance(value, int) else value
  except ValueError:
    raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}") from None
  if isinstance(number, bool) or number < minimum:
    raise ValueError(f"{name}={value!r}: expected an integer >= {minimum}")
  return number


def resolve(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None,
            environ: Optional[Mapping[str, str]] = None) -> DistributedConfig:
  """Reads arguments (flags) over environment variables and validates them; no JAX calls.

  Raises:
    ValueError: a malformed value (the message names the flag/variable), or an incomplete
      explicit setting without IDGBR_DISTRIBUTED=1.
  """
  env = os.environ if environ is None else environ

  def pick(arg, env_name):
    if arg is not None and arg != "":
      return arg, f"{env_name.lower().replace('idgbr_', '--')} (flag)"
    value = env.get(env_name, "")
    return (value, env_name) if value.strip() else (None, env_name)

  switch = env.get(ENV_DISTRIBUTED)
  requested = _flag(switch, ENV_DISTRIBUTED) if switch is not None else None

  raw_coord, coord_name = pick(coordinator, ENV_COORDINATOR)
  raw_num, num_name = pick(num_processes, ENV_NUM_PROCESSES)
  raw_pid, pid_name = pick(process_id, ENV_PROCESS_ID)
  coord = _parse_coordinator(raw_coord, coord_name) if raw_coord is not None else None
  num = _parse_int(raw_num, num_name, 1) if raw_num is not None else None
  pid = _parse_int(raw_pid, pid_name, 0) if raw_pid is not None else None
  if num is not None and pid is not None and pid >= num:
    raise ValueError(f"{pid_name}={raw_pid!r} must be < {num_name}={raw_num!r} "
                     f"(process ids are 0..num_processes-1)")

  if requested is False:
    return DistributedConfig(enabled=False)
  explicit = [v is not None for v in (coord, num, pid)]
  if not any(explicit):
    return DistributedConfig(enabled=bool(requested))
  if not all(explicit) and not requested:
    missing = [n for n, given in zip((ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID),
                                     explicit) if not given]
    given = [n for n, g in zip((coord_name, num_name, pid_name), explicit) if g]
    raise ValueError(f"{', '.join(given)} set but {', '.join(missing)} not: set all three, or "
                     f"{ENV_DISTRIBUTED}=1 to let JAX detect the others (TPU, Slurm, Kubernetes)")
  return DistributedConfig(enabled=True, coordinator=coord, num_processes=num, process_id=pid)


def is_initialized() -> bool:
  import jax  # pylint: disable=import-outside-toplevel
  return jax.distributed.is_initialized()


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *,
               environ: Optional[Mapping[str, str]] = None,
               **jax_kwargs: Any) -> bool:
  """Starts JAX's distributed runtime if configured (see the module doc); returns whether this
  process is now part of a multi-process job. Extra keyword arguments (e.g.
  `initialization_timeout`, `local_device_ids`) go to `jax.distributed.initialize`."""
  global _initialized_with  # pylint: disable=global-statement
  cfg = resolve(coordinator, num_processes, process_id, environ)
  import jax  # pylint: disable=import-outside-toplevel

  if _initialized_with is not None:
    if cfg.enabled and cfg != _initialized_with:
      raise RuntimeError(f"jax.distributed is already initialized with {_initialized_with}; "
                         f"cannot re-initialize with {cfg}")
    return True
  if jax.distributed.is_initialized():  # someone else did it (e.g. a launcher or a notebook)
    _initialized_with = cfg
    return True
  if not cfg.enabled:
    return False

  env = os.environ if environ is None else environ
  if not env.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # gloo: cross-process all-reduce etc. for CPU devices (JAX 0.10's default too; made explicit
    # so a changed default cannot silently leave CPU processes unable to communicate).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")

  kwargs = dict(jax_kwargs)
  if not cfg.auto_detect:
    kwargs.update(coordinator_address=cfg.coordinator, num_processes=cfg.num_processes,
                  process_id=cfg.process_id)
    # Everything is given: don't let a Slurm/MPI/TPU environment around us override it.
    kwargs.setdefault("cluster_detection_method", "deactivate")
  else:
    kwargs.update({k: v for k, v in (("coordinator_address", cfg.coordinator),
                                     ("num_processes", cfg.num_processes),
                                     ("process_id", cfg.process_id)) if v is not None})
  try:
    jax.distributed.initialize(**kwargs)
  except RuntimeError as e:
    if "before any JAX calls" in str(e) or "backend" in str(e).lower():
      raise RuntimeError("idgbr_jax.parallel.distributed.initialize() must run before anything "
                         "uses JAX devices (jax.devices(), jit, device_put, ...)") from e
    raise
  _initialized_with = cfg
  return True
