"""The ``vllm`` protocol against a real vLLM server (marker ``vllm``; skipped without the vLLM venv
that scripts/vllm_env.sh builds), plus its wire format against a mock transport (always run).

One server for the session (``vllm_server`` in conftest.py): the tiny random Llama with the byte
tokenizer, fp32, LoRA enabled. Tests that change its weights put the original ones back.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentflow import GenerationConfig, ModelRequest, WeightUpdateMeta
from agentflow.engines.remote import RemoteEngine, RemoteEngineConfig
from agentflow.engines.remote.protocol import GenerateJob
from agentflow.engines.remote.vllm import VLLMProtocol, check_version, parse_generated
from agentflow.errors import ConfigError, ServerError


def real(test: Any) -> Any:
    """A test on the real server: marker ``vllm``, and room for the server's start (30-100 s on 2 busy cores)."""
    return pytest.mark.timeout(400)(pytest.mark.vllm(test))


PROMPT = [257, *b"user\nCount to ten.", 258, 10, 257, *b"assistant\n"]
GREEDY = GenerationConfig(max_new_tokens=24, greedy=True)


# ---------------------------------------------------------------------------- helpers
def _engine(address: str, **kw: Any) -> RemoteEngine:
    cfg = RemoteEngineConfig(startup_timeout_s=60, request_timeout_s=120, probe_interval_s=0.5)
    return RemoteEngine([address], protocol=VLLMProtocol(**kw), config=cfg)


def _hf(path: Path | str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype="float32").eval()


def _logprobs(model: Any, prompt: list[int], out: list[int]) -> list[float]:
    import torch

    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(out)[:, None])[:, 0].tolist()


def _greedy(model: Any, prompt: list[int], n: int) -> list[int]:
    import torch

    with torch.no_grad():
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                             pad_token_id=256)
    return ids[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def base_dir(vllm_server: Any, vllm_tiny_dir: Path) -> Path:
    return vllm_tiny_dir


@pytest.fixture(scope="module")
def noisy_dir(base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint with noise on every weight: other greedy tokens."""
    import torch

    model = _hf(base_dir)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * p.std())
    out = tmp_path_factory.mktemp("noisy")
    model.save_pretrained(out)
    return out


def _adapter(base_dir: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(_hf(base_dir), LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(out)
    return out


async def _restore(engine: RemoteEngine, base_dir: Path) -> None:
    await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=str(base_dir), version=0))


def _next_delay(versions: list[Any], old: int, new: int, delay: float, spans: list[Any]) -> float | None:
    """For the tests that update weights in the middle of a request: None when the update landed
    inside it (tokens on both versions), else the delay to try next. Too early and every token is on
    the new version; too late (the tiny model decodes 900 tokens in well under a second on a quiet
    machine) and every token is on the old one."""
    spans.append((delay, versions.count(old), versions.count(new)))
    if old not in versions:
        return delay * 1.5
    if new not in versions:
        return delay / 3
    return None


# ---------------------------------------------------------------------------- real server
@real
async def test_generation_is_token_exact_and_logprobs_match_transformers(vllm_server: Any, base_dir: Path) -> None:
    hf = _hf(base_dir)
    async with _engine(vllm_server.command.address) as engine:
        greedy = await engine.agenerate(ModelRequest(PROMPT, GREEDY))
        sampled = await engine.agenerate(ModelRequest(PROMPT, GenerationConfig(max_new_tokens=48, temperature=1.0)))
    assert greedy.output_tokens == _greedy(hf, PROMPT, len(greedy.output_tokens))
    assert len(greedy.output_tokens) == 24 and greedy.stop_reason == "length"
    for r in (greedy, sampled):
        assert len(r.output_logprobs) == len(r.output_tokens) == len(r.output_versions)
        ref = _logprobs(hf, PROMPT, r.output_tokens)
        assert max(abs(a - b) for a, b in zip(r.output_logprobs, ref, strict=True)) < 1e-4


@real
async def test_a_stop_token_ends_generation_and_is_part_of_the_output(vllm_server: Any) -> None:
    async with _engine(vllm_server.command.address) as engine:
        free = await engine.agenerate(ModelRequest(PROMPT, GREEDY))
        stop = free.output_tokens[5]
        first = free.output_tokens.index(stop)
        r = await engine.agenerate(ModelRequest(PROMPT, GenerationConfig(max_new_tokens=24, greedy=True,
                                                                         stop_token_ids=(stop,))))
    assert r.output_tokens == free.output_tokens[:first + 1] and r.stop_reason == "stop"


@real
async def test_an_update_in_the_middle_of_a_long_request_switches_versions_and_loses_no_token(
        vllm_server: Any, base_dir: Path, noisy_dir: Path) -> None:
    n, delay, spans = 900, 0.3, []
    async with _engine(vllm_server.command.address) as engine:
        for _ in range(8):  # until the update lands mid-request
            await _restore(engine, base_dir)
            engine.set_version(0)
            request = ModelRequest(PROMPT, GenerationConfig(max_new_tokens=n, greedy=True))
            task = asyncio.create_task(engine.agenerate(request))
            await asyncio.sleep(delay)
            await engine.pause()
            await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=str(noisy_dir), version=1))
            engine.set_version(1)
            await engine.resume()
            r = await task
            assert r.stop_reason == "length" and len(r.output_tokens) == n, (len(r.output_tokens), r.stop_reason)
            if (delay := _next_delay(r.output_versions, 0, 1, delay, spans)) is None:
                break
        await _restore(engine, base_dir)
        engine.set_version(0)
    assert 0 in r.output_versions and 1 in r.output_versions, f"the update never landed mid-request: {spans}"
    k = r.output_versions.index(1)
    assert r.output_versions == [0] * k + [1] * (n - k)
    # Each side's log-probs = transformers with that side's weights over the whole context. (Not the
    # greedy tokens over hundreds of steps: the random model's logits are nearly flat, and fp32
    # rounding can flip a near tie.)
    before = _logprobs(_hf(base_dir), PROMPT, r.output_tokens[:k])
    after = _logprobs(_hf(noisy_dir), PROMPT + r.output_tokens[:k], r.output_tokens[k:k + 64])
    got = r.output_logprobs
    assert max(abs(a - b) for a, b in zip(got[:k], before, strict=True)) < 1e-4
    assert max(abs(a - b) for a, b in zip(got[k:k + 64], after, strict=True)) < 1e-4


@real
async def test_pause_keep_freezes_a_request_and_the_weight_versions_span_the_update(
        vllm_server: Any, base_dir: Path, noisy_dir: Path) -> None:
    # The pause has to land while the request decodes; each miss retries it earlier or later.
    proto = VLLMProtocol(pause_mode="keep")
    delay, spans = 0.3, []
    async with _engine(vllm_server.command.address, pause_mode="keep") as engine:
        server = engine.servers[0]

        async def call(op: Any, *args: Any) -> Any:
            return await engine.pool.within(server, "test", 60, op, *args)

        for attempt in range(8):
            await call(proto.update_weights_from_disk, str(base_dir), 1)
            job = GenerateJob(PROMPT, GenerationConfig(max_new_tokens=900, greedy=True), 900, f"keep-{attempt}")
            task = asyncio.create_task(call(proto.generate, job))
            await asyncio.sleep(delay)
            await call(proto.pause)
            await call(proto.update_weights_from_disk, str(noisy_dir), 2)
            await call(proto.resume)
            out = await task
            assert await call(proto.weight_version) == 2
            assert out.finish == "length" and len(out.tokens) == 900
            if (delay := _next_delay(out.versions, 1, 2, delay, spans)) is None:
                break
        await call(proto.update_weights_from_disk, str(base_dir), 0)
    assert 1 in out.versions and 2 in out.versions, f"the pause never landed mid-request: {spans}"
    k = out.versions.index(2)
    assert out.versions == [1] * k + [2] * (900 - k)


@real
async def test_abort_takes_the_servers_id_and_returns_the_partial_output(vllm_server: Any) -> None:
    proto = VLLMProtocol()
    async with _engine(vllm_server.command.address) as engine:
        server = engine.servers[0]

        async def call(op: Any, *args: Any) -> Any:
            return await engine.pool.within(server, "test", 60, op, *args)

        # the tiny model decodes 800 tokens in well under a second on a quiet machine: abort from the
        # moment the request is sent (an id the server does not know yet is ignored) until it ends;
        # a fast machine can still finish one before the abort lands, so a few tries get a fresh id
        tries = []
        for attempt in range(5):
            rid = f"abort-me-{attempt}"
            job = GenerateJob(PROMPT, GenerationConfig(max_new_tokens=800, greedy=True), 800, rid)
            task = asyncio.create_task(call(proto.generate, job))
            while not task.done():
                await call(proto.abort, [rid])
                await asyncio.sleep(0.005)
            out = await asyncio.wait_for(task, 10)
            tries.append((out.finish, len(out.tokens)))
            if out.finish == "abort":
                break
    # what was generated before the abort comes back (how much depends on the machine's speed)
    assert out.finish == "abort", f"every try ran to its end before an abort landed: {tries}"
    assert len(out.tokens) < 800 and len(out.logprobs) == len(out.tokens)


@real
async def test_lora_load_in_place_update_and_generation_match_peft(
        vllm_server: Any, base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    async with _engine(vllm_server.command.address) as engine:
        for version, seed in ((1, 1), (2, 2)):
            path = _adapter(base_dir, tmp_path / f"a{version}", seed)
            await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=str(path), version=version,
                                                          adapter="policy"))
            engine.set_version(version)
            r = await engine.agenerate(ModelRequest(PROMPT, GREEDY))
            ref = PeftModel.from_pretrained(_hf(base_dir), path).eval()
            assert r.output_tokens == _greedy(ref, PROMPT, 24), f"adapter v{version}"
            assert r.output_versions == [version] * 24
            ref_lp = _logprobs(ref, PROMPT, r.output_tokens)
            assert max(abs(a - b) for a, b in zip(r.output_logprobs, ref_lp, strict=True)) < 1e-3
        base = await engine.agenerate(ModelRequest(PROMPT, GREEDY, metadata={"lora": None}))
    assert base.output_tokens == _greedy(_hf(base_dir), PROMPT, 24)


@pytest.mark.slow  # the default run stays under 10 minutes; CI runs -m slow after it
@real
async def test_a_restarted_server_rejoins_through_the_pool_with_the_current_weights(
        vllm_server: Any, base_dir: Path, noisy_dir: Path) -> None:
    async with _engine(vllm_server.command.address) as engine:
        await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=str(noisy_dir), version=3))
        engine.set_version(3)
        await asyncio.to_thread(vllm_server.stop)
        vllm_server.start()  # from this (the main) thread: the server's PR_SET_PDEATHSIG follows the starting thread
        pending = asyncio.create_task(engine.agenerate(ModelRequest(PROMPT, GREEDY)))
        await asyncio.to_thread(vllm_server.wait_healthy, 300)
        r = await asyncio.wait_for(pending, 120)
        await _restore(engine, base_dir)
    assert r.output_versions == [3] * 24
    assert r.output_tokens == _greedy(_hf(noisy_dir), PROMPT, 24)


# ---------------------------------------------------------------------------- wire format (no server)
def _answer(tokens: list[int], finish: str = "length", spans: Any = None) -> dict[str, Any]:
    return {"choices": [{"index": 0, "finish_reason": finish, "token_ids": tokens,
                         "weight_versions": spans or [{"version": "default", "start": 0, "end": len(tokens)}],
                         "logprobs": {"content": [{"token_id": t, "logprob": -0.5} for t in tokens]}}]}


def test_an_answer_maps_versions_per_span_and_default_to_unknown() -> None:
    out = parse_generated(_answer([5, 6, 7], "abort", [{"version": "default", "start": 0, "end": 1},
                                                       {"version": "4", "start": 1, "end": 3}]))
    assert out.tokens == [5, 6, 7] and out.versions == [None, 4, 4] and out.finish == "abort"


def test_an_unsupported_vllm_version_is_refused_naming_the_supported_range() -> None:
    check_version("0.32.3", "h:1")
    for bad in ("0.31.2", "0.33.0", "1.0.0", "dev"):
        with pytest.raises(ConfigError, match=r"supports vLLM 0\.32\.x"):
            check_version(bad, "h:1")


def _mock(version: str, seen: list[dict[str, Any]]) -> httpx.MockTransport:
    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/version":
            return httpx.Response(200, json={"version": version})
        if request.url.path == "/inference/v1/generate":
            body = json.loads(request.content)
            seen.append(body)
            await asyncio.sleep(0.05)
            return httpx.Response(200, json=_answer([1, 2]))
        return httpx.Response(200, json={"world_size": 1, "weight_version": "default"})

    return httpx.MockTransport(handler)


async def test_the_request_speaks_token_ids_with_the_sampled_logprob_and_the_adapter() -> None:
    seen: list[dict[str, Any]] = []
    proto = VLLMProtocol()
    engine = RemoteEngine(["h:1"], protocol=proto, transport=_mock("0.32.0", seen))
    async with engine:
        r = await engine.agenerate(ModelRequest([9, 8], GenerationConfig(max_new_tokens=7, temperature=0.7),
                                                metadata={"lora": "pol-v3"}))
    assert r.output_tokens == [1, 2]
    body = seen[0]
    assert body["token_ids"] == [9, 8] and body["model"] == "pol-v3" and len(body["request_id"]) == 32
    sp = body["sampling_params"]
    assert sp["max_tokens"] == 7 and sp["temperature"] == 0.7 and sp["logprobs"] == 0 and sp["top_k"] == 0


async def test_base_and_adapter_requests_are_never_in_flight_together_on_one_server() -> None:
    running: dict[bool, int] = {True: 0, False: 0}
    overlaps = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path != "/inference/v1/generate":
            return httpx.Response(200, json={"version": "0.32.0", "world_size": 1})
        lora = "model" in json.loads(request.content)
        running[lora] += 1
        overlaps.append(running[not lora])
        await asyncio.sleep(0.02)
        running[lora] -= 1
        return httpx.Response(200, json=_answer([1]))

    engine = RemoteEngine(["h:1"], protocol=VLLMProtocol(), transport=httpx.MockTransport(handler))
    async with engine:
        reqs = [ModelRequest([1], metadata={"lora": "a" if i % 3 else None}) for i in range(30)]
        await asyncio.gather(*(engine.agenerate(r) for r in reqs))
    assert max(overlaps) == 0 and len(overlaps) == 30


async def test_an_unsupported_vllm_version_is_refused_when_the_engine_opens() -> None:
    engine = RemoteEngine(["h:1"], protocol="vllm", transport=_mock("0.31.2", []))
    with pytest.raises(ConfigError, match=r"h:1 runs vLLM '0\.31\.2'.*supports vLLM 0\.32\.x"):
        async with engine:
            pass


async def test_max_tokens_is_cut_to_the_servers_context() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models":
            return httpx.Response(200, json={"data": [{"id": "m", "max_model_len": 10}]})
        return await _mock("0.32.1", seen).handle_async_request(request)

    async with RemoteEngine(["h:1"], protocol="vllm", transport=httpx.MockTransport(handler)) as engine:
        await engine.agenerate(ModelRequest([1] * 7, GenerationConfig(max_new_tokens=50)))
        with pytest.raises(ServerError, match="max_model_len=10"):
            await engine.agenerate(ModelRequest([1] * 10, GenerationConfig(max_new_tokens=5)))
    assert seen[0]["sampling_params"]["max_tokens"] == 3
