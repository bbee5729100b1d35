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
