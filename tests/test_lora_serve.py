"""LoRA through ``agentflow serve`` (SGLang's protocol: ``/load_lora_adapter``,
``/unload_lora_adapter``, ``lora_path`` on ``/generate``) and RemoteSGLangEngine's adapter-only
updates: one request interrupted mid-generation carries version 0 then version 1."""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from test_lora_local import random_adapter

from agentflow import GenerationConfig, ModelRequest, WeightUpdateMeta
from agentflow.engines._lora import LoRAConfig, write_adapter
from agentflow.engines.local import LocalEngine, LocalEngineConfig
from agentflow.engines.serve.server import ServerConfig, build_app

pytest.importorskip("peft")

PROMPT = list(b"The quick brown fox")


def local_engine(model: Any, tok: Any, **cfg: Any) -> LocalEngine:
    return LocalEngine(copy.deepcopy(model), tok,
                       config=LocalEngineConfig(max_batch_size=8, max_seq_len=512, ignore_eos=True, **cfg))


@pytest.fixture
async def served(tiny, tmp_path) -> AsyncIterator[tuple[LocalEngine, httpx.AsyncClient]]:
    model, tok = tiny
    engine = local_engine(model, tok, max_lora_rank=8)
    async with engine:
        app = build_app(engine, model_path="tiny", tokenizer=tok,
                        config=ServerConfig(enable_lora=True, lora_dirs=(str(tmp_path),)), manage_engine=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            yield engine, c


def saved(tmp_path, name: str, adapter: tuple[dict, dict]) -> str:
    write_adapter(tmp_path / name, adapter[1], adapter[0])
    return str(tmp_path / name)


async def generate(client: httpx.AsyncClient, **body: Any) -> Any:
    r = await client.post("/generate", json={"sampling_params": {"max_new_tokens": 10, "temperature": 0}, **body})
    return r


async def test_load_generate_with_lora_path_and_unload(served, tiny, tmp_path):
    engine, client = served
    a, b = random_adapter(tiny[0], seed=1), random_adapter(tiny[0], seed=2)
    r = await client.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": saved(tmp_path, "a", a)})
    assert r.status_code == 200
    assert r.json() == {"success": True, "error_message": None, "loaded_adapters": {"a": str(tmp_path / "a")}}
    await client.post("/load_lora_adapter", json={"lora_name": "b", "lora_path": saved(tmp_path, "b", b)})
    alone = {k: (await generate(client, input_ids=PROMPT, lora_path=k)).json()["output_ids"] for k in ("a", "b")}
    base = (await generate(client, input_ids=PROMPT)).json()["output_ids"]
    assert len({tuple(alone["a"]), tuple(alone["b"]), tuple(base)}) == 3
    batch = (await generate(client, input_ids=[PROMPT] * 3, lora_path=["a", None, "b"])).json()
    assert [x["output_ids"] for x in batch] == [alone["a"], base, alone["b"]]  # one call, three adapters
    r = await client.post("/unload_lora_adapter", json={"lora_name": "a"})
    assert r.status_code == 200 and r.json()["loaded_adapters"] == {"b": str(tmp_path / "b")}
    assert engine.adapters.keys() == {"b"}


async def test_lora_errors_follow_sglang(served, tiny, tmp_path):
    _, client = served
    r = await generate(client, input_ids=PROMPT, lora_path="nope")
    assert r.status_code == 400
    assert r.json()["error"]["message"].startswith("The following requested LoRA adapters are not loaded: {'nope'}")
    big = saved(tmp_path, "big", random_adapter(tiny[0], seed=3, rank=16))
    r = await client.post("/load_lora_adapter", json={"lora_name": "big", "lora_path": big})
    assert r.status_code == 400 and r.json()["success"] is False
    assert "rank 16, above this engine's max LoRA rank 8" in r.json()["error_message"]
    r = await client.post("/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and "is not a LoRA adapter directory" in r.json()["error_message"]
    r = await client.post("/unload_lora_adapter", json={"lora_name": "x"})
    assert r.status_code == 400 and "not loaded" in r.json()["error_message"]


async def test_lora_routes_need_enable_lora(tiny, tmp_path):
    engine = local_engine(*tiny)
    async with engine:
        app = build_app(engine, model_path="tiny", tokenizer=tiny[1], manage_engine=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": str(tmp_path)})
    assert r.status_code == 400 and r.json()["error_message"].startswith("LoRA is not enabled")


def test_serve_flags_reach_the_engine_and_the_sglang_command():
    from agentflow.engines.serve._lora import apply_lora_flags, parse_lora_paths, sglang_lora_flags
    from agentflow.engines.serve.server import _parse_args

    args = _parse_args(["--enable-lora", "--max-lora-rank", "32", "--lora-target-modules", "q_proj", "v_proj",
                        "--max-loras-per-batch", "4", "--lora-paths", "a=/x", "/y",
                        '{"lora_name": "c", "lora_path": "/z", "pinned": true}'])
    engine = LocalEngine("unused")
    assert apply_lora_flags(engine, args) is True
    assert (engine.config.max_lora_rank, engine.config.max_loras) == (32, 4)
    assert engine.config.lora_target_modules == ("q_proj", "v_proj")
    assert parse_lora_paths(args.lora_paths) == [("a", "/x"), ("/y", "/y"), ("c", "/z")]
    flags = sglang_lora_flags(args)
    assert flags[:5] == ["--enable-lora", "--max-lora-rank", "32", "--max-loras-per-batch", "4"]
    assert flags[flags.index("--lora-target-modules") + 1 : flags.index("--lora-paths")] == ["q_proj", "v_proj"]


# ------------------------------------------------------------------------------- remote engine end to end
def _wait_tokens(engine: LocalEngine, n: int, timeout: float = 60.0) -> None:
    """(A worker thread.) Block until the served engine has generated ``n`` tokens."""
    end = time.monotonic() + timeout
    while engine.stats().get("tokens", 0) < n:
        if time.monotonic() > end:
            raise TimeoutError(f"the served engine did not reach {n} tokens in {timeout} s")
        time.sleep(0.005)


@pytest.mark.integration
async def test_adapter_update_through_serve_interrupts_one_request_with_versions_0_then_1(tiny, tmp_path):
    """The trainer's path: FSDPEngine (LoRA) writes adapter directories, RemoteSGLangEngine loads
    them on `agentflow serve` with /load_lora_adapter between pause and resume."""
    from _fsdp_worker import make_trajs
    from _sglang_helpers import ServerThread

    from agentflow.algo import sft_loss, token_count
    from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
    from agentflow.engines.remote import RemoteEngineConfig, RemoteSGLangEngine

    model, tok = tiny
    trainer = FSDPEngine(FSDPEngineConfig(lr=5e-2, device="cpu", lora=LoRAConfig(rank=4)),
                         model=copy.deepcopy(model), tokenizer=tok)
    trainer.initialize()
    served = local_engine(model, tok)
    app = build_app(served, model_path="tiny", tokenizer=tok,
                    config=ServerConfig(enable_lora=True, lora_dirs=(str(tmp_path),)))
    server = await asyncio.to_thread(ServerThread(app).start)
    try:
        for _ in range(2):
            trainer.train_batch(make_trajs(0, [9, 31, 17]), _spec(), sft_loss, token_count)
        meta0 = trainer.upload_weights(WeightUpdateMeta(type="disk", path=str(tmp_path / "v0"), version=0))
        remote = RemoteSGLangEngine([server.address], tok, config=RemoteEngineConfig(startup_timeout_s=30))
        async with remote:
            await remote.aupdate_weights(meta0)
            remote.set_version(0)
            long = ModelRequest(PROMPT, GenerationConfig(max_new_tokens=120, temperature=0.0))
            task = asyncio.create_task(remote.agenerate(long))
            await asyncio.to_thread(_wait_tokens, served, 15)
            await remote.pause()
            for _ in range(2):
                trainer.train_batch(make_trajs(0, [9, 31, 17]), _spec(), sft_loss, token_count)
            meta1 = trainer.upload_weights(WeightUpdateMeta(type="disk", path=str(tmp_path / "v1"), version=1))
            await remote.aupdate_weights(meta1)
            remote.set_version(1)
            await remote.resume()
            out = await task
            k = out.output_versions.index(1)
            assert 0 < k < len(out.output_tokens) == 120 and set(out.output_versions[:k]) == {0}
            assert set(out.output_versions[k:]) == {1}
            cont = await remote.agenerate(ModelRequest(PROMPT + out.output_tokens[:k],
                                                       GenerationConfig(max_new_tokens=8, temperature=0.0)))
            assert out.output_tokens[k : k + 8] == cont.output_tokens  # the tokens after the update: v1's
            assert app.state.server.lora.paths == {"policy-v1": str(tmp_path / "v1")}  # v0 unloaded
            assert meta1.adapter == "policy" and 0 < meta1.nbytes < 4 * sum(p.numel() for p in model.parameters()) / 5
    finally:
        await asyncio.to_thread(server.stop)
        trainer.destroy()


def _spec() -> Any:
    from agentflow import MicroBatchSpec

    return MicroBatchSpec()


@pytest.mark.integration
async def test_a_server_that_rejoins_gets_the_current_adapter_before_it_serves(tiny, tmp_path):
    """Two loopback `agentflow serve` servers behind one RemoteSGLangEngine. A server cut off during
    an adapter update (still holding the old adapter) and a server restarted with nothing loaded
    both rejoin with exactly the current adapter and version, before any request reaches them."""
    from _sglang_helpers import ServerThread

    from agentflow.engines.remote import RemoteEngineConfig, RemoteSGLangEngine

    model, tok = tiny

    def start(port: int = 0) -> tuple[Any, ServerThread]:
        app = build_app(local_engine(model, tok), model_path="tiny", tokenizer=tok,
                        config=ServerConfig(enable_lora=True, lora_dirs=(str(tmp_path),)))
        return app, ServerThread(app, port).start()

    def meta(version: int) -> WeightUpdateMeta:
        config, tensors = random_adapter(model, seed=version)
        return WeightUpdateMeta(type="disk", path=saved(tmp_path, f"v{version}", (config, tensors)),
                                version=version, adapter="policy", lora_config=config)

    async def on_b(path: str, body: Any = None) -> Any:
        async with httpx.AsyncClient(base_url=f"http://{b.address}") as c:
            r = await (c.get(path) if body is None else c.post(path, json=body))
            assert r.status_code == 200, r.text
            return r.json()

    async def greedy(server: ServerThread, lora: str) -> list[int]:
        async with httpx.AsyncClient(base_url=f"http://{server.address}") as c:
            r = await generate(c, input_ids=PROMPT, lora_path=lora)
            assert r.status_code == 200, r.text
            return r.json()["output_ids"]

    (app_a, a), (app_b, b) = await asyncio.to_thread(start), await asyncio.to_thread(start)
    cfg = RemoteEngineConfig(startup_timeout_s=30, probe_interval_s=0.05, backoff_initial_s=0.01)
    remote = RemoteSGLangEngine([a.address, b.address], tok, config=cfg)
    try:
        async with remote:
            await remote.aupdate_weights(meta(1))
            assert app_a.state.server.lora.paths.keys() == app_b.state.server.lora.paths.keys() == {"policy-v1"}

            # cut off (not restarted): it misses v2 and still holds v1 when it is healthy again
            remote.pool.mark_down(remote.servers[1], "cut off by the test")
            await remote.aupdate_weights(meta(2))
            await _until_up(remote, 1)
            assert app_b.state.server.lora.paths == {"policy-v2": str(tmp_path / "v2")}
            assert (await on_b("/get_model_info"))["weight_version"] == "2"

            # restarted: it comes back with no adapter at all, after v3 was loaded on the other one
            await asyncio.to_thread(b.stop, force=True)
            gconfig = GenerationConfig(max_new_tokens=4, temperature=0.0)
            for _ in range(2):  # round robin: one of them reaches the dead server, fails over to the live one
                await remote.agenerate(ModelRequest(PROMPT, gconfig))
            assert not remote.servers[1].up
            await remote.aupdate_weights(meta(3))
            app_b, b = await asyncio.to_thread(start, b.port)
            await _until_up(remote, 1)
            assert app_b.state.server.lora.paths == {"policy-v3": str(tmp_path / "v3")}
            assert (await on_b("/get_model_info"))["weight_version"] == "3"
            assert await greedy(b, "policy-v3") == await greedy(a, "policy-v3")
            outs = await asyncio.gather(*(remote.agenerate(ModelRequest(PROMPT, gconfig)) for _ in range(6)))
            assert all(o.output_versions == [3] * 4 for o in outs)
    finally:
        await asyncio.to_thread(a.stop)
        await asyncio.to_thread(b.stop)


async def _until_up(remote: Any, i: int, wait_s: float = 30.0) -> None:
    end = time.monotonic() + wait_s
    while not remote.servers[i].up:
        assert time.monotonic() < end, f"server {i} did not rejoin: {remote.servers[i].last_error}"
        await asyncio.sleep(0.02)


async def test_adapter_routes_need_the_admin_key_and_paths_come_from_lora_dirs(tiny, tmp_path):
    """With an admin key, a chat client's key cannot swap the adapter the trainer samples from; a
    runtime load reads only directories given with --lora-dir, under a plain name."""
    from agentflow.engines.serve._guard import ServeLimits

    model, tok = tiny
    adapters = tmp_path / "adapters"
    path = saved(adapters, "a", random_adapter(model, seed=1))
    engine = local_engine(model, tok, max_lora_rank=8)
    async with engine:
        app = build_app(engine, model_path="tiny", tokenizer=tok, manage_engine=False,
                        config=ServerConfig(enable_lora=True, lora_dirs=(str(adapters),)),
                        limits=ServeLimits(api_key="user", admin_api_key="admin"))
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            user, admin = {"Authorization": "Bearer user"}, {"Authorization": "Bearer admin"}
            for route, body in (("/load_lora_adapter", {"lora_name": "a", "lora_path": path}),
                                ("/unload_lora_adapter", {"lora_name": "a"})):
                assert (await c.post(route, json=body, headers=user)).status_code == 401
            ok = await c.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": path}, headers=admin)
            assert ok.status_code == 200, ok.text
            for name, where, why in (
                ("b", str(tmp_path / "elsewhere"), "outside the adapter directories"),
                ("c", str(adapters / ".." / ".."), "outside the adapter directories"),
                ("up/x\n\0y", path, "lora_name must be 1-128 characters"),
                ("x" * 20_000, path, "lora_name must be 1-128 characters"),
            ):
                r = await c.post("/load_lora_adapter", json={"lora_name": name, "lora_path": where}, headers=admin)
                assert r.status_code == 400 and why in r.json()["error_message"], r.text
                assert len(r.text) < 1000  # the refused name is not echoed whole
            assert (await c.post("/unload_lora_adapter", json={"lora_name": "a"}, headers=admin)).status_code == 200


async def test_without_lora_dir_no_adapter_is_loaded_at_run_time(tiny, tmp_path):
    model, tok = tiny
    path = saved(tmp_path, "a", random_adapter(model, seed=2))
    engine = local_engine(model, tok, max_lora_rank=8)
    async with engine:
        app = build_app(engine, model_path="tiny", tokenizer=tok, config=ServerConfig(enable_lora=True),
                        manage_engine=False)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
            r = await c.post("/load_lora_adapter", json={"lora_name": "a", "lora_path": path})
    assert r.status_code == 400 and "start agentflow serve with --lora-dir DIR" in r.json()["error_message"]
