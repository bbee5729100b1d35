"""Benchmarks and examples name only agentflow modules and attributes that exist.

They run by hand (minutes each), so a renamed module would otherwise surface only when someone
runs them: every ``from agentflow... import name`` in them, at any depth (imports inside functions
included), must resolve. Not here: running them (``tests/test_custom_loop.py`` and others do that
for the examples that are quick).
"""

from __future__ import annotations

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPTS = sorted([*(ROOT / "benchmarks").glob("*.py"), *(ROOT / "examples").glob("*.py")])


def _agentflow_imports(path: pathlib.Path) -> list[tuple[int, str, str | None]]:
    """(line, module, name or None) for every import of an agentflow module in ``path``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "agentflow":
            out += [(node.lineno, node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            out += [(node.lineno, a.name, None) for a in node.names if a.name.split(".")[0] == "agentflow"]
    return out


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_agentflow_import_resolves(path):
    missing = []
    for line, module, name in _agentflow_imports(path):
        try:
            mod = importlib.import_module(module)
        except ImportError as e:
            missing.append(f"{path.name}:{line}: {module}: {e}")
            continue
        if name is not None and not hasattr(mod, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{path.name}:{line}: {module} has no {name!r}")
    assert not missing, "\n".join(missing)
