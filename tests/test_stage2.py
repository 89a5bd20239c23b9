"""Stage II: the refiner's train step (loss goes down, sharded == one device), Control-CFG
batching, seeded refinement, and the train -> checkpoint -> `idgbr refine` path."""
import copy
import os
import subprocess
import sys

import jax
import flax.linen as nn
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import numerics
from idgbr_configs import stage2_synthetic
from idgbr_jax.assembly import stage2 as assembly
from idgbr_jax.data import pipeline, sources
from idgbr_jax.inference import refine as refine_lib
from idgbr_jax.inference.stage1 import write_png
from idgbr_jax.models import refiner
from idgbr_jax.parallel import sharding
from idgbr_jax.train import optim, stage2
from importtime import assert_not_imported

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 32


def small_config(**mesh):
  """3-level / 1-layer SD-layout denoiser: every code path of the 4-level one, less compile."""
  config = stage2_synthetic.get_config("runlocal")
  config.model.denoiser_overrides = ml_collections.ConfigDict(dict(
      block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8,
      down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
      up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")))
  config.model.guidance_width = 16
  config.model.guidance_heads = 2
  config.model.guidance_init_mode = "paper"
  config.data.image_size = SIZE
  config.optim.schedule = "constant"
  config.optim.learning_rate = 1e-3
  config.mesh_shape.data = mesh.get("data", 1)
  config.mesh_shape.fsdp = mesh.get("fsdp", 1)
  return config


def fixed_batch(b=8):
  rng = np.random.default_rng(0)
  label = np.zeros((b, SIZE, SIZE), np.int32)
  label[:, :, SIZE // 2:] = 1
  label[:, SIZE // 4:SIZE // 2, :SIZE // 3] = 2
  image = rng.normal(size=(b, SIZE, SIZE, 3)).astype(np.float32) * 0.1 + label[..., None] * 0.5
  return {"image": image, "label": label, "coarse": np.roll(label, 2, axis=1)}


def build(config, tx=None):
  """`tx`: an optimizer instead of the config's (AdamW)."""
  mesh = sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  ref = refiner.Refiner(assembly.refiner_config(config, 6))
  config_tx, lr = optim.make_optimizer(config.optim, config.num_train_steps)
  tx = tx or config_tx
  state, state_sh = stage2.init_state(ref, tx, config, mesh, rules)
  frozen, f_sh = stage2.init_frozen(ref, config, state, state_sh, mesh, rules)
  step = jax.jit(stage2.make_train_step(ref, tx, lr, assembly.make_schedule(config), config),
                 in_shardings=(state_sh, f_sh, stage2.batch_shardings(mesh, rules),
                               sharding.replicated(mesh)),
                 out_shardings=(state_sh, sharding.replicated(mesh)))
  return ref, mesh, state, frozen, step


@pytest.fixture(scope="module")
def single():
  return build(small_config())


@pytest.mark.slow
def test_train_step_lowers_loss_on_a_fixed_batch(single):
  ref, mesh, state, frozen, step = single
  batch = pipeline.to_global(fixed_batch(), mesh)
  rng = jax.random.key(0)

  def loss_at_step0(state):
    # The step's noise, timesteps and REPA switch are functions of (rng, step): evaluating
    # every params at step 0 scores them on the same draw.
    _, m = step({**state, "step": jnp.zeros((), jnp.int32)}, frozen, batch, rng)
    return m.compute()

  before = loss_at_step0(state)
  repa = []
  for _ in range(10):
    state, m = step(state, frozen, batch, rng)
    repa.append(float(m.compute()["repa"]))
  after = loss_at_step0(state)
  assert int(state["step"]) == 10
  assert np.isfinite(float(after["loss"]))
  assert float(after["mse"]) < 0.8 * float(before["mse"]), (before, after)
  # REPA is active for the first `active_steps` (2 in runlocal) steps only. At init the CG
  # residuals are exactly zero (zero-initialised output convs), so the student has no direction
  # and the masked loss is 0; after training it aligns.
  assert float(before["repa"]) == 0.0 and float(after["repa"]) < 0.0
  assert all(r == 0.0 for r in repa[2:])


# The longest reduction in a step: the mean over the batch's pixels (tests/numerics.py).
N_TERMS = 8 * SIZE * SIZE


def _assert_same_step(got, want, before, *, keys=("loss",), what=""):
  """Two runs of one train step from the same params `before`, each (state, computed metrics)
  under SGD keeping its gradient: the metrics `keys`, the gradient and the update agree to
  float32 rounding (tests/numerics.py)."""
  (s_got, m_got), (s_want, m_want) = got, want
  for key in keys:
    numerics.assert_close_up_to_rounding(float(m_got[key]), float(m_want[key]),
                                         n_terms=N_TERMS, err_msg=f"{what} {key}")
  numerics.assert_close_up_to_rounding(numerics.last_gradient(jax.device_get(s_got["opt_state"])),
                                       numerics.last_gradient(jax.device_get(s_want["opt_state"])),
                                       n_terms=N_TERMS, err_msg=f"{what} gradient")
  # The update (-lr * gradient), plus the rounding of adding it to the float32 weights (half an
  # ulp in each run).
  numerics.assert_close_up_to_rounding(numerics.updates(s_got["params"], before),
                                       numerics.updates(s_want["params"], before),
                                       n_terms=N_TERMS, extra_atol=numerics.ulps(before),
                                       err_msg=f"{what} update")


@pytest.mark.slow
def test_sharded_step_equals_single_device():
  """A step on a (data 4, fsdp 2) mesh equals the step on one device: loss, gradients and update
  agree to float32 rounding (tests/numerics.py), from the init and from a trained state (where the
  CG net's attention, behind zero-initialised projections at init, has gradients too). Plain SGD,
  not the config's AdamW: Adam turns the rounding noise of a ~0 gradient into a full learning-rate
  step, whose size depends on the CPU model's summation order."""
  assert jax.device_count() == 8
  tx = numerics.sgd_keeping_gradients(1e-3)
  _, mesh1, state1, frozen1, step1 = build(small_config(), tx)
  _, mesh8, state8, frozen8, step8 = build(small_config(data=4, fsdp=2), tx)
  # Both start from the same init (a function of the seed only; element-wise maths, so equal up
  # to an ulp where vectorised and scalar code round differently).
  for a, b in zip(jax.tree.leaves(state8["params"]), jax.tree.leaves(state1["params"])):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2 * numerics.eps(), atol=0)
  state8_sh = jax.tree.map(lambda x: x.sharding, state8)
  batch = fixed_batch()
  rng = jax.random.key(3)
  for i in (1, 2):
    if i == 2:  # step 2 from the same state, so that each step is compared on its own rounding
      state8 = jax.device_put(jax.device_get(state1), state8_sh)
    before = jax.device_get(state1["params"])
    state1, m1 = step1(state1, frozen1, pipeline.to_global(batch, mesh1), rng)
    state8, m8 = step8(state8, frozen8, pipeline.to_global(batch, mesh8), rng)
    _assert_same_step((state8, m8.compute()), (state1, m1.compute()), before, what=f"step {i}")
  assert any(len(x.sharding.device_set) == 8 for x in jax.tree.leaves(state8["params"]))


@pytest.mark.slow
def test_step_without_teacher_is_the_warmup_step_after_the_warmup(single):
  """After `repa.active_steps` the trainer runs a second program, compiled without the teacher
  and its REPA branch, on the frozen tree without the teacher. Past the warm-up it is the
  warm-up program's step: loss, gradient and update agree to float32 rounding and both report
  repa 0. Inside the warm-up the REPA term is on, so the switch must not come earlier."""
  ref, mesh, state, frozen, _ = single
  config = small_config()
  lr = optim.learning_rate_schedule(config.optim, config.num_train_steps)
  tx = numerics.sgd_keeping_gradients(lr)  # Adam would amplify rounding (tests/numerics.py)
  params = jax.device_get(state["params"])
  # Non-zero CG residuals: the student has a direction, so REPA is non-zero in the warm-up.
  params["guidance"] = jax.tree.map(lambda x: x + 0.05, params["guidance"])
  without = {k: v for k, v in frozen.items() if k != "teacher"}
  assert "teacher" in frozen
  schedule = assembly.make_schedule(config)
  warmup_step, after_step = (
      jax.jit(stage2.make_train_step(ref, tx, lr, schedule, config, with_teacher=w))
      for w in (True, False))
  batch = pipeline.to_global(fixed_batch(), mesh)
  rng = jax.random.key(7)

  def run(step_fn, fr, at):
    s = jax.device_put({"params": params, "opt_state": tx.init(params), "step": np.int32(at)},
                       sharding.replicated(mesh))
    out, m = step_fn(s, fr, batch, rng)
    return out, m.compute()

  first_after = config.repa.active_steps  # the state's step counter: steps already taken
  s_w, m_w = run(warmup_step, frozen, first_after)
  s_a, m_a = run(after_step, without, first_after)
  assert float(m_w["repa"]) == float(m_a["repa"]) == 0.0
  _assert_same_step((s_a, m_a), (s_w, m_w), params)
  _, m_in = run(warmup_step, frozen, first_after - 1)
  assert abs(float(m_in["repa"])) > 1e-3  # the last warm-up step still has its REPA term


@pytest.mark.slow
def test_split_step_is_the_one_program_step():
  """`config.split_step`: the trainer's step as three programs (prepare, grads, apply) on the
  (data 4, fsdp 2) mesh is the one-program step: loss, REPA term, gradient and update agree to
  float32 rounding, inside the REPA warm-up (teacher tokens computed in `prepare`) and after
  it (the program without the teacher)."""
  config = small_config(data=4, fsdp=2)
  mesh = sharding.make_mesh(config.mesh_shape.to_dict())
  rules = tuple(config.sharding_rules)
  ref = refiner.Refiner(assembly.refiner_config(config, 6))
  lr = optim.learning_rate_schedule(config.optim, config.num_train_steps)
  tx = numerics.sgd_keeping_gradients(lr)  # Adam would amplify rounding (tests/numerics.py)
  state, state_sh = stage2.init_state(ref, tx, config, mesh, rules)
  frozen, f_sh = stage2.init_frozen(ref, config, state, state_sh, mesh, rules)
  params = jax.device_get(state["params"])
  # Non-zero CG residuals: the student has a direction, so REPA is non-zero in the warm-up.
  params["guidance"] = jax.tree.map(lambda x: x + 0.05, params["guidance"])
  schedule = assembly.make_schedule(config)
  batch = pipeline.to_global(fixed_batch(), mesh, rules)
  batch_sh = stage2.batch_shardings(mesh, rules)
  rng = jax.random.key(11)
  without = {k: v for k, v in frozen.items() if k != "teacher"}
  without_sh = {k: v for k, v in f_sh.items() if k != "teacher"}
  for at, fr, fr_sh in ((0, frozen, f_sh), (config.repa.active_steps, without, without_sh)):
    results = []
    for split in (False, True):
      config.split_step = split
      step_fn = stage2.jit_train_step(ref, tx, lr, schedule, config, mesh, rules, state_sh,
                                      fr_sh, batch_sh, with_teacher="teacher" in fr)
      assert isinstance(step_fn, stage2.SplitTrainStep) == split
      s = jax.device_put({"params": params, "opt_state": tx.init(params),
                          "step": np.int32(at)}, state_sh)
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out, m = step_fn(s, fr, batch, rng)
      results.append((jax.device_get(out), m.compute()))
    (s_one, m_one), (s_split, m_split) = results
    assert int(s_split["step"]) == at + 1
    assert (float(m_one["repa"]) != 0.0) == (at == 0)  # REPA on in the warm-up only
    _assert_same_step((s_split, m_split), (s_one, m_one), params,
                      keys=("loss", "repa", "mse"), what=f"step {at + 1}")


def test_which_steps_need_the_teacher():
  """Loop steps 1..active_steps run the program with the teacher (REPA's warm-up: the state has
  taken step - 1 < active_steps steps); later ones without it, unless repa.drop_teacher=False;
  a teacher REPA never uses is never needed."""
  config = small_config()
  ref = refiner.Refiner(assembly.refiner_config(config, 6))
  warmup = config.repa.active_steps
  assert warmup == 2
  needs = lambda: [stage2.step_needs_teacher(ref, config, s) for s in (1, 2, 3, 4)]  # noqa: E731
  assert needs() == [True, True, False, False]
  config.repa.drop_teacher = False
  assert needs() == [True] * 4
  config.repa.active_steps = 0
  assert needs() == [False] * 4
  config.repa.active_steps, config.repa.enabled = 2, False
  assert needs() == [False] * 4


@pytest.mark.slow
@pytest.mark.parametrize("split_step", [False, True])
def test_trainer_drops_the_teacher_after_the_warmup(tmp_path, monkeypatch, split_step):
  """The trainer compiles the step without the teacher only when the warm-up ends and frees the
  teacher then; resumed inside the warm-up it loads the teacher, resumed after it never does.
  The same with the step as three programs (`config.split_step`)."""
  config = small_config()
  config.split_step = split_step
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.coarse_dir = str(tmp_path / "coarse")
  _write_split(config, "train", config.data.coarse_dir, lambda l: np.roll(l, 1, axis=0))
  config.checkpoint_every_steps = 1
  config.eval_every_steps = -1
  config.num_eval_panels = 0
  programs, frozen_built = [], []
  real_step, real_frozen = stage2.make_step_parts, assembly.init_frozen
  jitted = []
  real_jit = stage2.jit_train_step

  def jit_spy(*args, **kw):
    jitted.append(real_jit(*args, **kw))
    return jitted[-1]
  monkeypatch.setattr(stage2, "jit_train_step", jit_spy)

  def step_spy(*args, with_teacher=True, **kw):
    programs.append(with_teacher)
    return real_step(*args, with_teacher=with_teacher, **kw)

  def frozen_spy(*args, with_teacher=True, **kw):
    frozen_built.append(with_teacher)
    return real_frozen(*args, with_teacher=with_teacher, **kw)
  monkeypatch.setattr(stage2, "make_step_parts", step_spy)
  monkeypatch.setattr(assembly, "init_frozen", frozen_spy)

  def run(steps):
    programs.clear()
    frozen_built.clear()
    config.num_train_steps = steps
    out = stage2.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "run"))
    assert int(out["state"]["step"]) == steps
    return out

  # repa.active_steps = 2 (runlocal): steps 1 and 2 with the teacher, 3 on without.
  out = run(1)
  assert programs == [True] and frozen_built == [True] and "teacher" in out["frozen"]
  out = run(3)  # resumed inside the warm-up: the teacher is loaded, then dropped after step 2
  assert programs == [True, False] and frozen_built == [True]
  assert "teacher" not in out["frozen"]
  out = run(4)  # resumed after it: never loaded
  assert programs == [False] and frozen_built == [False]
  assert all(isinstance(j, stage2.SplitTrainStep) == split_step for j in jitted) and jitted


@pytest.mark.slow
def test_trainer_compiles_the_refine_function_once_for_all_evaluations(tmp_path, monkeypatch):
  """Evaluations and their panels share one refine function (one trace and compile per run);
  the last evaluation's numbers are those of a freshly built one."""
  config = small_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.coarse_dir = str(tmp_path / "coarse")
  for split in ("train", "test"):
    _write_split(config, split, config.data.coarse_dir, lambda l: np.roll(l, 1, axis=0))
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  config.eval_every_steps = 1
  config.num_eval_panels = 1
  built = []
  real = refine_lib.make_refine_fn

  def spy(*args, **kw):
    built.append(kw.get("autoencode_only", False))
    return real(*args, **kw)
  monkeypatch.setattr(refine_lib, "make_refine_fn", spy)
  out = stage2.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "run"))
  monkeypatch.undo()
  assert built == [False]  # two evaluations, two panel sets, one refine function
  assert sorted(os.listdir(tmp_path / "run" / "panels")) == ["step_1", "step_2"]
  again = refine_lib.evaluate(out["refiner"], out["state"]["params"], out["frozen"], config,
                              out["mesh"])
  for key in ("miou", "wf_min", "wf_mean", "biou"):
    assert out["eval"]["refined"][key] == again["refined"][key], key


@pytest.mark.slow
def test_frozen_weights_in_bfloat16(single):
  """`model.frozen_dtype=bfloat16` stores the frozen weights (not the text context) in bf16:
  the float32 values rounded. Layers compute in float32 from them, so the step's loss moves by
  the weights' rounding only; `full_precision` (export) keeps them as read."""
  ref, mesh, state, frozen, step = single
  config = small_config()
  config.model.frozen_dtype = "bfloat16"
  rules = tuple(config.sharding_rules)
  f_sh = jax.tree.map(lambda x: x.sharding, frozen)
  copied = jax.tree.map(jnp.copy, frozen)
  bf16 = assembly.cast_frozen(copied, jnp.bfloat16)
  # Consumed: each float32 weight is freed once cast (the context is kept, not a weight).
  assert all(x.is_deleted() for x in jax.tree.leaves(copied["vae"]))
  assert not copied["context"].is_deleted()
  for k in assembly.FROZEN_WEIGHTS:
    for got, want, sh in zip(jax.tree.leaves(bf16[k]), jax.tree.leaves(frozen[k]),
                             jax.tree.leaves(f_sh[k])):
      assert got.dtype == jnp.bfloat16 and got.sharding == sh
      np.testing.assert_array_equal(np.asarray(got), np.asarray(want).astype(jnp.bfloat16))
  assert bf16["context"].dtype == jnp.float32
  # The trainer's own path: init_frozen applies the config's dtype, unless full_precision.
  built, _ = assembly.init_frozen(ref, config, mesh, rules)
  assert {x.dtype for x in jax.tree.leaves(built["vae"])} == {jnp.dtype(jnp.bfloat16)}
  kept, _ = assembly.init_frozen(ref, config, mesh, rules, full_precision=True)
  assert {x.dtype for x in jax.tree.leaves(kept["vae"])} == {jnp.dtype(jnp.float32)}

  batch = pipeline.to_global(fixed_batch(), mesh)
  state0 = {**state, "step": jnp.zeros((), jnp.int32)}
  rng = jax.random.key(9)
  loss32 = float(step(state0, frozen, batch, rng)[1].compute()["loss"])
  loss16 = float(step(state0, bf16, batch, rng)[1].compute()["loss"])
  # bf16 keeps 8 significant bits (relative rounding <= 2**-9 per weight): the loss moves, by
  # far less than training changes it (test_train_step_lowers_loss...: > 20 %).
  assert loss16 != loss32 and abs(loss16 - loss32) <= 0.02 * loss32, (loss16, loss32)


@pytest.mark.slow
def test_cfg_batch_gives_conditional_and_zero_residual_branches(single):
  ref, mesh, state, frozen, _ = single
  params = jax.device_get(state["params"])
  # Make the CG residuals non-zero so the two branches really differ.
  params["guidance"] = jax.tree.map(lambda x: x + 0.05, params["guidance"])
  b = fixed_batch(2)
  cond = jax.jit(ref.encode_conditions)(frozen, jnp.asarray(b["image"]),
                                        jnp.asarray(b["coarse"]), jax.random.key(1))
  z = jax.random.normal(jax.random.key(2), (2, 4, 4, 4))
  t = jnp.int32(500)
  @jax.jit
  def all_three(params, frozen, z, cond):
    eps_c, eps_u = ref.eps_cfg(params, frozen, z, t, cond)
    eps_cond, _ = ref.eps(params, frozen, z, t, cond)
    eps_plain = ref.unet.apply({"params": params["unet"]}, z, jnp.full((2,), 500),
                               ref.context(frozen, 2))
    return eps_c, eps_u, eps_cond, eps_plain
  eps_c, eps_u, eps_cond, eps_plain = all_three(params, frozen, z, cond)
  # Batched (CFG: conditional and unconditional halves in one batch) vs separate calls: the same
  # sums over other batch shapes, so equal to float32 rounding (tests/numerics.py).
  for got, want, name in ((eps_c, eps_cond, "eps_c"), (eps_u, eps_plain, "eps_u")):
    numerics.assert_close_up_to_rounding(got, want, n_terms=2 * SIZE * SIZE, err_msg=name)
  assert float(jnp.abs(eps_c - eps_u).max()) > 1e-3


def _write_split(config, split, root, coarse_fn):
  k = sources.num_classes(config.data)
  ds = pipeline.eval_dataset(config, split, k, normalize=False)
  for i in range(len(ds)):
    ex = ds[i]
    write_png(os.path.join(root, split, f"{ex['id']}.png"), coarse_fn(ex["label"]))
  return ds


def _summary_tags(logdir) -> dict[str, set[str]]:
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  tags, plugins = set(), set()
  for path in logdir.glob("events.out.tfevents.*"):
    for event in tf.compat.v1.train.summary_iterator(str(path)):
      for value in event.summary.value:
        tags.add(value.tag)
        plugins.add(value.metadata.plugin_data.plugin_name)
  return {"tags": tags, "plugins": plugins}


@pytest.mark.slow
def test_train_resume_and_refine_command(tmp_path, monkeypatch):
  config = small_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.coarse_dir = str(tmp_path / "coarse")
  config.num_train_steps = 2
  config.checkpoint_every_steps = 2
  for split in ("train", "test"):
    ds = _write_split(config, split, config.data.coarse_dir, lambda l: np.roll(l, 1, axis=0))
  out = stage2.train_and_evaluate(copy.deepcopy(config), str(tmp_path / "run"))
  assert int(out["state"]["step"]) == 2
  # eval_every_steps=0 (the config's default) refines and scores the eval split once, after the
  # last step; the TensorBoard log holds the config as hparams and the eval scalars.
  assert config.eval_every_steps == 0
  assert out["eval"]["refined"]["num_images"] == out["eval"]["coarse"]["num_images"] == \
      config.data.num_test
  tags = _summary_tags(tmp_path / "run")
  assert "hparams" in tags["plugins"] and "eval/refined/wf_min" in tags["tags"]
  # Refinement is seeded: the same seed gives the same maps.
  refine_fn = refine_lib.make_refine_fn(
      out["refiner"], config, out["mesh"],
      jax.tree.map(lambda x: x.sharding, out["state"]["params"]),
      jax.tree.map(lambda x: x.sharding, out["frozen"]))
  args = (refine_fn, out["state"]["params"], out["frozen"],
          refine_lib.eval_split_dataset(config), config, out["mesh"])
  first = [r for _, r, _, _ in refine_lib.refine_dataset(*args)]
  again = [r for _, r, _, _ in refine_lib.refine_dataset(*args)]
  assert len(first) == config.data.num_test and first[0].shape == (SIZE, SIZE)
  # Same program, same devices, same machine: deterministic, so exact (tests/numerics.py).
  for a, b in zip(first, again):
    np.testing.assert_array_equal(a, b)
  assert max(int(r.max()) for r in first) < 6

  # Params-only load: the trained params, no optimizer state, no teacher, no projector, and the
  # only random init computed is what has no checkpoint (the tiny config's VAE and label
  # embedding; unet_ori is the encoder half of the seed's denoiser init, computed alone).
  created = []
  real_create = sharding.create_sharded

  def spy(init_fn, rng, *args):
    tree, sh = real_create(init_fn, rng, *args)
    created.append(sum(x.size for x in jax.tree.leaves(tree)))
    return tree, sh
  monkeypatch.setattr(sharding, "create_sharded", spy)
  loaded = assembly.load_refiner(str(tmp_path / "run"))
  monkeypatch.undo()
  assert set(loaded.trainable) == {"unet", "guidance"}
  assert set(loaded.frozen) == {"vae", "label_embed", "unet_ori", "context"}
  assert sum(created) == sum(x.size for k in ("vae", "label_embed")
                             for x in jax.tree.leaves(loaded.frozen[k]))
  for k in ("unet", "guidance"):
    jax.tree.map(np.testing.assert_array_equal, loaded.trainable[k], out["state"]["params"][k])
  for k in ("unet_ori", "vae", "label_embed", "context"):
    jax.tree.map(np.testing.assert_array_equal, loaded.frozen[k], out["frozen"][k])
  refine_fn = refine_lib.make_refine_fn(
      loaded.refiner, loaded.config, loaded.mesh,
      jax.tree.map(lambda x: x.sharding, loaded.trainable),
      jax.tree.map(lambda x: x.sharding, loaded.frozen))
  from_disk = [r for _, r, _, _ in refine_lib.refine_dataset(
      refine_fn, loaded.trainable, loaded.frozen, refine_lib.eval_split_dataset(config), config,
      loaded.mesh)]
  for a, b in zip(first, from_disk):
    np.testing.assert_array_equal(a, b)

  # The CLI rebuilds the refiner from the checkpoint alone and writes one PNG per image, without
  # importing TensorFlow or clu's writers (-X importtime lists every import on stderr).
  images = tmp_path / "images"
  for i in range(len(ds)):
    ex = ds[i]
    write_png(str(images / f"{ex['id']}.png"), ex["image"][..., 0])  # grey is fine for I/O
  from PIL import Image
  for p in images.iterdir():
    Image.open(p).convert("RGB").save(p)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
  res = subprocess.run(
      [sys.executable, "-X", "importtime", "-m", "idgbr_jax.cli", "refine",
       f"--checkpoint={tmp_path / 'run'}", f"--images={images}",
       f"--coarse={tmp_path / 'coarse' / 'test'}", f"--out={tmp_path / 'refined'}",
       "--num_steps=2"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert res.returncode == 0, res.stderr[-3000:]
  assert_not_imported(res.stderr, ("tensorflow", "clu.metric_writers"))
  written = sorted(os.listdir(tmp_path / "refined"))
  assert len(written) == len(ds)
  refined = np.asarray(Image.open(tmp_path / "refined" / written[0]))
  assert refined.shape == (SIZE, SIZE) and refined.max() < 6
  # A missing coarse map is reported by name, before any work.
  os.remove(tmp_path / "coarse" / "test" / written[0])
  res = subprocess.run(
      [sys.executable, "-m", "idgbr_jax.cli", "refine", f"--checkpoint={tmp_path / 'run'}",
       f"--images={images}", f"--coarse={tmp_path / 'coarse' / 'test'}",
       f"--out={tmp_path / 'refined2'}"], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=300)
  assert res.returncode != 0 and written[0] in res.stderr


# ----------------------------------------------------------------------------------------------
# Latent cache: the VAE posterior moments per (example, flip/rot), drawn from in the step.

@pytest.mark.slow
def test_cached_moments_step_equals_encoding_step(single):
  """A step fed cached posterior moments is the step that runs the VAE encoder (same draws)."""
  ref, mesh, state, frozen, _ = single
  config = small_config()
  # Plain SGD: its state keeps the step's gradient, which is compared (tests/numerics.py; Adam
  # would turn rounding noise into learning-rate steps).
  lr = optim.learning_rate_schedule(config.optim, config.num_train_steps)
  tx = numerics.sgd_keeping_gradients(lr)
  state = {**state, "opt_state": tx.init(state["params"])}
  rules = tuple(config.sharding_rules)
  keys = ("image", "label", "coarse")
  f_sh = jax.tree.map(lambda x: x.sharding, frozen)
  state_sh = jax.tree.map(lambda x: x.sharding, state)
  fn = stage2.make_train_step(ref, tx, lr, assembly.make_schedule(config), config)
  cached_step = jax.jit(fn, in_shardings=(state_sh, f_sh,
                                          stage2.batch_shardings(mesh, rules, keys),
                                          sharding.replicated(mesh)))
  plain_step = jax.jit(fn, in_shardings=(state_sh, f_sh, stage2.batch_shardings(mesh, rules),
                                         sharding.replicated(mesh)))
  batch = fixed_batch()
  moments = jax.jit(lambda f, b: {"image_moments": ref.image_moments(f, b["image"]),
                                  "label_moments": ref.label_moments(f, b["label"]),
                                  "coarse_moments": ref.label_moments(f, b["coarse"])})(
                                      frozen, batch)
  cached = {**batch, **{k: np.asarray(v) for k, v in moments.items()}}
  # Garbage pixels prove the cached step never encodes them (the moments are all it uses).
  cached["label"] = np.zeros_like(batch["label"])
  cached["coarse"] = np.zeros_like(batch["coarse"])
  rng = jax.random.key(5)
  s_plain, m_plain = plain_step(state, frozen, pipeline.to_global(batch, mesh), rng)
  s_cached, m_cached = cached_step(state, frozen, pipeline.to_global(cached, mesh), rng)
  # The moments come from a separately compiled encoder: equal to float32 rounding.
  numerics.assert_close_up_to_rounding(float(m_cached.compute()["loss"]),
                                       float(m_plain.compute()["loss"]), n_terms=N_TERMS,
                                       err_msg="loss")
  numerics.assert_close_up_to_rounding(
      numerics.last_gradient(jax.device_get(s_cached["opt_state"])),
      numerics.last_gradient(jax.device_get(s_plain["opt_state"])), n_terms=N_TERMS,
      err_msg="gradient")
  # ... and a wrong moment changes the loss (the cached values are really used).
  cached["label_moments"] = cached["label_moments"] + 1.0
  _, m_wrong = cached_step(state, frozen, pipeline.to_global(cached, mesh), rng)
  assert abs(float(m_wrong.compute()["loss"]) - float(m_plain.compute()["loss"])) > 1e-3


@pytest.mark.slow
def test_latent_cache_follows_the_augmentation(tmp_path, single):
  """Every cached (example, flip/rot) equals encoding that augmented example; the pipeline
  attaches the moments of the very flip/rot it applied."""
  from idgbr_jax.data import transforms
  from idgbr_jax.train import latent_cache
  ref, mesh, _, frozen, _ = single
  config = small_config()
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.coarse_dir = str(tmp_path / "coarse")
  config.data.num_train = 3
  config.data.augment = "fliprot"
  config.batch_size = 8
  _write_split(config, "train", config.data.coarse_dir, lambda l: np.roll(l, 3, axis=1))
  rules = tuple(config.sharding_rules)
  f_sh = jax.tree.map(lambda x: x.sharding, frozen)
  coarse_dir = assembly.coarse_dir_for(config, "train")
  with jax.set_mesh(mesh):
    cache = latent_cache.build(ref, frozen, f_sh, config, 6, mesh, rules, coarse_dir=coarse_dir)
  assert cache.moments["image"].shape == (3, 8, SIZE // 8, SIZE // 8, 8)
  assert sorted(cache.slots) == list(range(8))
  encode = jax.jit(lambda f, x, l, c: (ref.image_moments(f, x), ref.label_moments(f, l),
                                       ref.label_moments(f, c)))
  # Direct: all 8 elements of example 0, batched, against the cache's row.
  records = pipeline.train_records(config, 6, coarse_dir=coarse_dir)
  e = transforms.Normalize(config.data.normalization, keep_id=True).map(records[0])
  row = cache.rows[e["id"]]
  stack = lambda k: np.stack([transforms.dihedral(e[k], c) for c in range(8)])  # noqa: E731
  img_m, lab_m, co_m = encode(frozen, stack("image"), stack("label"), stack("coarse"))
  # Other batch compositions and shardings of the same encoder: equal to float32 rounding.
  for key, want in (("image", img_m), ("label", lab_m), ("coarse", co_m)):
    numerics.assert_close_up_to_rounding(cache.moments[key][row], want, n_terms=N_TERMS,
                                         err_msg=key)
  assert np.abs(np.diff(cache.moments["image"][row], axis=0)).max() > 1e-3  # elements differ
  # Through the pipeline: each element's attached moments encode the image it carries.
  it = iter(pipeline.train_dataset(config, 6, coarse_dir=coarse_dir, cache=cache))
  batch = next(it)
  assert batch["image_moments"].shape == (8, SIZE // 8, SIZE // 8, 8)
  img_b, lab_b, co_b = encode(frozen, batch["image"], batch["label"], batch["coarse"])
  for key, want in (("image", img_b), ("label", lab_b), ("coarse", co_b)):
    numerics.assert_close_up_to_rounding(batch[f"{key}_moments"], want, n_terms=N_TERMS,
                                         err_msg=f"{key}_moments")
  # Random crops cannot be cached.
  config.data.crop_size = 16
  with pytest.raises(ValueError, match="crop_size"):
    latent_cache.build(ref, frozen, f_sh, config, 6, mesh, rules, coarse_dir=coarse_dir)


def test_stage2_training_refuses_an_ignore_value_naming_the_example(monkeypatch):
  # Stage II colours every training label pixel (the original's Embedding(K, 3) cannot take 255
  # either): an ignore value is a data error at parse time, not NaN colours and a crash at the
  # first logged loss. Evaluation keeps the ignore value (eroded ISPRS labels score as usual).
  config = stage2_synthetic.get_config("runlocal=True")
  config.data.augment = "none"
  label = np.zeros((8, 8, 1), np.uint8)
  label[2, 3] = 255
  records = [{"image": np.zeros((8, 8, 3), np.uint8), "label": label.copy(), "id": f"t{i}"}
             for i in range(8)]
  monkeypatch.setattr(sources, "get_source", lambda cfg, split: records)
  with pytest.raises(sources.DataError, match=r"example t\d.*\[255\].*Stage II training"):
    next(iter(stage2.train_input(config, 6, None)))
  assert pipeline.eval_dataset(config, "test", 6, normalize=False)[0]["label"].max() == 255


def test_model_attention_reaches_the_denoiser_and_the_guidance_net():
  config = small_config()
  assert assembly.refiner_config(config, 6).denoiser.attention_implementation is None
  config.model.attention = "chunked"
  cfg = assembly.refiner_config(config, 6)
  assert cfg.denoiser.attention_implementation == "chunked"
  assert cfg.guidance.attention_implementation == "chunked"
  config.model.attention = "flash"
  with pytest.raises(ValueError, match="config.model.attention='flash'"):
    assembly.refiner_config(config, 6)
