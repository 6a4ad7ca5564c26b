"""Training-free residual caches that decide per step from a cheap probe: first-block cache and TeaCache.

Both run on the residual engine (`Policy.engine = "residual"`, `lazydit.lazy.engine_residual`): a computed step
caches the residual of a run of blocks (the output of the last block minus the input of the first cached one); a
skipped step adds that residual instead of running those blocks. The decision is taken once per step for the whole
batch, as diffusers and TeaCache do.
"""

import math

import numpy as np
import torch

from lazydit.errors import OptionRangeError, UsageError
from lazydit.lazy.config import LazyConfig
from lazydit.lazy.policies import DISTANCE_CALIBRATION, Policy, register_policy


def relative_l1(a: torch.Tensor, b: torch.Tensor) -> float:
    """mean |a - b| / mean |b|, over the whole batch (float)."""
    return float((a - b).abs().mean() / b.abs().mean())


def _check_threshold(threshold):
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 <= threshold < math.inf:
        raise OptionRangeError(f"threshold must be a finite number >= 0, got {threshold!r}")
    return float(threshold)


@register_policy("fbcache")
class FirstBlockCache(Policy):
    """First-block cache (diffusers' `apply_first_block_cache`, cache-dit's FBCache): block 0 always runs; when the
    relative L1 change of its residual (output - input) since the last computed step is below `threshold`, the
    cached residual of blocks 1 .. L-1 replaces them.

    Options (`--method fbcache:threshold=R`): R >= 0 (0: never skips; diffusers' default 0.05).
    """

    engine = "residual"
    first_cached = 1
    label = "FBCache"
    calibration = DISTANCE_CALIBRATION  # a step skips while the distance is below the threshold

    def __init__(self, steps: int, config: LazyConfig | None = None, threshold: float = 0.05):
        super().__init__(steps, config)
        self.threshold = _check_threshold(threshold)

    def overhead_macs(self, cfg) -> int:
        return cfg.num_tokens * cfg.hidden_size  # the relative L1 distance of block 0's residual (elementwise)

    def skip_blocks(self, probe) -> bool:
        residual = probe.x - probe.x0  # block 0's residual at this step
        prev = probe.state.get("residual")
        skip = probe.cached and prev is not None and relative_l1(residual, prev) < self.threshold
        if not skip:  # compared against the residual of the last computed step
            probe.state["residual"] = residual
        return skip


@register_policy("teacache")
class TeaCache(Policy):
    """TeaCache: the relative L1 change of block 0's timestep-modulated input between consecutive steps, rescaled
    by a polynomial fitted on the model (`fit_teacache`), is accumulated; a step computes when the accumulation
    reaches `threshold` (and resets it), otherwise it reuses the cached residual of every block. The first and the
    last step always compute.

    Options (`--method teacache:threshold=R[,coefficients=c4/c3/c2/c1/c0]`): R >= 0 (0: never skips);
    coefficients of the rescaling polynomial, highest power first, separated by '/'; without them `prepare` fits
    them on the model before sampling.
    """

    engine = "residual"
    first_cached = 0
    label = "TeaCache"
    calibration = DISTANCE_CALIBRATION  # a step skips while the accumulated distance is below the threshold

    def __init__(self, steps: int, config: LazyConfig | None = None, threshold: float = 0.1,
                 coefficients=None):
        super().__init__(steps, config)
        self.threshold = _check_threshold(threshold)
        if isinstance(coefficients, str):
            try:
                coefficients = [float(c) for c in coefficients.split("/")]
            except ValueError as e:
                raise OptionRangeError(f"coefficients must be numbers separated by '/', got {coefficients!r}") from e
        elif isinstance(coefficients, (int, float)):
            coefficients = [float(coefficients)]
        self.coefficients = None if coefficients is None else tuple(float(c) for c in coefficients)

    def describe(self) -> dict:
        return {**super().describe(), "coefficients": self.coefficients}

    def fitted(self) -> dict:
        return {} if self.coefficients is None else {"coefficients": list(self.coefficients)}

    def load_fitted(self, state: dict):
        if state.get("coefficients") is not None:
            self.coefficients = tuple(float(c) for c in state["coefficients"])

    def prepare(self, model, y, cfg_scale=1.0, seed=0, sampler="ddim"):
        if self.coefficients is None:
            self.coefficients = fit_teacache(model, y, self.steps, cfg_scale=cfg_scale, seed=seed, sampler=sampler)

    def overhead_macs(self, cfg) -> int:
        D = cfg.hidden_size  # the probe: block 0's adaLN Linear again, and the distance (elementwise)
        return D * 6 * D + cfg.num_tokens * D

    def skip_blocks(self, probe) -> bool:
        if self.coefficients is None:
            raise UsageError("TeaCache needs its rescaling polynomial: call policy.prepare(model, y) or pass "
                             "coefficients")
        z = probe.modulated(0)
        st = probe.state
        i = self.steps - 1 - probe.run.k  # sampling order
        prev = st.get("z")
        st["z"] = z
        if i == 0 or i == self.steps - 1 or prev is None or not probe.cached:
            st["acc"] = 0.0
            return False
        st["acc"] = st.get("acc", 0.0) + float(np.polyval(self.coefficients, relative_l1(z, prev)))
        if st["acc"] < self.threshold:
            return True
        st["acc"] = 0.0
        return False


def teacache_distances(model, y, steps: int, cfg_scale: float = 1.0, seed: int = 0, sampler: str = "ddim"):
    """Per consecutive pair of steps of dense sampling: (relative L1 change of block 0's modulated input, relative L1
    change of the model output), as float64 arrays of T - 1 values each."""
    from lazydit.lazy.engine_residual import BlockProbe
    from lazydit.models.registry import model_blocks
    from lazydit.sampling import SAMPLERS

    block0 = model_blocks(model)[0]
    inputs, outputs = [], []

    def record(module, args, kwargs):
        probe = BlockProbe(None, args[0], args[0], module, args[1:], kwargs, False, {})
        inputs.append(probe.modulated(0).detach())

    def record_out(module, args, out):
        outputs.append(out.detach())

    handles = [block0.register_forward_pre_hook(record, with_kwargs=True), model.register_forward_hook(record_out)]
    try:
        SAMPLERS[sampler](model, y, steps, cfg_scale=cfg_scale, seed=seed, progress=False)
    finally:
        for h in handles:
            h.remove()
    dz = [relative_l1(a, b) for b, a in zip(inputs, inputs[1:])]
    dy = [relative_l1(a, b) for b, a in zip(outputs, outputs[1:])]
    return np.asarray(dz), np.asarray(dy)


def fit_teacache(model, y, steps: int, cfg_scale: float = 1.0, seed: int = 0, sampler: str = "ddim",
                 degree: int = 4) -> tuple:
    """TeaCache's rescaling polynomial for a model: a least-squares fit (numpy.polyfit, `degree`) of the relative L1
    change of the model output against that of block 0's modulated input, over the consecutive steps of dense
    sampling of labels y.

    Returns:
        coefficients, highest power first (tuple of floats).
    """
    dz, dy = teacache_distances(model, y, steps, cfg_scale=cfg_scale, seed=seed, sampler=sampler)
    degree = min(degree, len(dz) - 1)
    if degree < 1:
        raise UsageError(f"fitting TeaCache needs at least 3 sampling steps, got {steps}")
    return tuple(float(c) for c in np.polyfit(dz, dy, degree))
