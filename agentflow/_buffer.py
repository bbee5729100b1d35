"""Thread-safe hand-off of accepted trajectories from the event loop to the trainer.

``put`` runs on the event loop and applies back-pressure (it awaits while the buffer is full, up to
an optional deadline). ``get_batch`` / ``get_groups`` run on any thread (the trainer's) and block on
a condition; ``aget_batch`` is the same on the loop. Consumers take the group with the oldest policy
tokens first and check staleness at consume time: a group whose oldest policy token is more than
``max_staleness`` versions old is dropped, requeued or kept according to the configured policy.
Nothing here polls: waiters sleep on conditions or futures woken by put, take and version bumps.
After :meth:`fail` a consumer that would wait raises the failure instead; buffered groups stay.

A consumer may pass a ``group_filter`` (e.g. dynamic sampling, ``agentflow.algo.group_filter``):
a fresh-enough group it rejects leaves the buffer like a stale-dropped one (``on_discard(group,
"filter")``: the executor gives its staleness slot back, so another item can start) and the
consumer keeps waiting for ``n`` groups that pass. Set as :attr:`ReplayBuffer.arrival_filter`, the
same predicate also screens each group as it arrives (:meth:`ReplayBuffer.screen`, called by the
executor before ``put``): a rejected group never enters the buffer and its slot comes back while the
consumer is still busy, so its replacement generates during the training step instead of after it.

Stragglers: the executor tells the buffer which version each running item started at
(:meth:`ReplayBuffer.track_start` / :meth:`ReplayBuffer.track_end`). A consumer at version v does
not fill its last slots with groups fresh enough to wait a step while as many running items started
at ``v - max_staleness``: taken at the next step those would be too stale and their generation lost
(the previous batch's long generations, passed over for the next batch's first groups). It waits
only while the buffer could not also fill the next step (where it could, generation is ahead and a
lost straggler costs the trainer nothing), and at most ``rollout.expiring_grace_s`` per call; then
the slots go to whatever is ready.

Cost: groups sit in buckets keyed by their oldest token version (a dict of FIFO deques plus a
min-heap of the versions present), so ``put`` and taking one group cost O(1), or O(log k) when a
bucket appears or empties (k = distinct versions buffered, a handful in practice), whatever the
buffer holds. A full buffer wakes exactly as many waiting producers as slots were freed.

Not here: prioritised or multi-epoch replay (a group is consumed once), the staleness budget
(``_staleness.py``), running episodes (``_executor.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
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
    # Bucket the buffer files the group under: min_version, or the buffer's version when it arrived.
    order_key: int = field(init=False, default=0, repr=False, compare=False)

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
    held: int = 0  # consumer calls that kept slots for running items about to expire
    held_s: float = 0.0  # seconds those calls waited with fresher groups ready


@dataclass(slots=True)
class _Hold:
    """One consumer call's wait for running items about to expire."""

    since: float | None = None
    until: float | None = None
    spent: bool = False

    def bound(self, left: float | None) -> float | None:
        """The sleep: ``left`` (the caller's deadline, None = none), cut at the end of the grace."""
        if self.until is None or self.spent:
            return left
        grace = max(0.0, self.until - time.monotonic())
        return grace if left is None else min(left, grace)


# Called (on the loop thread) with a group that left the buffer without being consumed and why:
# "drop", "requeue" or "filter". The executor gives the slot back and resubmits on "requeue".
DiscardCallback = Callable[[Group, str], None]
# A consumer's predicate: train on this group? Runs under the buffer's lock: keep it cheap.
GroupFilter = Callable[[Group], bool]


class _Buckets:
    """Groups in FIFO deques keyed by version, plus a min-heap of the keys that hold groups.

    The heap holds exactly the keys of the non-empty deques, so the oldest group is
    ``by_key[heap[0]][0]``. Not thread-safe: the buffer's lock guards it.
    """

    __slots__ = ("_by_key", "_heap", "_n")

    def __init__(self) -> None:
        self._by_key: dict[int, deque[Group]] = {}
        self._heap: list[int] = []
        self._n = 0

    def __len__(self) -> int:
        return self._n

    def _bucket(self, key: int) -> deque[Group]:
        bucket = self._by_key.get(key)
        if bucket is None:
            bucket = self._by_key[key] = deque()
            heapq.heappush(self._heap, key)
        return bucket

    def push(self, group: Group) -> None:
        """Add ``group`` behind the groups of its version."""
        self._bucket(group.order_key).append(group)
        self._n += 1

    def push_front(self, group: Group) -> None:
        """Give back a group just taken: it goes in front of the groups of its version."""
        self._bucket(group.order_key).appendleft(group)
        self._n += 1

    def oldest_key(self) -> int:
        """The version key :meth:`pop_oldest` would take from (the caller checks ``len``)."""
        return self._heap[0]

    def pop_oldest(self) -> Group:
        """Remove and return the first group of the oldest version (the caller checks ``len``)."""
        key = self._heap[0]
        bucket = self._by_key[key]
        group = bucket.popleft()
        if not bucket:
            del self._by_key[key]
            heapq.heappop(self._heap)
        self._n -= 1
        return group

    def __iter__(self) -> Iterator[Group]:
        """Every group in consumption order (O(n + k log k): for checkpoints, not the hot path)."""
        for key in sorted(self._by_key):
            yield from self._by_key[key]


class ReplayBuffer:
    """Accepted groups shared by the event loop (producer) and the trainer (consumer), oldest first."""

    def __init__(self, config: RolloutConfig | None = None) -> None:
        cfg = config or RolloutConfig()
        self.maxsize = cfg.buffer_size
        self.max_staleness = cfg.max_staleness
        self.policy = cfg.stale_policy
        self.max_requeues = cfg.max_requeues
        self.expiring_grace_s = cfg.expiring_grace_s
        self.stats = BufferStats()
        self.on_discard: DiscardCallback | None = None
        # A pure predicate applied to arriving groups (screen); consumers still pass theirs to get_groups.
        self.arrival_filter: GroupFilter | None = None
        self._groups = _Buckets()
        self._version = 0
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)  # trainer-thread waiters
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_waiters = Wakeup()  # loop-side consumers (aget_batch)
        self._space_waiters: deque[asyncio.Future[None]] = deque()  # producers waiting for room, FIFO
        self._failure: BaseException | None = None  # set by fail(): raised instead of waiting
        self._running_at: Counter[int] = Counter()  # running items by the version they started at

    # ------------------------------------------------------------------ producer (event loop)
    def track_start(self, version: int) -> None:
        """An item that will put its group here started at ``version`` (the executor calls this)."""
        with self._lock:
            self._running_at[version] += 1

    def track_end(self, version: int) -> None:
        """That item ended (group put, filtered or rejected): a consumer keeping a slot for it re-checks."""
        with self._cond:
            self._running_at[version] -= 1
            if self._running_at[version] <= 0:
                del self._running_at[version]
            self._cond.notify_all()
        if self._loop_waiters:
            self._call_on_loop(self._loop_waiters.wake_all)

    def screen(self, group: Group) -> bool:
        """Whether an arriving group should enter the buffer: ``arrival_filter`` rejects it or not.

        A rejected group is counted in ``stats.filtered`` like one a consumer's filter drops; the
        caller gives its staleness slot back. A filter that raises keeps the group: the consumer's
        own filter meets it again at consume time and raises there, where the caller sees it.
        """
        if self.arrival_filter is None:
            return True
        try:
            keep = bool(self.arrival_filter(group))
        except Exception:
            return True
        if not keep:
            with self._lock:
                self.stats.filtered += 1
                self.stats.filtered_episodes += len(group.trajectories)
        return keep

    async def put(self, group: Group, timeout: float | None = None) -> None:  # noqa: ASYNC109
        """Add a group; waits while the buffer holds ``maxsize`` groups.

        ``timeout`` (seconds, None = no deadline) bounds the wait for space: past it ``TimeoutError``
        is raised and the group is not added. Waiting producers are served first come, first served.
        """
        self._loop = asyncio.get_running_loop()
        if self._try_put(group):
            return
        deadline = None if timeout is None else self._loop.time() + timeout
        first = True
        while True:
            fut: asyncio.Future[None] = self._loop.create_future()
            if first:
                self._space_waiters.append(fut)
            else:  # woken, but a newcomer took the slot: keep this producer's place at the front
                self._space_waiters.appendleft(fut)
            first = False
            try:
                left = None if deadline is None else max(0.0, deadline - self._loop.time())
                async with asyncio.timeout(left):
                    await fut
            except TimeoutError:
                self._pass_on_grant(fut)
                raise TimeoutError(
                    f"waited {timeout} s for space in the replay buffer: it holds rollout.buffer_size="
                    f"{self.maxsize} groups and no consumer took any. Consume faster (get_batch / wait), "
                    "raise rollout.buffer_size, or submit fewer items ahead of the trainer."
                ) from None
            except BaseException:
                self._pass_on_grant(fut)
                raise
            if self._try_put(group):
                return

    def _try_put(self, group: Group) -> bool:
        with self._lock:
            if len(self._groups) >= self.maxsize:
                return False
            self._add(group)
            self.stats.put += 1
            self._cond.notify_all()
        if self._loop_waiters:
            self._loop_waiters.wake_all()
        return True

    def _add(self, group: Group) -> None:
        """File ``group`` by its oldest version (groups without policy tokens: the current version)."""
        group.order_key = self._version if group.min_version is None else group.min_version
        self._groups.push(group)

    def _pass_on_grant(self, fut: asyncio.Future[None]) -> None:
        """A waiting producer gave up; if it had been granted a slot, hand the slot to the next one."""
        if fut.done() and not fut.cancelled():
            self._grant_space()

    def _grant_space(self) -> None:
        """On the loop: wake one waiting producer per free slot (woken ones re-check under the lock)."""
        with self._lock:
            free = self.maxsize - len(self._groups)
        waiters = self._space_waiters
        while free > 0 and waiters:
            fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                free -= 1

    def put_nowait(self, group: Group) -> None:
        """Add a group ignoring ``maxsize`` (used when restoring a checkpoint)."""
        with self._lock:
            self._add(group)
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
        """
        groups = self.get_groups(n, timeout, version=version, group_filter=group_filter)
        return [t for g in groups for t in g.trajectories]

    def get_groups(
        self, n: int, timeout: float | None = None, *, version: int | None = None,
        group_filter: GroupFilter | None = None, at_least: int | None = None,
    ) -> list[Group]:
        """:meth:`get_batch`, returning the groups (with the data they were generated from).

        ``group_filter`` drops the groups it rejects (module docstring). ``at_least`` (1 to ``n``)
        returns early: once that many groups are taken and no other is ready, with what was taken
        (up to ``n``); ``None`` = wait for ``n``. Groups discarded while
        taking (stale or filtered) are handed to ``on_discard`` before the consumer waits, not only
        when it returns: their slots must free up for the replacements this very call is waiting
        for (with ``max_staleness=0`` nothing else could start).
        """
        if at_least is not None and not 1 <= at_least <= n:
            raise ValueError(f"at_least must be between 1 and n={n}, got {at_least}")
        least = n if at_least is None else at_least
        deadline = None if timeout is None else time.monotonic() + timeout
        taken: list[Group] = []
        discarded: list[tuple[Group, str]] = []
        filtered0 = self.stats.filtered  # drops while waiting: screened on arrival or taken here
        hold = _Hold()
        try:
            while True:
                with self._cond:
                    while self._groups and len(taken) < n and not self._holds(len(taken), n, version, hold):
                        self._take_one(taken, discarded, version, group_filter)
                    if len(taken) >= n or (len(taken) >= least and not self._groups):
                        break
                    if not discarded:  # nothing to hand back first: sleep until a put, a bump or fail()
                        if self._failure is not None:
                            raise self._failure
                        left = None if deadline is None else deadline - time.monotonic()
                        if left is not None and left <= 0:
                            raise TimeoutError(self._timeout_message(n, timeout, len(taken),
                                                                  self.stats.filtered - filtered0))
                        self._cond.wait(hold.bound(left))
                        continue
                # Outside the lock (waking producers takes it): free the discarded groups' slots now,
                # their replacements are what this call waits for.
                self._after_take(discarded)
                discarded = []
        except BaseException:
            self._give_back(taken)
            raise
        finally:
            self._after_take(discarded)
            self._end_hold(hold)
        return taken

    @staticmethod
    def _timeout_message(n: int, timeout: float | None, ready: int, filtered: int) -> str:
        note = (f"; {filtered} group(s) were dropped by the group filter meanwhile (with dynamic sampling, "
                "every recent group had equal rewards: the task may be too easy or too hard for the policy; "
                "algo.dynamic_sampling_max_drop caps the drops per step)" if filtered else "")
        return (f"get_batch({n}) timed out after {timeout}s with {ready} group(s) ready{note}; they stay "
                "in the buffer. Raise the timeout or check that rollouts are running.")

    async def aget_batch(self, n: int, *, version: int | None = None,
                         check: Callable[[int], None] | None = None) -> list[Trajectory]:
        """:meth:`get_batch` for the event loop. Wrap it in ``asyncio.timeout`` for a deadline.

        ``check(missing)`` runs before each sleep with the number of groups still missing; it raises
        to stop a wait that cannot end (the executor names the bound that blocks it).
        """
        return [t for g in await self.aget_groups(n, version=version, check=check) for t in g.trajectories]

    async def aget_groups(self, n: int, *, version: int | None = None,
                          check: Callable[[int], None] | None = None) -> list[Group]:
        """:meth:`aget_batch`, returning the groups."""
        self._loop = asyncio.get_running_loop()
        taken: list[Group] = []
        hold = _Hold()
        try:
            while len(taken) < n:
                discarded: list[tuple[Group, str]] = []
                with self._lock:
                    while self._groups and len(taken) < n and not self._holds(len(taken), n, version, hold):
                        self._take_one(taken, discarded, version)
                self._after_take(discarded)
                if len(taken) < n:
                    if self._failure is not None:
                        raise self._failure
                    if check is not None:
                        check(n - len(taken))
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(hold.bound(None)):
                            await self._loop_waiters.wait()
        except BaseException:
            self._give_back(taken)  # cancelled, timed out or stopped: nothing taken is lost
            raise
        finally:
            self._end_hold(hold)
        return taken

    def _holds(self, n_taken: int, n: int, version: int | None, hold: _Hold) -> bool:
        """Whether the consumer keeps its remaining slots for running items that started at the
        oldest version still fresh enough (module docstring). Caller holds the lock."""
        if self.policy == "keep" or self.expiring_grace_s <= 0 or hold.spent:
            return False
        edge = (self._version if version is None else version) - self.max_staleness
        expiring, left = self._running_at.get(edge, 0), n - n_taken
        if not expiring or left > expiring or self._groups.oldest_key() <= edge:
            return False
        if len(self._groups) >= left + n:  # this step and the next are both covered: nothing to save
            return False
        now = time.monotonic()
        if hold.until is None:
            hold.since, hold.until = now, now + self.expiring_grace_s
            self.stats.held += 1
        if now < hold.until:
            return True
        hold.spent = True  # waited long enough: the slots go to the groups that are ready
        return False

    def _end_hold(self, hold: _Hold) -> None:
        if hold.since is not None:
            with self._lock:
                self.stats.held_s += time.monotonic() - hold.since

    def _give_back(self, taken: list[Group]) -> None:
        if not taken:
            return
        with self._cond:
            for group in reversed(taken):
                self._groups.push_front(group)
            self._cond.notify_all()
        taken.clear()

    def _take_one(self, taken: list[Group], discarded: list[tuple[Group, str]], version: int | None,
                  group_filter: GroupFilter | None = None) -> None:
        """Pop the group with the oldest policy tokens, apply the staleness policy, then the filter.

        Oldest-first (not arrival order) keeps slow episodes from aging past the bound while
        fresher ones overtake them. Caller holds the lock.
        """
        group = self._groups.pop_oldest()
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
            self._groups.push_front(group)  # a failing filter loses nothing
            raise

    def _after_take(self, discarded: list[tuple[Group, str]]) -> None:
        """Space was freed: wake producers; hand discarded groups to the executor (on the loop)."""
        for group, why in discarded:
            self._call_on_loop(self._discard, group, why)
        self._call_on_loop(self._wake_after_take)

    def _wake_after_take(self) -> None:
        self._grant_space()
        self._loop_waiters.wake_all()

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
        self._call_on_loop(self._loop_waiters.wake_all)

    @property
    def failure(self) -> BaseException | None:
        """The error passed to :meth:`fail`, if any."""
        return self._failure

    def wake_consumers(self) -> None:
        """On the loop: make waiting loop-side consumers re-check (the executor's state changed)."""
        self._loop_waiters.wake_all()

    # ------------------------------------------------------------------ loop wake-ups
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """The producers' event loop: hand-offs from other threads go there (the executor binds it
        on entry, so a consumer that starts before the first ``put`` still wakes the loop)."""
        self._loop = loop

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
        return len(self._groups)

    def state_dict(self) -> dict[str, Any]:
        """Buffered groups as plain data, in consumption order (workflows are not saved; pass one to
        ``load_state_dict``)."""
        with self._lock:
            groups = [
                {"group_id": g.group_id, "data": g.data, "requeues": g.requeues,
                 "trajectories": [t.to_dict() for t in g.trajectories]}
                for g in self._groups
            ]
            return {"version": self._version, "groups": groups}

    def load_state_dict(self, state: dict[str, Any], workflow: Any = None) -> None:
        """Restore buffered groups (added to any already here) and the version."""
        self.set_version(state["version"])
        for g in state["groups"]:
            trajs = [Trajectory.from_dict(t) for t in g["trajectories"]]
            self.put_nowait(Group(g["group_id"], trajs, g["data"], workflow, g["requeues"]))
