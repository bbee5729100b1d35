"""RemoteSGLangEngine: payloads, retries, abort + resume and routing against ``httpx.MockTransport``
servers, then against real ``agentflow serve`` apps on loopback (uvicorn in a thread)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import re
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from agentflow import (
    ConfigError,
    EngineError,
    GenerationConfig,
    ModelRequest,
    Rollout,
    RolloutConfig,
    ServerError,
    Trajectory,
    WeightUpdateMeta,
)
from agentflow.engines.remote import RemoteEngineConfig, RemoteSGLangEngine
from agentflow.engines.serve.server import ServerConfig, build_app
from agentflow.testing import FakeEngine, byte_tokenizer

FAST = RemoteEngineConfig(probe_interval_s=0.05, backoff_initial_s=0.001, backoff_max_s=0.01,
                          startup_timeout_s=2.0, server_wait_timeout_s=3.0, health_timeout_s=1.0)


def gen_body(ids: list[int], finish: dict[str, Any], version: str = "0") -> dict[str, Any]:
    return {"text": "", "output_ids": ids, "meta_info": {
        "id": "x", "finish_reason": finish, "prompt_tokens": 1, "completion_tokens": len(ids),
        "weight_version": version, "output_token_logprobs": [[-0.1 * (i + 1), t, None] for i, t in enumerate(ids)]}}


class FakeServers:
    """SGLang-shaped MockTransport: records calls per host; ``generate`` builds /generate answers."""

    def __init__(self, generate: Callable[[str, dict[str, Any]], Any] | None = None) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.down: set[str] = set()
        self.generate = generate or (lambda host, body: httpx.Response(
            200, json=gen_body([7] * body["sampling_params"]["max_new_tokens"], {"type": "length", "length": 1})))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        body = json.loads(request.content) if request.content else None
        self.calls.append((host, path, body))
        if host in self.down:
            raise httpx.ConnectError("connection refused", request=request)
        if path == "/health":
            return httpx.Response(200)
        if path == "/get_server_info":
            return httpx.Response(200, json={"tp_size": 1})
        if path == "/get_model_info":
            return httpx.Response(200, json={"weight_version": "default"})
        if path == "/generate":
            out = self.generate(host, body)
            return await out if asyncio.iscoroutine(out) else out
        if path in ("/pause_generation", "/continue_generation"):
            return httpx.Response(200, json={"message": "ok", "status": "ok"})
        return httpx.Response(200, json={"success": True, "message": "Succeeded"})

    def paths(self, path: str) -> list[tuple[str, Any]]:
        return [(h, b) for h, p, b in self.calls if p == path]


def remote(servers: FakeServers, n: int = 1, **cfg: Any) -> RemoteSGLangEngine:
    config = RemoteEngineConfig(**{**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__}, **cfg})
    return RemoteSGLangEngine([f"s{i}:3000{i}" for i in range(n)], config=config,
                              transport=httpx.MockTransport(servers))


# ------------------------------------------------------------------------------------- payloads
async def test_generate_payload_follows_the_protocol() -> None:
    fs = FakeServers()
    async with remote(fs) as eng:
        req = ModelRequest([1, 2, 3], GenerationConfig(max_new_tokens=4, greedy=True, stop=("\n",),
                                                       stop_token_ids=(9,)))
        resp = await eng.agenerate(req)
    (_, body), = fs.paths("/generate")
    assert body["input_ids"] == [1, 2, 3] and body["return_logprob"] is True and body["stream"] is False
    assert body["sampling_params"] == {"max_new_tokens": 4, "temperature": 0.0, "top_p": 1.0, "top_k": -1,
                                       "stop": ["\n"], "stop_token_ids": [9]}
    assert re.fullmatch(r"[0-9a-f]{32}", body["rid"])
    assert resp.output_tokens == [7, 7, 7, 7] and resp.stop_reason == "length"
    assert resp.output_logprobs == pytest.approx([-0.1, -0.2, -0.3, -0.4])


async def test_5xx_is_retried_with_a_fresh_rid() -> None:
    answers = iter([httpx.Response(500, json={"error": {"message": "boom"}}),
                    httpx.Response(502, text="bad gateway"),
                    httpx.Response(200, json=gen_body([5], {"type": "stop", "matched": 5}))])
    fs = FakeServers(lambda host, body: next(answers))
    async with remote(fs) as eng:
        resp = await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=3)))
    rids = [b["rid"] for _, b in fs.paths("/generate")]
    assert len(rids) == 3 and len(set(rids)) == 3
    assert not any(a != b and b.startswith(a) for a in rids for b in rids)
    assert resp.output_tokens == [5] and resp.stop_reason == "stop"


async def test_4xx_is_not_retried_and_reports_the_server_message() -> None:
    fs = FakeServers(lambda host, body: httpx.Response(400, json={"error": {"message": "top_p must be in (0, 1]"}}))
    async with remote(fs) as eng:
        with pytest.raises(ServerError, match=r"top_p must be in \(0, 1\]") as info:
            await eng.agenerate(ModelRequest([1]))
    assert info.value.status_code == 400 and len(fs.paths("/generate")) == 1


async def test_retries_exhausted_raise_engine_error() -> None:
    fs = FakeServers(lambda host, body: httpx.Response(500, text="down"))
    async with remote(fs, max_attempts=3) as eng:
        with pytest.raises(EngineError, match="answered 500"):
            await eng.agenerate(ModelRequest([1]))
    assert len(fs.paths("/generate")) == 3


# ------------------------------------------------------------------------------------- abort + resume
async def test_aborted_request_is_resumed_with_tokens_so_far_and_new_version() -> None:
    answers = iter([
        gen_body([11, 12, 13], {"type": "abort", "message": "Aborted", "status_code": None, "err_type": None}, "0"),
        gen_body([14, 15], {"type": "length", "length": 2}, "1"),
    ])
    fs = FakeServers(lambda host, body: httpx.Response(200, json=next(answers)))
    async with remote(fs) as eng:
        resp = await eng.agenerate(ModelRequest([1, 2], GenerationConfig(max_new_tokens=5)))
    first, second = (b for _, b in fs.paths("/generate"))
    assert second["input_ids"] == [1, 2, 11, 12, 13] and second["sampling_params"]["max_new_tokens"] == 2
    assert first["rid"] != second["rid"]
    assert resp.input_tokens == [1, 2] and resp.output_tokens == [11, 12, 13, 14, 15]
    assert resp.output_versions == [0, 0, 0, 1, 1] and resp.stop_reason == "length"


async def test_waiting_queue_abort_shape_is_accepted() -> None:
    waiting = {"type": "abort", "message": "Abort in waiting queue"}  # no status_code, no prompt_tokens
    answers = iter([{"output_ids": [], "meta_info": {"id": "x", "completion_tokens": 0, "finish_reason": waiting}},
                    gen_body([4], {"type": "length", "length": 1})])
    fs = FakeServers(lambda host, body: httpx.Response(200, json=next(answers)))
    async with remote(fs) as eng:
        resp = await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=1)))
    assert resp.output_tokens == [4]


async def test_versions_come_from_weight_versions_spans_else_engine_version() -> None:
    body = gen_body([1, 2, 3], {"type": "length", "length": 3}, "default")
    body["meta_info"]["weight_versions"] = [{"version": "4", "start": 0, "end": 2},
                                            {"version": "5", "start": 2, "end": 3}]
    plain = gen_body([1], {"type": "length", "length": 1}, "default")
    answers = iter([body, plain])
    fs = FakeServers(lambda host, b: httpx.Response(200, json=next(answers)))
    async with remote(fs) as eng:
        eng.set_version(9)
        assert (await eng.agenerate(ModelRequest([1]))).output_versions == [4, 4, 5]
        assert (await eng.agenerate(ModelRequest([1]))).output_versions == [9]


async def test_pause_and_resume_fan_out_to_every_server() -> None:
    fs = FakeServers()
    async with remote(fs, n=2) as eng:
        await eng.pause()
        assert sorted(h for h, _ in fs.paths("/pause_generation")) == ["s0", "s1"]
        assert all(b == {"mode": "abort"} for _, b in fs.paths("/pause_generation"))
        await eng.resume()
        assert all(b == {} for _, b in fs.paths("/continue_generation"))
        assert len(fs.paths("/continue_generation")) == 2


@pytest.mark.parametrize(("mode", "flush"), [("abort", True), ("in_place", False), ("retract", False)])
async def test_the_pause_mode_goes_out_and_decides_whether_an_update_flushes_the_cache(mode, flush) -> None:
    """SGLang cannot flush its prefix cache while paused requests hold KV: only ``abort`` asks it to."""
    from agentflow.engines.remote import RemoteEngine
    from agentflow.engines.remote.sglang import SGLangProtocol

    fs = FakeServers()
    config = RemoteEngineConfig(**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__})
    async with RemoteEngine(["s0:30000"], protocol=SGLangProtocol(pause_mode=mode), config=config,
                            transport=httpx.MockTransport(fs)) as eng:
        await eng.pause()
        await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))
        await eng.resume()
    assert [b for _, b in fs.paths("/pause_generation")] == [{"mode": mode}]
    assert [b["flush_cache"] for _, b in fs.paths("/update_weights_from_disk")] == [flush]


def test_an_unknown_pause_mode_is_refused_naming_the_modes() -> None:
    from agentflow.engines.remote.sglang import SGLangProtocol

    with pytest.raises(ConfigError, match="pause_mode must be 'abort', 'in_place' or 'retract', got 'keep'"):
        SGLangProtocol(pause_mode="keep")  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------- routing
async def test_least_outstanding_requests_spreads_concurrent_load() -> None:
    release, all_arrived, arrived = asyncio.Event(), asyncio.Event(), []

    async def slow(host: str, body: dict[str, Any]) -> httpx.Response:
        arrived.append(host)
        if len(arrived) == 6:
            all_arrived.set()
        await release.wait()
        return httpx.Response(200, json=gen_body([1], {"type": "length", "length": 1}))

    fs = FakeServers(slow)
    async with remote(fs, n=2) as eng:
        tasks = [asyncio.create_task(eng.agenerate(ModelRequest([i + 1]))) for i in range(6)]
        await asyncio.wait_for(all_arrived.wait(), 5)
        release.set()
        await asyncio.gather(*tasks)
    assert Counter(h for h, _ in fs.paths("/generate")) == {"s0": 3, "s1": 3}


async def test_sticky_session_goes_back_to_its_server() -> None:
    fs = FakeServers()
    async with remote(fs, n=3) as eng:
        for _ in range(4):
            await eng.agenerate(ModelRequest([1], metadata={"session": "conv-1"}))
        hosts = {h for h, _ in fs.paths("/generate")}
        assert len(hosts) == 1
        for i in range(6):
            await eng.agenerate(ModelRequest([1], metadata={"session": f"other-{i}"}))
    assert len({h for h, _ in fs.paths("/generate")}) == 3


async def test_dead_server_is_marked_down_and_requests_go_elsewhere_then_it_rejoins() -> None:
    fs = FakeServers()
    async with remote(fs, n=2) as eng:
        fs.down.add("s0")
        for i in range(4):
            resp = await eng.agenerate(ModelRequest([i + 1]))
            assert resp.output_len == 128
        assert not eng.servers[0].up and eng.servers[1].up
        fs.down.clear()
        for _ in range(100):
            if eng.servers[0].up:
                break
            await asyncio.sleep(0.02)
        assert eng.servers[0].up  # the background probe saw it healthy again
    assert ("s0", "/health", None) in fs.calls


async def test_connection_dropped_mid_request_is_retried_on_another_server() -> None:
    def gen(host: str, body: dict[str, Any]) -> httpx.Response:
        if host == "s0":
            raise httpx.RemoteProtocolError("Server disconnected without sending a response.")
        return httpx.Response(200, json=gen_body([3, 3], {"type": "length", "length": 2}))

    fs = FakeServers(gen)
    async with remote(fs, n=2, probe_interval_s=60) as eng:
        for i in range(3):
            resp = await eng.agenerate(ModelRequest([i + 1], GenerationConfig(max_new_tokens=2)))
            assert resp.output_tokens == [3, 3]
        assert not eng.servers[0].up
    assert Counter(h for h, _ in fs.paths("/generate"))["s0"] == 1


async def test_paused_engine_never_probes_health() -> None:
    fs = FakeServers()
    async with remote(fs, n=2) as eng:
        eng.pool.mark_down(eng.servers[0], "test")
        await eng.pause()
        n_health = len(fs.paths("/health"))
        await asyncio.sleep(0.3)
        assert len(fs.paths("/health")) == n_health
        await eng.resume()


async def test_startup_fails_loudly_when_no_server_is_healthy() -> None:
    fs = FakeServers()
    fs.down.update({"s0", "s1"})
    with pytest.raises(EngineError, match="no SGLang server became healthy"):
        async with remote(fs, n=2, startup_timeout_s=0.2):
            pass


# ------------------------------------------------------------------------------------- weights
async def test_disk_update_fans_out_with_version() -> None:
    fs = FakeServers()
    async with remote(fs, n=2) as eng:
        await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/2", version=2))
    calls = fs.paths("/update_weights_from_disk")
    assert sorted(h for h, _ in calls) == ["s0", "s1"]
    assert calls[0][1] == {"model_path": "/ckpt/2", "weight_version": "2", "abort_all_requests": False,
                           "flush_cache": True}


async def test_failed_update_raises_server_error() -> None:
    class Failing(FakeServers):
        async def __call__(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/update_weights_from_disk":
                return httpx.Response(400, json={"success": False, "message": "Failed to update weights: no such dir"})
            return await super().__call__(request)

    async with remote(Failing()) as eng:
        with pytest.raises(ServerError, match="no such dir"):
            await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/nope", version=1))
        with pytest.raises(EngineError, match="type='disk'"):
            await eng.aupdate_weights(WeightUpdateMeta(type="mem", state_dict={}))


async def test_nccl_update_inits_the_group_once_and_sends_tensor_specs() -> None:
    import torch

    fs = FakeServers()
    sd = {"a.weight": torch.empty(2, 3, dtype=torch.bfloat16, device="meta"), "b": torch.empty(4, device="meta")}
    async with remote(fs, n=2, dist_backend="gloo") as eng:
        assert eng.weight_update_world_size() == 3
        for v in (1, 2):
            await eng.aupdate_weights(WeightUpdateMeta(type="nccl", state_dict=sd, version=v, master_port=29500,
                                                       group_name="g"))
    inits = sorted(fs.paths("/init_weights_update_group"), key=lambda x: x[0])
    assert [b["rank_offset"] for _, b in inits] == [1, 2] and {b["world_size"] for _, b in inits} == {3}
    assert inits[0][1]["backend"] == "gloo" and inits[0][1]["group_name"] == "g"
    updates = fs.paths("/update_weights_from_distributed")
    assert len(updates) == 4
    assert updates[0][1]["names"] == ["a.weight", "b"] and updates[0][1]["dtypes"] == ["bfloat16", "float32"]
    assert updates[0][1]["shapes"] == [[2, 3], [4]] and updates[-1][1]["weight_version"] == "2"


# ------------------------------------------------------------------------------------- real servers
class CountingWorkflow:
    """Single-turn workflow: one agenerate, a trajectory; fails loudly on anything unexpected."""

    def __init__(self, max_new_tokens: int = 8) -> None:
        self.max_new_tokens = max_new_tokens

    async def arun_episode(self, engine: Any, data: Any) -> Trajectory:
        gconfig = GenerationConfig(max_new_tokens=self.max_new_tokens)
        resp = await engine.agenerate(ModelRequest([1, data % 200 + 2], gconfig))
        assert resp.output_len == self.max_new_tokens and resp.stop_reason == "length"
        return Trajectory.from_response(resp, reward=1.0)


async def _start(engine: FakeEngine, chunk_tokens: int = 2, port: int = 0) -> Any:
    from _sglang_helpers import ServerThread

    config = ServerConfig(chunk_tokens=chunk_tokens)
    app = build_app(engine, model_path="fake", tokenizer=byte_tokenizer(), config=config)
    return await asyncio.to_thread(ServerThread(app, port).start)


@pytest.mark.integration
async def test_workflow_rollouts_through_a_real_server() -> None:
    server = await _start(FakeEngine(latency=0.01))
    try:
        async with RemoteSGLangEngine([server.address], config=FAST, rollout=RolloutConfig(max_concurrent=8)) as eng:
            trajs = await eng.rollout(list(range(12)), CountingWorkflow())
        assert len(trajs) == 12 and all(t.n_policy_tokens == 8 for t in trajs)
    finally:
        await asyncio.to_thread(server.stop)


@pytest.mark.integration
async def test_pause_update_resume_mid_generation_gives_two_versions_unnoticed() -> None:
    fake = FakeEngine(latency=0.03)
    server = await _start(fake)
    try:
        async with RemoteSGLangEngine([server.address], config=FAST,
                                      rollout=RolloutConfig(max_concurrent=4, max_staleness=4)) as eng:
            for i in range(4):
                eng.submit(i, CountingWorkflow(max_new_tokens=16))
            await asyncio.sleep(0.15)  # a few chunks generated
            await eng.pause()
            await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))
            eng.set_version(1)
            await eng.resume()
            trajs = await eng.wait(4, timeout=30)
            assert Rollout.of(eng).executor.stats()["rejected"] == 0
    finally:
        await asyncio.to_thread(server.stop)
    for t in trajs:
        policy_versions = [v for v in t.versions if v >= 0]
        assert len(policy_versions) == 16 and set(policy_versions) == {0, 1}
        assert policy_versions == sorted(policy_versions)
    assert fake.weight_updates[-1].path == "/ckpt/1"


@pytest.mark.integration
async def test_killing_one_of_two_servers_mid_run_loses_no_episode() -> None:
    fakes = [FakeEngine(latency=0.02), FakeEngine(latency=0.02)]
    servers = [await _start(fakes[0]), await _start(fakes[1])]
    n = 24
    try:
        async with RemoteSGLangEngine([s.address for s in servers], config=FAST,
                                      rollout=RolloutConfig(max_concurrent=8, max_staleness=100)) as eng:
            for i in range(n):
                eng.submit(i, CountingWorkflow(max_new_tokens=8))
            await asyncio.sleep(0.2)
            assert fakes[0].n_calls > 0 and eng.servers[0].outstanding > 0  # killed with requests in flight
            await asyncio.to_thread(servers[0].stop, force=True)
            trajs = await eng.wait(n, timeout=60)
            stats = Rollout.of(eng).executor.stats()
            # Marked down once a request to it failed; a server whose in-flight requests all finished
            # before the shutdown and that got no request afterwards is (correctly) never marked down.
            assert not eng.servers[0].up or eng.servers[0].last_error == ""
    finally:
        await asyncio.to_thread(servers[1].stop)
    assert len(trajs) == n and stats["accepted"] == n and stats["rejected"] == 0


@pytest.mark.integration
async def test_distributed_weight_update_over_gloo_end_to_end() -> None:
    import torch
    from _sglang_helpers import WEIGHT_SPEC, free_port, trainer_broadcast

    fake = FakeEngine()
    server = await _start(fake)
    port = free_port()
    trainer = multiprocessing.get_context("spawn").Process(target=trainer_broadcast, args=(port, 2, "wug"))
    try:
        async with RemoteSGLangEngine([server.address], config=RemoteEngineConfig(dist_backend="gloo")) as eng:
            assert eng.weight_update_world_size() == 2
            trainer.start()  # rank 0 joins and broadcasts while the HTTP calls are pending
            spec = {k: torch.empty(s, device="meta") for k, s in WEIGHT_SPEC.items()}
            await eng.aupdate_weights(WeightUpdateMeta(type="nccl", state_dict=spec, version=1, master_port=port,
                                                       group_name="wug", timeout_s=60))
            await asyncio.to_thread(trainer.join, 60)
            assert trainer.exitcode == 0
    finally:
        await asyncio.to_thread(server.stop)
        if trainer.is_alive():
            trainer.kill()
    got = fake.weight_updates[-1]
    assert got.type == "mem" and got.version == 1 and list(got.state_dict) == list(WEIGHT_SPEC)
    for name, shape in WEIGHT_SPEC.items():
        torch.testing.assert_close(got.state_dict[name], torch.arange(float(torch.Size(shape).numel())).reshape(shape))


@pytest.mark.integration
async def test_the_only_server_killed_before_a_weight_update_gets_it_when_restarted(
        caplog: pytest.LogCaptureFixture) -> None:
    """``kill -9`` of the only server right before an update, restarted 2 s later on the same port:
    the update waits for it, the restarted server loads the update before it serves, and the
    interrupted episodes finish."""
    server = await _start(FakeEngine(latency=0.02))
    fresh = FakeEngine(latency=0.02)

    async def restart_later() -> Any:
        await asyncio.sleep(2.0)
        return await _start(fresh, port=server.port)

    config = RemoteEngineConfig(**{**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__},
                                   "server_wait_timeout_s": 30.0})
    restarted = None
    try:
        async with RemoteSGLangEngine([server.address], config=config,
                                      rollout=RolloutConfig(max_concurrent=4, max_staleness=4)) as eng:
            for i in range(4):
                eng.submit(i, CountingWorkflow(max_new_tokens=48))
            await asyncio.sleep(0.15)  # a few chunks generated
            assert eng.servers[0].outstanding > 0  # killed with generations in flight
            await asyncio.to_thread(server.stop, force=True)
            restart = asyncio.create_task(restart_later())
            loop = asyncio.get_running_loop()
            start = loop.time()
            await Rollout.of(eng).update_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))
            waited = loop.time() - start
            restarted = await restart
            trajs = await eng.wait(4, timeout=30)
    finally:
        await asyncio.to_thread(server.stop)
        if restarted is not None:
            await asyncio.to_thread(restarted.stop)
    assert waited >= 1.5 and [m.path for m in fresh.weight_updates] == ["/ckpt/1"]
    # The killed server's answers never came: every token is from the restarted server, after the update.
    assert len(trajs) == 4 and all([v for v in t.versions if v >= 0] == [1] * 48 for t in trajs)
    waits = Counter(m.split(" waits up to ")[0] for m in (r.getMessage() for r in caplog.records)
                    if " waits up to " in m)
    assert waits["update_weights_from_disk"] == 1 and waits["generate"] <= 1 and len(waits) <= 2  # one line per wait


@pytest.mark.integration
async def test_a_server_that_never_comes_back_fails_the_update_naming_it_within_the_deadline() -> None:
    server = await _start(FakeEngine())
    config = RemoteEngineConfig(**{**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__},
                                   "server_wait_timeout_s": 1.5})
    try:
        async with RemoteSGLangEngine([server.address], config=config) as eng:
            await asyncio.to_thread(server.stop, force=True)
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(EngineError) as info:
                await Rollout.of(eng).update_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))
            assert loop.time() - start < 1.5 + 2.0
    finally:
        await asyncio.to_thread(server.stop)
    assert re.search(rf"update_weights_from_disk needs a healthy SGLang server, and none came back within "
                     rf"server_wait_timeout_s=1.5 s: http://{server.address} down for 1\.[5-9] s \(last error: "
                     rf"GET /health on http://{server.address} failed: ConnectError", str(info.value)), str(info.value)


# ------------------------------------------------------------------------------------- API keys
async def _keyed_server(key: str) -> tuple[FakeEngine, httpx.AsyncBaseTransport]:
    from agentflow.engines.serve._guard import ServeLimits

    fake = FakeEngine()
    await fake.__aenter__()
    app = build_app(fake, model_path="fake", tokenizer=byte_tokenizer(), config=ServerConfig(chunk_tokens=2),
                    manage_engine=False, limits=ServeLimits(api_key=key))
    return fake, httpx.ASGITransport(app=app)


async def test_an_api_key_is_sent_as_a_bearer_token_on_every_request() -> None:
    fake, transport = await _keyed_server("k1")
    seen: list[tuple[str, str | None]] = []

    class Recording(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            seen.append((request.url.path, request.headers.get("authorization")))
            return await transport.handle_async_request(request)

    try:
        async with RemoteSGLangEngine(["keyed:30000"], config=RemoteEngineConfig(api_key="k1"),
                                      transport=Recording()) as eng:
            resp = await eng.agenerate(ModelRequest([1, 2], GenerationConfig(max_new_tokens=3)))
            await eng.pause()
            await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))
            await eng.resume()
    finally:
        await fake.__aexit__(None, None, None)
    assert resp.output_len == 3 and fake.weight_updates[-1].path == "/ckpt/1"
    assert {"/health", "/generate", "/pause_generation", "/update_weights_from_disk"} <= {p for p, _ in seen}
    assert {h for _, h in seen} == {"Bearer k1"}
    assert "k1" not in repr(eng.config)


@pytest.mark.parametrize(("key", "expected"), [
    (None, r"answered 401 Unauthorized: the server requires an API key and none was sent\. Set "
           r"inference\.api_key=<the server's --api-key> \(agentflow train\) or RemoteEngineConfig\(api_key=\.\.\.\)"),
    ("wrong", r"answered 401 Unauthorized: the server refused the API key sent \(RemoteEngineConfig\.api_key, "
              r"inference\.api_key in agentflow train\)\. Expected the server's --api-key"),
])
async def test_a_missing_or_wrong_api_key_fails_at_start_saying_how_to_set_it(key: str | None, expected: str) -> None:
    fake, transport = await _keyed_server("k1")
    try:
        with pytest.raises(ServerError, match=expected) as info:
            async with RemoteSGLangEngine(["keyed:30000"], config=RemoteEngineConfig(api_key=key),
                                          transport=transport):
                pass
    finally:
        await fake.__aexit__(None, None, None)
    assert info.value.status_code == 401 and "GET /get_server_info on http://keyed:30000" in str(info.value)
