"""Training-free static caches: FORA and TaylorSeer, each one policy.

Both compute every branch of every block on a fixed set of steps and let every branch skip on the others; they
differ in which steps compute and in what a skipped branch receives. Respaced index k runs from T - 1 (the first
sampling step, where no cache exists yet) down to 0; j = T - 1 - k counts sampling steps from 0.
"""

import math

import torch

from lazydit.errors import OptionRangeError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.policies import Policy, register_policy


def _count(name: str, value, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise OptionRangeError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


class _Schedule(Policy):
    """A fixed set of full steps (`computes(k)`); every branch of every other step skips."""

    plans_ahead = True  # the schedule is known: a skipped branch skips its norm and modulation too

    def computes(self, k: int) -> bool:
        """Whether respaced step k computes every branch."""
        raise NotImplementedError

    def compute_rows(self, hook, k, z):
        if self.computes(k):
            return None
        return torch.zeros(hook.cache.shape[0], dtype=torch.bool)


@register_policy("fora")
class FORA(_Schedule):
    """FORA (Fast-FORward cAching): every attention and MLP output is computed at the first step and at every step
    whose index k is a multiple of `interval`, and reused unchanged (the gate of the current step applied) on the
    steps between: FORA's `step == T - 1 or step % N == 0`, with step counting down to 0, so the last step computes.

    Options (`--method fora:interval=N`): N >= 1 (1: the bare model; FORA's default 3).
    """

    label = "FORA"

    def __init__(self, steps: int, config: LazyConfig | None = None, interval: int = 3):
        super().__init__(steps, config)
        self.interval = _count("interval", interval, 1)
        self.forecast = 0

    def computes(self, k):
        return k == self.steps - 1 or k % self.interval == 0


class TaylorHistory:
    """TaylorSeer's per-row Taylor factors of one branch: d_0 = the last computed output, d_{i+1} = (d_i - d_i of the
    previous full step) / (steps between the two full steps), up to the order, at sampling step j0 of the last full
    step (float32). A forecast at step j is sum_i d_i (j - j0)^i / i!."""

    def __init__(self, order: int):
        self.order = order
        self.d = None  # list of (B, ...) factors, d[0] first
        self.n = None  # (B,) factors each row holds
        self.j0 = None  # (B,) sampling step of each row's last full step

    def update(self, out: torch.Tensor, j: float, rows=None):
        """Rows `rows` (an index tensor; None: all) computed `out[rows]` at sampling step j."""
        if self.d is None or self.d[0].shape != out.shape:
            self.d = [torch.zeros(out.shape, dtype=torch.float32, device=out.device) for _ in range(self.order + 1)]
            self.n = torch.zeros(out.shape[0], dtype=torch.long, device=out.device)
            self.j0 = torch.zeros(out.shape[0], dtype=torch.float32, device=out.device)
        sel = slice(None) if rows is None else rows
        y = (out if rows is None else out[rows]).float()
        n, dist = self.n[sel], j - self.j0[sel]
        new = [y]
        for i in range(self.order):  # d_{i+1} where the row held d_i before
            has = (n > i).view(-1, *([1] * (y.dim() - 1)))
            step = torch.where(n > i, dist, 1.0).view(-1, *([1] * (y.dim() - 1)))
            new.append(torch.where(has, (new[i] - self.d[i][sel]) / step, 0.0))
        for i in range(self.order + 1):
            self.d[i][sel] = new[i]
        self.n[sel] = torch.clamp(n + 1, max=self.order + 1)
        self.j0[sel] = float(j)

    def predict(self, j: float, dtype) -> torch.Tensor:
        """(B, ...) forecast of every row at sampling step j."""
        off = (j - self.j0).view(-1, *([1] * (self.d[0].dim() - 1)))
        out = self.d[0].clone()
        for i in range(1, self.order + 1):
            out = out + self.d[i] * (off**i / math.factorial(i))
        return out.to(dtype)


@register_policy("taylorseer")
class TaylorSeer(_Schedule):
    """TaylorSeer: the first `warmup` steps compute, then one full step every `interval` steps; between them every
    attention and MLP output is forecast by a Taylor series of `order` whose derivatives are finite differences of
    the outputs of the last full steps (`TaylorHistory`). Order 0 reuses the last output (a FORA-like cache on this
    schedule).

    Options (`--method taylorseer:interval=N,order=O,warmup=W`): TaylorSeer-DiT's defaults N=4, O=4, W=2.
    """

    label = "TaylorSeer"

    def __init__(self, steps: int, config: LazyConfig | None = None, interval: int = 4, order: int = 4,
                 warmup: int = 2):
        super().__init__(steps, config)
        self.interval = _count("interval", interval, 1)
        self.order = _count("order", order, 0)
        self.warmup = _count("warmup", warmup, 0)
        self.forecast = self.order

    def computes(self, k):
        j = self.steps - 1 - k
        return j < self.warmup or (j - self.warmup) % self.interval == 0

    def new_history(self):
        return TaylorHistory(self.order)

    def clock(self, run) -> float:
        return float(self.steps - 1 - run.k)  # sampling steps, as TaylorSeer counts
