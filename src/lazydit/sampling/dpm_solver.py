"""DPM-Solver++(2M) (multistep, second order, data prediction) as a plain function beside `ddim_sample`.

It runs the model at the same respaced timesteps as DDIM of T steps, so gates and every other caching policy defined
on that schedule attach unchanged. With alpha_k = sqrt(abar_k), sigma_k = sqrt(1 - abar_k) and the half log-SNR
lambda_k = log(alpha_k / sigma_k), one step from respaced index k (s) to k - 1 (t) is

    (1) x0_k = (x_k - sigma_k eps_k) / alpha_k                       data prediction from the eps-prediction
    (2) h = lambda_t - lambda_s
    (3) first order (the first step, and the last, into sigma = 0):
            x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) x0_s
    (4) second order (every other step), with the previous step's h_prev and x0_prev:
            r = h_prev / h,   D = (1 + 1 / (2 r)) x0_s - (1 / (2 r)) x0_prev
            x_t = (sigma_t / sigma_s) x_s - alpha_t (exp(-h) - 1) D

(3) is exactly DDIM (eta = 0); (4) is the "midpoint" form of the multistep solver with the final step taken at first
order ("lower_order_final"): the last step ends at abar = 1, where lambda is infinite and (3) returns x0_s. Guidance is
applied to eps before (1), as for DDIM.
"""

import math

import numpy as np
import torch
from tqdm.auto import tqdm

from lazydit.sampling.ddim import initial_noise, model_eps
from lazydit.sampling.schedule import Schedule


def dpm_solver_coefficients(steps: int, timesteps: list | None = None) -> list:
    """Per step (sampling order, k = T-1 .. 0): (k, a, b, c) with x_t = a x_s + b x0_s + c x0_prev, float64.

    Args:
        steps: T.
        timesteps: T ascending original timesteps (default: the reference respacing).
    Returns:
        list of T tuples; c = 0 on first-order steps.
    """
    sched = Schedule(steps, timesteps)
    out, h_prev = [], None
    for i, k in enumerate(range(steps - 1, -1, -1)):
        a_s, a_t = float(sched.abar[k]), float(sched.abar_prev[k])
        alpha_s, sigma_s = math.sqrt(a_s), math.sqrt(1 - a_s)
        alpha_t, sigma_t = math.sqrt(a_t), math.sqrt(1 - a_t)
        if sigma_t == 0.0:  # (3) into abar = 1: x_t = x0_s
            out.append((k, 0.0, 1.0, 0.0))
            continue
        h = (math.log(alpha_t) - math.log(sigma_t)) - (math.log(alpha_s) - math.log(sigma_s))  # (2)
        a, phi = sigma_t / sigma_s, -alpha_t * math.expm1(-h)
        if h_prev is None:  # (3)
            out.append((k, a, phi, 0.0))
        else:  # (4)
            r = h_prev / h
            out.append((k, a, phi * (1 + 0.5 / r), -phi * 0.5 / r))
        h_prev = h
    return out


def dpm_solver_sample(
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
    """DPM-Solver++(2M) over the reference respacing of T steps, with optional classifier-free guidance.

    Args: as `lazydit.sampling.ddim.ddim_sample` (the same noise for the same seed; `timesteps` likewise).
    Returns:
        (B, C, H, W) samples x_0 (conditional half only when guided).
    """
    x, y, guided = initial_noise(model, y, x, cfg_scale, generator, seed, null_label)
    sched = Schedule(steps, timesteps)
    coefs = dpm_solver_coefficients(steps, timesteps)
    device = y.device
    abar = np.asarray(sched.abar)
    x0_prev = None
    bar = tqdm(coefs, desc=desc or f"DPM++2M-{steps}", disable=not progress, leave=False)
    with torch.no_grad():
        for i, (k, a, b, c) in enumerate(bar):
            t = sched.timesteps(k, x.shape[0], device)
            eps = model_eps(model, x, t, y, cfg_scale)
            x0 = (x - math.sqrt(1 - abar[k]) * eps) / math.sqrt(abar[k])  # (1)
            x_prev = a * x + b * x0 if c == 0.0 else a * x + b * x0 + c * x0_prev  # (3) / (4)
            if callback is not None:
                callback(dict(k=k, i=i, x=x, x_prev=x_prev, eps=eps))
            x, x0_prev = x_prev, x0
    return x.chunk(2)[0] if guided else x
