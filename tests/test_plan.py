"""`idgbr plan` on tiny configs.

On the 8 fake CPU devices (what CI runs): the records' keys and values, the peak growing with
the batch, FSDP shrinking the params' bytes per device, FLOPs against an analytic count and
linear in the batch, and the errors for an unknown topology, a mesh that does not fit the
devices, and a missing libtpu. With libtpu installed (`pip install -c constraints.txt -e
'.[tpu]'`), the same planner compiles for a v5e and a v4 topology and its numbers are checked
against `memory_analysis()` of the same program compiled directly.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from idgbr_configs import stage1_synthetic, stage2_synthetic
from idgbr_jax import plan, xla_flags
from idgbr_jax.parallel import sharding

REPO = str(pathlib.Path(__file__).resolve().parents[1])
KEYS = {"program", "topology", "mesh", "batch_per_chip", "peak_bytes_per_chip",
        "hbm_bytes_per_chip", "fits", "flops_per_chip", "argument_bytes", "temp_bytes",
        "output_bytes", "alias_bytes", "images_per_step"}


def _stage1():
  return stage1_synthetic.get_config("runlocal")  # tiny UNet (8, 16, 32), 64 px


def _stage2():
  """The smallest Stage II the assembly builds: 2-level, 1-layer denoiser, tiny teacher."""
  config = stage2_synthetic.get_config("runlocal")
  config.data.image_size = 16
  config.model.denoiser_overrides.block_out_channels = (8, 16)
  config.model.denoiser_overrides.layers_per_block = 1
  config.model.denoiser_overrides.down_block_types = ("CrossAttnDownBlock2D", "DownBlock2D")
  config.model.denoiser_overrides.up_block_types = ("UpBlock2D", "CrossAttnUpBlock2D")
  config.model.denoiser_overrides.norm_num_groups = 4
  config.model.guidance_width = 8
  config.model.guidance_heads = 2
  config.diffusion.num_inference_steps = 2
  return config


def _one(config, program, **kw) -> plan.Record:
  records, notes = plan.plan(config, plan.local_target(), programs=[program], **kw)
  assert len(records) == 1, notes
  return records[0]


@pytest.fixture(scope="module")
def stage1_records():
  """Stage I at 1 and 4 images per device, data- and fully-sharded."""
  config = _stage1()
  return {(mesh, b): _one(config, "stage1", mesh={mesh: 8}, batch_per_chip=b)
          for mesh in ("data", "fsdp") for b in (1, 2, 4)}


def test_record_keys_and_values(stage1_records):
  r = stage1_records[("data", 1)]
  out = r.to_json()
  assert KEYS <= set(out)
  json.dumps(out)  # serialisable as written by --output
  assert out["program"] == "stage1"
  assert out["topology"] == "local:cpu"
  assert out["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
  assert out["batch_per_chip"] == 1 and out["images_per_step"] == 8
  assert out["hbm_bytes_per_chip"] is None and out["fits"] is None  # CPU: no HBM to fit
  assert out["flops_per_chip"] > 0
  assert out["argument_bytes"] > 0 and out["temp_bytes"] > 0
  assert out["peak_bytes_per_chip"] >= (out["argument_bytes"] + out["temp_bytes"] +
                                        out["output_bytes"] - out["alias_bytes"])
  # The train state is donated: its buffers alias the outputs.
  assert out["alias_bytes"] > 0


def test_peak_grows_with_batch(stage1_records):
  peaks = [stage1_records[("data", b)].peak_bytes_per_chip for b in (1, 2, 4)]
  assert peaks[0] < peaks[1] < peaks[2], peaks


def test_flops_linear_in_batch(stage1_records):
  """Per-image work is the same for every image: FLOPs are affine in the batch (the optimizer
  update is the constant), and the per-image share dominates."""
  f = [stage1_records[("data", b)].flops_per_chip for b in (1, 2, 4)]
  per_image = f[1] - f[0]
  assert per_image > 0
  np.testing.assert_allclose(f[2] - f[1], 2 * per_image, rtol=1e-3)
  assert f[0] - per_image < 0.1 * f[0]


def test_fsdp_shrinks_param_bytes(stage1_records):
  """fsdp=8 shards every kernel whose input features divide by 8; data=8 replicates them."""
  data, fsdp = stage1_records[("data", 1)], stage1_records[("fsdp", 1)]
  assert fsdp.argument_bytes < 0.5 * data.argument_bytes, (fsdp.argument_bytes,
                                                          data.argument_bytes)
  # The same global work, split the same way over the batch.
  assert fsdp.images_per_step == data.images_per_step == 8


def test_flops_of_a_matmul_are_analytic():
  """`plan.flops_of` is XLA's per-device count: a batch-sharded [B, K] x [K, N] matmul costs
  2 * (B / 8) * K * N per device."""
  mesh = sharding.make_mesh({"data": 8})
  b, k, n = 64, 256, 128
  x = jax.ShapeDtypeStruct((b, k), jnp.float32, sharding=NamedSharding(mesh, P("data")))
  w = jax.ShapeDtypeStruct((k, n), jnp.float32, sharding=NamedSharding(mesh, P()))
  compiled, oom = plan.compile_program(jax.jit(jnp.matmul), (x, w), mesh, (), "cpu")
  assert not oom
  assert plan.flops_of(compiled) == 2 * (b // 8) * k * n
  memory = compiled.memory_analysis()
  assert memory.argument_size_in_bytes == (b // 8) * k * 4 + k * n * 4


@pytest.mark.slow
def test_stage2_programs():
  """Stage II's train step with and without the teacher, and the refine function."""
  config = _stage2()
  records, notes = plan.plan(config, plan.local_target(), mesh={"fsdp": 8}, batch_per_chip=1)
  assert not notes
  by = {r.program: r for r in records}
  assert set(by) == {"stage2", "stage2_after_warmup", "refine"}
  # Without the teacher among the frozen arguments the step holds fewer bytes; the state
  # (params + optimizer, with the projector) is the same donated tree.
  assert by["stage2_after_warmup"].argument_bytes < by["stage2"].argument_bytes
  assert by["stage2_after_warmup"].alias_bytes == by["stage2"].alias_bytes > 0
  assert by["refine"].alias_bytes == 0  # nothing donated
  assert all(r.flops_per_chip > 0 for r in records)
  # The frozen weights in bfloat16 (config.model.frozen_dtype, as the trainer holds them) take
  # half their bytes: exactly, from the abstract frozen tree the step receives.
  assert by["stage2"].options["model.frozen_dtype"] == "float32"
  config.model.frozen_dtype = "bfloat16"
  bf16 = _one(config, "stage2_after_warmup", mesh={"fsdp": 8}, batch_per_chip=1)
  assert bf16.options["model.frozen_dtype"] == "bfloat16"
  _, _, (frozen32, _) = plan._stage2_trees(  # pylint: disable=protected-access
      _stage2(), sharding.make_mesh({"fsdp": 8}), tuple(config.sharding_rules),
      with_teacher=False, with_projector=True, with_opt=False)
  weights = sum(4 * np.prod(x.sharding.shard_shape(x.shape))  # float32 bytes on one device
                for k in ("vae", "label_embed", "unet_ori") for x in jax.tree.leaves(frozen32[k]))
  saved = by["stage2_after_warmup"].argument_bytes - bf16.argument_bytes
  # Exact: the argument column counts every array the trainer holds for the step, including
  # weights the step never reads (the VAE decoder; plan compiles with keep_unused).
  assert saved == weights // 2, (saved, weights)
  # Without a teacher (or with repa.drop_teacher=False) there is one Stage II step.
  config.repa.drop_teacher = False
  _, notes = plan.plan(config, plan.local_target(), programs=["stage2_after_warmup"])
  assert notes and "stage2_after_warmup: skipped" in notes[0]
  # No warm-up (repa.active_steps=0): the trainer never loads the teacher, so its one step,
  # `stage2`, is the step without it (was: the warm-up step, teacher's bytes counted).
  config = _stage2()
  config.repa.active_steps = 0
  records, notes = plan.plan(config, plan.local_target(), mesh={"fsdp": 8}, batch_per_chip=1,
                             programs=["stage2", "stage2_after_warmup"])
  assert [r.program for r in records] == ["stage2"]
  assert "stage2_after_warmup: skipped" in notes[0]
  assert records[0].argument_bytes == by["stage2_after_warmup"].argument_bytes


@pytest.mark.slow
def test_split_step_is_planned_as_the_trainer_runs_it():
  """With `config.split_step` the planner compiles the trainer's three programs
  (`SplitTrainStep.programs`): the step's peak per chip is the largest of each program's own
  peak plus the trees the chip holds meanwhile (the optimizer state during the gradient
  program, ...), and its FLOPs are the three programs' sum, within 1 % of the one program's."""
  config = _stage2()
  one = _one(config, "stage2_after_warmup", mesh={"fsdp": 8}, batch_per_chip=1)
  config.split_step = True
  split = _one(config, "stage2_after_warmup", mesh={"fsdp": 8}, batch_per_chip=1)
  assert "config.split_step: the step is prepare" in split.note
  mesh = sharding.make_mesh({"fsdp": 8})
  rules = tuple(config.sharding_rules)
  pieces = plan.stage2_program(config, mesh, rules, 8, after_warmup=True)
  assert [p[0] for p in pieces] == ["prepare", "grads", "apply"]
  direct, flops = [], 0.0
  for _, fn, args, others in pieces:
    compiled, _ = plan.compile_program(fn, args, mesh, rules, "cpu")
    held = sum(np.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
               for x in jax.tree.leaves(others))
    direct.append(plan.peak_bytes(compiled.memory_analysis()) + held)
    flops += plan.flops_of(compiled)
  assert split.peak_bytes_per_chip == max(direct)
  # What the gradient program leaves on the chip: the optimizer state, not an argument of it.
  grad_others = pieces[1][3]
  assert len(grad_others) == 1 and jax.tree.structure(grad_others[0]) == jax.tree.structure(
      pieces[2][2][0]["opt_state"])
  assert split.flops_per_chip == flops
  np.testing.assert_allclose(split.flops_per_chip, one.flops_per_chip, rtol=0.01)


@pytest.mark.slow
def test_refine_flops_count_every_denoiser_call():
  """XLA's cost analysis counts the DDIM loop's body once; the planner adds the other calls, so
  the refine FLOPs grow by one guided denoiser call per step."""
  flops = {}
  for steps in (2, 3, 5):
    config = _stage2()
    config.diffusion.num_inference_steps = steps
    flops[steps] = _one(config, "refine", mesh={"data": 8}, batch_per_chip=1).flops_per_chip
  per_call = flops[3] - flops[2]
  assert per_call > 0
  np.testing.assert_allclose(flops[5] - flops[3], 2 * per_call, rtol=1e-6)


def test_a_multislice_config_is_planned_as_one_slice_with_a_note():
  config = _stage1()
  one = _one(config, "stage1", mesh={"data": 8}, batch_per_chip=1)
  config.dcn_mesh_shape.data = 2
  records, notes = plan.plan(config, plan.local_target(), mesh={"data": 8}, batch_per_chip=1)
  assert len(notes) == 1 and "config.dcn_mesh_shape={'data': 2, 'fsdp': 1, 'tensor': 1}" in \
      notes[0] and "one slice of 8 chips" in notes[0]
  # Each chip of a slice: the same program, the same bytes.
  assert records[0].peak_bytes_per_chip == one.peak_bytes_per_chip
  assert records[0].argument_bytes == one.argument_bytes


def test_programs_of_a_config():
  assert list(plan.programs_of(_stage1())) == ["stage1"]
  assert list(plan.programs_of(_stage2())) == ["stage2", "stage2_after_warmup", "refine"]
  from idgbr_configs import demo  # pylint: disable=import-outside-toplevel
  assert list(plan.programs_of(demo.get_config("runlocal"))) == [
      "stage1", "stage2", "stage2_after_warmup", "refine"]
  _, notes = plan.plan(_stage1(), plan.local_target(), programs=["refine"])
  assert notes and "refine: skipped" in notes[0]


@pytest.mark.parametrize("text, message", [
    ("data=3", "spans 3 devices; the target has 8"),
    ("data=4,fsdp=4", "spans 16 devices"),
    ("data=-1,fsdp=-1", "at most one size may be -1"),
    ("pipeline=8", "'pipeline=8' is not <axis>=<size>"),
    ("data=2,data=4", "axis 'data' given twice"),
    ("fsdp=x", "size 'x' of 'fsdp' is not an integer"),
])
def test_mesh_errors_name_the_value(text, message):
  with pytest.raises(ValueError, match=message.replace("(", r"\(")):
    plan.mesh_shape_for(_stage1(), plan.parse_mesh(text), 8)


def test_mesh_minus_one_fills():
  assert plan.mesh_shape_for(_stage1(), plan.parse_mesh("fsdp=-1,tensor=2"), 8) == {
      "data": 1, "fsdp": 4, "tensor": 2}
  assert plan.mesh_shape_for(_stage1(), None, 8) == {"data": 8, "fsdp": 1, "tensor": 1}


def test_unknown_topology_names_it():
  with pytest.raises(ValueError, match=r"--topology='v9x:2x2': unknown TPU topology"):
    plan.tpu_target("v9x:2x2")


def test_missing_libtpu_says_how_to_get_it(monkeypatch, tmp_path):
  monkeypatch.setenv("TPU_LIBRARY_PATH", str(tmp_path / "no" / "libtpu.so"))
  with pytest.raises(ValueError, match=r"needs libtpu.*pip install -c constraints.txt -e "
                                       r"'\.\[tpu\]'.*make install-tpu"):
    plan.tpu_target("v5e:2x4")


def _cli(*args, env=None):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
         "XLA_FLAGS": "--xla_force_host_platform_device_count=8", **(env or {})}
  env.pop("IDGBR_TRACEBACK", None)
  return subprocess.run([sys.executable, "-m", "idgbr_jax.cli", "plan", *args], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=600)


def test_cli_writes_json_and_reports_errors(tmp_path):
  out = tmp_path / "plan.json"
  proc = _cli("--config=configs/stage1_synthetic.py:runlocal", "--mesh=fsdp=8",
              "--batch_per_chip=2", f"--output={out}")
  assert proc.returncode == 0, proc.stderr
  assert "stage1" in proc.stdout and "fsdp=8" in proc.stdout
  (record,) = json.loads(out.read_text())
  assert KEYS <= set(record)
  assert record["batch_per_chip"] == 2 and record["images_per_step"] == 16
  proc = _cli("--config=configs/stage1_synthetic.py:runlocal", "--mesh=data=3")
  assert proc.returncode == 1
  assert "error: --mesh {'data': 3, 'fsdp': 1, 'tensor': 1} spans 3 devices" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = _cli("--config=configs/stage1_synthetic.py:runlocal", "--topology=v9x:2x2")
  assert proc.returncode == 1 and "error: --topology='v9x:2x2'" in proc.stderr


# ----- TPU topologies (libtpu installed) -----------------------------------------------------
needs_libtpu = pytest.mark.skipif(not plan.libtpu_available(),
                                  reason="libtpu not installed (pip install -e '.[tpu]')")

_TPU_CHECK = r"""
import json, sys
import jax
from idgbr_configs import stage1_synthetic
from idgbr_jax import plan
from idgbr_jax.parallel import sharding
out = {}
for topology, mesh in (("v5e:2x4", {"data": 8}), ("v4:2x2x1", {"data": 4})):
  target = plan.tpu_target(topology)
  config = stage1_synthetic.get_config("runlocal")
  (record,), _ = plan.plan(config, target, mesh=mesh, batch_per_chip=2)
  # The same program compiled directly.
  shape = plan.mesh_shape_for(config, mesh, len(target.devices))
  m = sharding.make_mesh(shape, devices=target.devices)
  rules = tuple(config.sharding_rules)
  fn, args = plan.stage1_program(config, m, rules, 2 * plan.batch_shards(shape, rules))
  compiled, _ = plan.compile_program(fn, args, m, rules, "tpu")
  mem = compiled.memory_analysis()
  out[topology] = {"record": record.to_json(), "devices": len(target.devices),
                   "kind": target.device_kind,
                   "direct": [mem.argument_size_in_bytes, mem.temp_size_in_bytes,
                              mem.output_size_in_bytes, mem.alias_size_in_bytes,
                              plan.peak_bytes(mem), plan.flops_of(compiled)]}
# Under fsdp=8 every conv's weight is sharded: with libtpu's windowed einsum (which
# xla_flags.TPU_DEFAULT_FLAGS turn off) each becomes a loop of collective-permutes.
config = stage1_synthetic.get_config("runlocal")
target = plan.tpu_target("v5e:2x4")
m = sharding.make_mesh({"fsdp": 8}, devices=target.devices)
rules = tuple(config.sharding_rules)
fn, args = plan.stage1_program(config, m, rules, 16)
compiled, _ = plan.compile_program(fn, args, m, rules, "tpu")
text = compiled.as_text()
out["fsdp8"] = {op: text.count(" " + op + "(") for op in ("collective-permute", "all-gather")}
json.dump(out, sys.stdout)
"""


@pytest.mark.slow
@needs_libtpu
def test_tpu_topologies_match_memory_analysis():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  proc = subprocess.run([sys.executable, "-c", _TPU_CHECK], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  v5e, v4 = out["v5e:2x4"], out["v4:2x2x1"]
  assert v5e["devices"] == 8 and v5e["kind"] == "TPU v5 lite"
  assert v4["devices"] == 4 and v4["kind"] == "TPU v4"  # megacore: one device per chip
  for o in (v5e, v4):
    r = o["record"]
    assert [r["argument_bytes"], r["temp_bytes"], r["output_bytes"], r["alias_bytes"],
            r["peak_bytes_per_chip"], r["flops_per_chip"]] == o["direct"]
    assert r["fits"] is True and r["peak_bytes_per_chip"] < r["hbm_bytes_per_chip"]
  assert v5e["record"]["hbm_bytes_per_chip"] == 16 * 10**9
  assert v4["record"]["hbm_bytes_per_chip"] == 32 * 2**30
  assert v5e["record"]["images_per_step"] == 16 and v4["record"]["images_per_step"] == 8
  # The planner compiles with the project's libtpu flags (conftest applied them, as `idgbr`
  # does), and they take: fsdp's weights are all-gathered, no collective-matmul loops.
  for flag in xla_flags.TPU_DEFAULT_FLAGS:
    assert flag in v5e["record"]["options"]["LIBTPU_INIT_ARGS"]
  assert out["fsdp8"]["collective-permute"] == 0 and out["fsdp8"]["all-gather"] > 0
