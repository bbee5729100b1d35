"""A ``verifiers`` environment as a workflow: its tasks, its agent program and its rubric, trained
token for token through agentflow's proxy.

Per data row (a task index of the environment; ``data.task=verifiers`` makes the rows) and per
rollout (``rollouts_per_example`` of them, one GRPO group): a fresh proxy session (its own API
key) -> the environment runs one episode of that task with its model calls pointed at the session
(base URL + key, as verifiers points any OpenAI-compatible endpoint) -> its rubric (the task's
``@vf.reward`` functions, weighted) gives the reward -> the session's recorded completions become
the trajectory (the tokens sampled, turns chained, tool results and user turns masked, template
drift counted in ``info["template_drift"]``) -> the session is closed.

Where verifiers runs: in its own process and its own virtual environment. ``verifiers`` 0.4 pins
``openai<3`` and agentflow's ``agents`` extra needs ``openai>=3``, so they cannot share one
environment. The workflow starts ``_verifiers_runner.py`` (shipped beside this file; standard
library + verifiers only) with that environment's Python, once per workflow, and sends it one
request per rollout over stdin/stdout; the runner keeps the environment loaded (its tool servers
and verifiers' interception server stay up) and runs rollouts concurrently.
``scripts/verifiers_env.sh`` builds that environment.

An episode that fails in the environment (its agent program crashed, a tool server failed, the
rubric raised or returned a non-number) rejects the whole group with the environment's error
quoted. Not here: installing environments (put their folder in ``env_path`` or install them into
the verifiers environment), verifiers' remote sandboxes (roles run as local subprocesses unless
``env_config`` gives them another runtime), multi-agent environments whose other roles also use
the policy (their calls would be recorded as policy tokens).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import pathlib
import signal
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from agentflow import GenerationConfig, InferenceEngine, Trajectory
from agentflow.envs.tasks import TaskData, TaskSpec
from agentflow.errors import ConfigError, WorkflowError

__all__ = ["VerifiersConfig", "VerifiersWorkflow", "default_venv", "find_python", "verifiers_rows"]

RUNNER = pathlib.Path(__file__).with_name("_verifiers_runner.py")
PYTHON_VARIABLE = "AGENTFLOW_VERIFIERS_PYTHON"


def default_venv() -> pathlib.Path:
    """Where ``scripts/verifiers_env.sh`` builds the verifiers environment by default: outside the
    checkout (one for every checkout of the machine), under ``$XDG_CACHE_HOME`` or ``~/.cache``."""
    cache = os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache"
    return pathlib.Path(cache) / "agentflow" / "verifiers-venv"


_TAIL = 1500  # characters of an environment error or of the runner's stderr quoted in a reason


@dataclass(frozen=True, slots=True)
class VerifiersConfig:
    """Attributes:
    env: the environment: a verifiers taskset id (an installed package, or a folder in
        ``env_path``, exporting its ``Taskset`` in ``__all__``), e.g. ``vf_arithmetic``.
    env_args: the taskset's config fields (verifiers' ``--env.taskset.*``), e.g. ``{num_tasks: 500}``.
    env_config: the rest of verifiers' environment config (``--env.*``), e.g. a role's harness
        ``{agent: {harness: {id: null}, max_turns: 4}}``; roles without a ``runtime`` run as
        local subprocesses.
    env_path: folders put first on the environment's ``sys.path`` (relative to the working
        directory), so an environment package needs no installing.
    rollouts_per_example: episodes per data row, one GRPO group (None: ``generation.n_samples``,
        and ``trainer.eval_samples`` when evaluating).
    python: the Python of the environment where ``verifiers`` is installed (None: the
        ``AGENTFLOW_VERIFIERS_PYTHON`` variable, else ``~/.cache/agentflow/verifiers-venv/bin/python``).
    model: the model name the environment's agents send (the proxy serves the policy whatever it is).
    timeout_s: deadline of one episode (its agent program, tools and rubric).
    startup_timeout_s: deadline for the runner to load the environment.
    gconfig: the sessions' default sampling; ``temperature``, ``top_p`` and ``max_new_tokens``
        (per model turn) are also sent as the environment's sampling.
    tool_parser: the sessions' tool-call format (``qwen``: ``<tool_call>{json}</tool_call>``;
        ``none``: replies stay text).
    """

    env: str = ""
    env_args: dict[str, Any] = field(default_factory=dict)
    env_config: dict[str, Any] = field(default_factory=dict)
    env_path: tuple[str, ...] = ()
    rollouts_per_example: int | None = None
    python: str | None = None
    model: str = "policy"
    timeout_s: float = 600.0
    startup_timeout_s: float = 180.0
    gconfig: GenerationConfig = field(default_factory=lambda: GenerationConfig(max_new_tokens=256))
    tool_parser: str = "qwen"

    def __post_init__(self) -> None:
        object.__setattr__(self, "env_path", tuple(str(p) for p in _as_tuple(self.env_path)))
        problems = []
        if not isinstance(self.env, str) or not self.env.strip():
            problems.append(
                f"env must name a verifiers environment (its taskset id, e.g. 'vf_arithmetic'); got {self.env!r}"
            )
        for name in ("env_args", "env_config"):
            if not isinstance(getattr(self, name), Mapping):
                problems.append(f"{name} must be a mapping of verifiers config fields, got {getattr(self, name)!r}")
        if "taskset" in (self.env_config if isinstance(self.env_config, Mapping) else {}):
            problems.append("env_config.taskset: give the taskset's fields as env_args and its id as env")
        n = self.rollouts_per_example
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            problems.append(
                f"rollouts_per_example must be an integer >= 1 (or null for generation.n_samples), got {n!r}"
            )
        for name in ("timeout_s", "startup_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"{name} must be > 0 seconds, got {getattr(self, name)}")
        ConfigError.check(problems)


def _as_tuple(value: Any) -> tuple[Any, ...]:
    return (value,) if isinstance(value, str) else tuple(value or ())


def find_python(configured: str | None = None) -> str:
    """The verifiers environment's Python: ``configured``, else ``$AGENTFLOW_VERIFIERS_PYTHON``,
    else :func:`default_venv`'s; a clear error naming what was tried and how to build it."""
    tried = []
    for source, path in (
        ("workflow.options.python", configured),
        (f"${PYTHON_VARIABLE}", os.environ.get(PYTHON_VARIABLE)),
        ("the default", str(default_venv() / "bin" / "python")),
    ):
        if not path:
            continue
        if os.access(path, os.X_OK) and pathlib.Path(path).is_file():
            return path
        tried.append(f"{path} ({source})")
        if source != "the default":
            break  # an explicit choice that does not exist is an error, not a reason to look elsewhere
    raise ConfigError(
        f"the verifiers workflow needs a Python environment with verifiers installed; no Python at "
        f"{', '.join(tried)}. Build one with `bash scripts/verifiers_env.sh` (it creates "
        f"{default_venv()}/), or set workflow.options.python (or ${PYTHON_VARIABLE}) to its bin/python"
    )


class _Runner:
    """The runner process: one request per rollout, replies matched by id."""

    def __init__(self, proc: asyncio.subprocess.Process, what: str) -> None:
        self.proc = proc
        self.what = what
        self.tasks = 0
        self.env_id = ""
        self.failure: str | None = None
        self._ids = itertools.count()
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._stderr: deque[str] = deque(maxlen=200)
        loop = asyncio.get_running_loop()
        self._ready: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._readers = [loop.create_task(self._read_stdout()), loop.create_task(self._read_stderr())]

    @classmethod
    async def start(cls, cfg: VerifiersConfig, python: str) -> _Runner:
        """Start the runner with the environment's Python and wait until it has loaded ``cfg.env``."""
        spec = _runner_spec(cfg)
        # the environment's bin/ first: verifiers' chat programs are run with the uv installed there
        env = {**os.environ, "PATH": f"{pathlib.Path(python).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        try:
            proc = await asyncio.create_subprocess_exec(
                python,
                str(RUNNER),
                "--spec",
                json.dumps(spec),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,
                limit=1 << 24,
            )
        except OSError as e:
            raise ConfigError(f"cannot start the verifiers runner with {python}: {e}") from e
        runner = cls(proc, f"verifiers environment {cfg.env!r}")
        try:
            await runner._wait_ready(cfg.startup_timeout_s)
        except BaseException:
            await runner.stop()
            raise
        return runner

    def stderr_tail(self) -> str:
        return "".join(self._stderr)[-_TAIL:]

    async def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        while line := await self.proc.stdout.readline():
            message = json.loads(line)
            if "event" in message:
                if not self._ready.done():
                    self._ready.set_result(message)
            elif (fut := self._waiting.pop(message.get("id", -1), None)) is not None and not fut.done():
                fut.set_result(message)
        code = await self.proc.wait()
        with contextlib.suppress(asyncio.TimeoutError):  # the rest of its stderr, for the reason below
            await asyncio.wait_for(asyncio.shield(self._readers[1]), 2.0)
        self.failure = (
            f"the verifiers runner for {self.what} exited (code {code}); its stderr ends with: {self.stderr_tail()!r}"
        )
        for fut in [self._ready, *self._waiting.values()]:
            if not fut.done():
                fut.set_exception(WorkflowError(self.failure))
        self._waiting.clear()

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        while chunk := await self.proc.stderr.read(65536):
            self._stderr.append(chunk.decode("utf-8", errors="replace"))

    async def _wait_ready(self, timeout_s: float) -> None:
        try:
            async with asyncio.timeout(timeout_s):
                message = await self._ready
        except TimeoutError as e:
            raise WorkflowError(
                f"the verifiers runner did not load {self.what} within startup_timeout_s="
                f"{timeout_s}; its stderr ends with: {self.stderr_tail()!r}"
            ) from e
        except WorkflowError as e:
            raise ConfigError(f"verifiers could not load {self.what}: {e}") from e
        if message.get("event") != "ready":
            raise ConfigError(f"verifiers could not load {self.what}: {str(message.get('error', message))[-_TAIL:]}")
        self.tasks, self.env_id = int(message["tasks"]), str(message.get("env_id", ""))

    async def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        if self.failure is not None:
            raise WorkflowError(self.failure)
        rid = next(self._ids)
        fut = self._waiting[rid] = asyncio.get_running_loop().create_future()
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"id": rid, **payload}) + "\n").encode())
            await self.proc.stdin.drain()
            return await fut
        except (BrokenPipeError, ConnectionResetError) as e:
            raise WorkflowError(self.failure or f"the verifiers runner for {self.what} stopped reading: {e}") from e
        finally:
            self._waiting.pop(rid, None)

    async def stop(self, grace_s: float = 10.0) -> None:
        """End of stdin (the environment's servers stop), then SIGKILL after ``grace_s``."""
        proc = self.proc
        if proc.stdin is not None and not proc.stdin.is_closing():
            proc.stdin.close()
        try:
            async with asyncio.timeout(grace_s):
                await proc.wait()
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            await asyncio.shield(proc.wait())
        for reader in self._readers:
            with contextlib.suppress(asyncio.CancelledError):
                await reader


class VerifiersWorkflow:
    """Trains on the verifiers environment ``config.env``; ``data`` is a row of ``data.task=verifiers``
    (``{"index": i, ...}``: the environment's i-th task).

    Args:
        tokenizer: the served model's tokenizer (with its chat template).
        gconfig: sampling; ``n_samples`` is the group size unless ``rollouts_per_example`` is set.
        config: the environment and its limits; keyword options build one when ``config`` is None.
    """

    def __init__(
        self,
        tokenizer: Any,
        gconfig: GenerationConfig | None = None,
        config: VerifiersConfig | None = None,
        **options: Any,
    ) -> None:
        if config is not None and options:
            raise ConfigError(f"pass either config= or keyword options, not both; got options {sorted(options)}")
        if gconfig is not None and "gconfig" not in options and config is None:
            options["gconfig"] = gconfig.new(n_samples=1)
        self.tokenizer = tokenizer
        self.config = config or VerifiersConfig(**options)
        from agentflow.proxy import ProxyServer  # here, not on the event loop: it imports the web stack

        self._proxy_cls = ProxyServer
        self.n = self.config.rollouts_per_example or (gconfig.n_samples if gconfig is not None else 1)
        self._proxy: Any = None
        self.python = find_python(self.config.python)  # a missing verifiers environment fails here
        self._runner: _Runner | None = None
        self._load_error: ConfigError | None = None
        self._serving: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # ------------------------------------------------------------------ lifetime: proxy + runner
    async def __aenter__(self) -> VerifiersWorkflow:
        """Load the environment now (``agentflow train`` enters the workflow before any episode),
        so an environment that cannot load fails the run at once, not episode by episode."""
        async with self._lock:
            await self._ensure_runner()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Stop the runner (the environment's servers stop with it), then the proxy."""
        runner, proxy, serving = self._runner, self._proxy, self._serving
        self._runner = self._proxy = self._serving = None
        if runner is not None:
            await runner.stop()
        if proxy is not None:
            proxy.stop()
        if serving is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await serving

    async def _start(self, engine: InferenceEngine) -> tuple[Any, _Runner]:
        async with self._lock:
            runner = await self._ensure_runner()
            if self._proxy is None:
                cfg = self.config
                proxy = self._proxy_cls(engine, self.tokenizer, gconfig=cfg.gconfig, tool_parser=cfg.tool_parser)
                proxy.bind()
                self._serving = asyncio.get_running_loop().create_task(proxy.serve())
                self._proxy = proxy
            elif self._proxy.engine is not engine:
                raise WorkflowError("a VerifiersWorkflow serves one engine; build one workflow per engine")
            return self._proxy, runner

    async def _ensure_runner(self) -> _Runner:
        if self._runner is None:
            if self._load_error is not None:  # loading fails the same way every time: do not retry per episode
                raise self._load_error
            try:
                self._runner = await _Runner.start(self.config, self.python)
            except ConfigError as e:
                self._load_error = e
                raise
        return self._runner

    # ------------------------------------------------------------------ one data row = one group
    async def arun_episode(self, engine: InferenceEngine, data: Any) -> list[Trajectory]:
        index = task_index(data)
        proxy, runner = await self._start(engine)
        if index >= runner.tasks:
            raise WorkflowError(
                f"data row asks for task {index} but {runner.what} has {runner.tasks} tasks; "
                "lower data.size + data.eval_size or give the environment more tasks (env_args)"
            )
        try:
            async with asyncio.TaskGroup() as tg:
                runs = [tg.create_task(self._rollout(proxy, runner, index, k)) for k in range(self.n)]
        except ExceptionGroup as group:  # one failed rollout rejects the group: raise its own error
            raise _first(group) from None
        group = uuid.uuid4().hex
        return [t.with_(group_id=group) for run in runs for t in run.result()]

    async def _rollout(self, proxy: Any, runner: _Runner, index: int, k: int) -> list[Trajectory]:
        cfg = self.config
        session = proxy.new_session()
        try:
            try:
                async with asyncio.timeout(cfg.timeout_s):
                    reply = await runner.request(
                        {
                            "index": index,
                            "base_url": session.base_url,
                            "api_key": session.api_key,
                            "model": cfg.model,
                            "sampling": _sampling(cfg.gconfig),
                            "timeout_s": cfg.timeout_s,
                        }
                    )
            except TimeoutError as e:
                raise WorkflowError(
                    f"{runner.what}: the episode of task {index} ran longer than timeout_s="
                    f"{cfg.timeout_s} (raise timeout_s or bound the agent's turns)"
                ) from e
            return self._trajectories(session, reply, runner, index, k)
        finally:
            proxy.close_session(session)

    def _trajectories(
        self, session: Any, reply: dict[str, Any], runner: _Runner, index: int, k: int
    ) -> list[Trajectory]:
        where = f"{runner.what}, task {index}, rollout {k + 1} of {self.n}"
        if not reply.get("ok"):
            raise WorkflowError(f"{where} failed in the environment: {str(reply.get('error'))[-_TAIL:]}")
        reward = reply.get("reward")
        if isinstance(reward, bool) or not isinstance(reward, int | float):
            raise WorkflowError(f"{where}: the rubric's reward must be a number, got {reward!r}")
        records = session.client.records
        if not records:
            raise WorkflowError(f"{where}: the episode made no model call through the proxy; expected at least one")
        for record in records:  # every conversation of the episode earns the episode's reward
            session.set_reward(record.id, float(reward))
        stats = session.stats
        info = {
            "task_index": index,
            "turns": len(records),
            "tool_calls": stats["tool_calls"],
            "template_drift": stats["template_drift"],
            "template_not_prefix": stats["template_not_prefix"],
            "env_rewards": reply.get("rewards", {}),
            "env_turns": reply.get("turns"),
        }
        return [t.with_(info={**t.info, **info}) for t in session.export_trajectories(style="concat")]


def _first(group: BaseExceptionGroup) -> BaseException:
    first = group.exceptions[0]
    return _first(first) if isinstance(first, BaseExceptionGroup) else first


def _runner_spec(cfg: VerifiersConfig) -> dict[str, Any]:
    paths = [os.path.abspath(p) for p in cfg.env_path]
    return {"env": cfg.env, "env_args": dict(cfg.env_args), "env_config": dict(cfg.env_config), "paths": paths}


def task_index(data: Any) -> int:
    """The environment task a data row names (rows of ``data.task=verifiers``)."""
    index = data.get("index") if isinstance(data, Mapping) else None
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        keys = sorted(data) if isinstance(data, Mapping) else type(data).__name__
        raise WorkflowError(
            f"the verifiers workflow takes rows of data.task=verifiers ({{'index': i, ...}}); got a row "
            f"with {keys}. Set data.task: verifiers"
        )
    return index


def _sampling(g: GenerationConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"max_tokens": g.max_new_tokens}
    if g.temperature is not None:
        out["temperature"] = 0.0 if g.greedy else g.temperature
    if g.top_p is not None and g.top_p < 1.0:
        out["top_p"] = g.top_p
    return out


def verifiers_rows(spec: TaskSpec) -> TaskData:
    """``data.task=verifiers``: held-out rows are the environment's first ``eval_size`` tasks and
    training rows the next ``size`` (so held-out tasks are never trained on); the workflow's
    environment's rubric scores them, so the rewards here are never called."""

    def rows(split: str, start: int, n: int) -> list[dict[str, Any]]:
        return [{"id": f"vf-{i}", "index": i, "split": split} for i in range(start, start + n)]

    return TaskData(
        rows("train", spec.eval_size, spec.size), rows("eval", 0, spec.eval_size), _rubric_only, _rubric_only
    )


async def _rubric_only(completion: str, task: Any) -> float:
    raise WorkflowError("data.task=verifiers rows are scored by the environment's rubric; use workflow.name=verifiers")
