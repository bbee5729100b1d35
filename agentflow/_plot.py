"""``agentflow plot RUN_DIR``: reward, loss, staleness and throughput curves of a run, as one PNG.

Not here: writing metrics (``agentflow._metrics``), live dashboards (use TensorBoard or wandb).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

from agentflow._metrics import read_metrics
from agentflow.errors import ConfigError

__all__ = ["plot_run"]

PANELS = (
    ("reward", ("reward/mean", "eval/reward")),
    ("loss", ("train/loss", "train/pg_loss")),
    ("staleness (versions)", ("staleness/max", "staleness/mean")),
    ("throughput (tokens/s)", ("throughput/tokens_per_s",)),
)


def plot_run(run_dir: str | pathlib.Path, out: str | pathlib.Path | None = None) -> pathlib.Path:
    """Write ``out`` (default ``RUN_DIR/curves.png``) and return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ConfigError("agentflow plot needs matplotlib: pip install 'agentflow-rl[plot]'") from e
    records = read_metrics(run_dir)
    if not records:
        raise ConfigError(f"{run_dir}/metrics.jsonl has no records yet; train for at least one step first")
    out_path = pathlib.Path(out) if out else pathlib.Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    for ax, (title, keys) in zip(axes.flat, PANELS, strict=True):
        for key in keys:
            xs, ys = _series(records, key)
            if xs:
                ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=3, label=key)
        ax.set_title(title)
        ax.set_xlabel("step (policy version)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(str(pathlib.Path(run_dir).resolve().name))
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys
