"""No behaviour change across refactors, on the shipped model: each run's skip counts (SHA-256, exact), the output of
`lazydit cost --json` (SHA-256, exact), and its samples against stored arrays (`data/behaviour_samples.npz`) within a
float tolerance.

Why a tolerance for the samples and not a hash: float results depend on the machine's kernels, while the skip counts
do not. The tolerance (SAMPLE_ATOL) is far above kernel rounding and far below any change of what is computed
(skipping any one module at one gated step of DDIM-10 moves the samples by 1.4e-2 to 0.74, measured). Re-record
(after a deliberate change of behaviour) with `python tests/test_behaviour_hashes.py --record-samples`: it writes
the arrays and prints SKIP_COUNTS and COST to paste here.
"""

import hashlib
import io
import json
import sys
from pathlib import Path
from contextlib import redirect_stdout

import numpy as np
import pytest
import torch

from lazydit.assets import default_model
from lazydit.lazy.shipped import default_gates
from lazydit.lazy import ForcedPlan, LazyConfig, policy_for
from lazydit.pipeline import sample

# SHA-256 of each run's skipped counts per (step, layer, branch), and of `lazydit cost --json`: exact on any machine.
SKIP_COUNTS = {
    "ddim10": "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
    "lazy10": "1c58de47d67561d3e83b122b72e2c2134b9a626be13f3fb475a44df9449a52e9",
    "lookahead50": "e580bf6cb7e520a883e31644b2f37a840819765b9df9dd4ad9b004c016a11840",
    "forced10": "ebdfd95f69acb695324eccb11d17f283363dd11420181eb37e60b38ba63e2932",
    "forced10_rows": "342d95834b10a8b8a04943c65cd37de57f695f2cc08ba945007245b7385eaf2d",
    "forced50_lookahead": "1d8de5bbc8bf783dfcabd77f23622de2efd0117c9beb9ec255528f453521f4a3",
    "uniform10": "0825303967e18e7495920cd36ab80368edca93a6c1c21e8aa1288501bc661716",
    "tie_cfg10": "7149f1d336d1d89674d59b385fee652744cf6cc29515eebd3e846a5876b445ed",
}
COST = "44d3b9506a9974a6427044031c392c07d32d1a47b0c6e55d03659dd9cdcb671e"


SAMPLES = Path(__file__).parent / "data" / "behaviour_samples.npz"
SAMPLE_ATOL = 1e-4  # samples lie in about [-1, 1]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _plan(steps, depth, rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (steps, depth, 2) if rows is None else (steps, depth, 2, rows)
    return torch.rand(shape, generator=g) < 0.5


# name -> (steps, sample() keywords from the shipped gates g10 / g50la and the model depth): every run checked.
RUNS = {
    "ddim10": (10, lambda g10, g50la, depth: {}),
    "lazy10": (10, lambda g10, g50la, depth: dict(policy=policy_for(g10))),
    "lookahead50": (50, lambda g10, g50la, depth: dict(policy=policy_for(g50la))),
    "forced10": (10, lambda g10, g50la, depth: dict(policy=ForcedPlan(_plan(10, depth)))),
    "forced10_rows": (10, lambda g10, g50la, depth: dict(policy=ForcedPlan(_plan(10, depth, rows=8)))),
    "forced50_lookahead": (50, lambda g10, g50la, depth: dict(policy=ForcedPlan(_plan(50, depth, seed=1)))),
    "uniform10": (10, lambda g10, g50la, depth: dict(policy=policy_for(g10, LazyConfig(uniform=True,
                                                                                         threshold=0.7)))),
    "tie_cfg10": (10, lambda g10, g50la, depth: dict(policy=policy_for(g10, LazyConfig(tie_cfg=True,
                                                                                         threshold=0.7)))),
}


def run(name):
    """(samples, digest of the skipped counts per step/layer/branch) of a run: shipped model, seed 0, CFG 2.0,
    4 images."""
    steps, keywords = RUNS[name]
    g10 = default_gates(10)
    kw = keywords(g10, default_gates(50, kind="lookahead"), g10.depth)
    out, rep = sample(default_model(), torch.tensor([0, 3, 5, 8]), steps, cfg_scale=2.0, seed=0, progress=False, **kw)
    counts = rep.lazy.skipped if rep.lazy is not None else torch.zeros(0, dtype=torch.long)
    return out, _digest(counts)


def cost_json() -> str:
    from lazydit.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        main(["cost", "--model", "DiT-XL/2", "--image-size", "256", "--steps", "50,25,10", "--json"])
    return hashlib.sha256(buf.getvalue().encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(RUNS))
def test_samples_unchanged(name):
    """Every run of RUNS: one without a recorded digest or array fails here (KeyError)."""
    torch.set_num_threads(1)
    out, counts = run(name)
    assert counts == SKIP_COUNTS[name]  # the same modules skipped, exactly
    with np.load(SAMPLES) as f:
        ref = f[name]
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=SAMPLE_ATOL)


def test_cost_json_unchanged():
    assert cost_json() == COST


if __name__ == "__main__":  # re-record: python tests/test_behaviour_hashes.py [--record-samples]
    torch.set_num_threads(1)
    done = {n: run(n) for n in RUNS}
    if "--record-samples" in sys.argv:
        SAMPLES.parent.mkdir(exist_ok=True)
        np.savez_compressed(SAMPLES, **{n: out.numpy() for n, (out, _) in done.items()})
    json.dump({"SKIP_COUNTS": {n: c for n, (_, c) in done.items()}, "COST": cost_json()}, sys.stdout, indent=1)
