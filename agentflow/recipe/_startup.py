"""Before ``agentflow train`` changes anything: is the run startable, and what will it bend?

:func:`check_run_dir` decides, without writing, whether the run directory can take this run (it
is a directory or does not exist, it is writable, ``--resume`` has an intact checkpoint to use, a
plain run does not clobber checkpoints) and returns the checkpoint to resume from.
:func:`commit_run_dir` is called once everything is built and loaded: only then is the directory
created and ``config.json`` written (:func:`saved_form`, secrets redacted); a fresh run moves a
stale ``metrics.jsonl`` (from a run that stopped before its first checkpoint) aside.
:func:`warn_bent_options` logs, at start, each option the run will silently bend.

Not here: building the run (:mod:`agentflow.recipe.build`) or running it (:mod:`agentflow.recipe.async_rl`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pathlib
import time
from typing import Any

from agentflow._checkpoint import Checkpointer
from agentflow._metrics import MetricsLogger
from agentflow.config import to_dict
from agentflow.errors import CheckpointError, ConfigError
from agentflow.recipe.config import REDACTED, TrainRecipeConfig, redact_options

__all__ = ["check_prompts_fit", "check_run_dir", "commit_run_dir", "describe_config_change", "drop_metrics_after",
           "open_metrics", "resume_failure", "saved_form", "warn_bent_options", "with_trajectory_cap"]

log = logging.getLogger("agentflow.train")


def check_run_dir(cfg: TrainRecipeConfig, resume: bool) -> pathlib.Path | None:
    """The checkpoint to resume from (None = start fresh); raises with the fix when the run
    directory cannot take this run. Writes nothing."""
    run_dir = pathlib.Path(cfg.logging.run_dir)
    _check_writable(run_dir)
    ckpts = Checkpointer(run_dir)
    if problems := ckpts.problems():
        raise ConfigError(problems)
    if resume:
        latest = ckpts.latest_intact()
        if latest is None:
            what = "an earlier run that stopped before its first checkpoint" if (run_dir / "metrics.jsonl").exists() \
                else "no run"
            raise CheckpointError(f"--resume: {run_dir} holds {what}, so there is nothing to resume (expected "
                                  f"a complete checkpoint under {run_dir}/checkpoints). Run the same command "
                                  "without --resume to start afresh.")
        return latest
    latest = ckpts.latest()
    if latest is not None:
        raise ConfigError(f"logging.run_dir={run_dir} already holds a run with checkpoints (newest: {latest.name}); "
                          "pass --resume to continue it, or set logging.run_dir to a new directory")
    return None


def _check_writable(run_dir: pathlib.Path) -> None:
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"logging.run_dir={run_dir} is a file; expected a directory or a path that does not "
                          "exist yet. Point logging.run_dir elsewhere.")
    probe = run_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"logging.run_dir={run_dir}: {probe} is a file, so the directory cannot be created")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"logging.run_dir={run_dir} is not writable ({probe} denies writing, or its file "
                          "system is read-only); point logging.run_dir at a writable directory")


def commit_run_dir(cfg: TrainRecipeConfig, resumed_step: int | None) -> pathlib.Path:
    """Create the run directory and write ``config.json`` (the run is known to be startable).
    A resumed run (``resumed_step``) drops the metrics of steps after that checkpoint: they are
    trained again, and would otherwise appear twice in ``metrics.jsonl``."""
    run_dir = pathlib.Path(cfg.logging.run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"cannot create logging.run_dir={run_dir} ({e.strerror}); point logging.run_dir at a "
                          "writable directory") from e
    stale = run_dir / "metrics.jsonl"
    if resumed_step is not None:
        drop_metrics_after(stale, resumed_step)
    elif stale.exists():
        aside = run_dir / f"metrics.stale-{time.strftime('%Y%m%d-%H%M%S')}.jsonl"
        stale.rename(aside)
        log.warning("%s had no checkpoint (its run stopped before the first one): starting afresh; its metrics "
                    "were moved to %s", run_dir, aside.name)
    (run_dir / "config.json").write_text(json.dumps(saved_form(cfg), indent=1, default=str))
    return run_dir


def drop_metrics_after(path: pathlib.Path, step: int) -> int:
    """Rewrite ``metrics.jsonl`` without the records of steps after ``step`` (and torn lines);
    returns how many were dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record_step = json.loads(line).get("step")
        except (ValueError, AttributeError):
            record_step = None
        if isinstance(record_step, int) and record_step <= step:
            kept.append(line + "\n")
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)
        log.warning("resuming at step %d: dropped %d metrics records of later steps (they are trained again)",
                    step, dropped)
    return dropped


def open_metrics(cfg: TrainRecipeConfig) -> MetricsLogger:
    """The run's metrics sinks; wandb gets the same redacted configuration as ``config.json``."""
    lg = cfg.logging
    return MetricsLogger(lg.run_dir, tensorboard=lg.tensorboard, wandb=lg.wandb, wandb_project=lg.wandb_project,
                         config=saved_form(cfg))


def saved_form(cfg: TrainRecipeConfig) -> dict[str, Any]:
    """The config as plain data for every sink (``config.json``, wandb), secrets redacted:
    ``inference.api_key`` and, in ``workflow.options`` and ``data.options``, what
    :func:`~agentflow.recipe.config.redact_options` names."""
    data = to_dict(cfg)
    if data["inference"].get("api_key") is not None:
        data["inference"]["api_key"] = REDACTED
    for section in ("workflow", "data"):
        data[section]["options"] = redact_options(data[section]["options"])
    return data


def describe_config_change(cfg: TrainRecipeConfig, run_dir: pathlib.Path) -> str:
    """The model settings that differ from the run's saved ``config.json`` (why a resume failed)."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        return ""
    now = to_dict(cfg)
    diffs = [f"{section}.{k}: {v!r} in the checkpoint's run, {now[section].get(k)!r} now"
             for section in ("model", "train") for k, v in (saved.get(section) or {}).items()
             if now.get(section, {}).get(k) != v]
    return "; ".join(diffs)


def warn_bent_options(cfg: TrainRecipeConfig, n_train: int) -> list[str]:
    """Log (and return) a warning for each option this run will silently bend."""
    warnings: list[str] = []
    b = cfg.rollout.consumer_batch_size
    if b > n_train:
        warnings.append(f"rollout.consumer_batch_size={b} is larger than the {n_train} training prompts: every step "
                        "repeats prompts (the same prompt twice in one batch). Lower it or add data.")
    least = cfg.rollout.min_consumer_batch_size
    if least is not None and least < b and cfg.rollout.max_staleness == 0 and cfg.rollout.stale_policy != "keep":
        warnings.append(f"rollout.min_consumer_batch_size={least} with rollout.max_staleness=0: a step that starts "
                        f"with fewer than {b} groups leaves the rest of its version's episodes to go stale at the "
                        "next version, where they are dropped (generated for nothing). Leave it unset for "
                        "synchronous training or allow a version of lag.")
    if cfg.inference.backend == "local":
        cap, new = cfg.inference.local.max_seq_len, cfg.generation.max_new_tokens
        if new >= cap:
            warnings.append(f"generation.max_new_tokens={new} is not below inference.local.max_seq_len={cap}: "
                            "outputs are cut at max_seq_len minus the prompt. Raise max_seq_len or lower "
                            "max_new_tokens.")
    for w in warnings:
        log.warning("%s", w)
    return warnings


def with_trajectory_cap(cfg: TrainRecipeConfig) -> TrainRecipeConfig:
    """``cfg`` with ``rollout.max_trajectory_tokens`` defaulting to ``trainer.max_tokens_per_mb``: a
    longer trajectory cannot be trained on, so it is dropped when accepted, not at the train step."""
    cap = cfg.trainer.max_tokens_per_mb
    if cfg.rollout.max_trajectory_tokens is not None or cap is None:
        return cfg
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, max_trajectory_tokens=cap))


def check_prompts_fit(cfg: TrainRecipeConfig, rows: list[dict[str, Any]], tokenizer: Any, sample: int = 32) -> None:
    """With the local engine, raise :class:`ConfigError` when even the shortest of the first
    ``sample`` training prompts (its chat messages alone, before any tools a workflow adds) leaves
    no room for one token under ``inference.local.max_seq_len``: every episode would be refused.
    Rows that are not prompts (a verifiers environment's row ids: the environment makes the prompt)
    are not checked."""
    from agentflow.envs.tasks import Task

    if cfg.inference.backend != "local" or not rows or not hasattr(tokenizer, "apply_chat_template"):
        return
    cap = cfg.inference.local.max_seq_len

    def length(row: dict[str, Any]) -> int:
        text = tokenizer.apply_chat_template(Task.from_data(row).messages(), tokenize=False, add_generation_prompt=True)
        return len(tokenizer.encode(text, add_special_tokens=False))

    lengths = [length(r) for r in rows[:sample] if isinstance(r.get("prompt", r.get("question")), str)]
    if not lengths:
        return
    if min(lengths) >= cap:
        raise ConfigError(f"inference.local.max_seq_len={cap} is not longer than any of the first {len(lengths)} "
                          f"training prompts (shortest {min(lengths)} tokens, longest {max(lengths)}); expected "
                          "room for the prompt and an answer. Raise inference.local.max_seq_len above "
                          f"{max(lengths) + cfg.generation.max_new_tokens} or shorten the prompts (data.shots, "
                          "data.system).")


def resume_failure(e: BaseException, checkpoint: pathlib.Path, change: str) -> CheckpointError:
    """A resume that failed while loading: say which checkpoint, and what changed since."""
    why = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    hint = f" The configuration changed: {change}." if change else ""
    return CheckpointError(f"cannot resume from {checkpoint} ({why}).{hint} Resume with the configuration the "
                           "run was started with, or start a new run in another logging.run_dir.")

