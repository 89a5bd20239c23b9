"""The DDPM/DDIM noise schedule and the training-time noise helpers.

Everything here reproduces diffusers' `DDIMScheduler` numerics (the original IDGBR loads SD-1.5's
scheduler config: scaled-linear betas 0.00085..0.012 over 1000 steps, `set_alpha_to_one=False`,
`steps_offset=1`, ε-prediction, "leading" spacing).

The schedule tables are built once on the host in NumPy, with the same float32 rounding steps as
torch, and then stored as a `NoiseSchedule` pytree so they can be passed into `jax.jit` as an
argument (never baked in as a module-level constant).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

SCHEDULE_KINDS = ("scaled_linear", "linear")
TIMESTEP_STRATEGIES = ("uniform", "cubic")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")


@struct.dataclass
class NoiseSchedule:
  """Discrete diffusion schedule: β_t, α_t = 1 − β_t, ᾱ_t = ∏α, and ᾱ after the last step."""
  betas: jax.Array                # [T] float32
  alphas: jax.Array               # [T] float32
  alphas_cumprod: jax.Array       # [T] float32
  final_alpha_cumprod: jax.Array  # [] float32: ᾱ_prev for the step whose previous timestep is < 0
  num_train_timesteps: int = struct.field(pytree_node=False, default=1000)


def _torch_linspace_float32(start: float, end: float, num: int) -> np.ndarray:
  """`torch.linspace(start, end, num, dtype=float32)` with torch's own formula and rounding.

  torch rounds the endpoints to float32, computes the step in float32 and fills the first half
  from `start` and the second half back from `end`. (torch's CPU kernel additionally builds some
  elements with SIMD `arange`, whose rounding depends on the machine's vector width; that makes
  at most 1 ulp, ~7e-9 for SD's betas, of difference, which we do not chase.)
  """
  if num == 1:
    return np.array([start], np.float32)
  start32, end32 = np.float32(start), np.float32(end)
  step = np.float32((end32 - start32) / np.float32(num - 1))
  idx = np.arange(num)
  from_start = start32 + step * idx.astype(np.float32)
  from_end = end32 - step * (num - 1 - idx).astype(np.float32)
  return np.where(idx < num // 2, from_start, from_end).astype(np.float32)


def make_schedule(kind: str = "scaled_linear", beta_start: float = 0.00085,
                  beta_end: float = 0.012, num_train_timesteps: int = 1000,
                  set_alpha_to_one: bool = False) -> NoiseSchedule:
  """Builds the schedule exactly as diffusers' `DDIMScheduler.__init__` does.

  Args:
    kind: "scaled_linear" (β = linspace(√β₀, √β₁, T)², the latent-diffusion schedule) or "linear".
    beta_start: β at t = 0.
    beta_end: β at t = T − 1.
    num_train_timesteps: T.
    set_alpha_to_one: if True the final step denoises to ᾱ = 1; SD-1.5 (and IDGBR) use False,
      i.e. the final ᾱ_prev is ᾱ_0.

  Returns:
    A `NoiseSchedule` with float32 tables.
  """
  if kind == "scaled_linear":
    roots = _torch_linspace_float32(beta_start ** 0.5, beta_end ** 0.5, num_train_timesteps)
    betas = (roots * roots).astype(np.float32)
  elif kind == "linear":
    betas = _torch_linspace_float32(beta_start, beta_end, num_train_timesteps)
  else:
    raise ValueError(f"Unknown schedule kind {kind!r}; expected one of {SCHEDULE_KINDS}.")
  alphas = (np.float32(1.0) - betas).astype(np.float32)
  # torch's CPU cumprod accumulates float32 inputs in double and rounds each output; a float32
  # running product drifts by up to ~3e-7 over 1000 steps.
  alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  final = np.float32(1.0) if set_alpha_to_one else alphas_cumprod[0]
  return NoiseSchedule(
      betas=jnp.asarray(betas),
      alphas=jnp.asarray(alphas),
      alphas_cumprod=jnp.asarray(alphas_cumprod),
      final_alpha_cumprod=jnp.asarray(final, jnp.float32),
      num_train_timesteps=int(num_train_timesteps))


def _broadcast_per_example(values: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes per-example values [B] (or a scalar) to broadcast over an NHWC batch."""
  values = jnp.asarray(values)
  if values.ndim == 0:
    return values
  return values.reshape(values.shape + (1,) * (like.ndim - values.ndim))


def add_noise(schedule: NoiseSchedule, z0: jax.Array, noise: jax.Array,
              t: jax.Array) -> jax.Array:
  """Forward process q(z_t | z_0): √ᾱ_t·z0 + √(1−ᾱ_t)·ε, like `DDIMScheduler.add_noise`.

  Args:
    schedule: the noise schedule.
    z0: clean latents [B, H, W, C] (any float dtype; the result has the same dtype).
    noise: ε, same shape as `z0`.
    t: integer timesteps, [B] (one per example) or a scalar.

  Returns:
    The noisy latents z_t, shaped and typed like `z0`.
  """
  # diffusers casts ᾱ to the sample dtype before taking roots; do the same so bf16 training
  # sees the same coefficients.
  alpha_bar = schedule.alphas_cumprod.astype(z0.dtype)[t]
  sqrt_alpha_bar = _broadcast_per_example(jnp.sqrt(alpha_bar), z0)
  sqrt_one_minus = _broadcast_per_example(jnp.sqrt(1 - alpha_bar), z0)
  return (sqrt_alpha_bar * z0 + sqrt_one_minus * noise).astype(z0.dtype)


def _cubic_table(num_train_timesteps: int) -> np.ndarray:
  """t → t' for every t in [0, T − 1], with the original's float32 rounding (host NumPy)."""
  T = np.float32(num_train_timesteps)
  frac = np.arange(num_train_timesteps).astype(np.float32) / T
  remapped = (np.float32(1) - frac * frac * frac) * T
  return np.minimum(remapped, T - 1).astype(np.int32)


def cubic_timesteps(t: jax.Array, num_train_timesteps: int) -> jax.Array:
  """The original's "cubic" remap t' = min((1 − (t/T)³)·T, T − 1), truncated to int.

  Mirrors `tools/train.py` of IDGBR, which evaluates `(1 - (t / T) ** 3) * T` on an int64
  tensor (so in float32), clamps with `max=T-1` and casts with `.long()` (truncation). The map
  sends t ≤ T/2 to t' ≥ 7T/8, i.e. half of all draws land in the noisiest eighth.

  The map is a T-entry lookup table built on the host: under XLA, `t / 1000.0` is rewritten to
  `t * 0.001`, which rounds differently and moves 2 of the 1000 values by one step (t = 700, 900).

  Args:
    t: integer timesteps in [0, T − 1].
    num_train_timesteps: T.

  Returns:
    int32 timesteps in [0, T − 1], shaped like `t`.
  """
  return jnp.asarray(_cubic_table(num_train_timesteps))[t]


def sample_timesteps(rng: jax.Array, batch: int, schedule: NoiseSchedule,
                     strategy: str = "uniform", max_timestep: int = 0) -> jax.Array:
  """Draws training timesteps t ~ U{0..T−1}, optionally remapped by the cubic strategy.

  Args:
    rng: a PRNG key.
    batch: number of timesteps (one per example).
    schedule: supplies T.
    strategy: "uniform" or "cubic" (see `cubic_timesteps`; the original's
      `time_sample_strategy`, on for Potsdam and off for CHN6-CUG).
    max_timestep: ours, uniform only: 0 (the original) draws from all T; m > 0 draws from
      U{0..m−1}, the only timesteps an img2img start at strength ≤ m / T ever visits.

  Returns:
    int32 [batch] timesteps.
  """
  T = schedule.num_train_timesteps
  if max_timestep:
    if strategy != "uniform" or not 0 < max_timestep <= T:
      raise ValueError(f"max_timestep={max_timestep} needs the uniform strategy and "
                       f"0 < max_timestep <= {T} (got strategy {strategy!r})")
    return jax.random.randint(rng, (batch,), 0, max_timestep, dtype=jnp.int32)
  t = jax.random.randint(rng, (batch,), 0, T, dtype=jnp.int32)
  if strategy == "uniform":
    return t
  if strategy == "cubic":
    return cubic_timesteps(t, T)
  raise ValueError(
      f"Unknown timestep strategy {strategy!r}; expected one of {TIMESTEP_STRATEGIES}.")


def ddim_timesteps(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                   steps_offset: int = 1) -> np.ndarray:
  """The inference timesteps of diffusers' `DDIMScheduler.set_timesteps`, high to low.

  "leading" with `steps_offset=1` (SD-1.5, IDGBR) gives [961, 921, ..., 41, 1] for 25 steps.
  This is host-side NumPy: `num_steps` is static, so the timesteps are trace-time constants.

  Args:
    num_train_timesteps: T.
    num_steps: number of sampling steps (≤ T).
    spacing: "leading", "trailing" or "linspace" (diffusers' `timestep_spacing`).
    steps_offset: added to "leading" timesteps (diffusers ignores it for the other spacings).

  Returns:
    int64 array [num_steps].
  """
  if not 0 < num_steps <= num_train_timesteps:
    raise ValueError(f"num_steps must be in [1, {num_train_timesteps}], got {num_steps}.")
  if spacing == "linspace":
    steps = np.linspace(0, num_train_timesteps - 1, num_steps).round()[::-1]
  elif spacing == "leading":
    ratio = num_train_timesteps // num_steps
    steps = (np.arange(0, num_steps) * ratio).round()[::-1] + steps_offset
  elif spacing == "trailing":
    ratio = num_train_timesteps / num_steps
    steps = np.round(np.arange(num_train_timesteps, 0, -ratio)) - 1
  else:
    raise ValueError(f"Unknown timestep spacing {spacing!r}; expected one of {TIMESTEP_SPACINGS}.")
  return np.ascontiguousarray(steps).astype(np.int64)


def ddim_timestep_pairs(num_train_timesteps: int, num_steps: int, spacing: str = "leading",
                        steps_offset: int = 1) -> tuple[np.ndarray, np.ndarray]:
  """(t, t_prev) per DDIM step, with t_prev as diffusers' `DDIMScheduler.step` computes it.

  diffusers always uses t_prev = t − T // num_steps, not the next entry of the timestep list.
  The two agree for "leading" and "trailing"; for "linspace" they do not, and we follow diffusers.
  A negative t_prev means "use `final_alpha_cumprod`".

  Returns:
    Two int32 arrays [num_steps].
  """
  t = ddim_timesteps(num_train_timesteps, num_steps, spacing, steps_offset)
  t_prev = t - num_train_timesteps // num_steps
  return t.astype(np.int32), t_prev.astype(np.int32)
