"""Runs one verifiers environment's rollouts for agentflow's ``verifiers`` workflow.

This file is a program, not a module of agentflow: the workflow starts it with the Python of the
environment's own virtual environment (where ``verifiers`` and the environment are installed), so
it imports only the standard library and ``verifiers``, never agentflow. ``verifiers`` 0.4 pins
``openai<3`` while agentflow's ``agents`` extra needs ``openai>=3``; one process per side keeps
both installable.

Protocol (one JSON document per line; requests on stdin, replies on this process's original
stdout, which nothing else writes to: anything the environment prints goes to stderr):

- start: ``--spec '{"env": ..., "env_args": {...}, "env_config": {...}, "paths": [...]}'`` ->
  ``{"event": "ready", "tasks": N, "env_id": ..., "verifiers": "0.4.0"}`` or
  ``{"event": "error", "error": ...}`` and exit status 2.
- ``{"id": k, "index": i, "base_url": ..., "api_key": ..., "model": ..., "sampling": {...}}``:
  one episode of task ``i``, its model calls sent to ``base_url`` with ``api_key`` (an agentflow
  proxy session) -> ``{"id": k, "ok": true, "reward": r, "rewards": {...}, "turns": n}`` or
  ``{"id": k, "ok": false, "error": "..."}`` (the environment's own error, quoted). Requests run
  concurrently; replies come in completion order.
- end of stdin: the environment's servers stop and the process exits 0.

Not here: tokens, trajectories and rewards as training sees them (the proxy records the tokens;
the workflow builds the trajectories), retries (an episode runs once).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
from typing import Any

_OUT: Any = None  # the protocol's channel: the original stdout


def emit(message: dict[str, Any]) -> None:
    _OUT.write(json.dumps(message) + "\n")
    _OUT.flush()


def _take_stdout() -> None:
    """Keep the original stdout for the protocol; point fd 1 (prints, child processes) at stderr."""
    global _OUT
    _OUT = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_env(spec: dict[str, Any]) -> Any:
    """The environment ``spec`` names, its roles run as local subprocesses unless configured."""
    import verifiers.v1 as vf
    from verifiers.v1.configs.agent import agent_config_fields

    raw = _merge(spec.get("env_config") or {}, {"taskset": {"id": spec["env"], **(spec.get("env_args") or {})}})
    config = vf.resolve_env_config(raw)
    for name, role in agent_config_fields(config).items():
        if "runtime" not in (raw.get(name) or {}):  # verifiers' default is a remote sandbox
            setattr(config, name, role.model_copy(update={"runtime": vf.SubprocessConfig()}))
    return vf.load_environment(config)


def summarize(episode: Any) -> dict[str, Any]:
    """An episode as the workflow reads it: its reward, or why it failed."""
    errors = [*episode.errors, *(e for t in episode.traces for e in t.errors)]
    if errors or not episode.ok:
        text = "; ".join(f"{e.type}: {e.message}" for e in errors) or "the episode did not complete"
        return {"ok": False, "error": text}
    traces = [t for t in episode.traces if getattr(t.agent, "trainable", True)]
    if not traces:
        return {"ok": False, "error": "the episode has no trainable agent run"}
    rewards = {name: (r.score if r is not None else None) for t in traces for name, r in t.rewards.items()}
    missing = [name for name, score in rewards.items() if score is None]
    if missing:
        return {"ok": False, "error": f"the rubric did not score {missing}"}
    reward = sum(t.reward for t in traces) / len(traces)
    if not math.isfinite(reward):
        return {"ok": False, "error": f"the rubric's reward is {reward}, expected a finite number ({rewards})"}
    return {
        "ok": True,
        "reward": reward,
        "rewards": rewards,
        "turns": sum(t.num_turns for t in traces),
        "stop": [t.stop_condition for t in traces],
    }


async def rollout(env: Any, tasks: list[Any], request: dict[str, Any]) -> dict[str, Any]:
    import verifiers.v1 as vf

    index = request["index"]
    if not 0 <= index < len(tasks):
        return {"ok": False, "error": f"task index {index} is out of range: the environment has {len(tasks)} tasks"}
    key_var = f"AGENTFLOW_VF_KEY_{request['id']}"  # verifiers reads an endpoint's key from a variable
    os.environ[key_var] = request["api_key"]
    # the workflow's episode deadline bounds every model call; verifiers' 30 s connect deadline would
    # fail episodes while the proxy's event loop is busy (a weight update, a loaded machine)
    timeout = {"connect": request.get("timeout_s"), "read": None}
    client = vf.EvalClientConfig(base_url=request["base_url"], api_key_var=key_var, timeout=timeout)
    ctx = vf.ModelContext(model=request["model"], client=client, sampling=vf.SamplingConfig(**request["sampling"]))
    try:
        episode = await env.run_episode(tasks[index], ctx)
        return summarize(episode)
    except Exception as e:  # the environment's failure, reported to the workflow
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        os.environ.pop(key_var, None)
        await _close_client(env, client)


async def _close_client(env: Any, client: Any) -> None:
    """Close the endpoint client verifiers built for this rollout's key (it keeps one per
    endpoint config until the environment stops, and every rollout here has its own)."""
    interception = getattr(env, "_interception", None)
    for server in getattr(interception, "servers", None) or [interception]:
        clients = getattr(server, "clients", None)
        if isinstance(clients, dict) and (live := clients.pop(client.model_dump_json(), None)) is not None:
            with contextlib.suppress(Exception):
                await live.close()


async def serve(env: Any, tasks: list[Any]) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=1 << 24)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)

    async def one(request: dict[str, Any]) -> None:
        emit({"id": request["id"], **await rollout(env, tasks, request)})

    async with env.serving(), asyncio.TaskGroup() as group:
        while line := await reader.readline():
            group.create_task(one(json.loads(line)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", required=True, help="JSON: env, env_args, env_config, paths")
    args = parser.parse_args()
    _take_stdout()
    spec = json.loads(args.spec)
    # this file's folder holds agentflow's ``verifiers.py`` workflow: never import it as ``verifiers``
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [os.path.abspath(p) for p in spec.get("paths") or []] + [
        p for p in sys.path if os.path.abspath(p or ".") != here
    ]
    if spec.get("paths"):  # the environment's tool servers are started as `python -m <its module>`
        os.environ["PYTHONPATH"] = os.pathsep.join([*spec["paths"], *filter(None, [os.environ.get("PYTHONPATH")])])
    try:
        import verifiers

        env = load_env(spec)
        tasks = list(env.taskset)
    except Exception as e:  # reported to the workflow, which raises it with the fix
        emit({"event": "error", "error": f"{type(e).__name__}: {e}"})
        return 2
    emit({"event": "ready", "tasks": len(tasks), "env_id": env.config.env_id, "verifiers": verifiers.__version__})
    asyncio.run(serve(env, tasks))
    return 0


if __name__ == "__main__":
    sys.exit(main())
