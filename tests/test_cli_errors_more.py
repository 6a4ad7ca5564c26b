"""Bad input, round two: hostile or damaged files, options that would be ignored, values past their range. Each
ends in one line with no traceback, the exit status the README promises (2: an option out of range, 1: anything
else), and nothing written."""

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

from lazydit.assets import ASSETS, DEFAULT_AUTOENCODER

from test_cli_errors import run

SHIPPED_T50 = ASSETS / "fmnist_gates_T50.safetensors"


def gate_variant(path, **fields):
    """The shipped T=50 gate file with some header fields replaced (JSON values, or raw strings with raw=...)."""
    with safe_open(str(SHIPPED_T50), "pt") as f:
        header, weight = dict(f.metadata()), f.get_tensor("weight")
    raw = fields.pop("raw", {})
    header.update({k: json.dumps(v) for k, v in fields.items()}, **raw)
    save_file({"weight": weight}, str(path), metadata=header)


def inputs(tmp_path):
    gate_variant(tmp_path / "th_nan.safetensors", threshold=float("nan"))
    gate_variant(tmp_path / "th_2.safetensors", threshold=2)
    gate_variant(tmp_path / "th_list.safetensors", threshold=[0.5])
    gate_variant(tmp_path / "parity_no.safetensors", parity="no")
    gate_variant(tmp_path / "not_json.safetensors", raw={"steps": "fifty"})
    (tmp_path / "trunc_gates.safetensors").write_bytes(SHIPPED_T50.read_bytes()[:3000])
    (tmp_path / "text.npz").write_text("hello")
    (tmp_path / "text.pt").write_text("hello")
    np.savez(tmp_path / "wrong_keys.npz", foo=np.zeros(3))
    np.savez(tmp_path / "ok.npz", arr_0=np.zeros((16, 28, 28, 1), np.uint8))
    np.savez(tmp_path / "one.npz", arr_0=np.zeros((1, 28, 28, 1), np.uint8))
    (tmp_path / "corrupt").mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / "corrupt" / name).write_bytes(b"\x00\x00\x08\x03garbage")
    (tmp_path / "empty").mkdir()


def _folders(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir() if p.is_dir())


P = 2  # refused by the parser, or an option's value out of range
L = 1  # refused by the library
CASES = {
    # values past their range
    "steps 0": (["sample", "--steps", "0"], P, "must be at least 1"),
    "steps -5": (["sample", "--steps", "-5"], P, "must be at least 1"),
    "steps 100000": (["sample", "--steps", "100000"], P, "at most 1000"),
    "cfg -1": (["sample", "--cfg", "-1"], P, ">= 0 (1: no guidance)"),
    "max-skips -1": (["sample", "--max-skips", "-1"], P, "at least 0"),
    "forecast 3": (["sample", "--forecast", "3"], P, "invalid choice: 3"),
    "seed past 64 bits": (["sample", "--seed", str(2**70)], P, "--seed: must be at most"),
    "seed -1": (["sample", "--seed", "-1"], P, "--seed: must be at least 0"),
    "demo per-class 0": (["demo", "--per-class", "0"], P, "at least 1"),
    "sample-ddp num-samples 0": (["sample-ddp", "--num-samples", "0"], P, "at least 1"),
    "compare num-samples 0": (["compare", "ddim-4", "--num-samples", "0"], P, "at least 1"),
    "method interval 0 (sample)": (["sample", "--method", "fora:interval=0", "--out", "{tmp}/s.png"], P,
                                   "interval must be an integer >= 1"),
    "method order -1 (eval)": (["eval", "--method", "taylorseer:order=-1", "--num-samples", "8"], P,
                               "order must be an integer >= 0"),
    "method threshold nan": (["sample", "--method", "fbcache:threshold=nan", "--out", "{tmp}/s.png"], P,
                             "threshold must be a finite number >= 0"),
    "method range (compare)": (["compare", "ddim-4+fora:interval=0", "--out", "{tmp}/c"], P, "interval must be"),
    "method empty": (["sample", "--method", "", "--out", "{tmp}/s.png"], P, "--method is empty"),
    "labels 10": (["sample", "--labels", "10", "--out", "{tmp}/s.png"], L, "labels must be in [0, 10)"),
    "labels -1": (["sample", "--labels", "-1", "--out", "{tmp}/s.png"], L, "labels must be in [0, 10)"),
    "device meta": (["sample", "--device", "meta", "--out", "{tmp}/s.png"], L, "cpu, cuda[:N] or mps"),
    # gate files whose header lies
    "gate threshold NaN": (["sample", "--gates", "{tmp}/th_nan.safetensors", "--steps", "50", "--out", "{tmp}/s.png"],
                           L, "th_nan.safetensors: threshold nan is not a number in [0, 1]"),
    "gate threshold 2": (["sample", "--gates", "{tmp}/th_2.safetensors", "--steps", "50", "--out", "{tmp}/s.png"],
                         L, "threshold 2 is not a number in [0, 1]"),
    "gate threshold a list": (["sample", "--gates", "{tmp}/th_list.safetensors", "--steps", "50", "--out",
                               "{tmp}/s.png"], L, "threshold [0.5] is not a number"),
    "gate parity 'no'": (["sample", "--gates", "{tmp}/parity_no.safetensors", "--steps", "50", "--out",
                          "{tmp}/s.png"], L, "metadata 'parity' is 'no', not true or false"),
    "gate header not JSON": (["sample", "--gates", "{tmp}/not_json.safetensors", "--steps", "50", "--out",
                              "{tmp}/s.png"], L, "not_json.safetensors: metadata 'steps' is not JSON"),
    "gate file truncated": (["sample", "--gates", "{tmp}/trunc_gates.safetensors", "--steps", "50", "--out",
                             "{tmp}/s.png"], L, "trunc_gates.safetensors: not a lazydit gate file"),
    "calibrate a damaged gate file": (["calibrate", "--gates", "{tmp}/th_nan.safetensors", "--target-ratio", "0.3",
                                       "--out", "{tmp}/c.safetensors"], L, "threshold nan"),
    "a model file as --gates": (["sample", "--gates", str(ASSETS / "fmnist_dit.safetensors"), "--steps", "50",
                                 "--out", "{tmp}/s.png"], L, "not a lazydit gate file"),
    # options that would be ignored, outputs that would clobber shipped files
    "eval --samples with sampling options": (["eval", "--samples", "{tmp}/ok.npz", "--gates", "default", "--cfg",
                                              "4"], L, "--cfg, --gates would be ignored"),
    "eval --samples with --method": (["eval", "--samples", "{tmp}/ok.npz", "--method", "fora:interval=2"], L,
                                     "--method would be ignored"),
    "eval num-samples 1": (["eval", "--num-samples", "1"], L, "at least 4 samples"),
    "calibrate --out the shipped file": (["calibrate", "--gates", "default", "--steps", "50", "--target-ratio", "0.3",
                                          "--out", str(SHIPPED_T50)], L, "is a file shipped with lazydit"),
    "calibrate --in-place on the shipped file's path": (["calibrate", "--gates", str(SHIPPED_T50), "--target-ratio",
                                                         "0.3", "--in-place"], L, "not the shipped gates"),
    # files of the wrong kind
    "eval --ref a text file": (["eval", "--ref", "{tmp}/text.npz", "--num-samples", "8"], L,
                               "text.npz: not an .npz file"),
    "eval --ref an npz with other keys": (["eval", "--ref", "{tmp}/wrong_keys.npz", "--num-samples", "8"], L,
                                          "not a lazydit reference-statistics file"),
    "--model a text .pt": (["sample", "--model", "{tmp}/text.pt", "--out", "{tmp}/s.png"], L,
                           "text.pt: not a PyTorch checkpoint torch can read safely"),
    "--model the autoencoder": (["sample", "--model", str(DEFAULT_AUTOENCODER), "--out", "{tmp}/s.png"], L,
                                "is an autoencoder (lazydit train-autoencoder), not a DiT"),
    "train-gates --data corrupt IDX": (["train-gates", "--steps", "10", "--data", "{tmp}/corrupt", "--out",
                                        "{tmp}/run"], L, "train-images-idx3-ubyte: truncated IDX header"),
    "train-gates --data an empty folder": (["train-gates", "--steps", "10", "--data", "{tmp}/empty", "--out",
                                            "{tmp}/run"], L, "DIR holding train-images-idx3-ubyte and train-labels-idx1-ubyte"),
    "unicode model path": (["sample", "--model", "{tmp}/ünïcode/モデル.safetensors", "--out", "{tmp}/s.png"], L,
                           "モデル.safetensors: no such file or folder"),
    "a file name past the file system's limit": (["sample", "--out", "{tmp}/" + "a" * 300 + ".png"], L,
                                                 "is too long here"),
    "a legal name its temporary file would overflow": (["sample", "--out", "{tmp}/" + "b" * 246 + ".png"], L,
                                                         "at most 240: the temporary file beside it adds 15"),
    "--out in the shipped assets": (["sample", "--out", str(ASSETS / "fmnist_test_ref.npz")], L,
                                    "is inside lazydit's shipped assets"),
    "eval --out in the shipped assets": (["eval", "--num-samples", "8", "--out", str(ASSETS / "x.npz")], L,
                                         "is inside lazydit's shipped assets"),
    "--scale past 16": (["sample", "--scale", "100000"], P, "at most 16"),
    "a gate file as --model": (["sample", "--model", str(SHIPPED_T50), "--out", "{tmp}/s.png"], L,
                               "is a gate file (lazydit train-gates), not a DiT"),
    "pretrain --resume without a checkpoint": (["pretrain", "--resume", "--out", "{tmp}/new"], L,
                                               "--resume: no checkpoint at"),
    "train-autoencoder --resume without a checkpoint": (["train-autoencoder", "--resume", "--out", "{tmp}/new"], L,
                                                        "--resume: no checkpoint at"),
    "method option unknown": (["sample", "--method", "fora:foo=1", "--out", "{tmp}/s.png"], L,
                              "fora takes interval= (not foo=)"),
    "compare the same configuration twice": (["compare", "ddim-2", "ddim-2", "--out", "{tmp}/c"], L,
                                             "ddim-2 is given twice"),
    "eval --samples with 1 image": (["eval", "--samples", "{tmp}/one.npz"], L, "at least 4 samples"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_round_two(name, tmp_path, capsys, monkeypatch):
    inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    argv, code_expected, expect = CASES[name]
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    folders = _folders(tmp_path)
    shipped = SHIPPED_T50.read_bytes()
    code, msg = run(capsys, [a.format(tmp=tmp_path) for a in argv])
    assert code == code_expected, msg
    assert expect in msg and "\n" not in msg and "Traceback" not in msg, msg
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing written
    assert _folders(tmp_path) == folders  # no run or parts folder either
    assert SHIPPED_T50.read_bytes() == shipped


def test_the_second_matrix_covers_enough_cases():
    assert len(CASES) >= 30


def test_a_gate_file_with_a_sane_header_still_loads(tmp_path):
    """The header checks refuse only what is wrong: the shipped values, rewritten, load as before."""
    from lazydit.lazy.gates import LazyGates

    gate_variant(tmp_path / "same.safetensors", threshold=0.25, parity=True)
    g = LazyGates.load(tmp_path / "same.safetensors")
    assert g.threshold == 0.25 and g.parity is True and g.steps == 50
