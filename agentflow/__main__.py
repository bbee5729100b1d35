"""``python -m agentflow ...`` (what ``torchrun -m agentflow train ...`` runs).

Not here: argument parsing and commands (``agentflow.cli``).
"""

from agentflow.cli import run

run()
