"""A caching policy written outside the package, named `module:Class`, runs everywhere a method does: `sample`,
`eval`, `compare` (calibrated to a target ratio by the one calibrator) and the row engine of the paper table."""

import json
import sys

import pytest

from lazydit.cli import main

POLICY = '''
import torch
from lazydit.lazy.policies import Calibration, Policy


class ShallowSkip(Policy):
    """Every second sampling step, the branches of the blocks shallower than `threshold` (a share of the depth)
    reuse their last output: the lazy ratio rises with the threshold."""

    label = "Shallow"
    calibration = Calibration("logit", -8.0, 8.0)

    def __init__(self, steps, config=None, threshold=0.5):
        super().__init__(steps, config)
        self.threshold = float(threshold)

    def compute_rows(self, hook, k, z):
        depth = len(hook.run.hooks) // hook.run.num_branches
        if (self.steps - 1 - k) % 2 == 0 or (hook.layer + 0.5) / depth >= self.threshold:
            return None
        return torch.zeros(hook.cache.shape[0], dtype=torch.bool)
'''


@pytest.fixture
def policy_module(tmp_path, monkeypatch):
    (tmp_path / "shallow_policy.py").write_text(POLICY)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("shallow_policy", None)
    return "shallow_policy:ShallowSkip"


def test_sample_and_eval_take_a_policy_by_module_path(policy_module, tmp_path, capsys):
    main(["sample", "--method", f"{policy_module}:threshold=0.5", "--steps", "10", "--per-class", "1",
          "--out", str(tmp_path / "s.png"), "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    # 6 blocks of the default model, 3 below half the depth; sampling steps 1, 3, 5, 7, 9 reuse: 3/6 * 5/10
    assert row["sampler"] == "Shallow-10" and row["lazy_ratio"] == 0.25
    main(["eval", "--method", f"{policy_module}:threshold=0.2", "--steps", "10", "--num-samples", "8",
          "--batch-size", "8", "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["lazy_ratio"] == round(1 / 12, 4) and row["fid"] > 0  # 1 block of 6 below 0.2


def test_compare_calibrates_a_policy_of_your_own(policy_module, tmp_path, capsys):
    spec = f"ddim-10+{policy_module}:target=0.333"
    main(["compare", "ddim-5", spec, "--num-samples", "8", "--batch-size", "8", "--out", str(tmp_path / "c"),
          "--json"])
    rows = {r["config"]: r for r in json.loads(capsys.readouterr().out)}
    mine = rows[spec]
    assert abs(mine["lazy_ratio"] - 1 / 3) < 0.01  # 4 of 6 blocks on every second step
    assert 3.5 / 6 <= mine["threshold"] < 4.5 / 6  # the bisection landed between the depths that give it
    assert rows["ddim-5"]["lazy_ratio"] == 0


def test_the_row_engine_runs_it_as_the_paper_table_does(policy_module, tmp_path):
    from lazydit.evaluation import rows
    from lazydit.evaluation.fmnist import default_classifier, default_reference
    from lazydit.loading import load_model

    model = load_model("default")
    settings = rows.RowSettings(num_samples=8, batch_size=8, micro_batch=None, calib_per_class=1)
    rec = rows.run_row(rows.parse_spec(f"ddim-10+{policy_module}:target=0.166"), model, default_classifier(),
                       default_reference(), settings, tmp_path, progress=False, name="Shallow-10@17")
    assert rec["sampler"] == "Shallow-10@17" and abs(rec["lazy_ratio"] - 1 / 6) < 0.01
    assert rec["target"] == 0.166 and abs(rec["calibration_ratio"] - 1 / 6) < 0.01
    assert (tmp_path / "Shallow-10@17.npz").exists() and rec["family"] == policy_module


def test_a_policy_without_a_threshold_says_it_cannot_be_calibrated(tmp_path, capsys):
    code = None
    try:
        main(["compare", "ddim-10+fora:interval=2,target=0.4", "--num-samples", "8", "--out", str(tmp_path / "c")])
    except SystemExit as e:
        code = e.code
    assert isinstance(code, str) and "FORA has no threshold to calibrate" in code and "\n" not in code
