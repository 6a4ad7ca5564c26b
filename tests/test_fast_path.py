"""The fast skipped-step path gives the samples of the plain path, bit for bit.

- A branch that every row skips gets its gate only from the block's modulation (a column subset of the adaLN
  product): the same values as the full product's chunks, so block-engine sampling with fully skipped blocks equals
  the module engine (which always runs the whole modulation, the norm and the modulate) bit for bit.
- The forecast history skips its per-row masking once every row has the points it needs and keeps new tensors
  instead of copying them; the skipped rows' forecast is written into one buffer: bit for bit the masked formula.
"""

import pytest
import torch

from lazydit import ddim_sample
from lazydit.lazy import ForcedPlan, LazyConfig, apply_lazy
from lazydit.lazy.forecast import ForecastHistory, _col
from lazydit.lazy.engine_block import _modulations
from lazydit.models.registry import block_spec

from conftest import tiny_model

T = 10


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = tiny_model()
    for p in m.parameters():  # adaLN-Zero starts at zero: give every part of the block some weight
        p.data.normal_(0, 0.05)
    return m.eval()


@pytest.mark.parametrize("skipped", [(True, False), (False, True), (True, True)])
def test_gate_only_modulation_equals_the_full_product(model, skipped):
    block = model.blocks[1]
    c = torch.randn(6, model.config.hidden_size)
    full = block.adaLN_modulation(c).chunk(6, dim=1)
    with torch.no_grad():
        mods = _modulations(block, block_spec(block), c, skipped, {})
    for b in range(2):
        shift, scale, gate = mods[b]
        assert torch.equal(gate, full[3 * b + 2])
        if skipped[b]:
            assert shift is None and scale is None
        else:
            assert torch.equal(shift, full[3 * b]) and torch.equal(scale, full[3 * b + 1])


def test_gate_only_modulation_follows_a_changed_weight(model):
    block = model.blocks[0]
    c = torch.randn(2, model.config.hidden_size)
    store = {}
    with torch.no_grad():
        before = _modulations(block, block_spec(block), c, (True, True), store)[0][2].clone()
        block.adaLN_modulation[1].weight.mul_(2)  # an in-place change: the kept subset must not go stale
        after = _modulations(block, block_spec(block), c, (True, True), store)[0][2]
        want = block.adaLN_modulation(c).chunk(6, dim=1)[2]
        block.adaLN_modulation[1].weight.div_(2)
    assert not torch.equal(before, after)
    assert torch.equal(after, want)


@pytest.mark.parametrize("forecast", [0, 1, 2])
def test_fully_skipped_blocks_sample_as_the_module_level_path(model, forecast):
    plan = torch.zeros(T, len(model.blocks), 2, 4, dtype=torch.bool)  # (T, L, 2, B), True = skip
    plan[T - 3] = True  # a whole step skipped (every block: the gate-only modulation)
    plan[T - 5, 1] = True  # one block skipped, the others computed
    plan[T - 6, :, 1, :2] = True  # the mlp of two rows (a mixed batch)
    plan[T - 8, 0, 0] = True
    cfg = LazyConfig(forecast=forecast)
    y = torch.arange(2) % 4
    with apply_lazy(model, ForcedPlan(plan, parity=False, ahead=True, config=cfg)) as h:
        fast = ddim_sample(model, y, T, cfg_scale=3.0, seed=0, progress=False)
        ratio = h.stats().lazy_ratio
    with apply_lazy(model, ForcedPlan(plan, parity=False, ahead=False, config=cfg)):
        slow = ddim_sample(model, y, T, cfg_scale=3.0, seed=0, progress=False)
    assert ratio > 0
    assert torch.equal(fast, slow)


class _MaskedHistory:
    """The forecast history without the fast path: masked differences on every update (the reference)."""

    def __init__(self, order):
        self.order, self.y0 = order, None

    def update(self, out, t, rows=None):
        if self.y0 is None:
            self.y0 = torch.zeros(out.shape)
            self.d1, self.d2 = torch.zeros_like(self.y0), torch.zeros_like(self.y0)
            self.n = torch.zeros(out.shape[0], dtype=torch.long)
            self.t0, self.t1 = torch.zeros(out.shape[0]), torch.zeros(out.shape[0])
        sel = slice(None) if rows is None else rows
        y = (out if rows is None else out[rows]).float()
        n, t0, t1 = self.n[sel], self.t0[sel], self.t1[sel]
        has1 = n >= 1
        d1 = torch.where(_col(has1, y), (y - self.y0[sel]) / _col(torch.where(has1, t - t0, 1.0), y), 0.0)
        if self.order > 1:
            has2 = n >= 2
            self.d2[sel] = torch.where(_col(has2, y), (d1 - self.d1[sel]) / _col(torch.where(has2, t - t1, 1.0), y),
                                       0.0)
        self.t1[sel], self.t0[sel] = t0, torch.full_like(t0, float(t))
        self.y0[sel], self.d1[sel] = y, d1
        self.n[sel] = torch.clamp(n + 1, max=self.order + 1)

    def predict(self, t):
        dt = _col(t - self.t0, self.y0)
        out = self.y0 + self.d1 * dt
        if self.order > 1:
            out = out + self.d2 * (dt * _col(t - self.t1, self.y0))
        return out


@pytest.mark.parametrize("order", [1, 2])
def test_forecast_history_fast_path_is_the_old_formula_bit_for_bit(order):
    gen = torch.Generator().manual_seed(order)
    new, old = ForecastHistory(order), _MaskedHistory(order)
    # all rows, then part of the rows (fewer points there), then all rows again: every branch of the masking
    for t, rows in [(999, None), (899, torch.tensor([0, 2])), (799, None), (699, torch.tensor([1])), (599, None),
                    (499, None), (399, torch.tensor([0, 3]))]:
        out = torch.randn(4, 5, 8, generator=gen)
        new.update(out, t, rows)
        old.update(out, t, rows)
        assert torch.equal(new.predict(t - 50, torch.float32), old.predict(t - 50))
    assert new.least == order + 1  # the masking was skipped on the last updates
