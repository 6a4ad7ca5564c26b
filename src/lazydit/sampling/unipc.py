"""UniPC (the bh2 variant, order 2, data prediction, corrector on) as a plain function beside `ddim_sample`.

It is the rule of diffusers' `UniPCMultistepScheduler` with its defaults (solver_order=2, predict_x0=True,
solver_type="bh2", lower_order_final=True, disable_corrector=[], final_sigmas_type="zero") on the discrete schedule:
the model runs once per step, at the same T timesteps as DDIM of T steps (or the `timesteps` given), so caching
policies defined on that schedule attach unchanged. With alpha = sqrt(abar), sigma = sqrt(1 - abar) and the half
log-SNR lambda = log(alpha / sigma), step i = 0 .. T-1 (sampling order) calls the model at the sample x_i (respaced
index k = T-1-i) and then

    (1) m_i = (x_i - sigma_i eps_i) / alpha_i                       data prediction from the eps-prediction
    (2) for steps between noise levels s -> t, h = lambda_t - lambda_s, B = phi = expm1(-h) (bh2: B(h) = e^{-h} - 1)
        and the first-order part  F(x, m) = (sigma_t / sigma_s) x - alpha_t phi m  (exactly DDIM)
    (3) corrector UniC (i >= 1; it replaces x_i by xc_i, from the previous step's xc_{i-1}, s = i-1, t = i):
            order 1 (i = 1):  xc_i = F(xc_{i-1}, m_{i-1}) - alpha_t B (1/2) (m_i - m_{i-1})
            order 2 (i >= 2): r = (lambda_{i-2} - lambda_{i-1}) / h,  D = (m_{i-2} - m_{i-1}) / r,
                              (rho_D, rho_m) solves [[1, 1], [r, 1]] rho = [g_1, g_2] / B with
                              g_1 = phi / (-h) - 1,  g_2 = 2 (g_1 / (-h) - 1/2),
                              xc_i = F(xc_{i-1}, m_{i-1}) - alpha_t B (rho_D D + rho_m (m_i - m_{i-1}))
        its order is that of the previous predictor step;
    (4) predictor UniP (s = i, t = i+1), from xc_i (x_0 at i = 0):
            order 1 (the first step, and the last, into sigma = 0):  x_{i+1} = F(xc_i, m_i)
            order 2 (every other step):  r = (lambda_{i-1} - lambda_i) / h,  D = (m_{i-1} - m_i) / r,
                                          x_{i+1} = F(xc_i, m_i) - alpha_t B (1/2) D

UniP-2 with bh2 is DPM-Solver++(2M) (`lazydit.sampling.dpm_solver`). The last step ends at abar = 1, where lambda is
infinite, phi = B = -1 and (4) returns m_{T-1}; no corrector follows it (that would need another model call), so
UniPC of T steps calls the model T times. The model output at step i is taken at the uncorrected x_i, as diffusers
does: the corrector changes the state the next step starts from, not the model's input. Guidance is applied to eps
before (1), as for DDIM.
"""

import math
from typing import NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from lazydit.sampling.ddim import initial_noise, model_eps
from lazydit.sampling.schedule import Schedule


class UniPCStep(NamedTuple):
    """One step of UniPC as linear combinations (float64 coefficients)."""

    k: int  # respaced index the model runs at
    corrector: tuple | None  # (a, c_m, c_prev, c_prev2): xc_i = a xc_{i-1} + c_m m_i + c_prev m_{i-1} + c_prev2 m_{i-2}
    predictor: tuple  # (a, b, c): x_{i+1} = a xc_i + b m_i + c m_{i-1}


def _lambda(abar: float) -> float:
    """Half log-SNR of abar (inf at abar = 1)."""
    return math.inf if abar == 1.0 else 0.5 * (math.log(abar) - math.log1p(-abar))


def _first_order(a_s: float, a_t: float):
    """(2) for s -> t: (sigma_t / sigma_s, -alpha_t phi, -alpha_t B, h); B = phi = expm1(-h)."""
    h = _lambda(a_t) - _lambda(a_s)
    phi = math.expm1(-h)
    alpha_t = math.sqrt(a_t)
    return math.sqrt(1 - a_t) / math.sqrt(1 - a_s), -alpha_t * phi, -alpha_t * phi, h


def _corrector(lam: list, abar: list, i: int, order: int) -> tuple:
    """(3): the coefficients of xc_i from step i-1 (and i-2 at order 2)."""
    a, b, w, h = _first_order(abar[i - 1], abar[i])  # w = -alpha_t B
    if order == 1:
        return a, 0.5 * w, b - 0.5 * w, 0.0
    r = (lam[i - 2] - lam[i - 1]) / h
    hh, B = -h, math.expm1(-h)
    g1 = math.expm1(hh) / hh - 1
    g2 = 2 * (g1 / hh - 0.5)
    rho_d, rho_m = np.linalg.solve(np.array([[1.0, 1.0], [r, 1.0]]), np.array([g1, g2]) / B)
    # w (rho_D (m_{i-2} - m_{i-1}) / r + rho_m (m_i - m_{i-1}))
    return a, w * rho_m, b - w * (rho_d / r + rho_m), w * rho_d / r


def _predictor(lam: list, abar: list, i: int, order: int) -> tuple:
    """(4): the coefficients of x_{i+1} from xc_i, m_i (and m_{i-1} at order 2)."""
    a_t = abar[i + 1]
    if a_t == 1.0:  # into sigma = 0: x_{i+1} = m_i
        return 0.0, 1.0, 0.0
    a, b, w, h = _first_order(abar[i], a_t)
    if order == 1:
        return a, b, 0.0
    r = (lam[i - 1] - lam[i]) / h
    # w (1/2) (m_{i-1} - m_i) / r
    return a, b - 0.5 * w / r, 0.5 * w / r


def unipc_coefficients(steps: int, timesteps: list | None = None) -> list:
    """Per step (sampling order, k = T-1 .. 0): the corrector and predictor of UniPC (bh2, order 2) as `UniPCStep`.

    Args:
        steps: T.
        timesteps: T ascending original timesteps (default: the reference respacing).
    Returns:
        list of T `UniPCStep`; corrector None at the first step, c_prev2 = 0 at order 1, c = 0 on first-order
        predictor steps.
    """
    sched = Schedule(steps, timesteps)
    abar = [float(sched.abar[k]) for k in range(steps - 1, -1, -1)] + [1.0]  # per step i, then sigma = 0
    lam = [_lambda(a) for a in abar]
    out, order_prev = [], None
    for i, k in enumerate(range(steps - 1, -1, -1)):
        corrector = None if i == 0 else _corrector(lam, abar, i, order_prev)
        order = 1 if i == 0 or i == steps - 1 else 2  # warm-up, and lower_order_final
        out.append(UniPCStep(k, corrector, _predictor(lam, abar, i, order)))
        order_prev = order
    return out


def unipc_sample(
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
    """UniPC (bh2, order 2, corrector on) over the reference respacing of T steps, with optional guidance.

    Args: as `lazydit.sampling.ddim.ddim_sample` (the same noise for the same seed; `timesteps` likewise); the
        callback's x is the model's input at the step (before the corrector), x_prev the predictor's output.
    Returns:
        (B, C, H, W) samples x_0 (conditional half only when guided).
    """
    x, y, guided = initial_noise(model, y, x, cfg_scale, generator, seed, null_label)
    sched = Schedule(steps, timesteps)
    abar = np.asarray(sched.abar)
    device = y.device
    x_last = m_prev = m_prev2 = None
    bar = tqdm(unipc_coefficients(steps, timesteps), desc=desc or f"UniPC-{steps}", disable=not progress,
               leave=False)
    with torch.no_grad():
        for i, step in enumerate(bar):
            k = step.k
            eps = model_eps(model, x, sched.timesteps(k, x.shape[0], device), y, cfg_scale)
            m = (x - math.sqrt(1 - abar[k]) * eps) / math.sqrt(abar[k])  # (1)
            xc = x if step.corrector is None else _combine(step.corrector, x_last, m, m_prev, m_prev2)  # (3)
            a, b, c = step.predictor
            x_next = _combine((a, b, c), xc, m, m_prev)  # (4)
            if callback is not None:
                callback(dict(k=k, i=i, x=x, x_prev=x_next, eps=eps))
            x, x_last, m_prev, m_prev2 = x_next, xc, m, m_prev
    return x.chunk(2)[0] if guided else x


def _combine(coefs: tuple, *terms):
    """sum_j coefs[j] terms[j], leaving out zero coefficients (whose terms may be None)."""
    out = None
    for c, t in zip(coefs, terms):
        if c != 0.0:
            out = c * t if out is None else out + c * t
    return out
