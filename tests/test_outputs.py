"""Outputs: `--out` only ever replaces a regular file (a device, FIFO or folder is refused and left alone, a symlink
is written through), never holds one format under another's extension, and is never the heat map's file too;
SIGTERM cleans up as Ctrl-C does (exit 143, "terminated"); SIGKILL never leaves a file that looks complete, and a
rerun completes; two runs never write one output at once (the second is refused in one line)."""

import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lazydit import cli
from lazydit.cli import main
from lazydit.errors import UsageError
from lazydit.files import atomic_write, output_lock
from lazydit.models.checkpoint import save_model

from conftest import tiny_model
from test_cli_errors import run
from test_faults import _start, files_in

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """Model files (tiny: 8 x 8, 4 classes, for `sample`; tiny28: 28 x 28, 10 classes, for what the Fashion-MNIST
    evaluator scores and train-gates) and small reference statistics (64 images: scoring in a blink)."""
    from lazydit.evaluation import features, fmnist

    d = tmp_path_factory.mktemp("assets")
    save_model(tiny_model(), d / "tiny.safetensors")
    save_model(tiny_model(input_size=28, patch_size=4, num_classes=10), d / "tiny28.safetensors")
    images = np.random.default_rng(0).integers(0, 256, (64, 28, 28, 1), dtype=np.uint8)
    features.save_reference(d / "ref.npz", features.reference_stats(fmnist.default_classifier("cpu"), images,
                                                                    progress=False))
    return d


def sample_argv(assets, out, steps=2, *extra):
    return ["sample", "--model", str(assets / "tiny.safetensors"), "--steps", str(steps), "--per-class", "1",
            "--device", "cpu", "--out", str(out), *extra]


def one_line(msg, code=1):
    return code == 1 and "\n" not in msg and "Traceback" not in msg


def _python(code, cwd):
    """A child `python -c code` with the environment of test_faults' _start (SIGINT at its default)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    env.pop("LAZYDIT_DEBUG", None)
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=120, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def _wait_for_text(proc, text):
    seen = ""
    while text not in seen:
        ch = proc.stderr.read(1)
        assert ch, f"the command ended early: {seen}"
        seen += ch


def _wait_for(proc, condition, timeout=120):
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the command ended early: {proc.communicate()[1]}")
        assert time.time() < deadline, "timed out"
        time.sleep(0.01)


def _signal(proc, sig):
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    return proc.returncode, err


def last_line(err):
    return err.replace("\r", "\n").strip().splitlines()[-1].strip()


# ---------------------------------------------------------------- only regular files are replaced


def test_a_fifo_as_out_is_refused_and_left_intact(tmp_path, capsys, assets):
    fifo = tmp_path / "o.png"
    os.mkfifo(fifo)
    code, msg = run(capsys, sample_argv(assets, fifo))
    assert one_line(msg, code) and msg == f"error: {fifo} is a FIFO, not a regular file: lazydit only replaces " \
                                           "regular files"
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and files_in(tmp_path) == ["o.png"]
    with pytest.raises(UsageError, match="is a FIFO, not a regular file"):  # the library refuses it too
        atomic_write(fifo, lambda tmp: pytest.fail("write_fn ran"))
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode) and files_in(tmp_path) == ["o.png"]


def test_a_device_as_out_is_refused_and_left_intact(tmp_path, capsys, assets):
    dev = tmp_path / "full.npz"  # a copy of /dev/full: (1, 7)
    try:
        os.mknod(dev, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except (PermissionError, OSError) as e:
        pytest.skip(f"cannot make a device node here ({e}): needs root")
    code, msg = run(capsys, sample_argv(assets, dev))
    assert one_line(msg, code) and msg == f"error: {dev} is a character device, not a regular file: lazydit only " \
                                          "replaces regular files"
    st = os.lstat(dev)
    assert stat.S_ISCHR(st.st_mode) and st.st_rdev == os.makedev(1, 7) and files_in(tmp_path) == ["full.npz"]
    with pytest.raises(UsageError, match="is a character device"):
        atomic_write(dev, lambda tmp: pytest.fail("write_fn ran"))


def test_a_symlink_out_is_written_through(tmp_path, capsys, assets):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "s.png").write_bytes(b"old")
    os.symlink("real/s.png", tmp_path / "link.png")
    os.symlink("real/new.npz", tmp_path / "dangling.npz")  # a dangling link: the file it names is written
    main(sample_argv(assets, tmp_path / "link.png", 2, "--json"))
    main(sample_argv(assets, tmp_path / "dangling.npz", 2, "--json"))
    capsys.readouterr()
    assert os.readlink(tmp_path / "link.png") == "real/s.png" and os.readlink(tmp_path / "dangling.npz") == \
        "real/new.npz"
    assert (tmp_path / "real" / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert np.load(tmp_path / "real" / "new.npz")["arr_0"].shape == (4, 8, 8, 1)
    assert files_in(tmp_path) == ["dangling.npz", "link.png", "real", "real/new.npz", "real/s.png"]  # no temp, lock


def test_an_extension_in_upper_case_writes_its_format(tmp_path, capsys, assets):
    main(sample_argv(assets, tmp_path / "S.NPZ", 2, "--json"))
    capsys.readouterr()
    assert np.load(tmp_path / "S.NPZ")["arr_0"].shape == (4, 8, 8, 1)


# ---------------------------------------------------------------- one format, its extension


def _no_work(*a, **kw):
    raise AssertionError("work began before the output was checked")


WRONG_EXTENSIONS = {
    "sample jpg": (["sample", "--out", "o.jpg"], "--out o.jpg: lazydit writes .png or .npz here"),
    "sample txt": (["sample", "--out", "o.txt"], "give a name ending in .png or .npz"),
    "sample no extension": (["sample", "--out", "outfile"], "give a name ending in .png or .npz"),
    "sample heatmap jpg": (["sample", "--method", "fora:interval=2", "--out", "s.png", "--heatmap", "h.jpg"],
                           "--heatmap h.jpg: lazydit writes .png here"),
    "eval png": (["eval", "--out", "x.png"], "--out x.png: lazydit writes .npz here"),
    "sample-ddp png": (["sample-ddp", "--out", "x.png"], "give a name ending in .npz"),
    "calibrate pt": (["calibrate", "--gates", "default", "--steps", "10", "--target-ratio", "0.3", "--out", "g.pt"],
                     "give a name ending in .safetensors"),
}


@pytest.mark.parametrize("name", sorted(WRONG_EXTENSIONS))
def test_a_wrong_extension_is_refused_before_any_work(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_model", _no_work)
    monkeypatch.setattr(cli, "_extractor_and_ref", _no_work)
    argv, expect = WRONG_EXTENSIONS[name]
    code, msg = run(capsys, [*argv, "--device", "cpu"])
    assert one_line(msg, code) and expect in msg
    assert files_in(tmp_path) == []


def test_heatmap_and_out_must_be_different_files(tmp_path, capsys, assets, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(cli, "_model", _no_work)
    os.symlink("s.png", "alias.png")
    for heatmap in ("s.png", "./s.png", str(tmp_path / "s.png"), "alias.png"):
        code, msg = run(capsys, ["sample", "--method", "fora:interval=2", "--device", "cpu", "--out", "s.png",
                                 "--heatmap", heatmap])
        assert one_line(msg, code) and msg == f"error: --heatmap {heatmap} is the same file as --out s.png: one " \
                                              "would overwrite the other; give them different names"
    assert files_in(tmp_path) == ["alias.png"]


def test_a_symlink_loop_on_the_way_is_one_line(tmp_path, capsys, assets):
    os.symlink("loop", tmp_path / "loop")
    out = tmp_path / "loop" / "x.png"
    code, msg = run(capsys, sample_argv(assets, out))
    assert one_line(msg, code) and msg == f"error: cannot write {out}: symlink loop at {tmp_path / 'loop'}"
    code, msg = run(capsys, ["compare", "ddim-3", "--device", "cpu", "--out", str(tmp_path / "loop" / "c")])
    assert one_line(msg, code) and msg.endswith(f"symlink loop at {tmp_path / 'loop'}")
    with pytest.raises(UsageError, match="symlink loop at"):
        atomic_write(out, lambda tmp: pytest.fail("write_fn ran"))
    assert files_in(tmp_path) == ["loop"]


# ---------------------------------------------------------------- SIGTERM, SIGKILL


def test_sigterm_while_sampling_exits_143_and_keeps_the_previous_npz(tmp_path, capsys, assets):
    out = tmp_path / "x.npz"
    main(sample_argv(assets, out, 2, "--json"))
    capsys.readouterr()
    before = out.read_bytes()
    proc = _start(sample_argv(assets, out, 1000, "--per-class", "20"), tmp_path)
    _wait_for_text(proc, "DDIM-1000")  # the progress bar: sampling has begun
    code, err = _signal(proc, signal.SIGTERM)
    assert code == 143 and last_line(err) == "terminated" and "Traceback" not in err
    assert out.read_bytes() == before and files_in(tmp_path) == ["x.npz"]  # no temporary file, no lock


WRITE_THEN_SIGNAL = """
import os, signal, sys, time
import numpy as np
from lazydit.cli import main

def savez(f, **arrays):  # half the file written, then the signal
    f.write(b"PK\\x03\\x04" + bytes(100000))
    os.kill(os.getpid(), signal.{sig})
    time.sleep(30)
    raise AssertionError("the signal did not end the write")

np.savez = savez
main({argv!r})
"""


def test_sigterm_while_writing_removes_the_temporary_file(tmp_path, capsys, assets):
    out = tmp_path / "x.npz"
    main(sample_argv(assets, out, 2, "--json"))
    capsys.readouterr()
    before = out.read_bytes()
    res = _python(WRITE_THEN_SIGNAL.format(sig="SIGTERM", argv=sample_argv(assets, out, 3)), tmp_path)
    assert res.returncode == 143 and last_line(res.stderr) == "terminated", res.stderr
    assert out.read_bytes() == before and files_in(tmp_path) == ["x.npz"]


def test_sigkill_while_writing_leaves_no_complete_file_and_a_rerun_cleans_up(tmp_path, capsys, assets):
    out = tmp_path / "x.npz"
    res = _python(WRITE_THEN_SIGNAL.format(sig="SIGKILL", argv=sample_argv(assets, out, 3)), tmp_path)
    assert res.returncode == -signal.SIGKILL
    left = files_in(tmp_path)
    assert "x.npz" not in left and left and all(n.startswith(".x.npz.") for n in left)  # a temporary file only
    main(sample_argv(assets, out, 3, "--json"))
    capsys.readouterr()
    assert np.load(out)["arr_0"].shape == (4, 8, 8, 1)
    assert files_in(tmp_path) == ["x.npz"]  # the killed run's temporary file and lock file are gone


def test_sigkill_in_eval_leaves_parts_and_a_rerun_completes(tmp_path, capsys, assets):
    out = tmp_path / "e.npz"
    argv = ["eval", "--model", str(assets / "tiny28.safetensors"), "--steps", "20", "--num-samples", "40",
            "--batch-size", "2", "--ref", str(assets / "ref.npz"), "--device", "cpu", "--out", str(out), "--json"]
    parts = tmp_path / "e.npz.parts"
    proc = _start(argv, tmp_path)
    _wait_for(proc, lambda: any(parts.glob("part_*.npz")))
    code, _ = _signal(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL and not out.exists()  # no file that looks complete: parts to resume from
    done = sorted(parts.glob("part_*.npz"))
    assert 0 < len(done) < 20 and (parts / "config.json").is_file()
    for p in done:
        assert np.load(p)["arr_0"].shape == (2, 28, 28, 1)
    main(argv)  # the same command: it resumes and completes
    capsys.readouterr()
    assert np.load(out)["arr_0"].shape == (40, 28, 28, 1) and files_in(tmp_path) == ["e.npz"]


def test_sigkill_in_compare_then_a_rerun_completes(tmp_path, capsys, assets):
    out = tmp_path / "cmp"
    argv = ["compare", "ddim-4", "ddim-6+fora:interval=2", "--model", str(assets / "tiny28.safetensors"),
            "--num-samples", "12", "--batch-size", "2", "--micro-batch", "2", "--ref-samples", "4",
            "--reference", "ddim-6", "--ref", str(assets / "ref.npz"), "--device", "cpu", "--out", str(out), "--json"]
    proc = _start(argv, tmp_path)
    _wait_for(proc, lambda: any((out / "rows").glob("*.parts/part_*.npz")))
    code, _ = _signal(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    assert not [f for f in files_in(out) if f.startswith("compare")]  # no report: nothing that looks complete
    main(argv)
    capsys.readouterr()
    got = files_in(out)
    assert {"compare.md", "compare.csv", "compare.json"} <= set(got)
    assert not [f for f in got if ".parts" in f or f.endswith(".tmp")] and files_in(tmp_path)[0] == "cmp"
    assert not (tmp_path / ".cmp.lock").exists()


def test_sigkill_in_train_gates_then_resume_completes(tmp_path, capsys, assets, fake_fmnist):
    run_dir = tmp_path / "run"
    common = ["train-gates", "--model", str(assets / "tiny28.safetensors"), "--steps", "4", "--batch-size", "4",
              "--data", str(fake_fmnist), "--ckpt-every", "1", "--device", "cpu", "--out", str(run_dir), "--json"]
    proc = _start([*common, "--iters", "100000"], tmp_path)
    _wait_for(proc, lambda: (run_dir / "checkpoint.pt").exists())
    time.sleep(0.3)  # inside training, possibly inside a checkpoint write
    code, _ = _signal(proc, signal.SIGKILL)
    assert code == -signal.SIGKILL
    left = files_in(run_dir)
    assert "gates.safetensors" not in left and "checkpoint.pt" in left
    assert all(f == "checkpoint.pt" or f.startswith(".checkpoint.pt.") for f in left)  # at most a temporary file
    done = torch.load(run_dir / "checkpoint.pt", weights_only=False)["iter"]
    main([*common, "--iters", str(done + 1), "--resume"])
    capsys.readouterr()
    assert files_in(run_dir) == ["checkpoint.pt", "gates.safetensors"]  # the killed write's temporary file is gone
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fmnist", "run"]  # no lock file


# ---------------------------------------------------------------- one run per output


def test_two_runs_writing_one_out_the_second_is_refused(tmp_path, capsys, assets):
    out = tmp_path / "x.npz"
    os.symlink("x.npz", tmp_path / "alias.npz")
    proc = _start(sample_argv(assets, out, 1000, "--per-class", "20"), tmp_path)
    try:
        _wait_for_text(proc, "DDIM-1000")
        for name in (out, tmp_path / "alias.npz"):  # another name for the same file: the same lock
            code, msg = run(capsys, sample_argv(assets, name))
            assert one_line(msg, code) and msg == f"error: another lazydit run is writing {name}: wait for it to " \
                                                  "end, or choose another output"
        assert sorted(os.listdir(tmp_path)) == [".x.npz.lock", "alias.npz"]  # the first run's lock, nothing else
    finally:
        code, err = _signal(proc, signal.SIGTERM)
    assert code == 143 and sorted(os.listdir(tmp_path)) == ["alias.npz"]


def test_output_lock_is_exclusive_and_leaves_nothing(tmp_path):
    target = tmp_path / "new" / "deeper" / "run"
    with output_lock(target):
        assert (tmp_path / "new" / "deeper" / ".run.lock").exists()
        with pytest.raises(UsageError, match=f"another lazydit run is writing {target}"):
            with output_lock(tmp_path / "new" / "." / "deeper" / "run"):
                pass
    assert files_in(tmp_path) == []  # the lock file and the folders made for it are gone
