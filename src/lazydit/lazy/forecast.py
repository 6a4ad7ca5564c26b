"""Forecast reuse: a skipped row receives an extrapolation of its branch's last computed outputs instead of a copy
of the last one. One history class serves both users: forecast LazyDiT (`LazyConfig.forecast`, Newton divided
differences in the timestep) and TaylorSeer (`lazydit.lazy.static.TaylorSeer`, its Taylor factors in the sampling
step). They differ in two parameters of `ForecastHistory`:

- `clock`: where a step sits. "timestep": its original timestep t (0..999, falling as sampling goes on); "step":
  j = T - 1 - k, the sampling steps before it (TaylorSeer's count).
- `series`: how the differences are divided and summed. With s0 > s1 > s2 ... the clock values of a row's last
  computed steps, most recent first, and d0 = y0 its last computed output:

    "newton"  d_{i+1} = (d_i - d_i of the previous point) / (s - s_i)    (s_i: the (i+1)-th last knot)
              F(s) ~ d0 + d1 (s - s0) + d2 (s - s0) (s - s1) + ...
              d1 = f[s0, s1], d2 = f[s0, s1, s2]: the polynomial through the points, exact for outputs that are
              polynomials of that order in s.
    "taylor"  d_{i+1} = (d_i - d_i of the previous point) / (s - s0)     (every order: the distance between the
              last two points, TaylorSeer's rule)
              F(s) ~ sum_i d_i (s - s0)^i / i!
    "foca"    order 1 only: d1 = y0 - y1, undivided (FoCa counts computed points, not steps; `lazydit.lazy.foca`)
              F ~ (y0 + P) / 2 with P = y0 + d1 / 3 = (4 y0 - y1) / 3: the BDF2 predictor without its derivative
              term, then Heun's mean with the last output; the same value at every later step (s is not read)

Every row keeps its own history (rows of a mixed batch compute at different steps), so a row with fewer computed
points than the order falls back to the order it has; with one point the forecast is d0 itself, the plain reuse.
Order 0 is the plain reuse and never builds a history (`Policy.new_history` returns None).

Cost: a forecast of order n is n multiply-adds per output element of a skipped row, and keeping the history n
subtract-and-scale operations per element of a computed row: about 2 n N D per branch evaluation and image, the
size of the gate scores (`lazydit.models.cost.forecast_macs`). Memory: n + 1 copies of each branch output.

Passes over memory: once every row has the points of every order, an update of all rows takes the differences in
place in the history's buffers (`torch.sub(out=)`, `div_`; no (B, ...) tensor allocated) and a forecast allocates
only its result (terms of order >= 2 go through one kept buffer): the operations and their order are those of the
general, masked path, so the values are bit for bit the same (tests/test_fused.py). `ForecastHistory.fma` takes
each term as one `addcmul` instead (one pass less per term; the product is not rounded on its own, so a forecast
moves by up to an ulp per term). The history stays float32 whatever the model's dtype: divided differences cancel
(d1 ~ (y0 - y1) / 100 over timesteps), and a bf16 history would keep 8 bits of what is left; a bf16 or fp16
output is widened exactly inside the subtraction, without a float32 copy.
"""

import math

import torch

SERIES = ("newton", "taylor", "foca")
CLOCKS = ("timestep", "step")


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) per-row values shaped to broadcast over `like` (b, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class ForecastHistory:
    """The per-row history of one branch's computed outputs: the differences d_0 (the last computed output) ..
    d_order, the clock values of the last knots, and how many points each row has (all float32 on the output's
    device); `predict` is the forecast at a later step (the module docstring gives both series).

    Args:
        order: the highest difference kept (>= 1).
        series: "newton" (divided differences over the last knots), "taylor" (TaylorSeer's factors) or "foca"
            (FoCa's BDF2 + Heun forecast from the last two outputs; order 1).
        clock: "timestep" (original timesteps) or "step" (sampling steps j = T - 1 - k).
    """

    fma = False  # predict with fused multiply-adds (`addcmul`): one pass per term instead of two, each product not
    # rounded on its own, so not bit for bit the default (within 2^-21 (|d0| + sum_i |d_i w_i|): tests/test_fused.py)

    def __init__(self, order: int, series: str = "newton", clock: str = "timestep"):
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"forecast order must be an integer >= 1 (0 is plain reuse), got {order!r}")
        if series not in SERIES or clock not in CLOCKS:
            raise ValueError(f"series must be one of {SERIES} and clock one of {CLOCKS}, got {series!r}, {clock!r}")
        if series == "foca" and order != 1:
            raise ValueError(f"the foca series keeps the last two outputs (order 1), got order {order!r}")
        self.order, self.series, self.clock = order, series, clock
        self.d = None  # [(B, ...)] * (order + 1): d[0] the last computed output, d[i] the i-th difference
        self.least = 0  # host: every row has at least this many points (updates of all rows so far, capped)
        self._term = None  # predict: the buffer of a term of order >= 2 (fma off)

    def at(self, run) -> float:
        """Where the current step of `run` (a LazyRun) sits on this history's clock."""
        return run.t if self.clock == "timestep" else float(run.policy.steps - 1 - run.k)

    def update(self, out: torch.Tensor, s: float, rows=None):
        """Rows `rows` (an index tensor; None: all) computed `out[rows]` at clock value s."""
        if self.d is None or self.d[0].shape != out.shape:
            self.d = [torch.zeros(out.shape, dtype=torch.float32, device=out.device) for _ in range(self.order + 1)]
            B = out.shape[0]
            self.n = torch.zeros(B, dtype=torch.long, device=out.device)
            knots = self.order if self.series == "newton" else 1  # taylor divides by the last distance only
            self.knots = [torch.zeros(B, dtype=torch.float32, device=out.device) for _ in range(knots)]
            self.least = 0
        if rows is None and self.least >= self.order:
            return self._update_all(out, s)
        sel = slice(None) if rows is None else rows
        y = (out if rows is None else out[rows]).float()
        n, knots = self.n[sel], [k[sel] for k in self.knots]
        new = [y]
        for i in range(self.order):  # d_{i+1} where the row held d_i before
            knot = knots[i] if self.series == "newton" else knots[0]
            new.append(_difference(new[i], self.d[i][sel], self._distance(s, knot), n > i, self.least > i))
        for i in range(len(knots) - 1, 0, -1):  # the knots shift by one (the latest first, read before written)
            self.knots[i][sel] = knots[i - 1]
        self.knots[0][sel] = torch.full_like(knots[0], float(s))
        self.d[0][sel] = y
        for i in range(1, self.order + 1):
            if rows is None:  # a new tensor: keep it rather than copy it
                self.d[i] = new[i]
            else:
                self.d[i][rows] = new[i]
        if rows is None:
            self.least = min(self.least + 1, self.order + 1)
        self.n[sel] = torch.clamp(n + 1, max=self.order + 1)

    def _update_all(self, out: torch.Tensor, s: float):
        """Every row computed, and every row has the points every order needs (no masking): the differences are
        taken in place in the history's own buffers, no (B, ...) tensor is allocated.

        Buffer i holds d_i; d_{i+1} = (d_i new - d_i old) / (s - knot) is written over d_i old (which is read only
        there), so after the pass buffer i holds d_{i+1} for i < order, the last buffer's d_order is dropped and
        takes y: the list rotates by one. Each difference is the subtraction then the division of the general path,
        in the same order and float32 (a bf16 or fp16 `out` is widened exactly inside the subtraction): bit for
        bit its result.
        """
        d, knots = self.d, self.knots
        newer = out  # d_i of the new point (d_0 = y)
        for i in range(self.order):
            knot = knots[i] if self.series == "newton" else knots[0]
            torch.sub(newer, d[i], out=d[i])  # y - d0 (float32: y widened exactly), then d_i - d_i old
            if self.series != "foca":  # foca's differences are not divided
                d[i].div_(_col(s - knot, d[i]))
            newer = d[i]
        d[self.order].copy_(out)  # the dropped d_order's buffer takes d_0 = y
        self.d = [d[self.order]] + d[: self.order]
        for i in range(len(knots) - 1, 0, -1):  # the knots shift by one (the latest first, read before written)
            knots[i].copy_(knots[i - 1])
        knots[0].fill_(float(s))
        self.least = min(self.least + 1, self.order + 1)
        self.n.add_(1).clamp_(max=self.order + 1)

    def _distance(self, s: float, knot: torch.Tensor) -> torch.Tensor:
        """(b,) divisor of a row's difference: the clock distance s - knot, or 1 for the foca series."""
        return torch.ones_like(knot) if self.series == "foca" else s - knot

    def predict(self, s: float, dtype) -> torch.Tensor:
        """(B, ...) forecast of every row at clock value s (rows with one point: their d0)."""
        if self.d is None:
            raise RuntimeError("forecast reuse before any computed step")
        d = self.d
        if self.series == "foca":  # P = d0 + d1 / 3, then (d0 + P) / 2; a row with one point has d1 = 0: d0
            return torch.div(d[1], 3.0).add_(d[0]).add_(d[0]).mul_(0.5).to(dtype)
        ds = _col(s - self.knots[0], d[0])
        weight = ds  # of d1: s - s0 in both series
        if self.fma:  # every term one multiply-add pass (the product not rounded on its own)
            out = torch.addcmul(d[0], d[1], weight)
        else:
            out = torch.mul(d[1], weight).add_(d[0])  # d0 + d1 ds (one buffer; a sum of two terms rounds the same)
        for i in range(2, self.order + 1):
            if self.series == "newton":
                weight = weight * _col(s - self.knots[i - 1], d[0])
            else:
                weight = ds**i / math.factorial(i)
            if self.fma:
                out.addcmul_(d[i], weight)
            else:  # the product into the history's own buffer, then the sum: no (B, ...) tensor per order
                if self._term is None or self._term.shape != d[0].shape:
                    self._term = torch.empty_like(d[0])
                out.add_(torch.mul(d[i], weight, out=self._term))
        return out.to(dtype)

    def forecast(self, run, dtype) -> torch.Tensor:
        """This step's forecast of every row (the current step of `run`), in `dtype`."""
        return self.predict(self.at(run), dtype)

    def learn(self, out: torch.Tensor, run, rows=None):
        """Rows `rows` of `out` were computed at the current step of `run`."""
        self.update(out.detach(), self.at(run), rows)


def _difference(y, prev, ds, has, all_have: bool):
    """(y - prev) / ds per row where the row `has` the earlier point, else 0; `all_have` (known on the host: every
    row has it) skips the masking, which then changes nothing."""
    if all_have:
        return (y - prev) / _col(ds, y)
    return torch.where(_col(has, y), (y - prev) / _col(torch.where(has, ds, 1.0), y), 0.0)
