"""The asynchronous RL training loop: rollout on the event loop, training on a background thread.

The event loop runs the inference engine, its :class:`Rollout` (executor, buffer, staleness) and a
feeder that keeps the rollout's queue topped up from a :class:`PromptSource`. A background thread runs the trainer:
take B groups from the replay buffer, recompute proximal (and reference) log-probs, compute
advantages, run the PPO minibatch updates, step the LR schedule, then publish the weights
(pause -> upload -> version bump -> resume, on the loop) and log. Evaluation runs on the loop
beside rollout, pinned to one weight version: the next weight update waits for it.

The trainer thread reaches the loop only through ``asyncio.run_coroutine_threadsafe``; the loop
never blocks on the trainer. Under ``torchrun`` only rank 0 runs the loop; the other ranks run
:meth:`Trainer.follow`, which receives each step's shard of the batch (split by token count) and
joins the collective train, upload and save calls.

Not here: building engines, workflows or datasets from a config (``agentflow.recipe``), the PPO step
(``agentflow.algo.ppo_step``), torchrun rank plumbing (``agentflow._ranks``).
"""

from __future__ import annotations

import asyncio
import logging
import math
import pathlib
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow._buffer import Group
from agentflow._checkpoint import Checkpointer
from agentflow._data import PromptSource
from agentflow._engine_api import InferenceEngine, TrainEngine, WeightUpdateMeta
from agentflow._memory import peak_rss_gib, rss_gib, trim_heap
from agentflow._metrics import MetricsLogger
from agentflow._rollout import Rollout
from agentflow._types import Trajectory
from agentflow.errors import ConfigError, EngineError

__all__ = ["EvalSpec", "Trainer", "TrainerConfig"]

log = logging.getLogger("agentflow.trainer")


@dataclass(frozen=True, slots=True)
class TrainerConfig:
    """The training loop.

    Attributes:
        total_steps: train steps to run (each step makes one new policy version).
        ppo_minibatches: optimiser steps per batch; the batch is split by group into this many minibatches.
        max_tokens_per_mb: token budget of one packed micro-batch (bounds activation memory).
        weight_update: how new weights reach the inference engine: mem (same process), disk
            (HF checkpoint + reload) or nccl (broadcast to SGLang servers).
        checkpoint_every: steps between checkpoints (0 = only at the end of the run).
        keep_checkpoints: complete checkpoints kept on disk.
        eval_every: steps between evaluations (0 = never); with evaluation on, version 0 (the
            starting policy) is evaluated too.
        eval_samples: samples per held-out prompt in an evaluation.
        batch_timeout_s: deadline for one batch of rollouts to arrive (fails loudly when exceeded).
        update_timeout_s: deadline for one weight update.
        max_queued: prompts the feeder keeps waiting in the executor's queue.
    """

    total_steps: int = 40
    ppo_minibatches: int = 1
    max_tokens_per_mb: int | None = 8192
    weight_update: Literal["mem", "disk", "nccl"] = "mem"
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    eval_every: int = 0
    eval_samples: int = 2
    batch_timeout_s: float = 1800.0
    update_timeout_s: float = 600.0
    max_queued: int = 64

    def __post_init__(self) -> None:
        problems = []
        for name, lo in (("total_steps", 1), ("ppo_minibatches", 1), ("checkpoint_every", 0),
                         ("keep_checkpoints", 1), ("eval_every", 0), ("eval_samples", 1), ("max_queued", 1)):
            if getattr(self, name) < lo:
                problems.append(f"trainer.{name} must be >= {lo}, got {getattr(self, name)}")
        if self.max_tokens_per_mb is not None and self.max_tokens_per_mb < 16:
            problems.append(f"trainer.max_tokens_per_mb must be >= 16 or null, got {self.max_tokens_per_mb}")
        for name in ("batch_timeout_s", "update_timeout_s"):
            if not getattr(self, name) > 0:
                problems.append(f"trainer.{name} must be > 0 seconds, got {getattr(self, name)}")
        if problems:
            raise ConfigError(problems)


@dataclass(slots=True)
class EvalSpec:
    """Held-out evaluation: run ``workflow`` on ``data`` with ``engine`` and average the rewards."""

    data: Sequence[Any]
    workflow: Any
    concurrency: int = 32


StepFn = Callable[[list[Trajectory]], dict[str, float]]


@dataclass(slots=True)
class _RunState:
    step: int = 0
    tokens_trained: int = 0
    episodes_trained: int = 0
    started: float = field(default_factory=time.perf_counter)


class Trainer:
    """Wires one inference engine, one train engine and a prompt stream into the async RL loop.

    Args:
        config: the loop's knobs.
        engine: the inference engine (entered by :meth:`run`).
        train_engine: an initialised :class:`TrainEngine`.
        train_step: ``train_step(trajectories) -> stats``: advantages, losses and optimiser steps
            for one batch (see :func:`agentflow.algo.ppo_step`); runs on the trainer thread.
        workflow: the rollout workflow.
        prompts: the training prompts.
        run_dir: where metrics and checkpoints go.
        evaluation: optional held-out evaluation.
        progress: show a progress bar.
    """

    def __init__(
        self,
        config: TrainerConfig,
        *,
        engine: InferenceEngine,
        train_engine: TrainEngine,
        train_step: StepFn,
        workflow: Any,
        prompts: PromptSource,
        run_dir: str | pathlib.Path,
        metrics: MetricsLogger,
        evaluation: EvalSpec | None = None,
        progress: bool = True,
        tokenizer: Any = None,
    ) -> None:
        self.cfg = config
        self.engine = engine
        self.rollout = Rollout.of(engine)
        self.train_engine = train_engine
        self.train_step = train_step
        self.workflow = workflow
        self.prompts = prompts
        self.run_dir = pathlib.Path(run_dir)
        self.metrics = metrics
        self.evaluation = evaluation
        self.progress = progress
        self.tokenizer = tokenizer
        self.checkpointer = Checkpointer(self.run_dir, keep=config.keep_checkpoints)
        self.state = _RunState()
        self._resume_rollout: dict[str, Any] | None = None
        self._eval_task: asyncio.Task[None] | None = None
        self._stop = threading.Event()

    # ------------------------------------------------------------------ resume
    def resume_from(self, path: pathlib.Path) -> None:
        """Load a checkpoint before :meth:`run`: model/optimiser, data position, version, rollouts."""
        from agentflow._engine_api import SaveLoadMeta

        trainer_state, rollout_state = self.checkpointer.load(path)
        self.train_engine.load(SaveLoadMeta(path=str(path / "model"), with_optim=True))
        self.prompts.load_state_dict(trainer_state["data"])
        self.state.step = trainer_state["step"]
        self.state.tokens_trained = trainer_state.get("tokens_trained", 0)
        self.state.episodes_trained = trainer_state.get("episodes_trained", 0)
        self._resume_rollout = rollout_state
        log.info("resuming from %s at step %d", path, self.state.step)

    # ------------------------------------------------------------------ main entry (event loop)
    async def run(self) -> None:
        """Run the loop until ``total_steps``; returns when the final checkpoint is written.

        Raises what stopped the run, e.g. the executor's ``WorkflowError`` once
        ``rollout.max_consecutive_rejections`` episodes in a row were rejected, or ``TimeoutError``
        when no batch arrived within ``trainer.batch_timeout_s``.
        """
        try:
            await self._run()
        except BaseExceptionGroup as eg:  # task groups (the feeder's, the executor's) wrap a lone error
            err: BaseException = eg
            while isinstance(err, BaseExceptionGroup) and len(err.exceptions) == 1:
                err = err.exceptions[0]
            if err is eg:
                raise
            raise err from None  # surface it as is (the CLI prints an AgentflowError's message)

    async def _run(self) -> None:
        async with self.engine, asyncio.TaskGroup() as tg:
            await self._restore_rollout()
            ev = self.evaluation
            if ev is not None and self.cfg.eval_every and self.state.step == 0:
                self._eval_task = asyncio.get_running_loop().create_task(self._evaluate(0, ev))
            feeder = tg.create_task(self._feed())
            try:
                await asyncio.to_thread(self._train_thread, asyncio.get_running_loop())
                if self._eval_task is not None:  # the last version's evaluation
                    await self._eval_task
            finally:
                self._stop.set()
                feeder.cancel()
                if self._eval_task is not None:
                    self._eval_task.cancel()

    async def _restore_rollout(self) -> None:
        version = self.state.step
        if not version:
            return
        meta = await asyncio.to_thread(self.train_engine.upload_weights, self._weight_meta(version))
        await self.engine.aupdate_weights(meta)
        self.engine.set_version(version)
        saved = self._resume_rollout or {"buffer": {"groups": [], "version": version}, "pending": []}
        self.rollout.load_state_dict(saved, self.workflow, version)

    async def _feed(self) -> None:
        """Keep the executor's queue topped up with prompts (blocks on queue room, never polls)."""
        while True:
            await self.rollout.wait_for_room(self.cfg.max_queued)
            self.rollout.submit(self.prompts.next(), self.workflow)

    # ------------------------------------------------------------------ trainer thread
    def _train_thread(self, loop: asyncio.AbstractEventLoop) -> None:
        bar = _progress_bar(self.cfg.total_steps, self.state.step) if self.progress else None
        try:
            while self.state.step < self.cfg.total_steps and not self._stop.is_set():
                record = self._one_step(loop)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(record))
                due = self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0
                if due or self.state.step == self.cfg.total_steps:
                    self._checkpoint(loop)
        finally:
            if bar is not None:
                bar.close()

    def _one_step(self, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        cfg = self.cfg
        t0 = time.perf_counter()
        groups = self.rollout.get_groups(self.rollout.config.consumer_batch_size, timeout=cfg.batch_timeout_s)
        t_wait = time.perf_counter() - t0
        trajs = [t for g in groups for t in g.trajectories]
        stats = self.train_step(trajs)
        trim_heap()
        t_train = time.perf_counter() - t0 - t_wait
        version = self.state.step + 1
        meta = self.train_engine.upload_weights(self._weight_meta(version))
        self._call_on_loop(loop, self._publish(version, meta), cfg.update_timeout_s)
        self.state.step = version
        n_tokens = sum(len(t) for t in trajs)
        self.state.tokens_trained += n_tokens
        self.state.episodes_trained += len(trajs)
        record = self._step_record(groups, trajs, stats, t_wait, t_train, time.perf_counter() - t0)
        if meta.nbytes is not None:  # what the weight update moved (the adapter only, with LoRA)
            record["weights/update_mib"] = meta.nbytes / 2**20
        self.metrics.log(version, record)
        return record

    async def _publish(self, version: int, meta: WeightUpdateMeta) -> None:
        """Pause rollout, load the new weights, bump the version, resume; then maybe evaluate."""
        if self._eval_task is not None:
            await self._eval_task  # evaluation is pinned to the previous version
            self._eval_task = None
        await self.rollout.update_weights(meta, version)
        ev = self.evaluation
        if ev is not None and self.cfg.eval_every and version % self.cfg.eval_every == 0:
            self._eval_task = asyncio.get_running_loop().create_task(self._evaluate(version, ev))

    def _weight_meta(self, version: int) -> WeightUpdateMeta:
        path = str(self.run_dir / "weights" / f"v{version:06d}") if self.cfg.weight_update == "disk" else None
        return WeightUpdateMeta(type=self.cfg.weight_update, path=path, version=version)

    async def _evaluate(self, version: int, ev: EvalSpec) -> None:
        rewards = await evaluate(self.engine, ev.workflow, ev.data, concurrency=ev.concurrency)
        self.metrics.log(version, {"eval/version": version, "eval/reward": _mean(rewards), "eval/n": len(rewards)})

    def _checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        rollout_state = self._call_on_loop(loop, self._snapshot_rollout(), self.cfg.update_timeout_s)
        trainer_state = {
            "step": self.state.step,
            "data": rollout_state.pop("data"),
            "tokens_trained": self.state.tokens_trained,
            "episodes_trained": self.state.episodes_trained,
        }
        from agentflow._engine_api import SaveLoadMeta

        def save_model(path: pathlib.Path) -> None:
            self.train_engine.save(SaveLoadMeta(path=str(path), with_optim=True, tokenizer=self.tokenizer))

        self.checkpointer.save(self.state.step, save_model=save_model, trainer_state=trainer_state,
                               rollout_state=rollout_state)

    async def _snapshot_rollout(self) -> dict[str, Any]:
        """Buffer, in-flight prompts and data position, read in one step on the loop (consistent)."""
        return {**self.rollout.state_dict(), "data": self.prompts.state_dict()}

    def _call_on_loop(self, loop: asyncio.AbstractEventLoop, coro: Any, timeout: float) -> Any:
        fut = asyncio.run_coroutine_threadsafe(coro, loop)
        try:
            return fut.result(timeout)
        except TimeoutError as e:
            fut.cancel()
            raise EngineError(f"a call on the event loop took longer than {timeout}s; see the logs") from e

    # ------------------------------------------------------------------ metrics
    def _step_record(self, groups: list[Group], trajs: list[Trajectory], stats: dict[str, float],
                     t_wait: float, t_train: float, t_step: float) -> dict[str, Any]:
        version = self.state.step
        lags = [version - 1 - g.min_version for g in groups if g.min_version is not None]
        rewards = [t.reward for t in trajs]
        ex = self.rollout.stats()
        elapsed = time.perf_counter() - self.state.started
        gen_tokens = sum(t.n_policy_tokens for t in trajs)
        return {
            **{f"train/{k}": v for k, v in stats.items()},
            "reward/mean": _mean(rewards),
            "reward/max": max(rewards, default=math.nan),
            "staleness/max": max(lags, default=0),
            "staleness/mean": _mean(lags),
            "rollout/episodes": len(trajs),
            "rollout/gen_tokens_mean": gen_tokens / max(1, len(trajs)),
            "rollout/rejected": ex["rejected"],
            "rollout/dropped_stale": ex["dropped_stale"],
            "rollout/running": ex["running"],
            "time/wait_s": t_wait,
            "time/train_s": t_train,
            "time/step_s": t_step,
            "time/elapsed_s": elapsed,
            "throughput/tokens_per_s": self.state.tokens_trained / max(elapsed, 1e-9),
            "memory/peak_rss_gib": peak_rss_gib(),
            "memory/rss_gib": rss_gib(),
            "prompts": [g.data.get("prompt_id") if isinstance(g.data, dict) else None for g in groups],
        }


async def evaluate(
    engine: InferenceEngine, workflow: Any, data: Sequence[Any], *, concurrency: int = 32
) -> list[float]:
    """Run ``workflow`` once per item outside the staleness budget; return each item's mean reward.

    A rejected item (the workflow returned None or raised) is left out, not scored 0.
    """
    sem = asyncio.Semaphore(concurrency)
    rewards: list[float] = []

    async def one(item: Any) -> None:
        async with sem:
            try:
                out = await workflow.arun_episode(engine, item)
            except Exception as e:  # an eval episode failing is counted, not fatal
                log.warning("eval episode failed: %s: %s", type(e).__name__, e)
                return
        trajs = [out] if isinstance(out, Trajectory) else (out or [])
        if trajs:
            rewards.append(statistics.fmean(t.reward for t in trajs))

    async with asyncio.TaskGroup() as tg:
        for item in data:
            tg.create_task(one(item))
    return rewards


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _postfix(r: dict[str, Any]) -> str:
    return (f"reward={r['reward/mean']:.3f} stale={r['staleness/max']} "
            f"tok/s={r['throughput/tokens_per_s']:.0f} step={r['time/step_s']:.1f}s")
