"""Rollout configuration: how many episodes run at once and how stale their data may be.

Not here: enforcing it (:class:`StalenessManager`, :class:`ReplayBuffer`, :class:`agentflow.Rollout`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal

from agentflow.errors import ConfigError

__all__ = ["RolloutConfig", "StalePolicy"]

StalePolicy = Literal["drop", "requeue", "keep"]


@dataclass(frozen=True, slots=True)
class RolloutConfig:
    """Rollout settings shared by every inference engine.

    Attributes:
        max_staleness: eta. A trajectory whose oldest token came from version ``v0`` is trained on
            by version ``v0 + eta`` at the latest. 0 = synchronous RL.
        staleness_ramp: let the bound grow with the versions done, ``min(max_staleness, v)`` at
            version ``v``: version 0 admits one batch (not ``max_staleness + 1``), so the first
            steps train on fresh data instead of all on the untrained policy's; from version
            ``max_staleness`` on nothing changes. Costs one generation's wait at the second step.
        max_concurrent: episodes (submitted items) running at once.
        consumer_batch_size: B, items (prompts) the trainer consumes per step.
        min_consumer_batch_size: a step that would wait for its B groups starts as soon as this
            many are ready, with every ready group up to B (groups without signal dropped by
            dynamic sampling do not count). ``None`` = B, the step always waits for a full batch.
            Smaller batches when generation falls behind (the first steps of a run with dynamic
            sampling, when most groups are flat) keep the trainer busy instead of waiting; the
            version then moves on with fewer groups, so the rest of the ready groups age sooner.
        stale_policy: what the buffer does with an item found too stale at consume time:
            ``drop`` it, ``requeue`` its prompt (run it again), or ``keep`` it (trained with the
            decoupled-PPO importance weight).
        episode_timeout_s: deadline of one ``arun_episode`` call; ``None`` = no deadline (spell it out).
        episodes_per_item: ``arun_episode`` calls per submitted item; their trajectories share a group id.
            Leave at 1 for workflows that sample a whole group themselves.
        buffer_size: items the replay buffer holds before ``put`` applies back-pressure.
        max_requeues: how often one prompt may be requeued before it is dropped for good.
        max_consecutive_rejections: rejected items in a row (no accepted item between them) after
            which the executor stops and every consumer waiting for trajectories raises
            ``WorkflowError`` naming the last reasons, instead of waiting out a batch timeout.
            Catches a misconfigured run early (a workflow that always raises, prompts longer than
            the engine's ``max_seq_len``). ``None`` (YAML ``null``) = never stop.
        max_trajectories_per_episode: an ``arun_episode`` call that returns more trajectories is
            rejected (reason ``too_many_trajectories``) instead of flooding the buffer and the step.
        expiring_grace_s: how long a consumer keeps a batch slot for a running episode that started
            ``max_staleness`` versions ago, instead of filling it with a fresher group that could
            wait a step. Taken later, that episode would be too stale and its generation lost (a
            straggler of the previous batch passed over for the next batch's first groups). 0 = never
            wait; the slot goes to whatever group is ready.
        max_trajectory_tokens: a trajectory longer than this many tokens is dropped at accept time
            (reason ``too_long``; the episode's other trajectories are kept) instead of failing the
            train step. ``None`` = no cap; ``agentflow train`` uses ``trainer.max_tokens_per_mb``
            (a longer sequence cannot be trained on) unless this is set.
    """

    max_staleness: int = 1
    staleness_ramp: bool = False
    max_concurrent: int = 64
    consumer_batch_size: int = 8
    min_consumer_batch_size: int | None = None
    stale_policy: StalePolicy = "drop"
    episode_timeout_s: float | None = 600.0
    episodes_per_item: int = 1
    buffer_size: int = 4096
    max_requeues: int = 3
    max_consecutive_rejections: int | None = 64
    max_trajectories_per_episode: int = 1024
    max_trajectory_tokens: int | None = None
    expiring_grace_s: float = 30.0

    def __post_init__(self) -> None:
        ConfigError.check(self.problems())

    def problems(self) -> list[str]:
        """Every invalid field, one line each (empty when valid)."""
        out = []
        for name, lo in (("max_staleness", 0), ("max_concurrent", 1), ("consumer_batch_size", 1),
                         ("episodes_per_item", 1), ("buffer_size", 1), ("max_requeues", 0),
                         ("max_trajectories_per_episode", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                out.append(f"rollout.{name} must be an integer >= {lo}, got {v!r}")
        m = self.min_consumer_batch_size
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or not 1 <= m <= self.consumer_batch_size):
            out.append(f"rollout.min_consumer_batch_size must be an integer from 1 to rollout.consumer_batch_size "
                       f"({self.consumer_batch_size!r}) or null (= consumer_batch_size), got {m!r}")
        if self.stale_policy not in ("drop", "requeue", "keep"):
            out.append(f"rollout.stale_policy must be 'drop', 'requeue' or 'keep', got {self.stale_policy!r}")
        t = self.episode_timeout_s
        if t is not None and not (isinstance(t, int | float) and t > 0 and math.isfinite(t)):
            out.append(f"rollout.episode_timeout_s must be a positive number of seconds or null, got {t!r}")
        g = self.expiring_grace_s
        if not (isinstance(g, int | float) and not isinstance(g, bool) and g >= 0 and math.isfinite(g)):
            out.append(f"rollout.expiring_grace_s must be a number of seconds >= 0, got {g!r}")
        m = self.max_consecutive_rejections
        if m is not None and (not isinstance(m, int) or isinstance(m, bool) or m < 1):
            out.append(f"rollout.max_consecutive_rejections must be an integer >= 1 or null, got {m!r}")
        c = self.max_trajectory_tokens
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 2):
            out.append(f"rollout.max_trajectory_tokens must be an integer >= 2 or null, got {c!r}")
        return out

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]
