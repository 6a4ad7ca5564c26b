"""Bad input ends in one clear line and a non-zero exit, before any work, and leaves no output behind."""

import pytest

from lazydit.cli import main
from lazydit.lazy.gates import LazyGates
from lazydit.models.checkpoint import save_model

from conftest import tiny_model


def run(capsys, argv):
    """(exit code, the stderr/exit message) of `lazydit argv`."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    code = e.value.code
    msg = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    return (1 if isinstance(code, str) else code), msg


def nan_model(tmp_path):
    m = tiny_model()
    with __import__("torch").no_grad():
        m.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    save_model(m, tmp_path / "nan.safetensors")
    return tmp_path / "nan.safetensors"


CASES = {
    "per-class 0": (["sample", "--per-class", "0"], "at least 1"),
    "per-class -2": (["sample", "--per-class", "-2"], "at least 1"),
    "threshold 2": (["sample", "--gates", "default", "--threshold", "2"], "between 0 and 1"),
    "threshold -1": (["sample", "--gates", "default", "--threshold", "-1"], "between 0 and 1"),
    "cfg nan": (["sample", "--cfg", "nan"], "finite"),
    "labels a": (["sample", "--labels", "a"], "comma-separated class numbers"),
    "labels empty": (["sample", "--labels", ""], "--labels is empty"),
    "labels out of range": (["sample", "--labels", "10"], "labels must be in [0, 10)"),
    "eval batch 0": (["eval", "--batch-size", "0"], "at least 1"),
    "eval num-samples -5": (["eval", "--num-samples", "-5"], "at least 1"),
    "train-gates iters 0": (["train-gates", "--steps", "10", "--iters", "0"], "at least 1"),
    "train-gates ckpt-every 0": (["train-gates", "--steps", "10", "--ckpt-every", "0"], "at least 1"),
    "micro-batch 0": (["eval", "--micro-batch", "0"], "at least 1"),
    "calibrate target -1": (["calibrate", "--gates", "default", "--steps", "50", "--target-ratio", "-1"], "between 0 and 1"),
    "heatmap without gates": (["sample", "--heatmap", "{tmp}/h.png", "--out", "{tmp}/s.png"], "--gates or --method"),
    "report without json": (["sample", "--gates", "default", "--report", "--out", "{tmp}/s.png"], "--json"),
    "out is a folder": (["sample", "--out", "{tmp}"], "is a folder"),
    "out under a file": (["sample", "--out", "{tmp}/file.txt/x.npz"], "is a file"),
    "unknown method": (["sample", "--method", "nothing-like-it", "--out", "{tmp}/s.png"], "unknown method"),
    "gates and method": (["sample", "--gates", "default", "--method", "x:Y", "--out", "{tmp}/s.png"], "not both"),
    "random bytes model": (["sample", "--model", "{tmp}/junk.safetensors", "--out", "{tmp}/s.png"], "junk.safetensors"),
    "nan weights": (["sample", "--model", "{nan}", "--out", "{tmp}/s.png"], "non-finite"),
    "nan gates": (["sample", "--gates", "{nangates}", "--steps", "50", "--out", "{tmp}/s.png"], "non-finite"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_before_any_work(name, tmp_path, capsys):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    g = LazyGates(6, 192, 50)
    g.weight.data[0, 0, 0, 0] = float("inf")
    g.save(tmp_path / "nan_gates.safetensors")
    argv, expect = CASES[name]
    fill = dict(tmp=tmp_path, nan=nan_model(tmp_path) if "{nan}" in argv else "", nangates=tmp_path / "nan_gates.safetensors")
    before = sorted(p.name for p in tmp_path.iterdir())
    code, msg = run(capsys, [a.format(**fill) for a in argv])
    assert code != 0
    assert expect in msg and "\n" not in msg and "Traceback" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


def test_disk_full_while_writing_leaves_no_partial_file(tmp_path, capsys, monkeypatch):
    import numpy as np

    def full(f, **arrays):
        f.write(b"PK\x03\x04 partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "savez", full)
    code, msg = run(capsys, ["sample", "--steps", "2", "--per-class", "1", "--out", str(tmp_path / "x.npz")])
    assert code == 1 and "No space left on device" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # neither x.npz nor a temporary file


def test_cost_of_the_default_model(capsys):
    import json

    main(["cost", "--model", "default", "--steps", "50", "--json"])
    row = json.loads(capsys.readouterr().out)[0]
    assert row["model"] == "DiT-FMNIST" and row["image_size"] == 28 and row["tmacs"] == 0.006592
