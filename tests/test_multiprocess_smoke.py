"""Multi-host JAX on one machine: 2 processes x 4 CPU devices (gloo) form one 8-device mesh.

Checks what every multi-host feature builds on: distributed init from IDGBR_* variables, a
global mesh, a batch assembled from per-process data, a jitted step whose reduction crosses
processes, and gathering a sharded result to every host.
"""
import os

import numpy as np
import pytest

import multiprocess

pytestmark = pytest.mark.multiprocess  # `make test` runs these after the parallel part, alone

_SMOKE = r"""
import time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P
from idgbr_jax.parallel import distributed
t_import = time.perf_counter() - t0

assert distributed.initialize()
assert distributed.initialize()  # idempotent
t_init = time.perf_counter() - t0 - t_import
pid, n = jax.process_index(), jax.process_count()

mesh = jax.make_mesh((jax.device_count(),), ("data",),
                     axis_types=(jax.sharding.AxisType.Auto,))
batch_sharding = NamedSharding(mesh, P("data"))
global_x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
rows = global_x.shape[0] // n
local_x = global_x[pid * rows:(pid + 1) * rows]          # this host's part of the batch
x = jax.make_array_from_process_local_data(batch_sharding, local_x, global_x.shape)
w_host = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
w = jax.device_put(w_host, NamedSharding(mesh, P()))     # replicated parameter

@jax.jit
def step(x, w):
  y = x @ w                                              # stays sharded over the batch
  return y, jnp.sum(y), jnp.sum(x, axis=0)               # reductions over all 8 devices

t1 = time.perf_counter()
y, total, col = step(x, w)
total, col = jax.device_get((total, col))                # replicated: every host has them
t_step = time.perf_counter() - t1
gathered = multihost_utils.process_allgather(y, tiled=True)
emit({
    "pid": pid, "process_count": n, "device_count": jax.device_count(),
    "local_device_count": jax.local_device_count(),
    "device_processes": sorted({d.process_index for d in mesh.devices.flat}),
    "x_local_shards": len(x.addressable_shards), "x_shape": list(x.shape),
    "total": float(total), "col": np.asarray(col).tolist(),
    "gathered": np.asarray(gathered).tolist(),
    "collectives": jax.config.jax_cpu_collectives_implementation,
    "t_import": t_import, "t_init": t_init, "t_step": t_step,
    "t_total": time.perf_counter() - t0,
})
"""


def test_two_processes_four_cpu_devices_each():
  results = multiprocess.run_processes(_SMOKE, num_processes=2, devices_per_process=4,
                                       timeout=240)
  out = [r.json for r in results]
  global_x = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)
  w = np.array([[1, 2], [3, 4], [5, 6]], dtype=np.float32)
  want_y = global_x @ w
  for pid, o in enumerate(out):
    assert o is not None, results[pid].describe()
    assert o["pid"] == pid and o["process_count"] == 2
    assert o["device_count"] == 8 and o["local_device_count"] == 4
    assert o["device_processes"] == [0, 1]
    assert o["x_shape"] == [8, 3] and o["x_local_shards"] == 4
    assert o["collectives"] == "gloo"
    assert o["total"] == float(want_y.sum())        # exact: small integers in float32
    assert o["col"] == global_x.sum(axis=0).tolist()
    assert o["gathered"] == want_y.tolist()
  timing = {k: round(max(o[k] for o in out), 2) for k in ("t_import", "t_init", "t_step",
                                                          "t_total")}
  print(f"2x4 CPU processes: {timing} (max over processes, seconds)")


def test_helper_reports_every_process_output_on_failure():
  code = ("import os\nif os.environ['IDGBR_PROCESS_ID'] == '1':\n"
          "  raise SystemExit('boom from 1')\nprint('ok from 0')\n")
  with pytest.raises(multiprocess.MultiprocessError) as info:
    multiprocess.run_processes(code, num_processes=2, timeout=60)
  message = str(info.value)
  assert "boom from 1" in message and "ok from 0" in message
  assert [r.returncode for r in info.value.results] == [0, 1]


def test_initialize_is_noop_without_configuration():
  from idgbr_jax.parallel import distributed
  env = {k: v for k, v in os.environ.items() if not k.startswith("IDGBR_")}
  assert distributed.resolve(environ=env) == distributed.DistributedConfig(enabled=False)
  assert distributed.initialize(environ=env) is False


@pytest.mark.parametrize("env, message", [
    ({"IDGBR_COORDINATOR": "localhost", "IDGBR_NUM_PROCESSES": "2", "IDGBR_PROCESS_ID": "0"},
     "IDGBR_COORDINATOR='localhost'"),
    ({"IDGBR_COORDINATOR": "h:1", "IDGBR_NUM_PROCESSES": "two", "IDGBR_PROCESS_ID": "0"},
     "IDGBR_NUM_PROCESSES='two'"),
    ({"IDGBR_COORDINATOR": "h:1", "IDGBR_NUM_PROCESSES": "2", "IDGBR_PROCESS_ID": "2"},
     "IDGBR_PROCESS_ID='2' must be < IDGBR_NUM_PROCESSES"),
    ({"IDGBR_COORDINATOR": "h:1"}, "IDGBR_NUM_PROCESSES, IDGBR_PROCESS_ID not"),
    ({"IDGBR_DISTRIBUTED": "maybe"}, "IDGBR_DISTRIBUTED='maybe'"),
])
def test_resolve_rejects_bad_values_naming_the_variable(env, message):
  from idgbr_jax.parallel import distributed
  with pytest.raises(ValueError, match=message.replace("[", r"\[")):
    distributed.resolve(environ=env)


def test_resolve_modes():
  from idgbr_jax.parallel import distributed
  cfg = distributed.resolve(environ={"IDGBR_DISTRIBUTED": "1"})
  assert cfg.enabled and cfg.auto_detect
  cfg = distributed.resolve(environ={"IDGBR_COORDINATOR": "[::1]:1234",
                                     "IDGBR_NUM_PROCESSES": "2", "IDGBR_PROCESS_ID": "1"})
  assert (cfg.enabled, cfg.auto_detect, cfg.coordinator, cfg.num_processes, cfg.process_id) == (
      True, False, "[::1]:1234", 2, 1)
  # flags win over the environment; IDGBR_DISTRIBUTED=0 turns everything off
  cfg = distributed.resolve("10.0.0.1:99", 4, 3, environ={"IDGBR_PROCESS_ID": "0"})
  assert (cfg.coordinator, cfg.num_processes, cfg.process_id) == ("10.0.0.1:99", 4, 3)
  assert not distributed.resolve(environ={"IDGBR_DISTRIBUTED": "0",
                                          "IDGBR_COORDINATOR": "h:1"}).enabled
  # partial + IDGBR_DISTRIBUTED=1: JAX detects the rest
  cfg = distributed.resolve(environ={"IDGBR_DISTRIBUTED": "1", "IDGBR_PROCESS_ID": "0"})
  assert cfg.enabled and cfg.auto_detect and cfg.process_id == 0


_CKPT_COMMON = r"""
import os
import jax, jax.numpy as jnp, numpy as np
import orbax.checkpoint as ocp
from idgbr_jax.parallel import distributed
distributed.initialize()
mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
directory = os.environ["CKPT_DIR"]
"""

_CKPT_SAVE = _CKPT_COMMON + r"""
tree = {"w": jax.make_array_from_callback(full.shape, sharded, lambda idx: full[idx]),
        "b": jax.device_put(np.arange(3, dtype=np.int32), replicated)}
options = ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
with ocp.CheckpointManager(directory, options=options) as mngr:
  mngr.save(7, args=ocp.args.StandardSave(tree))
  mngr.wait_until_finished()
  emit({"steps": mngr.all_steps()})
"""

_CKPT_RESTORE = _CKPT_COMMON + r"""
from jax.experimental import multihost_utils
abstract = {"w": jax.ShapeDtypeStruct(full.shape, jnp.float32, sharding=sharded),
            "b": jax.ShapeDtypeStruct((3,), jnp.int32, sharding=replicated)}
with ocp.CheckpointManager(directory) as mngr:
  step = mngr.latest_step()
  restored = mngr.restore(step, args=ocp.args.StandardRestore(abstract))
w = multihost_utils.process_allgather(restored["w"], tiled=True)
emit({"step": step, "w": np.asarray(w).tolist(), "b": np.asarray(restored["b"]).tolist(),
      "local_shards": len(restored["w"].addressable_shards)})
"""


@pytest.mark.parametrize("save, restore", [((2, 4), (1, 8)), ((1, 8), (2, 4))],
                         ids=["2x4-to-1x8", "1x8-to-2x4"])
def test_checkpoint_moves_between_process_counts(tmp_path, save, restore):
  """Orbax: every process writes its own shards (ocdbt.process_N), process 0 the metadata; a
  checkpoint restores under another process count."""
  env = {"CKPT_DIR": str(tmp_path / "ckpt")}
  saved = multiprocess.run_processes(_CKPT_SAVE, num_processes=save[0],
                                     devices_per_process=save[1], env=env, timeout=240)
  assert all(r.json == {"steps": [7]} for r in saved)
  assert sorted(p.name for p in (tmp_path / "ckpt" / "7" / "default").glob("ocdbt.process_*")) \
      == [f"ocdbt.process_{i}" for i in range(save[0])]
  restored = multiprocess.run_processes(_CKPT_RESTORE, num_processes=restore[0],
                                        devices_per_process=restore[1], env=env, timeout=240)
  full = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  for r in restored:
    assert r.json["step"] == 7 and r.json["w"] == full.tolist() and r.json["b"] == [0, 1, 2]
    assert r.json["local_shards"] == restore[1]


_PREEMPTION = r"""
import os, signal, time
import jax
from jax.experimental import multihost_utils
from idgbr_jax.parallel import distributed
assert not multihost_utils.reached_preemption_sync_point(0)  # no runtime yet: always False
distributed.initialize()
pid = jax.process_index()
sync_step = None
for step in range(2000):
  if pid == 1 and step == 3:
    os.kill(os.getpid(), signal.SIGTERM)  # JAX's preemption notifier catches it
  if multihost_utils.reached_preemption_sync_point(step):
    sync_step = step
    break
  multihost_utils.sync_global_devices(f"step {step}")
  time.sleep(0.01)
emit({"sync_step": sync_step})
"""


def test_sigterm_on_one_host_gives_every_host_the_same_preemption_step():
  """With jax.distributed up, SIGTERM on any process is caught (the process is not killed) and
  `reached_preemption_sync_point` turns True at one common step on every process: where all
  hosts save together (orbax's CheckpointManager.reached_preemption / should_save use it)."""
  results = multiprocess.run_processes(_PREEMPTION, num_processes=2, devices_per_process=4,
                                       timeout=240)
  steps = [r.json["sync_step"] for r in results]
  assert steps[0] is not None and steps[0] > 3 and steps[0] == steps[1], steps
