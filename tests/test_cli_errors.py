"""Bad input ends in one clear line and a non-zero exit, before any work, and leaves no output behind."""

import re

import numpy as np
import pytest
import torch

from lazydit.cli import main
from lazydit.lazy.gates import LazyGates
from lazydit.models.checkpoint import save_model

from conftest import tiny_model


def run(capsys, argv):
    """(exit code, the whole stderr/exit message) of `lazydit argv`, progress bars removed."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in argv])
    code = e.value.code
    err = capsys.readouterr().err
    if isinstance(code, str):  # sys.exit("error: ...")
        err, code = err + code, 1
    lines = [ln.strip() for ln in err.replace("\r", "\n").splitlines()]
    lines = [ln for ln in lines if ln and not re.search(r"\|.*\[\d\d:\d\d", ln)]  # tqdm's bars
    return code, "\n".join(lines)


def nan_model(tmp_path):
    m = tiny_model()
    with torch.no_grad():
        m.blocks[0].attn.qkv.weight[0, 0] = float("nan")
    save_model(m, tmp_path / "nan.safetensors")
    return tmp_path / "nan.safetensors"


def huge_model(tmp_path):
    """Finite weights (they pass the load check) whose activations overflow to Inf / NaN while sampling."""
    m = tiny_model()
    with torch.no_grad():
        m.blocks[1].mlp.fc1.weight.mul_(1e36)
    save_model(m, tmp_path / "huge.safetensors")
    return tmp_path / "huge.safetensors"


def inputs(tmp_path):
    """The bad files the cases name, made in tmp_path (before the listing of what is there)."""
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "junk.safetensors").write_bytes(b"\x00\x01not a safetensors file" * 10)
    g = LazyGates(6, 192, 50)
    g.weight.data[0, 0, 0, 0] = float("inf")
    g.save(tmp_path / "nan_gates.safetensors")
    nan_model(tmp_path)
    huge_model(tmp_path)
    whole = (tmp_path / "huge.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(whole[: len(whole) // 2])
    torch.save(tiny_model().state_dict(), tmp_path / "flat.pt")
    with open(tmp_path / "ok.npz", "wb") as f:
        np.savez(f, arr_0=np.zeros((300, 28, 28, 1), np.uint8))
    (tmp_path / "trunc.npz").write_bytes((tmp_path / "ok.npz").read_bytes()[:5000])


CASES = {
    # ranges and parsing, refused by the parser (exit 2)
    "per-class 0": (["sample", "--per-class", "0"], "at least 1"),
    "per-class -2": (["sample", "--per-class", "-2"], "at least 1"),
    "threshold 2": (["sample", "--gates", "default", "--threshold", "2"], "between 0 and 1"),
    "threshold -1": (["sample", "--gates", "default", "--threshold", "-1"], "between 0 and 1"),
    "cfg nan": (["sample", "--cfg", "nan"], "finite"),
    "steps 1001": (["sample", "--steps", "1001"], "at most 1000"),
    "cost steps a": (["cost", "--steps", "50,a"], "expected a whole number, got 'a'"),
    "eval batch 0": (["eval", "--batch-size", "0"], "at least 1"),
    "eval num-samples -5": (["eval", "--num-samples", "-5"], "at least 1"),
    "eval num-samples 0": (["eval", "--num-samples", "0"], "at least 1"),
    "micro-batch 0": (["eval", "--micro-batch", "0"], "at least 1"),
    "train-gates iters 0": (["train-gates", "--steps", "10", "--iters", "0"], "at least 1"),
    "train-gates batch 0": (["train-gates", "--steps", "10", "--batch-size", "0"], "at least 1"),
    "train-gates ckpt-every 0": (["train-gates", "--steps", "10", "--ckpt-every", "0"], "at least 1"),
    "train-gates lr nan": (["train-gates", "--steps", "10", "--lr", "nan"], "finite number in (0, inf)"),
    "train-gates rho -1": (["train-gates", "--steps", "10", "--rho", "-1"], "in [0, inf)"),
    "pretrain max-minutes 0": (["pretrain", "--max-minutes", "0"], "in (0, inf)"),
    "pretrain ema-decay 1": (["pretrain", "--ema-decay", "1"], "in [0, 1)"),
    "calibrate target -1": (["calibrate", "--gates", "default", "--steps", "50", "--target-ratio", "-1"],
                            "between 0 and 1"),
    "unknown command": (["nothing-like-it"], "invalid choice"),
    # refused before any work (exit 1)
    "labels a": (["sample", "--labels", "a"], "comma-separated class numbers"),
    "labels empty": (["sample", "--labels", ""], "--labels is empty"),
    "labels out of range": (["sample", "--labels", "10"], "labels must be in [0, 10)"),
    "device foo": (["sample", "--device", "foo", "--out", "{tmp}/s.png"], "not a torch device"),
    "heatmap without gates": (["sample", "--heatmap", "{tmp}/h.png", "--out", "{tmp}/s.png"], "--gates or --method"),
    "report without json": (["sample", "--gates", "default", "--report", "--out", "{tmp}/s.png"], "--json"),
    "out is a folder": (["sample", "--out", "{tmp}"], "is a folder"),
    "out under a file": (["sample", "--out", "{tmp}/file.txt/x.npz"], "is a file"),
    "demo out is a file": (["demo", "--out", "{tmp}/file.txt"], "is a file"),
    "unknown method": (["sample", "--method", "nothing-like-it", "--out", "{tmp}/s.png"], "unknown method"),
    "train-gates target past the parity cap": (["train-gates", "--steps", "10", "--target-ratio", "0.9",
                                                "--out", "{tmp}/run"], "caps the lazy ratio at 0.5"),
    "calibrate target past the parity cap": (["calibrate", "--gates", "default", "--steps", "50", "--target-ratio",
                                              "0.7", "--out", "{tmp}/c.safetensors"], "caps the lazy ratio at 0.5"),
    "gates and method": (["sample", "--gates", "default", "--method", "x:Y", "--out", "{tmp}/s.png"], "not both"),
    "calibrate without out": (["calibrate", "--gates", "default", "--steps", "50", "--target-ratio", "0.3"],
                              "--out FILE"),
    "calibrate shipped in place": (["calibrate", "--gates", "default", "--steps", "50", "--target-ratio", "0.3",
                                    "--in-place"], "not the shipped gates"),
    "calibrate default without steps": (["calibrate", "--gates", "default", "--target-ratio", "0.3", "--out",
                                         "{tmp}/c.safetensors"], "--steps T"),
    "no shipped gates for T": (["sample", "--gates", "default", "--steps", "30", "--out", "{tmp}/s.png"], "not 30"),
    # bad files, refused on load (exit 1)
    "random bytes model": (["sample", "--model", "{tmp}/junk.safetensors", "--out", "{tmp}/s.png"], "junk.safetensors"),
    "truncated model": (["sample", "--model", "{tmp}/trunc.safetensors", "--out", "{tmp}/s.png"], "trunc.safetensors"),
    "pt without config": (["sample", "--model", "{tmp}/flat.pt", "--out", "{tmp}/s.png"], "--model-name"),
    "missing model": (["sample", "--model", "{tmp}/nope.safetensors", "--out", "{tmp}/s.png"], "nope.safetensors"),
    "nan weights": (["sample", "--model", "{tmp}/nan.safetensors", "--out", "{tmp}/s.png"], "non-finite"),
    "nan weights (eval)": (["eval", "--model", "{tmp}/nan.safetensors", "--num-samples", "8", "--out",
                            "{tmp}/e.npz"], "non-finite"),
    "nan weights (train-gates)": (["train-gates", "--model", "{tmp}/nan.safetensors", "--steps", "4", "--data-free",
                                   "--out", "{tmp}/run"], "non-finite"),
    "nan gates": (["sample", "--gates", "{tmp}/nan_gates.safetensors", "--steps", "50", "--out", "{tmp}/s.png"],
                  "non-finite"),
    "text file as samples": (["eval", "--samples", "{tmp}/file.txt"], "not an .npz file"),
    "truncated samples": (["eval", "--samples", "{tmp}/trunc.npz"], "not a readable ADM sample batch"),
    # non-finite while sampling: found before anything is written (exit 1)
    "overflowing model (sample)": (["sample", "--model", "{tmp}/huge.safetensors", "--steps", "3",
                                    "--out", "{tmp}/s.npz"], "NaN or Inf at step 1 of 3"),
    "overflowing model (sample-ddp)": (["sample-ddp", "--model", "{tmp}/huge.safetensors", "--steps", "3",
                                        "--num-samples", "4", "--batch-size", "4", "--out", "{tmp}/d.npz"],
                                       "NaN or Inf"),
    "overflowing model (eval)": (["eval", "--model", "{tmp}/huge.safetensors", "--steps", "3", "--num-samples", "8",
                                  "--out", "{tmp}/e.npz"], "NaN or Inf"),
    # the comparison harness, samplers, methods and diffusers inputs
    "compare bad config": (["compare", "ddim-4", "euler-4", "--out", "{tmp}/c"], "expected SAMPLER-T"),
    "compare bad option": (["compare", "ddim-4+fora:interval=0", "--out", "{tmp}/c"], "interval must be"),
    "compare gates for another T": (["compare", "ddim-4+lazy:gates=default,target=0.5", "--out", "{tmp}/c"],
                                   "not 4"),
    "compare out is a file": (["compare", "ddim-4", "--out", "{tmp}/file.txt"], "is a file"),
    "sampler unknown": (["sample", "--sampler", "euler", "--out", "{tmp}/s.png"], "invalid choice"),
    "method option bad": (["sample", "--method", "taylorseer:order=-1", "--out", "{tmp}/s.png"], "order must be"),
    "teacache bad coefficients": (["sample", "--method", "teacache:coefficients=a/b", "--out", "{tmp}/s.png"],
                                  "coefficients must be numbers"),
    "scheduler folder without config": (["train-gates", "--steps", "4", "--data-free", "--scheduler", "{tmp}",
                                         "--out", "{tmp}/run"], "no scheduler_config.json"),
    "captions for a DiT": (["train-gates", "--steps", "4", "--data-free", "--captions", "{tmp}/file.txt",
                            "--out", "{tmp}/run"], "captions"),
}
if not torch.cuda.is_available():
    CASES["device cuda without a GPU"] = (["sample", "--device", "cuda", "--out", "{tmp}/s.png"], "sees no CUDA GPU")


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_is_one_line_before_any_work(name, tmp_path, capsys, monkeypatch):
    inputs(tmp_path)
    monkeypatch.chdir(tmp_path)  # nothing may appear in the working folder either
    argv, expect = CASES[name]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    code, msg = run(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert code in (1, 2)  # 2: refused by the parser, 1: refused by the library
    assert expect in msg and "\n" not in msg and "Traceback" not in msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == []  # no run or parts folder either


def test_the_matrix_covers_enough_cases():
    assert len(CASES) >= 30


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
    # the shipped latent DiT: 4x14x14 latents of 28x28 images, the same MACs per step as the pixel model it replaced
    assert row["model"] == "DiT-FMNIST-Latent" and row["image_size"] == 28 and row["tmacs"] == 0.006592
