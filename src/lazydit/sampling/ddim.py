"""DDIM (eta = 0) with the reference classifier-free guidance, as a plain function (k-diffusion style).

The sampler knows nothing about lazy gates or caches: those attach to the model (see `lazydit.lazy`).
"""

import torch
from tqdm.auto import tqdm

from lazydit.models.dit import combine_cfg
from lazydit.sampling.schedule import Schedule


def model_eps(model, x, t, y, cfg_scale: float):
    """eps prediction (B, C, H, W): one forward, with the reference CFG when cfg_scale != 1 (x, y are [x; x], [y; null]);
    a model with a `guided_channels` attribute is guided on that many channels (the reference: 3 of 4 latent ones)."""
    C = x.shape[1]
    if cfg_scale == 1.0:
        return model(x, t, y)[:, :C]
    half = x[: len(x) // 2]  # as forward_with_cfg: both halves run on the conditional half's x
    guided = getattr(model, "guided_channels", None)  # diffusers' pipelines guide every latent channel
    return combine_cfg(model(torch.cat([half, half]), t, y), C, cfg_scale, guided)[:, :C]


def initial_noise(model, y, x=None, cfg_scale: float = 1.0, generator=None, seed=None, null_label=None):
    """The sampler's starting batch: x (B, C, H, W) drawn from `generator` / `seed` on y's device unless given, in
    the model's dtype; under guidance (5) the batch is [x; x] with labels [y; null].

    Returns:
        (x, y, guided)
    """
    cfg = model.config
    B, device = y.shape[0], y.device
    if x is None:
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(0 if seed is None else seed)
        shape = (B, cfg.in_channels, cfg.input_size, cfg.input_size)
        x = torch.randn(shape, generator=generator, device=device)
    x = x.to(device=device, dtype=next(model.parameters()).dtype)
    guided = cfg_scale != 1.0
    if guided:  # (5) the batch is [x; x] with labels [y; null]
        null = cfg.num_classes if null_label is None else null_label
        x = torch.cat([x, x])
        y = torch.cat([y, torch.full_like(y, null)])
    return x, y, guided


def ddim_sample(
    model,
    y,
    steps: int,
    *,
    x=None,
    cfg_scale: float = 1.0,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    null_label: int | None = None,
    progress: bool = True,
    desc: str | None = None,
    callback=None,
    timesteps: list | None = None,
):
    """DDIM (eta = 0) over the reference respacing of T steps, with optional classifier-free guidance.

    Args:
        model: a DiT (or anything with `.config` and forward(x, t, y) -> (B, C_out, H, W)).
        y: (B,) long class labels.
        steps: T, number of sampling steps.
        x: (B, C, H, W) initial noise; drawn from `generator` / `seed` (on y's device) when None.
        cfg_scale: guidance scale w; 1.0 disables guidance (one forward of B rows per step).
        generator, seed: source of the initial noise (deterministic for a given seed).
        null_label: label of the unconditional branch; defaults to config.num_classes.
        progress: show a progress bar.
        desc: its label (default "DDIM-T").
        callback: called as callback(dict(k=k, i=i, x=x_k, x_prev=x_{k-1}, eps=eps)) after every step.
        timesteps: T ascending original timesteps instead of the reference respacing (`Schedule`).
    Returns:
        (B, C, H, W) samples x_0 (conditional half only when guided).
    """
    x, y, guided = initial_noise(model, y, x, cfg_scale, generator, seed, null_label)
    device = y.device
    sched = Schedule(steps, timesteps)
    bar = tqdm(range(steps - 1, -1, -1), desc=desc or f"DDIM-{steps}", disable=not progress, leave=False)
    with torch.no_grad():
        for i, k in enumerate(bar):
            t = sched.timesteps(k, x.shape[0], device)
            eps = model_eps(model, x, t, y, cfg_scale)
            x_prev = sched.ddim_step(x, eps, k)
            if callback is not None:
                callback(dict(k=k, i=i, x=x, x_prev=x_prev, eps=eps))
            x = x_prev
    return x.chunk(2)[0] if guided else x
