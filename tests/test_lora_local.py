"""LoRA adapters in LocalEngine: adapter-only updates without reloading the base, several adapters in
one batch, interrupted updates with versions on every token, and clear errors."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest
import torch

from agentflow import EngineError, GenerationConfig, ModelRequest, WeightUpdateMeta
from agentflow.engines._lora import write_adapter
from agentflow.engines.local import LocalEngine, LocalEngineConfig

pytest.importorskip("peft")

GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)
PROMPT = list(b"The quick brown fox")


def random_adapter(base: torch.nn.Module, seed: int, rank: int = 4,
                   targets: tuple[str, ...] = ("q_proj", "v_proj", "down_proj")) -> tuple[dict, dict]:
    """(adapter_config, tensors under PEFT's names) of a random adapter that changes the outputs."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=2.0 * rank, target_modules=list(targets), init_lora_weights=False)
    model = get_peft_model(copy.deepcopy(base), cfg)
    sd = get_peft_model_state_dict(model)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in cfg.to_dict().items()}
    return config, {k: v * 4 for k, v in sd.items()}


def merged(base: torch.nn.Module, adapter: tuple[dict, dict], tmp_path) -> torch.nn.Module:
    from agentflow.engines._lora import merge_adapter

    write_adapter(tmp_path, adapter[1], adapter[0])
    return merge_adapter(copy.deepcopy(base), tmp_path)


def mem_meta(name: str, adapter: tuple[dict, dict], version: int | None = None) -> WeightUpdateMeta:
    return WeightUpdateMeta(type="mem", state_dict=adapter[1], lora_config=adapter[0], adapter=name, version=version)


def engine(model: torch.nn.Module, tok: Any, **cfg: Any) -> LocalEngine:
    return LocalEngine(copy.deepcopy(model), tok, config=LocalEngineConfig(max_batch_size=8, max_seq_len=512, **cfg))


async def gen(eng: LocalEngine, lora: Any = ..., prompt: list[int] = PROMPT, g: GenerationConfig = GREEDY):
    meta = {} if lora is ... else {"lora": lora}
    return await eng.agenerate(ModelRequest(list(prompt), g, metadata=meta))


async def test_adapter_update_equals_the_merged_model_and_keeps_the_base(tiny, tmp_path):
    model, tok = tiny
    a = random_adapter(model, seed=1)
    async with engine(merged(model, a, tmp_path / "a"), tok) as ref:
        want = await gen(ref)
    async with engine(model, tok) as eng:
        base = await gen(eng)
        base_weight = eng.model.model.embed_tokens.weight.data_ptr()
        await eng.aupdate_weights(mem_meta("policy", a, version=1))
        assert eng.default_adapter == "policy" and eng.get_version() == 1
        got = await gen(eng)
        assert got.output_tokens == want.output_tokens
        assert got.output_logprobs == pytest.approx(want.output_logprobs, abs=1e-4)
        assert (await gen(eng, lora=None)).output_tokens == base.output_tokens  # the base is still there
        assert eng.model.model.embed_tokens.weight.data_ptr() == base_weight  # not reloaded


async def test_loading_adapters_leaves_the_global_rng_alone(tiny):
    """PEFT draws random initial values for a new adapter (then overwritten): the engine keeps the
    global RNG where it was, so a train engine's dropout masks in the same process do not depend
    on when an adapter was first loaded (an exact resume needs that)."""
    model, tok = tiny
    a, b = random_adapter(model, seed=1), random_adapter(model, seed=2, rank=8)
    async with engine(model, tok) as eng:
        before = torch.get_rng_state()
        await eng.aupdate_weights(mem_meta("a", a, version=1))
        await eng.aupdate_weights(mem_meta("b", b, version=2))
        assert torch.equal(torch.get_rng_state(), before)


async def test_one_batch_mixes_adapters_and_the_base(tiny, tmp_path):
    model, tok = tiny
    a, b = random_adapter(model, seed=1), random_adapter(model, seed=2, rank=8, targets=("k_proj", "up_proj"))
    async with engine(model, tok) as eng:
        await eng.load_adapter("a", _saved(tmp_path / "a", a))
        await eng.aupdate_weights(mem_meta("b", b))
        alone = {name: (await gen(eng, lora=name)).output_tokens for name in ("a", "b", None)}
        assert len({tuple(v) for v in alone.values()}) == 3  # each adapter changes the output
        steps_before = eng.stats()["batch_sizes"].get(3, 0)
        together = await asyncio.gather(*(gen(eng, lora=name) for name in ("a", "b", None)))
        assert [r.output_tokens for r in together] == [alone["a"], alone["b"], alone[None]]
        assert eng.stats()["batch_sizes"].get(3, 0) > steps_before  # decoded as one batch of 3
        assert eng.adapters["b"] == {"rank": 8, "target_modules": ["k_proj", "up_proj"], "default": False}


def _saved(path, adapter: tuple[dict, dict]) -> str:
    write_adapter(path, adapter[1], adapter[0])
    return str(path)


async def test_interrupted_request_switches_adapter_version_mid_generation(tiny):
    model, tok = tiny
    v0, v1 = random_adapter(model, seed=3), random_adapter(model, seed=4)
    long = GenerationConfig(max_new_tokens=100, temperature=0.0)
    async with engine(model, tok, ignore_eos=True) as eng:
        await eng.aupdate_weights(mem_meta("policy", v0, version=0))
        other = asyncio.create_task(gen(eng, lora=None, g=long))  # a base-model request beside it
        task = asyncio.create_task(gen(eng, g=long))
        await asyncio.sleep(0)  # let both submit first (FIFO)
        await gen(eng, lora=None, g=GenerationConfig(max_new_tokens=10, temperature=0.0))  # both are decoding now
        await eng.pause()
        await eng.aupdate_weights(mem_meta("policy", v1, version=1))
        await eng.resume()
        out, base_out = await task, await other
        k = out.output_versions.index(1)
        assert 0 < k < len(out.output_tokens) and set(out.output_versions[:k]) == {0}
        assert set(out.output_versions[k:]) == {1}
        # the tokens after the update are the new adapter's greedy continuation of prompt + prefix
        cont = await gen(eng, prompt=PROMPT + out.output_tokens[:k], g=GenerationConfig(max_new_tokens=8,
                                                                                        temperature=0.0))
        assert out.output_tokens[k : k + 8] == cont.output_tokens
        alone = await gen(eng, lora=None, g=long)
        assert base_out.output_tokens == alone.output_tokens  # the base request was not disturbed


async def test_full_weight_update_still_works_with_adapters_loaded(tiny):
    model, tok = tiny
    async with engine(model, tok) as eng:
        await eng.aupdate_weights(mem_meta("a", random_adapter(model, seed=5)))
        base = await gen(eng, lora=None)
        await eng.aupdate_weights(WeightUpdateMeta(type="mem", state_dict=model.state_dict(), version=2))
        assert (await gen(eng, lora=None)).output_tokens == base.output_tokens


async def test_unload_returns_requests_to_the_base_model(tiny):
    model, tok = tiny
    async with engine(model, tok) as eng:
        base = await gen(eng)
        await eng.aupdate_weights(mem_meta("a", random_adapter(model, seed=6)))
        assert (await gen(eng)).output_tokens != base.output_tokens
        await eng.unload_adapter("a")
        assert eng.adapters == {} and eng.default_adapter is None
        assert (await gen(eng)).output_tokens == base.output_tokens
        with pytest.raises(EngineError, match="not loaded"):
            await eng.unload_adapter("a")


async def test_clear_errors_for_limits_unknown_and_mismatched_adapters(tiny):
    model, tok = tiny
    async with engine(model, tok, max_lora_rank=4, lora_target_modules=("q_proj", "v_proj", "down_proj"),
                      max_loras=1) as eng:
        with pytest.raises(EngineError, match=r"rank 8, above this engine's max LoRA rank 4.*--max-lora-rank 8"):
            await eng.aupdate_weights(mem_meta("big", random_adapter(model, seed=7, rank=8)))
        with pytest.raises(EngineError, match=r"targets \['o_proj'\].*--lora-target-modules"):
            await eng.aupdate_weights(mem_meta("o", random_adapter(model, seed=7, targets=("o_proj",))))
        wide, _ = tiny_wide_base()
        with pytest.raises(EngineError, match="does not match the base model"):
            await eng.aupdate_weights(mem_meta("w", random_adapter(wide, seed=7)))
        config, tensors = random_adapter(model, seed=8)
        partial = dict(list(tensors.items())[1:])
        with pytest.raises(EngineError, match="does not cover the layers its config targets"):
            await eng.aupdate_weights(mem_meta("p", (config, partial)))
        assert eng.adapters == {}  # nothing half-loaded
        await eng.aupdate_weights(mem_meta("a", (config, tensors)))
        with pytest.raises(EngineError, match="the limit is 1"):
            await eng.aupdate_weights(mem_meta("b", random_adapter(model, seed=9)))
        with pytest.raises(EngineError, match="'nope', which is not loaded; loaded: \\['a'\\]"):
            await gen(eng, lora="nope")


def tiny_wide_base():
    from agentflow.testing import tiny_model_and_tokenizer

    return tiny_model_and_tokenizer(seed=0, hidden_size=96)
