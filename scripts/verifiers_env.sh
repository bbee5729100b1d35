#!/usr/bin/env bash
# Builds the Python environment the `verifiers` workflow runs environments in (default
# ${XDG_CACHE_HOME:-~/.cache}/agentflow/verifiers-venv, outside the checkout, where the workflow
# looks for it; another path as the first argument).
#
# verifiers 0.4 pins openai<3 while agentflow's `agents` extra needs openai>=3, so verifiers gets
# its own environment; the workflow starts its runner with this environment's python (or the one
# workflow.options.python / $AGENTFLOW_VERIFIERS_PYTHON names). uv is installed beside it because
# verifiers runs its bundled chat program (the `null` and `bash` harnesses) as a uv script; the
# first rollout of such a harness builds that script's environment once (from PyPI).
#
#   bash scripts/verifiers_env.sh                 # -> ~/.cache/agentflow/verifiers-venv/bin/python
#   bash scripts/verifiers_env.sh /opt/vf-venv    # -> /opt/vf-venv/bin/python
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-${XDG_CACHE_HOME:-$HOME/.cache}/agentflow/verifiers-venv}"
VERIFIERS_SPEC="${VERIFIERS_SPEC:-verifiers==0.4.0}"
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q "$VERIFIERS_SPEC" uv
# verifiers needs no torch; refuse a build that pulled one in (a CUDA torch is gigabytes)
if "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"; then :; else
    echo "warning: torch was installed into $VENV; verifiers does not need it" >&2
fi
"$VENV/bin/python" -c "import verifiers, verifiers.v1; print('verifiers', verifiers.__version__, 'ready in $VENV')"
