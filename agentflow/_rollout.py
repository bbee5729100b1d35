"""Rollout: workflows running on one inference engine under the staleness bound.

:class:`Rollout` is the one object that holds the rollout machinery of an engine: the
:class:`WorkflowExecutor` (admission and episodes), its :class:`ReplayBuffer` and its
:class:`StalenessManager`. It orchestrates a weight update as one unit (pause admission and
generation -> load the weights -> bump the version -> resume) and is what a training loop talks to:
``submit`` / ``wait`` / ``rollout`` on the loop, ``get_groups`` from the trainer thread.

An engine has at most one rollout. ``Rollout(engine, config)`` attaches itself to the engine; an
engine entered without one gets a default rollout built from its ``rollout`` config on entry, so the
seed API's ``engine.submit`` / ``engine.wait`` / ``engine.rollout`` keep working by delegation.
The engine notifies its rollout of ``pause`` / ``resume`` / ``set_version`` (the rollout stops or
restarts admission and moves its staleness budget); nothing here is inherited.

Not here: generation and weight loading (the engine), the training step (the trainer thread).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from agentflow._buffer import Group, GroupFilter, ReplayBuffer
from agentflow._executor import WorkflowExecutor
from agentflow._rollout_config import RolloutConfig
from agentflow._staleness import StalenessManager
from agentflow._types import Trajectory
from agentflow.errors import EngineError

if TYPE_CHECKING:
    from agentflow._engine_api import InferenceEngine, RolloutWorkflow, WeightUpdateMeta

__all__ = ["Rollout"]


class Rollout:
    """Runs workflow episodes on ``engine`` under ``config``'s staleness bound and buffers them.

    Use as ``async with Rollout(engine, cfg) as rollout:`` (enters the engine too), or build it and
    enter the engine. Every method runs on the event loop's thread except :meth:`get_groups` and
    :meth:`get_batch`, which are for the trainer thread (it reaches the loop with
    ``asyncio.run_coroutine_threadsafe(rollout.update_weights(meta), loop)``).

    Args:
        engine: the inference engine episodes generate with.
        config: the staleness bound, concurrency and buffer settings (default: ``engine.rollout_config``).
    """

    def __init__(self, engine: InferenceEngine, config: RolloutConfig | None = None) -> None:
        self.engine = engine
        self.config = config or engine.rollout_config
        self.buffer = ReplayBuffer(self.config)
        self.executor = WorkflowExecutor(engine, self.config, self.buffer)
        self._updating = False  # inside update_weights: its pause ends by itself
        engine.attach_rollout(self)

    @classmethod
    def of(cls, engine: InferenceEngine) -> Rollout:
        """The rollout attached to ``engine``, built from ``engine.rollout_config`` if it has none."""
        return engine.attached_rollout or cls(engine)

    @property
    def staleness(self) -> StalenessManager:
        return self.executor.staleness

    # ------------------------------------------------------------------ lifetime
    async def __aenter__(self) -> Rollout:
        await self.engine.__aenter__()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.engine.__aexit__(*exc)

    async def start(self) -> None:
        """Start admitting (the engine calls this when it is entered)."""
        await self.executor.__aenter__()

    async def stop(self, *exc: object) -> None:
        """Cancel running episodes (the engine calls this when it exits)."""
        await self.executor.__aexit__(*exc)

    # ------------------------------------------------------------------ the seed API
    def submit(self, data: Any, workflow: RolloutWorkflow, *, group_id: str | None = None) -> str:
        """Queue one item; it starts as soon as the staleness bound allows. Returns its group id."""
        return self.executor.submit(data, workflow, group_id=group_id)

    async def wait(self, count: int, timeout: float | None = None) -> list[Trajectory]:  # noqa: ASYNC109
        """Await ``count`` accepted items; ``timeout`` (seconds) raises ``TimeoutError``.

        Raises ``EngineError`` at once, naming the bound, when ``count`` items cannot arrive before
        the version moves (the staleness budget ``(max_staleness + version + 1) * consumer_batch_size``)
        or while the engine is paused outside a weight update.
        """
        return await self.executor.wait(count, timeout)

    async def rollout(self, data: Sequence[Any], workflow: RolloutWorkflow) -> list[Trajectory]:
        """Run every item and return the trajectories of the accepted ones, in the order of ``data``.

        The items share ``max_concurrent`` with submitted ones but use no staleness budget and
        bypass the replay buffer (their trajectories come straight back), so any number completes.
        """
        return await self.executor.rollout(data, workflow)

    async def wait_for_room(self, max_queued: int) -> None:
        """Return once fewer than ``max_queued`` items wait to start (for prompt feeders)."""
        await self.executor.wait_for_room(max_queued)

    # ------------------------------------------------------------------ the trainer thread
    def get_groups(self, n: int, timeout: float | None = None, *, group_filter: GroupFilter | None = None,
                   at_least: int | None = None, version: int | None = None) -> list[Group]:
        """Thread-safe: block until ``n`` groups are consumable, oldest first (staleness policy applied).

        ``group_filter(group) -> bool`` (e.g. dynamic sampling, ``agentflow.algo.group_filter``)
        drops the fresh-enough groups it rejects and keeps waiting for ``n`` that pass. A dropped
        group gives its staleness slot back, like a stale-dropped one: the admission budget
        ``(eta + v + 1) * B`` keeps counting only groups that are trained on, so another item
        starts in its place at the current version and the staleness bound still holds.
        ``at_least`` returns as soon as that many are taken and no other is ready (up to ``n``).
        ``version`` is the policy version that will train on the groups, which staleness is counted
        against (default: the engine's; a trainer that publishes without waiting for the load is
        one ahead of it).
        """
        return self.buffer.get_groups(n, timeout=timeout, group_filter=group_filter, at_least=at_least,
                                      version=version)

    def get_batch(self, n: int, timeout: float | None = None, *, group_filter: GroupFilter | None = None
                  ) -> list[Trajectory]:
        """Thread-safe: :meth:`get_groups`, flattened to trajectories."""
        return self.buffer.get_batch(n, timeout=timeout, group_filter=group_filter)

    # ------------------------------------------------------------------ weight updates
    async def update_weights(self, meta: WeightUpdateMeta, version: int | None = None) -> None:
        """Pause admission and generation, load ``meta``'s weights, set the version, resume.

        ``version`` defaults to ``meta.version``, else the current version + 1. In-flight
        generations resume after the update; the tokens they generate afterwards carry the new version.
        """
        new = version if version is not None else meta.version
        new = self.engine.get_version() + 1 if new is None else new
        self._updating = True
        try:
            await self.engine.pause()
            await self.engine.aupdate_weights(meta)
            self.engine.set_version(new)
        finally:
            try:
                await self.engine.resume()
            finally:
                self._updating = False

    # ------------------------------------------------------------------ notifications from the engine
    def on_pause(self) -> None:
        self.executor.pause(by_update=self._updating)

    def on_resume(self) -> None:
        self.executor.resume()

    def on_version(self, version: int) -> None:
        self.executor.set_version(version)

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The buffered groups and the items in flight (call on the loop, so both are read at once)."""
        return {"buffer": self.buffer.state_dict(), "pending": self.executor.pending()}

    def load_state_dict(self, state: dict[str, Any], workflow: RolloutWorkflow, version: int) -> None:
        """Restore a :meth:`state_dict` taken at ``version``: buffered groups keep their place in
        the staleness budget; items that were in flight are submitted again from the start."""
        if self.engine.get_version() != version:
            raise EngineError(f"load the weights of version {version} before the rollout state; "
                              f"the engine is at version {self.engine.get_version()}")
        self.buffer.load_state_dict(state["buffer"], workflow=workflow)
        self.executor.recover(version, buffered=len(state["buffer"]["groups"]))
        for item in state["pending"]:
            self.executor.submit(item["data"], workflow, group_id=item["group_id"])

    # ------------------------------------------------------------------ views
    @property
    def failure(self) -> Exception | None:
        """Why rollout stopped admitting for good (too many consecutive rejections), or None."""
        return self.executor.failure

    def stats(self) -> dict[str, Any]:
        """Counters: submitted, running, accepted, rejected by reason, buffered, consumed, stale."""
        return self.executor.stats()
