"""``agentflow merge-lora`` refuses an OUT it would write nothing to, or would destroy, before loading anything."""

from __future__ import annotations

import json

import pytest

from agentflow import ConfigError
from agentflow.recipe.build import merge_lora


@pytest.fixture
def adapter(tmp_path):
    path = tmp_path / "adapter"
    path.mkdir()
    (path / "adapter_config.json").write_text(
        json.dumps(
            {
                "base_model_name_or_path": str(tmp_path / "no-base"),
                "peft_type": "LORA",
                "r": 2,
                "lora_alpha": 4,
                "target_modules": ["q_proj"],
            }
        )
    )
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def test_an_out_that_is_a_file_is_refused_and_left_alone(tmp_path, adapter):
    out = tmp_path / "merged"
    out.write_text("keep me")
    with pytest.raises(ConfigError, match=r"OUT=.*merged.* is an existing file; expected a directory path"):
        merge_lora(str(adapter), str(out))
    assert out.read_text() == "keep me"


def test_a_non_empty_out_directory_needs_overwrite(tmp_path, adapter):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    with pytest.raises(ConfigError, match=r"not empty; expected a new path or an empty directory. Pass --overwrite"):
        merge_lora(str(adapter), str(out))
    assert (out / "old.txt").read_text() == "keep me"


@pytest.mark.parametrize("where", ["adapter", "inside", "parent"])
def test_the_input_is_never_overwritten_even_with_overwrite(tmp_path, adapter, where):
    out = {"adapter": adapter, "inside": adapter / "merged", "parent": tmp_path}[where]
    before = sorted(p.name for p in adapter.iterdir())
    with pytest.raises(ConfigError, match=r"is the adapter .* or overlaps it"):
        merge_lora(str(adapter), str(out), overwrite=True)
    assert sorted(p.name for p in adapter.iterdir()) == before


def test_the_cli_has_an_overwrite_flag(tmp_path, adapter, capsys):
    import signal

    from agentflow.cli import main

    out = tmp_path / "merged"
    out.write_text("x")
    before = signal.getsignal(signal.SIGTERM)
    try:
        assert main(["merge-lora", str(adapter), str(out), "--overwrite"]) == 2
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert "is an existing file" in err and "Traceback" not in err
