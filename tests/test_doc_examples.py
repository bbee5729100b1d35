"""Every Python block in README.md and docs/*.md runs as written, unless it is marked a fragment.

A block runs in a fresh namespace with top-level ``await`` allowed (as in ``python -m asyncio`` or a
notebook), in a temporary working directory. A block that needs what it cannot build (model
weights, servers, an agent process) carries ``<!-- fragment: what it needs -->`` on the line
before its opening fence; the reason is required, so a fragment is a decision, not an accident.
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
_FRAGMENT = re.compile(r"<!-- fragment: (\S.*?) -->\n$")


def _blocks() -> list[tuple[str, int, str, str | None]]:
    """(file, line, code, fragment reason or None) for every ```python block."""
    out = []
    for path in DOCS:
        text = path.read_text()
        for m in _BLOCK.finditer(text):
            before = text[: m.start()]
            line = before.count("\n") + 1
            prev = before[before.rstrip("\n").rfind("\n") + 1:] if before else ""
            frag = _FRAGMENT.search(prev)
            out.append((str(path.relative_to(ROOT)), line, m.group(1), frag.group(1) if frag else None))
    return out


BLOCKS = _blocks()
RUNNABLE = [b for b in BLOCKS if b[3] is None]


def test_the_docs_have_runnable_examples_and_fragments_say_why():
    assert any(f == "docs/workflows.md" for f, *_ in RUNNABLE), "the workflows.md rollout example must run"
    for f, line, _, why in BLOCKS:
        assert why is None or len(why) > 5, f"{f}:{line}: a fragment marker must say what the block needs"


@pytest.mark.parametrize(("where", "code"), [(f"{f}:{line}", code) for f, line, code, _ in RUNNABLE])
async def test_example_runs_as_written(where, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    compiled = compile(code, where, "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    result = eval(compiled, namespace)  # the repository's own documentation
    if inspect.iscoroutine(result):
        async with asyncio.timeout(60):
            await result
