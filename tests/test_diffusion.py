"""Schedule, training noise and the scan DDIM sampler, checked against diffusers' DDIMScheduler."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from idgbr_jax import diffusion
from idgbr_jax.diffusion import schedule as schedule_lib

T = 1000
# SD-1.5's scheduler_config.json as the original loads it, with ε-prediction forced.
SD15_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                      steps_offset=1, prediction_type="epsilon")


def _ddim_scheduler(**overrides):
  diffusers = pytest.importorskip("diffusers")
  return diffusers.DDIMScheduler(**{**SD15_SCHEDULER, **overrides})


def _analytic_eps(a, b):
  """A linear-in-z, t-dependent 'noise predictor' that both frameworks evaluate identically."""
  def eps_fn(z, t):
    return a * z + b * jnp.sin(t.astype(jnp.float32) / 100.0)
  return eps_fn


def _torch_loop(scheduler, z_T, num_steps, eps_np):
  """diffusers' sampling loop (set_timesteps + step) with a NumPy-side noise predictor."""
  torch = pytest.importorskip("torch")
  scheduler.set_timesteps(num_steps)
  z = torch.from_numpy(np.array(z_T, np.float32))
  for t in scheduler.timesteps:
    eps = torch.from_numpy(eps_np(z.numpy(), int(t)))
    z = scheduler.step(eps, t, z, eta=0.0).prev_sample
  return z.numpy()


# ----------------------------------------------------------------------------------------------
# Schedule tables and timesteps


def test_schedule_is_a_pytree_with_static_T():
  sched = diffusion.make_schedule()
  leaves, treedef = jax.tree_util.tree_flatten(sched)
  assert len(leaves) == 4 and all(leaf.dtype == jnp.float32 for leaf in leaves)
  assert sched.num_train_timesteps == T
  # T is metadata, so a jitted function sees a Python int and can use it for shapes.
  n = jax.jit(lambda s: jnp.zeros(s.num_train_timesteps).sum() + s.betas[0])(sched)
  np.testing.assert_allclose(n, sched.betas[0])
  # Hand-computed endpoints of the scaled-linear schedule.
  np.testing.assert_allclose(sched.betas[0], 0.00085, rtol=1e-6)
  np.testing.assert_allclose(sched.betas[-1], 0.012, rtol=1e-6)
  assert float(sched.final_alpha_cumprod) == float(sched.alphas_cumprod[0])
  assert float(diffusion.make_schedule(set_alpha_to_one=True).final_alpha_cumprod) == 1.0
  with pytest.raises(ValueError, match="cosine"):
    diffusion.make_schedule("cosine")


@pytest.mark.torch
def test_linspace_matches_torch_formula_exactly_for_small_sizes():
  """Below one SIMD loop chunk (16 floats) torch's CPU linspace is its scalar formula."""
  torch = pytest.importorskip("torch")
  for n in (2, 3, 7, 10, 15):
    ours = schedule_lib._torch_linspace_float32(0.00085 ** 0.5, 0.012 ** 0.5, n)
    ref = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, n, dtype=torch.float32).numpy()
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.torch
@pytest.mark.parametrize("kind,start,end", [("scaled_linear", 0.00085, 0.012),
                                            ("linear", 0.0001, 0.02)])
def test_schedule_matches_diffusers(kind, start, end):
  ref = _ddim_scheduler(beta_schedule=kind, beta_start=start, beta_end=end)
  sched = diffusion.make_schedule(kind, start, end)
  np.testing.assert_allclose(sched.betas, ref.betas.numpy(), rtol=0, atol=1e-7)
  np.testing.assert_allclose(sched.alphas, ref.alphas.numpy(), rtol=0, atol=1e-7)
  np.testing.assert_allclose(sched.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(sched.final_alpha_cumprod, ref.final_alpha_cumprod.numpy(), atol=1e-7)


@pytest.mark.torch
@pytest.mark.parametrize("num_steps", [25, 50, 10, 1, 7, 30, 1000])
@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
def test_ddim_timesteps_match_diffusers(num_steps, spacing):
  ref = _ddim_scheduler(timestep_spacing=spacing)
  ref.set_timesteps(num_steps)
  ours = diffusion.ddim_timesteps(T, num_steps, spacing, steps_offset=1)
  np.testing.assert_array_equal(ours, ref.timesteps.numpy())


def test_ddim_timesteps_sd15_values():
  steps = diffusion.ddim_timesteps(T, 25)
  assert steps[0] == 961 and steps[-1] == 1 and len(steps) == 25
  np.testing.assert_array_equal(steps, np.arange(961, 0, -40))
  t, t_prev = diffusion.ddim_timestep_pairs(T, 25)
  np.testing.assert_array_equal(t_prev, t - 40)
  assert t_prev[-1] == -39  # the final step uses final_alpha_cumprod
  with pytest.raises(ValueError, match="spacing"):
    diffusion.ddim_timesteps(T, 25, "karras")
  with pytest.raises(ValueError, match="num_steps"):
    diffusion.ddim_timesteps(T, 1001)


# ----------------------------------------------------------------------------------------------
# Training noise


@pytest.mark.torch
def test_add_noise_matches_diffusers():
  torch = pytest.importorskip("torch")
  ref = _ddim_scheduler()
  sched = diffusion.make_schedule()
  rng = np.random.default_rng(0)
  z0 = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
  noise = rng.standard_normal((4, 8, 8, 4)).astype(np.float32)
  t = np.array([0, 1, 500, 999])
  ours = jax.jit(diffusion.add_noise)(sched, z0, noise, t)
  expected = ref.add_noise(torch.from_numpy(z0), torch.from_numpy(noise), torch.from_numpy(t))
  np.testing.assert_allclose(ours, expected.numpy(), rtol=1e-6, atol=1e-6)
  # SD-1.5's known ᾱ_999 ≈ 0.00466 (SNR ≈ 0.0047: near-pure noise), ᾱ_0 = 1 − β_0 = 0.99915.
  np.testing.assert_allclose(sched.alphas_cumprod[999], 0.0046601, rtol=1e-4)
  a999 = 0.0046601
  np.testing.assert_allclose(ours[3], np.sqrt(a999) * z0[3] + np.sqrt(1 - a999) * noise[3],
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(ours[0], np.sqrt(0.99915) * z0[0] + np.sqrt(1 - 0.99915) * noise[0],
                             rtol=1e-5, atol=1e-5)
  # bf16 latents stay bf16.
  assert diffusion.add_noise(sched, z0.astype(jnp.bfloat16), noise, t).dtype == jnp.bfloat16


@pytest.mark.torch
def test_cubic_mapping_matches_original_expression_for_every_t():
  torch = pytest.importorskip("torch")
  t = torch.arange(T)
  # tools/train.py of IDGBR, verbatim semantics: int64 t, float32 maths, clamp, .long().
  expected = torch.clamp((1 - (t / T) ** 3) * T, max=T - 1).long().numpy()
  ours = jax.jit(diffusion.cubic_timesteps, static_argnums=1)(jnp.arange(T), T)
  np.testing.assert_array_equal(ours, expected)


def test_cubic_mapping_values():
  ours = np.asarray(diffusion.cubic_timesteps(jnp.array([0, 1, 100, 500, 501, 800, 999]), T))
  # 0, 1 -> 1000 clamped to 999; 100 -> 999; 500 -> 875 exactly; 999 -> 2.997 -> 2. 800 -> 487,
  # not 488: float32 gives (1 - 0.512)·1000 = 487.99997 and .long() truncates (torch agrees).
  np.testing.assert_array_equal(ours, [999, 999, 999, 875, 874, 487, 2])
  assert ours.dtype == np.int32


def test_sample_timesteps_uniform_and_cubic():
  sched = diffusion.make_schedule()
  key = jax.random.key(0)
  uniform = diffusion.sample_timesteps(key, 200_000, sched, "uniform")
  cubic = diffusion.sample_timesteps(key, 200_000, sched, "cubic")
  assert uniform.dtype == jnp.int32 and cubic.dtype == jnp.int32
  assert int(uniform.min()) == 0 and int(uniform.max()) == T - 1
  # Cubic never goes below 2 (t = 999 -> 2.997) and piles up at T - 1 (t <= 100 all map there).
  assert int(cubic.min()) == 2 and int(cubic.max()) == T - 1
  np.testing.assert_allclose(float(jnp.mean(uniform)), 499.5, atol=3)
  # Cubic: t' >= 875 iff t <= 500, so P = 501/1000; the same key gives the mapped draws.
  np.testing.assert_allclose(float(jnp.mean(cubic >= 875)), 0.501, atol=0.005)
  np.testing.assert_array_equal(cubic, diffusion.cubic_timesteps(uniform, T))
  assert float(jnp.mean(uniform >= 875)) < 0.13
  with pytest.raises(ValueError, match="strategy"):
    diffusion.sample_timesteps(key, 4, sched, "quadratic")


# ----------------------------------------------------------------------------------------------
# DDIM step and sampler


@pytest.mark.torch
@pytest.mark.parametrize("t,eta,clip", [(961, 0.0, None), (1, 0.0, None), (481, 0.0, 1.0),
                                        (481, 0.7, None)])
def test_ddim_step_matches_diffusers(t, eta, clip):
  torch = pytest.importorskip("torch")
  ref = _ddim_scheduler(clip_sample=clip is not None, clip_sample_range=clip or 1.0)
  ref.set_timesteps(25)
  sched = diffusion.make_schedule()
  rng = np.random.default_rng(t)
  z = rng.standard_normal((2, 4, 4, 3)).astype(np.float32) * 2
  eps = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  var_noise = rng.standard_normal((2, 4, 4, 3)).astype(np.float32)
  out = ref.step(torch.from_numpy(eps), t, torch.from_numpy(z), eta=eta,
                 variance_noise=torch.from_numpy(var_noise) if eta else None)
  step = jax.jit(functools.partial(diffusion.ddim_step, eta=eta, clip_sample=clip))
  z_prev, x0 = step(sched, eps, jnp.int32(t), jnp.int32(t - 40), z,
                    variance_noise=var_noise if eta else None)
  np.testing.assert_allclose(x0, out.pred_original_sample.numpy(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(z_prev, out.prev_sample.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.torch
@pytest.mark.parametrize("num_steps,spacing", [(25, "leading"), (10, "leading"),
                                               (50, "trailing"), (20, "linspace")])
def test_ddim_sample_matches_diffusers_loop(num_steps, spacing):
  a, b = 0.3, 0.5
  ref = _ddim_scheduler(timestep_spacing=spacing)
  sched = diffusion.make_schedule()
  z_T = np.asarray(jax.random.normal(jax.random.key(1), (2, 8, 8, 4)), np.float32)
  eps_np = lambda z, t: (a * z + b * np.sin(np.float32(t) / 100.0)).astype(np.float32)
  expected = _torch_loop(ref, z_T, num_steps, eps_np)
  sample = jax.jit(diffusion.ddim_sample, static_argnums=(0, 3),
                   static_argnames=("timestep_spacing",))
  ours = sample(_analytic_eps(a, b), z_T, sched, num_steps, timestep_spacing=spacing)
  scale = np.abs(expected).max()
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * scale)
  assert scale > 0.1  # the analytic predictor leaves a non-trivial z_0


@pytest.mark.torch
def test_guided_sample_matches_diffusers_loop_on_combined_eps():
  a_c, b_c, a_u, b_u, s = 0.3, 0.5, -0.1, 0.2, 3.0
  ref = _ddim_scheduler()
  sched = diffusion.make_schedule()
  z_T = np.asarray(jax.random.normal(jax.random.key(2), (1, 8, 8, 4)), np.float32)

  def combined(z, t):
    c = a_c * z + b_c * np.sin(np.float32(t) / 100.0)
    u = a_u * z + b_u * np.sin(np.float32(t) / 100.0)
    return (u + s * (c - u)).astype(np.float32)

  expected = _torch_loop(ref, z_T, 25, combined)

  def eps_fn(z, t):
    return _analytic_eps(a_c, b_c)(z, t), _analytic_eps(a_u, b_u)(z, t)

  # The scale is a traced argument: changing it must not need a retrace.
  sample = jax.jit(lambda z, sc, gs: diffusion.ddim_sample(eps_fn, z, sc, 25, gs))
  ours = sample(z_T, sched, jnp.float32(s))
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # s = 1 reduces to the conditional branch alone.
  only_cond = jax.jit(lambda z, sc: diffusion.ddim_sample(_analytic_eps(a_c, b_c), z, sc, 25))
  np.testing.assert_allclose(sample(z_T, sched, jnp.float32(1.0)), only_cond(z_T, sched),
                             rtol=1e-5, atol=1e-6)


def test_sampler_recovers_z0_with_oracle_eps():
  """With the true ε of z_T = add_noise(z0, ε, 961), DDIM lands on z0 (≈, as ᾱ_final ≠ 1)."""
  sched = diffusion.make_schedule()
  z0 = jax.random.normal(jax.random.key(3), (1, 4, 4, 2))
  noise = jax.random.normal(jax.random.key(4), (1, 4, 4, 2))
  z_T = diffusion.add_noise(sched, z0, noise, jnp.array([961]))
  # Deterministic DDIM keeps ε along the trajectory, so the oracle is the constant ε.
  z_out = diffusion.ddim_sample(lambda z, t: noise, z_T, sched, 25)
  a_final = sched.final_alpha_cumprod
  expected = jnp.sqrt(a_final) * z0 + jnp.sqrt(1 - a_final) * noise
  np.testing.assert_allclose(z_out, expected, rtol=1e-4, atol=1e-4)


def test_sampler_jit_equals_eager_trajectory_and_timesteps_seen():
  sched = diffusion.make_schedule()
  z_T = jax.random.normal(jax.random.key(5), (2, 4, 4, 4))
  seen = []

  def eps_fn(z, t):
    assert t.shape == () and t.dtype == jnp.int32
    seen.append(t)
    return 0.2 * z + 0.1 * jnp.cos(t.astype(jnp.float32) / 50.0)

  eager = diffusion.ddim_sample(eps_fn, z_T, sched, 25)
  jitted = jax.jit(lambda p, z, s: diffusion.ddim_sample(
      lambda zz, t: p * zz + 0.1 * jnp.cos(t.astype(jnp.float32) / 50.0), z, s, 25))(
          jnp.float32(0.2), z_T, sched)
  np.testing.assert_allclose(jitted, eager, rtol=1e-6, atol=1e-6)
  again = diffusion.ddim_sample(eps_fn, z_T, sched, 25)
  np.testing.assert_array_equal(again, eager)  # deterministic
  final, traj = diffusion.ddim_sample(eps_fn, z_T, sched, 25, return_trajectory=True, unroll=5)
  assert traj.shape == (25,) + z_T.shape
  np.testing.assert_allclose(traj[-1], final, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(final, eager, rtol=1e-6, atol=1e-6)
  # Step by step with ddim_step reproduces the trajectory.
  z = z_T
  for i, t in enumerate(diffusion.ddim_timesteps(T, 25)):
    eps = 0.2 * z + 0.1 * jnp.cos(jnp.float32(t) / 50.0)
    z, _ = diffusion.ddim_step(sched, eps, jnp.int32(t), jnp.int32(t - 40), z)
    np.testing.assert_allclose(traj[i], z, rtol=1e-5, atol=1e-5)


def test_sampler_vmaps_over_latents():
  sched = diffusion.make_schedule()
  z_T = jax.random.normal(jax.random.key(6), (3, 1, 4, 4, 2))  # 3 independent batches
  eps_fn = _analytic_eps(0.3, 0.5)
  run = lambda z: diffusion.ddim_sample(eps_fn, z, sched, 10)
  batched = jax.jit(jax.vmap(run))(z_T)
  looped = jnp.stack([run(z) for z in z_T])
  np.testing.assert_allclose(batched, looped, rtol=1e-6, atol=1e-6)


def test_sampler_keeps_carry_dtype():
  sched = diffusion.make_schedule()
  z_T = jax.random.normal(jax.random.key(7), (1, 4, 4, 2), jnp.bfloat16)
  out = diffusion.ddim_sample(lambda z, t: (0.1 * z).astype(jnp.bfloat16), z_T, sched, 5)
  assert out.dtype == jnp.bfloat16
  assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))


@pytest.mark.torch
@pytest.mark.parametrize("strength", [0.4, 0.75])
def test_img2img_start_matches_diffusers_img2img_loop(strength):
  """strength < 1: diffusers' img2img (`get_timesteps` + `add_noise` at the first kept step, then
  the scheduler loop over the tail) from the same initial latent and noise."""
  torch = pytest.importorskip("torch")
  a, b, num_steps = 0.3, 0.5, 10
  ref = _ddim_scheduler()
  ref.set_timesteps(num_steps)
  run = min(int(num_steps * strength), num_steps)
  tail = ref.timesteps[num_steps - run:]
  z_init = np.asarray(jax.random.normal(jax.random.key(3), (2, 8, 8, 4)), np.float32)
  noise = np.asarray(jax.random.normal(jax.random.key(4), (2, 8, 8, 4)), np.float32)
  z = ref.add_noise(torch.from_numpy(z_init), torch.from_numpy(noise), tail[:1])
  for t in tail:
    eps = torch.from_numpy((a * z.numpy() + b * np.sin(np.float32(int(t)) / 100.0))
                           .astype(np.float32))
    z = ref.step(eps, t, z, eta=0.0).prev_sample
  expected = z.numpy()

  sched = diffusion.make_schedule()
  z_start = diffusion.noised_start(sched, jnp.asarray(z_init), jnp.asarray(noise), num_steps,
                                   strength)
  ours = jax.jit(lambda z0: diffusion.ddim_sample(_analytic_eps(a, b), z0, sched, num_steps,
                                                  strength=strength))(z_start)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  assert diffusion.start_timestep_index(num_steps, strength) == num_steps - run


@pytest.mark.torch
@pytest.mark.parametrize("strength", [0.4, 0.75])
def test_noise_start_matches_the_original_pipeline_loop(strength):
  """start='noise' at strength < 1: the original's pipeline (`get_timesteps` drops the early
  steps, `prepare_latents` still draws pure noise · init_noise_sigma, then the scheduler loop
  over the tail), from the same noise."""
  torch = pytest.importorskip("torch")
  a, b, num_steps = 0.3, 0.5, 10
  ref = _ddim_scheduler()
  ref.set_timesteps(num_steps)
  init_timestep = min(int(num_steps * strength), num_steps)  # the pipeline's get_timesteps
  tail = ref.timesteps[max(num_steps - init_timestep, 0) * ref.order:]
  noise = np.asarray(jax.random.normal(jax.random.key(4), (2, 8, 8, 4)), np.float32)
  z = torch.from_numpy(noise) * ref.init_noise_sigma
  for t in tail:
    eps = torch.from_numpy((a * z.numpy() + b * np.sin(np.float32(int(t)) / 100.0))
                           .astype(np.float32))
    z = ref.step(eps, t, z, eta=0.0).prev_sample
  expected = z.numpy()

  sched = diffusion.make_schedule()
  z_init = jnp.full(noise.shape, 7.0)  # the coarse latent: unused by this start
  z_start = diffusion.initial_latent(sched, jnp.asarray(noise), num_steps, strength, "noise",
                                     z_init)
  np.testing.assert_array_equal(z_start, noise)
  ours = jax.jit(lambda z0: diffusion.ddim_sample(_analytic_eps(a, b), z0, sched, num_steps,
                                                  strength=strength))(z_start)
  np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
  # The two starts differ only in z_T: 'coarse' is diffusers' img2img (tested above).
  coarse = diffusion.initial_latent(sched, jnp.asarray(noise), num_steps, strength, "coarse",
                                    z_init)
  np.testing.assert_array_equal(coarse, diffusion.noised_start(sched, z_init, jnp.asarray(noise),
                                                               num_steps, strength))


def test_initial_latent_at_full_strength_and_validation():
  sched = diffusion.make_schedule()
  noise = jax.random.normal(jax.random.key(0), (1, 4, 4, 4))
  for start in diffusion.START_MODES:  # strength 1: pure noise either way (the original)
    np.testing.assert_array_equal(
        diffusion.initial_latent(sched, noise, 10, 1.0, start, jnp.ones_like(noise)), noise)
  with pytest.raises(ValueError, match="start 'img2img' unknown.*coarse.*noise"):
    diffusion.initial_latent(sched, noise, 10, 0.5, "img2img", noise)
  with pytest.raises(ValueError, match="needs|pass it"):
    diffusion.initial_latent(sched, noise, 10, 0.5, "coarse")
  with pytest.raises(ValueError, match="strength"):
    diffusion.initial_latent(sched, noise, 10, 0.0, "noise")


def test_strength_is_validated():
  for bad in (0.0, 1.5, -1.0):
    with pytest.raises(ValueError, match="strength"):
      diffusion.start_timestep_index(10, bad)
  with pytest.raises(ValueError, match="runs no step"):
    diffusion.start_timestep_index(4, 0.2)  # int(0.8) = 0 steps
  assert diffusion.start_timestep_index(25, 1.0) == 0


def test_sample_timesteps_max_timestep_covers_only_the_img2img_range():
  sched = diffusion.make_schedule()
  t = np.asarray(diffusion.sample_timesteps(jax.random.key(0), 4096, sched, "uniform", 300))
  assert t.min() == 0 and t.max() == 299  # the whole range [0, 300), nothing above
  assert abs(t.mean() - 149.5) < 5
  full = np.asarray(diffusion.sample_timesteps(jax.random.key(0), 4096, sched, "uniform"))
  assert full.max() > 900
  with pytest.raises(ValueError, match="uniform"):
    diffusion.sample_timesteps(jax.random.key(0), 4, sched, "cubic", 300)
  with pytest.raises(ValueError, match="max_timestep"):
    diffusion.sample_timesteps(jax.random.key(0), 4, sched, "uniform", 2000)
