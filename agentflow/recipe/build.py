"""Build what ``agentflow train`` runs from its config: the model, the engines, the task, the workflow.

Each function turns one config section into one object. This package (with ``agentflow/cli.py``)
is the one place in ``agentflow/`` that imports the plug-in packages (engines, workflows, envs);
everything else in ``agentflow/`` knows them by contract only.

Not here: the training loop (:mod:`agentflow.recipe.async_rl`), the config's fields
(:mod:`agentflow.recipe.config`).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib
import importlib.util
import inspect
import logging
import pathlib
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import Any

from agentflow._engine_api import FinetuneSpec, InferenceEngine
from agentflow._types import GenerationConfig
from agentflow.engines.fsdp import FSDPEngine
from agentflow.envs.tasks import TASKS, TaskData, build_task, register_task
from agentflow.errors import ConfigError
from agentflow.recipe.config import DataSpec, InferenceSpec, ModelSpec, TrainRecipeConfig, WorkflowSpec
from agentflow.workflows.verifiers import verifiers_rows

if "verifiers" not in TASKS:  # ``data.task=verifiers``: the rows of ``workflow.name=verifiers`` (task indices)
    register_task("verifiers")(verifiers_rows)

__all__ = [
    "WORKFLOWS", "import_object", "inference_engine", "launched_servers", "merge_lora", "model_and_tokenizer",
    "policy_for_eval", "reference_engine", "server_addresses", "share_lora_base", "task_data", "train_engine",
    "workflow",
]

log = logging.getLogger("agentflow.recipe")


def model_and_tokenizer(path: str, spec: ModelSpec | None = None) -> tuple[Any, Any]:
    """``tiny`` (a random Llama with a byte tokenizer), ``smollm2-135m`` or an HF model directory."""
    if path == "tiny":
        from agentflow.testing import tiny_model_and_tokenizer

        spec = spec or ModelSpec()
        return tiny_model_and_tokenizer(seed=0, hidden_size=spec.tiny_hidden_size, num_layers=spec.tiny_layers)
    from agentflow.engines.model_loading import load_model, resolve_model_dir

    return load_model(resolve_model_dir(path))


def policy_for_eval(path: str, spec: ModelSpec | None = None, base: str | None = None) -> tuple[Any, Any]:
    """The model to evaluate: :func:`model_and_tokenizer`, or for a LoRA adapter directory (a LoRA
    checkpoint's ``model/``) its base model (``base``, else the adapter's ``base_model_name_or_path``,
    else ``model.path``) with the adapter merged in."""
    from agentflow.engines._lora import is_adapter_dir, merge_adapter, read_adapter

    if not is_adapter_dir(path):
        return model_and_tokenizer(path, spec)
    base = base or read_adapter(path)[0].get("base_model_name_or_path") or (spec or ModelSpec()).path
    model, tokenizer = model_and_tokenizer(base, spec)
    return merge_adapter(model, path), tokenizer


def merge_lora(adapter: str, out: str, base: str | None = None, *, overwrite: bool = False) -> str:
    """``agentflow merge-lora``: write the base model with the adapter folded in as an HF checkpoint
    (weights, config, tokenizer) at ``out``; ``adapter`` is an adapter directory or a LoRA run
    checkpoint (its ``model/``). ``out`` must be a new path or an empty directory; ``overwrite``
    replaces an existing directory (never the adapter's own). The checkpoint is written beside
    ``out`` and renamed into place. Returns a one-line summary."""
    from agentflow.engines._lora import is_adapter_dir, read_adapter

    path = pathlib.Path(adapter)
    if (path / "model").is_dir():
        path = path / "model"
    if not is_adapter_dir(path):
        raise ConfigError(f"{adapter!r} is not a LoRA adapter directory or LoRA checkpoint; expected "
                          "adapter_config.json in it (or in its model/)")
    target = pathlib.Path(out)
    check_merge_target(pathlib.Path(adapter), target, overwrite)
    if base is None and not read_adapter(path)[0].get("base_model_name_or_path"):
        raise ConfigError(f"the adapter at {str(path)!r} names no base model (base_model_name_or_path); pass --base")
    model, tokenizer = policy_for_eval(str(path), base=base)
    tmp = target.with_name(f".{target.name}.merging")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    if not any(tmp.glob("*.safetensors")):
        raise ConfigError(f"merge-lora wrote no weights to {tmp}; expected *.safetensors there")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return f"merged {path} into its base model; HF checkpoint written to {out}"


def check_merge_target(adapter: pathlib.Path, out: pathlib.Path, overwrite: bool) -> None:
    """Refuse an ``out`` that is a file, the adapter (or holds or is inside it), or a non-empty
    directory without ``overwrite``; each message says what was expected and how to fix it."""
    src, dst = adapter.resolve(), out.resolve()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"merge-lora OUT={str(out)!r} is an existing file; expected a directory path for the "
                          "merged HF checkpoint (a new path, or an existing directory with --overwrite). Pick "
                          "another OUT or remove the file.")
    if dst == src or dst in src.parents or src in dst.parents:
        raise ConfigError(f"merge-lora OUT={str(out)!r} is the adapter {str(adapter)!r} or overlaps it; expected "
                          "a directory outside the adapter (writing there would destroy the input). Pick another "
                          "OUT.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"merge-lora OUT={str(out)!r} is a directory that is not empty; expected a new path or "
                          "an empty directory. Pass --overwrite to replace its contents, or pick another OUT.")


def reference_engine(cfg: TrainRecipeConfig, policy: FSDPEngine, model: Any, tokenizer: Any) -> Any:
    """The KL reference: with LoRA the policy engine's base weights (adapter off, no copy), else a
    second engine holding the starting weights ``model``."""
    if cfg.train.lora is not None:
        return policy.reference()
    return train_engine(cfg, copy.deepcopy(model), tokenizer)


def share_lora_base(cfg: TrainRecipeConfig, policy: FSDPEngine, model: Any) -> int:
    """With LoRA and the in-process inference engine, let the inference model use the train
    engine's frozen base weights (held once; only the adapter changes). Returns the bytes freed."""
    if cfg.train.lora is None or cfg.inference.backend != "local":
        return 0
    return policy.share_base_with(model)


def server_addresses(cfg: TrainRecipeConfig) -> list[str]:
    """``inference.addresses``; when agentflow launches the servers and none are given, one free loopback port."""
    if cfg.inference.launch is None or cfg.inference.addresses:
        return list(cfg.inference.addresses)
    from agentflow.engines.launch import free_port

    return [f"127.0.0.1:{free_port()}"]


@contextlib.contextmanager
def launched_servers(cfg: TrainRecipeConfig, path: str, model: Any, tokenizer: Any, run_dir: pathlib.Path,
                     addresses: list[str]) -> Iterator[None]:
    """With ``inference.launch``: start one server per address serving ``model`` (loaded from
    ``path``), wait until all are healthy, and stop them on the way out. Without it: nothing."""
    spec = cfg.inference
    if spec.launch is None:
        yield
        return
    from agentflow.engines.launch import describe, launched, serve_command, split_launch, vllm_command

    python, extra = split_launch(spec.launch)
    model_dir = _served_model_dir(path, model, tokenizer, run_dir / "servers" / "model")
    rank = None if cfg.train.lora is None else cfg.train.lora.rank
    weights_dir = cfg.trainer.weights_path(run_dir)  # adapters are published here
    key = [] if spec.api_key is None else ["--api-key", spec.api_key]
    commands = []
    for i, address in enumerate(addresses):
        host, _, port = address.rpartition(":")
        seed = spec.local.seed + i  # servers sharing a group must not draw alike; flags in `launch` win
        if spec.protocol == "vllm":
            commands.append(vllm_command(python, model_dir, host=host, port=int(port), dtype="float32",
                                         lora_rank=rank, seed=seed, extra=[*key, *extra]))
        else:
            commands.append(serve_command(python, model_dir, host=host, port=int(port), lora_rank=rank,
                                          lora_dir=str(weights_dir), seed=seed, extra=[*key, *extra]))
    with launched(commands, run_dir / "servers") as servers:
        log.info("started %s", describe(servers))
        yield


def _served_model_dir(path: str, model: Any, tokenizer: Any, out: pathlib.Path) -> str:
    """An HF directory of ``model``: its own (``path``), or (a model built in process) saved to ``out``."""
    if path != "tiny":
        from agentflow.engines.model_loading import resolve_model_dir

        return str(resolve_model_dir(path))
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def _protocol(spec: InferenceSpec) -> Any:
    """``inference.protocol`` by name, or its adapter set to ``inference.pause_mode`` (the config
    loader has checked the mode against its ``Literal``)."""
    if spec.pause_mode == "abort":
        return spec.protocol
    if spec.protocol == "sglang":
        from agentflow.engines.remote.sglang import SGLangProtocol

        return SGLangProtocol(pause_mode="in_place")
    if spec.protocol == "vllm":
        from agentflow.engines.remote.vllm import VLLMProtocol

        return VLLMProtocol(pause_mode="keep")
    raise ConfigError(f"inference.pause_mode={spec.pause_mode} is known for inference.protocol sglang and vllm, "
                      f"not {spec.protocol!r}; set inference.pause_mode=abort")


def inference_engine(cfg: TrainRecipeConfig, model: Any, tokenizer: Any,
                     addresses: list[str] | None = None) -> InferenceEngine:
    """The in-process :class:`LocalEngine`, or a client of the servers at ``addresses`` (default
    ``inference.addresses``)."""
    spec = cfg.inference
    if spec.backend == "remote":
        import torch

        from agentflow.engines.remote import RemoteEngine, RemoteEngineConfig

        backend = spec.dist_backend or ("nccl" if torch.cuda.is_available() else "gloo")
        remote = RemoteEngineConfig(server_wait_timeout_s=spec.server_wait_timeout_s, api_key=spec.api_key,
                                    dist_backend=backend)
        return RemoteEngine(addresses or list(spec.addresses), tokenizer, protocol=_protocol(spec), rollout=cfg.rollout,
                            config=remote)
    from agentflow.engines.local import LocalEngine

    return LocalEngine(model, tokenizer, rollout=cfg.rollout, config=spec.local)


def train_engine(cfg: TrainRecipeConfig, model: Any, tokenizer: Any) -> FSDPEngine:
    """An initialised :class:`FSDPEngine` whose log-probs use the sampling temperature."""
    tcfg = dataclasses.replace(cfg.train, temperature=cfg.generation.temperature or 1.0)
    if tcfg.lora is not None and tcfg.lora.base_model is None:  # what eval and merge-lora load under the adapter
        tcfg = dataclasses.replace(tcfg, lora=dataclasses.replace(tcfg.lora, base_model=cfg.model.path))
    engine = FSDPEngine(tcfg, model=model, tokenizer=tokenizer)
    steps = cfg.trainer.total_steps
    engine.initialize(ft_spec=FinetuneSpec(total_train_epochs=1, dataset_size=steps, train_batch_size=1))
    return engine


def task_data(spec: DataSpec) -> TaskData:
    """Training and held-out rows with their rewards (``data.task`` names an entry of the task registry)."""
    return build_task(spec)


def _config_fields(cls: Any) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.name != "gconfig"]


def _rlvr(spec: WorkflowSpec, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig) -> Any:
    from agentflow.workflows.rlvr import RLVRConfig, RLVRWorkflow

    _check_options(spec, _config_fields(RLVRConfig), has_kwargs=False)
    options = {"truncated_reward": 0.0, **spec.options}  # an unfinished answer earns nothing
    return RLVRWorkflow(tokenizer, reward_fn, RLVRConfig(gconfig=gconfig, **options))


def _agent_command(spec: WorkflowSpec, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig) -> Any:
    from agentflow.workflows.agent_command import AgentCommandConfig, AgentCommandWorkflow

    _check_options(spec, _config_fields(AgentCommandConfig), has_kwargs=False)
    config = AgentCommandConfig(**{"gconfig": gconfig.new(n_samples=1), **spec.options})
    return AgentCommandWorkflow(tokenizer, reward_fn, config)


def _calculator_agent(spec: WorkflowSpec, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig) -> Any:
    from agentflow.workflows.calculator_agent import CalculatorAgentConfig, CalculatorAgentWorkflow

    _check_options(spec, [f.name for f in dataclasses.fields(CalculatorAgentConfig)], has_kwargs=False)
    # One call, then the answer. Here rather than in the default ``workflow.options``: those would be
    # merged into the options of any other workflow a config names.
    options = {"max_turns": 2, **spec.options}
    return CalculatorAgentWorkflow(tokenizer, gconfig, reward_fn, CalculatorAgentConfig(**options))


def _verifiers(spec: WorkflowSpec, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig) -> Any:
    from agentflow.workflows.verifiers import VerifiersConfig, VerifiersWorkflow

    _check_options(spec, _config_fields(VerifiersConfig), has_kwargs=False)
    # the environment's rubric gives the reward: ``reward_fn`` (the data task's) is not used
    return VerifiersWorkflow(tokenizer, gconfig, **spec.options)


# built-in workflow names for ``workflow.name``; anything else is ``module:Class`` or ``file.py:Class``
WORKFLOWS: dict[str, Callable[[WorkflowSpec, Any, Any, GenerationConfig], Any]] = {
    "rlvr": _rlvr,
    "agent_command": _agent_command,
    "calculator_agent": _calculator_agent,
    "verifiers": _verifiers,
}


def workflow(spec: WorkflowSpec, tokenizer: Any, reward_fn: Any, gconfig: GenerationConfig) -> Any:
    """A built-in name (:data:`WORKFLOWS`), or a class named ``module:Class`` / ``file.py:Class``
    built with ``options`` and whichever of ``tokenizer``, ``reward_fn`` and ``gconfig`` its
    constructor accepts."""
    if spec.name in WORKFLOWS:
        return WORKFLOWS[spec.name](spec, tokenizer, reward_fn, gconfig)
    cls = import_object(spec.name)
    offered = {"tokenizer": tokenizer, "reward_fn": reward_fn, "gconfig": gconfig}
    params = inspect.signature(cls).parameters
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    _check_options(spec, [p for p in params if p not in offered], has_kwargs=has_kwargs)
    kwargs = {k: v for k, v in offered.items() if k in params and k not in spec.options}
    return cls(**kwargs, **spec.options)


def _check_options(spec: WorkflowSpec, accepted: list[str], *, has_kwargs: bool) -> None:
    unknown = [k for k in spec.options if k not in accepted and k not in ("tokenizer", "reward_fn", "gconfig")]
    if unknown and not has_kwargs:
        raise ConfigError([f"workflow.options.{k}: unknown option of workflow {spec.name!r}; accepted: "
                           f"{', '.join(accepted) or 'none'}" for k in unknown])


def import_object(ref: str) -> Any:
    """``module:Name`` or ``path/to/file.py:Name``."""
    if ":" not in ref:
        raise ConfigError(f"workflow.name must be one of {sorted(WORKFLOWS)}, 'module:Class' or 'file.py:Class'; "
                          f"got {ref!r}")
    where, _, name = ref.rpartition(":")
    module = _import_file(where) if where.endswith(".py") else _import_module(where)
    if not hasattr(module, name):
        raise ConfigError(f"{where!r} has no attribute {name!r}")
    return getattr(module, name)


def _import_file(where: str) -> Any:
    path = pathlib.Path(where)
    if not path.is_file():
        raise ConfigError(f"workflow file {where!r} does not exist")
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"cannot import {where!r} as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    try:
        spec.loader.exec_module(module)
    except SyntaxError as e:
        raise ConfigError(f"workflow file {where!r} has a syntax error at line {e.lineno}: {e.msg}; "
                          f"{(e.text or '').strip()!r}") from e
    except Exception as e:  # the file's own top-level code failed
        raise ConfigError(f"importing workflow file {where!r} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ImportError as e:
        raise ConfigError(f"cannot import workflow module {where!r}: {e}") from e
