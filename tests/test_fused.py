"""The fused paths give the results of the paths they replace.

1. Forecasts in one pass (`lazydit.lazy.forecast.ForecastHistory`): once every row has the points of every order, an
   update of all rows takes its differences in place (`_update_all`) and a forecast allocates only its result. The
   operations and their order are today's, so the tolerance is zero: every difference, knot, count and forecast is
   bit for bit that of `_Reference`, a frozen copy of the class before the change (float32 and bf16 outputs, Newton
   and Taylor series, orders 1-3, mixed batches whose rows have fewer points: the masking stays exact). The optional
   `ForecastHistory.fma` (one `addcmul` per term) rounds each product once instead of twice: allowed
   |fma - reference| <= 2^-21 * (|d0| + sum_i |d_i w_i|) per element, i.e. a few float32 ulps of the sum's terms
   (each of the two results is within (order + 1) roundings, u = 2^-24 each, of the exact sum).
2. Static plans compile whole (`lazydit.lazy.engine_block.block_region`): a block step whose plan is Python
   constants (per branch: every row computes or every row skips) is one function, traced by dynamo with 0 graph
   breaks and compiled with `fullgraph=True`: the eager region is bit for bit the branch-by-branch path, the
   `aot_eager` compile bit for bit the eager region (the same aten ops), the Inductor compile (C++ on the CPU; a
   tiny model compiles in seconds) within atol = rtol = 1e-5 (it fuses the modulation's multiply-add and reorders
   LayerNorm's reductions: measured 7e-7 on outputs of size ~1); sampling with LazyConfig(compile=True) within
   1e-3 after 10 steps (measured 9e-5; skipping one module moves samples by > 1e-2).
"""

import math

import pytest
import torch

from lazydit import ddim_sample
from lazydit.lazy import FORA, ForcedPlan, LazyConfig, TaylorSeer, apply_lazy
from lazydit.lazy import engine_block
from lazydit.lazy.engine_block import block_region, static_pattern
from lazydit.lazy.forecast import ForecastHistory, _col

from conftest import tiny_model

T = 10
PATTERNS = [(True, True), (True, False), (False, True), (False, False)]


# ---------------------------------------------------------------- the frozen reference (src as of before the change)

SERIES = ("newton", "taylor")
CLOCKS = ("timestep", "step")


class _Reference:
    """Today's ForecastHistory before the in-place pass (frozen copy, the reference of the tests)."""

    def __init__(self, order: int, series: str = "newton", clock: str = "timestep"):
        if isinstance(order, bool) or not isinstance(order, int) or order < 1:
            raise ValueError(f"forecast order must be an integer >= 1 (0 is plain reuse), got {order!r}")
        if series not in SERIES or clock not in CLOCKS:
            raise ValueError(f"series must be one of {SERIES} and clock one of {CLOCKS}, got {series!r}, {clock!r}")
        self.order, self.series, self.clock = order, series, clock
        self.d = None  # [(B, ...)] * (order + 1): d[0] the last computed output, d[i] the i-th difference
        self.least = 0  # host: every row has at least this many points (updates of all rows so far, capped)

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
        sel = slice(None) if rows is None else rows
        y = (out if rows is None else out[rows]).float()
        n, knots = self.n[sel], [k[sel] for k in self.knots]
        new = [y]
        for i in range(self.order):  # d_{i+1} where the row held d_i before
            knot = knots[i] if self.series == "newton" else knots[0]
            new.append(_ref_difference(new[i], self.d[i][sel], s - knot, n > i, self.least > i))
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

    def predict(self, s: float, dtype) -> torch.Tensor:
        """(B, ...) forecast of every row at clock value s (rows with one point: their d0)."""
        if self.d is None:
            raise RuntimeError("forecast reuse before any computed step")
        d = self.d
        ds = _col(s - self.knots[0], d[0])
        weight = ds  # of d1: s - s0 in both series
        out = torch.mul(d[1], weight).add_(d[0])  # d0 + d1 ds (one buffer; a sum of two terms rounds the same)
        for i in range(2, self.order + 1):
            if self.series == "newton":
                weight = weight * _col(s - self.knots[i - 1], d[0])
            else:
                weight = ds**i / math.factorial(i)
            out.add_(d[i] * weight)
        return out.to(dtype)

    def forecast(self, run, dtype) -> torch.Tensor:
        """This step's forecast of every row (the current step of `run`), in `dtype`."""
        return self.predict(self.at(run), dtype)

    def learn(self, out: torch.Tensor, run, rows=None):
        """Rows `rows` of `out` were computed at the current step of `run`."""
        self.update(out.detach(), self.at(run), rows)


def _ref_difference(y, prev, ds, has, all_have: bool):
    """(y - prev) / ds per row where the row `has` the earlier point, else 0; `all_have` (known on the host: every
    row has it) skips the masking, which then changes nothing."""
    if all_have:
        return (y - prev) / _col(ds, y)
    return torch.where(_col(has, y), (y - prev) / _col(torch.where(has, ds, 1.0), y), 0.0)


# ---------------------------------------------------------------- 1. forecasts in one pass

SEQUENCE = [(999, None), (899, [0, 2]), (799, None), (699, [1]), (599, None), (499, None), (399, [0, 3]),
            (299, None), (199, None), (99, [2]), (0, None)]  # all rows, part of them (fewer points there), ...


def _replay(order, series, clock_dtype, fma=False):
    """Feed one random sequence to the new class and the reference; yield both after every update."""
    gen = torch.Generator().manual_seed(order * 10 + len(series))
    new, ref = ForecastHistory(order, series), _Reference(order, series)
    new.fma = fma
    for t, rows in SEQUENCE:
        s = float(t) if series == "newton" else t / 100  # taylor: a step-like clock
        out = (torch.randn(4, 6, 8, generator=gen) * 3).to(clock_dtype)
        idx = None if rows is None else torch.tensor(rows)
        new.update(out, s, idx)
        ref.update(out, s, idx)
        yield new, ref, s


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("series", ["newton", "taylor"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_history_in_place_is_the_reference_bit_for_bit(order, series, dtype):
    fused = 0
    for new, ref, s in _replay(order, series, dtype):
        assert len(new.d) == len(ref.d) == order + 1
        for a, b in zip(new.d, ref.d):
            assert a.dtype == torch.float32 and torch.equal(a, b)
        for a, b in zip(new.knots, ref.knots):
            assert torch.equal(a, b)
        assert torch.equal(new.n, ref.n) and new.least == ref.least
        for ahead in (0.5, 1.0, 3.0):
            assert torch.equal(new.predict(s - ahead, dtype), ref.predict(s - ahead, dtype))
        fused += new.least > order  # the in-place pass ran on the later updates of all rows
    assert fused >= 3


def test_history_in_place_allocates_no_difference_buffer():
    h = ForecastHistory(2)
    gen = torch.Generator().manual_seed(0)
    for t in (999, 899, 799):  # every row gets the points of every order
        h.update(torch.randn(2, 3, 4, generator=gen), float(t))
    buffers = {b.data_ptr() for b in h.d}
    for t in (699, 599, 499):
        h.update(torch.randn(2, 3, 4, generator=gen), float(t))
        assert {b.data_ptr() for b in h.d} == buffers  # the same three buffers, rotated


def test_rows_with_fewer_points_keep_their_own_order_exactly():
    """A row that computed once forecasts its d0 (plain reuse), a row with two points the line through them: the
    masking of rows with fewer points, exact, after updates that skipped it."""
    h = ForecastHistory(2)
    y = [torch.full((3, 2, 2), v) for v in (1.0, 2.0, 4.0)]
    h.update(y[0], 900.0)
    h.update(y[1], 800.0, torch.tensor([1, 2]))
    h.update(y[2], 700.0, torch.tensor([2]))
    got = h.predict(600.0, torch.float32)
    assert torch.equal(got[0], y[0][0])  # one point: its output
    assert torch.equal(got[1], torch.full((2, 2), 4.0))  # two: 2 + (2 - 1) / -100 * -200
    assert torch.allclose(got[2], torch.full((2, 2), 7.0), atol=1e-5)  # three: quadratic 1, 2, 4 -> 7
    ref = _Reference(2)
    ref.update(y[0], 900.0)
    ref.update(y[1], 800.0, torch.tensor([1, 2]))
    ref.update(y[2], 700.0, torch.tensor([2]))
    assert torch.equal(got, ref.predict(600.0, torch.float32))


@pytest.mark.parametrize("series", ["newton", "taylor"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_fma_forecast_is_within_the_stated_bound(order, series):
    moved = False
    for new, ref, s in _replay(order, series, torch.float32, fma=True):
        for ahead in (0.5, 3.0):
            got, want = new.predict(s - ahead, torch.float32), ref.predict(s - ahead, torch.float32)
            ds = _col(s - ahead - ref.knots[0], ref.d[0])
            size, w = ref.d[0].abs(), ds
            for i in range(1, order + 1):  # the terms' magnitudes, weight by weight as the reference builds them
                if i > 1:
                    w = w * _col(s - ahead - ref.knots[i - 1], ref.d[0]) if series == "newton" else \
                        ds**i / math.factorial(i)
                size = size + (ref.d[i] * w).abs()
            assert ((got - want).abs() <= 2.0**-21 * size).all()
            moved |= not torch.equal(got, want)
    assert moved  # the bound is tested on results that differ (else fma would be the default path)


def test_forecast_sampling_is_the_reference_bit_for_bit(monkeypatch):
    """Through the real code paths: TaylorSeer (Taylor, step clock) and a forced plan with forecast 2 and mixed
    batches (Newton, timestep clock) sample bit for bit as with the reference history."""
    model = tiny_model()
    y = torch.arange(2) % 4
    plan = torch.zeros(T, len(model.blocks), 2, 4, dtype=torch.bool)
    plan[T - 4] = True
    plan[T - 6, :, 1, :2] = True  # rows 0, 1 of the mlp skip: a mixed batch (rows with fewer points later)
    plan[T - 7, 1] = True
    plan[T - 8:] = plan[T - 8:] | (torch.arange(4) % 2 == 0)
    policies = [lambda: TaylorSeer(T, interval=2, order=2, warmup=2),
                lambda: ForcedPlan(plan, parity=False, config=LazyConfig(forecast=2))]
    for make in policies:
        runs = []
        for cls in (ForecastHistory, _Reference):
            policy = make()
            series, clock = ("taylor", "step") if isinstance(policy, TaylorSeer) else ("newton", "timestep")
            monkeypatch.setattr(policy, "new_history", lambda c=cls, p=policy: c(p.forecast, series, clock))
            with apply_lazy(model, policy) as h:
                runs.append((ddim_sample(model, y, T, cfg_scale=1.5, seed=0, progress=False), h.stats().lazy_ratio))
        assert runs[0][1] == runs[1][1] > 0
        assert torch.equal(runs[0][0], runs[1][0])


# ---------------------------------------------------------------- 2. static plans compile whole

@pytest.fixture(scope="module")
def block_inputs():
    model = tiny_model()
    block = model.blocks[1]
    gen = torch.Generator().manual_seed(0)
    B, N, D = 4, 16, model.config.hidden_size
    x, c = torch.randn(B, N, D, generator=gen), torch.randn(B, D, generator=gen)
    with torch.no_grad():
        chunks = block.adaLN_modulation(c).chunk(6, dim=1)
    reuse = [torch.randn(B, N, D, generator=gen) for _ in range(2)]
    parts = ((block.norm1, block.attn), (block.norm2, block.mlp))

    def args(pattern):
        mods = tuple(tuple(chunks[3 * b : 3 * b + 3]) if p else (None, None, chunks[3 * b + 2])
                     for b, p in enumerate(pattern))
        return x.clone(), mods, tuple(None if p else reuse[b] for b, p in enumerate(pattern)), ((), ()), parts, \
            pattern

    args.c = c
    return block, args


def _eager_by_branch(block, args):
    """The branch-by-branch formula of the block engine before the region: x + gate * F(modulate(norm(x))) for
    computed branches, x + gate * reuse for skipped ones (`BlockHook.run_branch`'s two paths)."""
    x, mods, reuses, extras, parts, pattern = args
    outs = []
    for b, (norm, module) in enumerate(parts):
        shift, scale, gate = mods[b]
        if pattern[b]:
            x, out, _ = engine_block._branch_fn(norm, module, scratch={})(x, shift, scale, gate)
        else:
            out = None
            x = engine_block._residual(x, gate, reuses[b], {})
        outs.append(out)
    return x, outs


@pytest.mark.parametrize("pattern", PATTERNS)
def test_static_region_traces_with_no_graph_break(block_inputs, pattern):
    _, args = block_inputs
    torch._dynamo.reset()
    with torch.no_grad():
        explained = torch._dynamo.explain(block_region)(*args(pattern))
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


@pytest.mark.parametrize("pattern", PATTERNS)
def test_eager_region_is_the_branch_by_branch_path_bit_for_bit(block_inputs, pattern):
    block, args = block_inputs
    with torch.no_grad():
        x, outs, zs = block_region(*args(pattern), scratch={})
        x_ref, outs_ref = _eager_by_branch(block, args(pattern))
    assert torch.equal(x, x_ref)
    for p, a, b, z in zip(pattern, outs, outs_ref, zs):
        assert (a is None and b is None and z is None) if not p else (torch.equal(a, b) and z is not None)


def test_eager_region_computing_everything_is_the_bare_block(block_inputs):
    block, args = block_inputs
    with torch.no_grad():
        got = block_region(*args((True, True)), scratch={})[0]
        want = type(block).forward(block, args((True, True))[0], args.c)  # the DiT block as written
    assert torch.equal(got, want)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
@pytest.mark.parametrize("pattern", PATTERNS)
def test_static_region_compiles_fullgraph_and_equals_eager(block_inputs, pattern, backend):
    _, args = block_inputs
    torch._dynamo.reset()
    with torch.no_grad():
        want = block_region(*args(pattern), scratch={})
        try:
            got = torch.compile(block_region, fullgraph=True, backend=backend)(*args(pattern))
        except torch._dynamo.exc.BackendCompilerFailed as e:  # Inductor's C++ build (no compiler): say so; a
            # graph break under fullgraph=True raises another error, the failure this test is for
            pytest.skip(f"{backend} unavailable here: {str(e)[:200]}")
    for a, b in zip((got[0],) + got[1] + got[2], (want[0],) + want[1] + want[2]):
        assert (a is None) == (b is None)
        if a is None:
            continue
        if backend == "aot_eager":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_static_pattern_reads_host_decisions():
    B = 4
    assert static_pattern([None, None]) == (True, True)
    assert static_pattern([torch.ones(B, dtype=torch.bool), torch.zeros(B, dtype=torch.bool)]) == (True, False)
    assert static_pattern([None, torch.tensor([True, False, True, True])]) is None


@pytest.mark.parametrize("make", [lambda c: FORA(T, c, interval=2), lambda c: TaylorSeer(T, c, interval=2, order=1)])
def test_static_schedules_run_every_step_through_the_region(monkeypatch, make):
    """FORA and TaylorSeer: every block of every step is one region call (decisions and counting outside it), and
    the samples are those of the branch-by-branch path bit for bit."""
    model = tiny_model()
    y = torch.arange(2) % 4
    calls = []
    real = engine_block.block_region
    monkeypatch.setattr(engine_block, "block_region", lambda *a, **k: calls.append(a[5]) or real(*a, **k))
    with apply_lazy(model, make(LazyConfig())) as h:
        fast = ddim_sample(model, y, T, cfg_scale=1.5, seed=0, progress=False)
        ratio = h.stats().lazy_ratio
    assert len(calls) == T * len(model.blocks) and set(calls) == {(True, True), (False, False)}
    monkeypatch.setattr(engine_block, "static_pattern", lambda rows: None)  # the branch-by-branch path
    calls.clear()
    with apply_lazy(model, make(LazyConfig())) as h:
        slow = ddim_sample(model, y, T, cfg_scale=1.5, seed=0, progress=False)
        assert h.stats().lazy_ratio == ratio > 0
    assert not calls and torch.equal(fast, slow)


def test_compiled_static_schedule_equals_eager():
    """LazyConfig(compile=True) on FORA: one compiled region per pattern shared by every block, the skip counts
    exact, the samples within 1e-3 (Inductor's rounding, see the module docstring)."""
    model = tiny_model()
    y = torch.arange(2) % 4
    with apply_lazy(model, FORA(T, interval=2)) as h:
        eager, ratio = ddim_sample(model, y, T, cfg_scale=1.5, seed=0, progress=False), h.stats().lazy_ratio
    torch._dynamo.reset()
    calls = []
    real = torch.compile
    with pytest.MonkeyPatch.context() as mp:  # see that the region itself is what gets compiled
        mp.setattr(torch, "compile", lambda fn, **kw: calls.append(fn) or real(fn, **kw))
        try:
            with apply_lazy(model, FORA(T, LazyConfig(compile=True), interval=2)) as h:
                compiled = ddim_sample(model, y, T, cfg_scale=1.5, seed=0, progress=False)
                compiled_ratio = h.stats().lazy_ratio
        except torch._dynamo.exc.BackendCompilerFailed as e:  # no C++ compiler: say so, as test_lookahead does
            pytest.skip(f"torch.compile unavailable here: {str(e)[:200]}")
    assert calls == [engine_block.block_region]  # one compiled function for every block and step
    assert compiled_ratio == ratio
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=0)
