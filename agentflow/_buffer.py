"""Thread-safe hand-off of accepted trajectories from the event loop to the trainer.

``put`` runs on the event loop and applies back-pressure (it awaits while the buffer is full).
``get_batch`` runs on any thread (the trainer's) and blocks on a condition; ``aget_batch`` is the
same on the loop. Both check staleness at consume time: an item whose oldest policy token is more
than ``max_staleness`` versions old is dropped, requeued or kept according to the configured
policy. Nothing here polls: waiters sleep on conditions notified by put, take and version bumps.
After :meth:`fail` a consumer that would wait raises the failure instead; buffered groups stay.

A consumer may pass a ``group_filter`` (e.g. dynamic sampling, ``agentflow.algo.group_filter``):
a fresh-enough group it rejects leaves the buffer like a stale-dropped one (``on_discard(group,
"filter")``: the executor gives its staleness slot back, so another item can start) and the
consumer keeps waiting for ``n`` groups that pass.

Not here: prioritised or multi-epoch replay (an item is consumed once).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from agentflow._rollout_config import RolloutConfig
from agentflow._types import Trajectory
from agentflow._wakeup import Wakeup

__all__ = ["BufferStats", "Group", "GroupFilter", "ReplayBuffer"]


@dataclass(slots=True)
class Group:
    """The trajectories of one submitted item, plus what is needed to run it again."""

    group_id: str
    trajectories: list[Trajectory]
    data: Any = None
    workflow: Any = None
    requeues: int = 0
    min_version: int | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        vs = [v for t in self.trajectories if (v := t.min_version) is not None]
        self.min_version = min(vs) if vs else None


@dataclass(slots=True)
class BufferStats:
    """Cumulative consume-time counters. ``staleness`` is a histogram: versions behind -> items."""

    put: int = 0
    consumed: int = 0
    dropped: int = 0
    requeued: int = 0
    kept_stale: int = 0
    filtered: int = 0
    filtered_episodes: int = 0
    staleness: Counter[int] = field(default_factory=Counter)


# Called (on the loop thread) with a group that left the buffer without being consumed and why:
# "drop", "requeue" or "filter". The executor gives the slot back and resubmits on "requeue".
DiscardCallback = Callable[[Group, str], None]
# A consumer's predicate: train on this group? Runs under the buffer's lock: keep it cheap.
GroupFilter = Callable[[Group], bool]


class ReplayBuffer:
    """FIFO of accepted groups shared by the event loop (producer) and the trainer (consumer)."""

    def __init__(self, config: RolloutConfig | None = None) -> None:
        cfg = config or RolloutConfig()
        self.maxsize = cfg.buffer_size
        self.max_staleness = cfg.max_staleness
        self.policy = cfg.stale_policy
        self.max_requeues = cfg.max_requeues
        self.stats = BufferStats()
        self.on_discard: DiscardCallback | None = None
        self._groups: deque[Group] = deque()
        self._version = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # trainer-thread waiters
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_waiters = Wakeup()  # loop-side waiters (put space, aget_batch)
        self._failure: BaseException | None = None  # set by fail(): raised instead of waiting

    # ------------------------------------------------------------------ producer (event loop)
    async def put(self, group: Group) -> None:
        """Add a group; waits while the buffer holds ``maxsize`` groups."""
        self._loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                if len(self._groups) < self.maxsize:
                    self._groups.append(group)
                    self.stats.put += 1
                    self._cond.notify_all()
                    break
            await self._wait_on_loop()
        self._wake_loop_waiters()

    def put_nowait(self, group: Group) -> None:
        """Add a group ignoring ``maxsize`` (used when restoring a checkpoint)."""
        with self._lock:
            self._groups.append(group)
            self._cond.notify_all()

    # ------------------------------------------------------------------ consumers
    def get_batch(
        self, n: int, timeout: float | None = None, *, version: int | None = None,
        group_filter: GroupFilter | None = None,
    ) -> list[Trajectory]:
        """Block until ``n`` fresh-enough groups are available; return their trajectories.

        Call from any thread but the event loop's (use :meth:`aget_batch` there). On timeout the
        groups taken so far go back to the front and ``TimeoutError`` is raised: nothing is lost.
        The same holds when the producer has failed (:meth:`fail`): its error is raised instead of waiting.
        ``group_filter`` drops the groups it rejects (module docstring).
        """
        groups = self.get_groups(n, timeout, version=version, group_filter=group_filter)
        return [t for g in groups for t in g.trajectories]

    def get_groups(
        self, n: int, timeout: float | None = None, *, version: int | None = None,
        group_filter: GroupFilter | None = None,
    ) -> list[Group]:
        """:meth:`get_batch`, returning the groups (with the data they were generated from).

        Groups discarded while taking (stale or filtered) are handed to ``on_discard`` before the
        consumer waits, not only when it returns: their slots must free up for the replacements
        this very call is waiting for (with ``max_staleness=0`` nothing else could start).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        taken: list[Group] = []
        discarded: list[tuple[Group, str]] = []
        n_filtered = 0
        with self._cond:
            while len(taken) < n:
                if not self._groups:
                    n_filtered += sum(1 for _, why in discarded if why == "filter")
                    self._after_take(discarded)
                    discarded = []
                    left = None if deadline is None else deadline - time.monotonic()
                    if self._failure is not None or (left is not None and left <= 0):
                        ready = len(taken)
                        self._give_back_taken(taken)
                        if self._failure is not None:
                            raise self._failure
                        raise TimeoutError(self._timeout_message(n, timeout, ready, n_filtered))
                    self._cond.wait(left)
                    continue
                try:
                    self._take_one(taken, discarded, version, group_filter)
                except BaseException:  # the filter raised: nothing taken is lost
                    self._give_back_taken(taken)
                    self._after_take(discarded)
                    raise
        self._after_take(discarded)
        return taken

    def _give_back_taken(self, taken: list[Group]) -> None:
        """Put groups a consumer took back at the front (it timed out or failed). Caller holds the lock."""
        self._groups.extendleft(reversed(taken))
        taken.clear()
        self._cond.notify_all()

    @staticmethod
    def _timeout_message(n: int, timeout: float | None, ready: int, filtered: int) -> str:
        note = (f"; {filtered} group(s) were dropped by the group filter meanwhile (with dynamic sampling, "
                "every recent group had equal rewards: the task may be too easy or too hard for the policy)"
                if filtered else "")
        return (f"get_batch({n}) timed out after {timeout}s with {ready} group(s) ready{note}; they stay "
                "in the buffer. Raise the timeout or check that rollouts are running.")

    async def aget_batch(self, n: int, *, version: int | None = None) -> list[Trajectory]:
        """:meth:`get_batch` for the event loop. Wrap it in ``asyncio.timeout`` for a deadline."""
        self._loop = asyncio.get_running_loop()
        taken: list[Group] = []
        try:
            while len(taken) < n:
                discarded: list[tuple[Group, str]] = []
                with self._lock:
                    while self._groups and len(taken) < n:
                        self._take_one(taken, discarded, version)
                self._after_take(discarded)
                if len(taken) < n:
                    if self._failure is not None:
                        raise self._failure
                    await self._wait_on_loop()
        except BaseException:
            with self._lock:  # cancelled or timed out: nothing taken is lost
                self._groups.extendleft(reversed(taken))
                self._cond.notify_all()
            raise
        return [t for g in taken for t in g.trajectories]

    def _take_one(self, taken: list[Group], discarded: list[tuple[Group, str]], version: int | None,
                  group_filter: GroupFilter | None = None) -> None:
        """Pop the group with the oldest policy tokens, apply the staleness policy, then the filter.

        Oldest-first (not arrival order) keeps slow episodes from aging past the bound while
        fresher ones overtake them. Caller holds the lock.
        """
        group = self._pop_oldest()
        v = self._version if version is None else version
        mv = group.min_version
        lag = 0 if mv is None else v - mv
        self.stats.staleness[lag] += 1
        if lag <= self.max_staleness or self.policy == "keep":
            if group_filter is not None and not self._passes(group, group_filter):
                self.stats.filtered += 1
                self.stats.filtered_episodes += len(group.trajectories)
                discarded.append((group, "filter"))
                return
            if lag > self.max_staleness:
                self.stats.kept_stale += 1
            self.stats.consumed += 1
            taken.append(group)
        elif self.policy == "requeue" and group.requeues < self.max_requeues:
            self.stats.requeued += 1
            discarded.append((group, "requeue"))
        else:
            self.stats.dropped += 1
            discarded.append((group, "drop"))

    def _passes(self, group: Group, group_filter: GroupFilter) -> bool:
        try:
            return bool(group_filter(group))
        except BaseException:
            self._groups.appendleft(group)  # a failing filter loses nothing
            raise

    def _pop_oldest(self) -> Group:
        groups = self._groups
        best, best_v = 0, groups[0].min_version
        if best_v is not None:
            for i, g in enumerate(groups):
                if g.min_version is not None and g.min_version < best_v:
                    best, best_v = i, g.min_version
        if best == 0:
            return groups.popleft()
        group = groups[best]
        del groups[best]
        return group

    def _after_take(self, discarded: list[tuple[Group, str]]) -> None:
        """Space was freed: wake the producer; hand discarded groups to the executor (on the loop)."""
        for group, why in discarded:
            self._call_on_loop(self._discard, group, why)
        self._call_on_loop(self._wake_loop_waiters)

    def _discard(self, group: Group, why: str) -> None:
        if self.on_discard is not None:
            self.on_discard(group, why)

    def fail(self, error: BaseException) -> None:
        """The producer stopped for good: consumers that would wait (now or later) raise ``error``.

        Buffered groups stay (a consumer still gets a batch that is already here; ``state_dict``
        still saves them). Call from any thread.
        """
        with self._cond:
            self._failure = error
            self._cond.notify_all()
        self._call_on_loop(self._wake_loop_waiters)

    @property
    def failure(self) -> BaseException | None:
        """The error passed to :meth:`fail`, if any."""
        return self._failure

    # ------------------------------------------------------------------ loop wake-ups
    async def _wait_on_loop(self) -> None:
        await self._loop_waiters.wait()

    def _wake_loop_waiters(self) -> None:
        self._loop_waiters.wake_all()

    def _call_on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            fn(*args)
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn(*args)
        else:
            loop.call_soon_threadsafe(fn, *args)

    # ------------------------------------------------------------------ version, views, state
    def set_version(self, version: int) -> None:
        with self._cond:
            self._version = version
            self._cond.notify_all()

    @property
    def version(self) -> int:
        return self._version

    def __len__(self) -> int:
        with self._lock:
            return len(self._groups)

    def state_dict(self) -> dict[str, Any]:
        """Buffered groups as plain data (workflows are not saved; pass one to ``load_state_dict``)."""
        with self._lock:
            groups = [
                {"group_id": g.group_id, "data": g.data, "requeues": g.requeues,
                 "trajectories": [t.to_dict() for t in g.trajectories]}
                for g in self._groups
            ]
            return {"version": self._version, "groups": groups}

    def load_state_dict(self, state: dict[str, Any], workflow: Any = None) -> None:
        """Restore buffered groups (appended after any already here)."""
        for g in state["groups"]:
            trajs = [Trajectory.from_dict(t) for t in g["trajectories"]]
            self.put_nowait(Group(g["group_id"], trajs, g["data"], workflow, g["requeues"]))
        self.set_version(state["version"])
