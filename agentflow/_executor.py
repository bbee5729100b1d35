"""Runs workflow episodes on the caller's event loop under the staleness bound.

Each submitted item is one admission unit: ``episodes_per_item`` calls of ``workflow.arun_episode(engine,
data)`` whose trajectories form one group (one ``group_id``). Items wait in a FIFO queue and
start the moment the staleness manager grants capacity: admission is a synchronous call made when
a slot frees (episode end, version bump, resume, give-back), so there is no dispatcher task and
no polling.

Failure policy: a workflow that raises, times out, returns ``None`` or returns something that is
not a trajectory is a *rejected* sample with a counted reason; an item with no accepted sample is
a rejected item and gives its slot back. Only bugs in the executor itself propagate (and cancel
the task group). Exiting the ``async with`` block cancels every running episode.

Fail fast: ``rollout.max_consecutive_rejections`` rejected items in a row (no accepted one between
them) put the executor in a failed state: it admits nothing more and hands one ``WorkflowError``
quoting the last reasons to the buffer, so every consumer that would wait for trajectories raises
it at once instead of waiting out its timeout. Buffered groups and queued items stay (checkpointable).

Not here: generation (engines), training (the trainer thread), persistence (checkpoints save
:meth:`pending` and the buffer's state).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from agentflow._buffer import Group, ReplayBuffer
from agentflow._rollout_config import RolloutConfig
from agentflow._staleness import StalenessManager
from agentflow._types import Trajectory
from agentflow._wakeup import Wakeup
from agentflow.errors import AgentflowError, WorkflowError

if TYPE_CHECKING:
    from agentflow._engine_api import InferenceEngine, RolloutWorkflow

__all__ = ["WorkflowExecutor"]

log = logging.getLogger("agentflow.executor")
_MAX_LOGGED_FAILURES = 20
_QUOTED_REASONS = 3  # distinct rejection reasons quoted by the consecutive-rejections error
_MAX_REASON_CHARS = 300


@dataclass(slots=True)
class _Item:
    data: Any
    workflow: Any
    group_id: str
    requeues: int = 0
    done: asyncio.Future[bool] | None = None  # set by rollout(): resolves to accepted?
    submitted_at: float = field(default_factory=time.perf_counter)


class WorkflowExecutor:
    """Admits, runs and collects workflow episodes for one inference engine.

    Use as ``async with executor:`` (engines do this in their own ``async with``). All methods
    must be called on the event loop's thread except where noted.
    """

    def __init__(self, engine: InferenceEngine, config: RolloutConfig, buffer: ReplayBuffer | None = None) -> None:
        self.engine = engine
        self.config = config
        self.buffer = buffer if buffer is not None else ReplayBuffer(config)
        self.buffer.on_discard = self._on_discard
        self.staleness = StalenessManager(
            max_staleness=config.max_staleness,
            max_concurrent=config.max_concurrent,
            batch_size=config.consumer_batch_size,
        )
        self._queue: deque[_Item] = deque()
        self._running: dict[asyncio.Task[None], _Item] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._paused = False
        self._n_failures_logged = 0
        self._ids = itertools.count()
        self._run_prefix = uuid.uuid4().hex[:8]
        self.admission_latencies: deque[float] = deque(maxlen=10_000)  # seconds, slot freed -> started
        self._room = Wakeup()  # feeders waiting for queue room
        self._consecutive_rejections = 0
        self._recent_reasons: deque[str] = deque(maxlen=_QUOTED_REASONS)  # distinct, newest last
        self._failure: WorkflowError | None = None

    # ------------------------------------------------------------------ lifetime
    async def __aenter__(self) -> WorkflowExecutor:
        if self._tg is not None:
            raise RuntimeError("WorkflowExecutor is already running; enter it once")
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        self._admit()
        return self

    async def __aexit__(self, *exc: object) -> None:
        tg, self._tg = self._tg, None
        if tg is None:
            return
        for task in list(self._running):
            task.cancel()
        await tg.__aexit__(*exc)  # type: ignore[arg-type]  # TaskGroup accepts exc_info triples

    # ------------------------------------------------------------------ submission API
    def submit(self, data: Any, workflow: RolloutWorkflow, *, group_id: str | None = None) -> str:
        """Queue one item; it starts as soon as capacity allows. Returns its group id."""
        if not callable(getattr(workflow, "arun_episode", None)):
            raise WorkflowError(
                f"expected a workflow with `async def arun_episode(engine, data)`, got {type(workflow).__name__}"
            )
        item = _Item(data, workflow, group_id or f"{self._run_prefix}-{next(self._ids)}")
        self._enqueue(item)
        return item.group_id

    async def wait(self, count: int, timeout: float | None = None) -> list[Trajectory]:  # noqa: ASYNC109
        """Await ``count`` accepted items from the buffer; return their trajectories.

        Same meaning as the seed API's ``wait`` (a coroutine here). ``timeout`` (seconds) raises
        ``TimeoutError`` and leaves the buffer untouched.
        """
        async with asyncio.timeout(timeout):
            return await self.buffer.aget_batch(count, version=self.staleness.version)

    async def rollout(self, data: Sequence[Any], workflow: RolloutWorkflow) -> list[Trajectory]:
        """Submit every item, wait until each is accepted or rejected, return the accepted ones.

        Meant for synchronous use (evaluation, eta = 0 loops): it takes as many items from the
        buffer as it saw accepted, so run it while nothing else is being submitted.
        """
        if self._failure is not None:
            raise self._failure
        loop = asyncio.get_running_loop()
        items = []
        for d in data:
            item = _Item(d, workflow, f"{self._run_prefix}-{next(self._ids)}", done=loop.create_future())
            self._enqueue(item)
            items.append(item)
        accepted = [await item.done for item in items if item.done is not None]
        if self._failure is not None:  # the accepted groups stay in the buffer
            raise self._failure
        return await self.buffer.aget_batch(sum(accepted), version=self.staleness.version)

    async def wait_for_room(self, max_queued: int) -> None:
        """Return once fewer than ``max_queued`` items wait in the queue (for data feeders).

        Woken by admission, never by polling.
        """
        while len(self._queue) >= max_queued:
            await self._room.wait()

    def pause(self) -> None:
        """Stop admitting new items (running ones continue; engines interrupt generation)."""
        self._paused = True

    def resume(self) -> None:
        self._paused = False
        self._admit()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def failure(self) -> WorkflowError | None:
        """Why the executor stopped admitting for good (too many consecutive rejections), or None."""
        return self._failure

    def set_version(self, version: int) -> None:
        self.staleness.set_version(version)
        self.buffer.set_version(version)
        self._admit()

    def recover(self, version: int, buffered: int = 0) -> None:
        """After loading a checkpoint at ``version``: ``accepted = version * B + buffered``
        (``buffered`` = groups restored into the buffer)."""
        self.staleness.recover(version, buffered)
        self.buffer.set_version(version)
        self._admit()

    # ------------------------------------------------------------------ views
    @property
    def n_queued(self) -> int:
        return len(self._queue)

    @property
    def n_running(self) -> int:
        return self.staleness.running

    def pending(self) -> list[dict[str, Any]]:
        """Items submitted but not yet accepted or rejected (for lossless checkpoints)."""
        items = [*self._running.values(), *self._queue]
        return [{"group_id": i.group_id, "data": i.data, "requeues": i.requeues} for i in items]

    def stats(self) -> dict[str, Any]:
        s, b = self.staleness.stats, self.buffer.stats
        return {
            "version": self.staleness.version,
            "submitted": s.submitted, "queued": len(self._queue), "running": self.staleness.running,
            "accepted": s.accepted, "rejected": s.n_rejected, "rejected_by_reason": dict(s.rejected),
            "buffered": len(self.buffer), "consumed": b.consumed, "dropped_stale": b.dropped,
            "requeued_stale": b.requeued, "kept_stale": b.kept_stale, "staleness_hist": dict(b.staleness),
            "filtered": b.filtered, "filtered_episodes": b.filtered_episodes,
        }

    # ------------------------------------------------------------------ admission
    def _enqueue(self, item: _Item) -> None:
        self.staleness.on_submit()
        self._queue.append(item)
        self._admit()

    def _admit(self, freed_at: float | None = None) -> None:
        if self._tg is None or self._paused or self._failure is not None or not self._queue:
            return
        n = min(self.staleness.capacity(), len(self._queue))
        for _ in range(n):
            item = self._queue.popleft()
            self.staleness.on_start()
            task = self._tg.create_task(self._run_item(item, freed_at))
            self._running[task] = item
        if n and self._room:
            self._room.wake_all()

    def _on_discard(self, group: Group, why: str) -> None:
        """The buffer dropped (stale, or rejected by a consumer's group filter) or requeued an
        accepted group at consume time: its staleness slot is free again."""
        self.staleness.on_give_back()
        if why == "requeue" and group.workflow is not None:
            item = _Item(group.data, group.workflow, group.group_id, requeues=group.requeues + 1)
            self._enqueue(item)
        else:
            self._admit()

    # ------------------------------------------------------------------ running
    async def _run_item(self, item: _Item, freed_at: float | None) -> None:
        if freed_at is not None:
            self.admission_latencies.append(time.perf_counter() - freed_at)
        accepted = False
        reasons: list[str] | None = None  # stays None if the episode is cancelled
        try:
            trajs, reasons = await self._run_samples(item)
            if trajs:
                group = Group(item.group_id, trajs, item.data, item.workflow, item.requeues)
                await self.buffer.put(group)
                accepted = True
                for r in reasons:  # partial groups: count the samples that failed
                    self.staleness.stats.rejected[f"sample:{r}"] += 1
        finally:
            task = asyncio.current_task()
            if task is not None:
                self._running.pop(task, None)
            if accepted:
                self.staleness.on_accept()
                self._consecutive_rejections = 0
                self._recent_reasons.clear()
            elif reasons is None:
                self.staleness.on_reject("cancelled")
            else:
                self.staleness.on_reject(reasons[0] if reasons else "empty")
                self._count_rejection()
            if item.done is not None and not item.done.done():
                item.done.set_result(accepted)
            self._admit(time.perf_counter())

    async def _run_samples(self, item: _Item) -> tuple[list[Trajectory], list[str]]:
        n = self.config.episodes_per_item
        if n == 1:
            results = [await self._run_one(item)]
        else:
            async with asyncio.TaskGroup() as tg:
                tasks = [tg.create_task(self._run_one(item)) for _ in range(n)]
            results = [t.result() for t in tasks]
        trajs: list[Trajectory] = []
        reasons: list[str] = []
        for got, reason in results:
            for t in got:
                if t.group_id != item.group_id:
                    # The executor owns group ids. Setting the field directly skips re-validating
                    # a trajectory that was validated when the workflow built it.
                    object.__setattr__(t, "group_id", item.group_id)
                trajs.append(t)
            if reason:
                reasons.append(reason)
        return trajs, reasons

    async def _run_one(self, item: _Item) -> tuple[list[Trajectory], str | None]:
        """One ``arun_episode`` call: (trajectories, None) or ([], reason). Never raises but cancel."""
        try:
            async with asyncio.timeout(self.config.episode_timeout_s):
                out = await item.workflow.arun_episode(self.engine, item.data)
        except TimeoutError as e:
            limit = self.config.episode_timeout_s
            self._note_reason(f"{type(e).__name__}: {e}" if str(e) else
                              f"timeout: arun_episode exceeded rollout.episode_timeout_s={limit}")
            return [], "timeout"
        except (AgentflowError, Exception) as e:  # a workflow's failure is data, not a crash
            self._log_failure(item, e)
            return [], type(e).__name__
        if out is None:
            self._note_reason("none: arun_episode returned None")
            return [], "none"
        trajs = [out] if isinstance(out, Trajectory) else out
        if not isinstance(trajs, list) or not trajs or not all(isinstance(t, Trajectory) for t in trajs):
            e = WorkflowError(
                f"arun_episode must return Trajectory | list[Trajectory] | None, got {type(out).__name__}"
            )
            self._log_failure(item, e)
            return [], "WorkflowError"
        return trajs, None

    def _log_failure(self, item: _Item, e: BaseException) -> None:
        leaf = e
        while isinstance(leaf, BaseExceptionGroup) and leaf.exceptions:  # a workflow's TaskGroup: say why
            leaf = leaf.exceptions[0]
        self._note_reason(f"{type(leaf).__name__}: {leaf}")
        if self._n_failures_logged < _MAX_LOGGED_FAILURES:
            self._n_failures_logged += 1
            log.warning("episode %s rejected: %s: %s", item.group_id, type(e).__name__, e, exc_info=e)
            if self._n_failures_logged == _MAX_LOGGED_FAILURES:
                log.warning("further episode failures are counted in stats() but not logged")

    # ------------------------------------------------------------------ fail fast
    def _note_reason(self, reason: str) -> None:
        """Remember a rejection reason for the consecutive-rejections error (distinct, newest last)."""
        if len(reason) > _MAX_REASON_CHARS:
            reason = reason[: _MAX_REASON_CHARS - 3] + "..."
        if reason in self._recent_reasons:
            self._recent_reasons.remove(reason)
        self._recent_reasons.append(reason)

    def _count_rejection(self) -> None:
        """One more finished item had no accepted sample; stop at ``max_consecutive_rejections``."""
        self._consecutive_rejections += 1
        limit = self.config.max_consecutive_rejections
        if limit is None or self._consecutive_rejections < limit or self._failure is not None:
            return
        reasons = "; ".join(repr(r) for r in reversed(self._recent_reasons)) or "none recorded"
        self._failure = WorkflowError(
            f"{self._consecutive_rejections} consecutive episodes were rejected and none accepted "
            f"(expected at least one accepted episode in every rollout.max_consecutive_rejections={limit}; "
            f"{self.staleness.stats.accepted} accepted in this run), so rollout has stopped. "
            f"Last distinct reasons, newest first: {reasons}. To fix: make the workflow succeed (its first "
            f"{_MAX_LOGGED_FAILURES} exceptions are logged with tracebacks by 'agentflow.executor'), check that "
            "prompts fit the inference engine's max_seq_len, or raise rollout.max_consecutive_rejections "
            "(null disables this check)."
        )
        log.error("%s", self._failure)
        for item in self._queue:  # rollout() callers waiting on items that will never start
            if item.done is not None and not item.done.done():
                item.done.set_result(False)
        self.buffer.fail(self._failure)
