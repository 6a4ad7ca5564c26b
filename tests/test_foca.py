"""FoCa (`lazydit.lazy.foca`), held to the rule of its source (the FoCa predictor in the HiCache repository's
`models/qwen_image/taylor_utils/__init__.py`, schedule of its `cache_functions/cal_type.py`): the history's
arithmetic against closed forms computed here in float64, the schedule and cost of a tiny random DiT, and the
`--method foca:...` options."""

import pytest
import torch

from lazydit.errors import OptionRangeError, UsageError
from lazydit.lazy import POLICIES, FoCa, ForcedPlan
from lazydit.lazy.forecast import ForecastHistory
from lazydit.lazy.policies import make_policy
from lazydit.models.cost import sampling_macs
from lazydit.pipeline import sample
from lazydit.sampling import SAMPLERS

Y = torch.tensor([0, 1, 2, 3])
UNSPACED = [n for n, s in SAMPLERS.items() if getattr(s, "spacing", None) is None]  # at the policy's timesteps


def run(model, policy, T, sampler="ddim"):
    return sample(model, Y, T, policy=policy, cfg_scale=2.0, seed=0, progress=False, sampler=sampler)


def foca_rule(f_n: torch.Tensor, f_prev: torch.Tensor) -> torch.Tensor:
    """The source's `taylor_formula_foca`, literally: P = (4 F_n - F_{n-1}) / 3, then (F_n + P) / 2."""
    predictor = (4.0 * f_n - f_prev) / 3.0
    return 0.5 * (f_n + predictor)


def poly_features(j: float, coeffs: torch.Tensor) -> torch.Tensor:
    """(2, 3, 4) features, each a polynomial in the step j with its own coefficients (coeffs: (degree+1, 2, 3, 4))."""
    return sum(c * j**i for i, c in enumerate(coeffs.double()))


def history_after(points, coeffs):
    h = ForecastHistory(1, series="foca", clock="step")
    for j in points:
        h.update(poly_features(j, coeffs).float(), float(j))
    return h


# ---------------------------------------------------------------- the arithmetic, against closed forms


def test_forecast_is_bdf2_then_heun_of_the_last_two_outputs_at_every_later_step():
    torch.manual_seed(0)
    coeffs = torch.randn(4, 2, 3, 4)  # cubic features: the rule is not exact for them, its value is still defined
    h = history_after((0, 2, 5), coeffs)  # uneven full steps: the rule reads the last two outputs only
    want = foca_rule(poly_features(5, coeffs), poly_features(2, coeffs))
    for s in (6.0, 7.0, 11.0):  # every skipped step of the gap receives the same value
        torch.testing.assert_close(h.predict(s, torch.float64), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(h.predict(6.0, torch.float32), h.predict(11.0, torch.float32))


def test_forecast_is_exact_where_the_rule_says_it_is():
    """Constant features: exact at every step (bit for bit). Linear features F = a + b j: the forecast is F at
    j_n + (j_n - j_{n-1}) / 6 (F_n + (F_n - F_{n-1}) / 6), whatever step it is given to."""
    torch.manual_seed(1)
    const = torch.randn(1, 2, 3, 4)
    h = history_after((0, 3), const)
    assert torch.equal(h.predict(4.0, torch.float32), poly_features(0, const).float())
    lin = torch.randn(2, 2, 3, 4)
    h = history_after((1, 4), lin)
    torch.testing.assert_close(h.predict(5.0, torch.float64), poly_features(4 + 3 / 6, lin), rtol=1e-5, atol=1e-5)


def test_the_calibration_moves_the_bdf2_forecast_half_way_back_to_the_last_output():
    """Heun's step replaces P = (4 F_n - F_{n-1}) / 3 by (F_n + P) / 2: it moves P by (F_n - P) / 2, i.e. by
    -(F_n - F_{n-1}) / 6, which is not zero for a feature that moves."""
    torch.manual_seed(2)
    coeffs = torch.randn(3, 2, 3, 4)
    h = history_after((2, 4), coeffs)
    f_n, f_prev = poly_features(4, coeffs), poly_features(2, coeffs)
    predictor = (4.0 * f_n - f_prev) / 3.0
    moved = h.predict(5.0, torch.float64) - predictor
    torch.testing.assert_close(moved, (f_n - predictor) / 2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(moved, -(f_n - f_prev) / 6, rtol=1e-4, atol=1e-5)
    assert moved.abs().min() > 1e-3  # the calibration does change the values


def test_one_point_is_the_last_output_and_rows_keep_their_own_history():
    """Fewer than two outputs: the forecast is F_n (the source's `len(feats) < 2`). A mixed batch: each row uses
    its own last two outputs."""
    torch.manual_seed(3)
    f0, f3 = torch.randn(3, 5), torch.randn(3, 5)
    h = ForecastHistory(1, series="foca", clock="step")
    h.update(f0, 0.0)
    assert torch.equal(h.predict(1.0, torch.float32), f0)
    h.update(f3, 3.0, rows=torch.tensor([0, 2]))  # row 1 skipped step 3
    out = h.predict(4.0, torch.float64)
    rows = torch.tensor([0, 2])
    torch.testing.assert_close(out[rows], foca_rule(f3[rows].double(), f0[rows].double()), rtol=1e-5, atol=1e-6)
    assert torch.equal(out[1].float(), f0[1])


def test_the_in_place_update_matches_the_masked_one_bit_for_bit():
    """Updates of every row take the differences in place (`_update_all`); the same updates through the row-masked
    path give the same forecast, bit for bit."""
    torch.manual_seed(4)
    feats = [torch.randn(4, 6, 8) for _ in range(3)]
    fast, masked = (ForecastHistory(1, series="foca", clock="step") for _ in range(2))
    for j, f in enumerate(feats):
        fast.update(f, float(j))
        masked.update(f, float(j), rows=torch.arange(4))
    assert torch.equal(fast.predict(5.0, torch.float32), masked.predict(5.0, torch.float32))
    torch.testing.assert_close(fast.predict(5.0, torch.float64), foca_rule(feats[2].double(), feats[1].double()),
                               rtol=1e-5, atol=1e-6)


def test_the_foca_series_keeps_two_outputs_only():
    with pytest.raises(ValueError, match="order 1"):
        ForecastHistory(2, series="foca")


# ---------------------------------------------------------------- a tiny random DiT


@pytest.mark.parametrize("sampler", UNSPACED)
def test_interval_one_is_the_bare_model(model, sampler):
    T = 8
    ref, _ = run(model, None, T, sampler)
    x, rep = run(model, FoCa(T, interval=1, warmup=2), T, sampler)
    assert torch.equal(x, ref)
    assert rep.lazy_ratio == 0.0


def test_schedule_stats_and_cost(model):
    """The source's counter: the warm-up j < W, then a full step when j + 1 - W is a multiple of N."""
    T, N, W = 12, 3, 2
    _, rep = run(model, FoCa(T, interval=N, warmup=W), T)
    per_step = rep.stats["per_step"]  # in sampling order j
    assert [j for j in range(T) if per_step[j] == 0.0] == [0, 1, 4, 7, 10]
    assert all(per_step[j] == 1.0 for j in range(T) if j not in (0, 1, 4, 7, 10))
    assert rep.lazy_ratio == pytest.approx(7 / 12)
    m = model.config
    assert rep.tmacs * 1e12 == sampling_macs(m, T, rep.lazy, overhead=2 * 2 * m.depth * m.num_tokens * m.hidden_size)
    assert [j for j in range(20) if FoCa(20).computes(19 - j)] == [0, 1, 2, 9, 16]  # the defaults N=7, W=3


class _Checked(FoCa):
    """FoCa that checks, on every skipped branch, what the engine hands the skipped rows against the rule applied
    to the branch's outputs of the last two full steps (read from the caches when the next step begins)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.outputs, self.checked = {}, 0

    def begin_step(self, run, k):
        if k + 1 < self.steps and self.computes(k + 1):  # the step before computed: the caches are its outputs
            for h in run.hooks:
                self.outputs.setdefault((h.layer, h.branch), []).append(h.cache.double().clone())

    def reuse(self, hook, k):
        out = super().reuse(hook, k)
        seen = self.outputs[hook.layer, hook.branch]
        want = seen[-1] if len(seen) < 2 else foca_rule(seen[-1], seen[-2])
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-6)
        self.checked += 1
        return out


def test_skipped_branches_receive_the_rule_of_their_last_two_computed_outputs(model):
    T = 11
    policy = _Checked(T, interval=3, warmup=1)  # full j = 0, 3, 6, 9: the first gap has one point, the others two
    _, rep = run(model, policy, T)
    skipped = sum(1 for j in range(T) if not policy.computes(T - 1 - j))
    assert policy.checked == skipped * len(model.blocks) * 2
    assert rep.lazy_ratio == pytest.approx(skipped / T)


def test_the_forecast_changes_the_samples_and_is_deterministic(model):
    """Against a plain reuse of the cache on the same steps (a forced plan), FoCa's forecast moves the samples;
    two runs are bit for bit the same."""
    T = 10
    policy = FoCa(T, interval=3, warmup=2)
    plan = torch.zeros(T, len(model.blocks), 2, dtype=torch.bool)
    for k in range(T):
        plan[k] = not policy.computes(k)
    x, rep = run(model, policy, T)
    x_again, rep_again = run(model, FoCa(T, interval=3, warmup=2), T)
    x_reuse, rep_reuse = run(model, ForcedPlan(plan, parity=False), T)
    assert torch.equal(x, x_again) and rep.stats == rep_again.stats
    assert rep.stats["per_step"] == rep_reuse.stats["per_step"]
    assert not torch.equal(x, x_reuse)


# ---------------------------------------------------------------- --method foca:...


def test_method_spec_and_options():
    assert POLICIES["foca"] is FoCa
    p = make_policy("foca:interval=4,warmup=2", 20)
    assert isinstance(p, FoCa) and (p.interval, p.warmup, p.forecast, p.engine) == (4, 2, 1, "block")
    assert p.describe()["interval"] == 4 and p.label == "FoCa"
    d = make_policy("foca", 20)
    assert (d.interval, d.warmup) == (7, 3)
    for bad, name in (("foca:interval=0", "interval"), ("foca:warmup=0", "warmup"), ("foca:interval=2.5", "interval"),
                      ("foca:warmup=x", "warmup")):
        with pytest.raises(OptionRangeError, match=name) as e:
            make_policy(bad, 20)
        assert "\n" not in str(e.value)
    with pytest.raises(UsageError, match="interval=, warmup=") as e:
        make_policy("foca:order=2", 20)  # FoCa has no order: the message names what it takes
    assert not isinstance(e.value, OptionRangeError)
