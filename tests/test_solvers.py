"""UniPC and the timestep spacings of DPM-Solver++(2M) and UniPC, each against diffusers' own schedulers
(`UniPCMultistepScheduler`, `DPMSolverMultistepScheduler`) stepping the same toy eps-prediction model, and how the
spaced samplers meet caching policies."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler

from lazydit.errors import OptionRangeError, UsageError
from lazydit.evaluation.rows import build_policy, parse_spec
from lazydit.lazy import FORA, LazyConfig, LazyGates, make_policy, policy_for
from lazydit.pipeline import sample
from lazydit.sampling import SAMPLER_LABELS, SAMPLERS, spaced_timesteps
from lazydit.sampling.dpm_solver import dpm_solver_coefficients
from lazydit.sampling.schedule import alphas_cumprod, respaced_timesteps
from lazydit.sampling.unipc import unipc_coefficients

from conftest import tiny_model

pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")  # diffusers' np.array(
# tensor) under numpy 2

Y = torch.tensor([0, 1, 2])
TS = (1, 2, 3, 5, 10, 20, 50)
SPACING = {"uniform": dict(timestep_spacing="linspace"), "trailing": dict(timestep_spacing="trailing")}


class Toy(torch.nn.Module):
    """A fixed smooth, non-linear eps(x, t, y) in float64: second-order terms matter, so a wrong coefficient shows."""

    def __init__(self):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros((), dtype=torch.float64))  # the dtype initial_noise reads
        self.config = SimpleNamespace(in_channels=2, input_size=4, num_classes=3)

    def forward(self, x, t, y):
        s = t.to(x.dtype).view(-1, 1, 1, 1) / 1000
        return 0.6 * torch.sin(1.3 * x + 2 * s) + 0.3 * x * torch.cos(3 * s) + 0.05 * y.view(-1, 1, 1, 1).to(x.dtype)


def noise():
    return torch.randn(len(Y), 2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


def diffusers_run(sched, model, x):
    """diffusers' sampling loop: the model at every scheduler timestep, then `scheduler.step`."""
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(len(x)), Y), t, x).prev_sample
    return x


def float64(sched, timesteps=None):
    """diffusers' scheduler on DiT's float64 schedule: alphas_cumprod (diffusers' is a float32 cumprod of float32
    betas), and, after `set_timesteps`, its sigma table sqrt((1 - abar) / abar) at its timesteps with the final 0
    (`final_sigmas_type="zero"`) in float64 instead of float32. `timesteps` (descending) replaces its timesteps
    first, for a schedule its `set_timesteps` cannot make (UniPC on the reference respacing or "logsnr")."""
    abar = alphas_cumprod()
    if timesteps is not None:
        sched.timesteps = torch.tensor(timesteps, dtype=torch.int64)
        sched.num_inference_steps = len(timesteps)
    sigma = np.sqrt((1 - abar) / abar)[sched.timesteps.numpy()]
    sched.sigmas = torch.from_numpy(np.append(sigma, 0.0))
    return sched


def unipc_scheduler(steps, spacing):
    """diffusers' UniPCMultistepScheduler with its defaults (bh2, order 2, corrector on) at `spacing`."""
    sched = UniPCMultistepScheduler()
    sched.alphas_cumprod = torch.from_numpy(alphas_cumprod())
    if spacing in SPACING:
        sched.register_to_config(**SPACING[spacing])
        sched.set_timesteps(steps)
        return float64(sched)
    sched.set_timesteps(steps)  # then the timesteps it has no spacing for
    return float64(sched, spaced_timesteps(steps, spacing)[::-1])


def assert_close(out, ref, rtol):
    err = float((out - ref).abs().max() / ref.abs().max())
    assert err < rtol, f"relative error {err:.3g}"


# ---------------------------------------------------------------- (a) UniPC against UniPCMultistepScheduler


@pytest.mark.parametrize("spacing", ["reference", "uniform", "trailing", "logsnr"])
@pytest.mark.parametrize("steps", TS)
def test_unipc_is_diffusers_unipc(steps, spacing):
    if spacing == "logsnr" and steps > 38:
        pytest.skip("the logsnr spacing of more than 38 steps repeats a timestep")
    model = Toy()
    ref = diffusers_run(unipc_scheduler(steps, spacing), model, noise())
    name = "unipc" if spacing == "reference" else f"unipc-{spacing}"
    assert_close(SAMPLERS[name](model, Y, steps, x=noise(), progress=False), ref, 1e-10)


def test_unipc_is_pristine_diffusers_unipc_to_float32():
    """diffusers' own float32 tables (betas from torch.linspace, its sigma table) against DiT's float64 ones."""
    model = Toy()
    for steps in (5, 10, 25):
        sched = UniPCMultistepScheduler(timestep_spacing="trailing")
        sched.set_timesteps(steps)
        assert_close(SAMPLERS["unipc-trailing"](model, Y, steps, x=noise(), progress=False),
                     diffusers_run(sched, model, noise()), 2e-5)


def test_unipc_corrector_matters():
    """The corrector changes the samples: UniPC is not its own predictor (DPM-Solver++(2M), which is diffusers'
    UniPC with every corrector disabled)."""
    model, steps = Toy(), 10
    sched = unipc_scheduler(steps, "reference")
    sched.disable_corrector = list(range(steps))
    predictor_only = diffusers_run(sched, model, noise())
    assert_close(SAMPLERS["dpm++2m"](model, Y, steps, x=noise(), progress=False), predictor_only, 1e-10)
    unipc = SAMPLERS["unipc"](model, Y, steps, x=noise(), progress=False)
    assert float((unipc - predictor_only).abs().max()) > 1e-3


def test_unipc_predictor_is_dpm_solver_coefficients():
    for spacing in ("reference", "trailing", "logsnr"):
        ts = spaced_timesteps(12, spacing)
        for u, d in zip(unipc_coefficients(12, ts), dpm_solver_coefficients(12, ts)):
            assert u.k == d[0]
            np.testing.assert_allclose(u.predictor, d[1:], rtol=1e-12, atol=1e-15)


# ---------------------------------------------------------------- (b) DPM-Solver++(2M) against diffusers


def dpm_scheduler(steps, spacing):
    """DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True) at
    `spacing`; "logsnr" through `set_timesteps(timesteps=...)`: its use_lu_lambdas=True keeps the unrounded
    lambda-uniform sigmas, so its model sees a noise level up to half a timestep off the timestep it is given."""
    kw = dict(algorithm_type="dpmsolver++", solver_order=2, lower_order_final=True, **SPACING.get(spacing, {}))
    sched = DPMSolverMultistepScheduler(**kw)
    sched.alphas_cumprod = torch.from_numpy(alphas_cumprod())
    if spacing in SPACING:
        sched.set_timesteps(steps)
    else:
        sched.set_timesteps(timesteps=spaced_timesteps(steps, spacing)[::-1])
    return float64(sched)


@pytest.mark.parametrize("spacing", ["uniform", "trailing", "logsnr"])
@pytest.mark.parametrize("steps", TS)
def test_dpm_solver_spacings_are_diffusers_dpm_solver(steps, spacing):
    if spacing == "logsnr" and steps > 38:
        pytest.skip("the logsnr spacing of more than 38 steps repeats a timestep")
    model = Toy()
    ref = diffusers_run(dpm_scheduler(steps, spacing), model, noise())  # diffusers steps its sample in float32
    assert_close(SAMPLERS[f"dpm++2m-{spacing}"](model, Y, steps, x=noise(), progress=False), ref, 1e-6)


def test_logsnr_differs_from_lu_lambdas_only_by_the_unrounded_sigmas():
    """diffusers' use_lu_lambdas=True steps with the lambda-uniform sigmas but calls the model at rounded timesteps;
    with the sigmas of those timesteps it is dpm++2m-logsnr."""
    model, steps = Toy(), 10
    sched = DPMSolverMultistepScheduler(use_lu_lambdas=True)
    sched.alphas_cumprod = torch.from_numpy(alphas_cumprod())
    sched.set_timesteps(steps)
    ours = SAMPLERS["dpm++2m-logsnr"](model, Y, steps, x=noise(), progress=False)
    lu = diffusers_run(sched, model, noise())
    assert 1e-3 < float((ours - lu).abs().max() / lu.abs().max()) < 1e-2
    sched.set_timesteps(steps)
    assert_close(ours, diffusers_run(float64(sched), model, noise()), 1e-6)


# ---------------------------------------------------------------- (c) the spacings against diffusers' timesteps


@pytest.mark.parametrize("steps", [5, 10, 20, 50])
@pytest.mark.parametrize("cls", [UniPCMultistepScheduler, DPMSolverMultistepScheduler])
@pytest.mark.parametrize("spacing", ["uniform", "trailing"])
def test_spacing_is_diffusers_timesteps(spacing, cls, steps):
    sched = cls(**SPACING[spacing])
    sched.set_timesteps(steps)
    assert spaced_timesteps(steps, spacing) == sched.timesteps.tolist()[::-1]


@pytest.mark.parametrize("steps", [1, 5, 10, 20, 26, 38])
def test_logsnr_is_diffusers_lu_lambdas(steps):
    """diffusers' use_lu_lambdas=True timesteps; on its float32 alphas_cumprod T = 26 rounds one timestep the other
    way (264.5 +- float32), so the comparison runs it on DiT's float64 schedule."""
    sched = DPMSolverMultistepScheduler(use_lu_lambdas=True)
    sched.alphas_cumprod = torch.from_numpy(alphas_cumprod())
    sched.set_timesteps(steps)
    assert spaced_timesteps(steps, "logsnr") == sched.timesteps.tolist()[::-1]
    if steps != 26:
        plain = DPMSolverMultistepScheduler(use_lu_lambdas=True)
        plain.set_timesteps(steps)
        assert spaced_timesteps(steps, "logsnr") == plain.timesteps.tolist()[::-1]


def test_spacing_limits():
    """logsnr past 38 steps: diffusers repeats timesteps near t = 0, lazydit refuses; trailing at T = 61: diffusers
    adds a timestep -1, lazydit keeps the T others; the reference respacing is `respaced_timesteps`."""
    sched = DPMSolverMultistepScheduler(use_lu_lambdas=True)
    sched.set_timesteps(50)
    assert len(set(sched.timesteps.tolist())) < 50
    with pytest.raises(OptionRangeError, match="at most 38 steps"):
        spaced_timesteps(50, "logsnr")
    sched = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    sched.set_timesteps(61)
    ts = sched.timesteps.tolist()
    assert ts[-1] == -1 and ts[:-1][::-1] == spaced_timesteps(61, "trailing")
    assert spaced_timesteps(10, "reference") == respaced_timesteps(10)
    with pytest.raises(UsageError, match="unknown timestep spacing"):
        spaced_timesteps(10, "karras")
    with pytest.raises(OptionRangeError, match=r"\[1, 1000\]"):
        spaced_timesteps(0, "uniform")


# ---------------------------------------------------------------- (d) UniPC on a DiT, with caching policies


def calls(model):
    seen = []
    handle = model.register_forward_hook(lambda m, a, out: seen.append(int(a[1][0])))
    return seen, handle


@pytest.mark.parametrize("cfg_scale", [1.0, 2.0])
def test_unipc_on_a_dit_calls_the_model_once_per_step(model, cfg_scale):
    T = 7
    seen, handle = calls(model)
    try:
        out = SAMPLERS["unipc"](model, Y, T, seed=3, cfg_scale=cfg_scale, progress=False)
    finally:
        handle.remove()
    assert seen == respaced_timesteps(T)[::-1] and out.shape == (len(Y), 1, 8, 8)
    assert torch.equal(out, SAMPLERS["unipc"](model, Y, T, seed=3, cfg_scale=cfg_scale, progress=False))
    assert not torch.equal(out, SAMPLERS["unipc"](model, Y, T, seed=4, cfg_scale=cfg_scale, progress=False))
    assert torch.isfinite(out).all()


def test_spaced_samplers_run_at_their_spacing(model):
    for name in SAMPLERS:
        spacing = getattr(SAMPLERS[name], "spacing", None)
        if spacing is None:
            continue
        seen, handle = calls(model)
        try:
            SAMPLERS[name](model, Y, 6, seed=0, progress=False)
        finally:
            handle.remove()
        assert seen == spaced_timesteps(6, spacing)[::-1], name


def test_unipc_with_a_caching_policy(model):
    """On the reference respacing (DDIM-T's timesteps) a policy attaches to UniPC: a neutral one is the bare sampler
    bit for bit, FORA skips what it skips under DDIM."""
    T = 8
    ref, _ = sample(model, Y, T, cfg_scale=2.0, progress=False, sampler="unipc")
    x, rep = sample(model, Y, T, policy=FORA(T, interval=1), cfg_scale=2.0, progress=False, sampler="unipc")
    assert torch.equal(x, ref) and rep.lazy_ratio == 0.0
    x, rep = sample(model, Y, T, policy=make_policy("fora:interval=2", T), cfg_scale=2.0, progress=False,
                    sampler="unipc")
    _, rep_ddim = sample(model, Y, T, policy=make_policy("fora:interval=2", T), cfg_scale=2.0, progress=False)
    assert rep.name == "FORA-8+UniPC" and rep.lazy_ratio == rep_ddim.lazy_ratio > 0
    assert torch.isfinite(x).all() and not torch.equal(x, ref)


def test_spaced_sampler_refuses_a_policy_on_other_timesteps(model):
    T = 8
    for name in ("unipc-trailing", "dpm++2m-logsnr"):
        with pytest.raises(UsageError) as e:
            sample(model, Y, T, policy=FORA(T, interval=2), progress=False, sampler=name)
        msg = str(e.value)
        assert "\n" not in msg and name.split("-")[1] in msg and "lazydit's respacing of T=8" in msg
        with pytest.raises(UsageError, match="runs at"):  # the same with micro_batch, before any chunk
            sample(model, Y, T, policy=FORA(T, interval=2), progress=False, sampler=name, micro_batch=1)
    with pytest.raises(UsageError, match="respacing"):  # a compare row, before anything is fitted or sampled
        build_policy(parse_spec("unipc-trailing-8+fora:interval=2"), model)
    with pytest.raises(UsageError, match="not at timesteps"):  # called directly with other timesteps
        SAMPLERS["unipc-uniform"](model, Y, T, progress=False, timesteps=respaced_timesteps(T))


def test_spaced_sampler_takes_a_policy_on_its_own_timesteps(model):
    """Gates trained for the trailing spacing are consistent with the trailing samplers; off, the bare sampler."""
    T = 6
    ts = spaced_timesteps(T, "trailing")
    gates = LazyGates.for_model(model, T, timestep_map=ts, schedule="diffusers' trailing spacing")
    for name in ("unipc-trailing", "dpm++2m-trailing"):
        ref, _ = sample(model, Y, T, cfg_scale=2.0, progress=False, sampler=name)
        x, rep = sample(model, Y, T, policy=policy_for(gates, LazyConfig(threshold=0.0)), cfg_scale=2.0,
                        progress=False, sampler=name)
        assert torch.equal(x, ref) and rep.name == f"Lazy-6+{SAMPLER_LABELS[name]}"
        _, rep = sample(model, Y, T, policy=policy_for(gates, LazyConfig(threshold=1.0)), cfg_scale=2.0,
                        progress=False, sampler=name)
        assert rep.lazy_ratio > 0


# ---------------------------------------------------------------- (e) names


def test_parse_spec_takes_the_longest_sampler_name():
    s = parse_spec("dpm++2m-trailing-10")
    assert (s.sampler, s.steps, s.method) == ("dpm++2m-trailing", 10, None)
    s = parse_spec("unipc-logsnr-20+fora:interval=2")
    assert (s.sampler, s.steps, s.method, s.family) == ("unipc-logsnr", 20, "fora", "fora +UniPC-logsnr")
    assert parse_spec("dpm++2m-10").sampler == "dpm++2m" and parse_spec("unipc-5").sampler == "unipc"
    with pytest.raises(UsageError, match="SAMPLER-T"):
        parse_spec("unipc-karras-10")
    with pytest.raises(OptionRangeError, match="'dpm\\+\\+2m-logsnr-50': the 'logsnr' spacing .* at most 38 steps"):
        parse_spec("dpm++2m-logsnr-50")


def test_cli_offers_every_sampler():
    from lazydit.cli import build_parser

    sub = build_parser()._subparsers._group_actions[0].choices["sample"]
    choices = next(a.choices for a in sub._actions if "--sampler" in a.option_strings)
    assert list(choices) == list(SAMPLERS) and set(SAMPLER_LABELS) == set(SAMPLERS)


def test_cli_sample_with_unipc(tmp_path, capsys):
    import json

    from lazydit.cli import main

    main(["sample", "--steps", "4", "--sampler", "unipc", "--method", "fora:interval=2", "--per-class", "1",
          "--out", str(tmp_path / "s.png"), "--json"])
    assert json.loads(capsys.readouterr().out)[0]["sampler"] == "FORA-4+UniPC"
    with pytest.raises(SystemExit) as e:
        main(["sample", "--steps", "4", "--sampler", "unipc-trailing", "--method", "fora:interval=2", "--per-class",
              "1", "--out", str(tmp_path / "t.png")])
    message = str(e.value.code)
    assert message.startswith("error: sampler 'unipc-trailing' runs at") and "\n" not in message
    assert not (tmp_path / "t.png").exists()
