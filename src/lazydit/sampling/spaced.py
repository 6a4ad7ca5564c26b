"""Samplers bound to a timestep spacing (`lazydit.sampling.schedule.spaced_timesteps`), and the check that a caching
policy's schedule is the one a sampler runs at.

A bare sampler (ddim, dpm++2m, unipc) runs at the timesteps it is given: the reference respacing by default, a
policy's timesteps when a policy is attached (`lazydit.pipeline.sample`). A spaced sampler (dpm++2m-trailing, ...)
always runs at its spacing's timesteps, so it takes a policy only if that policy is defined on those timesteps.
"""

from lazydit.errors import UsageError
from lazydit.sampling.schedule import spaced_timesteps, spacing_name


def with_spacing(base, spacing: str, label: str):
    """`base` (a sampler) run at the timesteps of `spacing`.

    Args:
        base: a sampler function sample(model, y, steps, *, ..., timesteps=None).
        spacing: a name of `lazydit.sampling.schedule.SPACINGS`.
        label: the progress bar's default label (f"{label}-{T}").
    Returns:
        a sampler with base's signature; given `timesteps`, it refuses any but its spacing's.
    """

    def sample(model, y, steps: int, *, timesteps: list | None = None, desc: str | None = None, **options):
        own = spaced_timesteps(steps, spacing)
        if timesteps is not None and [int(t) for t in timesteps] != own:
            raise UsageError(f"{label} runs at {spacing_name(steps, spacing)} (timesteps {_short(own)}), not at "
                             f"timesteps {_short(timesteps)}: pass no timesteps, or use the sampler without a spacing")
        return base(model, y, steps, timesteps=own, desc=desc or f"{label}-{steps}", **options)

    sample.__name__ = sample.__qualname__ = f"{base.__name__}_{spacing}"
    sample.__doc__ = (f"{label}: `{base.__module__}.{base.__name__}` at the {spacing!r} timesteps of T steps "
                      "(`spaced_timesteps`); `timesteps`, if given, must be those. Args and returns: as the base.")
    sample.spacing = spacing
    return sample


def sampler_timesteps(sampler, steps: int) -> list | None:
    """The timesteps a sampler runs at whatever it is given (a spaced sampler's), or None for one that runs at the
    timesteps it is given.

    Args:
        sampler: a sampler function (a value of `lazydit.sampling.SAMPLERS`).
        steps: T.
    """
    spacing = getattr(sampler, "spacing", None)
    return None if spacing is None else spaced_timesteps(steps, spacing)


def check_policy_schedule(name: str, steps: int, policy) -> None:
    """Refuse a caching policy defined on other timesteps than those the sampler runs at.

    Args:
        name: the sampler's name (a key of `lazydit.sampling.SAMPLERS`).
        steps: T.
        policy: the caching Policy, or None.
    Raises:
        UsageError: an unknown sampler, or a spaced one with a policy on other timesteps (naming both schedules).
    """
    from lazydit.sampling import SAMPLERS

    if name not in SAMPLERS:
        raise UsageError(f"unknown sampler {name!r}: choose from {', '.join(SAMPLERS)}")
    sampler = SAMPLERS[name]
    own = sampler_timesteps(sampler, steps)
    if policy is None or own is None or [int(t) for t in policy.timesteps] == own:
        return
    raise UsageError(f"sampler {name!r} runs at {spacing_name(steps, sampler.spacing)} (timesteps {_short(own)}), "
                     f"but the {type(policy).__name__} policy is defined on {policy.schedule_name()} (timesteps "
                     f"{_short(policy.timesteps)}): sample it with a sampler without a spacing (ddim, dpm++2m, "
                     "unipc), which runs at the policy's timesteps")


def _short(ts) -> str:
    """Timesteps in sampling order (descending), the middle elided when long."""
    ts = [int(t) for t in ts][::-1]
    return str(ts) if len(ts) <= 8 else f"[{', '.join(map(str, ts[:4]))}, ..., {', '.join(map(str, ts[-3:]))}]"
