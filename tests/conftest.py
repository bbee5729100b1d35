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
def vllm_tiny_dir(tmp_path_factory: pytest.TempPathFactory):
    """The tiny random Llama (byte tokenizer, head size 64 for vLLM's CPU attention) as an HF directory."""
    from agentflow.testing import tiny_model_and_tokenizer

    path = tmp_path_factory.mktemp("tiny-llama")
    model, tok = tiny_model_and_tokenizer(seed=0, hidden_size=256, num_layers=2)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory: pytest.TempPathFactory, vllm_tiny_dir):
    """One real vLLM server for the session: the tiny random Llama, fp32, LoRA enabled (rank <= 8,
    2 adapters), 1,024-token context. Skipped when there is no vLLM venv (scripts/vllm_env.sh).
    Yields its :class:`~agentflow.engines.launch.ServerProcess` (``command.address``); stopped at the end."""
    from _vllm_helpers import BUILD, vllm_python

    from agentflow.engines.launch import free_port, launched, vllm_command

    python = vllm_python()
    if python is None:
        pytest.skip(f"needs a vLLM venv: {BUILD}")
    cmd = vllm_command(python, str(vllm_tiny_dir), port=free_port(), dtype="float32", max_model_len=1024,
                       lora_rank=8, extra=["--served-model-name", "tiny", "--max-num-seqs", "16"])
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
