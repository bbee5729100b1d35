"""``python -m agentflow ...`` (what ``torchrun -m agentflow train ...`` runs).

Not here: argument parsing and commands (``agentflow.cli``).
"""

import sys

from agentflow.cli import main

sys.exit(main())
