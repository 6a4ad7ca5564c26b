"""Gaussian diffusion as DiT uses it: the linear 1000-step schedule, the reference respacing, one DDIM step, and
the DDPM training loss. The samplers built on it are in `lazydit.sampling.ddim`."""

import math

import numpy as np
import torch


NUM_TRAIN_TIMESTEPS = 1000


def linear_betas(num_timesteps=NUM_TRAIN_TIMESTEPS):
    """(1) beta_t = linspace(1e-4, 0.02) scaled to 1000 steps, float64."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * 0.0001, scale * 0.02, num_timesteps, dtype=np.float64)


def alphas_cumprod(num_timesteps=NUM_TRAIN_TIMESTEPS):
    """(2) abar_t = prod_{s<=t} (1 - beta_s), float64 (1000,)."""
    return np.cumprod(1.0 - linear_betas(num_timesteps))


def respaced_timesteps(steps: int, num_timesteps=NUM_TRAIN_TIMESTEPS) -> list:
    """The reference respacing (`space_timesteps(1000, [T])`): T original timesteps, ascending.

    Args:
        steps: T, number of sampling steps (1 <= T <= 1000).
    Returns:
        timestep_map: list of T ints; respaced index k runs the model at original timestep timestep_map[k].
    """
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if steps == 1:
        return [0]
    stride = (num_timesteps - 1) / (steps - 1)
    cur, out = 0.0, []
    for _ in range(steps):
        out.append(round(cur))  # Python round, as the reference
        cur += stride
    return out


def respacing_name(steps: int) -> str:
    """The reference respacing of T steps in words (the same timesteps as diffusers' DDIM with linspace spacing)."""
    return f"lazydit's respacing of T={steps} steps, i.e. diffusers' DDIMScheduler with timestep_spacing='linspace'"


SPACINGS = ("reference", "uniform", "trailing", "logsnr")  # the timestep schedules of `spaced_timesteps`


def half_log_snr(num_timesteps=NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """lambda_t = log(alpha_t / sigma_t) = 0.5 log(abar_t / (1 - abar_t)) per original timestep, float64, decreasing."""
    abar = alphas_cumprod(num_timesteps)
    return 0.5 * (np.log(abar) - np.log1p(-abar))


def spaced_timesteps(steps: int, spacing: str = "reference", num_timesteps=NUM_TRAIN_TIMESTEPS) -> list:
    """T original timesteps, ascending, of one of the schedules in `SPACINGS` (N = num_timesteps):

    - "reference": `respaced_timesteps` (includes timestep 0; the last step starts there).
    - "uniform": round(linspace(0, N - 1, T + 1))[1:], time-uniform without t = 0 (diffusers' multistep
      schedulers with timestep_spacing="linspace").
    - "trailing": round(arange(N, 0, -N / T))[:T] - 1, reversed (diffusers' timestep_spacing="trailing"; its arange
      holds a T + 1-th value near 0 for a few T, e.g. 61, which diffusers keeps as timestep -1 and this cuts).
    - "logsnr": T values uniform in lambda from lambda_{N-1} to lambda_0, each mapped to the fractional timestep
      that interpolates lambda linearly between its discrete neighbours, then rounded (diffusers'
      DPMSolverMultistepScheduler with use_lu_lambdas=True); the ends are N - 1 and 0.
    Rounding is numpy's (half to even), as diffusers'.

    Args:
        steps: T (1 <= T <= N).
        spacing: a name of `SPACINGS`.
    Returns:
        list of T distinct ascending ints in [0, N).
    Raises:
        UsageError: an unknown spacing.
        OptionRangeError: T out of range, or so large that the spacing repeats a timestep.
    """
    from lazydit.errors import OptionRangeError, UsageError

    if spacing not in SPACINGS:
        raise UsageError(f"unknown timestep spacing {spacing!r}: choose from {', '.join(SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise OptionRangeError(f"steps must be in [1, {num_timesteps}], got {steps}")
    if spacing == "reference":
        return respaced_timesteps(steps, num_timesteps)
    out = _spaced(steps, spacing, num_timesteps)
    if len(set(out)) != steps:
        most = next(s for s in range(steps - 1, 0, -1) if len(set(_spaced(s, spacing, num_timesteps))) == s)
        raise OptionRangeError(f"the {spacing!r} spacing of T={steps} steps puts two steps on one of the "
                               f"{num_timesteps} timesteps: take at most {most} steps")
    return out


def _spaced(steps: int, spacing: str, num_timesteps: int) -> list:
    """`spaced_timesteps` of a spacing other than the reference, repeats included."""
    if spacing == "uniform":
        t = np.linspace(0, num_timesteps - 1, steps + 1).round()[1:]
    elif spacing == "trailing":
        t = (np.arange(num_timesteps, 0, -num_timesteps / steps)[:steps].round() - 1)[::-1]
    else:
        lam = half_log_snr(num_timesteps)
        wanted = np.linspace(lam[-1], lam[0], steps)  # sampling order: lambda_{N-1} (T = 1: that one) .. lambda_0
        t = np.interp(wanted, lam[::-1], np.arange(num_timesteps - 1, -1, -1.0)).round()[::-1]
    return [int(v) for v in t]


def spacing_name(steps: int, spacing: str = "reference") -> str:
    """A spacing of T steps in words (for messages and report rows)."""
    if spacing == "reference":
        return respacing_name(steps)
    words = {"uniform": "diffusers' timestep_spacing='linspace' (time-uniform, t = 0 left out)",
             "trailing": "diffusers' timestep_spacing='trailing'",
             "logsnr": "uniform half log-SNR (diffusers' use_lu_lambdas=True)"}
    return f"the {spacing!r} spacing of T={steps} steps, {words[spacing]}"


class Schedule:
    """The respaced schedule of T steps: abar and abar_prev per respaced index k (float64 numpy).

    Args:
        steps: T.
        timestep_map: T ascending original timesteps to run instead of the reference respacing (another sampler's
            schedule, e.g. a diffusers scheduler's "leading" spacing); abar_prev of k = 0 is 1 either way.
    """

    def __init__(self, steps: int, timestep_map: list | None = None):
        self.steps = steps
        self.timestep_map = respaced_timesteps(steps) if timestep_map is None else [int(t) for t in timestep_map]
        if len(self.timestep_map) != steps or sorted(set(self.timestep_map)) != self.timestep_map or \
                not 0 <= self.timestep_map[0] <= self.timestep_map[-1] < NUM_TRAIN_TIMESTEPS:
            raise ValueError(f"a schedule of {steps} steps needs {steps} distinct ascending timesteps in "
                             f"[0, {NUM_TRAIN_TIMESTEPS}), got {timestep_map}")
        abar = alphas_cumprod()
        self.abar = abar[self.timestep_map]  # (T,)
        self.abar_prev = np.append(1.0, self.abar[:-1])  # abar_prev of k=0 is 1

    def timesteps(self, k: int, batch: int, device) -> torch.Tensor:
        """Original timestep of respaced index k, as the (B,) long tensor the model receives."""
        return torch.full((batch,), self.timestep_map[k], dtype=torch.long, device=device)

    def q_sample(self, x0, k: int, noise):
        """(3) x_k = sqrt(abar_k) x0 + sqrt(1 - abar_k) eps."""
        a = float(self.abar[k])
        return math.sqrt(a) * x0 + math.sqrt(1 - a) * noise

    def ddim_step(self, x, eps, k: int):
        """(4) One DDIM step (eta = 0) from respaced index k to k-1, in float32 as the reference.

        x0_hat = sqrt(1/abar_k) x_k - sqrt(1/abar_k - 1) eps;  x_{k-1} = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps.
        """
        a, ap = self.abar[k], self.abar_prev[k]
        x0 = float(np.sqrt(1.0 / a)) * x - float(np.sqrt(1.0 / a - 1)) * eps
        eps = (float(np.sqrt(1.0 / a)) * x - x0) / float(np.sqrt(1.0 / a - 1))  # reference re-derives eps
        return float(np.sqrt(ap)) * x0 + float(np.sqrt(1 - ap)) * eps


# ---------------------------------------------------------------- training loss (DDPM, as guided-diffusion)


def _normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_std_normal_cdf(x):
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3))))


def _discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_std_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_std_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )


class TrainingLoss:
    """DDPM training loss on the full 1000-step chain: eps-MSE (+ the VB term when the model learns sigma)."""

    def __init__(self, num_timesteps=NUM_TRAIN_TIMESTEPS):
        betas = linear_betas(num_timesteps)
        abar = np.cumprod(1.0 - betas)
        abar_prev = np.append(1.0, abar[:-1])
        self.num_timesteps = num_timesteps
        post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
        self._np = dict(
            sqrt_abar=np.sqrt(abar),
            sqrt_1m_abar=np.sqrt(1.0 - abar),
            post_logvar=np.log(np.append(post_var[1], post_var[1:])),
            post_c1=betas * np.sqrt(abar_prev) / (1.0 - abar),
            post_c2=(1.0 - abar_prev) * np.sqrt(1.0 - betas) / (1.0 - abar),
            log_betas=np.log(betas),
            sqrt_recip_abar=np.sqrt(1.0 / abar),
            sqrt_recipm1_abar=np.sqrt(1.0 / abar - 1),
        )

    def _at(self, name, t, ndim):
        v = torch.from_numpy(self._np[name]).to(t.device)[t].float()
        return v.view(-1, *([1] * (ndim - 1)))

    def __call__(self, model, x0, t, y, noise=None):
        """Per-sample loss (B,) at original timesteps t; the model runs in its current train/eval mode."""
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self._at("sqrt_abar", t, x0.ndim) * x0 + self._at("sqrt_1m_abar", t, x0.ndim) * noise
        out = model(xt, t, y)
        C = x0.shape[1]
        loss = ((out[:, :C] - noise) ** 2).mean(dim=tuple(range(1, x0.ndim)))
        if out.shape[1] == 2 * C:  # learn_sigma: VB term with a stop-grad on the mean (Nichol & Dhariwal)
            loss = loss + self._vb(out[:, :C].detach(), out[:, C:], x0, xt, t)
        return loss

    def _vb(self, eps, var_values, x0, xt, t):
        n = x0.ndim
        min_log = self._at("post_logvar", t, n)
        max_log = self._at("log_betas", t, n)
        frac = (var_values + 1) / 2
        model_logvar = frac * max_log + (1 - frac) * min_log
        pred_x0 = self._at("sqrt_recip_abar", t, n) * xt - self._at("sqrt_recipm1_abar", t, n) * eps
        model_mean = self._at("post_c1", t, n) * pred_x0 + self._at("post_c2", t, n) * xt
        true_mean = self._at("post_c1", t, n) * x0 + self._at("post_c2", t, n) * xt
        dims = tuple(range(1, n))
        kl = _normal_kl(true_mean, min_log, model_mean, model_logvar).mean(dim=dims) / math.log(2.0)
        nll = -_discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_logvar).mean(dim=dims) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return vb  # LossType.MSE, as DiT: the VB term is not rescaled
