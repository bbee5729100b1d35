"""Run metrics: one JSON line per step (always), TensorBoard and wandb (offline) when enabled.

Each record is a flat ``{name: number}`` dict plus ``step`` and ``time`` (seconds since the run
started). Non-numeric values go to the JSONL file only. Optional backends are imported only when
enabled, and a missing package is a :class:`ConfigError` with the install command.

Not here: computing the metrics (the trainer does), plotting (``agentflow._plot``).
"""

from __future__ import annotations

import json
import math
import os
import pathlib
import time
from collections.abc import Mapping
from typing import Any

from agentflow.errors import ConfigError

__all__ = ["MetricsLogger", "read_metrics"]


class MetricsLogger:
    """Append-only metrics sink for one run directory (``metrics.jsonl``)."""

    def __init__(
        self,
        run_dir: str | pathlib.Path,
        *,
        tensorboard: bool = False,
        wandb: bool = False,
        wandb_project: str = "agentflow",
        config: Mapping[str, Any] | None = None,
        enabled: bool = True,
    ) -> None:
        self.run_dir = pathlib.Path(run_dir)
        self.enabled = enabled
        self._t0 = time.time()
        self._tb: Any = None
        self._wandb: Any = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._file = (self.run_dir / "metrics.jsonl").open("a", encoding="utf-8")
        if tensorboard:
            self._tb = _tensorboard_writer(self.run_dir / "tensorboard")
        if wandb:
            self._wandb = _wandb_run(self.run_dir, wandb_project, config)

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time() - self._t0, 3), **metrics}
        self._file.write(json.dumps(record, default=_jsonable) + "\n")
        self._file.flush()
        scalars = {k: float(v) for k, v in metrics.items() if _is_number(v)}
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()


def read_metrics(run_dir: str | pathlib.Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` (a torn last line from a crash is skipped)."""
    path = pathlib.Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"no metrics at {str(path)!r}; expected a run directory written by `agentflow train`")
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item"):
        return v.item()
    return str(v)


def _tensorboard_writer(path: pathlib.Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ConfigError(
            "logging.tensorboard=true needs the tensorboard package: pip install 'agentflow-rl[tensorboard]'"
        ) from e
    return SummaryWriter(str(path))


def _wandb_run(run_dir: pathlib.Path, project: str, config: Mapping[str, Any] | None) -> Any:
    try:
        import wandb
    except ImportError as e:
        raise ConfigError("logging.wandb=true needs wandb: pip install 'agentflow-rl[wandb]'") from e
    os.environ.setdefault("WANDB_MODE", "offline")
    return wandb.init(project=project, dir=str(run_dir), config=dict(config or {}))
