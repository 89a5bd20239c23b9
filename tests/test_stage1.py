"""Stage I trainer on a real (4, 2) mesh of fake CPU devices: sharded == unsharded, resume is
exact, the input pipeline is deterministic, and bad inputs fail with errors that name them."""
import copy
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import numerics
from idgbr_configs import stage1_synthetic
from idgbr_jax.assembly import stage1 as assembly1
from idgbr_jax.data import pipeline, sources, transforms
from idgbr_jax.parallel import sharding
from idgbr_jax.parallel.sharding import DEFAULT_RULES
from idgbr_jax.train import common, optim, stage1

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def tiny_config(data_dir, **mesh):
  config = stage1_synthetic.get_config("runlocal")
  config.data.data_dir = data_dir
  config.data.image_size = 32
  config.data.num_train = 16
  config.data.num_test = 8
  config.batch_size = 8
  config.eval_batch_size = 8
  config.num_train_steps = 3
  config.eval_every_steps = -1
  config.checkpoint_every_steps = 100
  config.log_every_steps = 1
  config.optim.warmup_steps = 1
  config.mesh_shape.data = mesh.get("data", -1)
  config.mesh_shape.fsdp = mesh.get("fsdp", 1)
  config.mesh_shape.tensor = mesh.get("tensor", 1)
  return config


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _sgd(cfg, num_train_steps):
  """`optim.make_optimizer` with plain SGD on the config's learning-rate schedule."""
  schedule = optim.learning_rate_schedule(cfg, num_train_steps)
  return numerics.sgd_keeping_gradients(schedule), schedule


def test_sharded_step_equals_single_device(data_dir, tmp_path, monkeypatch):
  """The trainer on a (data 4, fsdp 2) mesh and on one device: gradients, weights and BatchNorm
  statistics agree to float32 rounding (tests/numerics.py). Plain SGD, not the config's AdamW:
  Adam turns the rounding noise of a ~0 gradient (e.g. a bias that BatchNorm cancels) into a
  full learning-rate step, whose size depends on the CPU model's summation order."""
  assert jax.device_count() == 8
  monkeypatch.setattr(optim, "make_optimizer", _sgd)
  config = tiny_config(data_dir, data=4, fsdp=2)
  config.optim.learning_rate = 0.1  # SGD: updates well above the float32 ulp of the weights
  config.eval_every_steps = 3  # the in-training evaluation runs the evaluation suite
  sharded = stage1.train_and_evaluate(config, str(tmp_path / "a"))
  report = sharded["eval"]
  assert report["num_images"] == 8 and 0.0 <= report["miou"] <= 1.0
  assert 0.0 <= report["wf_min"] <= report["wf_mean"] <= 1.0
  config = tiny_config(data_dir, data=1)
  config.optim.learning_rate = 0.1
  single = stage1.train_and_evaluate(config, str(tmp_path / "b"))
  p_sharded, p_single = _host(sharded["state"]["params"]), _host(single["state"]["params"])
  leaves = jax.tree.leaves(sharded["state"]["params"])
  assert any(len(x.sharding.device_set) == 8 for x in leaves)  # really ran on the mesh
  assert any(x.sharding.spec != jax.sharding.PartitionSpec() for x in leaves)  # fsdp-sharded
  # Training moved the params ...
  model = assembly1.build_model(config, sources.num_classes(config.data))
  tx, _ = optim.make_optimizer(config.optim, config.num_train_steps)
  init_rng = jax.random.split(jax.random.key(config.seed))[0]  # as the trainer splits it
  init, _ = sharding.create_sharded(stage1.make_init_fn(model, tx, 32), init_rng,
                                  sharding.make_mesh(config.mesh_shape.to_dict()), DEFAULT_RULES)
  init = _host(init["params"])
  moved = max(float(np.abs(a - b).max()) for a, b in
              zip(jax.tree.leaves(init), jax.tree.leaves(p_single)))
  assert moved > 1e-3
  # ... and both runs moved them the same way, to float32 rounding: the last step's gradient, the
  # weights (compared as updates, plus half an ulp of rounding per step and run) and the
  # BatchNorm statistics. The longest reduction: the loss's mean over the batch's pixels.
  assert int(sharded["state"]["step"]) == int(single["state"]["step"]) == 3
  n = config.batch_size * 32 * 32
  numerics.assert_close_up_to_rounding(
      numerics.last_gradient(_host(sharded["state"]["opt_state"])),
      numerics.last_gradient(_host(single["state"]["opt_state"])), n_terms=n,
      err_msg="gradient")
  numerics.assert_close_up_to_rounding(numerics.updates(p_sharded, init),
                                       numerics.updates(p_single, init), n_terms=n,
                                       extra_atol=numerics.ulps(init, 3), err_msg="update")
  numerics.assert_close_up_to_rounding(_host(sharded["state"]["batch_stats"]),
                                       _host(single["state"]["batch_stats"]), n_terms=n,
                                       err_msg="batch_stats")


def test_resume_continues_identically(data_dir, tmp_path, monkeypatch):
  config = tiny_config(data_dir, data=4, fsdp=2)
  config.num_train_steps = 4
  config.checkpoint_every_steps = 2
  full = stage1.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "full"))

  # Crash while loading the batch of step 3, after the step-2 checkpoint was written.
  calls = {"n": 0}
  real_to_global = pipeline.to_global
  def crashing(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:
      raise KeyboardInterrupt("simulated preemption")
    return real_to_global(*args, **kwargs)
  monkeypatch.setattr(pipeline, "to_global", crashing)
  with pytest.raises(KeyboardInterrupt):
    stage1.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "resumed"))
  monkeypatch.setattr(pipeline, "to_global", real_to_global)
  resumed = stage1.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "resumed"))

  assert int(resumed["state"]["step"]) == 4
  # Same program, same mesh, same machine: XLA is deterministic, so resuming is bit-exact (Adam
  # included; tests/numerics.py). Only comparisons across devices or code paths need tolerances.
  for a, b in zip(jax.tree.leaves(_host(full["state"])), jax.tree.leaves(_host(resumed["state"]))):
    np.testing.assert_array_equal(a, b)


def test_pipeline_is_deterministic_and_restorable(data_dir):
  config = tiny_config(data_dir)
  k = sources.num_classes(config.data)
  it1, it2 = iter(pipeline.train_dataset(config, k)), iter(pipeline.train_dataset(config, k))
  batches1 = [next(it1) for _ in range(3)]
  batches2 = [next(it2) for _ in range(3)]
  for b1, b2 in zip(batches1, batches2):
    np.testing.assert_array_equal(b1["image"], b2["image"])
    np.testing.assert_array_equal(b1["label"], b2["label"])
  assert batches1[0]["image"].shape == (8, 32, 32, 3)
  assert batches1[0]["image"].dtype == np.float32
  assert not np.array_equal(batches1[0]["image"], batches1[1]["image"])
  # The stream's position is the step: starting at step 3 gives the 4th batch exactly (what a
  # resumed run reads; no iterator state is saved).
  expected = next(it1)
  it3 = iter(pipeline.train_dataset(config, k, start_step=3))
  np.testing.assert_array_equal(next(it3)["image"], expected["image"])
  # Another seed shuffles differently.
  other = copy.deepcopy(config)
  other.seed = 1
  assert not np.array_equal(next(iter(pipeline.train_dataset(other, k)))["image"],
                            batches1[0]["image"])


def test_paired_augmentation_keeps_image_and_label_aligned():
  rng = np.random.default_rng(0)
  label = rng.integers(0, 6, (16, 16)).astype(np.int32)
  image = np.repeat(label[..., None] * 40, 3, axis=-1).astype(np.uint8)
  example = {"image": image, "label": label, "coarse": label.copy(), "id": "x"}
  seen = set()
  for seed in range(20):
    out = transforms.RandomFlipRot().random_map(example, np.random.default_rng(seed))
    np.testing.assert_array_equal(out["image"][..., 0] // 40, out["label"])
    np.testing.assert_array_equal(out["coarse"], out["label"])
    seen.add(out["label"].tobytes())
  assert len(seen) >= 5  # flips x rotations really vary
  crop = transforms.RandomCrop(8).random_map(example, np.random.default_rng(0))
  assert crop["label"].shape == (8, 8)
  np.testing.assert_array_equal(crop["image"][..., 0] // 40, crop["label"])


def test_normalisation_modes():
  img = np.array([[[0, 128, 255]]], np.uint8)
  np.testing.assert_allclose(transforms.normalize_image(img, "minus_one_one")[0, 0],
                             [-1.0, 128 / 255 * 2 - 1, 1.0], atol=1e-6)
  np.testing.assert_allclose(transforms.normalize_image(img, "imagenet")[0, 0],
                             ([0, 128 / 255, 1] - transforms.IMAGENET_MEAN) / transforms.IMAGENET_STD,
                             rtol=1e-6)
  with pytest.raises(ValueError, match="normalization"):
    transforms.normalize_image(img, "zscore")


def test_label_out_of_range_names_the_example():
  parse = transforms.ParseExample(num_classes=6)
  bad = {"image": np.zeros((4, 4, 3), np.uint8), "label": np.full((4, 4, 1), 9, np.uint8),
         "id": b"tile_007"}
  with pytest.raises(sources.DataError, match=r"tile_007.*\[9\]"):
    parse.map(bad)
  ok = {**bad, "label": np.full((4, 4, 1), 255, np.uint8)}  # ignore_index passes
  assert parse.map(ok)["label"].max() == 255
  binary = transforms.ParseExample(num_classes=2, binarize_labels=True)
  assert binary.map({**bad, "label": np.full((4, 4, 1), 9, np.uint8)})["label"].max() == 1


def test_missing_coarse_map_names_the_file(tmp_path):
  attach = transforms.AttachCoarse(str(tmp_path), num_classes=6)
  with pytest.raises(sources.DataError, match="tile_1.png"):
    attach.map({"image": np.zeros((4, 4, 3), np.uint8), "label": np.zeros((4, 4), np.int32),
                "id": "tile_1"})


def test_corrupt_record_names_dataset_and_record(data_dir, tmp_path):
  import shutil
  config = tiny_config(data_dir)
  sources.get_source(config.data, "test")  # make sure it is built
  corrupt_dir = tmp_path / "tfds"
  shutil.copytree(data_dir, corrupt_dir)
  files = [os.path.join(r, f) for r, _, fs in os.walk(corrupt_dir) for f in fs
           if "test.array_record" in f]
  assert files
  with open(files[0], "r+b") as f:  # keep the container's framing, destroy the payloads
    data = bytearray(f.read())
    for i in range(len(data) // 4, len(data) * 3 // 4):
      data[i] = (data[i] * 7 + 13) % 256
    f.seek(0)
    f.write(data)
  config.data.data_dir = str(corrupt_dir)
  with pytest.raises(sources.DataError, match=r"synthetic_rs.*test.*record"):
    src = sources.get_source(config.data, "test")
    for i in range(len(src)):
      src[i]


def test_unwritable_workdir_is_reported_before_work(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("x")
  with pytest.raises(common.WorkdirError, match="a_file"):
    common.ensure_workdir(str(blocker / "run"))


def _idgbr(*args, timeout=120):
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  return subprocess.run([sys.executable, "-m", "idgbr_jax.cli", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=timeout)


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
  out = _idgbr("train", "--config=configs/stage1_synthetic.py:runlocal",
               f"--workdir={tmp_path}", "--config.optim.lrr=1")
  assert out.returncode != 0
  assert "lrr" in out.stderr
  out = _idgbr("train", "--config=configs/stage1_synthetic.py:runlocal,bogus=1",
               f"--workdir={tmp_path}")
  assert out.returncode != 0 and "bogus" in out.stderr
  assert not os.path.exists(tmp_path / "checkpoints")  # nothing started
