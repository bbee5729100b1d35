"""``agentflow train train.lora.rank=...`` end to end on the tiny model: adapter-only updates and
checkpoints, the KL reference without a second model, resume (after ``kill -9``, bit-identical),
``agentflow eval`` on a LoRA checkpoint and ``agentflow merge-lora``."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import pytest

from agentflow._metrics import read_metrics

pytest.importorskip("peft")
pytestmark = pytest.mark.integration

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = str(ROOT / "examples" / "tiny.yaml")
LORA = ["train.lora.rank=4", "train.lr=1.0e-3", "algo.ppo.kl_coef=0.05", "trainer.eval_every=0"]


def _agentflow(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "agentflow", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, **kw)


def _steps(run_dir: pathlib.Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_metrics(run_dir) if "reward/mean" in r}


@pytest.mark.slow  # the default run stays under 10 minutes; CI runs -m slow after it
def test_lora_train_resume_eval_and_merge(tmp_path):
    run = tmp_path / "run"
    out = _agentflow("train", TINY, f"logging.run_dir={run}", "trainer.total_steps=2", *LORA, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    ckpt = run / "checkpoints" / "step-000002"
    model_dir = ckpt / "model"
    config = json.loads((model_dir / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["base_model_name_or_path"] == "tiny"
    assert (model_dir / "adapter_model.safetensors").exists() and not (model_dir / "model.safetensors").exists()
    steps = _steps(run)
    assert sorted(steps) == [1, 2]
    assert all(0 < r["weights/update_mib"] < 0.1 for r in steps.values())  # the adapter only
    # the KL term ran against the reference (the base model with the adapter off: test_lora_fsdp.py)
    assert all(r["train/kl_ref"] >= 0 for r in steps.values())

    out = _agentflow("train", TINY, f"logging.run_dir={run}", "trainer.total_steps=3", *LORA, "--resume",
                     timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(_steps(run)) == [1, 2, 3]

    out = _agentflow("eval", TINY, "--model", str(ckpt), "--n", "4", timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["n"] == 4

    merged = tmp_path / "merged"
    out = _agentflow("merge-lora", str(ckpt), str(merged), timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(merged)
    assert not any("lora" in n for n, _ in model.named_parameters())


def test_lora_sigkill_then_resume_repeats_the_next_step_bit_for_bit(tmp_path):
    """``kill -9`` a LoRA run, resume it from a checkpoint, and the step after that checkpoint is
    the uninterrupted run's to the bit: same batch, same loss, same adapter and AdamW moments.

    The run checkpoints every step and is killed once step 5's checkpoint is complete. Step 5's
    checkpoint is then moved aside, so ``--resume`` starts from step 4's (as after a kill during
    step 5) and computes step 5 again; the moved-aside checkpoint and the metrics line of the first
    step 5 are the uninterrupted run's. Rollouts of the tiny model finish long before a train step,
    so step 5's batch is in step 4's checkpointed buffer (asserted: the same prompts). LoRA dropout
    is on, so the restored RNG matters too."""
    from safetensors.torch import load_file

    from agentflow.engines.fsdp.engine import _load_plain

    run = tmp_path / "run"
    args = ["train", TINY, f"logging.run_dir={run}", "trainer.checkpoint_every=1", "trainer.keep_checkpoints=10",
            "train.lora.rank=4", "train.lora.dropout=0.1", "train.lr=1.0e-3", "trainer.eval_every=0",
            "algo.ppo.entropy_coef=0.05"]  # the random model earns no reward: the entropy bonus moves the adapter
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "agentflow", *args, "trainer.total_steps=8"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 240
    try:
        while not (ckpts / "step-000005" / "COMPLETE").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint at step 5 within 240 s"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    first = {r["step"]: r for r in read_metrics(run) if "reward/mean" in r}  # before the resume
    uninterrupted = tmp_path / "uninterrupted-step-5"
    shutil.move(ckpts / "step-000005", uninterrupted)
    for later in ckpts.glob("step-*"):
        if later.name > "step-000005":
            shutil.rmtree(later)
    (ckpts / "latest").write_text("step-000004")

    out = _agentflow(*args, "trainer.total_steps=5", "--resume", timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    resumed = [r for r in read_metrics(run) if "reward/mean" in r and r["step"] == 5][-1]
    assert resumed["prompts"] == first[5]["prompts"], "step 5 trained on another batch after the resume"
    assert first[5]["train/grad_norm"] > 0  # the step changed the adapter
    for key in ("train/loss", "train/grad_norm", "reward/mean"):
        assert resumed[key] == first[5][key], key
    again = ckpts / "step-000005" / "model"
    a = load_file(uninterrupted / "model" / "adapter_model.safetensors")
    b = load_file(again / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch_equal(a[k], b[k]) for k in a)
    opt_a = _load_plain(str(uninterrupted / "model" / "agentflow_train_state.pt"))["optimizer"]["state"]
    opt_b = _load_plain(str(again / "agentflow_train_state.pt"))["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    assert all(torch_equal(opt_a[k][m], opt_b[k][m]) for k in opt_a for m in ("exp_avg", "exp_avg_sq"))


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))
