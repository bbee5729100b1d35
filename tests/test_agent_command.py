"""AgentCommandWorkflow: an agent process per episode, over a proxy session, trained token for token."""

from __future__ import annotations

import json
import os
import pathlib
import sys

import pytest

from agentflow import ModelRequest, ModelResponse, RolloutConfig, WorkflowError
from agentflow.testing import FakeEngine, byte_tokenizer
from agentflow.workflows.agent_command import AgentCommandConfig, AgentCommandWorkflow

ROOT = pathlib.Path(__file__).resolve().parents[1]
AGENT = str(ROOT / "examples" / "openai_agent.py")
TOK = byte_tokenizer()
EOS = TOK.eos_token_id
CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "12 * 34"}}\n</tool_call>'
pytestmark = pytest.mark.integration


def turn(text: str) -> list[int]:
    return [*TOK.encode(text, add_special_tokens=False), EOS]


class Recorder(FakeEngine):
    """A FakeEngine that replies from a script and keeps every response it returned."""

    def __init__(self, *outputs: list[int], **kw) -> None:
        self.outputs = list(outputs)
        super().__init__(reply=lambda req: self.outputs.pop(0) if self.outputs else turn("0"), **kw)
        self.responses: list[ModelResponse] = []

    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        resp = await super().agenerate(req)
        self.responses.append(resp)
        return resp


def exact_answer(completion: str, task) -> float:
    return float(completion == task.answer)


async def test_an_agent_process_is_trained_on_exactly_the_sampled_tokens():
    engine = Recorder(turn(CALL), turn("408"), logprob=-0.3)
    wf = AgentCommandWorkflow(TOK, exact_answer, AgentCommandConfig(command=(sys.executable, AGENT), timeout_s=60))
    async with engine, wf:
        (traj,) = await engine.rollout([{"id": "t", "prompt": "What is 12 * 34?", "answer": "408"}], wf)
    assert traj.reward == 1.0
    sampled = [t for r in engine.responses for t in r.output_tokens]
    trained = [t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if m]
    assert trained == sampled  # two model turns; the tool result between them is masked
    assert [lp for lp, m in zip(traj.logprobs, traj.loss_mask, strict=True) if m] == [-0.3] * len(sampled)
    tool_text = TOK.decode([t for t, m in zip(traj.input_ids, traj.loss_mask, strict=True) if not m])
    assert "408" in tool_text  # the calculator's result entered the context, outside the loss


async def test_the_agent_can_post_its_own_reward_and_read_the_task_from_the_environment():
    engine = Recorder(turn("7"), turn("8"))
    cfg = AgentCommandConfig(command=f"{sys.executable} {AGENT} --self-reward", data_via="env", timeout_s=60)
    wf = AgentCommandWorkflow(TOK, None, cfg)
    async with engine, wf:
        trajs = await engine.rollout([{"prompt": "3 + 4?", "answer": "7"}, {"prompt": "3 + 4?", "answer": "7"}], wf)
    assert sorted(t.reward for t in trajs) == [0.0, 1.0]


async def test_failures_are_rejections_with_reasons():
    engine = FakeEngine(rollout=RolloutConfig(max_consecutive_rejections=None))
    crash = AgentCommandWorkflow(TOK, exact_answer, command=[sys.executable, "-c", "import sys; sys.exit('boom')"])
    slow = AgentCommandWorkflow(TOK, exact_answer, command=[sys.executable, "-c", "import time; time.sleep(30)"],
                                timeout_s=0.5)
    silent = AgentCommandWorkflow(TOK, exact_answer, command=[sys.executable, "-c", "print(1)"])
    async with engine, crash, slow, silent:
        for wf, reason in ((crash, "exited with code 1; stderr ends with: 'boom"), (slow, "timeout_s=0.5"),
                           (silent, "made no chat completion")):
            with pytest.raises(WorkflowError, match=reason):
                await wf.arun_episode(engine, {"prompt": "x", "answer": "1"})


def test_bad_configs_say_what_is_expected():
    with pytest.raises(Exception, match="command must be the agent's argv"):
        AgentCommandConfig()
    with pytest.raises(Exception, match="data_via must be 'stdin' or 'env'"):
        AgentCommandConfig(command="x", data_via="file")


@pytest.mark.timeout(400)
def test_agentflow_train_runs_an_agent_command(tmp_path):
    import subprocess

    out = subprocess.run(
        [sys.executable, "-m", "agentflow", "train", str(ROOT / "examples" / "agent_command.yaml"),
         "model.path=tiny", "trainer.total_steps=2", "trainer.eval_every=0", "data.size=16",
         "rollout.consumer_batch_size=2", "rollout.episodes_per_item=2", "rollout.max_staleness=0",
         f"logging.run_dir={tmp_path / 'run'}", "logging.progress=false",
         "inference.local.max_seq_len=2048", "generation.max_new_tokens=16",
         f"workflow.options.command=[{sys.executable}, {AGENT}]"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 2 and all(r["rollout/episodes"] == 2 * 2 for r in steps)


# ------------------------------------------------------------------------------------ no process outlives its episode
def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


_FORK_HOLDING_STDOUT = """
import os, sys, time
if os.fork() == 0:          # a child that keeps stdout open, then the agent exits 0
    print(os.getpid(), file=open(sys.argv[1], "w"), flush=True)
    time.sleep(60)
    os._exit(0)
time.sleep(0.2)
"""
_DAEMON = """
import os, sys, time
if os.fork() == 0:          # double fork + setsid: a daemon, no longer in the agent's group or session
    os.setsid()
    if os.fork() == 0:
        fd = os.open(os.devnull, os.O_RDWR)
        for i in (0, 1, 2):
            os.dup2(fd, i)
        print(os.getpid(), file=open(sys.argv[1], "w"), flush=True)
        time.sleep(60)
    os._exit(0)
time.sleep(0.3)
time.sleep(float(sys.argv[2]))
"""


@pytest.mark.parametrize(("agent", "agent_sleeps", "reason"), [
    (_FORK_HOLDING_STDOUT, None, "made no chat completion"),
    (_DAEMON, 0, "made no chat completion"),
    (_DAEMON, 60, "timeout_s=1.5"),
])
async def test_every_process_an_episode_starts_ends_with_it(tmp_path, agent, agent_sleeps, reason):
    import time

    (tmp_path / "agent.py").write_text(agent)
    pid_file = tmp_path / "pid"
    argv = [sys.executable, str(tmp_path / "agent.py"), str(pid_file)]
    wf = AgentCommandWorkflow(TOK, exact_answer, command=argv + ([] if agent_sleeps is None else [str(agent_sleeps)]),
                              timeout_s=1.5 if agent_sleeps else 20)
    engine = FakeEngine()
    t0 = time.monotonic()
    async with engine, wf:
        with pytest.raises(WorkflowError, match=reason):
            await wf.arun_episode(engine, {"prompt": "x", "answer": "1"})
    took = time.monotonic() - t0
    pid = int(pid_file.read_text())
    alive = _alive(pid)
    if alive:
        os.kill(pid, 9)
    assert not alive, f"pid {pid} outlived its episode"
    assert took < 10, took  # not the 20 s deadline: the episode ended when the agent did


async def test_a_command_that_cannot_start_says_so():
    engine = FakeEngine()
    wf = AgentCommandWorkflow(TOK, exact_answer, command=["/nonexistent/agent"])
    async with engine, wf:
        with pytest.raises(WorkflowError, match=r"cannot start agent command \['/nonexistent/agent'\].*No such file"):
            await wf.arun_episode(engine, {"prompt": "x", "answer": "1"})
