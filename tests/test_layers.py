"""The package's layering, read from the source: core inference <- training <- studies <- front
ends. A module may import its own layer or the ones below, never one above (imports inside
functions included: a lazy import is still a dependency)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "icl_engine"

# The layer of a module, by its dotted name under icl_engine; anything not listed is core.
FRONT_ENDS = {"cli", "cli_format", "api", "console", "service", "ray_jobs", "shards"}
LAYERS = {"core": 0, "train": 1, "studies": 2, "front": 3}


def layer_of(module: str) -> str:
    parts = module.split(".")
    assert parts[0] == "icl_engine", module
    if len(parts) == 1:
        return "core"
    if parts[1] in ("train", "studies"):
        return parts[1]
    return "front" if parts[1] in FRONT_ENDS else "core"


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
            # `from . import compare` / `from icl_engine import api` import the submodules themselves
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
    (pkg / "train").mkdir(parents=True)
    (pkg / "studies").mkdir()
    for f in ("__init__.py", "api.py", "train/__init__.py", "studies/__init__.py", "studies/report.py"):
        (pkg / f).write_text("")
    (pkg / "pipeline.py").write_text("def f():\n    from .train import loop\n")
    (pkg / "train" / "loop.py").write_text("from ..studies.report import x\nfrom ..data import Dataset\n")
    (pkg / "studies" / "compare.py").write_text("from ..train.loop import y\nfrom icl_engine import api\n")
    (pkg / "cli.py").write_text("from .studies import compare\n")
    bad = upward_imports(pkg)
    assert [b.split(" ")[0] for b in bad] == ["icl_engine/pipeline.py:2", "icl_engine/studies/compare.py:2",
                                              "icl_engine/train/loop.py:1"]


@pytest.mark.parametrize("module, layer", [
    ("icl_engine.pipeline", "core"), ("icl_engine.adapters", "core"), ("icl_engine.train.loop", "train"),
    ("icl_engine.studies.experiments.common", "studies"), ("icl_engine.cli", "front"), ("icl_engine.api", "front"),
    ("icl_engine.service.app", "front"), ("icl_engine.service", "front"),
    ("icl_engine.ray_jobs", "front"),
])
def test_layer_names(module, layer):
    assert layer_of(module) == layer
