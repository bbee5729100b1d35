"""The one exception tree of agentflow.

Every error agentflow raises on purpose derives from :class:`AgentflowError`::

    AgentflowError
    ├── ConfigError            bad configuration; lists every problem at once
    ├── EngineError            an inference or train engine failed
    │   ├── EngineTimeout      a call to an engine exceeded its deadline
    │   └── ServerError        an SGLang(-protocol) server answered with an error
    ├── WorkflowError          a workflow returned a non-trajectory, or its episodes keep being rejected
    ├── TrajectoryError        a trajectory's fields are inconsistent
    ├── EnvError               an environment failed (reward, tool, dataset)
    │   └── SandboxError       the code sandbox could not run the code at all
    ├── CheckpointError        a checkpoint is missing, partial or from another run
    └── Interrupted            the run was stopped by a signal (``exit_code`` = 128 + its number)

Messages say what was expected, what was received and how to fix it.

Expected per-episode failures (a workflow raising, a reward timing out) never escape the executor:
they become rejected episodes with a counted reason. Only ``rollout.max_consecutive_rejections``
of them in a row do, as one ``WorkflowError`` raised to whoever waits for trajectories.
These classes are for the caller's side.
"""

from __future__ import annotations

__all__ = [
    "AgentflowError",
    "CheckpointError",
    "ConfigError",
    "EngineError",
    "EngineTimeout",
    "EnvError",
    "Interrupted",
    "PromptTooLong",
    "SandboxError",
    "ServerError",
    "TrajectoryError",
    "WorkflowError",
]


class AgentflowError(Exception):
    """Base of every error agentflow raises on purpose."""


class ConfigError(AgentflowError, ValueError):
    """Invalid configuration. ``problems`` holds one line per bad field."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{len(self.problems)} configuration problem(s):\n{lines}")


    @classmethod
    def check(cls, problems: list[str]) -> None:
        """Raise one error listing every problem, if there are any (configs call it in ``__post_init__``)."""
        if problems:
            raise cls(problems)


class EngineError(AgentflowError):
    """An inference or train engine failed."""


class EngineTimeout(EngineError, TimeoutError):
    """A call to an engine exceeded its deadline."""


class PromptTooLong(EngineError, ValueError):
    """A request's prompt does not fit the engine's context (``max_seq_len``; a server's context
    length). The caller's input, not an engine failure: the proxy answers it with 400."""


class ServerError(EngineError):
    """An SGLang-protocol server answered with an error status."""

    def __init__(self, message: str, status_code: int | None = None) -> None:
        self.status_code = status_code
        super().__init__(message)


class WorkflowError(AgentflowError):
    """A workflow broke its contract (e.g. returned a value that is not a Trajectory), or its
    episodes were rejected ``rollout.max_consecutive_rejections`` times in a row."""


class TrajectoryError(AgentflowError, ValueError):
    """A trajectory's fields do not line up."""


class EnvError(AgentflowError):
    """An environment failed: a reward function, a tool or a dataset."""


class SandboxError(EnvError):
    """The sandbox could not run the code at all (not: the code failed)."""


class CheckpointError(AgentflowError):
    """A checkpoint is missing, partial, or does not match the run."""


class Interrupted(AgentflowError):
    """The run stopped on SIGINT/SIGTERM; the message says where it stands. ``exit_code``: 128 + signal."""

    def __init__(self, message: str, exit_code: int = 130) -> None:
        self.exit_code = exit_code
        super().__init__(message)
