"""FSDPEngine with a LoRA adapter at world size 2: ``torchrun --nproc_per_node 2 tests/_lora_worker.py``
(gloo, CPU). One subprocess runs every check; the tests read its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentflow.engines.fsdp._dist import free_port

pytest.importorskip("peft")
pytestmark = pytest.mark.integration

WORKER = Path(__file__).with_name("_lora_worker.py")


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("lora2") / "results.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(WORKER), str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return json.loads(out.read_text())


def test_world_size_is_two(results):
    assert results["world_size"] == 2


def test_lora_step_equals_plain_peft_step_over_both_ranks(results):
    assert results["step_losses"] == pytest.approx(results["ref_losses"], abs=1e-6)
    assert results["step_max_adapter_diff"] < 5e-5  # 5% of lr, as for full fine-tuning


def test_lora_forward_equals_merged_weights_on_each_rank(results):
    assert results["merged_forward_max_diff_rank0"] < 5e-6
    assert results["merged_forward_max_diff_rank1"] < 5e-6


def test_reference_is_the_base_model_on_each_rank(results):
    assert results["reference_max_diff_rank0"] < 2e-6
    assert results["reference_max_diff_rank1"] < 2e-6


def test_save_load_resumes_the_next_step_exactly(results):
    assert results["resume_max_adapter_diff"] == 0.0
