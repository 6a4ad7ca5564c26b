"""Forecast reuse (beyond the paper): a skipped row receives an extrapolation of its branch's last computed outputs
instead of a copy of the last one.

TaylorSeer-style: the outputs a row computed at timesteps t0 > t1 > t2 (original timesteps, most recent first)
give Newton divided differences, and step t receives the polynomial through them evaluated at t:

    F(t) ~ y0 + f[t0, t1] (t - t0) + f[t0, t1, t2] (t - t0) (t - t1)          (order 2; order 1 stops after the
                                                                               first difference)
    f[t0, t1] = (y0 - y1) / (t0 - t1),   f[t0, t1, t2] = (f[t0, t1] - f[t1, t2]) / (t0 - t2)

exact for outputs that are polynomials of that order in t. Every row keeps its own history (rows of a mixed batch
compute at different steps), so a row with fewer computed points than the order falls back to the order it has;
with one point the forecast is y0 itself, the plain reuse. Order 0 is the plain reuse and never builds a history.

Cost: a forecast of order n is n multiply-adds per output element of a skipped row, and keeping the history n
subtract-and-scale operations per element of a computed row: about 2 n N D per branch evaluation and image, the
size of the gate scores (`lazydit.models.cost.forecast_macs`). Memory: n + 1 copies of each branch output.
"""

import torch


def _col(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(b,) per-row values shaped to broadcast over `like` (b, ...)."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class ForecastHistory:
    """The per-row history of one branch: the last computed output y0, the divided differences d1 = f[t0, t1] and
    d2 = f[t0, t1, t2], the timesteps t0, t1, and how many points each row has (all float32 on the output's
    device)."""

    def __init__(self, order: int):
        if order not in (1, 2):
            raise ValueError(f"forecast order must be 1 or 2 here (0 is plain reuse), got {order}")
        self.order = order
        self.y0 = None
        self.least = 0  # host: every row has at least this many points (updates of all rows so far, capped)

    def update(self, out: torch.Tensor, t: float, rows=None):
        """Rows `rows` (an index tensor; None: all) computed `out[rows]` at timestep t."""
        if self.y0 is None or self.y0.shape != out.shape:
            self.y0 = torch.zeros(out.shape, dtype=torch.float32, device=out.device)
            self.d1 = torch.zeros_like(self.y0)
            self.d2 = torch.zeros_like(self.y0) if self.order > 1 else None
            B = out.shape[0]
            self.n = torch.zeros(B, dtype=torch.long, device=out.device)
            self.t0 = torch.zeros(B, dtype=torch.float32, device=out.device)
            self.t1 = torch.zeros_like(self.t0)
            self.least = 0
        sel = slice(None) if rows is None else rows
        y = (out if rows is None else out[rows]).float()
        n, t0, t1 = self.n[sel], self.t0[sel], self.t1[sel]
        d1 = _difference(y, self.y0[sel], t - t0, n >= 1, self.least >= 1)
        if self.order > 1:
            d2 = _difference(d1, self.d1[sel], t - t1, n >= 2, self.least >= 2)
            if rows is None:
                self.d2 = d2
            else:
                self.d2[rows] = d2
        self.t1[sel], self.t0[sel] = t0, torch.full_like(t0, float(t))
        self.y0[sel] = y
        if rows is None:  # d1 is a new tensor: keep it rather than copy it
            self.d1 = d1
            self.least = min(self.least + 1, self.order + 1)
        else:
            self.d1[rows] = d1
        self.n[sel] = torch.clamp(n + 1, max=self.order + 1)

    def predict(self, t: float, dtype) -> torch.Tensor:
        """(B, ...) forecast of every row at timestep t (rows with one point: their y0)."""
        dt = _col(t - self.t0, self.y0)
        out = torch.mul(self.d1, dt).add_(self.y0)  # y0 + d1 dt (one buffer; a sum of two terms rounds the same)
        if self.order > 1:
            out.add_(self.d2 * (dt * _col(t - self.t1, self.y0)))
        return out.to(dtype)


def _difference(y, prev, dt, has, all_have: bool):
    """(y - prev) / dt per row where the row `has` the earlier point, else 0; `all_have` (known on the host: every
    row has it) skips the masking, which then changes nothing."""
    if all_have:
        return (y - prev) / _col(dt, y)
    return torch.where(_col(has, y), (y - prev) / _col(torch.where(has, dt, 1.0), y), 0.0)
