"""The folder tree of ``helpers`` is its architecture: sub-packages are layers, and every import
points down them, never sideways up or in a circle (docs/design.md draws the picture).

Read from the source (function-level imports included), so a lazy import cannot hide an upward
dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "helpers"

# Lower = lower layer. A module may import modules of a strictly lower package, or of its own
# package when listed earlier in the same tuple (the order inside a package is part of the design).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("core", ("errors", "progress", "files", "config", "identity", "runtime", "repro", "arrays", "schema")),
    ("data", ("deepfashion", "sampling", "synthetic", "staging", "transforms", "store", "datasets")),
    ("modeling", ("models", "losses", "distributed", "checkpoints", "onnx_embedder", "export")),
    (
        "evaluation",
        ("metrics", "inference", "search", "postprocess", "ann", "gallery", "retriever", "plots", "failures"),
    ),
    ("training", ("train",)),
    (
        "experiments",
        (
            "artifacts",
            "statistics",
            "catalogue",
            "runs",
            "comparison",
            "family",
            "study",
            "postprocessing",
            "robustness",
            "robustness_study",
            "final_runs",
            "final",
            "pipeline",
        ),
    ),
    (
        "reporting",
        (
            "tables",
            "prose",
            "references",
            "check",
            "consistency",
            "render",
            "sections",
            "claims",
            "results_section",
            "talk",
            "compose",
        ),
    ),
    ("apps", ("app", "cli")),
)
RANK = {
    f"{package}.{name}": (layer, position)
    for layer, (package, names) in enumerate(LAYERS)
    for position, name in enumerate(names)
}
TOP = len(LAYERS)  # helpers/__main__.py sits above every layer; helpers/__init__.py below all
PACKAGE_RANK = {package: layer for layer, (package, _) in enumerate(LAYERS)}


def _module_of(path: Path) -> str:
    """'core.config' for helpers/core/config.py; '__main__' for helpers/__main__.py."""
    return ".".join(path.relative_to(PACKAGE).with_suffix("").parts)


def _modules() -> list[str]:
    return sorted(_module_of(p) for p in PACKAGE.rglob("*.py") if p.name != "__init__.py")


def _imported(path: Path) -> set[str]:
    """The helpers modules ('pkg.module') or packages ('pkg') that ``path`` imports, anywhere in it."""
    here = _module_of(path).split(".")[:-1]  # the package of this file, for relative imports
    found = set()

    def add(dotted: str, names=()) -> None:
        parts = [p for p in dotted.split(".") if p]
        if len(parts) >= 2:
            found.add(".".join(parts[:2]))
        elif len(parts) == 1:  # from helpers.core import config, repro
            found.update(f"{parts[0]}.{n}" if f"{parts[0]}.{n}" in RANK else parts[0] for n in names)
        else:  # from helpers import core / __version__
            found.update(n for n in names if n in PACKAGE_RANK)

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            names = [alias.name for alias in node.names]
            if node.level:
                base = here[: len(here) - (node.level - 1)] if node.level > 1 else here
                add(".".join([*base, node.module or ""]), names)
            elif (node.module or "") == "helpers" or (node.module or "").startswith("helpers."):
                add(node.module.removeprefix("helpers"), names)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("helpers."):
                    add(alias.name.removeprefix("helpers"))
    return found


def _rank(name: str) -> tuple[int, int]:
    if name in RANK:
        return RANK[name]
    return (PACKAGE_RANK[name], 10**6)  # a whole package ranks with its highest module


def test_the_tree_is_the_layers():
    """Every module sits in a listed package at a listed place, and every listed module exists."""
    modules = set(_modules()) - {"__main__"}
    assert modules - set(RANK) == set(), "add new modules to LAYERS"
    assert set(RANK) - modules == set(), "LAYERS lists modules that do not exist"
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(PACKAGE_RANK)
    for package in PACKAGE_RANK:
        assert (PACKAGE / package / "__init__.py").exists()


@pytest.mark.parametrize("module", _modules())
def test_imports_point_down(module):
    path = PACKAGE / (module.replace(".", "/") + ".py")
    rank = (TOP, 0) if module == "__main__" else RANK[module]
    upward = sorted(name for name in _imported(path) if _rank(name) >= rank)
    assert upward == [], f"helpers.{module} imports {upward}, which are not below it"


def test_package_inits_import_nothing_of_helpers():
    """Importing ``helpers.data`` must not pull in torch models: the package files stay empty
    of helpers imports, so each module pays only for what it uses."""
    for init in PACKAGE.rglob("__init__.py"):
        assert _imported(init) == set(), init


def test_the_checker_sees_an_upward_import(tmp_path, monkeypatch):
    folder = tmp_path / "helpers" / "evaluation"
    folder.mkdir(parents=True)
    source = folder / "metrics.py"
    source.write_text(
        "def f():\n"
        "    from helpers.training.train import fit\n"
        "    from . import search\n"
        "    from ..core import errors\n"
        "    import helpers.apps.cli\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", tmp_path / "helpers")
    assert _imported(source) == {"training.train", "evaluation.search", "core.errors", "apps.cli"}
