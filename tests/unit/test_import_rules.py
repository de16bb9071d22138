"""The layering rules, read from the source with ast: a violation fails with the file and line that break it."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).parents[2] / "src" / "fleetserve"

# package -> packages (and top-level modules) it must never import
FORBIDDEN = {
    "engine": ("fleetserve.gateway", "fleetserve.worker", "fleetserve.protocol", "fleetserve.text"),
    "gateway": ("fleetserve.engine", "fleetserve.worker", "torch", "safetensors"),
    "protocol": ("fleetserve.engine", "torch"),
    "contract": ("fleetserve.engine", "fleetserve.gateway", "fleetserve.worker", "torch"),
    "model_files": ("fleetserve.engine", "fleetserve.gateway", "fleetserve.worker", "torch"),
    "text": ("fleetserve.engine", "fleetserve.gateway", "fleetserve.worker", "torch"),
}


def imports(path: Path) -> list[tuple[int, str]]:
    """Every module name an import statement in ``path`` names, with its line (lazy imports included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module))
    return found


def violations(package: str, banned: tuple[str, ...]) -> list[str]:
    bad = []
    for path in sorted((SRC / package).rglob("*.py")):
        for line, name in imports(path):
            if any(name == b or name.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(SRC.parent)}:{line}: imports {name}")
    return bad


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_keeps_its_import_rules(package):
    assert violations(package, FORBIDDEN[package]) == []


def test_the_check_finds_a_violation(tmp_path, monkeypatch):
    (tmp_path / "gateway").mkdir()
    (tmp_path / "gateway" / "bad.py").write_text(
        "import os\n\ndef f():\n    from fleetserve.engine.engine import LLMEngine\n"
    )
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    found = violations("gateway", FORBIDDEN["gateway"])
    assert len(found) == 1 and found[0].endswith("gateway/bad.py:4: imports fleetserve.engine.engine")
