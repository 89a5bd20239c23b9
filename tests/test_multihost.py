"""Multi-host for real: 2 processes x 4 CPU devices (gloo) against 1 process x 8 devices.

* Stage I and Stage II training give the same params (SGD, so the updates compare up to float32
  rounding; see numerics.py), and the in-training evaluation runs on the mesh;
* a checkpoint written by 2 processes restores in 1 and one written by 1 restores in 2;
* predict / refine write every output file exactly once (process 0), the evaluation report of the
  same checkpoint is identical on both layouts, and only process 0 writes TensorBoard events.
"""
import json
import os

import numpy as np
import pytest

import multiprocess
import numerics

# Real multi-process runs: minutes on 2 cores; `make test` runs them alone (see the Makefile).
pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]

_COMMON = r"""
import glob, json, os, sys
import jax, numpy as np
from idgbr_jax.parallel import distributed
distributed.initialize()
from idgbr_jax import paths
from idgbr_jax.parallel import multihost, sharding

WRITES = []
_write = paths.write_bytes
def _spy(path, data):
  WRITES.append(str(path))
  _write(path, data)
paths.write_bytes = _spy

def host_tree(tree):
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(k): np.asarray(multihost.to_host(v)) for k, v in leaves}

def save_tree(path, tree):
  tree = host_tree(tree)  # every process takes part in the gather
  if jax.process_index() == 0:
    np.savez(path, **tree)

A = json.loads(os.environ["TEST_ARGS"])
"""

_STAGE1 = _COMMON + r"""
from test_stage1 import tiny_config
from idgbr_jax.assembly import stage1 as assembly
from idgbr_jax.inference import stage1 as infer
from idgbr_jax.train import optim, stage1

def config():
  cfg = tiny_config(A["data_dir"], data=-1)
  cfg.optim.optimizer = "sgd"
  cfg.optim.learning_rate = 0.05
  cfg.num_train_steps = 3
  cfg.eval_every_steps = 0  # evaluate once, after the last step, on the mesh
  return cfg

cfg = config()
K = infer.sources.num_classes(cfg.data)
if A.get("train"):
  out = stage1.train_and_evaluate(cfg, A["train"])
  save_tree(A["train"] + ".final.npz", out["state"]["params"])
  model = assembly.build_model(cfg, K)
  tx, _ = optim.make_optimizer(cfg.optim, cfg.num_train_steps)
  init, _ = sharding.create_sharded(stage1.make_init_fn(model, tx, 32),
                                    jax.random.split(jax.random.key(cfg.seed))[0],
                                    sharding.mesh_from_config(cfg), tuple(cfg.sharding_rules))
  save_tree(A["train"] + ".init.npz", init["params"])
  emit({"what": "train", "eval": out["eval"]})
for src, dst in A.get("predict", []):
  WRITES.clear()
  n = infer.predict_split(src, "test", dst)
  loaded = assembly.load_segmenter(src)
  ds = infer.pipeline.eval_dataset(loaded.config, "test", K)
  rules = tuple(loaded.config.sharding_rules)
  fn = infer.make_predict_fn(loaded.model, jax.tree.map(lambda x: x.sharding, loaded.variables),
                             loaded.mesh, rules)
  report = infer.evaluate(fn, loaded.variables, ds, loaded.config, K, loaded.mesh, rules)
  emit({"what": "predict", "n": n, "writes": list(WRITES), "eval": report})
"""


def _run(code, num_processes, **args):
  results = multiprocess.run_processes(
      code, num_processes=num_processes, devices_per_process=8 // num_processes, timeout=600,
      env={"TEST_ARGS": json.dumps(args),
           "JAX_COMPILATION_CACHE_DIR": os.environ.get("JAX_COMPILATION_CACHE_DIR", "")})
  return [r.results for r in results]


def _final_and_init(prefix):
  with np.load(prefix + ".final.npz") as f, np.load(prefix + ".init.npz") as i:
    return dict(f), dict(i)


def _events(workdir):
  return [n for n in os.listdir(workdir) if n.startswith("events.out.tfevents")]


def test_stage1_two_processes_equal_one(tmp_path):
  from test_stage1 import tiny_config  # pylint: disable=import-outside-toplevel
  from idgbr_jax.data import sources  # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path / "tfds")
  sources.get_source(tiny_config(data_dir).data, "train")  # build once, before the jobs
  one, two = str(tmp_path / "one"), str(tmp_path / "two")

  [single] = _run(_STAGE1, 1, data_dir=data_dir, train=one,
                  predict=[[one, str(tmp_path / "pred_one")]])
  double = _run(_STAGE1, 2, data_dir=data_dir, train=two,
                predict=[[one, str(tmp_path / "pred_one_on_two")]])
  [back] = _run(_STAGE1, 1, data_dir=data_dir, predict=[[two, str(tmp_path / "pred_two")]])

  # Same training: what the steps added agrees up to rounding (a batch of 8 32x32 images).
  (f1, i1), (f2, i2) = _final_and_init(one), _final_and_init(two)
  for k in i1:
    np.testing.assert_array_equal(i1[k], i2[k], err_msg=k)  # same init, bit for bit
  numerics.assert_close_up_to_rounding(numerics.updates(f2, i2), numerics.updates(f1, i1),
                                       n_terms=8 * 32 * 32, extra_atol=numerics.ulps(f1, 2))
  assert max(float(np.abs(f1[k] - i1[k]).max()) for k in f1) > 1e-4  # training moved them

  # Both processes evaluated on the mesh and agree; only process 0 wrote the event file.
  train1 = single[0]["eval"]
  train2 = [r[0]["eval"] for r in double]
  assert train2[0] == train2[1] and train2[0]["num_images"] == train1["num_images"] == 8
  assert len(_events(one)) == len(_events(two)) == 1

  # The 1-process checkpoint on 2 processes: identical maps and report, each file once.
  pred1, pred12 = single[1], [r[1] for r in double]
  assert pred12[0]["eval"] == pred12[1]["eval"] == pred1["eval"]
  assert pred12[1]["writes"] == [] and len(pred12[0]["writes"]) == len(set(
      pred12[0]["writes"])) == 8
  for name in os.listdir(tmp_path / "pred_one" / "test"):
    assert (tmp_path / "pred_one" / "test" / name).read_bytes() == (
        tmp_path / "pred_one_on_two" / "test" / name).read_bytes()
  # The 2-process checkpoint restores in 1 process.
  assert back[0]["n"] == 8 and len(os.listdir(tmp_path / "pred_two" / "test")) == 8
  assert back[0]["eval"]["num_images"] == 8


_STAGE2 = _COMMON + r"""
from test_stage2 import small_config
from idgbr_jax.assembly import stage2 as assembly
from idgbr_jax.inference import refine
from idgbr_jax.train import optim, stage2

cfg = small_config(data=-1)
cfg.data.data_dir = A["data_dir"]
cfg.data.coarse_dir = A["coarse_dir"]
cfg.optim.optimizer = "sgd"
cfg.optim.learning_rate = 0.05
cfg.num_train_steps = 2
cfg.eval_every_steps = -1
if A.get("train"):
  out = stage2.train_and_evaluate(cfg, A["train"])
  save_tree(A["train"] + ".final.npz", out["state"]["params"])
  # The init, recomputed (the same values), after training: the processes reach the gathers
  # together (a first gloo collective waits ~30 s at most for every peer to connect).
  ref = assembly.build_refiner(cfg)
  tx, _ = optim.make_optimizer(cfg.optim, cfg.num_train_steps)
  init, _ = stage2.init_state(ref, tx, cfg, sharding.mesh_from_config(cfg),
                              tuple(cfg.sharding_rules))
  save_tree(A["train"] + ".init.npz", init["params"])
  emit({"what": "train"})
if A.get("refine"):
  src, images, coarse, dst = A["refine"]
  loaded = assembly.load_refiner(src)
  report = refine.evaluate(loaded.refiner, loaded.trainable, loaded.frozen, loaded.config,
                           loaded.mesh)
  WRITES.clear()
  from idgbr_jax import cli
  try:
    cli.main(["idgbr", "refine", f"--checkpoint={src}", f"--images={images}",
              f"--coarse={coarse}", f"--out={dst}", "--num_steps=2", "--batch_size=8"])
  except SystemExit as e:
    assert not e.code, e.code
  emit({"what": "refine", "writes": list(WRITES), "eval": report})
"""


def test_stage2_two_processes_equal_one(tmp_path):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from test_stage2 import _write_split, small_config  # pylint: disable=import-outside-toplevel
  config = small_config()
  config.data.data_dir = str(tmp_path / "tfds")
  coarse = str(tmp_path / "coarse")
  for split in ("train", "test"):
    ds = _write_split(config, split, coarse, lambda l: np.roll(l, 1, axis=0))
  images = tmp_path / "images"
  images.mkdir()
  for i in range(len(ds)):
    ex = ds[i]
    Image.fromarray(np.repeat(ex["image"][..., :1], 3, -1).astype(np.uint8)).save(
        images / f"{ex['id']}.png")
  args = dict(data_dir=config.data.data_dir, coarse_dir=coarse)
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  coarse_test = os.path.join(coarse, "test")

  [single] = _run(_STAGE2, 1, **args, train=one,
                  refine=[one, str(images), coarse_test, str(tmp_path / "ref_one")])
  double = _run(_STAGE2, 2, **args, train=two,
                refine=[one, str(images), coarse_test, str(tmp_path / "ref_one_on_two")])
  [back] = _run(_STAGE2, 1, **args,
                refine=[two, str(images), coarse_test, str(tmp_path / "ref_two")])

  # Same training (a batch of 8 latents of 8x8x4 per step; the denoiser's sums run over it).
  (f1, i1), (f2, i2) = _final_and_init(one), _final_and_init(two)
  for k in i1:
    np.testing.assert_array_equal(i1[k], i2[k], err_msg=k)
  numerics.assert_close_up_to_rounding(numerics.updates(f2, i2), numerics.updates(f1, i1),
                                       n_terms=8 * 32 * 32, extra_atol=numerics.ulps(f1, 2))
  assert len(_events(one)) == len(_events(two)) == 1

  # The 1-process checkpoint refined on 2 processes: same report, each file written once.
  ref1, ref12 = single[1], [r[1] for r in double]
  assert ref12[0]["eval"] == ref12[1]["eval"] == ref1["eval"]
  n = len(ds)
  assert ref12[1]["writes"] == [] and len(set(ref12[0]["writes"])) == len(ref12[0]["writes"]) == n
  for name in os.listdir(tmp_path / "ref_one"):
    assert (tmp_path / "ref_one" / name).read_bytes() == (
        tmp_path / "ref_one_on_two" / name).read_bytes()
  # The 2-process checkpoint restores and refines in 1 process.
  assert len(back[0]["writes"]) == n and back[0]["eval"]["refined"]["num_images"] == n


_DCN = _COMMON + r"""
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
# Two granules (processes here, TPU slices on a pod): data parallel across them, fsdp inside.
mesh = sharding.make_mesh({"data": 1, "fsdp": 4}, dcn_shape={"data": 2})
rows = [sorted({d.process_index for d in row.flat}) for row in mesh.devices]
x = jax.make_array_from_process_local_data(
    NamedSharding(mesh, P(("data", "fsdp"))), np.full((4,), jax.process_index() + 1.0), (8,))
total = float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
emit({"shape": dict(mesh.shape), "rows": rows, "total": total})
"""


def test_multi_slice_mesh_puts_each_granule_on_its_own_data_row():
  results = _run(_DCN, 2)
  for [r] in results:
    assert r["shape"] == {"data": 2, "fsdp": 4, "tensor": 1}
    assert r["rows"] == [[0], [1]]  # a data row never spans the (slow) network between granules
    assert r["total"] == 4 * 1.0 + 4 * 2.0


_PREEMPT = _COMMON + r"""
import signal, time
from test_stage1 import tiny_config
from idgbr_jax.commands import train as train_command
from idgbr_jax.data import pipeline

cfg = tiny_config(A["data_dir"], data=-1)
cfg.num_train_steps = A["steps"]
cfg.checkpoint_every_steps = 1000  # only the final (or the preemption) checkpoint
if A.get("term_at") and jax.process_index() == 1:
  # Process 1 alone gets the notice (as one preempted VM of a pod would); after it, steps are
  # slowed so the sync protocol has time to agree on a step before the run would end.
  calls, real = {"n": 0}, pipeline.to_global
  def to_global(*a, **kw):
    calls["n"] += 1
    if calls["n"] == A["term_at"]:
      os.kill(os.getpid(), signal.SIGTERM)
    if calls["n"] >= A["term_at"]:
      time.sleep(0.1)
    return real(*a, **kw)
  pipeline.to_global = to_global
out = train_command.run(cfg, A["workdir"])
save_tree(A["workdir"] + f".{A['tag']}.npz", out["state"]["params"])
emit({"preempted_at": out["preempted_at"], "step": int(out["state"]["step"])})
"""


def test_a_notice_on_one_host_saves_the_same_step_on_all_and_resumes_bit_identical(tmp_path):
  from test_stage1 import tiny_config  # pylint: disable=import-outside-toplevel
  from idgbr_jax.data import sources  # pylint: disable=import-outside-toplevel
  data_dir = str(tmp_path / "tfds")
  sources.get_source(tiny_config(data_dir).data, "train")
  full, broken = str(tmp_path / "full"), str(tmp_path / "broken")
  _run(_PREEMPT, 2, data_dir=data_dir, workdir=full, steps=60, tag="final")
  stopped = _run(_PREEMPT, 2, data_dir=data_dir, workdir=broken, steps=60, term_at=5,
                 tag="stopped")
  at = {r[0]["preempted_at"] for r in stopped}
  assert len(at) == 1 and None not in at  # both processes saved the same step and returned
  [step] = at
  assert 5 <= step < 60
  resumed = _run(_PREEMPT, 2, data_dir=data_dir, workdir=broken, steps=60, tag="final")
  assert {r[0]["step"] for r in resumed} == {60}
  with np.load(full + ".final.npz") as a, np.load(broken + ".final.npz") as b:
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
