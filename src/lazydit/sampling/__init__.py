"""Sampling: the diffusion schedule and the reference respacing (`schedule`) and samplers as plain functions
(`ddim`). Samplers know nothing about caching methods: those attach to the model."""

from lazydit.sampling.ddim import ddim_sample
from lazydit.sampling.schedule import Schedule, respaced_timesteps

__all__ = ["Schedule", "ddim_sample", "respaced_timesteps"]
