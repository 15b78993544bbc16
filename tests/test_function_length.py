"""Core functions stay short enough to read whole: no function or method in icl_engine/core/
spans more than MAX_LINES lines (def line to last line, decorators aside)."""

from __future__ import annotations

import ast
from pathlib import Path

CORE = Path(__file__).resolve().parents[1] / "icl_engine" / "core"
MAX_LINES = 60


def long_functions(folder: Path, limit: int) -> list[str]:
    """'path:line name (N lines)' for each FunctionDef/AsyncFunctionDef under `folder` longer than `limit`."""
    found = []
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > limit:
                    found.append(f"{path.relative_to(folder.parent)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_core_function_is_longer_than_60_lines():
    assert long_functions(CORE, MAX_LINES) == []


def test_the_check_sees_a_long_function(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))  # def line + 60 = 61 lines
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "m.py").write_text(f"async def f():\n{body}\n\n\ndef g():\n    return 1\n")
    assert long_functions(tmp_path / "pkg", MAX_LINES) == ["pkg/m.py:1 f (61 lines)"]
