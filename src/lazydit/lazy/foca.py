"""FoCa ("Forecast then Calibrate"), TaylorSeer's successor from the same group, as one static-schedule policy.

Source. No repository of FoCa's own code could be read (lists of caching methods point to the group's
Shenyi-Z/Cache4Diffusion, whose newest snapshot holds no FoCa), so the rule here is the FoCa predictor as the
authors' group wrote it in the HiCache repository (HiCache and FoCa share their authors), read in the copy
`yiming-l21/CFGCache` at commit 96eec87 ("initialization from hicache repository"), file
`models/qwen_image/taylor_utils/__init__.py`:

- `derivative_approximation_foca`: at a full step the branch output is put in front of the kept values
  F_n, F_{n-1}, ... (the history holds computed outputs, not derivatives);
- `taylor_formula_foca`, "BDF-2 + Heun": with fewer than two values the forecast is F_n; otherwise
  P = (4 F_n - F_{n-1}) / 3 (BDF2 without its derivative term: the forecast) and F = (F_n + P) / 2 (Heun's
  trapezoidal mean with the last computed output: the calibration);
- the steps, `models/qwen_image/cache_functions/cal_type.py` with that repository's defaults
  (`models/qwen_image/sample.py`: interval 7, first_enhance 3): the first W steps compute, then a counter that
  restarts at every full step makes a full step every N-th step after the last one.

That repository applies the predictor to the feature groups its grouped TaylorSeer assigns to FoCa
(`models/qwen_image/taylor_utils/grouped_taylor.py`, order 4); here it serves every attention and MLP output.

In lazydit's terms, with j = T - 1 - k the sampling step: j computes iff j < W or (j + 1 - W) % N == 0 (so the
first full step after the warm-up is j = W - 1 + N), and every skipped step between two full steps receives the
same value, F_n + (F_n - F_{n-1}) / 6, whatever its distance from them (the source's forecast reads no step).

vipshop/cache-dit ships another FoCa (`src/cache_dit/caching/cache_contexts/calibrators/foca.py`: a trapezoid
anchored at the last full step, over the elapsed steps, capped at 3) written by that library, not by FoCa's authors;
it is not the rule implemented here.
"""

from lazydit.lazy.config import LazyConfig
from lazydit.lazy.forecast import ForecastHistory
from lazydit.lazy.policies import register_policy
from lazydit.lazy.static import _count, _Schedule


@register_policy("foca")
class FoCa(_Schedule):
    """FoCa: the first `warmup` steps compute, then one full step every `interval` steps counted from the last
    one; between them every attention and MLP output receives the BDF2 + Heun forecast of its last two computed
    outputs (`ForecastHistory` with the "foca" series), the same on every skipped step of the gap.

    Options (`--method foca:interval=N,warmup=W`): N >= 1 (1: the bare model), W >= 1 (the first step always
    computes); the source's defaults N=7, W=3.

    Args:
        steps: T, the number of sampling steps.
        config: the run's LazyConfig.
        interval: N, the distance between full steps after the warm-up.
        warmup: W, the first steps that all compute.
    Raises:
        OptionRangeError: interval or warmup is not an integer >= 1.
    """

    label = "FoCa"

    def __init__(self, steps: int, config: LazyConfig | None = None, interval: int = 7, warmup: int = 3):
        super().__init__(steps, config)
        self.interval = _count("interval", interval, 1)
        self.warmup = _count("warmup", warmup, 1)
        self.forecast = 1  # the history keeps the last output and one difference

    def computes(self, k: int) -> bool:
        """Whether respaced step k computes every branch: sampling step j = T - 1 - k is in the warm-up, or the
        source's counter (restarted at every full step) reaches interval - 1.

        Args:
            k: the respaced step index (T - 1 first).
        Returns:
            True when every branch computes at k.
        """
        j = self.steps - 1 - k
        return j < self.warmup or (j + 1 - self.warmup) % self.interval == 0

    def new_history(self) -> ForecastHistory:
        """FoCa's history: the last computed output and its difference from the one before (`series="foca"`).

        Returns:
            A ForecastHistory of order 1 in the "foca" series.
        """
        return ForecastHistory(1, series="foca", clock="step")

    def overhead_macs(self, cfg) -> int:
        """The forecast's elementwise work per forward of one image, counted as TaylorSeer's
        (`lazydit.models.cost.forecast_macs`): two multiply-adds per output element (the predictor
        d0 + d1 / 3 and Heun's mean), which also covers a computed row's one subtraction.

        Args:
            cfg: the model config.
        Returns:
            MACs per forward and image.
        """
        from lazydit.models.cost import forecast_macs

        return forecast_macs(cfg, 2)
