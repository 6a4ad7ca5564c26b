"""Faults in the middle of work: NaN/Inf while sampling or training, a full disk or Ctrl-C while writing, SIGINT
of a running command, a time budget. Each leaves no output, or the previous complete one, and says so in one line.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lazydit.cli import main
from lazydit.errors import NonFiniteError
from lazydit.lazy import ForcedPlan, LazyGates
from lazydit.pipeline import sample
from lazydit.training.gates import GateTrainConfig, train_gates
from lazydit.training.pretrain import PretrainConfig, pretrain

from conftest import tiny_model
from test_cli_errors import run
from test_training import toy_data

REPO = Path(__file__).resolve().parents[1]


def overflowing(model):
    with torch.no_grad():
        model.blocks[1].mlp.fc1.weight.mul_(1e36)
    return model


def files_in(folder):
    return sorted(str(p.relative_to(folder)) for p in Path(folder).rglob("*"))


# ---------------------------------------------------------------- non-finite values


@pytest.mark.parametrize("cfg_scale", [1.0, 3.0])
def test_sampling_stops_at_the_first_non_finite_step(cfg_scale):
    model = overflowing(tiny_model())
    with pytest.raises(NonFiniteError, match="at step 1 of 4"):
        sample(model, torch.tensor([0, 1]), 4, cfg_scale=cfg_scale, progress=False)


def test_a_finite_model_samples_as_before(model):
    """The watch only reads: samples equal those of the bare sampler."""
    from lazydit.sampling.ddim import ddim_sample

    y = torch.tensor([0, 1, 2])
    x, _ = sample(model, y, 5, cfg_scale=2.0, progress=False)
    assert torch.equal(x, ddim_sample(model, y, 5, cfg_scale=2.0, progress=False))


def test_gate_training_stops_before_writing_non_finite_gates(tmp_path):
    model = overflowing(tiny_model())
    cfg = GateTrainConfig(steps=4, iters=3, batch_size=4, ckpt_every=1, out=str(tmp_path / "run"))
    with pytest.raises(NonFiniteError, match="diverged at iteration 1"):
        train_gates(model, toy_data(1), cfg, progress=False)
    assert not (tmp_path / "run").exists()  # neither a checkpoint nor a gate file


def test_gate_training_refuses_gates_made_non_finite_by_the_update(tmp_path, monkeypatch):
    """A finite loss, then an optimiser step that leaves Inf in the gates: stopped before that state is saved."""
    real_step = torch.optim.AdamW.step

    def step_to_inf(self, *a, **kw):
        real_step(self, *a, **kw)
        if self.state[self.param_groups[0]["params"][0]]["step"] == 2:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))

    monkeypatch.setattr(torch.optim.AdamW, "step", step_to_inf)
    cfg = GateTrainConfig(steps=4, iters=3, batch_size=4, ckpt_every=1, out=str(tmp_path / "run"))
    with pytest.raises(NonFiniteError, match="at iteration 2"):
        train_gates(tiny_model(), toy_data(1), cfg, progress=False)
    assert files_in(tmp_path / "run") == ["checkpoint.pt"]
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    assert state["iter"] == 1 and torch.isfinite(state["gates"]["weight"]).all()


def test_pretraining_stops_at_a_non_finite_loss(tmp_path, fake_fmnist, monkeypatch):
    from lazydit.training import pretrain as pt

    calls = []

    class NanAtThird(pt.TrainingLoss):
        def __call__(self, *a, **kw):
            calls.append(1)
            loss = super().__call__(*a, **kw)
            return loss * float("nan") if len(calls) == 3 else loss

    monkeypatch.setattr(pt, "TrainingLoss", NanAtThird)
    cfg = PretrainConfig(data=str(fake_fmnist), out=str(tmp_path / "p"), iters=5, batch_size=4, ckpt_every=2,
                         preview=False)
    with pytest.raises(NonFiniteError, match="at step 3"):
        pretrain(cfg, progress=False)
    state = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=False)
    assert state["step"] == 2  # the last finite checkpoint is kept, the NaN step never saved


# ---------------------------------------------------------------- writes that fail or are interrupted


def test_full_disk_while_writing_a_png_leaves_nothing(tmp_path, capsys, monkeypatch):
    from PIL import Image

    def full(self, fp, *a, **kw):
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full)
    code, msg = run(capsys, ["sample", "--steps", "2", "--per-class", "1", "--out", str(tmp_path / "x.png")])
    assert code == 1 and "No space left on device" in msg and "\n" not in msg
    assert files_in(tmp_path) == []


def test_ctrl_c_while_writing_keeps_the_previous_file(tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.npz"
    main(["sample", "--steps", "2", "--per-class", "1", "--out", str(out), "--json"])
    before = out.read_bytes()

    def interrupted(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(SystemExit) as e:
        main(["sample", "--steps", "3", "--per-class", "1", "--out", str(out)])
    assert e.value.code == 130 and capsys.readouterr().err.strip().splitlines()[-1] == "interrupted"
    assert out.read_bytes() == before and files_in(tmp_path) == ["x.npz"]


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    """A heat map whose write fails leaves no file (and no temporary one)."""
    import matplotlib.figure

    from lazydit.plots import laziness_heatmap

    def broken(self, fname, **kw):
        Path(fname).write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", broken)
    with pytest.raises(OSError):
        laziness_heatmap(np.zeros((4, 3, 2)), tmp_path / "h.png")
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- SIGINT of a running command


def _start(argv, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LAZYDIT_DEBUG", None)
    # SIGINT back to its default in the child: a shell starting pytest in the background (`pytest &` in a script)
    # hands it on ignored, and Python then never raises KeyboardInterrupt
    return subprocess.Popen([sys.executable, "-m", "lazydit.cli", *argv], cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _interrupt(proc):
    proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:  # it ignored the signal: do not leave it running after the test fails
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def test_sigint_while_sampling_keeps_the_previous_npz(tmp_path):
    out = tmp_path / "x.npz"
    argv = ["sample", "--steps", "4", "--per-class", "1", "--out", str(out), "--json"]
    main(argv)
    before = out.read_bytes()
    proc = _start(["sample", "--steps", "1000", "--per-class", "20", "--out", str(out)], tmp_path)
    seen = ""
    while "DDIM-1000" not in seen:  # the progress bar: sampling has begun
        ch = proc.stderr.read(1)
        assert ch, f"the command ended early: {seen}"
        seen += ch
    code, err = _interrupt(proc)
    assert code == 130 and err.replace("\r", "\n").strip().splitlines()[-1].strip() == "interrupted"
    assert "Traceback" not in err
    assert out.read_bytes() == before and files_in(tmp_path) == ["x.npz"]
    main(argv)  # the same command again: the same bytes
    assert out.read_bytes() == before


def test_sigint_while_training_gates_then_resume_is_bit_identical(tmp_path, fake_fmnist, capsys):
    common = ["train-gates", "--steps", "10", "--batch-size", "4", "--data", str(fake_fmnist), "--rho", "0.05",
              "--ckpt-every", "2", "--lr", "1e-2", "--json"]
    run_dir = tmp_path / "b"
    proc = _start([*common, "--iters", "100000", "--out", str(run_dir)], tmp_path)
    deadline = time.time() + 120
    while not (run_dir / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.5)  # well inside training, possibly inside a checkpoint write
    code, err = _interrupt(proc)
    assert code == 130 and err.strip().splitlines()[-1].strip() == "interrupted" and "Traceback" not in err
    assert files_in(run_dir) == ["checkpoint.pt"]  # no gate file, no temporary file
    done = torch.load(run_dir / "checkpoint.pt", weights_only=False)["iter"]
    iters = str(done + 2)
    main([*common, "--iters", iters, "--out", str(run_dir), "--resume"])
    main([*common, "--iters", iters, "--out", str(tmp_path / "a")])
    capsys.readouterr()
    resumed = LazyGates.load(run_dir / "gates.safetensors")
    straight = LazyGates.load(tmp_path / "a" / "gates.safetensors")
    assert torch.equal(resumed.weight, straight.weight)


# ---------------------------------------------------------------- budgets, labels, warnings


def test_max_minutes_bounds_the_previews_too(tmp_path, fake_fmnist):
    """A budget that ends at once: one step, the checkpoint and the model are saved, the preview is dropped (it
    would run past the budget); without a budget the preview is written."""
    base = dict(data=str(fake_fmnist), batch_size=4, ckpt_every=1, iters=3, model="DiT-FMNIST")
    pretrain(PretrainConfig(**base, out=str(tmp_path / "budget"), max_minutes=1e-9), progress=False)
    got = files_in(tmp_path / "budget")
    assert "checkpoint.pt" in got and "model.safetensors" in got
    assert not [f for f in got if f.startswith("preview")]
    assert torch.load(tmp_path / "budget" / "checkpoint.pt", weights_only=False)["step"] == 1
    pretrain(PretrainConfig(**{**base, "iters": 1}, out=str(tmp_path / "free")), progress=False)
    assert "preview_000001.png" in files_in(tmp_path / "free")


def test_pretrain_resume_refuses_other_settings(tmp_path, fake_fmnist):
    from lazydit.errors import UsageError

    base = dict(data=str(fake_fmnist), batch_size=4, ckpt_every=1, out=str(tmp_path / "p"), preview=False)
    pretrain(PretrainConfig(**base, iters=1), progress=False)
    before = (tmp_path / "p" / "checkpoint.pt").read_bytes()
    with pytest.raises(UsageError, match="lr: checkpoint 0.0003, now 0.001"):
        pretrain(PretrainConfig(**base, iters=2, lr=1e-3, resume=True), progress=False)
    assert (tmp_path / "p" / "checkpoint.pt").read_bytes() == before


def test_progress_bars_name_what_runs(capsys):
    model = tiny_model()
    plan = torch.zeros(4, 3, 2, dtype=torch.bool)
    sample(model, torch.tensor([0]), 4, policy=ForcedPlan(plan), progress=True)
    assert "Forced-4" in capsys.readouterr().err
    sample(model, torch.tensor([0]), 4, policy=ForcedPlan(plan), progress=True, name="Lazy-4")
    err = capsys.readouterr().err
    assert "Lazy-4" in err and "DDIM" not in err
    train_gates(model, toy_data(1), GateTrainConfig(steps=4, iters=1, batch_size=2), progress=True)
    assert "lazy@0.5=" in capsys.readouterr().err  # the skip share over all T steps, at the threshold


def test_fid_on_few_samples_warns_in_one_line(tmp_path, capsys):
    path = tmp_path / "few.npz"
    with open(path, "wb") as f:
        np.savez(f, arr_0=np.random.default_rng(0).integers(0, 256, (300, 28, 28, 1), dtype=np.uint8))
    main(["eval", "--samples", str(path), "--json"])
    out, err = capsys.readouterr()
    assert json.loads(out)[0]["n"] == 300
    warn = [ln for ln in err.splitlines() if ln.startswith("warning:")]
    assert len(warn) == 1 and "FID on 300 samples" in warn[0] and "2,000" in warn[0]
