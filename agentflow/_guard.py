"""A guard around a workflow's episodes: no ``SystemExit`` escapes, and a blocked loop is named.

:func:`guard_workflow` returns a workflow whose ``arun_episode`` runs the original one and

- turns ``SystemExit`` raised by the episode (``sys.exit`` in a reward function, a library that
  exits) into a :class:`WorkflowError`, so the executor rejects that episode with the reason
  instead of the process ending with the episode's exit code;
- times every synchronous stretch of the episode (each step of its coroutine between two awaits):
  a stretch longer than ``block_warn_s`` held the shared event loop (every other episode, the
  weight updates and the proxy waited), so it logs a warning naming the workflow class, at most
  once per ``warn_every_s``.

The timing wraps the coroutine's own ``send``/``throw`` calls, so it measures exactly the time
the episode held the loop, not time it spent awaiting. Not here: running episodes (the executor).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Coroutine, Generator
from typing import Any

from agentflow.errors import WorkflowError

__all__ = ["GuardedWorkflow", "guard_workflow"]

log = logging.getLogger("agentflow.executor")


class GuardedWorkflow:
    """Forwards attributes to ``inner``; ``arun_episode`` is guarded (see the module docstring)."""

    def __init__(self, inner: Any, *, block_warn_s: float = 1.0, warn_every_s: float = 60.0) -> None:
        self.inner = inner
        self.block_warn_s = block_warn_s
        self.warn_every_s = warn_every_s
        self.longest_block_s = 0.0
        self._last_warned = -float("inf")

    @property
    def name(self) -> str:
        return type(self.inner).__qualname__

    async def arun_episode(self, engine: Any, data: Any) -> Any:
        try:
            return await _Timed(self.inner.arun_episode(engine, data), self._on_step)
        except SystemExit as e:
            raise WorkflowError(f"workflow {self.name}: arun_episode raised SystemExit({e.code!r}); expected it to "
                                "return a Trajectory, a list of them or None. The episode is rejected; "
                                "sys.exit() does not end the run") from None

    def _on_step(self, seconds: float) -> None:
        if seconds < self.block_warn_s:
            return
        self.longest_block_s = max(self.longest_block_s, seconds)
        now = time.monotonic()
        if now - self._last_warned < self.warn_every_s:
            return
        self._last_warned = now
        log.warning("workflow %s blocked the event loop for %.1fs without awaiting (every episode, weight update "
                    "and proxy request waited meanwhile); move blocking calls (time.sleep, requests, heavy CPU "
                    "work) into `await asyncio.to_thread(...)`. Longest block so far: %.1fs",
                    self.name, seconds, self.longest_block_s)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def guard_workflow(workflow: Any, *, block_warn_s: float = 1.0) -> Any:
    """``workflow`` guarded once (a guarded workflow is returned as is)."""
    if isinstance(workflow, GuardedWorkflow):
        return workflow
    return GuardedWorkflow(workflow, block_warn_s=block_warn_s)


class _Timed:
    """Awaits ``coro`` step by step, reporting the duration of each synchronous step."""

    def __init__(self, coro: Coroutine[Any, Any, Any], on_step: Any) -> None:
        self.coro, self.on_step = coro, on_step

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        value: Any = None
        error: BaseException | None = None
        while True:
            t0 = time.perf_counter()
            try:
                out = coro.throw(error) if error is not None else coro.send(value)
            except StopIteration as stop:
                self.on_step(time.perf_counter() - t0)
                return stop.value
            finally:
                error = None
            self.on_step(time.perf_counter() - t0)
            try:
                value = yield out
            except GeneratorExit:
                coro.close()
                raise
            except BaseException as e:  # cancellation and errors thrown in go on to the episode
                error, value = e, None
