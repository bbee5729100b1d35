"""The public surface is exactly what __all__ lists; imports are light and flow one way."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import agentflow

ROOT = pathlib.Path(__file__).resolve().parents[1]

EXPECTED = {
    # contracts
    "GenerationConfig", "ModelRequest", "ModelResponse", "StopReason", "Trajectory", "RolloutWorkflow",
    "InferenceEngine", "TrainEngine", "MicroBatchSpec", "WeightUpdateMeta", "SaveLoadMeta", "FinetuneSpec",
    "Scheduling", "RolloutConfig", "StalePolicy",
    # core machinery
    "StalenessManager", "StalenessStats", "staleness_capacity", "WorkflowExecutor", "ReplayBuffer", "Group",
    "BufferStats", "OpenAIClient", "ProxyServer", "Rollout",
    # a training loop of your own
    "Trainer", "TrainerConfig", "EvalSpec", "evaluate", "PromptSource", "Checkpointer", "MetricsLogger",
    # errors
    "AgentflowError", "ConfigError", "EngineError", "EngineTimeout", "ServerError", "PromptTooLong", "WorkflowError",
    "TrajectoryError", "EnvError", "SandboxError", "CheckpointError",
}


def test_all_is_the_public_api():
    assert set(agentflow.__all__) == EXPECTED
    assert sorted(agentflow.__all__) == list(agentflow.__all__)
    for name in agentflow.__all__:
        assert getattr(agentflow, name) is not None


def test_errors_form_one_tree():
    for name in EXPECTED:
        obj = getattr(agentflow, name)
        if isinstance(obj, type) and issubclass(obj, Exception):
            assert issubclass(obj, agentflow.AgentflowError), name


def test_import_agentflow_is_light():
    code = (
        "import sys, agentflow, agentflow.engines, agentflow.workflows, agentflow.envs\n"
        "heavy = [m for m in ('torch', 'transformers', 'sglang', 'torch.distributed', 'openai', 'fastapi')"
        " if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"`import agentflow` pulled in: {out.stdout.strip()}"


# folder -> packages it may import (besides the stdlib and third-party libraries)
ALLOWED = {
    "agentflow": {"agentflow"},
    "engines": {"agentflow", "agentflow.engines"},
    "envs": {"agentflow", "agentflow.envs"},
    "workflows": {"agentflow", "agentflow.envs", "agentflow.workflows"},
}
PLUGINS = ("agentflow.engines", "agentflow.envs", "agentflow.workflows")
WIRING = {"cli.py"}  # with the agentflow/recipe/ package: the one place that wires plug-ins together (README: Layout)
WIRING_PACKAGE = "recipe"


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
    return mods


def _owner(module: str) -> str | None:
    for plugin in PLUGINS:
        if module == plugin or module.startswith(plugin + "."):
            return plugin
    if module == "agentflow" or module.startswith("agentflow."):
        return "agentflow"
    return None


def test_imports_flow_one_way():
    bad = []
    for folder, allowed in ALLOWED.items():
        for path in (ROOT / folder).rglob("*.py"):
            if folder == "agentflow" and (path.name in WIRING or path.parent.name == WIRING_PACKAGE):
                continue
            for mod in _imported_modules(path):
                owner = _owner(mod)
                if owner is not None and owner not in allowed:
                    bad.append(f"{path.relative_to(ROOT)} imports {mod}")
    assert not bad, "imports against the layering (README, Layout):\n" + "\n".join(bad)


def _module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT / "agentflow").with_suffix("")
    parts = ["agentflow", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _module_level_imports(path: pathlib.Path) -> set[str]:
    """agentflow modules imported at module level (not inside functions, not under TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from pkg import submodule` depends on the submodule; `from mod import name` on mod
            subs = {f"{node.module}.{a.name}" for a in node.names}
            known = {s for s in subs if (ROOT / "agentflow").joinpath(*s.split(".")[1:]).with_suffix(".py").exists()}
            mods.update(known or {node.module})
    return {m for m in mods if m.startswith("agentflow.")}


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk of ``graph``, as the cycle it closes."""
    state: dict[str, int] = {}
    cycles = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append(" -> ".join([*stack[stack.index(d):], d]) if d in stack else f"{m} -> {d}")
            elif d not in state:
                visit(d, [*stack, d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return cycles


def test_core_has_no_import_cycles():
    graph = {_module_name(p): _module_level_imports(p) for p in (ROOT / "agentflow").rglob("*.py")}
    # a package's own modules may import each other through it: edges to an ancestor package do not count
    graph = {m: {d for d in deps if d in graph and not m.startswith(d + ".") and d != m} for m, deps in graph.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles in agentflow/:\n" + "\n".join(cycles)


def test_the_engine_contract_does_not_import_the_rollout_machinery():
    deps = _module_level_imports(ROOT / "agentflow" / "_engine_api.py")
    assert not deps & {"agentflow._executor", "agentflow._buffer", "agentflow._rollout", "agentflow._staleness"}


def test_the_project_is_self_contained():
    """No code, docstring or doc points at documents that are not in this repository: a Markdown file
    named in capitals must exist here, and nothing names a folder beside the checkout or a path on
    the development machine."""
    import re

    named_doc = re.compile(r"\b([A-Z][A-Z_]+\.md)\b")
    beside = re.compile(r"(?<![\w.])\.\./(?!agentflow-sandbox)[A-Za-z]|/wor[k]/")
    found = []
    for path in ROOT.rglob("*"):
        if path.suffix not in {".py", ".md", ".yaml", ".toml", ".txt"} or ".venv" in path.parts or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        found += [f"{path.relative_to(ROOT)}: {name}" for name in set(named_doc.findall(text))
                  if not any(ROOT.rglob(name))]
        found += [f"{path.relative_to(ROOT)}: {m.group(0)!r}" for m in beside.finditer(text)]
    assert not found, "references to documents outside the repository:\n" + "\n".join(found)


def test_every_module_says_what_it_does_and_does_not_do():
    import re

    missing = []
    for folder in ALLOWED:
        for path in (ROOT / folder).rglob("*.py"):
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
            if not doc or not re.search(r"Not here|Not covered|\bdoes not\b|\bdo not\b|knows nothing|\bnever\b", doc):
                missing.append(str(path.relative_to(ROOT)))
    assert not missing, "module docstrings without what the module does not do:\n" + "\n".join(missing)


# engines/: one package per product. room -> rooms it may import besides the shared modules
ENGINE_ROOMS = {"local": set(), "remote": set(), "serve": {"local"}, "fsdp": set()}
ENGINE_SHARED = {"_lora", "_handoff", "model_loading"}


def _engine_module(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT / "engines").with_suffix("")
    parts = ["agentflow", "engines", *rel.parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _all_imports(path: pathlib.Path) -> set[str]:
    """Every module an engines/ file imports: module level, in functions and under TYPE_CHECKING;
    ``from pkg import name`` counts as the submodule ``pkg.name`` where that is a module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    mods: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            mods.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            mods.add(node.module)
            mods.update(f"{node.module}.{a.name}" for a in node.names)
    return mods


def _engine_graph() -> dict[str, set[str]]:
    files = {_engine_module(p): p for p in (ROOT / "engines").rglob("*.py")}
    return {m: {d for d in _all_imports(p) if d in files} for m, p in files.items()}


def test_engine_rooms_import_only_what_they_may():
    """local/remote/serve/fsdp use the shared modules and their own room (serve may use local);
    no engine module reaches into agentflow's private modules."""
    bad = []
    for path in (ROOT / "engines").rglob("*.py"):
        rel = path.relative_to(ROOT / "engines")
        room = rel.parts[0] if len(rel.parts) > 1 else None
        for mod in _all_imports(path):
            if mod.startswith("agentflow._") or (mod.startswith("agentflow.") and "._" in mod
                                                  and not mod.startswith("agentflow.engines.")):
                bad.append(f"engines/{rel} imports the private {mod}")
            if not mod.startswith("agentflow.engines."):
                continue
            target = mod.split(".")[2]
            if target in ENGINE_SHARED or target == room:
                continue
            if room is None and target in ENGINE_ROOMS and path.name == "__init__.py":
                continue  # the package's lazy names
            if room is None or target not in ENGINE_ROOMS[room]:
                bad.append(f"engines/{rel} ({room or 'shared'}) imports {mod}")
    assert not bad, "engine rooms crossing their walls:\n" + "\n".join(bad)


def test_engines_have_no_import_cycles_counting_function_level_and_type_checking_imports():
    graph = _engine_graph()
    # a package's modules may import each other through it: edges to an ancestor package do not count
    graph = {m: {d for d in deps if not m.startswith(d + ".") and d != m} for m, deps in graph.items()}
    cycles = _cycles(graph)
    assert not cycles, "import cycles in engines/:\n" + "\n".join(cycles)


def test_engine_packages_have_audited_public_names():
    import importlib

    expected = {
        "local": {"LocalEngine", "LocalEngineConfig"},
        "remote": {"RemoteEngine", "RemoteEngineConfig", "RemoteSGLangEngine", "ServerProtocol", "PROTOCOLS",
                   "GenerateJob", "Generated", "ServerLink", "WeightGroup", "BroadcastSpec", "resolve_protocol"},
        "serve": {"ServerConfig", "build_app", "serve_main"},
        "fsdp": {"FSDPEngine", "FSDPEngineConfig"},
    }
    for room, names in expected.items():
        module = importlib.import_module(f"agentflow.engines.{room}")
        assert set(module.__all__) == names, room
        assert all(getattr(module, n) is not None for n in names)
    import agentflow.engines as engines

    for name in engines.__all__:
        assert getattr(engines, name) is not None
