"""Sampling: the diffusion schedule and the reference respacing (`schedule`) and samplers as plain functions
(`ddim`, `dpm_solver`). Samplers know nothing about caching methods: those attach to the model."""

from lazydit.sampling.ddim import ddim_sample
from lazydit.sampling.dpm_solver import dpm_solver_sample
from lazydit.sampling.schedule import Schedule, respaced_timesteps

SAMPLERS = {"ddim": ddim_sample, "dpm++2m": dpm_solver_sample}  # name (--sampler) -> sample(model, y, steps, ...)
SAMPLER_LABELS = {"ddim": "DDIM", "dpm++2m": "DPM++2M"}  # report rows are named f"{label}-{T}"

__all__ = ["SAMPLERS", "SAMPLER_LABELS", "Schedule", "ddim_sample", "dpm_solver_sample", "respaced_timesteps"]
