"""agentflow.recipe: what ``agentflow train`` and ``agentflow eval`` run.

- :mod:`~agentflow.recipe.config`: :class:`TrainRecipeConfig`, every knob with its default;
- :mod:`~agentflow.recipe.build`: one config section -> one object (model, engines, task, workflow);
- :mod:`~agentflow.recipe.async_rl`: :func:`train` and :func:`evaluate_model`, top to bottom.

This package and ``agentflow/cli.py`` are the one place in ``agentflow/`` that wires the plug-in
packages (engines, workflows, envs) together. Not here: the loop (:class:`agentflow.Trainer`), the
algorithm (:mod:`agentflow.algo`). Importing it imports torch.
"""

from agentflow.recipe.async_rl import evaluate_model, train
from agentflow.recipe.config import TrainRecipeConfig, load_recipe_config

__all__ = ["TrainRecipeConfig", "evaluate_model", "load_recipe_config", "train"]
