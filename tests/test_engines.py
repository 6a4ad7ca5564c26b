"""One engine per policy, named by `Policy.engine`; one forecast history for forecast LazyDiT and TaylorSeer."""

import pytest
import torch

from lazydit.errors import UsageError
from lazydit.lazy import (FORA, POLICIES, FirstBlockCache, ForcedPlan, LazyConfig, LazyGates, Policy, TaylorSeer,
                          TeaCache, apply_lazy, policy_for)
from lazydit.lazy.engine_block import BlockHook
from lazydit.lazy.engine_module import ModuleHook
from lazydit.lazy.forecast import ForecastHistory
from lazydit.lazy.policies import ENGINES

from conftest import tiny_model


def _gates(model, T, **kw):
    return LazyGates(len(model.blocks), model.config.hidden_size, T, **kw)


def test_every_policy_names_one_engine():
    model, T = tiny_model(), 6
    want = {"module": [policy_for(_gates(model, T))],
            "block": [policy_for(_gates(model, T, lookahead=True)), policy_for(_gates(model, T, router=True)),
                      ForcedPlan(torch.zeros(T, 3, 2, dtype=torch.bool)), FORA(T), TaylorSeer(T)],
            "residual": [FirstBlockCache(T), TeaCache(T, coefficients=(1.0, 0.0))]}
    for engine, policies in want.items():
        assert engine in ENGINES
        for p in policies:
            assert p.engine == engine, type(p).__name__
    assert ForcedPlan(torch.zeros(T, 3, 2, dtype=torch.bool), ahead=False).engine == "module"
    assert all(cls.engine in ENGINES for cls in POLICIES.values() if isinstance(cls, type))


def test_the_engine_decides_what_is_attached():
    model, T = tiny_model(), 6
    plan = torch.zeros(T, 3, 2, dtype=torch.bool)
    for policy, hook_type, block_forward in [(ForcedPlan(plan, ahead=False), ModuleHook, None),
                                             (ForcedPlan(plan), BlockHook, "_lazy_block"),
                                             (FirstBlockCache(T), None, "_lazy_residual")]:
        with apply_lazy(model, policy) as h:
            assert [type(x) for x in h.run.hooks] == ([hook_type] * 6 if hook_type else [])
            block = model.blocks[0]
            assert ("forward" in block.__dict__) == (block_forward is not None)
            assert block_forward is None or block_forward in block.__dict__
        assert "forward" not in model.blocks[0].__dict__


def test_an_unknown_engine_is_refused():
    class Odd(Policy):
        engine = "fused"

    with pytest.raises(UsageError, match="engine"):
        apply_lazy(tiny_model(), Odd(6))


def test_forecast_lazydit_and_taylorseer_keep_one_kind_of_history():
    newton = ForcedPlan(torch.zeros(6, 3, 2, dtype=torch.bool), config=LazyConfig(forecast=2)).new_history()
    taylor = TaylorSeer(6, order=3).new_history()
    assert type(newton) is type(taylor) is ForecastHistory
    assert (newton.order, newton.series, newton.clock) == (2, "newton", "timestep")
    assert (taylor.order, taylor.series, taylor.clock) == (3, "taylor", "step")
    assert FORA(6).new_history() is None and TaylorSeer(6, order=0).new_history() is None


def test_the_two_series_differ_only_from_the_second_difference():
    """Order 1: both are the line through the last two points; order 2: Newton divides by the span of three points
    and multiplies (s - s0)(s - s1), TaylorSeer divides by the last distance and takes (s - s0)^2 / 2."""
    f = lambda s: 1.0 + 2.0 * s + 0.5 * s * s  # noqa: E731
    hs = {series: ForecastHistory(order, series=series) for series in ("newton", "taylor") for order in (1,)}
    h2 = {series: ForecastHistory(2, series=series) for series in ("newton", "taylor")}
    for s in (0.0, 1.0, 3.0):
        for h in (*hs.values(), *h2.values()):
            h.update(torch.full((1, 2), f(s)), s)
    assert torch.equal(hs["newton"].predict(5.0, torch.float32), hs["taylor"].predict(5.0, torch.float32))
    torch.testing.assert_close(h2["newton"].predict(5.0, torch.float32), torch.full((1, 2), f(5.0)))  # exact: quadratic
    d1, d1_prev = (f(3) - f(1)) / 2, (f(1) - f(0)) / 1
    want = f(3) + d1 * 2 + (d1 - d1_prev) / 2 * 2**2 / 2  # TaylorSeer's rule
    torch.testing.assert_close(h2["taylor"].predict(5.0, torch.float32), torch.full((1, 2), want))
