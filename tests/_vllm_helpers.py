"""Where the vLLM tests find vLLM (the venv scripts/vllm_env.sh builds)."""

from __future__ import annotations

import os
from pathlib import Path

from agentflow.engines.model_loading import cache_dir

BUILD = "run scripts/vllm_env.sh (or point AGENTFLOW_VLLM_VENV at a venv with vllm 0.32.x)"


def vllm_python() -> str | None:
    """The vLLM venv's interpreter ($AGENTFLOW_VLLM_VENV, default $AGENTFLOW_CACHE/vllm-venv), if present."""
    venv = Path(os.environ.get("AGENTFLOW_VLLM_VENV") or cache_dir() / "vllm-venv").expanduser()
    python = venv / "bin" / "python"
    return str(python) if python.exists() else None

