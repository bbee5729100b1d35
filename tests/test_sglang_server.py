"""``agentflow serve`` speaks SGLang 0.5.23's native protocol over any InferenceEngine.

Most tests drive the FastAPI app in-process (``httpx.ASGITransport``) over ``FakeEngine``; the
last ones run it over ``LocalEngine`` with the tiny model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from agentflow import ModelRequest, ModelResponse, WeightUpdateMeta
from agentflow.engines.serve.server import ServerConfig, build_app
from agentflow.testing import FakeEngine, byte_tokenizer

TOK = byte_tokenizer()
EOS = TOK.eos_token_id


def text_reply(text: str, prompt_len: int = 1):
    """Reply with ``text`` (repeated), continuing after the tokens already generated."""
    ids = TOK.encode(text) * 8

    def reply(req: ModelRequest) -> list[int]:
        done = len(req.input_ids) - prompt_len
        return ids[done : done + req.gconfig.max_new_tokens]

    return reply


class Served:
    def __init__(self, engine: FakeEngine, client: httpx.AsyncClient, app: Any) -> None:
        self.engine, self.client, self.server = engine, client, app.state.server

    async def gen(self, **body: Any) -> httpx.Response:
        return await self.client.post("/generate", json=body)


async def serve(engine: FakeEngine, **cfg: Any) -> AsyncIterator[Served]:
    async with engine:
        app = build_app(engine, model_path="fake-model", tokenizer=TOK, config=ServerConfig(**cfg),
                        manage_engine=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as c:
            yield Served(engine, c, app)


@pytest.fixture
async def srv() -> AsyncIterator[Served]:
    async for s in serve(FakeEngine(), chunk_tokens=4, health_timeout_s=0.3):
        yield s


@pytest.fixture
async def slow() -> AsyncIterator[Served]:
    """Each engine call (chunk of 2 tokens) takes 50 ms."""
    async for s in serve(FakeEngine(latency=0.05), chunk_tokens=2, health_timeout_s=0.3):
        yield s


# ------------------------------------------------------------------------------------- /generate
async def test_generate_returns_sglang_response_shape(srv: Served) -> None:
    r = await srv.gen(input_ids=[1, 2, 3], sampling_params={"max_new_tokens": 10, "temperature": 0},
                      return_logprob=True, rid="req-1")
    assert r.status_code == 200
    body = r.json()
    meta = body["meta_info"]
    assert len(body["output_ids"]) == 10 and isinstance(body["text"], str)
    assert meta["id"] == "req-1"
    assert meta["finish_reason"] == {"type": "length", "length": 10}
    assert (meta["prompt_tokens"], meta["completion_tokens"]) == (3, 10)
    assert meta["weight_version"] == "default"
    assert meta["weight_versions"] == [{"version": "default", "start": 0, "end": 10}]
    assert meta["input_token_logprobs"] == []
    assert [t[1] for t in meta["output_token_logprobs"]] == body["output_ids"]
    assert all(t[0] == -0.5 and t[2] is None for t in meta["output_token_logprobs"])
    assert meta["e2e_latency"] >= 0 and "cached_tokens" in meta


async def test_generate_without_logprob_has_no_logprob_keys(srv: Served) -> None:
    meta = (await srv.gen(input_ids=[5], sampling_params={"max_new_tokens": 2})).json()["meta_info"]
    assert "output_token_logprobs" not in meta and meta["completion_tokens"] == 2


async def test_text_batch_returns_list_in_order_with_expanded_rids(srv: Served) -> None:
    r = await srv.gen(text=["ab", "xyz"], sampling_params={"max_new_tokens": 3}, rid="b")
    items = r.json()
    assert isinstance(items, list) and [i["meta_info"]["id"] for i in items] == ["b_0", "b_1"]
    assert [i["meta_info"]["prompt_tokens"] for i in items] == [2, 3]


async def test_n_copies_answer_a_list_with_fresh_ids(srv: Served) -> None:
    items = (await srv.gen(input_ids=[1], sampling_params={"max_new_tokens": 2, "n": 3}, rid="x")).json()
    assert len(items) == 3 and len({i["meta_info"]["id"] for i in items}) == 3


@pytest.mark.parametrize(
    ("sampling", "error"),
    [
        ({"max_tokens": 4}, "unknown field `max_tokens`, expected one of `max_new_tokens`, `stop`"),
        ({"max_new_tokens": "4"}, 'invalid type: string "4", expected i64'),
    ],
)
async def test_contract_violation_is_400_with_string_error(srv: Served, sampling: dict, error: str) -> None:
    r = await srv.gen(input_ids=[1], sampling_params=sampling)
    assert r.status_code == 400 and r.json()["error"].startswith(error)


@pytest.mark.parametrize(
    ("sampling", "message"),
    [
        ({"top_p": 0.0}, "top_p must be in (0, 1], got 0.0."),
        ({"top_k": 0}, "top_k must be -1 (disable) or at least 1, got 0."),
        ({"temperature": -1}, "temperature must be a non-negative finite number, got -1.0."),
        ({"max_new_tokens": -1}, "max_new_tokens must be at least 0, got -1."),
    ],
)
async def test_out_of_range_sampling_is_400_with_message(srv: Served, sampling: dict, message: str) -> None:
    r = await srv.gen(input_ids=[1], sampling_params=sampling)
    assert r.status_code == 400 and r.json() == {"error": {"message": message}}


async def test_unsupported_feature_is_400_but_its_default_is_accepted(srv: Served) -> None:
    r = await srv.gen(input_ids=[1], sampling_params={"min_p": 0.1})
    assert r.status_code == 400 and "min_p=0.1 is not supported" in r.json()["error"]["message"]
    ok = await srv.gen(input_ids=[1], sampling_params={"min_p": 0.0, "repetition_penalty": None, "max_new_tokens": 1})
    assert ok.status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"input_ids": []}, "input_ids cannot be empty."),
        ({"sampling_params": {}}, "Either text, input_ids or input_embeds should be provided."),
        ({"input_ids": [[1], [2]], "rid": ["a"]},
         "The specified rids length mismatch with the batch_size for batch processing."),
    ],
)
async def test_bad_inputs_are_400(srv: Served, body: dict, message: str) -> None:
    r = await srv.client.post("/generate", json=body)
    assert r.status_code == 400 and r.json() == {"error": {"message": message}}


async def test_duplicate_in_flight_rid_is_400(slow: Served) -> None:
    first = asyncio.create_task(slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 4}, rid="dup"))
    await asyncio.sleep(0.02)
    r = await slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 4}, rid="dup")
    assert r.status_code == 400 and r.json()["error"]["message"] == "Duplicate request ID detected: dup"
    assert (await first).status_code == 200


async def test_context_length_is_checked() -> None:
    async for s in serve(FakeEngine(), context_length=8):
        r = await s.gen(input_ids=list(range(8)))
        assert "longer than the model's context length (8 tokens)" in r.json()["error"]["message"]
        r = await s.gen(input_ids=[1, 2], sampling_params={"max_new_tokens": 7})
        assert r.json()["error"]["message"].startswith("Requested token count exceeds the model's maximum context")


async def test_max_new_tokens_zero_returns_nothing(srv: Served) -> None:
    body = (await srv.gen(input_ids=[1], sampling_params={"max_new_tokens": 0})).json()
    assert body["output_ids"] == [] and body["meta_info"]["finish_reason"] == {"type": "length", "length": 0}


# ------------------------------------------------------------------------------------- stops
async def test_stop_token_is_kept_in_ids_and_trimmed_from_text() -> None:
    reply = text_reply("hello world")
    async for s in serve(FakeEngine(reply=reply), chunk_tokens=4):
        stop_id = TOK.encode("w")[0]
        body = (await s.gen(input_ids=[1], sampling_params={"stop_token_ids": [stop_id]})).json()
        assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop_id}
        assert body["output_ids"][-1] == stop_id and body["text"] == "hello "


async def test_eos_stops_generation() -> None:
    async for s in serve(FakeEngine(reply=lambda req: [65, 66, EOS, 67][: req.gconfig.max_new_tokens])):
        body = (await s.gen(input_ids=[1], sampling_params={"max_new_tokens": 10})).json()
        assert body["output_ids"] == [65, 66, EOS] and body["text"] == "AB"
        assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": EOS}


async def test_stop_string_matched_across_chunk_boundary() -> None:
    async for s in serve(FakeEngine(reply=text_reply("hello world")), chunk_tokens=4):
        # chunks: "hell" | "o wo" | ... ; "lo w" spans the first boundary
        body = (await s.gen(input_ids=[1], sampling_params={"stop": "lo w", "max_new_tokens": 20})).json()
        assert body["meta_info"]["finish_reason"] == {"type": "stop", "matched": "lo w"}
        assert TOK.decode(body["output_ids"]) == "hello w" and body["text"] == "hel"
        kept = (await s.gen(input_ids=[1], sampling_params={"stop": ["lo w"], "no_stop_trim": True})).json()
        assert kept["text"] == "hello w"


# ------------------------------------------------------------------------------------- streaming
async def _events(srv: Served, body: dict) -> list[Any]:
    out = []
    async with srv.client.stream("POST", "/generate", json={**body, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                data = line.removeprefix("data: ")
                out.append(data if data == "[DONE]" else json.loads(data))
    return out


async def test_stream_is_cumulative_and_ends_with_done(srv: Served) -> None:
    ev = await _events(srv, {"input_ids": [3], "sampling_params": {"max_new_tokens": 10}, "return_logprob": True})
    assert ev[-1] == "[DONE]"
    chunks = ev[:-1]
    assert [len(c["output_ids"]) for c in chunks] == [4, 8, 10]
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert chunks[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
    assert chunks[1]["output_ids"][:4] == chunks[0]["output_ids"]
    assert len(chunks[-1]["meta_info"]["output_token_logprobs"]) == 10
    assert "e2e_latency" in chunks[-1]["meta_info"] and "e2e_latency" not in chunks[0]["meta_info"]


async def test_stream_batch_chunks_carry_index(srv: Served) -> None:
    ev = await _events(srv, {"input_ids": [[1], [2]], "sampling_params": {"max_new_tokens": 4}})
    assert sorted(c["index"] for c in ev[:-1]) == [0, 1] and ev[-1] == "[DONE]"


async def test_stream_contract_error_is_plain_400(srv: Served) -> None:
    r = await srv.gen(input_ids=[1], sampling_params={"max_tokens": 1}, stream=True)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


# ------------------------------------------------------------------------------------- pause / abort
async def test_pause_abort_returns_partial_200_and_blocks_new_requests(slow: Served) -> None:
    running = asyncio.create_task(slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 20}, return_logprob=True))
    await asyncio.sleep(0.13)  # two chunks of 2 tokens done, the third in flight
    r = await slow.client.post("/pause_generation", json={"mode": "abort"})
    assert r.json() == {"message": "Generation paused successfully.", "status": "ok"}
    assert running.done()  # 0.5.23: pause returns after every in-flight request returned
    body = running.result().json()
    assert running.result().status_code == 200
    assert body["meta_info"]["finish_reason"] == {"type": "abort", "message": "Aborted", "status_code": None,
                                                  "err_type": None}
    assert 0 < len(body["output_ids"]) < 20 and len(body["output_ids"]) % 2 == 0
    assert len(body["meta_info"]["output_token_logprobs"]) == len(body["output_ids"])

    blocked = asyncio.create_task(slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 2}))
    await asyncio.sleep(0.15)
    assert not blocked.done()  # new requests wait while paused
    r = await slow.client.post("/continue_generation", json={})
    assert r.json() == {"message": "Generation continued successfully.", "status": "ok"}
    assert (await blocked).json()["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize("path", ["/pause_generation", "/continue_generation"])
async def test_pause_and_continue_need_a_json_body(srv: Served, path: str) -> None:
    r = await srv.client.post(path)
    body = r.json()
    assert r.status_code == 400 and body["object"] == "error" and body["code"] == 400
    assert body["type"] == "Bad Request" and "Field required" in body["message"]


async def test_pause_rejects_unknown_mode(srv: Served) -> None:
    r = await srv.client.post("/pause_generation", json={"mode": "stop"})
    assert r.status_code == 400 and r.json()["object"] == "error"


async def test_retract_mode_holds_requests_and_they_finish_after_continue(slow: Served) -> None:
    running = asyncio.create_task(slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 8}))
    await asyncio.sleep(0.07)
    await slow.client.post("/pause_generation", json={"mode": "retract"})
    await asyncio.sleep(0.2)
    assert not running.done()
    upd = await slow.client.post("/update_weights_from_disk", json={"model_path": "/ckpt/1", "weight_version": "1"})
    assert upd.json()["success"] is True
    await slow.client.post("/continue_generation", json={})
    meta = (await running).json()["meta_info"]
    assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == 8
    assert {s["version"] for s in meta["weight_versions"]} == {"default", "1"}


async def test_abort_request_by_rid_and_all(slow: Served) -> None:
    a = asyncio.create_task(slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 40}, rid="keep-going"))
    b = asyncio.create_task(slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 40}, rid="stop-me"))
    await asyncio.sleep(0.03)
    r = await slow.client.post("/abort_request", json={"rid": "stop-me"})
    assert r.status_code == 200 and r.content == b""
    assert (await b).json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert not a.done()
    await slow.client.post("/abort_request", json={"abort_all": True})
    assert (await a).json()["meta_info"]["finish_reason"]["type"] == "abort"
    assert (await slow.client.post("/abort_request")).status_code == 400  # JSON body required


# ------------------------------------------------------------------------------------- weights
async def test_update_weights_from_disk_sets_version_and_engine_sees_it(srv: Served) -> None:
    r = await srv.client.post("/update_weights_from_disk", json={"model_path": "/ckpt/3", "weight_version": "3"})
    assert r.status_code == 200
    assert r.json() == {"success": True, "message": "Succeeded to update model weights. Weight version updated to 3.",
                        "num_paused_requests": 0}
    assert srv.engine.weight_updates[-1].path == "/ckpt/3" and srv.engine.get_version() == 3
    info = (await srv.client.get("/get_model_info")).json()
    assert info["weight_version"] == "3"
    meta = (await srv.gen(input_ids=[1], sampling_params={"max_new_tokens": 1}))
    assert meta.json()["meta_info"]["weight_version"] == "3"


class FailingEngine(FakeEngine):
    async def aupdate_weights(self, meta: WeightUpdateMeta) -> None:
        raise FileNotFoundError(f"no checkpoint at {meta.path}")


async def test_update_weights_failure_is_400_success_false() -> None:
    async for s in serve(FailingEngine()):
        r = await s.client.post("/update_weights_from_disk", json={"model_path": "/nope"})
        assert r.status_code == 400
        assert r.json()["success"] is False and "no checkpoint at /nope" in r.json()["message"]
        assert "num_paused_requests" in r.json()
        r = await s.client.post("/update_weights_from_disk", json={})
        assert r.status_code == 400 and r.json()["object"] == "error"  # model_path is required


async def test_update_waits_for_in_flight_requests_when_not_paused(slow: Served) -> None:
    order: list[str] = []

    async def generate() -> None:
        await slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 6})
        order.append("generate")

    async def update() -> None:
        await asyncio.sleep(0.03)
        await slow.client.post("/update_weights_from_disk", json={"model_path": "/ckpt"})
        order.append("update")

    async with asyncio.TaskGroup() as tg:
        tg.create_task(generate())
        tg.create_task(update())
    assert order == ["generate", "update"]


async def test_update_weight_version(srv: Served) -> None:
    r = await srv.client.post("/update_weight_version", json={"new_version": "v7"})
    assert r.json() == {"success": True, "message": "Weight version updated to v7", "new_version": "v7"}
    assert (await srv.client.get("/get_model_info")).json()["weight_version"] == "v7"


async def test_distributed_update_without_group_is_400(srv: Served) -> None:
    r = await srv.client.post("/update_weights_from_distributed",
                              json={"names": ["w"], "dtypes": ["float32"], "shapes": [[2]]})
    assert r.status_code == 400 and r.json()["success"] is False
    assert "call /init_weights_update_group first" in r.json()["message"]


# ------------------------------------------------------------------------------------- health, info, cache
async def test_health_is_200_and_503_while_paused(srv: Served) -> None:
    r = await srv.client.get("/health")
    assert r.status_code == 200 and r.content == b""
    await srv.client.post("/pause_generation", json={})
    assert (await srv.client.get("/health")).status_code == 503
    await srv.client.post("/continue_generation", json={})
    assert (await srv.client.get("/health_generate")).status_code == 200


async def test_model_and_server_info(srv: Served) -> None:
    info = (await srv.client.get("/get_model_info")).json()
    assert {"model_path", "tokenizer_path", "is_generation", "weight_version"} <= info.keys()
    assert info["is_generation"] is True and info["model_path"] == "fake-model"
    server = (await srv.client.get("/get_server_info")).json()
    assert server["tp_size"] == 1 and "internal_states" in server and "version" in server


async def test_flush_cache_answers_text(slow: Served) -> None:
    for method in ("GET", "POST"):
        r = await slow.client.request(method, "/flush_cache")
        assert r.status_code == 200 and r.text.startswith("Cache flushed.")
        assert r.headers["content-type"].startswith("text/plain")
    running = asyncio.create_task(slow.gen(input_ids=[1], sampling_params={"max_new_tokens": 4}))
    await asyncio.sleep(0.02)
    assert (await slow.client.post("/flush_cache")).status_code == 400
    await running


async def test_unknown_route_is_404(srv: Served) -> None:
    r = await srv.client.get("/get_weight_version")  # removed in 0.5.23
    assert r.status_code == 404 and r.json() == {"detail": "Not Found"}


# ------------------------------------------------------------------------------------- LocalEngine
@pytest.fixture
async def local(tiny) -> AsyncIterator[tuple[Any, httpx.AsyncClient]]:
    from agentflow.engines.local import LocalEngine, LocalEngineConfig

    model, tok = tiny
    engine = LocalEngine(model, tok, config=LocalEngineConfig(max_batch_size=4, max_seq_len=256))
    async with engine:
        app = build_app(engine, model_path="tiny", tokenizer=tok, config=ServerConfig(chunk_tokens=5),
                        manage_engine=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield engine, c


async def test_local_engine_greedy_through_server_matches_engine(local) -> None:
    engine, client = local
    from agentflow import GenerationConfig

    prompt = TOK.encode("The quick brown fox")
    direct: ModelResponse = await engine.agenerate(
        ModelRequest(prompt, GenerationConfig(max_new_tokens=12, temperature=0.0)))
    r = await client.post("/generate", json={"input_ids": prompt, "return_logprob": True,
                                             "sampling_params": {"max_new_tokens": 12, "temperature": 0}})
    body = r.json()
    assert body["output_ids"] == direct.output_tokens
    lps = [t[0] for t in body["meta_info"]["output_token_logprobs"]]
    assert lps == pytest.approx(direct.output_logprobs, abs=1e-4)


async def test_local_engine_request_is_one_engine_call_not_chunks(local) -> None:
    """An engine with abort(rid) runs a non-streaming request whole: one prefill, where chunks of 5
    would re-prefill every 5 tokens; a streaming request still goes chunk by chunk."""
    engine, client = local
    body = {"input_ids": TOK.encode("count"), "sampling_params": {"max_new_tokens": 30, "temperature": 0}}
    before = engine.stats()["prefill_calls"]
    out = (await client.post("/generate", json=body)).json()
    assert len(out["output_ids"]) > 5  # long enough for chunking to have shown
    assert engine.stats()["prefill_calls"] - before == 1
    before = engine.stats()["prefill_calls"]
    r = await client.post("/generate", json={**body, "stream": True})
    assert r.status_code == 200 and engine.stats()["prefill_calls"] - before == -(-len(out["output_ids"]) // 5)


class AbortableEngine(FakeEngine):
    """FakeEngine whose requests run until aborted, then return what they generated so far."""

    def __init__(self) -> None:
        super().__init__()
        self.aborted: dict[str, asyncio.Event] = {}
        self.started = asyncio.Event()

    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        ev = self.aborted.setdefault(req.rid, asyncio.Event())
        self.started.set()
        await ev.wait()
        n = 7
        return ModelResponse(input_tokens=list(req.input_ids), output_tokens=[65] * n, output_logprobs=[-0.5] * n,
                             output_versions=[self.get_version()] * n, stop_reason="abort")

    def abort(self, rid: str | None = None) -> int:
        hits = [k for k in self.aborted if rid is None or k == rid]
        for k in hits:
            self.aborted[k].set()
        return len(hits)


async def test_pause_abort_returns_the_engines_partial_output_whole_request() -> None:
    async for srv in serve(AbortableEngine(), chunk_tokens=2):
        running = asyncio.create_task(srv.gen(input_ids=[1, 2], return_logprob=True,
                                              sampling_params={"max_new_tokens": 100}))
        await asyncio.wait_for(srv.engine.started.wait(), 5)
        assert (await srv.client.post("/pause_generation", json={"mode": "abort"})).status_code == 200
        body = (await running).json()
        assert body["output_ids"] == [65] * 7  # one engine call, cut by the abort: not 2-token chunks
        assert body["meta_info"]["finish_reason"]["type"] == "abort"
        assert len(body["meta_info"]["output_token_logprobs"]) == 7


async def test_local_engine_pause_abort_then_text_prompt(local) -> None:
    _, client = local
    running = asyncio.create_task(client.post("/generate", json={
        "text": "hello", "sampling_params": {"max_new_tokens": 200, "temperature": 1.0}}))
    await asyncio.sleep(0.2)
    await client.post("/pause_generation", json={"mode": "abort"})
    body = (await running).json()
    assert body["meta_info"]["finish_reason"]["type"] in ("abort", "stop")
    await client.post("/continue_generation", json={})
    r = await client.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 3}})
    assert r.status_code == 200 and r.json()["meta_info"]["prompt_tokens"] == 2


def _until(cond: Any, limit: float = 10.0) -> None:
    end = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < end, f"not true within {limit} s"
        time.sleep(0.005)  # the engine's worker thread moves it on and announces nothing


@pytest.mark.parametrize(("mode", "prefills"), [("in_place", 1), ("retract", 2)])
async def test_local_engine_in_place_keeps_the_kv_through_an_update_and_retract_recomputes_it(
        tiny, tmp_path, mode, prefills) -> None:
    """As ``agentflow serve`` builds it (no recompute of its own on updates): a request paused
    ``in_place`` goes on from its KV cache under the new weights; one paused ``retract`` is
    prefilled again first. Either way its tokens carry the version that produced them."""
    from agentflow.engines.local import LocalEngine, LocalEngineConfig

    model, tok = tiny
    model.save_pretrained(tmp_path)
    engine = LocalEngine(model, tok, config=LocalEngineConfig(max_batch_size=4, max_seq_len=256,
                                                               recompute_kv_on_update=False))
    async with engine:
        app = build_app(engine, model_path="tiny", tokenizer=tok, config=ServerConfig(), manage_engine=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            before = engine.stats()["prefill_calls"]
            running = asyncio.create_task(client.post("/generate", json={
                "input_ids": TOK.encode("hello"), "sampling_params": {"max_new_tokens": 200, "temperature": 0}}))
            await asyncio.to_thread(_until, lambda: engine.stats()["decode_steps"] >= 3)
            assert (await client.post("/pause_generation", json={"mode": mode})).status_code == 200
            upd = await client.post("/update_weights_from_disk", json={
                "model_path": str(tmp_path), "weight_version": "1", "flush_cache": False})
            assert upd.json()["success"] is True and upd.json()["num_paused_requests"] == 1
            await client.post("/continue_generation", json={})
            meta = (await running).json()["meta_info"]
            assert engine.stats()["prefill_calls"] - before == prefills
    assert meta["finish_reason"]["type"] == "length" and meta["completion_tokens"] == 200
    assert [s["version"] for s in meta["weight_versions"]] == ["0", "1"]


def test_serve_limits_reach_the_local_engine_and_the_sglang_command(tmp_path) -> None:
    from agentflow.engines.serve._launch import local_engine, sglang_command
    from agentflow.engines.serve.server import _parse_args
    from agentflow.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    args = _parse_args(["--model", str(tmp_path), "--max-running-requests", "5", "--context-length", "96",
                        "--random-seed", "11"])
    engine, _, _, ctx = local_engine(args.model, args.max_running_requests, args.context_length, args.random_seed)
    assert (engine.config.max_batch_size, engine.config.max_seq_len, ctx, engine.config.seed) == (5, 96, 96, 11)
    assert engine.config.recompute_kv_on_update is False  # the pause mode decides (in_place keeps the KV)
    cmd = sglang_command("m", "h", 1, "v", 5, 96, 11)
    assert cmd[cmd.index("--max-running-requests") + 1] == "5" and cmd[cmd.index("--context-length") + 1] == "96"
    assert cmd[cmd.index("--random-seed") + 1] == "11"
    assert "--context-length" not in sglang_command("m", "h", 1, "v")
    assert "--random-seed" not in sglang_command("m", "h", 1, "v")


def test_serve_dtype_reaches_the_local_engine_and_the_sglang_command(tmp_path) -> None:
    from agentflow.engines.serve._launch import local_engine, sglang_command
    from agentflow.engines.serve.server import _parse_args
    from agentflow.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(0)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    assert _parse_args([]).dtype == "auto"
    for flag, want in (("auto", "float32"), ("bfloat16", "bfloat16"), ("float32", "float32")):
        args = _parse_args(["--model", str(tmp_path), "--dtype", flag])
        engine, *_ = local_engine(args.model, dtype=args.dtype)
        assert engine.config.dtype == want
    cmd = sglang_command("m", "h", 1, "v", dtype="bfloat16")
    assert cmd[cmd.index("--dtype") + 1] == "bfloat16" and "--dtype" not in sglang_command("m", "h", 1, "v")
    with pytest.raises(SystemExit):
        _parse_args(["--dtype", "fp8"])


async def test_a_bfloat16_server_generates_and_loads_float32_weights(tmp_path) -> None:
    """The trainer publishes float32 safetensors; a server running in bfloat16 casts them on load
    and its log-probs stay log-probs (finite, <= 0)."""
    import torch
    from safetensors.torch import save_file

    from agentflow import GenerationConfig
    from agentflow.engines.local import LocalEngine, LocalEngineConfig
    from agentflow.testing import tiny_model_and_tokenizer

    model, tok = tiny_model_and_tokenizer(0)
    async with LocalEngine(model, tok, config=LocalEngineConfig(dtype="bfloat16", seed=0)) as engine:
        assert next(engine.model.parameters()).dtype == torch.bfloat16
        out = await engine.agenerate(ModelRequest([1, 2, 3], GenerationConfig(max_new_tokens=5)))
        assert len(out.output_tokens) == 5 and all(-1e4 < lp <= 0 for lp in out.output_logprobs)
        fresh, _ = tiny_model_and_tokenizer(1)
        state = {k: v.float().contiguous() for k, v in fresh.state_dict().items()}
        save_file(state, str(tmp_path / "model.safetensors"))
        await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=str(tmp_path), version=1))
        name = "model.embed_tokens.weight"
        assert torch.equal(engine.model.state_dict()[name], fresh.state_dict()[name].to(torch.bfloat16))


def test_servers_started_without_a_seed_draw_with_different_seeds() -> None:
    """Two servers sharing a group's samples with one seed would draw identical samples (each
    request's stream comes from the seed and its prompt)."""
    from agentflow.engines.serve.server import _parse_args, _sampling_seed

    assert _sampling_seed(_parse_args(["--random-seed", "5"])) == 5
    assert len({_sampling_seed(_parse_args([])) for _ in range(4)}) > 1
