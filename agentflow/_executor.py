"""Runs workflow episodes on the caller's event loop under the staleness bound.

Each submitted item is one admission unit: ``episodes_per_item`` calls of ``workflow.arun_episode(engine,
data)`` whose trajectories form one group (one ``group_id``). Items wait in a FIFO queue and
start the moment the staleness manager grants capacity: admission is a synchronous call made when
a slot frees (episode end, version bump, resume, give-back), so there is no dispatcher task and
no polling. Per episode the bookkeeping is O(1) (dict and deque operations, one task).

Two ways in:

- ``submit`` + ``wait`` / the trainer's ``get_groups``: items run under the staleness budget and
  their groups go through the replay buffer (training data).
- ``rollout(items)``: items run under ``max_concurrent`` only and their groups go straight back to
  the caller, never through the buffer. The caller holds every trajectory the moment the call
  returns, so nothing waits to be trained on and the staleness budget has nothing to bound;
  ``buffer_size`` does not apply either. This is evaluation, or a synchronous loop.

No silent waits: ``wait`` and ``rollout`` raise at once, naming the bound and how to change it,
when what they ask for cannot arrive without an outside action (a version bump for the staleness
budget, ``resume()`` for an engine paused outside a weight update, entering the engine). Every
item that ends without trajectories has a counted reason: the workflow's failure, ``timeout``,
``cancelled``, or "timed out waiting for buffer space" (``put`` waits at most
``rollout.episode_timeout_s`` for room in a full buffer).

Failure policy: a workflow that raises, times out, returns ``None`` or returns something that is
not a trajectory is a *rejected* sample with a counted reason; an item with no accepted sample is
a rejected item and gives its slot back. Only bugs in the executor itself propagate (and cancel
the task group). Exiting the ``async with`` block cancels every running episode.

Fail fast: ``rollout.max_consecutive_rejections`` rejected items in a row (no accepted one between
them; cancellations do not count) put the executor in a failed state: it admits nothing more and
hands one ``WorkflowError`` quoting the last reasons to the buffer, so every consumer that would
wait for trajectories raises it at once instead of waiting out its timeout. Buffered groups and
queued items stay (checkpointable).

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
from agentflow.errors import AgentflowError, EngineError, WorkflowError

if TYPE_CHECKING:
    from agentflow._engine_api import InferenceEngine, RolloutWorkflow
    from agentflow._trace import Timeline

__all__ = ["BUFFER_FULL", "CANCELLED", "RolloutBlocked", "WorkflowExecutor"]

log = logging.getLogger("agentflow.executor")
_MAX_LOGGED_FAILURES = 20
_QUOTED_REASONS = 3  # distinct rejection reasons quoted by the consecutive-rejections error
_MAX_REASON_CHARS = 300
CANCELLED = "cancelled"  # reason of an item whose episode (or rollout() call) was cancelled
BUFFER_FULL = "timed out waiting for buffer space"  # reason of an item whose put hit its deadline
FILTERED = "filter"  # an accepted group the buffer's arrival filter rejected (not a rejection)


class RolloutBlocked(EngineError):
    """``wait`` / ``rollout`` asked for trajectories that cannot arrive without an outside action
    (a version bump, ``resume()``, entering the engine). The message names the bound and the fix."""


@dataclass(slots=True)
class _Item:
    data: Any
    workflow: Any
    group_id: str
    requeues: int = 0
    done: asyncio.Future[Group | None] | None = None  # set by rollout(): the group, or None if rejected
    direct: bool = False  # a rollout() item: no staleness budget, no buffer
    started_at: int | None = None  # the version it started at (submitted items; the buffer tracks them)
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
            ramp=config.staleness_ramp,
        )
        self._queue: deque[_Item] = deque()  # submitted items (staleness budget, buffer)
        self._direct: deque[_Item] = deque()  # rollout() items (concurrency slots only)
        self._running: dict[asyncio.Task[None], _Item] = {}
        self._tg: asyncio.TaskGroup | None = None
        self._paused = False
        self._pause_is_update = False  # paused by a weight update (it resumes by itself)
        self._n_failures_logged = 0
        self._ids = itertools.count()
        self._run_prefix = uuid.uuid4().hex[:8]
        self.admission_latencies: deque[float] = deque(maxlen=10_000)  # seconds, slot freed -> started
        self._room = Wakeup()  # feeders waiting for queue room
        self._consecutive_rejections = 0
        self._recent_reasons: deque[str] = deque(maxlen=_QUOTED_REASONS)  # distinct, newest last
        self._failure: WorkflowError | None = None
        self.timeline: Timeline | None = None  # set by the trainer when the run traces itself

    # ------------------------------------------------------------------ lifetime
    async def __aenter__(self) -> WorkflowExecutor:
        if self._tg is not None:
            raise RuntimeError("WorkflowExecutor is already running; enter it once")
        self.buffer.bind_loop(asyncio.get_running_loop())
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
        try:
            await tg.__aexit__(*exc)  # type: ignore[arg-type]  # TaskGroup accepts exc_info triples
        finally:
            for task, item in list(self._running.items()):  # cancelled before their first step ran
                del self._running[task]
                self._finish(item, None, CANCELLED)
            self._drop_direct(list(self._direct), EngineError(
                "the engine exited before these rollout() items could start; keep `async with engine:` "
                "open until rollout() returns"))

    # ------------------------------------------------------------------ submission API
    def submit(self, data: Any, workflow: RolloutWorkflow, *, group_id: str | None = None) -> str:
        """Queue one item; it starts as soon as capacity allows. Returns its group id."""
        _check_workflow(workflow)
        item = _Item(data, workflow, group_id or f"{self._run_prefix}-{next(self._ids)}")
        self._enqueue(item)
        return item.group_id

    async def wait(self, count: int, timeout: float | None = None) -> list[Trajectory]:  # noqa: ASYNC109
        """Await ``count`` accepted items from the buffer; return their trajectories.

        Same meaning as the seed API's ``wait`` (a coroutine here). ``timeout`` (seconds) raises
        ``TimeoutError`` and leaves the buffer untouched. Raises :class:`RolloutBlocked` at once
        (and later, the moment it becomes true) when ``count`` items cannot arrive before the
        policy version moves, or when the engine is paused outside a weight update.
        """
        if count > len(self.buffer):
            self._check_ready(f"wait({count})")
        try:
            async with asyncio.timeout(timeout):
                return await self.buffer.aget_batch(
                    count, version=self.staleness.version, check=lambda missing: self._check_wait(count, missing))
        except TimeoutError as e:
            raise TimeoutError(f"wait({count}) timed out after {timeout} s; {self._state_line()}") from e

    async def rollout(self, data: Sequence[Any], workflow: RolloutWorkflow) -> list[Trajectory]:
        """Run every item and return the trajectories of the accepted ones, in the order of ``data``.

        The items take ``max_concurrent`` slots but no staleness budget and never enter the replay
        buffer (their trajectories come straight back), so any number of them completes: for
        evaluation or a synchronous loop. Raises :class:`RolloutBlocked` at once if the engine is
        not entered or is paused outside a weight update. Cancelling the call cancels its items
        (counted as ``"cancelled"``).
        """
        _check_workflow(workflow)
        self._check_ready(f"rollout({len(data)} items)")
        loop = asyncio.get_running_loop()
        items = [_Item(d, workflow, f"{self._run_prefix}-{next(self._ids)}", done=loop.create_future(),
                       direct=True) for d in data]
        for item in items:
            self.staleness.on_submit()
            self._direct.append(item)
        self._admit()
        try:
            groups = [await item.done for item in items if item.done is not None]
        except BaseException:
            self._cancel_items(items)
            raise
        if self._failure is not None:
            raise self._failure
        return [t for g in groups if g is not None for t in g.trajectories]

    async def wait_for_room(self, max_queued: int) -> None:
        """Return once fewer than ``max_queued`` items wait in the queue (for data feeders).

        Woken by admission, never by polling.
        """
        while len(self._queue) >= max_queued:
            await self._room.wait()

    def pause(self, *, by_update: bool = False) -> None:
        """Stop admitting new items (running ones continue; engines interrupt generation).

        ``by_update``: the pause belongs to a weight update, which resumes by itself, so waiting
        consumers keep waiting; after any other pause ``wait``/``rollout`` raise until ``resume``.
        """
        self._paused = True
        self._pause_is_update = by_update

    def resume(self) -> None:
        self._paused = False
        self._pause_is_update = False
        self._admit()
        self.buffer.wake_consumers()  # a wait() that let a weight update pass re-checks its bound

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
        return len(self._queue) + len(self._direct)

    @property
    def n_running(self) -> int:
        return self.staleness.running + self.staleness.running_direct

    def pending(self) -> list[dict[str, Any]]:
        """Submitted items not yet accepted or rejected (for lossless checkpoints). Items of a
        ``rollout()`` call are left out: they belong to a caller that does not survive a restart."""
        items = [i for i in self._running.values() if not i.direct] + list(self._queue)
        return [{"group_id": i.group_id, "data": i.data, "requeues": i.requeues} for i in items]

    def stats(self) -> dict[str, Any]:
        s, b = self.staleness.stats, self.buffer.stats
        return {
            "version": self.staleness.version,
            "submitted": s.submitted, "queued": self.n_queued, "running": self.n_running,
            "accepted": s.accepted, "returned": s.returned, "rejected": s.n_rejected,
            "rejected_by_reason": dict(s.rejected),
            "buffered": len(self.buffer), "consumed": b.consumed, "dropped_stale": b.dropped,
            "requeued_stale": b.requeued, "kept_stale": b.kept_stale, "staleness_hist": dict(b.staleness),
            "filtered": b.filtered, "filtered_episodes": b.filtered_episodes,
            "held_for_expiring": b.held, "held_for_expiring_s": b.held_s,
        }

    def _state_line(self) -> str:
        st = self.staleness
        return (f"{len(self.buffer)} group(s) buffered, {st.running} running and {len(self._queue)} queued under "
                f"the staleness budget (version {st.version}, {st.accepted} accepted of the "
                f"{st.limit} it allows), {st.running_direct} rollout() item(s) running, paused={self._paused}")

    # ------------------------------------------------------------------ no silent waits
    def _check_ready(self, what: str) -> None:
        """Raise at once if nothing can start: failed, not entered, or paused outside a weight update."""
        if self._failure is not None:
            raise self._failure
        if self._tg is None:
            raise RolloutBlocked(
                f"{what} would wait forever: the engine's rollout is not running (expected `async with engine:` "
                "or `async with Rollout(engine, cfg):` around the call; the engine was not entered or has exited)")
        if self._paused and not self._pause_is_update:
            raise RolloutBlocked(
                f"{what} would wait forever: the engine is paused (engine.pause() was called and engine.resume() "
                "was not), so no item starts. Call `await engine.resume()` first.")

    def _check_wait(self, count: int, missing: int) -> None:
        """Raise if ``missing`` more groups cannot reach the buffer before the version moves.

        Not during a weight update: it is about to move the version (``resume`` wakes the waiter).
        """
        if self._paused and self._pause_is_update:
            return
        st = self.staleness
        can_arrive = st.deliverable()
        if missing <= can_arrive:
            return
        got = count - missing
        eta, v, b = st.eta, st.version, st.batch_size
        term = "min(max_staleness, version)" if st.ramp else "max_staleness"  # rollout.staleness_ramp
        raise RolloutBlocked(
            f"wait({count}) cannot finish at policy version {v}: the staleness bound lets "
            f"({term} + version + 1) * consumer_batch_size = ({eta} + {v} + 1) * {b} = {st.limit} items be "
            f"accepted before the version moves and {st.accepted} already were, so at most {can_arrive} more can "
            f"arrive ({got} taken by this call, {missing} missing). To fix: wait for at most the capacity at a time "
            "and move the version between waits (train on them, then Rollout.update_weights or engine.set_version), "
            "raise rollout.max_staleness or rollout.consumer_batch_size (or turn rollout.staleness_ramp off), or "
            "call engine.rollout(items, workflow), "
            "which returns its items' trajectories outside the staleness budget."
        )

    # ------------------------------------------------------------------ admission
    def _enqueue(self, item: _Item) -> None:
        self.staleness.on_submit()
        self._queue.append(item)
        self._admit()

    def _admit(self, freed_at: float | None = None) -> None:
        if self._tg is None or self._paused or self._failure is not None:
            return
        st = self.staleness
        while self._direct and st.free_slots() > 0:
            self._start(self._direct.popleft(), freed_at)
        if not self._queue:
            return
        n = min(st.capacity(), len(self._queue))
        for _ in range(n):
            self._start(self._queue.popleft(), freed_at)
        if n and self._room:
            self._room.wake_all()

    def _start(self, item: _Item, freed_at: float | None) -> None:
        assert self._tg is not None
        self.staleness.on_start(direct=item.direct)
        if not item.direct:
            item.started_at = self.staleness.version
            self.buffer.track_start(item.started_at)
        if self.timeline is not None:
            self.timeline.episode_start(item.group_id, self.staleness.version, direct=item.direct)
        task = self._tg.create_task(self._run_item(item, freed_at))
        self._running[task] = item

    def _on_discard(self, group: Group, why: str) -> None:
        """The buffer dropped (stale, or rejected by a consumer's group filter) or requeued an
        accepted group at consume time: its staleness slot is free again."""
        self.staleness.on_give_back()
        if self.timeline is not None:
            self.timeline.discard(group.group_id, why, group.min_version)
        if why == "requeue" and group.workflow is not None:
            item = _Item(group.data, group.workflow, group.group_id, requeues=group.requeues + 1)
            self._enqueue(item)
        else:
            self._admit()

    def _cancel_items(self, items: list[_Item]) -> None:
        """A rollout() call was cancelled: cancel its running items, drop its queued ones ("cancelled")."""
        mine = {id(i) for i in items}
        for task, item in list(self._running.items()):
            if id(item) in mine:
                task.cancel()
        self._drop_direct([i for i in self._direct if id(i) in mine], None)

    def _drop_direct(self, items: list[_Item], error: BaseException | None) -> None:
        """Remove queued rollout() items that will never start; count them as cancelled."""
        if not items:
            return
        gone = {id(i) for i in items}
        self._direct = deque(i for i in self._direct if id(i) not in gone)
        for item in items:
            self.staleness.on_drop_queued(CANCELLED)
            if item.done is not None and not item.done.done():
                if error is None:
                    item.done.set_result(None)
                else:
                    item.done.set_exception(error)

    # ------------------------------------------------------------------ running
    async def _run_item(self, item: _Item, freed_at: float | None) -> None:
        if freed_at is not None:
            self.admission_latencies.append(time.perf_counter() - freed_at)
        group: Group | None = None
        reason = CANCELLED  # what a cancellation (executor exit, cancelled rollout()) leaves
        try:
            group, reason = await self._produce(item)
        except Exception as e:  # a bug in the executor itself: recorded, then it propagates
            reason = f"executor:{type(e).__name__}"
            raise
        finally:
            self._finish(item, group, reason)

    async def _produce(self, item: _Item) -> tuple[Group | None, str]:
        """Run the item's episodes; buffer the group (submitted items). Returns (group, ""), (group,
        FILTERED) when the buffer's arrival filter turned it away, or (None, reason)."""
        trajs, reasons = await self._run_samples(item)
        if not trajs:
            return None, reasons[0] if reasons else "empty"
        group = Group(item.group_id, trajs, item.data, item.workflow, item.requeues)
        for r in reasons:  # partial groups: count the samples that failed
            self.staleness.stats.rejected[f"sample:{r}"] += 1
        if not item.direct:
            if not self.buffer.screen(group):
                return group, FILTERED
            try:
                await self.buffer.put(group, timeout=self.config.episode_timeout_s)
            except TimeoutError as e:
                self._note_reason(f"{BUFFER_FULL}: {e}")
                return None, BUFFER_FULL
        return group, ""

    def _finish(self, item: _Item, group: Group | None, reason: str) -> None:
        """Book the item's end, resolve its rollout() future, start what the freed slot allows."""
        task = asyncio.current_task()
        if task is not None:
            self._running.pop(task, None)
        st = self.staleness
        started_at, item.started_at = item.started_at, None
        if started_at is not None:
            self.buffer.track_end(started_at)
        if self.timeline is not None:
            outcome = reason or ("returned" if item.direct else "buffered")
            self.timeline.episode_end(item.group_id, started_at, st.version, outcome, direct=item.direct,
                                      samples=len(group.trajectories) if group is not None else 0)
        if group is not None:
            if item.direct:
                st.on_return()
            else:
                st.on_accept()
            self._consecutive_rejections = 0
            self._recent_reasons.clear()
            if reason == FILTERED:  # accepted, then dropped on arrival: the slot is free again
                self.staleness.on_give_back()
        else:
            st.on_reject(reason, direct=item.direct)
            if reason != CANCELLED:
                self._count_rejection()
            self.buffer.wake_consumers()  # a waiter may now be unable to finish: let it re-check
        if item.done is not None and not item.done.done():
            item.done.set_result(group)
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
        return self._within_caps(item, trajs)

    def _within_caps(self, item: _Item, trajs: list[Trajectory]) -> tuple[list[Trajectory], str | None]:
        """Reject an episode of more than ``max_trajectories_per_episode`` trajectories; drop each
        trajectory longer than ``max_trajectory_tokens`` (the reason is counted and noted)."""
        cap = self.config.max_trajectories_per_episode
        if len(trajs) > cap:
            self._log_failure(item, WorkflowError(
                f"arun_episode returned {len(trajs)} trajectories; expected at most "
                f"rollout.max_trajectories_per_episode={cap}. Return fewer (e.g. concat a conversation's "
                "turns) or raise the cap"))
            return [], "too_many_trajectories"
        limit = self.config.max_trajectory_tokens
        if limit is None or all(len(t) <= limit for t in trajs):
            return trajs, None
        longest = max(len(t) for t in trajs)
        self._log_failure(item, WorkflowError(
            f"a trajectory of {longest} tokens is longer than rollout.max_trajectory_tokens={limit} (what one "
            "train micro-batch holds); it was dropped. Cap the episode's length (max_new_tokens, turns) or "
            "raise trainer.max_tokens_per_mb"))
        return [t for t in trajs if len(t) <= limit], "too_long"

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
        self._drop_direct(list(self._direct), None)  # rollout() items that will never start
        self.buffer.fail(self._failure)


def _check_workflow(workflow: Any) -> None:
    if not callable(getattr(workflow, "arun_episode", None)):
        raise WorkflowError(
            f"expected a workflow with `async def arun_episode(engine, data)`, got {type(workflow).__name__}"
        )
