"""Every import inside ``helpers`` points down the layers of DESIGN.md, never sideways up or in a
circle. Read from the source (function-level imports included), so a lazy import cannot hide
an upward dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "helpers"

# Lower number = lower layer. A module may import only modules of a strictly lower layer, or of
# its own layer when listed earlier in the same tuple (within-layer order is part of the design).
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__init__", "errors", "files", "config", "repro", "arrays", "schema"),  # base
    ("deepfashion", "sampling", "synthetic", "workspace", "staging"),  # data on disk
    ("data", "models", "losses", "distributed"),  # images, networks, objectives
    ("metrics", "checkpoints", "inference", "ann", "retrieval", "plots"),  # evaluation and search
    ("train",),
    ("study", "report", "final", "app", "pipeline"),
    ("__main__",),
)
RANK = {name: (layer, position) for layer, names in enumerate(LAYERS) for position, name in enumerate(names)}


def _imported_helpers(path: Path) -> set[str]:
    """Names of the helpers modules that ``path`` imports (relative or absolute), anywhere in it."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 1 or (node.module or "").startswith("helpers"):
                module = (node.module or "").removeprefix("helpers").lstrip(".")
                if module:
                    found.add(module.split(".")[0])
                else:  # from . import a, b
                    found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("helpers."))
    return found


def test_every_module_has_a_layer():
    modules = {p.stem for p in PACKAGE.glob("*.py")}
    assert modules - set(RANK) == set(), "add new modules to LAYERS"


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_imports_point_down(module):
    upward = sorted(
        name
        for name in _imported_helpers(PACKAGE / f"{module}.py")
        if name in RANK and name != "__version__" and RANK[name] >= RANK[module]
    )
    assert upward == [], f"helpers.{module} imports {upward}, which are not below it"


def test_the_checker_sees_an_upward_import(tmp_path):
    source = tmp_path / "metrics.py"
    source.write_text("def f():\n    from .train import fit\n    from . import retrieval, errors\n")
    assert _imported_helpers(source) == {"train", "retrieval", "errors"}
