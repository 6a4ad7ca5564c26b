"""docs/architecture.md's worked example, run as written: a policy in ~20 lines gets statistics, TMACs, the CLI."""

import json
import re
import sys
from pathlib import Path

import torch

from lazydit.cli import main
from lazydit.models.cost import sampling_macs
from lazydit.lazy import POLICIES, ForcedPlan
from lazydit.pipeline import sample

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def example_source() -> str:
    """The first python block after the 'Worked example' heading."""
    text = DOC.read_text().split("## Worked example", 1)[1]
    return re.search(r"```python\n(.*?)```", text, re.S)[1]


def load_example():
    ns = {}
    exec(compile(example_source(), str(DOC), "exec"), ns)
    return ns["EverySecondStep"]


def test_example_policy_equals_the_equivalent_forced_plan(model):
    cls = load_example()
    assert POLICIES["every-second-step"] is cls
    T, y = 10, torch.tensor([0, 1, 2, 3])
    x, rep = sample(model, y, T, policy=cls(T), cfg_scale=2.0, seed=0, progress=False)  # per_step[::-1]: by k
    # T = 10: k = 9, 7, ... compute (odd), the even steps reuse: the forced all-skip plan under the parity
    plan = torch.ones(T, len(model.blocks), 2, dtype=torch.bool)
    x_forced, rep_forced = sample(model, y, T, policy=ForcedPlan(plan), cfg_scale=2.0, seed=0, progress=False)
    assert torch.equal(x, x_forced)
    assert rep.lazy_ratio == 0.5 and rep.stats["per_step"][::-1] == [float(k % 2 == 0) for k in range(T)]
    assert rep.name == "EverySecond-10"
    assert rep.tmacs * 1e12 == sampling_macs(model.config, T, rep.lazy, overhead=0) < 0.6 * sampling_macs(model.config, T)
    _, shifted = sample(model, y, T, policy=cls(T, offset=1), cfg_scale=2.0, seed=0, progress=False)
    assert shifted.stats["per_step"][::-1] == [float(k % 2 == 1 and k != T - 1) for k in range(T)]


def test_example_policy_from_the_cli(tmp_path, monkeypatch, capsys):
    (tmp_path / "mypolicies.py").write_text(example_source())
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("mypolicies", None)
    main(["sample", "--method", "mypolicies:EverySecondStep:offset=1", "--steps", "10", "--per-class", "1",
          "--out", str(tmp_path / "s.png"), "--heatmap", str(tmp_path / "h.png"), "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["sampler"] == "EverySecond-10" and row["lazy_ratio"] == 0.4  # k = 7, 5, 3, 1 skip (k = 9 has no cache)
    assert (tmp_path / "s.png").stat().st_size > 0 and (tmp_path / "h.png").stat().st_size > 0
    main(["eval", "--method", "mypolicies:EverySecondStep", "--steps", "10", "--num-samples", "20", "--batch-size",
          "20", "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["sampler"] == "EverySecond-10" and row["lazy_ratio"] == 0.5 and row["fid"] > 0
