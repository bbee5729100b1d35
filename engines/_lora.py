"""LoRA adapters on Hugging Face causal LMs, built with PEFT: configuration, checks, names and files.

- :class:`LoRAConfig`: what ``train.lora`` holds (rank, alpha, dropout, target modules, the
  adapter's name); ``None`` in the train config means full fine-tuning.
- :func:`add_lora` wraps a model with PEFT (``get_peft_model``): the base weights are frozen and
  only the adapter's ``lora_A``/``lora_B`` matrices train. The model object keeps its module tree
  (PEFT swaps the targeted ``nn.Linear`` modules for LoRA layers in place).
- Names: inside a PEFT model the adapter tensors are named ``<module>.lora_A.<adapter>.weight``;
  in PEFT's files (``adapter_model.safetensors``, what SGLang's ``/load_lora_adapter`` reads) they
  are ``base_model.model.<module>.lora_A.weight``. :func:`to_peft_key` / :func:`from_peft_key`
  convert between the two.
- Files: :func:`write_adapter` / :func:`read_adapter` write and read PEFT's format
  (``adapter_config.json`` + ``adapter_model.safetensors``).
- Checks with errors that say what was expected: target modules missing from the model
  (:func:`check_targets`), adapter tensors that do not fit the base model (:func:`check_fits`), an
  adapter above a server's rank or module limits (:func:`check_limits`).
- :func:`merge_adapter` folds an adapter into the base weights (``agentflow merge-lora``, eval).

Not here: sharding and optimisation (the FSDP engine), serving adapters (the local engine,
``agentflow serve``, the remote client), DoRA, rsLoRA, LoRA on embeddings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agentflow.errors import CheckpointError, ConfigError, EngineError

if TYPE_CHECKING:
    import torch

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DEFAULT_TARGETS", "LORA_KEY", "TRAIN_ADAPTER", "LoRAConfig",
           "adapter_config_dict", "add_lora", "check_fits", "check_limits", "check_targets", "from_peft_key",
           "is_adapter_dir", "is_lora_param", "linear_module_names", "merge_adapter", "read_adapter", "to_peft_key",
           "write_adapter"]

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TRAIN_ADAPTER = "default"  # PEFT's adapter name inside a train engine's model
LORA_KEY = "lora"  # ModelRequest.metadata key naming the adapter of a request (None = the base model)
_PEFT_PREFIX = "base_model.model."
_LORA_PARTS = ("lora_A", "lora_B")


@dataclass(frozen=True, slots=True)
class LoRAConfig:
    """A LoRA adapter to train (``train.lora``; null = full fine-tuning).

    Attributes:
        rank: rank ``r`` of each adapter (``lora_A`` is ``r x in``, ``lora_B`` is ``out x r``).
        alpha: scaling numerator: the update is ``(alpha / rank) * B @ A``.
        dropout: dropout on the adapter's input during training.
        target_modules: names of the linear layers that get an adapter (module-name suffixes,
            e.g. ``q_proj``); the model must have every one of them.
        name: the adapter's name where it is served (``lora_name`` on SGLang servers, the
            ``lora`` key of ``ModelRequest.metadata`` in the local engine).
        base_model: the base model that ``adapter_config.json`` names (what ``agentflow eval`` and
            ``agentflow merge-lora`` load under the adapter); null = the directory the model was
            loaded from (``agentflow train`` fills in ``model.path``).
    """

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    name: str = "policy"
    base_model: str | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "target_modules", tuple(self.target_modules))
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[str]:
        out = []
        if not (isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank >= 1):
            out.append(f"train.lora.rank must be an integer >= 1, got {self.rank!r}")
        if not (isinstance(self.alpha, int | float) and math.isfinite(self.alpha) and self.alpha > 0):
            out.append(f"train.lora.alpha must be a finite number > 0, got {self.alpha!r}")
        if not (isinstance(self.dropout, int | float) and 0 <= self.dropout < 1):
            out.append(f"train.lora.dropout must be in [0, 1), got {self.dropout!r}")
        if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
            out.append(f"train.lora.target_modules must be a non-empty list of module names, got "
                       f"{list(self.target_modules)!r}")
        if not (isinstance(self.name, str) and self.name and all(c.isalnum() or c in "-_." for c in self.name)):
            out.append(f"train.lora.name must be a non-empty name of letters, digits, '-', '_' or '.', "
                       f"got {self.name!r}")
        return out

    def peft(self) -> Any:
        """The equivalent ``peft.LoraConfig``."""
        from peft import LoraConfig

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          target_modules=list(self.target_modules), bias="none", task_type="CAUSAL_LM")


def _import_peft() -> None:
    try:
        import peft  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            "LoRA needs PEFT, and `import peft` failed; install it with `pip install 'agentflow-rl[lora]'` "
            "(or `pip install 'peft>=0.13'`), or set train.lora=null for full fine-tuning"
        ) from e


# ----------------------------------------------------------------------------------- building
def linear_module_names(model: torch.nn.Module) -> list[str]:
    """The distinct last name parts of the model's ``nn.Linear`` modules (what LoRA can target)."""
    import torch

    return sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_targets(model: torch.nn.Module, targets: Sequence[str], where: str = "train.lora.target_modules") -> None:
    """Raise :class:`ConfigError` if a target names no module of ``model``."""
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [t for t in targets if t not in names]
    if missing:
        raise ConfigError(
            f"LoRA target module(s) {missing} not found in {type(model).__name__}; expected names of its linear "
            f"layers, which are {linear_module_names(model)}. Set {where} to some of them"
        )


def add_lora(model: torch.nn.Module, cfg: LoRAConfig) -> Any:
    """Wrap ``model`` (in place) with a trainable LoRA adapter; return the ``PeftModel``. The base
    weights are frozen (``requires_grad=False``). Inside the model the adapter is PEFT's
    :data:`TRAIN_ADAPTER` (``cfg.name`` is where it is served; any string, unlike PEFT's names)."""
    _import_peft()
    from peft import get_peft_model

    check_targets(model, cfg.target_modules)
    return get_peft_model(model, cfg.peft(), adapter_name=TRAIN_ADAPTER)


# ----------------------------------------------------------------------------------- names
def is_lora_param(name: str) -> bool:
    return any(f".{p}." in name for p in _LORA_PARTS)


def to_peft_key(name: str, adapter: str) -> str:
    """``model.layers.0.q_proj.lora_A.<adapter>.weight`` -> ``base_model.model.model.layers.0.q_proj.lora_A.weight``."""
    for part in _LORA_PARTS:
        name = name.replace(f".{part}.{adapter}.", f".{part}.")
    return _PEFT_PREFIX + name


def from_peft_key(key: str, adapter: str) -> str:
    """The inverse of :func:`to_peft_key` (names relative to the base HF model)."""
    name = key.removeprefix(_PEFT_PREFIX)
    for part in _LORA_PARTS:
        name = name.replace(f".{part}.", f".{part}.{adapter}.")
    return name


def module_of(key: str) -> str:
    """The targeted module of a PEFT-format key: ``base_model.model.X.lora_A.weight`` -> ``X``."""
    name = key.removeprefix(_PEFT_PREFIX)
    for part in _LORA_PARTS:
        if f".{part}." in name:
            return name.split(f".{part}.")[0]
    raise EngineError(f"{key!r} is not a LoRA tensor name; expected '<module>.lora_A.weight' or '.lora_B.weight'")


# ----------------------------------------------------------------------------------- files
def adapter_config_dict(cfg: LoRAConfig, base_model: str | None) -> dict[str, Any]:
    """``adapter_config.json`` content for ``cfg`` (PEFT's own serialisation)."""
    _import_peft()
    d = cfg.peft().to_dict()
    d["base_model_name_or_path"] = base_model
    return {k: sorted(v) if isinstance(v, set) else v for k, v in d.items()}


def is_adapter_dir(path: str | os.PathLike[str]) -> bool:
    return (Path(path) / ADAPTER_CONFIG).is_file()


def write_adapter(path: str | os.PathLike[str], tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any]) -> int:
    """Write a PEFT adapter directory (keys in PEFT's format); return the bytes of the tensors."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    sd = {k: v.detach().contiguous() for k, v in tensors.items()}
    save_file(sd, os.path.join(path, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG), "w") as f:
        json.dump(dict(config), f, indent=2, default=list)
    return sum(t.numel() * t.element_size() for t in sd.values())


def read_adapter(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """(adapter_config, tensors in PEFT's key format) of a PEFT adapter directory."""
    from safetensors.torch import load_file

    p = Path(path)
    weights = p / ADAPTER_WEIGHTS
    if not (p / ADAPTER_CONFIG).is_file() or not weights.is_file():
        raise CheckpointError(
            f"{str(p)!r} is not a LoRA adapter directory: expected {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} in it "
            "(PEFT's save_pretrained format, as FSDPEngine.save writes with train.lora set)"
        )
    config = json.loads((p / ADAPTER_CONFIG).read_text())
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise CheckpointError(f"{str(p)!r} holds a {config.get('peft_type')} adapter; expected a LoRA adapter")
    return config, load_file(str(weights))


def config_rank(config: Mapping[str, Any]) -> int:
    return int(config.get("r", 8))


def config_targets(config: Mapping[str, Any]) -> list[str]:
    t = config.get("target_modules") or []
    return [t] if isinstance(t, str) else list(t)


# ----------------------------------------------------------------------------------- checks
def check_fits(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor], config: Mapping[str, Any],
               what: str = "adapter") -> None:
    """Raise :class:`EngineError` unless every tensor of the adapter (PEFT-format keys) targets a
    linear layer of ``model`` with matching shapes (``lora_A``: ``r x in``; ``lora_B``: ``out x r``)."""
    import torch

    modules = dict(model.named_modules())
    rank = config_rank(config)
    problems = []
    for key, t in tensors.items():
        name = module_of(key).removesuffix(".base_layer")
        m = modules.get(name)
        base = getattr(m, "base_layer", m)
        if not isinstance(base, torch.nn.Linear):
            problems.append(f"{key}: the base model has no linear layer {name!r}")
            continue
        expected = (rank, base.in_features) if ".lora_A." in key else (base.out_features, rank)
        if tuple(t.shape) != expected:
            problems.append(f"{key}: shape {tuple(t.shape)}, expected {expected}")
    if problems:
        raise EngineError(
            f"the LoRA {what} does not match the base model {type(model).__name__} "
            f"({len(problems)} problem(s), first: {problems[:3]}); expected an adapter trained on this base "
            "model with the rank in its adapter_config.json"
        )


def check_limits(config: Mapping[str, Any], name: str, max_rank: int | None,
                 allowed_targets: Sequence[str] | None) -> None:
    """Raise :class:`EngineError` if the adapter's rank or target modules exceed a server's limits
    (``--max-lora-rank``, ``--lora-target-modules``; None = no limit)."""
    rank, targets = config_rank(config), config_targets(config)
    if max_rank is not None and rank > max_rank:
        raise EngineError(
            f"LoRA adapter {name!r} has rank {rank}, above this engine's max LoRA rank {max_rank}; restart the "
            f"server with --max-lora-rank {rank} (or LocalEngineConfig.max_lora_rank) or train with a lower "
            "train.lora.rank"
        )
    if allowed_targets is not None:
        extra = sorted(set(targets) - set(allowed_targets))
        if extra:
            raise EngineError(
                f"LoRA adapter {name!r} targets {extra}, which are not in this engine's LoRA target modules "
                f"{sorted(allowed_targets)}; restart the server with --lora-target-modules covering them"
            )


# ----------------------------------------------------------------------------------- merging
def merge_adapter(model: torch.nn.Module, path: str | os.PathLike[str]) -> torch.nn.Module:
    """``model`` (a plain HF causal LM) with the adapter at ``path`` folded into its weights."""
    _import_peft()
    from peft import PeftModel

    config, tensors = read_adapter(path)
    check_fits(model, tensors, config)
    return PeftModel.from_pretrained(model, str(path)).merge_and_unload()
