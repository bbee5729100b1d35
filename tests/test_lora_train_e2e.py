"""``agentflow train train.lora.rank=...`` end to end on the tiny model: adapter-only updates and
checkpoints, the KL reference without a second model, resume, ``agentflow eval`` on a LoRA
checkpoint and ``agentflow merge-lora``."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

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
