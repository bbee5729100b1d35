"""LoRA adapters in :class:`~agentflow.engines.local.LocalEngine`: several at once on one base model,
different adapters in one batch, swapped without reloading the base.

:class:`AdapterSet` owns the adapters of one engine's model. The first adapter wraps the model with
PEFT (``get_peft_model``: the targeted linear layers become LoRA layers, in place; the base weights
are not copied); more adapters are added beside it (``add_adapter``), and a new version of an
adapter is copied into its tensors. Every forward of the decode worker passes PEFT's
``adapter_names`` (one name per row, ``"__base__"`` for the base model), so one batch mixes
adapters: each LoRA layer runs the base matmul once and each adapter on its own rows.

Which adapter a request uses: ``ModelRequest.metadata["lora"]`` (:data:`LORA_KEY`) names a loaded
adapter, or is None for the base model; without the key the engine's default adapter is used (the
first adapter loaded, unless set otherwise), or the base model when no adapter is loaded.

Threading: :meth:`AdapterSet.check` runs on the event loop (it only reads); :meth:`AdapterSet.load`
and :meth:`AdapterSet.unload` change modules and run on the decode thread between two steps.

Not here: the decode loop (``_worker.py``), the adapter file format (``_lora.py``), DoRA,
adapters on embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from agentflow.engines._lora import LORA_KEY, check_fits, check_limits, config_rank, config_targets, from_peft_key
from agentflow.errors import EngineError

__all__ = ["BASE", "LORA_KEY", "AdapterSet", "LoraLimits"]

BASE = "__base__"  # PEFT's name for "no adapter" in a mixed batch
_UNSET = object()


@dataclass(frozen=True, slots=True)
class LoraLimits:
    """What an engine accepts: at most ``max_loras`` adapters loaded, ranks up to ``max_rank``,
    targets within ``target_modules`` (None = no limit)."""

    max_loras: int = 8
    max_rank: int | None = None
    target_modules: tuple[str, ...] | None = None


class AdapterSet:
    """The LoRA adapters of one model (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, limits: LoraLimits) -> None:
        self.base = model
        self.limits = limits
        self.peft: Any = None
        self.configs: dict[str, dict[str, Any]] = {}
        self.default: str | None = None
        self._ids: dict[str, str] = {}  # adapter name -> PEFT's name for it (any string may name an adapter)
        self._next_id = 0

    # ------------------------------------------------------------------ requests (event loop)
    def resolve(self, metadata: Mapping[str, Any]) -> str | None:
        """The adapter of a request: ``metadata["lora"]`` if present (None = base), else the default."""
        name = metadata.get(LORA_KEY, _UNSET)
        if name is _UNSET:
            return self.default
        if name is None or name == "":
            return None
        if name not in self.configs:
            raise EngineError(
                f"the request asks for LoRA adapter {name!r}, which is not loaded; loaded: {sorted(self.configs)}. "
                "Load it first (LocalEngine.load_adapter, POST /load_lora_adapter) or drop metadata['lora']"
            )
        return str(name)

    def forward_names(self, adapters: Iterable[str | None]) -> list[str] | None:
        """PEFT's ``adapter_names`` for rows using ``adapters`` (None while no adapter is loaded)."""
        if self.peft is None:
            return None
        return [self._ids[a] if a else BASE for a in adapters]

    # ------------------------------------------------------------------ loading
    def check(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """Raise :class:`EngineError` if the adapter breaks a limit or does not fit the base model."""
        if name == BASE or not name:
            raise EngineError(f"{name!r} cannot name a LoRA adapter; choose another name")
        if name not in self.configs and len(self.configs) >= self.limits.max_loras:
            raise EngineError(
                f"cannot load LoRA adapter {name!r}: {len(self.configs)} adapters are loaded ({sorted(self.configs)}), "
                f"the limit is {self.limits.max_loras}; unload one first or raise the limit (--max-loras-per-batch, "
                "LocalEngineConfig.max_loras)"
            )
        check_limits(config, name, self.limits.max_rank, self.limits.target_modules)
        check_fits(self.base, tensors, config, what=f"adapter {name!r}")
        _check_coverage(self.base, name, config, tensors)

    def load(self, name: str, config: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> None:
        """(Decode thread.) Create adapter ``name`` if new (or if its rank/targets changed), then copy
        ``tensors`` (PEFT's names) into it. The base weights are untouched."""
        with torch.inference_mode(False), torch.no_grad():
            if self.configs.get(name) is not None and _shape_of(self.configs[name]) != _shape_of(config):
                self._delete(name)
            if name not in self.configs:
                self._create(name, config)
            _copy_adapter(self.base, name, self._ids[name], tensors)
        self.configs[name] = dict(config)
        if self.default is None:
            self.default = name

    def unload(self, name: str, in_use: int) -> None:
        """(Decode thread.) Remove adapter ``name``; ``in_use`` = requests that still use it."""
        if name not in self.configs:
            raise EngineError(f"LoRA adapter {name!r} is not loaded; loaded: {sorted(self.configs)}")
        if in_use:
            raise EngineError(f"LoRA adapter {name!r} is used by {in_use} request(s) in flight; wait for them or "
                              "abort them before unloading it")
        with torch.inference_mode(False), torch.no_grad():
            self._delete(name)
        if self.default == name:
            self.default = None

    def _create(self, name: str, config: Mapping[str, Any]) -> None:
        from peft import get_peft_model

        peft_cfg = _peft_config(config)
        pid = self._ids[name] = f"adapter{self._next_id}"
        self._next_id += 1
        # PEFT initialises the new tensors randomly (overwritten by the copy that follows): keep the
        # global RNG where it was, so loading an adapter does not move the dropout masks of a train
        # engine in this process (a resumed run creates it at another point than the original one)
        device = next(self.base.parameters()).device
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            if self.peft is None:
                self.peft = get_peft_model(self.base, peft_cfg, adapter_name=pid)
            else:
                self.peft.add_adapter(pid, peft_cfg)
        self.peft.eval()  # PEFT's mixed-adapter batches need eval mode
        self.configs[name] = dict(config)

    def _delete(self, name: str) -> None:
        others = [self._ids[n] for n in self.configs if n != name]
        if others:
            self.peft.set_adapter(others[0])  # never delete the active adapter
            self.peft.delete_adapter(self._ids[name])
        else:  # the last adapter: give the plain model back
            self.peft.unload()
            self.peft = None
        del self.configs[name], self._ids[name]

    def info(self) -> dict[str, dict[str, Any]]:
        return {n: {"rank": config_rank(c), "target_modules": config_targets(c),
                    "default": n == self.default} for n, c in self.configs.items()}


def _shape_of(config: Mapping[str, Any]) -> tuple[Any, ...]:
    """What fixes an adapter's modules: a new version that differs here is created afresh."""
    return (config_rank(config), tuple(sorted(config_targets(config))), float(config.get("lora_alpha", 8)),
            bool(config.get("use_rslora", False)))


def _check_coverage(model: torch.nn.Module, name: str, config: Mapping[str, Any],
                    tensors: Mapping[str, torch.Tensor]) -> None:
    """Every targeted linear layer of ``model`` has its two tensors in ``tensors``, and no others."""
    targets = set(config_targets(config))
    modules = {n.removesuffix(".base_layer") for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.removesuffix(".base_layer").rsplit(".", 1)[-1] in targets}
    wanted = {f"base_model.model.{m}.{part}.weight" for m in modules for part in ("lora_A", "lora_B")}
    missing, unknown = sorted(wanted - set(tensors)), sorted(set(tensors) - wanted)
    if missing or unknown:
        raise EngineError(
            f"LoRA adapter {name!r} does not cover the layers its config targets ({sorted(targets)}): missing "
            f"{missing[:3]}, unexpected {unknown[:3]}; expected the tensors of an adapter_model.safetensors for "
            "this config and this base model"
        )


def _peft_config(config: Mapping[str, Any]) -> Any:
    from peft import LoraConfig

    return LoraConfig(r=config_rank(config), lora_alpha=float(config.get("lora_alpha", 8)),  # PEFT's default
                      target_modules=config_targets(config), lora_dropout=0.0, bias="none",
                      use_rslora=bool(config.get("use_rslora", False)))


def _copy_adapter(model: torch.nn.Module, name: str, pid: str, tensors: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    wanted = {n for n in params if f".lora_A.{pid}." in n or f".lora_B.{pid}." in n}
    given = {from_peft_key(k, pid): v for k, v in tensors.items()}
    missing, unknown = sorted(wanted - set(given)), sorted(set(given) - wanted)
    if missing or unknown:
        raise EngineError(
            f"LoRA adapter {name!r} does not cover the layers its config targets: missing {missing[:3]}, "
            f"unexpected {unknown[:3]}; expected the tensors of an adapter_model.safetensors for this config"
        )
    for n, t in given.items():
        params[n].copy_(t)


def adapters_in(seqs: Sequence[Any]) -> set[str]:
    return {s.adapter for s in seqs if getattr(s, "adapter", None)}
