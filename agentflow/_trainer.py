"""The asynchronous RL training loop: rollout on the event loop, training on a background thread.

The event loop runs the inference engine, its :class:`Rollout` (executor, buffer, staleness) and a
feeder that keeps the rollout's queue topped up from a :class:`PromptSource`. A background thread runs the trainer:
take B groups from the replay buffer (passing the optional ``group_filter``, e.g. dynamic sampling,
which drops groups and waits for more; a dropped group gives its staleness slot back, see
:meth:`Rollout.get_groups`), recompute proximal (and reference) log-probs, compute
advantages, run the PPO minibatch updates, step the LR schedule, then publish the weights
(upload, then pause -> load -> version bump -> resume on the loop; with
``trainer.overlap_weight_load`` a ``disk`` version is written and loaded while the next step
trains) and log.
Evaluation runs on the loop beside rollout, pinned to one weight version: the next weight update
waits for it.

The trainer thread reaches the loop only through ``asyncio.run_coroutine_threadsafe``; the loop
never blocks on the trainer. Under ``torchrun`` only rank 0 runs the loop; the other ranks run
:meth:`Trainer.follow`, which receives each step's shard of the batch (split by token count) and
joins the collective train, upload and save calls.

Not here: building engines, workflows or datasets from a config (``agentflow.recipe``), the PPO step
(``agentflow.algo.ppo_step``), torchrun rank plumbing (``agentflow._ranks``).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import pathlib
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow._buffer import Group, GroupFilter
from agentflow._checkpoint import Checkpointer
from agentflow._data import PromptSource
from agentflow._engine_api import InferenceEngine, TrainEngine, WeightUpdateMeta
from agentflow._guard import guard_workflow
from agentflow._memory import peak_rss_gib, rss_gib, trim_heap
from agentflow._metrics import MetricsLogger
from agentflow._publish import WeightPublisher, call_on_loop
from agentflow._rollout import Rollout
from agentflow._trace import TRAINER_TID, Timeline
from agentflow._types import Trajectory
from agentflow.errors import ConfigError, EngineError, WorkflowError

__all__ = ["EvalSpec", "Trainer", "TrainerConfig"]

log = logging.getLogger("agentflow.trainer")
_MAX_LOGGED_REJECTIONS = 20


@dataclass(frozen=True, slots=True)
class TrainerConfig:
    """The training loop.

    Attributes:
        total_steps: train steps to run (each step makes one new policy version).
        ppo_minibatches: optimiser steps per batch; the batch is split by group into this many minibatches.
        max_tokens_per_mb: token budget of one packed micro-batch (bounds activation memory).
        weight_update: how new weights reach the inference engine: mem (same process), disk
            (HF checkpoint + reload) or nccl (broadcast to SGLang servers).
        nccl_address: address the servers reach train rank 0 at for the ``nccl`` broadcast group
            (this host's address as the servers see it; loopback when they run here).
        nccl_port: TCP port of that group's rendezvous on train rank 0; 0 = a free port picked at start.
        checkpoint_every: steps between checkpoints (0 = only at the end of the run).
        keep_checkpoints: complete checkpoints kept on disk.
        weights_dir: with ``weight_update=disk``, where each version is written (``v<version>``, a
            whole HF model the servers load); null = ``<run_dir>/weights``. The servers must read
            it: a shared filesystem for servers on other hosts; for servers on this host a tmpfs
            (``/dev/shm/...``) saves the write to disk on every step.
        keep_weight_versions: with ``weight_update=disk``, the newest weight directories kept under
            the weights directory once every server has loaded them (each is a whole model); null
            keeps every version.
        overlap_weight_load: with ``weight_update=disk``, start the next step as soon as the
            weights are copied (``TrainEngine.snapshot_weights``): a thread writes the version and
            the servers load it while the step trains (the next publish and every checkpoint wait
            for both, and a failed write or load fails the run there). Staleness is counted against
            the trainer's version either way, so the bound holds. Off by default: on a 2-core CPU
            host the write and the load beside the step cost its training and rollouts more than
            they saved (docs/training.md); synchronously it cannot help, as the next batch needs
            the new version before it can start generating. Where training runs on GPUs and the
            host's CPUs are free it takes the write off the step.
        train_cpus: CPUs the training thread runs on (Linux; null = the process's). The event loop
            (rollouts, rewards, HTTP to the servers) and weight uploads keep the process's CPUs, so
            with the process given the servers' CPUs too (``taskset -c 0,1 agentflow train ...
            trainer.train_cpus=[1]`` beside ``taskset -c 0 agentflow serve``) the loop's work goes to
            the servers' spare time instead of taking the training core (an asynchronous step on a
            2-core host: about 3% shorter, docs/training.md). With several ranks, pin each rank's
            process instead.
        eval_every: steps between evaluations (0 = never); with evaluation on, version 0 (the
            starting policy) is evaluated too.
        eval_samples: samples per held-out prompt in an evaluation.
        batch_timeout_s: deadline for one batch of rollouts to arrive (fails loudly when exceeded).
        update_timeout_s: deadline for one weight update.
        max_queued: prompts the feeder keeps waiting in the executor's queue.
        max_skipped_steps: consecutive steps whose every optimiser step was skipped (a non-finite
            gradient norm) after which the run fails with the reason; null = never.
        stop_grace_s: after SIGINT/SIGTERM, seconds the run may take to stop cleanly (finish the
            step in progress and write a final checkpoint) before the process exits at once.
        loop_block_warn_s: warn (naming the workflow, at most once a minute) when one episode holds
            the event loop this long without awaiting.
    """

    total_steps: int = 40
    ppo_minibatches: int = 1
    max_tokens_per_mb: int | None = 8192
    weight_update: Literal["mem", "disk", "nccl"] = "mem"
    nccl_address: str = "127.0.0.1"
    nccl_port: int = 0
    checkpoint_every: int = 10
    keep_checkpoints: int = 2
    weights_dir: str | None = None
    keep_weight_versions: int | None = 1
    overlap_weight_load: bool = False
    train_cpus: list[int] | None = None
    eval_every: int = 0
    eval_samples: int = 2
    batch_timeout_s: float = 1800.0
    update_timeout_s: float = 600.0
    max_queued: int = 64
    max_skipped_steps: int | None = 3
    stop_grace_s: float = 8.0
    loop_block_warn_s: float = 1.0

    def __post_init__(self) -> None:
        problems = []
        for name, lo in (("total_steps", 1), ("ppo_minibatches", 1), ("checkpoint_every", 0),
                         ("keep_checkpoints", 1), ("eval_every", 0), ("eval_samples", 1), ("max_queued", 1)):
            if getattr(self, name) < lo:
                problems.append(f"trainer.{name} must be >= {lo}, got {getattr(self, name)}")
        if self.max_tokens_per_mb is not None and self.max_tokens_per_mb < 16:
            problems.append(f"trainer.max_tokens_per_mb must be >= 16 or null, got {self.max_tokens_per_mb}")
        for name in ("batch_timeout_s", "update_timeout_s", "stop_grace_s", "loop_block_warn_s"):
            if not 0 < getattr(self, name) < math.inf:
                problems.append(f"trainer.{name} must be a finite number of seconds > 0, got {getattr(self, name)}")
        if self.keep_weight_versions is not None and self.keep_weight_versions < 1:
            problems.append(f"trainer.keep_weight_versions must be >= 1 or null (keep all), got "
                            f"{self.keep_weight_versions}")
        if self.max_skipped_steps is not None and self.max_skipped_steps < 1:
            problems.append(f"trainer.max_skipped_steps must be >= 1 or null, got {self.max_skipped_steps}")
        cpus = self.train_cpus
        if cpus is not None and (not cpus or len(set(cpus)) != len(cpus)
                                 or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cpus)):
            problems.append(f"trainer.train_cpus must be a non-empty list of distinct CPU numbers (e.g. [1]) or null, "
                            f"got {cpus!r}")
        ConfigError.check(problems)

    def check_train_cpus(self) -> None:
        """Raise :class:`ConfigError` unless this process may pin a thread to ``train_cpus``."""
        if self.train_cpus is None:
            return
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ConfigError(f"trainer.train_cpus pins one process's training thread, but this run has "
                              f"WORLD_SIZE={os.environ['WORLD_SIZE']} ranks; pin each rank's process instead "
                              f"(e.g. taskset or numactl per rank) and remove trainer.train_cpus")
        if not hasattr(os, "sched_setaffinity"):
            raise ConfigError("trainer.train_cpus pins the training thread with os.sched_setaffinity, which this "
                              "platform lacks (Linux only); remove trainer.train_cpus")
        allowed = os.sched_getaffinity(0)
        if not set(self.train_cpus) <= allowed:
            raise ConfigError(f"trainer.train_cpus={self.train_cpus} names CPUs this process may not use: it may "
                              f"use {sorted(allowed)}; pick from those, or start the process on more CPUs "
                              f"(e.g. taskset -c {','.join(map(str, sorted(allowed | set(self.train_cpus))))})")

    def weights_path(self, run_dir: str | pathlib.Path) -> pathlib.Path:
        """The absolute directory ``disk`` versions (and published adapters) go to."""
        return pathlib.Path(self.weights_dir or pathlib.Path(run_dir) / "weights").absolute()


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
    saved_step: int = 0  # the step of the newest checkpoint written or resumed from
    skipped_in_a_row: int = 0
    rejected_invalid: int = 0  # trajectories refused at consume time (token ids outside the vocabulary)
    tokens_trained: int = 0
    episodes_trained: int = 0
    extra_episodes: int = 0
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
        group_filter: ``group_filter(group) -> bool``, a pure predicate on a group
            (``agentflow.algo.group_filter(algo)`` for DAPO's dynamic sampling): groups it rejects
            are not trained on and the step waits until B groups pass. It screens each group as it
            arrives (the buffer's ``arrival_filter``), so a rejected group's replacement generates
            while the trainer trains, and again when groups are taken. Logged as
            ``rollout/filtered_groups`` and ``rollout/filtered_frac`` (groups dropped since the last
            step, and their share of those plus the B trained) and ``rollout/extra_episodes``
            (episodes sampled but not trained on; ``_total``: since the start of this process).
        max_filtered_per_step: the most groups ``group_filter`` drops per step, counted from the
            previous step (0 = no limit; ``algo.dynamic_sampling_max_drop``). Past it, groups pass
            unscreened until the step has its B groups, and ``rollout/filter_capped`` is 1.
        trace: write the run's timeline to ``<run_dir>/trace.json`` (``trace-2.json``, ... when
            resumed): every episode group from start to end, the trainer's wait / train / publish,
            what each step took and what was discarded, on one clock (Trace Event Format: open it
            in https://ui.perfetto.dev).
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
        group_filter: GroupFilter | None = None,
        max_filtered_per_step: int = 0,
        trace: bool = False,
    ) -> None:
        self.cfg = config
        self.engine = engine
        self.rollout = Rollout.of(engine)
        self.train_engine = train_engine
        self.train_step = train_step
        self.workflow = guard_workflow(workflow, block_warn_s=config.loop_block_warn_s)  # SystemExit, blocking
        self.prompts = prompts
        self.run_dir = pathlib.Path(run_dir)
        self.weights_dir = config.weights_path(self.run_dir)
        self.metrics = metrics
        if evaluation is not None:
            evaluation = dataclasses.replace(evaluation, workflow=guard_workflow(evaluation.workflow))
        self.evaluation = evaluation
        self.progress = progress
        self.tokenizer = tokenizer
        self._filtered_seen = (0, 0)  # buffer.stats.filtered / filtered_episodes at the last step
        self.max_filtered_per_step = max_filtered_per_step
        capped = group_filter is not None and max_filtered_per_step > 0
        self.group_filter = self._capped(group_filter, max_filtered_per_step) if capped else group_filter
        if self.group_filter is not None:
            self.rollout.buffer.arrival_filter = self.group_filter
        config.check_train_cpus()
        self.checkpointer = Checkpointer(self.run_dir, keep=config.keep_checkpoints)
        self.state = _RunState()
        self._resume_rollout: dict[str, Any] | None = None
        self._eval_task: asyncio.Task[None] | None = None
        self._stop = threading.Event()
        self.publisher = WeightPublisher(config.weight_update, engine=engine, train_engine=train_engine,
                                         weights_dir=self.weights_dir, nccl_address=config.nccl_address,
                                         nccl_port=config.nccl_port, timeout_s=config.update_timeout_s,
                                         keep_disk_versions=config.keep_weight_versions)
        self.stopped_by: str | None = None  # why request_stop was called (e.g. "SIGINT")
        self.trace = trace
        self.timeline: Timeline | None = None  # while run() runs with trace=True
        self._vocab_size = train_engine.vocab_size()
        if not callable(getattr(workflow, "arun_episode", None)):
            raise WorkflowError(f"expected a workflow with `async def arun_episode(engine, data)`, got "
                                f"{type(workflow).__name__}, which has no arun_episode method")

    # ------------------------------------------------------------------ resume
    def resume_from(self, path: pathlib.Path) -> None:
        """Load a checkpoint before :meth:`run`: model/optimiser, data position, version, rollouts."""
        from agentflow._engine_api import SaveLoadMeta

        trainer_state, rollout_state = self.checkpointer.load(path)
        self.train_engine.load(SaveLoadMeta(path=str(path / "model"), with_optim=True))
        self.prompts.load_state_dict(trainer_state["data"])
        self.state.step = self.state.saved_step = trainer_state["step"]
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
        if self.trace:
            self.timeline = Timeline.in_run_dir(self.run_dir)
            self.rollout.executor.timeline = self.timeline
            log.info("writing the run's timeline to %s (open it in https://ui.perfetto.dev)", self.timeline.path)
        try:
            await self._run_loop()
        finally:
            if self.timeline is not None:
                self.rollout.executor.timeline = None
                self.timeline.close()
                self.timeline = None

    async def _run_loop(self) -> None:
        async with self.engine, contextlib.AsyncExitStack() as stack, asyncio.TaskGroup() as tg:
            await _enter_workflows(stack, self.workflow, self.evaluation and self.evaluation.workflow)
            await self._restore_rollout()
            ev = self.evaluation
            if ev is not None and self.cfg.eval_every and self.state.step == 0:
                self._eval_task = asyncio.get_running_loop().create_task(self._evaluate(0, ev))
            feeder = tg.create_task(self._feed())
            try:
                await asyncio.to_thread(self._train_thread, asyncio.get_running_loop())
                if self._eval_task is not None and not self.stopped_by:  # the last version's evaluation
                    await self._eval_task
            finally:
                self._stop.set()
                self.rollout.buffer.fail(_Stopped("the run is ending"))  # wakes the trainer thread if it still waits
                feeder.cancel()
                if self._eval_task is not None:
                    self._eval_task.cancel()

    def request_stop(self, reason: str = "stop requested") -> None:
        """Stop after the step in progress (thread-safe): the trainer thread stops waiting for
        rollouts at once and, if a step finished since the last checkpoint, writes a final one."""
        if self.stopped_by is None:
            self.stopped_by = reason
        self._stop.set()
        self.rollout.buffer.fail(_Stopped(reason))

    async def _restore_rollout(self) -> None:
        version = self.state.step
        if not version:
            return
        await self.publisher.restore(version)
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
        pinned_from = _pin_thread(self.cfg.train_cpus)
        try:
            while self.state.step < self.cfg.total_steps and not self._stop.is_set():
                try:
                    record = self._one_step(loop)
                except _Stopped:
                    break
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix_str(_postfix(record))
                due = self.cfg.checkpoint_every and self.state.step % self.cfg.checkpoint_every == 0
                if due or self.state.step == self.cfg.total_steps:
                    self._checkpoint(loop)
                self._check_skipped(record)
            if self.stopped_by and self.state.step > self.state.saved_step:
                self._checkpoint(loop)  # the final checkpoint of an interrupted run
            self.publisher.settle()  # the last version's load
        finally:
            self.publisher.abandon()  # a load left running by a failed step
            if pinned_from is not None:  # this is a pool thread: later calls get the process's CPUs back
                os.sched_setaffinity(0, pinned_from)
            if bar is not None:
                bar.close()

    def _one_step(self, loop: asyncio.AbstractEventLoop) -> dict[str, Any]:
        held0 = self.rollout.buffer.stats.held_s
        t0 = time.perf_counter()
        groups, filtered = self._take_groups()
        t_wait = time.perf_counter() - t0
        trajs = [t for g in groups for t in g.trajectories]
        self.train_engine.set_version(self.state.step)  # the version its weights are (the mismatch metric)
        stats = self.train_step(trajs)
        trim_heap()
        t_train = time.perf_counter() - t0 - t_wait
        version = self.state.step + 1
        meta = self.publisher.publish(loop, version, self._publish, wait=not self.cfg.overlap_weight_load)
        t_publish = time.perf_counter() - t0 - t_wait - t_train
        if self.timeline is not None:
            self._trace_step(self.timeline, groups, len(trajs), (t0, t_wait, t_train, t_publish), held0)
        self.state.step = version
        n_tokens = sum(len(t) for t in trajs)
        self.state.tokens_trained += n_tokens
        self.state.episodes_trained += len(trajs)
        record = self._step_record(groups, trajs, stats, t_wait, t_train, time.perf_counter() - t0)
        record.update(filtered)
        record["time/publish_s"] = t_publish  # the previous load, the upload, then (waiting) this load
        if meta.nbytes is not None:  # what the weight update moved (the adapter only, with LoRA)
            record["weights/update_mib"] = meta.nbytes / 2**20
        self.metrics.log(version, record)
        return record

    def _trace_step(self, tl: Timeline, groups: list[Group], samples: int, times: tuple[float, float, float, float],
                    held0: float) -> None:
        """The step that just published ``self.state.step + 1``: its phases and what it took."""
        step, (t0, wait, train, publish) = self.state.step + 1, times
        tl.span("wait", t0, t0 + wait, step=step, held_s=round(self.rollout.buffer.stats.held_s - held0, 4))
        tl.instant("take", TRAINER_TID, at=t0 + wait, step=step, groups=[g.group_id for g in groups],
                   lags=[None if g.min_version is None else step - 1 - g.min_version for g in groups])
        tl.span("train", t0 + wait, t0 + wait + train, step=step, samples=samples)
        tl.span("publish", t0 + wait + train, t0 + wait + train + publish, version=step)
        tl.flush()

    def _capped(self, inner: GroupFilter, cap: int) -> GroupFilter:
        """``inner`` until it has dropped ``cap`` groups since the last step, then a pass-through.
        Runs on the event loop (arrival screening) and on the trainer thread (taking): both only
        read the counters, which the buffer's lock-holding callers and ``_take_groups`` write."""
        stats = self.rollout.buffer.stats

        def keep(group: Group) -> bool:
            return stats.filtered - self._filtered_seen[0] >= cap or inner(group)

        return keep

    def _take_groups(self) -> tuple[list[Group], dict[str, Any]]:
        """This step's B groups, and what the group filter dropped since the last step (metrics)."""
        groups = self._valid_groups(self.cfg.batch_timeout_s)
        if self.group_filter is None:
            return groups, {}
        b = self.rollout.buffer.stats
        (groups0, episodes0), self._filtered_seen = self._filtered_seen, (b.filtered, b.filtered_episodes)
        dropped, extra = b.filtered - groups0, b.filtered_episodes - episodes0
        self.state.extra_episodes += extra
        cap = self.max_filtered_per_step
        capped = {"rollout/filter_capped": int(dropped >= cap)} if cap else {}
        return groups, capped | {
            "rollout/filtered_groups": dropped,
            "rollout/filtered_frac": dropped / (dropped + len(groups)),
            "rollout/extra_episodes": extra,
            "rollout/extra_episodes_total": self.state.extra_episodes,
        }

    def _valid_groups(self, timeout: float) -> list[Group]:
        """A batch of groups whose every token id is inside the policy's vocabulary. A trajectory
        outside it is rejected with a logged reason (it would end the run with an IndexError in
        the train engine); a group left empty is replaced by waiting for another."""
        cfg = self.rollout.config
        want = cfg.consumer_batch_size
        least = want if cfg.min_consumer_batch_size is None else cfg.min_consumer_batch_size
        deadline = time.monotonic() + timeout
        kept: list[Group] = []
        while len(kept) < least:
            left = deadline - time.monotonic()
            for g in self.rollout.get_groups(want - len(kept), timeout=max(left, 0.001), group_filter=self.group_filter,
                                             at_least=least - len(kept), version=self.state.step):
                good = [t for t in g.trajectories if self._in_vocab(t, g.group_id)]
                if good:
                    g.trajectories = good
                    kept.append(g)
        return kept

    def _in_vocab(self, traj: Trajectory, group_id: str) -> bool:
        vocab = self._vocab_size
        if vocab is None or not traj.input_ids:
            return True
        lo, hi = min(traj.input_ids), max(traj.input_ids)
        if 0 <= lo and hi < vocab:
            return True
        self.state.rejected_invalid += 1
        if self.state.rejected_invalid <= _MAX_LOGGED_REJECTIONS:
            log.warning("rejected a trajectory of group %s: token ids span [%d, %d], expected ids in [0, %d) (the "
                        "policy's vocabulary); tokenize tool and user turns with the policy's tokenizer",
                        group_id, lo, hi, vocab)
        return False

    async def _publish(self, version: int, meta: WeightUpdateMeta) -> None:
        """Pause rollout, load the new weights, bump the version, resume; then maybe evaluate."""
        if self._eval_task is not None:
            await self._eval_task  # evaluation is pinned to the previous version
            self._eval_task = None
        await self.rollout.update_weights(meta, version)
        if self.timeline is not None:
            self.timeline.version(version)
        ev = self.evaluation
        if ev is not None and self.cfg.eval_every and version % self.cfg.eval_every == 0:
            self._eval_task = asyncio.get_running_loop().create_task(self._evaluate(version, ev))

    async def _evaluate(self, version: int, ev: EvalSpec) -> None:
        t0 = time.perf_counter()
        rewards = await evaluate(self.engine, ev.workflow, ev.data, concurrency=ev.concurrency)
        if self.timeline is not None:
            self.timeline.evaluation(version, t0, time.perf_counter(), n=len(rewards),
                                     reward=_mean(rewards) if rewards else None)
        self.metrics.log(version, {"eval/version": version, "eval/reward": _mean(rewards), "eval/n": len(rewards)})

    def _checkpoint(self, loop: asyncio.AbstractEventLoop) -> None:
        self.publisher.settle()  # the rollout state saved is at the trainer's version
        rollout_state = call_on_loop(loop, self._snapshot_rollout(), self.cfg.update_timeout_s)
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
        self.state.saved_step = self.state.step

    def _check_skipped(self, record: dict[str, Any]) -> None:
        """Fail after ``max_skipped_steps`` steps in a row that changed no weight."""
        limit = self.cfg.max_skipped_steps
        skipped = record.get("train/skipped", 0.0) >= 1.0
        self.state.skipped_in_a_row = self.state.skipped_in_a_row + 1 if skipped else 0
        if limit is None or self.state.skipped_in_a_row < limit:
            return
        raise EngineError(
            f"{self.state.skipped_in_a_row} steps in a row skipped their update because the gradient norm was "
            f"not finite (last: train/grad_norm={record.get('train/grad_norm')}, reward/mean="
            f"{record.get('reward/mean')}), so the run stopped at step {self.state.step} instead of training on. "
            "Expected finite rewards, log-probs and losses: check the reward function's range and the "
            "learning rate, or raise trainer.max_skipped_steps (null disables this check)."
        )

    async def _snapshot_rollout(self) -> dict[str, Any]:
        """Buffer, in-flight prompts and data position, read in one step on the loop (consistent)."""
        return {**self.rollout.state_dict(), "data": self.prompts.state_dict()}

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
            **_episode_info(trajs),
            "reward/mean": _mean(rewards),
            "reward/max": max(rewards, default=math.nan),
            "staleness/max": max(lags, default=0),
            "staleness/mean": _mean(lags),
            "rollout/groups": len(groups),
            "rollout/episodes": len(trajs),
            "rollout/gen_tokens_mean": gen_tokens / max(1, len(trajs)),
            "rollout/rejected": ex["rejected"],
            "rollout/rejected_invalid": self.state.rejected_invalid,
            "rollout/dropped_stale": ex["dropped_stale"],
            "rollout/held_for_expiring_s": ex["held_for_expiring_s"],
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


async def _enter_workflows(stack: contextlib.AsyncExitStack, *workflows: Any) -> None:
    """Enter the workflows that hold resources for the run (``async with workflow:``, e.g. a proxy)."""
    for wf in dict.fromkeys(getattr(w, "inner", w) for w in workflows if w is not None):  # a guard wraps it
        if hasattr(type(wf), "__aenter__"):
            await stack.enter_async_context(wf)


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


class _Stopped(Exception):
    """Raised in the trainer thread's wait for rollouts once a stop was requested."""


# numeric ``Trajectory.info`` keys that multi-turn workflows record, logged per step as episode means
_EPISODE_INFO = {"turns": "rollout/turns_mean", "tool_calls": "rollout/tool_calls_mean"}


def _episode_info(trajs: Sequence[Trajectory]) -> dict[str, float]:
    """Means of the multi-turn counters workflows put in ``info`` (turns, tool calls), and the
    template-drift total (tokens re-rendered differently from what was sampled; 0 = every trained
    token is a sampled token)."""
    out = {}
    for key, name in _EPISODE_INFO.items():
        values = [float(t.info[key]) for t in trajs if isinstance(t.info.get(key), int | float)]
        if values:
            out[name] = _mean(values)
    drift = [float(t.info["template_drift"]) for t in trajs if isinstance(t.info.get("template_drift"), int | float)]
    if drift:
        out["rollout/template_drift"] = sum(drift)
    return out


def _mean(xs: Sequence[float]) -> float:
    return statistics.fmean(xs) if xs else math.nan


def _pin_thread(cpus: list[int] | None) -> set[int] | None:
    """Pin the calling thread to ``cpus``; returns the CPUs it had (None when left alone)."""
    if cpus is None:
        return None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    log.info("training thread pinned to CPUs %s (the event loop keeps %s)", sorted(cpus), sorted(before))
    return before


def _progress_bar(total: int, initial: int) -> Any:
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)


def _postfix(r: dict[str, Any]) -> str:
    return (f"reward={r['reward/mean']:.3f} stale={r['staleness/max']} "
            f"tok/s={r['throughput/tokens_per_s']:.0f} step={r['time/step_s']:.1f}s")
