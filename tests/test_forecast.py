"""Forecast reuse: skipped rows receive an extrapolation of their branch's last computed outputs (TaylorSeer-style
divided differences in the timestep), per row."""

import pytest
import torch

from lazydit.errors import GateMismatchError
from lazydit.models.cost import forecast_macs, sampling_macs
from lazydit.lazy import ForcedPlan, LazyConfig, LazyGates, apply_lazy, policy_for
from lazydit.lazy.forecast import ForecastHistory
from lazydit.pipeline import sample
from lazydit.sampling.schedule import respaced_timesteps
from lazydit.training.gates import GateTrainConfig, train_gates

from conftest import tiny_model
from test_training import toy_data


def test_first_order_forecast_of_a_linear_output_is_exact():
    a, b = torch.full((2, 3, 4), 1.0), torch.full((2, 3, 4), 0.5)  # exact in float32 at integer t
    h = ForecastHistory(1)
    for t in (999, 899):
        h.update(a + b * t, t)
    for t in (799, 500, 0):
        assert torch.equal(h.predict(t, torch.float32), a + b * t)


def test_second_order_forecast_of_a_quadratic_output():
    f = lambda t: 2.0 + 0.25 * t + 1e-3 * t * t  # noqa: E731
    h = ForecastHistory(2)
    for t in (999, 899, 799):
        h.update(torch.full((1, 2, 2), f(t)), t)
    for t in (699, 300):
        torch.testing.assert_close(h.predict(t, torch.float32), torch.full((1, 2, 2), f(t)), rtol=1e-4, atol=0)  # float32
    linear = ForecastHistory(1)  # a first-order forecast of the same curve misses by the curvature
    for t in (899, 799):
        linear.update(torch.full((1, 2, 2), f(t)), t)
    assert (linear.predict(300, torch.float32) - f(300)).abs().max() > 1


def test_rows_keep_their_own_history():
    h = ForecastHistory(1)
    h.update(torch.tensor([[1.0], [10.0]]), 900)
    h.update(torch.tensor([[2.0], [99.0]]), 800, rows=torch.tensor([0]))  # row 1 skipped this step
    got = h.predict(700, torch.float32)
    assert got[0, 0] == 3.0  # row 0: linear through (900, 1), (800, 2)
    assert got[1, 0] == 10.0  # row 1: one point, a copy


def test_a_forecast_with_one_computed_point_is_plain_reuse_bit_for_bit(model):
    T = 6
    plan = torch.ones(T, len(model.blocks), 2, dtype=torch.bool)  # compute at the first step only
    y = torch.tensor([0, 1])
    plain, rep = sample(model, y, T, policy=ForcedPlan(plan, parity=False), progress=False)
    for order in (0, 1, 2):
        x, rep_f = sample(model, y, T, policy=ForcedPlan(plan, parity=False, config=LazyConfig(forecast=order)),
                          progress=False)
        assert torch.equal(x, plain)


def test_order_zero_forecast_is_plain_reuse_bit_for_bit_where_first_order_is_not(model):
    """With two and more computed points behind each skip (where a first-order forecast extrapolates), order 0 is
    still the plain copy of the last output, bit for bit."""
    T = 8
    plan = torch.zeros(T, len(model.blocks), 2, dtype=torch.bool)
    plan[torch.arange(T - 3, -1, -2)] = True  # (reversed index) skip every other step after two computed ones
    y = torch.tensor([0, 1])
    plain, _ = sample(model, y, T, policy=ForcedPlan(plan, parity=False), progress=False)
    zero, _ = sample(model, y, T, policy=ForcedPlan(plan, parity=False, config=LazyConfig(forecast=0)), progress=False)
    first, _ = sample(model, y, T, policy=ForcedPlan(plan, parity=False, config=LazyConfig(forecast=1)), progress=False)
    assert torch.equal(zero, plain)
    assert not torch.allclose(first, plain)


def test_skipped_step_receives_the_first_order_extrapolation(model):
    """Two computed steps, then a skip: the branch output at the skip is y0 + (y0 - y1) / (t0 - t1) (t - t0)."""
    T = 5
    plan = torch.zeros(T, len(model.blocks), 2, dtype=torch.bool)
    plan[T - 3, 0, 1] = True  # block 0's mlp skips at the third step
    outs = []
    mlp = model.blocks[0].mlp
    handle = apply_lazy(model, ForcedPlan(plan, parity=False, ahead=False, config=LazyConfig(forecast=1)))
    h = mlp.register_forward_hook(lambda m, a, o: outs.append(o.clone()))
    try:
        from lazydit.sampling.ddim import ddim_sample

        ddim_sample(model, torch.tensor([1]), T, progress=False)
    finally:
        h.remove()
        handle.remove()
    ts = respaced_timesteps(T)
    t0, t1, t = ts[T - 2], ts[T - 1], ts[T - 3]
    want = outs[1] + (outs[1] - outs[0]) / (t0 - t1) * (t - t0)
    torch.testing.assert_close(outs[2], want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(outs[2], outs[1])


def test_forecast_gates_record_and_enforce_their_order(tmp_path):
    model = tiny_model(seed=2)
    cfg = GateTrainConfig(steps=6, iters=3, batch_size=4, lr=1e-2, forecast=2, every_step=True)
    gates = train_gates(model, toy_data(), cfg, progress=False)
    gates.save(tmp_path / "g.safetensors")
    loaded = LazyGates.load(tmp_path / "g.safetensors")
    assert loaded.meta["forecast"] == 2
    _, rep = sample(model, torch.tensor([0, 1]), 6, policy=policy_for(loaded), progress=False)  # uses order 2 by itself
    with pytest.raises(GateMismatchError, match="trained with forecast order 2, not 0"):
        sample(model, torch.tensor([0]), 6, policy=policy_for(loaded, LazyConfig(forecast=0)), progress=False)
    plain = LazyGates.for_model(model, 6)
    with pytest.raises(GateMismatchError, match="order 0, not 1"):
        sample(model, torch.tensor([0]), 6, policy=policy_for(plain, LazyConfig(forecast=1)), progress=False)


def test_forecast_work_is_counted():
    cfg = tiny_model().config
    from lazydit.lazy.stats import LazyStats

    stats = LazyStats(torch.zeros(4, cfg.depth, 2, dtype=torch.long), torch.full((4, cfg.depth, 2), 2))
    base = sampling_macs(cfg, 4, stats)
    assert sampling_macs(cfg, 4, stats, forecast=2) - base == 4 * forecast_macs(cfg, 2)
    assert forecast_macs(cfg, 1) == 2 * cfg.depth * cfg.num_tokens * cfg.hidden_size
