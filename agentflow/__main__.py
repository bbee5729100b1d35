"""``python -m agentflow ...`` (what ``torchrun -m agentflow train ...`` runs)."""

import sys

from agentflow.cli import main

sys.exit(main())
