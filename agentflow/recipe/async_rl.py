"""The ``agentflow train`` and ``agentflow eval`` recipe, top to bottom.

:func:`train`: model -> train engine (and reference) -> (under torchrun, ranks > 0 follow rank 0)
-> inference engine -> task rows and rewards -> workflow -> :class:`Trainer` -> run. One train
step is :func:`agentflow.algo.ppo_step`. :func:`evaluate_model` scores a model on the held-out rows.
A custom loop is this file with the parts swapped (``examples/custom_loop.py``).

Not here: the config's fields (:mod:`agentflow.recipe.config`), how each object is built
(:mod:`agentflow.recipe.build`), the loop itself (:class:`agentflow.Trainer`).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import os
import pathlib
import time
from typing import Any

from agentflow._data import PromptSource
from agentflow._engine_api import SaveLoadMeta, TrainEngine
from agentflow._memory import mmap_large_allocations
from agentflow._metrics import MetricsLogger
from agentflow._ranks import LeadEngine, Ranks, StepPlan, follow
from agentflow._stop import GracefulStop
from agentflow._trainer import EvalSpec, Trainer, evaluate
from agentflow.algo import group_filter
from agentflow.errors import CheckpointError, Interrupted
from agentflow.recipe import build
from agentflow.recipe._startup import (
    check_prompts_fit,
    check_run_dir,
    commit_run_dir,
    describe_config_change,
    open_metrics,
    resume_failure,
    warn_bent_options,
    with_trajectory_cap,
)
from agentflow.recipe.config import TrainRecipeConfig

__all__ = ["evaluate_model", "train"]


def train(cfg: TrainRecipeConfig, *, resume: bool = False) -> str:
    """Run ``agentflow train``; returns a one-line summary."""
    checkpoint = check_run_dir(cfg, resume)  # nothing is written before the run is known to start
    cfg.trainer.check_train_cpus()  # before the model loads (the Trainer checks again for library use)
    cfg = with_trajectory_cap(cfg)
    run_dir = pathlib.Path(cfg.logging.run_dir)
    mmap_large_allocations()  # freed activations go back to the OS at once (agentflow/_memory.py)
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)

    model, tokenizer = build.model_and_tokenizer(cfg.model.path, cfg.model)
    train_engine = build.train_engine(cfg, copy.deepcopy(model), tokenizer)
    ref_engine = build.reference_engine(cfg, train_engine, model, tokenizer) if cfg.algo.ppo.kl_coef > 0 else None
    plan = StepPlan(cfg.algo, max_tokens_per_mb=cfg.trainer.max_tokens_per_mb,
                    minibatches=cfg.trainer.ppo_minibatches, ref_engine=ref_engine)
    ranks = Ranks() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if ranks is not None and ranks.rank > 0:
        return _follower(ranks, plan, train_engine, ref_engine, run_dir, checkpoint)

    addresses = build.server_addresses(cfg)
    engine = build.inference_engine(cfg, model, tokenizer, addresses)
    build.share_lora_base(cfg, train_engine, model)
    task = build.task_data(cfg.data)
    workflow = build.workflow(cfg.workflow, tokenizer, task.reward, cfg.generation)
    eval_workflow = build.workflow(cfg.workflow, tokenizer, task.eval_reward,
                                   cfg.generation.new(n_samples=cfg.trainer.eval_samples))
    check_prompts_fit(cfg, task.train, tokenizer)
    warn_bent_options(cfg, len(task.train))
    if ranks is None:
        step: Any = lambda trajs: plan.step(train_engine, trajs)  # noqa: E731
        lead: Any = train_engine
    else:
        step = lambda trajs: plan.lead(ranks, train_engine, trajs)  # noqa: E731
        lead = LeadEngine(train_engine, ranks)
    trainer = Trainer(
        cfg.trainer, engine=engine, train_engine=lead, train_step=step, workflow=workflow,
        prompts=PromptSource(task.train, seed=cfg.data.seed), run_dir=run_dir,
        metrics=MetricsLogger(run_dir, enabled=False),  # the real one once the run is known to start
        evaluation=EvalSpec(task.eval, eval_workflow), progress=cfg.logging.progress, tokenizer=tokenizer,
        group_filter=group_filter(cfg.algo), max_filtered_per_step=cfg.algo.dynamic_sampling_max_drop,
        trace=cfg.logging.trace,
    )
    if checkpoint is not None:
        _resume(trainer, checkpoint, cfg)
    commit_run_dir(cfg, resumed_step=trainer.state.step if checkpoint is not None else None)
    trainer.metrics = metrics = open_metrics(cfg)

    t0 = time.perf_counter()
    stop = GracefulStop(trainer.request_stop, lambda: _where(trainer), grace_s=cfg.trainer.stop_grace_s)
    try:
        with build.launched_servers(cfg, cfg.model.path, model, tokenizer, run_dir, addresses):
            asyncio.run(_run_until_stopped(trainer, stop))
    finally:
        if ranks is not None:
            ranks.send(("stop", None))
        metrics.close()
        _destroy(train_engine, ref_engine)
    if trainer.stopped_by:
        raise Interrupted(f"{trainer.stopped_by}: stopped after {time.perf_counter() - t0:.0f}s; {_where(trainer)}",
                          exit_code=stop.exit_code or 130)
    return f"trained {trainer.state.step} steps in {time.perf_counter() - t0:.0f}s; run directory: {run_dir}"


async def _run_until_stopped(trainer: Trainer, stop: GracefulStop) -> None:
    async with stop:
        await trainer.run()


def _where(trainer: Trainer) -> str:
    """Where an interrupted run stands: its step and the checkpoint ``--resume`` would use."""
    latest = trainer.checkpointer.latest()
    ckpt = f"last complete checkpoint: {latest}; continue with --resume" if latest else "no checkpoint was written"
    return f"at step {trainer.state.step}; {ckpt}"


def _resume(trainer: Trainer, checkpoint: pathlib.Path, cfg: TrainRecipeConfig) -> None:
    """Load ``checkpoint``; a failure names the checkpoint and what changed in the configuration."""
    try:
        trainer.resume_from(checkpoint)
    except CheckpointError:
        raise
    except (RuntimeError, KeyError, ValueError, TypeError) as e:  # e.g. tensor shapes of another model size
        raise resume_failure(e, checkpoint, describe_config_change(cfg, checkpoint.parents[1])) from e


def _destroy(train_engine: TrainEngine, ref_engine: TrainEngine | None) -> None:
    if ref_engine is not None:  # the first engine built owns the process group: destroy it last
        ref_engine.destroy()
    train_engine.destroy()


def _follower(ranks: Ranks, plan: StepPlan, train_engine: TrainEngine, ref_engine: TrainEngine | None,
              run_dir: pathlib.Path, checkpoint: pathlib.Path | None) -> str:
    """Ranks > 0 under torchrun: load the checkpoint, then mirror rank 0's collective calls."""
    if checkpoint is not None:
        train_engine.load(SaveLoadMeta(path=str(checkpoint / "model"), with_optim=True))
    try:
        follow(ranks, plan, train_engine)
    finally:
        _destroy(train_engine, ref_engine)
    return f"rank {ranks.rank} done"


def evaluate_model(cfg: TrainRecipeConfig, *, model: str | None = None, n: int | None = None) -> str:
    """``agentflow eval``: mean reward of ``model`` (a checkpoint's model dir or an HF dir) on the
    held-out prompts, with the configured workflow and sampling. Returns one JSON line."""
    path = model or cfg.model.path
    if (pathlib.Path(path) / "model").is_dir():  # a checkpoint directory: use its model/
        path = str(pathlib.Path(path) / "model")
    policy, tokenizer = build.policy_for_eval(path, cfg.model)
    task = build.task_data(cfg.data)
    rows = task.eval[: n or len(task.eval)]
    workflow = build.workflow(cfg.workflow, tokenizer, task.eval_reward, cfg.generation)
    addresses = build.server_addresses(cfg)
    engine = build.inference_engine(cfg, policy, tokenizer, addresses)

    async def run() -> list[float]:
        async with engine, contextlib.AsyncExitStack() as stack:
            if hasattr(workflow, "__aenter__"):
                await stack.enter_async_context(workflow)
            return await evaluate(engine, workflow, rows, concurrency=cfg.rollout.max_concurrent)

    t0 = time.perf_counter()
    with build.launched_servers(cfg, path, policy, tokenizer, pathlib.Path(cfg.logging.run_dir), addresses):
        rewards = asyncio.run(run())
    mean = sum(rewards) / len(rewards) if rewards else float("nan")
    return json.dumps({"model": path, "task": cfg.data.task, "n": len(rewards), "mean_reward": round(mean, 4),
                       "seconds": round(time.perf_counter() - t0, 1), "pid": os.getpid()})
