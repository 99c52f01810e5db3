"""The Lib's layers (ARCHITECTURE.md): every import goes down or sideways, never up, and no import cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIB = Path(__file__).resolve().parent.parent / "SPASegmentationLib"

# Lowest first. A module may import modules of its own layer or a lower one (cycles are checked apart).
LAYERS: list[tuple[str, ...]] = [
    (
        "SPASegmentationLib",
        "errors",
        "enums",
        "resources",
        "palette",
        "metrics",
        "masks",
        "fingerprints",
        "stages",
        "io.atomic",
        "io.terminology",
        "worker",
        "rounds",
        "limits",
        "service",
    ),
    ("io.images", "io.dicom_seg", "model.preprocess", "service.protocol", "service.client"),
    ("preference", "candidates"),
    ("model.runtimes", "model.backbone", "model.conditioning", "model.generator", "model.spa", "model.build"),
    ("engine",),
    (
        "session",
        "embeddings",
        "simulation.preferences",
        "simulation.prompts",
        "simulation.choices",
        "data.dataset",
        "data.folder",
        "data.lidc",
        "data.lidc_contours",
        "data.labelmap_slices",
        "data.detect",
        "data.synthetic",
    ),
    (
        "profiles",
        "propagation",
        "figures",
        "training",
        "bench",
        "evaluation.runner",
        "evaluation.studies",
        "evaluation.protocols",
        "evaluation.report",
        "profile_db",
        "backend",
    ),
    ("scene.geometry", "scene.segments", "scene.overlay", "scene.session"),
    ("service.app", "service.server"),
    ("cli",),
]
RANK = {name: rank for rank, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(LIB).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts) or "SPASegmentationLib"


def lib_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(LIB.rglob("*.py"))}


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def runtime_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Lib modules that ``name`` imports when it runs (module level or inside functions), not for typing only."""
    package = name.split(".")[:-1] if path.name != "__init__.py" else name.split(".")
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1] if node.level > 1 else list(package)
                target = ".".join(base + ([node.module] if node.module else []))
            elif (node.module or "").startswith("SPASegmentationLib"):
                target = node.module.removeprefix("SPASegmentationLib").lstrip(".")
            else:
                target = None
            if target is not None:
                candidates = [f"{target}.{alias.name}".lstrip(".") for alias in node.names] + [target]
                for candidate in candidates:
                    if (candidate or "SPASegmentationLib") in known:
                        found.add(candidate or "SPASegmentationLib")
                        break
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("SPASegmentationLib"):
                    found.add(alias.name.removeprefix("SPASegmentationLib").lstrip(".") or "SPASegmentationLib")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(encoding="utf-8")))
    found.discard(name)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = lib_modules()
    known = set(modules)
    return {name: runtime_imports(name, path, known) for name, path in modules.items()}


def test_every_lib_module_has_a_layer(graph):
    packages = {n for n in graph if (LIB / n.replace(".", "/") / "__init__.py").exists()} - {"SPASegmentationLib"}
    unplaced = sorted(set(graph) - set(RANK) - packages)
    assert not unplaced, f"add these modules to a layer in this test and in ARCHITECTURE.md: {unplaced}"


def test_no_import_runs_up_a_layer(graph):
    upward = [
        f"{name} (layer {RANK[name]}) imports {target} (layer {RANK[target]})"
        for name, targets in graph.items()
        if name in RANK
        for target in targets
        if target in RANK and RANK[target] > RANK[name]
    ]
    assert not upward, "\n".join(upward)


def test_no_import_cycles(graph):
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(name: str) -> None:
        state[name] = 1
        path.append(name)
        for target in sorted(graph.get(name, ())):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name)


def test_the_checker_sees_an_upward_import(tmp_path):
    """The graph is read from real source: a lazy import inside a function counts, a typing-only one does not."""
    source = tmp_path / "probe.py"
    source.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .cli import main\n"
        "def f():\n    from .engine import round_seed\n    from ..errors import InputError\n"
    )
    assert runtime_imports("model.probe", source, {"cli", "engine", "errors"}) == {"errors"}
    top = tmp_path / "top.py"
    top.write_text("import numpy\nfrom . import engine\nfrom .model.spa import SPAModel\n")
    assert runtime_imports("top", top, {"engine", "model.spa"}) == {"engine", "model.spa"}
