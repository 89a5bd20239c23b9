"""Diffusion: the DDIM noise schedule, training-noise helpers and the scan-based DDIM sampler."""
from idgbr_jax.diffusion.sampler import (START_MODES, check_start, ddim_sample, ddim_step,
                                         initial_latent, noised_start, start_timestep_index)
from idgbr_jax.diffusion.schedule import (
    NoiseSchedule,
    add_noise,
    cubic_timesteps,
    ddim_timestep_pairs,
    ddim_timesteps,
    make_schedule,
    sample_timesteps,
)

__all__ = [
    "NoiseSchedule",
    "START_MODES",
    "add_noise",
    "check_start",
    "cubic_timesteps",
    "ddim_sample",
    "ddim_step",
    "ddim_timestep_pairs",
    "ddim_timesteps",
    "initial_latent",
    "make_schedule",
    "noised_start",
    "sample_timesteps",
    "start_timestep_index",
]
