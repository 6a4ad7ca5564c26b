"""The README as a newcomer reads it: every ```python block runs as written (placeholders such as PIPELINE or
CHECKPOINT get tiny stand-ins made here), and every dotted name `lazydit.x.y` that the README or a string in
src/lazydit (messages, help, docstrings) names exists."""

import ast
import builtins
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
SRC = ROOT / "src" / "lazydit"
DOTTED = re.compile(r"(?<![\w./-])lazydit(?:\.[A-Za-z_]\w*)+")  # not ".lazydit.lock", "my-lazydit.x", a/lazydit.y
PLACEHOLDERS = {"CHECKPOINT", "GATES", "PIPELINE", "STEPS", "ITERS"}  # what the fixtures below provide


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python[ \t]*\n(.*?)^```", text, flags=re.M | re.S)


BLOCKS = python_blocks(README.read_text())


def placeholders(code: str) -> set[str]:
    """ALL-CAPS names a snippet reads but never assigns or imports: the ones the reader fills in."""
    tree = ast.parse(code)
    bound = {a.asname or a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))
             for a in n.names}
    bound |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    return {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)
            and n.id.isupper() and n.id not in bound and not hasattr(builtins, n.id)}


def test_readme_has_its_snippets():
    # the extraction itself: a README without python blocks (or a broken fence pattern) must not pass quietly
    assert len(BLOCKS) >= 3, f"expected at least 3 ```python blocks in README.md, found {len(BLOCKS)}"
    assert any("load_default()" in b for b in BLOCKS), "the offline snippet on the embedded default is missing"
    for code in BLOCKS:
        assert placeholders(code) <= PLACEHOLDERS, f"a README snippet reads {placeholders(code) - PLACEHOLDERS}, " \
                                                    "which tests/test_readme.py does not provide"


def _dit_files(tmp_path) -> dict:
    """CHECKPOINT: a tiny random DiT file (1000 classes, as DiT-XL/2's labels) and GATES: gate file made for it."""
    from lazydit.lazy import LazyGates
    from lazydit.models.checkpoint import save_model

    model = tiny_model(num_classes=1000, in_channels=4)
    save_model(model, tmp_path / "tiny-dit.safetensors")
    gates = LazyGates.for_model(model, steps=4)
    torch.manual_seed(0)
    with torch.no_grad():  # random gates, so that some modules are skipped
        for p in gates.parameters():
            p.normal_(0, 0.5)
    gates.save(tmp_path / "gates_T4.safetensors")
    return {"CHECKPOINT": str(tmp_path / "tiny-dit.safetensors"), "GATES": str(tmp_path / "gates_T4.safetensors")}


def _pipeline_folder(tmp_path, monkeypatch) -> dict:
    """PIPELINE: a tiny random DiTPipeline saved to a folder (as tests/test_diffusers.py builds them)."""
    pytest.importorskip("diffusers")
    from diffusers import DiTPipeline

    from test_diffusers import ddim, tiny_transformer, tiny_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "tiny-dit-pipeline"
    DiTPipeline(transformer=tiny_transformer(), vae=tiny_vae(), scheduler=ddim()).save_pretrained(folder)
    return {"PIPELINE": str(folder), "STEPS": 4, "ITERS": 2}


@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"snippet{i}" for i in range(len(BLOCKS))])
def test_readme_snippet_runs(index, tmp_path, monkeypatch):
    code = BLOCKS[index]
    needed = placeholders(code)
    ns = {"__name__": "__readme__"}
    if needed & {"PIPELINE", "STEPS", "ITERS"}:
        ns.update(_pipeline_folder(tmp_path, monkeypatch))
    if needed & {"CHECKPOINT", "GATES"}:
        ns.update(_dit_files(tmp_path))
    monkeypatch.chdir(tmp_path)  # whatever a snippet writes (e.g. save_pretrained("dit-gates")) goes here
    exec(compile(code, f"README.md python block {index}", "exec"), ns)
    for name in ("z", "images"):  # what the snippets produce must be real numbers
        value = ns.get(name)
        if torch.is_tensor(value):
            assert value.numel() and torch.isfinite(value).all(), f"snippet {index}: {name} is empty or not finite"
    if "load_default()" in code:  # the offline snippet decodes the default's latents into Fashion-MNIST images
        assert tuple(ns["images"].shape) == (8, 1, 28, 28)


# ---------------------------------------------------------------- dotted names


def _resolves(dotted: str) -> bool | None:
    """True if `dotted` is an importable module or an attribute reached from one; None where a module exists but
    needs an optional dependency that is not installed (cannot be checked here)."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        try:
            obj = importlib.import_module(prefix)
        except ModuleNotFoundError as e:
            if e.name and (e.name == prefix or prefix.startswith(e.name + ".")):
                continue  # not a module: the rest is an attribute of a shorter prefix
            return None  # the module exists and imports something not installed
        for attr in parts[i:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def _readme_names() -> dict:
    return {m: {"README.md"} for m in DOTTED.findall(README.read_text())}


def _source_names() -> dict:
    names = {}
    for path in sorted(SRC.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for m in DOTTED.findall(node.value):
                    names.setdefault(m, set()).add(f"{path.relative_to(ROOT)}:{node.lineno}")
    return names


def test_dotted_names_collected():
    # the collectors see the names they should (so an empty scan cannot pass the test below)
    assert {"lazydit.data.vae.decode", "lazydit.default_autoencoder", "lazydit.load_default"} <= set(_readme_names())
    assert "lazydit.data.vae.decode" in _source_names()
    assert DOTTED.findall("see lazydit.x.y and .lazydit.lock or my-lazydit.z") == ["lazydit.x.y"]


@pytest.mark.parametrize("where", ["README.md", "src/lazydit"])
def test_every_named_module_path_exists(where):
    names = _readme_names() if where == "README.md" else _source_names()
    bad = {n: sorted(at)[:3] for n, at in sorted(names.items()) if _resolves(n) is False}
    assert not bad, f"{where} names module paths that do not exist: {bad}"


def test_plain_import_reaches_submodules_and_stays_light():
    # `lazydit.data.vae.decode` right after `import lazydit`, while `import lazydit` alone pulls in no torch
    code = ("import sys, lazydit; assert 'torch' not in sys.modules, 'import lazydit imported torch'; "
            "assert callable(lazydit.data.vae.decode) and callable(lazydit.default_autoencoder); "
            "import lazydit.data as d; assert d.vae is lazydit.data.vae")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert importlib.util.find_spec("lazydit.nonexistent") is None
    import lazydit

    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        lazydit.nonexistent  # noqa: B018


# ---------------------------------------------------------------- the dataset: who needs it, how to get it


def test_missing_dataset_message_names_the_commands_and_the_three_ways(tmp_path):
    from lazydit.cli import main
    from lazydit.data import load_fashion_mnist
    from lazydit.errors import DataMissingError

    with pytest.raises(DataMissingError) as info:
        load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(SystemExit) as cli:  # the CLI prints it as one line, its lines joined with "; "
        main(["pretrain", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "run")])
    for msg in (str(info.value), str(cli.value)):
        for part in ("pretrain", "train-autoencoder", "train-gates", "--data-free", "scripts/build_fmnist_eval.py",
                     "apt-get install -y dataset-fashion-mnist", "--data DIR", "LAZYDIT_DATA=DIR"):
            assert part in msg, f"{part!r} missing from: {msg}"
    assert "\n" not in str(cli.value)
    readme = README.read_text()  # the README says the same next to the commands
    section = readme[readme.index("**Which commands need the Fashion-MNIST dataset.**"):][:1500]
    for part in ("`lazydit pretrain`", "`lazydit train-autoencoder`", "`lazydit train-gates`", "--data-free",
                 "apt-get install -y dataset-fashion-mnist", "--data DIR", "LAZYDIT_DATA=DIR", "`eval`"):
        assert part in section, f"{part!r} missing from the README's dataset paragraph"
