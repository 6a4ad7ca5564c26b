"""Diffusion: respacing, schedule, DDIM, sampling loop with guidance, training loss (docs/method-notes.md §2)."""

import math

import numpy as np
import pytest
import torch

from lazydit import ddim_sample, respaced_timesteps
from lazydit.sampling.schedule import Schedule, TrainingLoss

from conftest import tiny_model


def assert_close(a, b, atol=1e-5, rtol=1.3e-6):
    """torch.allclose with a useful message (torch.testing.assert_close costs ~1.5 s of imports on first use)."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert torch.allclose(a, b, atol=atol, rtol=rtol), f"max abs diff {(a - b).abs().max().item():.3g}"


def _respace_by_rule(T):
    """The spec's rule, written independently: stride = 999/(T-1); cur = 0.0; keep round(cur)."""
    stride = 999 / (T - 1)
    cur, out = 0.0, []
    for _ in range(T):
        out.append(round(cur))
        cur += stride
    return out


# ------------------------------------------------------------------ respacing


def test_respacing_50():
    ts = respaced_timesteps(50)
    assert ts[:6] == [0, 20, 41, 61, 82, 102]
    assert ts[-3:] == [958, 979, 999]
    assert len(ts) == 50 and len(set(ts)) == 50 and ts == sorted(ts)


def test_respacing_20():
    ts = respaced_timesteps(20)
    assert ts[:3] == [0, 53, 105]
    assert ts[-2:] == [946, 999]
    assert len(set(ts)) == 20 and ts == sorted(ts)


def test_respacing_10_exact():
    expected = [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    assert respaced_timesteps(10) == expected
    assert _respace_by_rule(10) == expected


@pytest.mark.parametrize("T", [2, 7, 10, 20, 25, 40, 50, 100, 250, 999, 1000])
def test_respacing_matches_rule(T):
    ts = respaced_timesteps(T)
    assert ts == _respace_by_rule(T)
    assert all(isinstance(t, int) for t in ts)
    assert ts[0] == 0 and ts[-1] == 999 and len(set(ts)) == T


def test_respacing_edge_cases():
    assert respaced_timesteps(1) == [0]
    assert respaced_timesteps(1000) == list(range(1000))
    for bad in (0, -1, 1001):
        with pytest.raises(ValueError):
            respaced_timesteps(bad)


# ------------------------------------------------------------------ schedule and DDIM


@pytest.mark.parametrize("T", [10, 50])
def test_schedule_abar(T):
    s = Schedule(T)
    abar = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))
    assert s.timestep_map == respaced_timesteps(T)
    np.testing.assert_allclose(s.abar, abar[s.timestep_map], rtol=1e-15, atol=0)
    assert s.abar.dtype == np.float64 and s.abar.shape == (T,)
    assert s.abar_prev[0] == 1.0
    np.testing.assert_array_equal(s.abar_prev[1:], s.abar[:-1])
    t = s.timesteps(T - 1, 3, "cpu")
    assert t.dtype == torch.long and t.tolist() == [999] * 3


def test_ddim_step_from_k0_recovers_x0():
    s = Schedule(50)
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    xk = s.q_sample(x0, 0, eps)
    a = s.abar[0]
    assert_close(xk, math.sqrt(a) * x0 + math.sqrt(1 - a) * eps)
    assert_close(s.ddim_step(xk, eps, 0), x0, atol=1e-5, rtol=0)


@pytest.mark.parametrize("T,k", [(50, 1), (50, 25), (50, 49), (10, 5), (20, 19)])
def test_ddim_step_general(T, k):
    s = Schedule(T)
    g = torch.Generator().manual_seed(k)
    x0 = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(3, 1, 4, 4, generator=g, dtype=torch.float64)
    a, ap = s.abar[k], s.abar_prev[k]
    xk = math.sqrt(a) * x0 + math.sqrt(1 - a) * eps
    expected = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
    assert_close(s.ddim_step(xk, eps, k), expected, atol=1e-9, rtol=1e-9)
    got32 = s.ddim_step(xk.float(), eps.float(), k)
    assert got32.dtype == torch.float32
    assert_close(got32, expected.float(), atol=1e-4, rtol=1e-4)


# ------------------------------------------------------------------ sampling loop


@pytest.fixture
def small():
    return tiny_model()


def test_ddim_sample_deterministic(small):
    y = torch.tensor([0, 1, 2])
    a = ddim_sample(small, y, 5, seed=3, progress=False)
    b = ddim_sample(small, y, 5, seed=3, progress=False)
    c = ddim_sample(small, y, 5, generator=torch.Generator().manual_seed(3), progress=False)
    d = ddim_sample(small, y, 5, seed=4, progress=False)
    assert a.shape == (3, 1, 8, 8)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert not torch.allclose(a, d)
    # explicit noise equals the seeded draw
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(ddim_sample(small, y, 5, x=x, progress=False), a)


def _record(model):
    calls = []

    def hook(module, args):
        x, t, y = args[:3]
        calls.append(dict(rows=x.shape[0], t=t.clone(), y=y.clone()))

    return calls, model.register_forward_pre_hook(hook)


@pytest.mark.parametrize("T", [4, 10])
def test_ddim_sample_unguided_rows_and_timesteps(small, T):
    y = torch.tensor([0, 1, 2])
    calls, h = _record(small)
    steps = []
    try:
        ddim_sample(small, y, T, seed=0, progress=False, callback=lambda d: steps.append((d["k"], d["i"])))
    finally:
        h.remove()
    assert len(calls) == T
    assert all(c["rows"] == 3 and torch.equal(c["y"], y) for c in calls)
    assert [k for k, _ in steps] == list(range(T - 1, -1, -1))
    assert [i for _, i in steps] == list(range(T))
    expected_t = respaced_timesteps(T)[::-1]  # the model receives ORIGINAL timesteps
    assert [c["t"].tolist() for c in calls] == [[t] * 3 for t in expected_t]


def test_ddim_sample_guided_rows_and_null_labels(small):
    y = torch.tensor([0, 3])
    T = 6
    calls, h = _record(small)
    seen = []
    try:
        out = ddim_sample(small, y, T, cfg_scale=2.0, seed=0, progress=False, callback=lambda d: seen.append(d))
    finally:
        h.remove()
    assert out.shape == (2, 1, 8, 8)
    assert len(calls) == T
    null = small.config.num_classes
    for c, t in zip(calls, respaced_timesteps(T)[::-1]):
        assert c["rows"] == 4
        assert c["y"][:2].tolist() == [0, 3] and c["y"][2:].tolist() == [null, null]
        assert c["t"].tolist() == [t] * 4
    assert [d["k"] for d in seen] == list(range(T - 1, -1, -1))
    assert seen[-1]["x_prev"].shape == (4, 1, 8, 8)
    assert_close(seen[-1]["x_prev"][:2], out)


def test_ddim_sample_custom_null_label(small):
    calls, h = _record(small)
    try:
        ddim_sample(small, torch.tensor([1]), 2, cfg_scale=3.0, null_label=2, seed=0, progress=False)
    finally:
        h.remove()
    assert all(c["y"].tolist() == [1, 2] for c in calls)


def _reference_cfg_loop(model, y, T, noise, w):
    """DiT's sample.py: z = [z; z], labels [y; null], p/ddim loop over model.forward_with_cfg, keep the first half."""
    s = Schedule(T)
    x = torch.cat([noise, noise])
    yy = torch.cat([y, torch.full_like(y, model.config.num_classes)])
    with torch.no_grad():
        for k in range(T - 1, -1, -1):
            eps = model.forward_with_cfg(x, s.timesteps(k, x.shape[0], "cpu"), yy, w)[:, : noise.shape[1]]
            x = s.ddim_step(x, eps, k)
    return x.chunk(2)[0]


def test_ddim_sample_guided_matches_reference_one_channel(small):
    y = torch.tensor([0, 1])
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    got = ddim_sample(small, y, 5, x=noise, cfg_scale=3.0, progress=False)
    assert_close(got, _reference_cfg_loop(small, y, 5, noise, 3.0), atol=1e-5, rtol=1e-5)


def test_ddim_sample_guided_matches_reference_latent():
    model = tiny_model(in_channels=4, learn_sigma=True)
    y = torch.tensor([0, 1])
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    got = ddim_sample(model, y, 5, x=noise, cfg_scale=3.0, progress=False)
    assert_close(got, _reference_cfg_loop(model, y, 5, noise, 3.0), atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ training loss


def _loss_inputs(in_channels=1):
    g = torch.Generator().manual_seed(0)
    x0 = (torch.rand(4, in_channels, 8, 8, generator=g) * 2 - 1)
    noise = torch.randn(4, in_channels, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    y = torch.tensor([0, 1, 2, 3])
    return x0, noise, t, y


def _manual_mse(model, x0, noise, t, y):
    abar = torch.from_numpy(np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000)))[t].float().view(-1, 1, 1, 1)
    xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
    out = model(xt, t, y)
    C = x0.shape[1]
    return ((out[:, :C] - noise) ** 2).mean(dim=(1, 2, 3)), out, xt


def test_training_loss_eps_only():
    model = tiny_model(learn_sigma=False)
    x0, noise, t, y = _loss_inputs()
    loss = TrainingLoss()(model, x0, t, y, noise=noise)
    assert loss.shape == (4,) and (loss >= 0).all()
    mse, _, _ = _manual_mse(model, x0, noise, t, y)
    assert_close(loss, mse)
    # without explicit noise it still works and is random
    assert TrainingLoss()(model, x0, t, y).shape == (4,)


def _kl_by_hand(x0, xt, eps_pred, v, t):
    """KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) in bits per dim, from the DDPM formulas, float64."""
    betas = np.linspace(1e-4, 0.02, 1000)
    abar = np.cumprod(1 - betas)
    out = []
    for b in range(x0.shape[0]):
        tt = int(t[b])
        if tt == 0:
            out.append(float("nan"))
            continue
        ab, abp, beta = abar[tt], abar[tt - 1], betas[tt]
        post_var = beta * (1 - abp) / (1 - ab)
        c1, c2 = beta * math.sqrt(abp) / (1 - ab), (1 - abp) * math.sqrt(1 - beta) / (1 - ab)
        x0d, xtd, ed, vd = (a[b].double() for a in (x0, xt, eps_pred, v))
        pred_x0 = xtd / math.sqrt(ab) - math.sqrt(1 / ab - 1) * ed
        mu_true, mu_model = c1 * x0d + c2 * xtd, c1 * pred_x0 + c2 * xtd
        frac = (vd + 1) / 2
        logvar = frac * math.log(beta) + (1 - frac) * math.log(post_var)
        kl = 0.5 * (-1 + logvar - math.log(post_var) + torch.exp(math.log(post_var) - logvar)
                    + (mu_true - mu_model) ** 2 * torch.exp(-logvar))
        out.append(float(kl.mean()) / math.log(2))
    return torch.tensor(out, dtype=torch.float64)


def test_training_loss_learn_sigma_adds_vb():
    model = tiny_model(learn_sigma=True)
    x0, noise, t, y = _loss_inputs()
    loss = TrainingLoss()(model, x0, t, y, noise=noise)
    assert loss.shape == (4,) and torch.isfinite(loss).all() and (loss >= 0).all()
    with torch.no_grad():
        mse, out, xt = _manual_mse(model, x0, noise, t, y)
    vb = loss.detach() - mse
    assert (vb > 0).all()
    expected = _kl_by_hand(x0, xt, out[:, :1], out[:, 1:], t)
    assert_close(vb[1:].double(), expected[1:], rtol=2e-3, atol=1e-5)


def test_training_loss_variance_grads_come_from_vb_only():
    model = tiny_model(learn_sigma=True)  # C = 1, C_out = 2, patch 2
    x0, noise, t, y = _loss_inputs()
    W = model.final_layer.linear.weight  # rows ordered (p, q, c): channel = row % C_out
    eps_rows, var_rows = torch.arange(0, W.shape[0], 2), torch.arange(1, W.shape[0], 2)

    model.zero_grad()
    TrainingLoss()(model, x0, t, y, noise=noise).sum().backward()
    g_full = W.grad.clone()
    model.zero_grad()
    _manual_mse(model, x0, noise, t, y)[0].sum().backward()
    g_mse = W.grad.clone()

    assert torch.count_nonzero(g_mse[var_rows]) == 0  # eps-MSE alone never reaches the variance outputs
    assert g_full[var_rows].abs().sum() > 0  # the VB term does
    # the VB term sees the mean through a stop-grad: the eps rows get the MSE gradient only
    assert_close(g_full[eps_rows], g_mse[eps_rows], atol=1e-6, rtol=1e-4)
