"""A made-up server protocol ("toy") plugged into the remote engine with no change to the pool.

``ToyProtocol`` below is a complete adapter for a wire format unlike SGLang's (other routes, other
bodies, string version tags, a different error shape). ``ToyServer`` plays its servers, behind
``httpx.MockTransport`` (and, in the last test, on real loopback sockets). Everything else
(routing, stickiness, failover, rejoin, pause/resume, weight-update fan-out, resume after a pause)
is the pool's and the generic engine's, exactly as the SGLang engine uses them.
"""

from __future__ import annotations

import ast
import asyncio
import json
import pathlib
import re
from collections import Counter
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
from agentflow.engines.remote import RemoteEngine, RemoteEngineConfig
from agentflow.engines.remote.protocol import (
    PROTOCOLS,
    BroadcastSpec,
    Generated,
    GenerateJob,
    ServerLink,
    WeightGroup,
    resolve_protocol,
)

FAST = RemoteEngineConfig(probe_interval_s=0.05, backoff_initial_s=0.001, backoff_max_s=0.01,
                          startup_timeout_s=2.0, server_wait_timeout_s=3.0, health_timeout_s=1.0)


# ------------------------------------------------------------------------------------- the adapter
def _version(tag: Any) -> int | None:
    """Toy servers tag weights "v<int>"."""
    if isinstance(tag, str) and tag.startswith("v") and tag[1:].isdigit():
        return int(tag[1:])
    return None


def _tag(version: int | None) -> str | None:
    return None if version is None else f"v{version}"


_FINISH = {"eos": "stop", "budget": "length", "held": "abort"}


class ToyProtocol:
    """The whole toy protocol, as an adapter: one method per operation, no retries, no routing."""

    name = "Toy"
    launch_hint = "`toy-server --port N`"

    def error_text(self, body: str) -> str:
        try:
            return str(json.loads(body)["problem"])
        except (ValueError, KeyError, TypeError):
            return body[:200]

    async def health(self, link: ServerLink) -> None:
        if (await link.call("GET", "/ping")).get("ok") is not True:
            raise ServerError(f"{link.address}/ping did not say ok")

    async def tp_size(self, link: ServerLink) -> int:
        return int((await link.call("GET", "/about"))["shards"])

    async def weight_version(self, link: ServerLink) -> int | None:
        return _version((await link.call("GET", "/about")).get("tag"))

    async def generate(self, link: ServerLink, job: GenerateJob) -> Generated:
        ans = await link.call("POST", "/v1/complete", {
            "tokens": job.input_ids, "budget": job.max_new_tokens, "ticket": job.rid, "adapter": job.adapter,
            "heat": 0.0 if job.gconfig.is_greedy else job.gconfig.temperature})
        steps = ans["steps"]
        return Generated([s["id"] for s in steps], [s["lp"] for s in steps], [_version(s["tag"]) for s in steps],
                         _FINISH[ans["end"]])  # type: ignore[arg-type]

    async def pause(self, link: ServerLink) -> None:
        await link.call("POST", "/v1/hold", {})

    async def resume(self, link: ServerLink) -> None:
        await link.call("POST", "/v1/release", {})

    async def update_weights_from_disk(self, link: ServerLink, path: str, version: int | None) -> None:
        await link.call("PUT", "/v1/weights", {"dir": path, "tag": _tag(version)})

    async def init_weight_group(self, link: ServerLink, group: WeightGroup) -> None:
        await link.call("POST", "/v1/group", {
            "store": f"{group.master_address}:{group.master_port}", "name": group.group_name,
            "first_rank": group.rank_offset, "ranks": group.world_size, "backend": group.backend})

    async def update_weights_from_distributed(self, link: ServerLink, spec: BroadcastSpec) -> None:
        tensors = [{"name": n, "dtype": d, "shape": s} for n, d, s in zip(spec.names, spec.dtypes, spec.shapes,
                                                                          strict=True)]
        await link.call("POST", "/v1/receive", {"group": spec.group_name, "tensors": tensors,
                                                "tag": _tag(spec.version)})


class ToyLoRAProtocol(ToyProtocol):
    """The toy protocol with adapters: the three optional LoRA methods, on toy routes."""

    async def load_adapter(self, link: ServerLink, name: str, path: str) -> None:
        await link.call("PUT", "/v1/adapters", {"as": name, "from": path})

    async def unload_adapter(self, link: ServerLink, name: str) -> None:
        await link.call("DELETE", "/v1/adapters", {"as": name})

    async def set_weight_version(self, link: ServerLink, version: int) -> None:
        await link.call("POST", "/v1/tag", {"tag": _tag(version)})


# ------------------------------------------------------------------------------------- the servers
class Dead(Exception):
    """The server process is gone: the transport refuses the connection."""


class ToyServer:
    """One toy server: tokens count up from the last input token, one step every ``step_s``;
    ``/v1/hold`` makes in-flight completions return what they have (``end: "held"``) and answers
    once they all have."""

    def __init__(self, shards: int = 1, step_s: float = 0.0) -> None:
        self.alive, self.shards, self.step_s = True, shards, step_s
        self.tag = "v0"
        self.held = False
        self.produced = 0
        self.in_flight = 0
        self._idle = asyncio.Condition()
        self.fail_next: list[tuple[int, dict[str, Any]]] = []  # (status, body) answers to /v1/complete
        self.adapters: dict[str, str] = {}  # served name -> directory
        self.used: list[str | None] = []  # the adapter of each completion

    async def handle(self, method: str, path: str, body: Any) -> tuple[int, dict[str, Any]]:
        if not self.alive:
            raise Dead
        if (method, path) == ("GET", "/ping"):
            return 200, {"ok": True}
        if (method, path) == ("GET", "/about"):
            return 200, {"shards": self.shards, "tag": self.tag}
        if (method, path) == ("POST", "/v1/complete"):
            return self.fail_next.pop(0) if self.fail_next else (200, await self._complete(body))
        if (method, path) == ("POST", "/v1/hold"):
            self.held = True
            async with self._idle:
                await self._idle.wait_for(lambda: self.in_flight == 0)
            return 200, {}
        if (method, path) == ("POST", "/v1/release"):
            self.held = False
            return 200, {}
        if (method, path) in (("PUT", "/v1/weights"), ("POST", "/v1/receive")):
            self.tag = body["tag"]
            return 200, {"done": True}
        if (method, path) == ("POST", "/v1/group"):
            return 200, {"joined": True}
        if path in ("/v1/adapters", "/v1/tag"):
            return self._adapter_route(method, body)
        return 404, {"problem": f"no route {method} {path}"}

    def _adapter_route(self, method: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if method == "PUT":
            if body["as"] in self.adapters:
                return 400, {"problem": f"adapter {body['as']} already loaded"}
            self.adapters[body["as"]] = body["from"]
        elif method == "DELETE":
            if self.adapters.pop(body["as"], None) is None:
                return 400, {"problem": f"no adapter {body['as']}"}
        else:
            self.tag = body["tag"]
        return 200, {}

    async def _complete(self, body: dict[str, Any]) -> dict[str, Any]:
        if body.get("adapter") is not None and body["adapter"] not in self.adapters:
            return {"steps": [], "end": "budget", "problem": f"unknown adapter {body['adapter']}"}
        self.used.append(body.get("adapter"))
        self.in_flight += 1
        try:
            return await self._steps(body)
        finally:
            self.in_flight -= 1
            async with self._idle:
                self._idle.notify_all()

    async def _steps(self, body: dict[str, Any]) -> dict[str, Any]:
        last, steps = body["tokens"][-1], []
        while len(steps) < body["budget"]:
            await asyncio.sleep(self.step_s)
            if self.held or not self.alive:
                return {"steps": steps, "end": "held"}
            last = (last + 1) % 50
            steps.append({"id": last, "lp": -0.25, "tag": self.tag})
            self.produced += 1
        return {"steps": steps, "end": "budget"}


class ToyCluster:
    """``httpx.MockTransport`` handler: routes by host to a :class:`ToyServer`, records calls."""

    def __init__(self, n: int, **server: Any) -> None:
        self.servers = {f"t{i}": ToyServer(**server) for i in range(n)}
        self.calls: list[tuple[str, str, Any]] = []

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        host, path = request.url.host, request.url.path
        body = json.loads(request.content) if request.content else None
        self.calls.append((host, path, body))
        try:
            status, answer = await self.servers[host].handle(request.method, path, body)
        except Dead:
            raise httpx.ConnectError("connection refused", request=request) from None
        return httpx.Response(status, json=answer)

    def paths(self, path: str) -> list[tuple[str, Any]]:
        return [(h, b) for h, p, b in self.calls if p == path]


def toy_engine(cluster: ToyCluster, protocol: Any = None, **cfg: Any) -> RemoteEngine:
    config = RemoteEngineConfig(**{**{f: getattr(FAST, f) for f in FAST.__dataclass_fields__}, **cfg})
    return RemoteEngine([f"t{i}:4000" for i in range(len(cluster.servers))], protocol=protocol or ToyProtocol(),
                        config=config, transport=httpx.MockTransport(cluster))


async def _until(cond: Any, what: str = "the condition") -> None:
    for _ in range(500):
        if cond():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{what} did not hold within 5 s")


# ------------------------------------------------------------------------------------- registry
def test_a_registered_name_resolves_to_its_adapter(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROTOCOLS, "toy", f"{__name__}:ToyProtocol")  # the one registry line
    assert type(resolve_protocol("toy")).__name__ == "ToyProtocol"
    assert type(resolve_protocol("sglang")).__name__ == "SGLangProtocol"
    assert type(resolve_protocol("vllm")).__name__ == "VLLMProtocol"
    with pytest.raises(ConfigError, match=r"unknown server protocol 'tgi'; expected one of \['sglang', 'toy', 'vll"):
        resolve_protocol("tgi")


def test_an_incomplete_adapter_is_refused_with_what_it_lacks() -> None:
    class Half:
        name, launch_hint = "half", ""

        async def generate(self, link: ServerLink, job: GenerateJob) -> Generated:
            raise NotImplementedError

    with pytest.raises(ConfigError, match=r"Half is not a ServerProtocol adapter: it lacks \['error_text', 'health'"):
        RemoteEngine(["h:1"], protocol=Half())  # type: ignore[arg-type]


def test_the_pool_and_the_engine_name_no_route() -> None:
    """What makes a new protocol one module: no route, and no protocol name, in the generic code."""
    root = pathlib.Path(__file__).resolve().parents[1] / "engines"
    for name in ("remote/_pool.py", "remote/engine.py", "remote/protocol.py", "remote/_adapters.py"):
        tree = ast.parse((root / name).read_text(encoding="utf-8"))
        routes = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
                  and n.value.startswith("/") and len(n.value) > 1]
        assert routes == [], f"{name} speaks routes {routes}: move them into an adapter"


async def test_a_lora_update_runs_through_any_protocol_with_the_adapter_methods() -> None:
    """LoRA goes through the protocol's methods only: a stub protocol needs no other edit."""
    cluster = ToyCluster(2)
    async with toy_engine(cluster, ToyLoRAProtocol()) as engine:
        for v in (1, 2):
            await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=f"/ckpt/a{v}", adapter="policy",
                                                          version=v))
        for server in cluster.servers.values():
            assert server.adapters == {"policy-v2": "/ckpt/a2"}  # v1 unloaded after v2 loaded
            assert server.tag == "v2"
        out = await engine.agenerate(ModelRequest(input_ids=[1, 2], gconfig=GenerationConfig(max_new_tokens=3)))
        assert out.output_versions == [2, 2, 2]
        assert [u for s in cluster.servers.values() for u in s.used] == ["policy-v2"]
        # a restarted server comes back empty and gets exactly the current adapter and version
        restarted = cluster.servers["t0"]
        restarted.alive = False
        engine.pool.mark_down(engine.servers[0], "killed by the test")
        restarted.adapters, restarted.tag, restarted.alive = {}, "v0", True
        await _until(lambda: engine.servers[0].up, "the rejoin")
        assert restarted.adapters == {"policy-v2": "/ckpt/a2"} and restarted.tag == "v2"


async def test_an_adapter_update_on_a_protocol_without_lora_says_so() -> None:
    async with toy_engine(ToyCluster(1)) as engine:
        with pytest.raises(EngineError, match=r"the Toy protocol adapter \(ToyProtocol\) cannot serve LoRA adapters: "
                                              r"it has no load_adapter, unload_adapter, set_weight_version"):
            await engine.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/a1", adapter="policy", version=1))


async def test_the_engine_speaks_the_toy_wire_format_by_registered_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(PROTOCOLS, "toy", f"{__name__}:ToyProtocol")
    cluster = ToyCluster(1)
    async with toy_engine(cluster, protocol="toy") as eng:
        resp = await eng.agenerate(ModelRequest([7, 8], GenerationConfig(max_new_tokens=4, greedy=True)))
    (_, body), = cluster.paths("/v1/complete")
    assert body["tokens"] == [7, 8] and body["budget"] == 4 and body["heat"] == 0.0 and len(body["ticket"]) == 32
    assert resp.output_tokens == [9, 10, 11, 12] and resp.output_logprobs == [-0.25] * 4
    assert resp.output_versions == [0] * 4 and resp.stop_reason == "length"


async def test_errors_use_the_adapters_error_shape_and_5xx_is_retried() -> None:
    cluster = ToyCluster(1)
    cluster.servers["t0"].fail_next = [(500, {"problem": "overloaded"}), (422, {"problem": "budget too large"})]
    async with toy_engine(cluster) as eng:
        with pytest.raises(ServerError, match="answered 422: budget too large") as info:
            await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=2)))
    assert info.value.status_code == 422
    tickets = [b["ticket"] for _, b in cluster.paths("/v1/complete")]
    assert len(tickets) == 2 and tickets[0] != tickets[1]


# ------------------------------------------------------------------------------------- routing
async def test_least_outstanding_and_sticky_routing() -> None:
    cluster = ToyCluster(2, step_s=0.02)
    async with toy_engine(cluster) as eng:
        await asyncio.gather(*(eng.agenerate(ModelRequest([i + 1], GenerationConfig(max_new_tokens=2)))
                               for i in range(6)))
        assert Counter(h for h, _ in cluster.paths("/v1/complete")) == {"t0": 3, "t1": 3}
        cluster.calls.clear()
        for _ in range(4):
            await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=1), metadata={"session": "c"}))
        assert len({h for h, _ in cluster.paths("/v1/complete")}) == 1


async def test_failover_then_rejoin_catches_up_on_the_missed_disk_update() -> None:
    cluster = ToyCluster(2)
    t0 = cluster.servers["t0"]
    async with toy_engine(cluster) as eng:
        t0.alive = False
        for i in range(4):
            assert (await eng.agenerate(ModelRequest([i + 1], GenerationConfig(max_new_tokens=3)))).output_len == 3
        assert not eng.servers[0].up and eng.servers[1].up
        await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))  # t0 misses it
        assert [h for h, _ in cluster.paths("/v1/weights")] == ["t1"]
        t0.alive = True
        await _until(lambda: eng.servers[0].up, "t0 rejoining")
    assert t0.tag == "v1" and cluster.paths("/v1/weights")[-1] == ("t0", {"dir": "/ckpt/1", "tag": "v1"})


async def test_a_server_that_missed_a_broadcast_update_stays_down() -> None:
    import torch

    cluster = ToyCluster(2)
    async with toy_engine(cluster, dist_backend="gloo") as eng:
        cluster.servers["t0"].alive = False
        await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=1), metadata={"session": "x"}))
        await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=1), metadata={"session": "y"}))
        await eng.aupdate_weights(WeightUpdateMeta(type="nccl", state_dict={"w": torch.empty(2, device="meta")},
                                                   version=3))
        cluster.servers["t0"].alive = True
        await _until(lambda: "restart it from the latest checkpoint" in eng.servers[0].last_error, "rejoin refused")
        assert not eng.servers[0].up


# ------------------------------------------------------------------------------------- pause, weights
async def test_pause_resume_and_weight_updates_fan_out_in_the_toy_format() -> None:
    import torch

    cluster = ToyCluster(2, shards=2)
    sd = {"a": torch.empty(2, 3, dtype=torch.bfloat16, device="meta"), "b": torch.empty(4, device="meta")}
    async with toy_engine(cluster, dist_backend="gloo") as eng:
        await eng.pause()
        assert sorted(h for h, _ in cluster.paths("/v1/hold")) == ["t0", "t1"]
        await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/2", version=2))
        await eng.resume()
        assert sorted(h for h, _ in cluster.paths("/v1/release")) == ["t0", "t1"]
        assert eng.weight_update_world_size() == 5  # trainer + 2 servers x 2 shards
        for v in (3, 4):
            await eng.aupdate_weights(WeightUpdateMeta(type="nccl", state_dict=sd, version=v, master_port=29500,
                                                       group_name="g"))
    assert {b["tag"] for _, b in cluster.paths("/v1/weights")} == {"v2"}
    groups = sorted(cluster.paths("/v1/group"), key=lambda x: x[0])
    assert [b["first_rank"] for _, b in groups] == [1, 3] and {b["ranks"] for _, b in groups} == {5}
    assert groups[0][1]["store"] == "127.0.0.1:29500" and groups[0][1]["backend"] == "gloo"
    receives = cluster.paths("/v1/receive")
    assert len(receives) == 4 and receives[-1][1]["tag"] == "v4"
    assert receives[0][1]["tensors"] == [{"name": "a", "dtype": "bfloat16", "shape": [2, 3]},
                                         {"name": "b", "dtype": "float32", "shape": [4]}]


async def test_a_generation_spans_a_pause_and_later_tokens_carry_the_new_version() -> None:
    cluster = ToyCluster(1, step_s=0.01)
    server = cluster.servers["t0"]
    async with toy_engine(cluster) as eng:
        task = asyncio.create_task(eng.agenerate(ModelRequest([3], GenerationConfig(max_new_tokens=30))))
        await _until(lambda: server.produced >= 3, "3 tokens generated")
        await eng.pause()
        await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))
        eng.set_version(1)
        await eng.resume()
        resp = await asyncio.wait_for(task, 10)
    first, second = (b for _, b in cluster.paths("/v1/complete"))
    k = len(second["tokens"]) - 1  # tokens generated before the pause
    assert 3 <= k < 30 and second["tokens"] == [3, *resp.output_tokens[:k]] and second["budget"] == 30 - k
    assert first["ticket"] != second["ticket"]
    assert resp.output_tokens == [(3 + i + 1) % 50 for i in range(30)]  # the same as without the pause
    assert resp.output_versions == [0] * k + [1] * (30 - k) and resp.stop_reason == "length"


async def test_startup_error_names_the_protocol_and_how_to_start_it() -> None:
    cluster = ToyCluster(1)
    cluster.servers["t0"].alive = False
    with pytest.raises(EngineError, match=r"no Toy server became healthy .* Start them first \(`toy-server"):
        async with toy_engine(cluster, startup_timeout_s=0.1):
            pass


# ------------------------------------------------------------------------------------- every server down
def _waits(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " waits up to " in r.getMessage()]


async def test_a_weight_update_waits_for_the_only_server_to_come_back(caplog: pytest.LogCaptureFixture) -> None:
    """The trainer's order: pause (the dead server is marked down), update, resume. The server is
    restarted (fresh weights, v0) during the update: it gets the update before it serves."""
    cluster = ToyCluster(1)
    async with toy_engine(cluster, server_wait_timeout_s=5.0) as eng:
        cluster.servers["t0"].alive = False  # kill -9
        await eng.pause()
        update = asyncio.create_task(eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1)))
        await asyncio.sleep(0.3)
        assert not update.done()
        cluster.servers["t0"] = ToyServer()  # restarted from the original weights
        await asyncio.wait_for(update, 5)
        eng.set_version(1)
        await eng.resume()
        resp = await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=2)))
    assert cluster.servers["t0"].tag == "v1" and resp.output_versions == [1, 1]
    # loaded once, by the rejoin, before the server counted as up; the update then had nothing left to send
    assert cluster.paths("/v1/weights") == [("t0", {"dir": "/ckpt/1", "tag": "v1"})]
    (line,) = _waits(caplog)  # one line per wait, naming the server and why it is down
    assert "update_weights_from_disk waits up to 5 s" in line and "http://t0:4000 down for" in line
    assert "connection refused" in line


async def test_the_same_checkpoint_path_sent_again_is_loaded_again() -> None:
    """A directory rewritten in place (same path, no version) is a new update, not a duplicate."""
    cluster = ToyCluster(2)
    async with toy_engine(cluster) as eng:
        for _ in range(2):
            await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/latest"))
    assert sorted(h for h, _ in cluster.paths("/v1/weights")) == ["t0", "t0", "t1", "t1"]


async def test_an_update_fails_naming_each_server_and_its_last_error_at_the_deadline() -> None:
    cluster = ToyCluster(2)
    async with toy_engine(cluster, server_wait_timeout_s=0.5) as eng:
        for server in cluster.servers.values():
            server.alive = False
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(EngineError) as info:
            await eng.aupdate_weights(WeightUpdateMeta(type="disk", path="/ckpt/1", version=1))
        assert 0.5 <= loop.time() - start < 2.0
    text = str(info.value)
    assert "update_weights_from_disk needs a healthy Toy server" in text and "server_wait_timeout_s=0.5" in text
    for address in ("http://t0:4000", "http://t1:4000"):
        assert re.search(rf"{address} down for 0\.[5-9] s \(last error: GET /ping on {address} failed: "
                         r"ConnectError", text), text
    assert "inference.server_wait_timeout_s" in text and "`toy-server --port N`" in text


async def test_generation_waits_for_a_server_then_fails_naming_it(caplog: pytest.LogCaptureFixture) -> None:
    cluster = ToyCluster(1)
    async with toy_engine(cluster, server_wait_timeout_s=0.8) as eng:
        cluster.servers["t0"].alive = False
        gens = [asyncio.create_task(eng.agenerate(ModelRequest([i + 1], GenerationConfig(max_new_tokens=2))))
                for i in range(3)]
        await asyncio.sleep(0.3)
        cluster.servers["t0"].alive = True
        assert [len((await g).output_tokens) for g in gens] == [2, 2, 2]
        assert len(_waits(caplog)) == 1  # three generations waited: one line
        cluster.servers["t0"].alive = False
        with pytest.raises(EngineError, match=r"generate needs a healthy Toy server, and none came back within "
                                              r"server_wait_timeout_s=0.8 s: http://t0:4000 down for"):
            await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=2)))


async def test_once_every_server_has_been_down_past_the_wait_new_calls_fail_at_once() -> None:
    """A dead fleet costs one wait, not one per call (a run would otherwise crawl through its
    rejection limit one server_wait_timeout_s at a time); a server seen again ends that."""
    cluster = ToyCluster(2)
    async with toy_engine(cluster, server_wait_timeout_s=0.6) as eng:
        loop = asyncio.get_running_loop()
        for server in cluster.servers.values():
            server.alive = False
        start = loop.time()
        with pytest.raises(EngineError, match="none came back"):
            await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=2)))
        assert loop.time() - start >= 0.5
        start = loop.time()
        for i in range(3):
            with pytest.raises(EngineError, match=r"server_wait_timeout_s=0.6 s: http://t0:4000 down for"):
                await eng.agenerate(ModelRequest([i + 1], GenerationConfig(max_new_tokens=2)))
        assert loop.time() - start < 0.3
        cluster.servers["t1"].alive = True
        await asyncio.sleep(0.5)  # a probe sees it
        resp = await eng.agenerate(ModelRequest([1], GenerationConfig(max_new_tokens=2)))
    assert len(resp.output_tokens) == 2


# ------------------------------------------------------------------------------------- loopback
def toy_asgi_app(server: ToyServer) -> Any:
    """The toy server as a bare ASGI app, for uvicorn on a loopback port."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        raw = b""
        while True:
            msg = await receive()
            raw += msg.get("body", b"")
            if not msg.get("more_body"):
                break
        status, answer = await server.handle(scope["method"], scope["path"], json.loads(raw) if raw else None)
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": json.dumps(answer).encode()})

    return app


class OneCompletion:
    async def arun_episode(self, engine: Any, data: Any) -> Trajectory:
        resp = await engine.agenerate(ModelRequest([data % 40 + 1], GenerationConfig(max_new_tokens=6)))
        assert resp.output_len == 6 and resp.stop_reason == "length"
        return Trajectory.from_response(resp, reward=1.0)


@pytest.mark.integration
async def test_two_loopback_toy_servers_one_killed_mid_run_loses_no_episode() -> None:
    from _sglang_helpers import ServerThread

    servers = [ServerThread(toy_asgi_app(ToyServer(step_s=0.005))) for _ in range(2)]
    for s in servers:
        await asyncio.to_thread(s.start)
    n = 20
    try:
        async with RemoteEngine([s.address for s in servers], protocol=ToyProtocol(), config=FAST,
                                rollout=RolloutConfig(max_concurrent=6, max_staleness=100)) as eng:
            for i in range(n):
                eng.submit(i, OneCompletion())
            await _until(lambda: eng.servers[0].outstanding > 0, "a request in flight on server 0")
            await asyncio.to_thread(servers[0].stop, force=True)
            trajs = await eng.wait(n, timeout=60)
            stats = Rollout.of(eng).stats()
    finally:
        await asyncio.to_thread(servers[1].stop)
    assert len(trajs) == n and stats["accepted"] == n and stats["rejected"] == 0


async def test_requests_spread_over_small_http_clients_within_the_connection_limit() -> None:
    """One httpx pool's bookkeeping grows with its connections, so the pool's requests go through
    clients of a few connections each: the least loaded one for its size takes the next request,
    no client is sent more than its size while another has room, and the sizes add up to
    max_connections. A custom transport means one client."""
    from agentflow.engines.remote._http import ClientShards

    release, all_in = asyncio.Event(), asyncio.Event()
    in_flight: Counter[int] = Counter()
    sizes: list[int] = []

    def make(limits: httpx.Limits, ssl_context: Any) -> httpx.AsyncClient:
        k = len(sizes)
        sizes.append(limits.max_connections or 0)

        async def handler(request: httpx.Request) -> httpx.Response:
            in_flight[k] += 1
            if in_flight.total() == 10:
                all_in.set()
            await release.wait()
            return httpx.Response(200, json={"client": k})

        return httpx.AsyncClient(transport=httpx.MockTransport(handler), limits=limits, verify=ssl_context)

    shards = ClientShards(make, max_connections=10, per_client=4)
    calls = [asyncio.ensure_future(shards.request("POST", "http://server/generate", json={})) for _ in range(10)]
    await asyncio.wait_for(all_in.wait(), 10)
    assert sizes == [4, 4, 2] and in_flight == {0: 4, 1: 4, 2: 2}
    release.set()
    answers = [(await c).json()["client"] for c in calls]
    assert Counter(answers) == {0: 4, 1: 4, 2: 2}
    await shards.aclose()
    single = ClientShards(make, max_connections=10, per_client=4, single=True)
    assert (await single.request("GET", "http://server/health")).status_code == 200
    assert sizes[-1] == 10
    await single.aclose()


async def _lazy_closing_server(idle_limit_s: float) -> tuple[asyncio.Server, str]:
    """A keep-alive HTTP/1.1 server that closes a connection idle for longer than ``idle_limit_s``
    only when the next request arrives on it: the race a uvicorn server's keep-alive timeout
    leaves when a request crosses the server's close."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        last = asyncio.get_running_loop().time()
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"content-length: *(\d+)", head, re.I)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if asyncio.get_running_loop().time() - last > idle_limit_s:
                    return  # closed without an answer
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-type: application/json\r\n\r\n{}")
                await writer.drain()
                last = asyncio.get_running_loop().time()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


async def test_idle_connections_expire_before_the_server_closes_them() -> None:
    """uvicorn-based servers (SGLang, vLLM, agentflow serve) close a connection idle for 5 s, httpx's
    own default expiry: a request sent as the server closes fails and would mark the server down.
    The pool's clients drop idle connections first, so a request after a pause opens a fresh one."""
    from agentflow.engines.remote._http import KEEPALIVE_S, ClientShards

    assert KEEPALIVE_S < 5  # below uvicorn's default keep-alive timeout
    server, url = await _lazy_closing_server(idle_limit_s=0.3)

    def make(limits: httpx.Limits, ssl_context: Any) -> httpx.AsyncClient:
        return httpx.AsyncClient(limits=limits, verify=ssl_context)

    try:
        for keepalive_s, survives in ((0.15, True), (5.0, False)):  # ours, then httpx's default
            shards = ClientShards(make, max_connections=4, keepalive_s=keepalive_s)
            assert (await shards.request("POST", f"{url}/generate", json={})).status_code == 200
            await asyncio.sleep(0.5)  # idle past the server's limit
            if survives:
                assert (await shards.request("POST", f"{url}/generate", json={})).status_code == 200
            else:
                with pytest.raises(httpx.TransportError):
                    await shards.request("POST", f"{url}/generate", json={})
            await shards.aclose()
    finally:
        server.close()
        await server.wait_closed()
