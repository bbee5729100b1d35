"""Shared fixtures. Tests run on CPU, offline, with tiny models built from a config."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer): a 2-layer random Llama and the byte tokenizer. Do not mutate the model."""
    import torch

    from agentflow.testing import tiny_model_and_tokenizer

    torch.set_num_threads(min(2, os.cpu_count() or 1))
    return tiny_model_and_tokenizer(seed=0)


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory):
    """One real vLLM server for the session: the tiny random Llama (byte tokenizer), fp32, LoRA
    enabled (rank <= 8, 2 adapters), 1,024-token context. Skipped when scripts/vllm_env.sh has not run.
    Yields its :class:`~agentflow.engines.launch.ServerProcess` (``command.address``); stopped at the end."""
    from _vllm_helpers import BUILD, vllm_checkpoint, vllm_python

    from agentflow.engines.launch import free_port, launched, vllm_command

    python, model = vllm_python(), vllm_checkpoint("tiny-llama")
    if python is None or model is None:
        pytest.skip(f"needs the vLLM venv and the tiny checkpoint: {BUILD}")
    cmd = vllm_command(python, str(model), port=free_port(), dtype="float32", max_model_len=1024, lora_rank=8,
                       extra=["--served-model-name", "tiny", "--max-num-seqs", "16"])
    with launched([cmd], tmp_path_factory.mktemp("vllm"), startup_timeout_s=300) as [server]:
        yield server


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs CUDA")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
