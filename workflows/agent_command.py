"""An agent in any process or language as a workflow: one command per episode, over the proxy.

Per episode: a fresh proxy session (its own API key) -> the command starts with
``OPENAI_BASE_URL`` and ``OPENAI_API_KEY`` set to that session (what the official OpenAI SDKs
read), the episode's data as JSON on stdin (or in ``AGENTFLOW_TASK``) -> the agent talks to the
model through the proxy like to any OpenAI-compatible server -> it exits -> the reward is the one
the agent posted to ``AGENTFLOW_REWARD_URL`` (``POST {"reward": r}`` with its key), else
``reward_fn(stdout, task)`` -> the session's recorded completions become the trajectories
(token-in/token-out, tool output masked), and the session is closed.

The proxy is the workflow's own, on loopback, over the engine of the first episode; it starts on
first use or when the workflow is entered (``async with workflow:``; ``agentflow train`` does it)
and stops on exit. A command that exits non-zero, outlives ``timeout_s`` or makes no completion
rejects the episode with a reason that quotes its stderr.

Every process an episode starts ends with it: the command runs under a small supervisor
(``_reaper.py``, a child subreaper) that, when the command exits or the deadline passes, kills
every descendant, including children still holding stdout open and daemons that double-forked
and called ``setsid``. The event loop only waits on pipes and the supervisor's exit.

Not here: sandboxing the command (it runs with this process's permissions: run only agents you
trust, or wrap the command in a sandbox of your own), installing the agent's dependencies.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pathlib
import shlex
import signal
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow import GenerationConfig, InferenceEngine, Trajectory
from agentflow.envs.tasks import RewardFn, Task
from agentflow.errors import ConfigError, WorkflowError
from agentflow.workflows.rlvr import score

__all__ = ["AgentCommandConfig", "AgentCommandWorkflow"]

_TAIL = 600  # characters of stderr quoted in a rejection reason
_REAPER = str(pathlib.Path(__file__).with_name("_reaper.py"))  # runs the command; ends all it started
_CANNOT_START = 127  # the reaper's exit status when the command cannot be executed
_END_GRACE_S = 15.0  # how long the reaper may take to kill the episode's processes


@dataclass(frozen=True, slots=True)
class AgentCommandConfig:
    """Attributes:
        command: the agent's argv, e.g. ``["python", "my_agent.py"]``, or one string split like a
            POSIX shell would (no shell runs it).
        data_via: ``stdin`` (the episode's data as one JSON document) or ``env`` (``AGENTFLOW_TASK``).
        timeout_s: deadline of one run of the command.
        max_output_bytes: stdout and stderr kept per run (the rest is read and dropped).
        env: extra environment variables for the command.
        cwd: the command's working directory (None: this process's).
        gconfig: the proxy sessions' default sampling (the agent's request parameters override it).
        style: ``concat`` (one trajectory per conversation) or ``individual`` (one per completion).
        discount: per-completion discount for ``individual``.
        tool_parser: the sessions' tool-call format.
        reward_timeout_s: deadline of ``reward_fn``.
    """

    command: tuple[str, ...] | str = ()
    data_via: Literal["stdin", "env"] = "stdin"
    timeout_s: float = 300.0
    max_output_bytes: int = 1 << 20
    env: dict[str, str] = field(default_factory=dict, repr=False)  # often API keys: never in a repr
    cwd: str | None = None
    gconfig: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=256))
    style: Literal["individual", "concat"] = "concat"
    discount: float = 1.0
    tool_parser: str = "qwen"
    reward_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", command_from(self.command))
        problems = []
        if not self.command:
            problems.append("command must be the agent's argv, e.g. ['python', 'my_agent.py']; got none")
        if self.data_via not in ("stdin", "env"):
            problems.append(f"data_via must be 'stdin' or 'env', got {self.data_via!r}")
        if not self.timeout_s > 0:
            problems.append(f"timeout_s must be > 0 seconds, got {self.timeout_s}")
        if self.max_output_bytes < 1:
            problems.append(f"max_output_bytes must be >= 1, got {self.max_output_bytes}")
        if self.style == "concat" and self.discount != 1.0:
            problems.append(f"discount={self.discount} needs style='individual'; concat uses discount 1.0")
        ConfigError.check(problems)


@dataclass(slots=True)
class _Run:
    returncode: int
    stdout: str
    stderr: str


class AgentCommandWorkflow:
    """Runs ``config.command`` once per episode against a fresh proxy session.

    Args:
        tokenizer: the served model's tokenizer (with its chat template).
        reward_fn: ``reward_fn(stdout, task)`` for episodes whose agent posted no reward (None: such
            episodes are rejected).
        config: the command and its limits; keyword arguments build one when ``config`` is None.
    """

    def __init__(self, tokenizer: Any, reward_fn: RewardFn | None = None, config: AgentCommandConfig | None = None,
                 **options: Any) -> None:
        if config is not None and options:
            raise ConfigError(f"pass either config= or keyword options, not both; got options {sorted(options)}")
        self.tokenizer = tokenizer
        self.reward_fn = reward_fn
        self.config = config or AgentCommandConfig(**options)
        self._proxy: Any = None
        self._serving: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ the proxy's lifetime
    async def __aenter__(self) -> AgentCommandWorkflow:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the proxy (episodes still running fail to reach it)."""
        proxy, serving, self._proxy, self._serving = self._proxy, self._serving, None, None
        if proxy is not None:
            proxy.stop()
        if serving is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    async def _proxy_for(self, engine: InferenceEngine) -> Any:
        async with self._lock:
            if self._proxy is None:
                from agentflow.proxy import ProxyServer

                cfg = self.config
                proxy = ProxyServer(engine, self.tokenizer, gconfig=cfg.gconfig, tool_parser=cfg.tool_parser)
                proxy.bind()
                self._serving = asyncio.get_running_loop().create_task(proxy.serve())
                self._proxy = proxy
            elif self._proxy.engine is not engine:
                raise WorkflowError("an AgentCommandWorkflow serves one engine; build one workflow per engine")
            return self._proxy

    # ------------------------------------------------------------------ one episode
    async def arun_episode(self, engine: InferenceEngine, data: Any) -> list[Trajectory] | None:
        proxy = await self._proxy_for(engine)
        session = proxy.new_session()
        try:
            run = await self._run_command(session, data)
            return await self._trajectories(session, run, data)
        finally:
            proxy.close_session(session)

    def _environment(self, session: Any, payload: str) -> dict[str, str]:
        env = {**os.environ, **self.config.env, "OPENAI_BASE_URL": session.base_url,
               "OPENAI_API_KEY": session.api_key, "AGENTFLOW_SESSION_ID": session.id,
               "AGENTFLOW_REWARD_URL": f"{session.base_url}/sessions/{session.id}/reward"}
        if self.config.data_via == "env":
            env["AGENTFLOW_TASK"] = payload
        return env

    async def _run_command(self, session: Any, data: Any) -> _Run:
        cfg = self.config
        payload = json.dumps(_plain(data))
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-I", _REAPER, *cfg.command, stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=self._environment(session, payload),
                cwd=cfg.cwd, start_new_session=True,  # its own process group too: the last-resort kill
            )
        except OSError as e:
            raise WorkflowError(f"cannot start agent command {list(cfg.command)}: {e}") from e
        try:
            async with asyncio.timeout(cfg.timeout_s):
                out, err, _ = await asyncio.gather(
                    _read_capped(proc.stdout, cfg.max_output_bytes), _read_capped(proc.stderr, cfg.max_output_bytes),
                    _feed(proc.stdin, payload if cfg.data_via == "stdin" else ""))
                code = await proc.wait()
        except TimeoutError as e:
            raise WorkflowError(f"agent command {list(cfg.command)} ran longer than timeout_s={cfg.timeout_s}; "
                                "it was killed (raise timeout_s or make the agent stop sooner)") from e
        finally:
            if proc.returncode is None:
                await asyncio.shield(_end(proc))
        if code == _CANNOT_START and err.startswith("agentflow: cannot start"):
            raise WorkflowError(err.strip() + "; expected an executable command (check command and cwd)")
        return _Run(code, out, err)

    async def _trajectories(self, session: Any, run: _Run, data: Any) -> list[Trajectory] | None:
        cfg = self.config
        if run.returncode != 0:
            raise WorkflowError(f"agent command {list(cfg.command)} exited with code {run.returncode}; "
                                f"stderr ends with: {run.stderr[-_TAIL:]!r}")
        records = session.client.records
        if not records:
            raise WorkflowError(f"agent command {list(cfg.command)} made no chat completion through "
                                "OPENAI_BASE_URL; expected at least one per episode")
        if all(session.client.get_reward(r.id) is None for r in records):
            if self.reward_fn is None:
                raise WorkflowError("the agent posted no reward to AGENTFLOW_REWARD_URL and the workflow has no "
                                    "reward_fn; do one or the other")
            task = Task.from_data(data)
            session.set_last_reward(await score(self.reward_fn, run.stdout.strip(), task, cfg.reward_timeout_s))
        return session.export_trajectories(discount=cfg.discount, style=cfg.style)


def _plain(data: Any) -> Any:
    """The episode's data as JSON-serialisable values (a Task becomes its fields)."""
    if isinstance(data, Task):
        return {"id": data.id, "prompt": data.prompt, "answer": data.answer, "system": data.system,
                "info": dict(data.info), "shots": [list(s) for s in data.shots]}
    return data


async def _read_capped(stream: asyncio.StreamReader | None, limit: int) -> str:
    kept = bytearray()
    if stream is None:
        return ""
    while chunk := await stream.read(65536):
        kept += chunk[: max(0, limit - len(kept))]
    return kept.decode("utf-8", errors="replace")


async def _feed(stdin: asyncio.StreamWriter | None, payload: str) -> None:
    if stdin is None:
        return
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # an agent that never reads stdin
        stdin.write(payload.encode())
        await stdin.drain()
    stdin.close()


async def _end(proc: asyncio.subprocess.Process) -> None:
    """Ask the reaper to kill every process of the episode (SIGTERM), then wait for it; past
    :data:`_END_GRACE_S` kill its process group outright."""
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        async with asyncio.timeout(_END_GRACE_S):
            await proc.wait()
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        await proc.wait()


def command_from(value: str | Sequence[str]) -> tuple[str, ...]:
    """``"python agent.py"`` or ``["python", "agent.py"]`` -> argv (split like a POSIX shell)."""
    return tuple(shlex.split(value)) if isinstance(value, str) else tuple(str(v) for v in value)
