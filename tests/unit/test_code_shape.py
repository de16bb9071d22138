"""Every module stays readable: none over 500 lines (generated stubs aside), no function over 80."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).parents[2] / "src" / "fleetserve"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80


def modules() -> list[Path]:
    return [p for p in sorted(SRC.rglob("*.py")) if "_pb2" not in p.name]


def test_no_module_over_500_lines():
    long = [
        f"{p.relative_to(SRC)}: {n}" for p in modules() if (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES
    ]
    assert long == []


def test_no_function_over_80_lines():
    long = []
    for path in modules():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(SRC)}:{node.lineno} {node.name}: {length} lines")
    assert long == []
