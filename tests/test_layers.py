"""Imports inside `src/lazydit` only go down the layers, including the ones hidden inside functions."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "lazydit"

# The layer order, written once: a module may import from its own layer and the layers before it, never after.
# A name is a top-level module or subpackage of lazydit.
LAYERS = (
    ("errors", "files", "cpu", "ranks", "images", "plots"),  # leaves: no lazydit imports but each other
    ("models",),  # the networks, their block registry, their MAC accounting, diffusers' transformers as models
    ("assets",),  # the embedded default's files
    ("sampling",),  # schedules and samplers: nothing about caching
    ("lazy",),  # every caching policy behind one attachment mechanism
    ("pipeline", "diffusers", "bench"),  # one sampling call with a policy; diffusers' pipelines; timing
    ("loading", "distributed", "data"),  # models by kind; sharded sampling; datasets and autoencoders
    ("training", "evaluation", "demo"),
    ("tuning",),  # the search for the best setting within a budget (on the row engine), recipes
    ("cli",),
)
RANK = {name: i for i, names in enumerate(LAYERS) for name in names}


def top(module: str) -> str:
    """'lazydit.lazy.hooks' -> 'lazy' (the top-level part after the package)."""
    return module.split(".")[1]


def lazydit_imports(path: Path):
    """(line, imported lazydit module) for every import in a file, at any depth (functions included)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("lazydit."):
                    yield node.lineno, a.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module == "lazydit":
                for a in node.names:  # from lazydit import ranks
                    yield node.lineno, f"lazydit.{a.name}"
            elif node.module.startswith("lazydit."):
                yield node.lineno, node.module


def modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts)
        if name != "lazydit.__init__":  # the package's face names every layer, imported on first use
            yield name.removesuffix(".__init__"), path


def test_every_module_has_a_layer():
    missing = sorted({top(name) for name, _ in modules() if top(name) not in RANK})
    assert missing == []


def test_no_import_runs_up_the_layers():
    upward = []
    for name, path in modules():
        here = RANK[top(name)]
        for line, target in lazydit_imports(path):
            there = RANK.get(top(target))
            if there is None or there > here:
                upward.append(f"{path.relative_to(PACKAGE.parent)}:{line} ({LAYERS[here][0]}...) imports {target}")
    assert upward == []


def test_the_walk_sees_imports_inside_functions(tmp_path):
    """The checker itself: an import hidden in a function is found, and it would be flagged."""
    f = tmp_path / "m.py"
    f.write_text("def f():\n    from lazydit.cli import main\n    import lazydit.evaluation.driver\n")
    assert [t for _, t in lazydit_imports(f)] == ["lazydit.cli", "lazydit.evaluation.driver"]
    assert RANK[top("lazydit.cli")] > RANK[top("lazydit.models.dit")]
