"""Sampling: the diffusion schedule, the reference respacing and the other timestep spacings (`schedule`) and
samplers as plain functions (`ddim`, `dpm_solver`, `unipc`; `spaced` binds one to a spacing). Samplers know nothing
about caching methods: those attach to the model."""

from lazydit.sampling.ddim import ddim_sample
from lazydit.sampling.dpm_solver import dpm_solver_sample
from lazydit.sampling.schedule import SPACINGS, Schedule, respaced_timesteps, spaced_timesteps
from lazydit.sampling.spaced import check_policy_schedule, sampler_timesteps, with_spacing
from lazydit.sampling.unipc import unipc_sample

SAMPLERS = {"ddim": ddim_sample, "dpm++2m": dpm_solver_sample, "unipc": unipc_sample}  # name (--sampler) -> sample
SAMPLER_LABELS = {"ddim": "DDIM", "dpm++2m": "DPM++2M", "unipc": "UniPC"}  # report rows are named f"{label}-{T}"
for _name, _label, _base in (("dpm++2m", "DPM++2M", dpm_solver_sample), ("unipc", "UniPC", unipc_sample)):
    for _spacing in SPACINGS[1:]:  # "uniform", "trailing", "logsnr": the bare name is the reference respacing
        SAMPLERS[f"{_name}-{_spacing}"] = with_spacing(_base, _spacing, f"{_label}-{_spacing}")
        SAMPLER_LABELS[f"{_name}-{_spacing}"] = f"{_label}-{_spacing}"
del _name, _label, _base, _spacing

__all__ = ["SAMPLERS", "SAMPLER_LABELS", "SPACINGS", "Schedule", "check_policy_schedule", "ddim_sample",
           "dpm_solver_sample", "respaced_timesteps", "sampler_timesteps", "spaced_timesteps", "unipc_sample",
           "with_spacing"]
