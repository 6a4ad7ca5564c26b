"""The caching methods a user would pick instead of LazyDiT, each tested against its own definition: FORA, TaylorSeer,
first-block cache, TeaCache, Learning-to-Cache; and DPM-Solver++(2M) beside DDIM."""

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from lazydit.errors import UsageError
from lazydit.models.cost import forward_macs, module_macs, sampling_macs
from lazydit.lazy import (FORA, POLICIES, FirstBlockCache, LazyConfig, LazyGates, Learning2Cache, TaylorSeer, TeaCache,
                          apply_lazy, make_policy, policy_for)
from lazydit.lazy.forecast import ForecastHistory
from lazydit.pipeline import sample
from lazydit.sampling import SAMPLERS, Schedule, ddim_sample, dpm_solver_sample
from lazydit.sampling.schedule import alphas_cumprod
from lazydit.training.gates import GateTrainConfig, train_gates

from conftest import tiny_model
from test_training import toy_data

Y = torch.tensor([0, 1, 2, 3])


def run(model, policy, T, sampler="ddim", cfg_scale=2.0):
    return sample(model, Y, T, policy=policy, cfg_scale=cfg_scale, seed=0, progress=False, sampler=sampler)


def bare(model, T, sampler="ddim", cfg_scale=2.0):
    return run(model, None, T, sampler, cfg_scale)[0]


POLICY_SAMPLERS = [n for n, s in SAMPLERS.items() if getattr(s, "spacing", None) is None]  # at a policy's timesteps


@pytest.mark.parametrize("sampler", POLICY_SAMPLERS)
def test_neutral_settings_are_the_bare_model(model, sampler):
    """FORA N=1, TaylorSeer interval 1, FBCache / TeaCache threshold 0, an all-compute L2C router: bit-identical."""
    T = 8
    router = LazyGates.for_model(model, T, router=True)
    router.weight.data.fill_(5.0)  # sigmoid(5) > 0.5: every module computes
    ref = bare(model, T, sampler)
    for policy in (FORA(T, interval=1), TaylorSeer(T, interval=1, order=2, warmup=0),
                   FirstBlockCache(T, threshold=0.0), TeaCache(T, threshold=0.0, coefficients=(1.0, 0.0)),
                   policy_for(router)):
        x, rep = run(model, policy, T, sampler)
        assert torch.equal(x, ref), type(policy).__name__
        assert rep.lazy_ratio == 0.0


def test_fora_computes_exactly_every_nth_step(model):
    T, N = 10, 3
    x, rep = run(model, FORA(T, interval=N), T)
    per_step = rep.stats["per_step"][::-1]  # per_step is in sampling order; reversed: per respaced index k
    assert [k for k in range(T) if per_step[k] == 0.0] == [0, 3, 6, 9]  # k % 3 == 0 (and k = T - 1)
    assert all(per_step[k] == 1.0 for k in range(T) if k % N and k != T - 1)
    assert rep.lazy_ratio == pytest.approx(6 / 10)
    macs = sampling_macs(model.config, T, rep.lazy, overhead=0)
    m = module_macs(model.config)
    assert macs == T * forward_macs(model.config) - 6 * len(model.blocks) * (m["attn"] + m["mlp"])
    assert rep.tmacs * 1e12 == macs


def test_fora_reuses_the_last_computed_output(model):
    """A skipped step adds gate_k * (the branch output of the last full step): FORA equals a forced all-skip plan
    on the same steps."""
    from lazydit.lazy import ForcedPlan

    T, N = 9, 2
    plan = torch.zeros(T, len(model.blocks), 2, dtype=torch.bool)
    for k in range(T):
        plan[k] = not (k == T - 1 or k % N == 0)
    x_fora, _ = run(model, FORA(T, interval=N), T)
    x_plan, _ = run(model, ForcedPlan(plan, parity=False), T)
    assert torch.equal(x_fora, x_plan)


def test_taylorseer_of_order_zero_is_fora(model):
    T, N = 13, 3  # (T - 1) % N == 0: TaylorSeer's full steps j = 0, 3, 6, ... are FORA's k = 12, 9, ..., 0
    x_fora, rep_fora = run(model, FORA(T, interval=N), T)
    x_ts, rep_ts = run(model, TaylorSeer(T, interval=N, order=0, warmup=0), T)
    assert torch.equal(x_fora, x_ts)
    assert rep_fora.stats["per_step"] == rep_ts.stats["per_step"]
    x_ts1, _ = run(model, TaylorSeer(T, interval=N, order=1, warmup=0), T)
    assert not torch.equal(x_ts1, x_ts)  # the forecast changes the samples


def test_taylorseer_schedule_and_cost(model):
    T = 12
    _, rep = run(model, TaylorSeer(T, interval=4, order=2, warmup=2), T)
    per_step = rep.stats["per_step"]  # in sampling order j
    full = [j for j in range(T) if per_step[j] == 0.0]
    assert sorted(full) == [0, 1, 2, 6, 10]  # the warm-up, then every 4th step
    m = model.config
    assert rep.tmacs * 1e12 == sampling_macs(m, T, rep.lazy, overhead=2 * 2 * m.depth * m.num_tokens * m.hidden_size)


def test_taylor_history_matches_taylorseer_rule():
    """d_{i+1} = (d_i - d_i of the last full step) / distance; forecast sum d_i off^i / i!."""
    h = ForecastHistory(2, series="taylor", clock="step")
    f = lambda j: 3.0 + 0.5 * j + 0.25 * j * j  # noqa: E731
    for j in (0, 2, 4):
        h.update(torch.full((1, 2), f(j)), j)
    d1_now, d1_prev = (f(4) - f(2)) / 2, (f(2) - f(0)) / 2
    d2 = (d1_now - d1_prev) / 2
    for j in (5, 7):
        off = j - 4
        want = f(4) + d1_now * off + d2 * off**2 / 2
        torch.testing.assert_close(h.predict(j, torch.float32), torch.full((1, 2), want))
    # one point: the forecast is the last output (order 0 and a fresh history alike)
    h0 = ForecastHistory(3, series="taylor", clock="step")
    h0.update(torch.ones(1, 2), 0)
    assert torch.equal(h0.predict(3, torch.float32), torch.ones(1, 2))


def test_fbcache_skips_when_the_first_block_residual_barely_moves(model):
    T = 10
    x, rep = run(model, FirstBlockCache(T, threshold=1e9), T)  # every step after the first reuses
    per_step = rep.stats["per_step"][::-1]  # per respaced index k
    assert per_step[T - 1] == 0.0 and all(per_step[k] == pytest.approx(2 / 3) for k in range(T - 1))
    per_layer = rep.lazy.ratio(1)  # block 0 always runs
    assert per_layer[0] == 0.0 and torch.allclose(per_layer[1:], torch.tensor(0.9, dtype=torch.float64))


def test_fbcache_reuse_is_the_cached_residual_of_blocks_1_to_L(model):
    """With a huge threshold, step k > first gives block0(x) + (h_L - h_1 of the first step)."""
    T = 3
    policy = FirstBlockCache(T, threshold=1e9)
    seen = {}
    blocks = model.blocks
    handle = apply_lazy(model, policy)
    try:
        hooks = [blocks[0].register_forward_hook(lambda m, a, o: seen.setdefault("out0", []).append(o.clone())),
                 model.final_layer.register_forward_pre_hook(lambda m, a: seen.setdefault("hL", []).append(a[0].clone()))]
        ddim_sample(model, Y, T, cfg_scale=2.0, seed=0, progress=False)
    finally:
        for h in hooks:
            h.remove()
        handle.remove()
    residual = seen["hL"][0] - seen["out0"][0]
    for step in (1, 2):
        torch.testing.assert_close(seen["hL"][step], seen["out0"][step] + residual, rtol=0, atol=1e-6)


def test_teacache_accumulates_the_rescaled_distance(model):
    T = 10
    # coefficients (1, 0): the raw distance; a threshold far above any step-to-step change skips all but the
    # first and last steps
    x, rep = run(model, TeaCache(T, threshold=1e9, coefficients=(1.0, 0.0)), T)
    per_step = rep.stats["per_step"][::-1]  # per respaced index k
    assert per_step[T - 1] == 0.0 and per_step[0] == 0.0
    assert all(per_step[k] == 1.0 for k in range(1, T - 1))
    # a middling threshold computes some steps: the accumulation resets on each computed step
    dist = []

    class Spy(TeaCache):
        def skip_blocks(self, probe):
            prev = probe.state.get("z")
            z = probe.modulated(0)
            if prev is not None:
                dist.append(float((z - prev).abs().mean() / prev.abs().mean()))
            return super().skip_blocks(probe)

    _, rep = run(model, Spy(T, threshold=0.0, coefficients=(1.0, 0.0)), T)
    th = 2.5 * float(np.mean(dist))
    _, rep = run(model, TeaCache(T, threshold=th, coefficients=(1.0, 0.0)), T)
    acc, want = 0.0, []
    for i, d in enumerate(dist, start=1):  # sampling step i (0 computes)
        if i == T - 1:
            want.append(True)
            break
        acc += d
        if acc < th:
            want.append(False)
        else:
            want.append(True)
            acc = 0.0
    got = [rep.stats["per_step"][i] == 0.0 for i in range(1, T)]  # per_step: sampling order i
    assert got == want and not all(want) and any(want[:-1])


def test_teacache_fits_its_polynomial_on_the_model(model):
    policy = TeaCache(6, threshold=0.1)
    with pytest.raises(UsageError, match="prepare"):
        run(model, policy, 6)
    policy.prepare(model, Y, cfg_scale=2.0)
    assert len(policy.coefficients) == 5  # degree 4, as TeaCache
    again = TeaCache(6, threshold=0.1)
    again.prepare(model, Y, cfg_scale=2.0)
    assert again.coefficients == policy.coefficients  # deterministic
    x, rep = run(model, policy, 6)
    assert torch.isfinite(x).all() and rep.tmacs > 0


def test_method_registry_and_options(model):
    assert {"fora", "taylorseer", "fbcache", "teacache"} <= set(POLICIES)
    p = make_policy("taylorseer:interval=3,order=1,warmup=1", 10)
    assert (p.interval, p.order, p.warmup, p.forecast) == (3, 1, 1, 1)
    assert make_policy("teacache:threshold=0.2,coefficients=1/0", 10).coefficients == (1.0, 0.0)
    for bad in ("fora:interval=0", "taylorseer:order=-1", "fbcache:threshold=-1", "teacache:coefficients=a/b",
                "fora:nope=1"):
        with pytest.raises(UsageError):
            make_policy(bad, 10)


def test_l2c_router_trains_and_thresholds(tmp_path):
    model = tiny_model()
    T = 6
    cfg = GateTrainConfig(steps=T, iters=6, batch_size=8, lr=1e-3, rho_attn=5e-6, rho_mlp=5e-6, router=True,
                          out=str(tmp_path / "r"))
    router = train_gates(model, toy_data(), cfg, progress=False)
    assert router.router and router.weight.shape == (len(model.blocks), 2, T, 1)
    assert router.weight.abs().max() <= 5
    loaded = LazyGates.load(tmp_path / "r" / "gates.safetensors")
    assert loaded.router and torch.equal(loaded.weight, router.weight)
    policy = policy_for(loaded, LazyConfig(threshold=float(torch.sigmoid(loaded.weight.detach().median()))))
    assert isinstance(policy, Learning2Cache) and policy.engine == "block"
    x, rep = run(model, policy, T)
    # input-independent: every row decides alike, only even steps skip, as the router says
    skipped = rep.lazy.skipped  # (T, L, 2)
    assert (skipped[1::2] == 0).all()
    want = (loaded.weight[..., 0].permute(2, 0, 1) < policy.logit_threshold) & (torch.arange(T) % 2 == 0).view(T, 1, 1)
    want[T - 1] = False
    assert torch.equal(skipped > 0, want)
    assert (skipped[want] == rep.lazy.total[want]).all()
    assert rep.tmacs * 1e12 == sampling_macs(model.config, T, rep.lazy, overhead=0)  # a router scores nothing


# ---------------------------------------------------------------- DPM-Solver++(2M) on a closed-form case


class GaussianEps(torch.nn.Module):
    """The exact eps-prediction of data x0 ~ N(mu, s^2) per pixel: E[eps | x_t] = sigma (x_t - alpha mu) / (alpha^2 s^2
    + sigma^2); the probability-flow ODE keeps (x_t - alpha mu) / sqrt(alpha^2 s^2 + sigma^2) fixed."""

    def __init__(self, mu=0.5, s=0.2):
        super().__init__()
        self.mu, self.s = mu, s
        self.config = SimpleNamespace(in_channels=1, input_size=4, num_classes=1)
        self.dummy = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        self.abar = torch.tensor(alphas_cumprod())

    def forward(self, x, t, y):
        a = self.abar[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.s**2 + 1 - a)

    def exact(self, x_T, abar_to):
        aT = float(self.abar[999])
        z = (x_T - math.sqrt(aT) * self.mu) / math.sqrt(aT * self.s**2 + 1 - aT)
        return math.sqrt(abar_to) * self.mu + math.sqrt(abar_to * self.s**2 + 1 - abar_to) * z


def _midpoint_error(fn, m, x, T):
    """Max error of the sampler's state at respaced index T/2 against the exact ODE solution there."""
    sched, err = Schedule(T), {}

    def cb(info):
        if info["k"] == T // 2:
            err["e"] = (info["x_prev"] - m.exact(x, float(sched.abar_prev[T // 2]))).abs().max().item()

    out = fn(m, torch.zeros(len(x), dtype=torch.long), T, x=x, progress=False, callback=cb)
    return err["e"], (out - m.exact(x, 1.0)).abs().max().item()


def test_dpm_solver_converges_at_second_order_ddim_at_first():
    m = GaussianEps()
    x = torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    Ts = (20, 40, 80, 160)
    ddim = [_midpoint_error(ddim_sample, m, x, T) for T in Ts]
    dpm = [_midpoint_error(dpm_solver_sample, m, x, T) for T in Ts]
    for a, b in zip(ddim, ddim[1:]):
        assert 1.7 < a[0] / b[0] < 2.6  # first order: the error halves when the steps double
    for a, b in zip(dpm, dpm[1:]):
        assert 3.4 < a[0] / b[0] < 4.8  # second order: it quarters
    assert all(p[0] < d[0] / 3 for p, d in zip(dpm, ddim))
    # the final samples: both converge to the exact ODE solution and so to each other (DiT's respacing ends with
    # one large step from t = 1000/T to 0, which dominates both final errors)
    assert ddim[-1][1] < ddim[0][1] / 5 and dpm[-1][1] < dpm[0][1] / 5
    out_ddim = ddim_sample(m, torch.zeros(32, dtype=torch.long), 320, x=x, progress=False)
    out_dpm = dpm_solver_sample(m, torch.zeros(32, dtype=torch.long), 320, x=x, progress=False)
    assert (out_ddim - out_dpm).abs().max() < 0.02


def test_dpm_solver_first_step_is_ddim(model):
    """Step 1 of DPM-Solver++(2M) is first order, which is DDIM exactly; the same noise for the same seed."""
    T = 6
    firsts = {}
    for name, fn in SAMPLERS.items():
        fn(model, Y, T, seed=0, progress=False, cfg_scale=2.0,
           callback=lambda info, name=name: firsts.setdefault(name, info["x_prev"]) if info["i"] == 0 else None)
    torch.testing.assert_close(firsts["ddim"], firsts["dpm++2m"], rtol=1e-6, atol=1e-6)  # float32 rounding


def test_dpm_solver_with_lazy_gates(model):
    """Gates trained for the DDIM schedule of T attach to DPM-Solver++ unchanged (same timesteps); the report names
    the sampler."""
    T = 6
    gates = LazyGates.for_model(model, T)
    x_off, rep = sample(model, Y, T, policy=policy_for(gates, LazyConfig(threshold=0.0)), cfg_scale=2.0, progress=False,
                        sampler="dpm++2m")
    assert torch.equal(x_off, bare(model, T, "dpm++2m")) and rep.name == "Lazy-6+DPM++2M"
    _, rep = sample(model, Y, T, policy=policy_for(gates, LazyConfig(threshold=1.0)), cfg_scale=2.0, progress=False,
                    sampler="dpm++2m")
    assert rep.lazy_ratio == pytest.approx(0.5 * (T // 2 - 1) / (T // 2) + 0.0, abs=0.2)
    with pytest.raises(UsageError, match="unknown sampler"):
        sample(model, Y, T, progress=False, sampler="euler")
