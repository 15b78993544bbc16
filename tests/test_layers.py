"""The package's layering, read from the source: a folder per layer, core inference (core/) <-
training (train/) <- studies (studies/) <- front ends (apps/: the CLI, the service, the Ray jobs,
the Python facade). A module may import its own layer or the ones below, never one above
(imports inside functions included: a lazy import is still a dependency). The package's
__init__ is the public Python API, a front end."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "icl_engine"
LAYERS = {"core": 0, "train": 1, "studies": 2, "apps": 3}


def layer_of(module: str) -> str:
    """The layer of a module: the folder it lives in under icl_engine."""
    parts = module.split(".")
    assert parts[0] == "icl_engine", module
    if len(parts) == 1:
        return "apps"  # icl_engine/__init__.py: the public API
    assert parts[1] in LAYERS, f"{module} lies outside the layer folders {sorted(LAYERS)}"
    return parts[1]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str, package_dir: Path) -> bool:
    path = package_dir.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def imported_modules(path: Path, package_dir: Path = PACKAGE) -> list[tuple[int, str]]:
    """(line, absolute module name) of every icl_engine import in a file, wherever it occurs.
    `from . import x` counts as importing the module x when x is one."""
    name = module_name(path, package_dir)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.split(".")[0] == "icl_engine"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != "icl_engine":
                continue
            # `from . import bounds` / `from icl_engine import api` import the submodules themselves
            subs = [f"{target}.{a.name}" for a in node.names if is_module(f"{target}.{a.name}", package_dir)]
            found += [(node.lineno, m) for m in subs or [target]]
    return found


def upward_imports(package_dir: Path = PACKAGE) -> list[str]:
    bad = []
    for path in sorted(package_dir.rglob("*.py")):
        here = layer_of(module_name(path, package_dir))
        for line, target in imported_modules(path, package_dir):
            there = layer_of(target)
            if LAYERS[there] > LAYERS[here]:
                bad.append(f"{path.relative_to(package_dir.parent)}:{line} ({here}) imports {target} ({there})")
    return bad


def test_no_module_imports_a_layer_above_its_own():
    assert upward_imports() == []


def test_the_checker_sees_upward_imports(tmp_path):
    # a throwaway package laid out like icl_engine: core importing training (inside a function),
    # training importing studies, and allowed downward imports
    pkg = tmp_path / "icl_engine"
    for sub in ("core", "train", "studies", "apps"):
        (pkg / sub).mkdir(parents=True)
        (pkg / sub / "__init__.py").write_text("")
    for f in ("__init__.py", "apps/api.py", "studies/report.py", "core/data.py"):
        (pkg / f).write_text("")
    (pkg / "core" / "pipeline.py").write_text("def f():\n    from ..train import loop\n")
    (pkg / "train" / "loop.py").write_text("from ..studies.report import x\nfrom ..core.data import Dataset\n")
    (pkg / "studies" / "bounds.py").write_text("from ..train.loop import y\nfrom icl_engine.apps import api\n")
    (pkg / "apps" / "cli.py").write_text("from ..studies import bounds\n")
    bad = upward_imports(pkg)
    assert [b.split(" ")[0] for b in bad] == ["icl_engine/core/pipeline.py:2", "icl_engine/studies/bounds.py:2",
                                              "icl_engine/train/loop.py:1"]


def test_every_module_lies_in_a_layer_folder():
    for path in PACKAGE.rglob("*.py"):
        layer_of(module_name(path))


@pytest.mark.parametrize("module, layer", [
    ("icl_engine.core.pipeline", "core"), ("icl_engine.core.adapters", "core"), ("icl_engine.train.loop", "train"),
    ("icl_engine.studies.experiments.common", "studies"), ("icl_engine.apps.cli", "apps"), ("icl_engine.apps.queries", "apps"),
    ("icl_engine.apps.service.app", "apps"), ("icl_engine.apps.service", "apps"),
    ("icl_engine.apps.ray_jobs", "apps"), ("icl_engine", "apps"),
])
def test_layer_names(module, layer):
    assert layer_of(module) == layer
