"""Training-free static caches: FORA and TaylorSeer, each one policy.

Both compute every branch of every block on a fixed set of steps and let every branch skip on the others; they
differ in which steps compute and in what a skipped branch receives. Respaced index k runs from T - 1 (the first
sampling step, where no cache exists yet) down to 0; j = T - 1 - k counts sampling steps from 0.
"""

import torch

from lazydit.errors import OptionRangeError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.forecast import ForecastHistory
from lazydit.lazy.policies import Policy, register_policy


def _count(name: str, value, lo: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < lo:
        raise OptionRangeError(f"{name} must be an integer >= {lo}, got {value!r}")
    return value


class _Schedule(Policy):
    """A fixed set of full steps (`computes(k)`); every branch of every other step skips."""

    engine = "block"  # the schedule is known: a skipped branch skips its norm and modulation too

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


@register_policy("taylorseer")
class TaylorSeer(_Schedule):
    """TaylorSeer: the first `warmup` steps compute, then one full step every `interval` steps; between them every
    attention and MLP output is forecast by a Taylor series of `order` whose derivatives are finite differences of
    the outputs of the last full steps (`ForecastHistory` with TaylorSeer's series and clock). Order 0 reuses the
    last output (a FORA-like cache on this schedule).

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
        """TaylorSeer's factors: every difference divided by the distance between the last two full steps, counted
        in sampling steps j."""
        return ForecastHistory(self.order, series="taylor", clock="step") if self.order else None
