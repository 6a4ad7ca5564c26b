"""No behaviour change across refactors, on the shipped model: the skip counts of every run (SHA-256, exact) and
`lazydit cost --json` (SHA-256), recorded before the restructure into policies; the samples themselves against
stored arrays (`data/behaviour_samples.npz`) within a float tolerance.

Why a tolerance for the samples: float results depend on the machine's kernels. The first recording hashed the
samples too, on an earlier development machine; on this AMD EPYC every sample hash differed while every skip-count hash
still matched. The arrays were recorded on the AMD machine from the same code (`python
tests/test_behaviour_hashes.py --record-samples`); the tolerance (SAMPLE_ATOL) is far above kernel rounding and far
below any change of what is computed (skipping any one module at one gated step of DDIM-10 moves the samples by
1.4e-2 to 0.74, measured).
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

from lazydit.assets import default_gates, default_model
from lazydit.lazy import ForcedPlan, LazyConfig
from lazydit.pipeline import sample

EXPECTED = {
 "samples": {
  "ddim10": "66ab9634030f03f661962c76c83b18ee15f75de904141cfbebc0221ea832c003:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
  "lazy10": "db752ffde54bc3e1650854a80bb09b8c24a9562159391d1756a629274d8f6cf6:253191076a1330c24f7524f79a9674a5c8f64ec945d8d7ebfa307a7025cb25e9",
  "lookahead50": "153a7ed932d940c67e22ca6698031926a84a1b0c03beb391a4ba0ca2836074cf:b68dd7adc82b561064904783a928461b69818e0b99a2a559be78a90858ce6136",
  "forced10": "3770e375083da2878a680a50b086d55dc92cdd7c9ed5f0c8dce93049f36c87f1:ebdfd95f69acb695324eccb11d17f283363dd11420181eb37e60b38ba63e2932",
  "forced10_rows": "c54ec7571fb74eae4b1579a761445394a3e1945f88feaec33ece03916acaa7a3:342d95834b10a8b8a04943c65cd37de57f695f2cc08ba945007245b7385eaf2d",
  "forced50_lookahead": "b0f880afc37baf78fff27421d404f37b6c8913d1d70956e500cdc0f39d233737:1d8de5bbc8bf783dfcabd77f23622de2efd0117c9beb9ec255528f453521f4a3",
  "uniform10": "9f4d9e39bc2d9124cf4d45537a21a1bba26d82017d567a38c84c5b66e7268212:4d032d46fbc97e8274b50d630da0dad120f4659fecf62d71a7f4afb442de2742",
  "tie_cfg10": "c99f8589c147634e206d476962f43dfc649bc0b1407c8fe42597dbf8850e4d97:e34adb33b86ce379c0a7165f728f6379dbf1ae8026673f9aecdfe04cd0dc987f"
 },
 "cost": "44d3b9506a9974a6427044031c392c07d32d1a47b0c6e55d03659dd9cdcb671e"
}


SAMPLES = Path(__file__).parent / "data" / "behaviour_samples.npz"
SAMPLE_ATOL = 1e-4  # samples lie in about [-1, 1]


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.detach().contiguous().cpu().numpy().tobytes()).hexdigest()


def _plan(steps, depth, rows=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    shape = (steps, depth, 2) if rows is None else (steps, depth, 2, rows)
    return torch.rand(shape, generator=g) < 0.5


def runs():
    """name -> thunk returning the digest of that run's samples and skip counts (shipped model, seed 0, CFG 2.0, 4 images)."""
    model = default_model()
    y = torch.tensor([0, 3, 5, 8])
    g10, g50la = default_gates(10), default_gates(50, lookahead=True)
    depth = g10.depth

    def run(steps, **kw):
        def go():
            """(samples, digest of the skipped counts per step/layer/branch)."""
            out, rep = sample(model, y, steps, cfg_scale=2.0, seed=0, progress=False, **kw)
            counts = rep.lazy.skipped if rep.lazy is not None else torch.zeros(0, dtype=torch.long)
            return out, _digest(counts)
        return go

    return {
        "ddim10": run(10),
        "lazy10": run(10, gates=g10),
        "lookahead50": run(50, gates=g50la),
        "forced10": run(10, policy=ForcedPlan(_plan(10, depth))),
        "forced10_rows": run(10, policy=ForcedPlan(_plan(10, depth, rows=8))),
        "forced50_lookahead": run(50, policy=ForcedPlan(_plan(50, depth, seed=1))),
        "uniform10": run(10, gates=g10, lazy=LazyConfig(uniform=True, threshold=0.7)),
        "tie_cfg10": run(10, gates=g10, lazy=LazyConfig(tie_cfg=True, threshold=0.7)),
    }


def cost_json() -> str:
    from lazydit.cli import main

    buf = io.StringIO()
    with redirect_stdout(buf):
        main(["cost", "--model", "DiT-XL/2", "--image-size", "256", "--steps", "50,25,10", "--json"])
    return hashlib.sha256(buf.getvalue().encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(EXPECTED.get("samples", {})))
def test_samples_unchanged(name):
    torch.set_num_threads(1)
    out, counts = runs()[name]()
    assert counts == EXPECTED["samples"][name].split(":")[1]  # the same modules skipped, exactly
    with np.load(SAMPLES) as f:
        ref = f[name]
    np.testing.assert_allclose(out.numpy(), ref, rtol=0, atol=SAMPLE_ATOL)


def test_recorded_every_run():
    assert sorted(EXPECTED["samples"]) == sorted(runs())


def test_cost_json_unchanged():
    assert cost_json() == EXPECTED["cost"]


if __name__ == "__main__":  # re-record: python tests/test_behaviour_hashes.py [--record-samples]
    torch.set_num_threads(1)
    done = {n: f() for n, f in runs().items()}
    if "--record-samples" in sys.argv:
        SAMPLES.parent.mkdir(exist_ok=True)
        np.savez_compressed(SAMPLES, **{n: out.numpy() for n, (out, _) in done.items()})
    out = {"samples": {n: _digest(o) + ":" + c for n, (o, c) in done.items()}, "cost": cost_json()}
    json.dump(out, sys.stdout, indent=1)
