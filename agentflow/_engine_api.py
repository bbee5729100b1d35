"""The engine contracts: what an inference engine and a train engine must do.

The names and meanings follow AReaL's lite API (``engine_api.py``). Differences, all made for an
asyncio-first design: ``wait``, ``rollout``, ``pause`` and ``resume`` are coroutines run on the
event loop; ``update_weights`` returns a ``concurrent.futures.Future`` so the trainer thread can
block on it; engines are async context managers (``async with engine:`` = initialise, destroy).

Not here: implementations (``agentflow.engines``), running workflows under the staleness bound
(:class:`agentflow.Rollout`), the training loop.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol, runtime_checkable

from agentflow._rollout_config import RolloutConfig
from agentflow._types import ModelRequest, ModelResponse, Trajectory
from agentflow.errors import ConfigError, EngineError

if TYPE_CHECKING:
    import torch

__all__ = ["FinetuneSpec", "InferenceEngine", "MicroBatchSpec", "RolloutWorkflow", "SaveLoadMeta", "Scheduling",
           "TrainEngine", "WeightUpdateMeta"]


@runtime_checkable
class RolloutWorkflow(Protocol):
    """Anything with this method is a workflow; no base class needed."""

    async def arun_episode(
        self, engine: InferenceEngine, data: Any
    ) -> Trajectory | list[Trajectory] | None:  # None = rejected
        ...


@dataclass(frozen=True, slots=True)
class MicroBatchSpec:
    """How ``train_batch``/``forward`` split a batch: at least ``n_mbs`` micro-batches, each with
    at most ``max_tokens_per_mb`` tokens (None = no token cap)."""

    n_mbs: int = 1
    max_tokens_per_mb: int | None = None

    def __post_init__(self) -> None:
        problems = []
        if self.n_mbs < 1:
            problems.append(f"n_mbs must be >= 1, got {self.n_mbs}")
        if self.max_tokens_per_mb is not None and self.max_tokens_per_mb < 1:
            problems.append(f"max_tokens_per_mb must be >= 1 or None, got {self.max_tokens_per_mb}")
        ConfigError.check(problems)


@dataclass(frozen=True, slots=True)
class FinetuneSpec:
    """Run length, for learning-rate schedules."""

    total_train_epochs: int
    dataset_size: int
    train_batch_size: int

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.dataset_size // self.train_batch_size)

    @property
    def total_train_steps(self) -> int:
        return self.total_train_epochs * self.steps_per_epoch


@dataclass(frozen=True, slots=True)
class WeightUpdateMeta:
    """How new weights travel from the train engine to an inference engine.

    ``type``: ``"mem"`` (a state dict in this process, no copy to disk), ``"disk"`` (an HF
    checkpoint directory at ``path``) or ``"nccl"`` (broadcast from train rank 0 over a process
    group at ``master_address:master_port``). ``version`` is the policy version the weights are.

    LoRA: ``adapter`` names the adapter when only its tensors travel (``state_dict`` then holds
    them under PEFT's names, ``path`` is a PEFT adapter directory) and ``lora_config`` is its
    ``adapter_config.json`` content; None = full weights. ``nbytes``, filled in by the train engine's
    ``upload_weights``, is the size of the tensors moved (for metrics).
    """

    type: Literal["mem", "disk", "nccl"]
    path: str | None = None
    state_dict: Mapping[str, torch.Tensor] | None = field(default=None, repr=False)
    version: int | None = None
    master_address: str = "127.0.0.1"
    master_port: int = 0
    group_name: str = "agentflow_weight_update"
    timeout_s: float = 600.0
    adapter: str | None = None
    lora_config: Mapping[str, Any] | None = field(default=None, repr=False)
    nbytes: int | None = None

    def __post_init__(self) -> None:
        if self.type == "disk" and not self.path:
            raise ConfigError("WeightUpdateMeta(type='disk') needs path=<checkpoint directory>, got none")


@dataclass(frozen=True, slots=True)
class SaveLoadMeta:
    """Where and what ``TrainEngine.save``/``load`` write: HF weights, plus optimizer,
    scheduler and RNG state when ``with_optim``."""

    path: str
    weight_format: Literal["hf"] = "hf"
    with_optim: bool = True
    tokenizer: Any = None
    base_model_path: str | None = None


@dataclass(frozen=True, slots=True)
class Scheduling:
    """Resources an engine asks a launcher for."""

    cpu: int = 1
    gpu: int = 0
    mem: int = 0  # MiB
    nodelist: str | None = None
    exclude: str | None = None
    env_vars: Mapping[str, str] = field(default_factory=dict)


class InferenceEngine(abc.ABC):
    """Generates tokens, loads weights, pauses and carries the policy version.

    Subclasses implement :meth:`agenerate` and :meth:`aupdate_weights`, and may override the
    ``initialize``/``destroy`` and ``_interrupt``/``_continue`` hooks. Running workflows under the
    staleness bound is :class:`agentflow.Rollout`'s job: the engine holds at most one (attached by
    ``Rollout(engine)``, or built from ``rollout`` when the engine is entered without one), tells it
    about pauses and version changes, and forwards the seed API's ``submit`` / ``wait`` /
    ``rollout`` to it.

    Args:
        rollout: the settings of the rollout built on entry when none is attached.
    """

    def __init__(self, rollout: RolloutConfig | None = None) -> None:
        self.rollout_config = rollout or RolloutConfig()
        self._rollout: _RolloutHooks | None = None
        self._version = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._resumed: asyncio.Event | None = None

    # ------------------------------------------------------------------ lifetime
    async def initialize(self) -> None:
        """Acquire resources (load a model, connect to servers). Called by ``async with``."""

    async def destroy(self) -> None:
        """Release resources. Called by ``async with``, also after an error."""

    async def __aenter__(self) -> InferenceEngine:
        self._loop = asyncio.get_running_loop()
        self._resumed = asyncio.Event()
        self._resumed.set()
        await self.initialize()
        try:
            await self._rollout_or_default().start()
        except BaseException:
            await self.destroy()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self._rollout is not None:
                await self._rollout.stop(*exc)
        finally:
            await self.destroy()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            raise EngineError("engine not started: use `async with engine:` first")
        return self._loop

    # ------------------------------------------------------------------ the attached rollout
    def attach_rollout(self, rollout: _RolloutHooks) -> None:
        """Called by ``Rollout(engine)``; an engine runs one rollout, attached before it is entered."""
        if self._rollout is not None and self._rollout is not rollout:
            raise EngineError(
                f"{type(self).__name__} already has a Rollout attached; build one Rollout per engine "
                "(Rollout.of(engine) returns the attached one)"
            )
        self._rollout = rollout

    @property
    def attached_rollout(self) -> Any:
        """The :class:`agentflow.Rollout` attached to this engine, or None."""
        return self._rollout

    def _rollout_or_default(self) -> _RolloutHooks:
        if self._rollout is None:
            from agentflow._rollout import Rollout  # the default rollout, only when none was attached

            Rollout(self, self.rollout_config)
        assert self._rollout is not None
        return self._rollout

    # ------------------------------------------------------------------ generation
    @abc.abstractmethod
    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        """Generate for one request. Transparent to pauses: an interrupted generation resumes
        after :meth:`resume` and the tokens after the interruption carry the new version."""

    @abc.abstractmethod
    async def aupdate_weights(self, meta: WeightUpdateMeta) -> None:
        """Load new weights (on the loop). Usually called between ``pause`` and ``resume``."""

    def update_weights(self, meta: WeightUpdateMeta) -> concurrent.futures.Future[None]:
        """Thread-safe: schedule :meth:`aupdate_weights` on the engine's loop; wait on the future."""
        return asyncio.run_coroutine_threadsafe(self.aupdate_weights(meta), self.loop)

    # ------------------------------------------------------------------ pause / resume
    async def pause(self) -> None:
        """Stop admitting episodes and interrupt generation until :meth:`resume`."""
        if self._rollout is not None:
            self._rollout.on_pause()
        if self._resumed is not None:
            self._resumed.clear()
        await self._interrupt()

    async def resume(self) -> None:
        await self._continue()
        if self._resumed is not None:
            self._resumed.set()
        if self._rollout is not None:
            self._rollout.on_resume()

    @property
    def paused(self) -> bool:
        return self._resumed is not None and not self._resumed.is_set()

    async def wait_until_resumed(self) -> None:
        """For engine implementations: return once the engine is not paused."""
        if self._resumed is not None:
            await self._resumed.wait()

    async def _interrupt(self) -> None:
        """Hook: stop in-flight generation (e.g. SGLang ``/pause_generation``)."""

    async def _continue(self) -> None:
        """Hook: let generation continue (e.g. SGLang ``/continue_generation``)."""

    # ------------------------------------------------------------------ versions
    def get_version(self) -> int:
        return self._version

    def set_version(self, version: int) -> None:
        """Set the policy version (on the loop). Tokens generated from now on carry it."""
        self._version = version
        if self._rollout is not None:
            self._rollout.on_version(version)

    # ------------------------------------------------------------------ broadcast weight updates
    def weight_update_world_size(self) -> int:
        """World size of the ``"nccl"`` weight-update group: the trainer (rank 0) plus every rank
        of every server that receives. Only engines whose servers join such a group have one."""
        raise ConfigError(
            f"trainer.weight_update=nccl broadcasts weights to inference servers, but {type(self).__name__} has no "
            "weight-update group; use trainer.weight_update=mem (in-process engine) or disk, or a RemoteEngine"
        )

    def weight_update_backend(self) -> str | None:
        """The ``torch.distributed`` backend the receiving side of a broadcast uses (None: the
        train engine's own choice)."""
        return None

    # ------------------------------------------------------------------ workflows (forwarded to the rollout)
    def submit(self, data: Any, workflow: RolloutWorkflow) -> str:
        return self._rollout_or_default().submit(data, workflow)

    async def wait(self, count: int, timeout: float | None = None) -> list[Trajectory]:  # noqa: ASYNC109
        return await self._rollout_or_default().wait(count, timeout)

    async def rollout(self, data: Sequence[Any], workflow: RolloutWorkflow) -> list[Trajectory]:
        return await self._rollout_or_default().rollout(data, workflow)


class _RolloutHooks(Protocol):
    """What an engine needs of its rollout (:class:`agentflow.Rollout` implements it)."""

    async def start(self) -> None: ...
    async def stop(self, *exc: object) -> None: ...
    def on_pause(self) -> None: ...
    def on_resume(self) -> None: ...
    def on_version(self, version: int) -> None: ...
    def submit(self, data: Any, workflow: RolloutWorkflow) -> str: ...
    async def wait(self, count: int, timeout: float | None = None) -> list[Trajectory]: ...  # noqa: ASYNC109
    async def rollout(self, data: Sequence[Any], workflow: RolloutWorkflow) -> list[Trajectory]: ...


LossFn = Callable[..., "torch.Tensor"]


class TrainEngine(abc.ABC):
    """Trains a policy on batches of trajectories (the seed API, FSDP2 implementation in engines)."""

    @abc.abstractmethod
    def initialize(self, addr: str | None = None, ft_spec: FinetuneSpec | None = None) -> None: ...

    @abc.abstractmethod
    def destroy(self) -> None: ...

    def get_scheduling_config(self) -> Scheduling:
        return Scheduling()

    def train(self, mode: bool = True) -> TrainEngine:
        return self

    @abc.abstractmethod
    def train_batch(
        self,
        input_: Sequence[Trajectory] | Mapping[str, Any],
        mb_spec: MicroBatchSpec,
        loss_fn: LossFn,
        loss_weight_fn: Callable[[Mapping[str, Any]], float],
    ) -> dict[str, float]:
        """One optimiser step over ``input_``; the loss is a global token mean across micro-batches."""

    @abc.abstractmethod
    def eval_batch(
        self,
        input_: Sequence[Trajectory] | Mapping[str, Any],
        mb_spec: MicroBatchSpec,
        loss_fn: LossFn,
        loss_weight_fn: Callable[[Mapping[str, Any]], float],
    ) -> float: ...

    @abc.abstractmethod
    def forward(
        self,
        input_: Sequence[Trajectory] | Mapping[str, Any],
        mb_spec: MicroBatchSpec | None = None,
        output_seqlens: Sequence[int] | None = None,
        post_hook: Callable[..., Any] | None = None,
        aggregate_fn: Callable[[list[Any]], Any] | None = None,
    ) -> Any: ...

    @abc.abstractmethod
    def save(self, meta: SaveLoadMeta) -> None: ...

    @abc.abstractmethod
    def load(self, meta: SaveLoadMeta) -> None: ...

    @abc.abstractmethod
    def upload_weights(self, meta: WeightUpdateMeta) -> WeightUpdateMeta:
        """Publish the current weights as ``meta`` asks; return the meta the inference engine's
        ``update_weights`` takes (for ``"mem"``, with ``state_dict`` filled in)."""

    def snapshot_weights(self, meta: WeightUpdateMeta) -> tuple[WeightUpdateMeta, Callable[[], None]]:
        """A ``"disk"`` upload in two halves: copy the weights now (collective, like
        :meth:`upload_weights`) and return ``(meta, write)``, where ``write()`` puts the copy at
        ``meta.path`` from any thread, with no collective call, while this engine trains on. The
        trainer uses it to write a version behind the next step (``trainer.overlap_weight_load``).
        The default uploads at once and returns a ``write`` with nothing left to do."""
        done = self.upload_weights(meta)
        return done, lambda: None

    @abc.abstractmethod
    def step_lr_scheduler(self) -> None: ...

    # ------------------------------------------------------------------ versions and capabilities
    # Declared here with defaults, so a trainer calls them on any train engine. The defaults of the
    # capabilities an engine lacks raise a ConfigError that names the setting to change.
    def set_version(self, version: int) -> None:
        """Record which policy version the weights are (the trainer calls it after every step)."""
        self._policy_version = version

    def get_version(self) -> int:
        return vars(self).get("_policy_version", 0)

    def prepare(self, input_: Sequence[Trajectory] | Mapping[str, Any], mb_spec: MicroBatchSpec) -> Any:
        """``input_`` in the form ``forward`` / ``train_batch`` take fastest (e.g. packed once, reused
        by every pass of a step); the default is ``input_`` itself."""
        return input_

    def vocab_size(self) -> int | None:
        """Rows of the policy's input embedding; None when unknown (token ids are then not checked)."""
        return None

    def weight_specs(self) -> list[Any]:
        """Names, dtypes and shapes of the tensors an ``"nccl"`` upload broadcasts, in order."""
        raise ConfigError(
            f"trainer.weight_update=nccl needs a train engine that broadcasts its weights (FSDPEngine); "
            f"{type(self).__name__} does not. Use trainer.weight_update=disk or mem"
        )

    def join_weight_update_group(self, meta: WeightUpdateMeta, world_size: int, backend: str | None = None) -> None:
        """Join the ``"nccl"`` weight-update group as its rank 0 (before the first broadcast)."""
        raise ConfigError(
            f"trainer.weight_update=nccl needs a train engine that joins a weight-update group (FSDPEngine); "
            f"{type(self).__name__} does not. Use trainer.weight_update=disk or mem"
        )
