"""Deterministic DDIM sampling (ε-prediction) as a pure function over `jax.lax.scan`.

The noise predictor is an argument, so one sampler serves every model. The intended pattern is to
close over the parameters *inside* the caller's own jitted function, where they are traced
arguments (never module-level constants, which jit would bake into the executable)::

  @functools.partial(jax.jit, static_argnames=("num_steps",))
  def refine(params, cond, z_T, schedule, num_steps, guidance_scale):
    def eps_fn(z_t, t):            # t: scalar int32
      z2 = jnp.concatenate([z_t, z_t])  # conditional and unconditional halves, one call
      eps = model.apply(params, z2, t, cond)
      eps_cond, eps_uncond = jnp.split(eps, 2)
      return eps_cond, eps_uncond
    return ddim_sample(eps_fn, z_T, schedule, num_steps, guidance_scale)

`schedule` is a pytree (its arrays are traced, T is static) and `guidance_scale` may be a traced
float, so sweeping the scale does not recompile; `num_steps` must be static because it fixes the
scan length and the timestep constants.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from idgbr_jax.diffusion.schedule import NoiseSchedule, add_noise, ddim_timestep_pairs

EpsFn = Callable[[jax.Array, jax.Array], "jax.Array | tuple[jax.Array, jax.Array]"]


def ddim_step(schedule: NoiseSchedule, eps: jax.Array, t: jax.Array, t_prev: jax.Array,
              z_t: jax.Array, eta: float = 0.0, *, clip_sample: float | None = None,
              variance_noise: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """One DDIM update z_t → z_{t_prev} for an ε-predicting model, as `DDIMScheduler.step`.

  x̂0 = (z_t − √(1−ᾱ_t)·ε)/√ᾱ_t, and
  z_{t_prev} = √ᾱ_prev·x̂0 + √(1−ᾱ_prev−σ²)·ε + σ·noise,
  with σ = η·√((1−ᾱ_prev)/(1−ᾱ_t)·(1−ᾱ_t/ᾱ_prev)).
  ᾱ_prev is `final_alpha_cumprod` when t_prev < 0.

  Args:
    schedule: the noise schedule.
    eps: the predicted noise, shaped like `z_t`.
    t: current timestep (scalar int; may be traced).
    t_prev: the timestep being stepped to (scalar int; negative after the last step).
    z_t: current latents.
    eta: DDIM η; 0 (the default and IDGBR's setting) is deterministic.
    clip_sample: if given, clip x̂0 to [−clip_sample, clip_sample] (diffusers' `clip_sample`
      with `clip_sample_range`; SD-1.5 and IDGBR do not clip).
    variance_noise: standard normal noise, required when `eta > 0`.

  Returns:
    (z_{t_prev}, x̂0), both in `z_t`'s dtype. The arithmetic runs in float32.
  """
  out_dtype = z_t.dtype
  z_t = z_t.astype(jnp.float32)
  eps = eps.astype(jnp.float32)
  alpha_bar_t = schedule.alphas_cumprod[t]
  # Clamp the index: a negative t_prev would wrap around in the gather; `where` picks the final ᾱ.
  alpha_bar_prev = jnp.where(t_prev >= 0,
                             schedule.alphas_cumprod[jnp.maximum(t_prev, 0)],
                             schedule.final_alpha_cumprod)
  beta_bar_t = 1 - alpha_bar_t
  pred_x0 = (z_t - jnp.sqrt(beta_bar_t) * eps) / jnp.sqrt(alpha_bar_t)
  if clip_sample is not None:
    pred_x0 = jnp.clip(pred_x0, -clip_sample, clip_sample)
  # `eta` is a Python number: η = 0 skips the variance arithmetic entirely.
  if eta:
    variance = (1 - alpha_bar_prev) / beta_bar_t * (1 - alpha_bar_t / alpha_bar_prev)
    std_dev = eta * jnp.sqrt(variance)
  else:
    std_dev = jnp.float32(0.0)
  direction = jnp.sqrt(1 - alpha_bar_prev - std_dev ** 2) * eps
  z_prev = jnp.sqrt(alpha_bar_prev) * pred_x0 + direction
  if eta:
    if variance_noise is None:
      raise ValueError("ddim_step with eta > 0 needs `variance_noise`.")
    z_prev = z_prev + std_dev * variance_noise.astype(jnp.float32)
  return z_prev.astype(out_dtype), pred_x0.astype(out_dtype)


def ddim_sample(eps_fn: EpsFn, z_T: jax.Array, schedule: NoiseSchedule, num_steps: int,
                guidance_scale: float | jax.Array | None = None, *,
                timestep_spacing: str = "leading", steps_offset: int = 1, unroll: int = 1,
                clip_sample: float | None = None, return_trajectory: bool = False,
                strength: float = 1.0) -> jax.Array | tuple[jax.Array, jax.Array]:
  """Runs deterministic (η = 0) DDIM from z_T down to z_0 with `jax.lax.scan`.

  The scan carry is z_t and its inputs are the (t, t_prev) pairs of diffusers'
  `set_timesteps` + `step` ("leading", offset 1: 961 → 921 → … → 1 → final ᾱ for 25 steps).
  Pure and jit-able with `num_steps` static; see the module docstring for the params pattern.

  Args:
    eps_fn: `eps_fn(z_t, t)` with `t` a scalar int32 array. Returns ε when `guidance_scale` is
      None, or `(eps_cond, eps_uncond)` (computed by the caller in one batched call) otherwise.
    z_T: the starting noise (σ_init = 1, strength 1). The carry keeps this dtype, so pass float32
      even when the network computes in bf16.
    schedule: the noise schedule.
    num_steps: number of DDIM steps (static).
    guidance_scale: s in ε = ε_uncond + s·(ε_cond − ε_uncond) (IDGBR's "Control-CFG", s = 3),
      or None for a single-branch predictor. May be a traced scalar.
    timestep_spacing: "leading" (SD-1.5 / IDGBR), "trailing" or "linspace".
    steps_offset: diffusers' `steps_offset` (1 for SD-1.5).
    unroll: `jax.lax.scan` unroll factor.
    clip_sample: optional x̂0 clipping range (None = off, as in SD-1.5).
    return_trajectory: also return the latents after every step, [num_steps', *z_T.shape]
      (the last entry is the returned z_0), for debugging.
    strength: in (0, 1]; 1 runs every step from pure noise (IDGBR). Below 1 only the last
      steps from `start_timestep_index(num_steps, strength)` on run; what `z_T` is then is the
      caller's choice of start (`initial_latent`): the coarse latent noised to that step's
      timestep (`start="coarse"`, diffusers' img2img) or pure noise (`start="noise"`, the
      original IDGBR pipeline).

  Returns:
    z_0, or (z_0, trajectory) when `return_trajectory` is True.
  """
  t_seq, t_prev_seq = ddim_timestep_pairs(schedule.num_train_timesteps, num_steps,
                                          timestep_spacing, steps_offset)
  first = start_timestep_index(num_steps, strength)
  t_seq, t_prev_seq = t_seq[first:], t_prev_seq[first:]

  def body(z_t, ts):
    t, t_prev = ts
    prediction = eps_fn(z_t, t)
    if guidance_scale is None:
      eps = prediction
    else:
      eps_cond, eps_uncond = prediction
      eps = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    z_prev, _ = ddim_step(schedule, eps, t, t_prev, z_t, clip_sample=clip_sample)
    return z_prev, (z_prev if return_trajectory else None)

  z_0, trajectory = jax.lax.scan(body, z_T, (jnp.asarray(t_seq), jnp.asarray(t_prev_seq)),
                                 unroll=unroll)
  if return_trajectory:
    return z_0, trajectory
  return z_0


def start_timestep_index(num_steps: int, strength: float) -> int:
  """First DDIM step that runs at `strength` (diffusers' img2img: int(num_steps * strength) steps
  run, the leading ones are skipped)."""
  if not 0.0 < strength <= 1.0:
    raise ValueError(f"strength must be in (0, 1], got {strength}")
  run = min(int(num_steps * strength), num_steps)
  if run < 1:
    raise ValueError(f"strength {strength} with {num_steps} steps runs no step; raise either")
  return num_steps - run


START_MODES = ("coarse", "noise")


def check_start(start: str) -> str:
  if start not in START_MODES:
    raise ValueError(f"diffusion start {start!r} unknown; allowed: {START_MODES} (coarse: the "
                     "noised coarse latent, diffusers' img2img; noise: pure noise, the "
                     "original IDGBR)")
  return start


def initial_latent(schedule: NoiseSchedule, noise: jax.Array, num_steps: int, strength: float,
                   start: str = "coarse", z_init: jax.Array | None = None, *,
                   timestep_spacing: str = "leading", steps_offset: int = 1) -> jax.Array:
  """The `z_T` that `ddim_sample(..., strength=strength)` starts from.

  The two meanings of strength < 1 (both run only the last int(strength * num_steps) steps):

  * `start="coarse"` (ours, diffusers' `StableDiffusionImg2ImgPipeline`): `z_init` (the coarse
    map's latent) noised to the first step that runs, `noised_start`;
  * `start="noise"` (the original IDGBR pipeline, whose `get_timesteps` skips the early steps
    but whose `prepare_latents` still draws pure noise): `noise` itself, at that later step.

  At strength 1 both are `noise` (every step runs from pure noise, as the original).

  Args:
    schedule: the noise schedule.
    noise: standard normal noise, the latents' shape (float32).
    num_steps: DDIM steps.
    strength: in (0, 1].
    start: "coarse" or "noise".
    z_init: the clean latent to noise; needed for `start="coarse"` at strength < 1.
  """
  check_start(start)
  start_timestep_index(num_steps, strength)  # validates
  if strength >= 1.0 or start == "noise":
    return noise
  if z_init is None:
    raise ValueError("start='coarse' at strength < 1 starts from the noised coarse latent; "
                     "pass it (z_init)")
  return noised_start(schedule, z_init, noise, num_steps, strength,
                      timestep_spacing=timestep_spacing, steps_offset=steps_offset)


def noised_start(schedule: NoiseSchedule, z_init: jax.Array, noise: jax.Array, num_steps: int,
                 strength: float, *, timestep_spacing: str = "leading",
                 steps_offset: int = 1) -> jax.Array:
  """`z_init` noised to the first timestep that runs at `strength` (q(z_t | z_init)); with
  strength 1 this is still a noised z_init (not pure noise), as in diffusers' img2img."""
  t_seq, _ = ddim_timestep_pairs(schedule.num_train_timesteps, num_steps, timestep_spacing,
                                 steps_offset)
  t = jnp.full((z_init.shape[0],), t_seq[start_timestep_index(num_steps, strength)], jnp.int32)
  return add_noise(schedule, z_init, noise, t)
