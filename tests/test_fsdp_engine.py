"""FSDPEngine at world size 1, in process (gloo on CPU): steps, forward, checkpoints, weight hand-off."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _fsdp_worker import LR, make_trajs, max_param_diff, ppo_batch, reference_logprobs, reference_step

from agentflow import (
    ConfigError,
    EngineError,
    FinetuneSpec,
    MicroBatchSpec,
    SaveLoadMeta,
    TrainEngine,
    WeightUpdateMeta,
)
from agentflow.algo import PPOConfig, PPOLoss, pad_trajectories, sft_loss, token_count
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.engines.fsdp._config import lr_factor
from agentflow.engines.fsdp._dist import free_port

LENS = [9, 31, 4, 17, 12, 25]
SPEC = MicroBatchSpec(n_mbs=2, max_tokens_per_mb=40)


@pytest.fixture
def make_engine(tiny):
    engines = []

    def make(model=None, **overrides):
        cfg = FSDPEngineConfig(**{"lr": LR, "device": "cpu", **overrides})
        eng = FSDPEngine(cfg, model=model if model is not None else copy.deepcopy(tiny[0]), tokenizer=tiny[1])
        eng.initialize()
        engines.append(eng)
        return eng

    yield make
    for eng in reversed(engines):
        eng.destroy()


def test_packed_forward_matches_padded_forward_at_temperature(tiny, make_engine):
    eng = make_engine()
    trajs = make_trajs(1, LENS)
    with torch.no_grad():
        ref = reference_logprobs(tiny[0], pad_trajectories(trajs), temperature=0.6)
    got = eng.forward(trajs, SPEC, temperature=0.6)
    assert got.shape == ref.shape
    torch.testing.assert_close(got, ref, atol=2e-6, rtol=0)


def test_sdpa_fallback_forward_matches_too(tiny, make_engine):
    eng = make_engine(attn_impl="sdpa")
    trajs = make_trajs(2, [6, 11, 3])
    with torch.no_grad():
        ref = reference_logprobs(tiny[0], pad_trajectories(trajs))
    torch.testing.assert_close(eng.forward(trajs, MicroBatchSpec()), ref, atol=2e-6, rtol=0)


def test_loss_decreases_on_fixed_batch(make_engine):
    eng = make_engine(lr=1e-2)
    trajs = make_trajs(0, LENS)
    losses = [eng.train_batch(trajs, SPEC, sft_loss, token_count)["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.3, losses


def test_one_step_equals_plain_torch_step(tiny, make_engine):
    trajs = make_trajs(3, LENS)
    eng = make_engine()
    batch = ppo_batch(trajs, eng.forward(trajs, SPEC))
    loss_fn = PPOLoss(PPOConfig(eps_clip=0.2, behav_imp_weight_cap=5.0))
    stats = eng.train_batch(batch, SPEC, loss_fn, token_count)
    ref = copy.deepcopy(tiny[0])
    ref_loss = reference_step(ref, batch, loss_fn, torch.optim.AdamW(ref.parameters(), lr=LR))
    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert stats["n_mbs"] >= 2 and stats["skipped"] == 0.0
    assert {"clip_frac", "behav_imp_weight", "entropy", "grad_norm"} <= set(stats)
    # tolerance: 5% of lr on the first AdamW step (see test_fsdp_distributed)
    assert max_param_diff(eng.full_state_dict(), ref) < 5e-5


@pytest.mark.parametrize("spec", [SPEC, MicroBatchSpec(max_tokens_per_mb=30)])
def test_shared_prompts_give_the_same_logprobs_and_step(tiny, make_engine, spec):
    """Samples of one prompt share its rows (fewer tokens through the model), exactly: the same
    log-probs, loss and updated weights as a plain step on the unshared sequences. A 30-token
    budget cuts a group of three into several units."""
    trajs = make_trajs(5, [14, 21, 12, 11, 30, 16], n_prompt=10, group_size=3, shared_prompt=True)
    stats = _step_matches_unshared_reference(tiny, make_engine(), trajs, spec)
    assert stats["n_tokens"] == sum(len(t) for t in trajs)
    rows = 14 + 21 + 12 - 20 + 11 + 30 + 16 - 20
    assert stats["n_rows"] == rows if spec is SPEC else rows < stats["n_rows"] < stats["n_tokens"]


def _step_matches_unshared_reference(tiny, eng, trajs, spec) -> dict[str, float]:
    """``eng``'s proximal forward and PPO step on ``trajs`` give the log-probs, loss and updated
    weights of a plain padded step on the model alone; returns the step's statistics."""
    prox = eng.forward(trajs, spec)
    with torch.no_grad():
        torch.testing.assert_close(prox, reference_logprobs(tiny[0], pad_trajectories(trajs)), atol=2e-6, rtol=0)
    batch = ppo_batch(trajs, prox)
    loss_fn = PPOLoss(PPOConfig(eps_clip=0.2, behav_imp_weight_cap=5.0))
    stats = eng.train_batch(batch, spec, loss_fn, token_count)
    ref = copy.deepcopy(tiny[0])
    ref_loss = reference_step(ref, batch, loss_fn, torch.optim.AdamW(ref.parameters(), lr=LR))
    assert stats["loss"] == pytest.approx(ref_loss, abs=1e-6)
    assert max_param_diff(eng.full_state_dict(), ref) < 5e-5
    return stats


@pytest.mark.parametrize("spec", [MicroBatchSpec(), SPEC])
def test_prompts_with_a_common_beginning_share_it_exactly(tiny, make_engine, spec):
    """Prompts that begin alike (one 10-token system prompt before each group's own 4 tokens) lay
    the common beginning out once per micro-batch, the rest of each prompt after it: the same
    log-probs, loss and updated weights as a plain step on the unshared sequences."""
    lens = [18, 25, 16, 15, 34, 20, 19, 17, 22]
    trajs = make_trajs(8, lens, n_prompt=14, group_size=3, shared_prompt=True, system=10)
    stats = _step_matches_unshared_reference(tiny, make_engine(), trajs, spec)
    within_groups = sum(lens) - 3 * 2 * 14  # each group's prompt once
    if spec is SPEC:  # groups cut to fit 40 tokens: fewer rows than all tokens, more than one micro-batch
        assert stats["n_mbs"] >= 2 and stats["n_rows"] < sum(lens)
    else:  # one micro-batch: the system prompt once for the three groups
        assert stats["n_rows"] == within_groups - 2 * 10
    assert make_engine(share_prefix=False).train_batch(trajs, spec, sft_loss, token_count)["n_rows"] == sum(lens)


def test_shared_prompts_under_bf16_mixed_precision_on_cpu(tiny, make_engine):
    """FSDP2's mixed-precision input cast rebuilds dataclasses in a forward's keywords; the shared
    prompt layout must reach the attention as itself (it marks it used), in bf16 on CPU too."""
    trajs = make_trajs(5, [14, 21, 12, 11, 30, 16], n_prompt=10, group_size=3, shared_prompt=True)
    eng = make_engine(mixed_precision=True)
    with torch.no_grad():
        ref = reference_logprobs(tiny[0], pad_trajectories(trajs))
    torch.testing.assert_close(eng.forward(trajs, SPEC), ref, atol=5e-2, rtol=0)  # bf16 compute
    losses = [eng.train_batch(trajs, SPEC, sft_loss, token_count) for _ in range(4)]
    assert losses[0]["n_rows"] < losses[0]["n_tokens"]  # the prompts were shared
    assert losses[-1]["loss"] < losses[0]["loss"], losses
    assert all(p.dtype == torch.float32 for p in eng.model.parameters())  # fp32 master weights


def test_entropy_bonus_raises_entropy(make_engine):
    """With zero advantages the only gradient is the entropy bonus's: one step raises the entropy."""
    trajs = make_trajs(6, LENS)
    eng = make_engine(lr=1e-3)
    batch = ppo_batch(trajs, eng.forward(trajs, SPEC))
    batch["advantages"] = torch.zeros_like(batch["advantages"])
    loss_fn = PPOLoss(PPOConfig(entropy_coef=1.0))
    before = eng.train_batch(batch, SPEC, loss_fn, token_count)
    after = eng.eval_batch(batch, SPEC, PPOLoss(PPOConfig(entropy_coef=1.0)), token_count)
    assert before["grad_norm"] > 0
    assert after < before["loss"] - 1e-3  # loss = -mean entropy here: it went down, entropy up


def test_share_prefix_off_runs_every_token(make_engine):
    trajs = make_trajs(5, [14, 21, 12], n_prompt=10, group_size=3, shared_prompt=True)
    eng = make_engine(share_prefix=False)
    stats = eng.train_batch(ppo_batch(trajs, eng.forward(trajs, SPEC)), SPEC, sft_loss, token_count)
    assert stats["n_rows"] == stats["n_tokens"] == 47


def test_non_finite_gradient_skips_the_step(make_engine):
    eng = make_engine()
    before = eng.full_state_dict()
    stats = eng.train_batch(make_trajs(4, [8, 9]), SPEC, lambda lp, mb: lp.sum() * float("nan"), token_count)
    assert stats["skipped"] == 1.0 and not math.isfinite(stats["grad_norm"])
    after = eng.full_state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_batch_without_loss_tokens_fails_loud(make_engine):
    eng = make_engine()
    batch = pad_trajectories(make_trajs(5, [6]))
    batch["loss_mask"].zero_()
    with pytest.raises(EngineError, match="loss weight"):
        eng.train_batch(batch, SPEC, sft_loss, token_count)


def test_eval_batch_matches_reference_loss(tiny, make_engine):
    eng = make_engine()
    trajs = make_trajs(6, LENS)
    batch = pad_trajectories(trajs)
    with torch.no_grad():
        lp = reference_logprobs(tiny[0], batch) * batch["loss_mask"]
        ref = -(lp.sum() / batch["loss_mask"].sum()).item()
    assert eng.eval_batch(trajs, SPEC, sft_loss, token_count) == pytest.approx(ref, abs=1e-5)


def test_save_load_gives_identical_logits_and_exact_resume(tmp_path, tiny, make_engine):
    from transformers import AutoModelForCausalLM

    trajs = make_trajs(7, LENS)
    eng = make_engine(lr_schedule="cosine", warmup_steps=1, total_steps=5)
    eng.train_batch(trajs, SPEC, sft_loss, token_count)
    eng.step_lr_scheduler()
    eng.save(SaveLoadMeta(path=str(tmp_path / "ckpt"), tokenizer=tiny[1]))
    before = eng.forward(trajs, SPEC)
    eng.train_batch(trajs, SPEC, sft_loss, token_count)
    continued = eng.full_state_dict()

    from agentflow.testing import tiny_model_and_tokenizer

    other = make_engine(model=tiny_model_and_tokenizer(seed=99)[0], lr_schedule="cosine", warmup_steps=1, total_steps=5)
    other.load(SaveLoadMeta(path=str(tmp_path / "ckpt")))
    assert torch.equal(other.forward(trajs, SPEC), before)
    stats = other.train_batch(trajs, SPEC, sft_loss, token_count)
    assert stats["lr"] == pytest.approx(LR * lr_factor(1, "cosine", 1, 5, 0.0))
    resumed = other.full_state_dict()
    assert all(torch.equal(continued[k], resumed[k]) for k in continued)
    # the HF side: a plain from_pretrained gives the saved model (and hence SGLang can load it)
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"))
    with torch.no_grad():
        torch.testing.assert_close(reference_logprobs(hf, pad_trajectories(trajs)), before, atol=2e-6, rtol=0)
    assert (tmp_path / "ckpt" / "tokenizer.json").exists()


def test_tied_embeddings_save_without_duplicate(tmp_path, tiny, make_engine):
    from safetensors import safe_open
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(tiny[0].config)
    cfg.tie_word_embeddings = True
    model = LlamaForCausalLM(cfg)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    eng = make_engine(model=model)
    eng.train_batch(make_trajs(8, [10, 12]), SPEC, sft_loss, token_count)
    eng.upload_weights(WeightUpdateMeta(type="disk", path=str(tmp_path / "w")))
    with safe_open(str(tmp_path / "w" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    eng.load(SaveLoadMeta(path=str(tmp_path / "w"), with_optim=False))


def test_mem_upload_returns_hf_state_dict(tiny, make_engine):
    from transformers import LlamaForCausalLM

    eng = make_engine(weight_update_dtype="bfloat16")
    eng.train_batch(make_trajs(9, [10, 12]), SPEC, sft_loss, token_count)
    meta = eng.upload_weights(WeightUpdateMeta(type="mem", version=1))
    assert meta.version == 1 and meta.state_dict is not None
    assert set(meta.state_dict) == set(tiny[0].state_dict())
    assert all(v.dtype == torch.bfloat16 and v.device.type == "cpu" for v in meta.state_dict.values())
    fresh = LlamaForCausalLM(tiny[0].config)
    fresh.load_state_dict(meta.state_dict)  # strict: every HF name present


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_a_disk_snapshot_writes_the_weights_of_its_moment_not_later_ones(tmp_path, tiny, make_engine, dtype):
    """The copy is taken at the call: the steps trained before ``write()`` runs (the trainer goes
    on while a thread writes) must not reach the files, also where the gathered tensors would
    otherwise be the parameters themselves (one rank, no dtype cast)."""
    from agentflow.engines._handoff import read_hf_state_dict

    eng = make_engine(weight_update_dtype=dtype)
    eng.train_batch(make_trajs(3, [10, 12]), SPEC, sft_loss, token_count)
    want = {k: v.clone() for k, v in eng.full_state_dict(torch.bfloat16 if dtype else None).items()}
    meta, write = eng.snapshot_weights(WeightUpdateMeta(type="disk", path=str(tmp_path / "w"), version=1))
    assert not (tmp_path / "w").exists()  # nothing written yet
    assert meta.version == 1 and meta.nbytes == sum(s.nbytes for s in eng.weight_specs())
    eng.train_batch(make_trajs(4, [10, 12]), SPEC, sft_loss, token_count)  # moves every parameter
    assert any(not torch.equal(v, want[k].to(v.dtype)) for k, v in eng.full_state_dict().items())
    write()
    got = read_hf_state_dict(tmp_path / "w")
    assert set(got) == set(want) and all(torch.equal(got[k], want[k]) for k in want)
    assert (tmp_path / "w" / "config.json").exists() and (tmp_path / "w" / "tokenizer.json").exists()


def test_a_snapshot_of_anything_but_full_disk_weights_uploads_at_once(tmp_path, make_engine):
    eng = make_engine()
    meta, write = eng.snapshot_weights(WeightUpdateMeta(type="mem", version=2))
    assert meta.state_dict is not None  # the default: upload_weights, then nothing left to write
    write()


def _start_receiver(tmp_path: Path, port: int, specs, mode: str = "all") -> subprocess.Popen:
    (tmp_path / "specs.json").write_text(json.dumps([{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
                                                     for s in specs]))
    worker = Path(__file__).with_name("_fsdp_worker.py")
    return subprocess.Popen([sys.executable, str(worker), "receive", str(port), str(tmp_path / "specs.json"),
                             str(tmp_path / "got.pt"), mode])


@pytest.mark.integration
def test_broadcast_upload_reaches_a_receiver_in_spec_order(tmp_path, make_engine):
    eng = make_engine(weight_update_dtype="bfloat16", weight_bucket_mb=1)
    specs = eng.weight_specs()
    assert [s.name for s in specs] == list(eng.model.state_dict())
    port = free_port()
    meta = WeightUpdateMeta(type="nccl", master_port=port, group_name="agentflow_test_update", timeout_s=60)
    receiver = _start_receiver(tmp_path, port, specs)
    try:
        eng.join_weight_update_group(meta, world_size=2)
        assert eng.upload_weights(meta).nbytes == sum(s.nbytes for s in specs)  # bytes moved, for metrics
        assert receiver.wait(timeout=60) == 0
    finally:
        receiver.kill()
    got = torch.load(tmp_path / "got.pt")
    sent = eng.full_state_dict(torch.bfloat16)
    assert list(got) == [s.name for s in specs]
    assert all(torch.equal(got[k], sent[k]) for k in got)


def test_weight_group_join_times_out_loudly(make_engine):
    eng = make_engine()
    meta = WeightUpdateMeta(type="nccl", master_port=free_port(), group_name="agentflow_lonely", timeout_s=1.5)
    with pytest.raises(EngineError, match="did not form"):
        eng.join_weight_update_group(meta, world_size=2)
    with pytest.raises(EngineError, match="join_weight_update_group"):
        eng.upload_weights(meta)


def test_config_validation_and_schedules():
    with pytest.raises(ConfigError) as e:
        FSDPEngineConfig(lr=-1.0, betas=(0.9, 1.5), lr_schedule="step", warmup_steps=-1)  # type: ignore[arg-type]
    assert len(e.value.problems) == 4
    assert lr_factor(0, "linear", 2, 10, 0.0) == 0.5
    assert lr_factor(2, "linear", 2, 10, 0.0) == 1.0
    assert lr_factor(10, "linear", 2, 10, 0.1) == pytest.approx(0.1)
    assert lr_factor(6, "cosine", 2, 10, 0.0) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="FinetuneSpec"):
        lr_factor(3, "cosine", 0, None, 0.0)


def test_schedule_length_from_finetune_spec(tiny):
    eng = FSDPEngine(FSDPEngineConfig(lr=1.0, device="cpu", lr_schedule="linear"), model=copy.deepcopy(tiny[0]))
    eng.initialize(ft_spec=FinetuneSpec(total_train_epochs=1, dataset_size=8, train_batch_size=2))
    try:
        assert eng.lr_scheduler.lr_lambdas[0](2) == pytest.approx(0.5)  # 2 of 4 steps
    finally:
        eng.destroy()


# ----------------------------------------------------------------------------- GPU paths (skipped without CUDA)
@pytest.mark.gpu
def test_varlen_attention_matches_per_segment_sdpa_on_cuda():
    from agentflow.engines.fsdp._attention import _per_segment, packed_attention

    torch.manual_seed(0)
    lens = [37, 130, 5, 300, 64]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device="cuda")
    q = torch.randn(1, 4, sum(lens), 64, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 2, sum(lens), 64, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    module = torch.nn.Module().eval()
    got, _ = packed_attention(module, q, k, v, None, scaling=0.125, cu_seq_lens_q=cu, max_length_q=max(lens))
    ref = _per_segment(q.float(), k.float(), v.float(), cu, 0.125, 0.0)
    torch.testing.assert_close(got.float(), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_bf16_mixed_precision_training_on_cuda(tiny):
    eng = FSDPEngine(FSDPEngineConfig(lr=1e-2, device="cuda", mixed_precision=True), model=copy.deepcopy(tiny[0]))
    eng.initialize()
    try:
        trajs = make_trajs(0, LENS)
        with torch.no_grad():
            ref = reference_logprobs(tiny[0], pad_trajectories(trajs))
        torch.testing.assert_close(eng.forward(trajs, SPEC), ref, atol=5e-2, rtol=0)  # bf16 compute
        losses = [eng.train_batch(trajs, SPEC, sft_loss, token_count)["loss"] for _ in range(4)]
        assert losses[-1] < losses[0], losses
        assert all(p.dtype == torch.float32 for p in eng.model.parameters())  # fp32 master weights
    finally:
        eng.destroy()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_nccl_broadcast_upload_on_two_gpus(tmp_path, tiny):
    eng = FSDPEngine(FSDPEngineConfig(device="cuda", weight_update_dtype="bfloat16"), model=copy.deepcopy(tiny[0]))
    eng.initialize()
    port = free_port()
    specs = eng.weight_specs()
    (tmp_path / "specs.json").write_text(json.dumps([{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)}
                                                     for s in specs]))
    script = (
        "import json, sys, torch; torch.cuda.set_device(1)\n"
        "from agentflow.engines._handoff import WeightSpec, init_weight_update_group, receive_tensors\n"
        "specs = [WeightSpec(s['name'], s['dtype'], tuple(s['shape'])) for s in json.load(open(sys.argv[2]))]\n"
        "pg = init_weight_update_group('127.0.0.1', int(sys.argv[1]), 1, 2, 'agentflow_nccl_test', 'nccl', 60)\n"
        "got = receive_tensors(pg, specs, 'cuda:1', 60)\n"
        "torch.save({k: v.cpu() for k, v in got.items()}, sys.argv[3])\n"
    )
    receiver = subprocess.Popen([sys.executable, "-c", script, str(port), str(tmp_path / "specs.json"),
                                 str(tmp_path / "got.pt")])
    try:
        meta = WeightUpdateMeta(type="nccl", master_port=port, group_name="agentflow_nccl_test", timeout_s=60)
        eng.join_weight_update_group(meta, world_size=2)
        eng.upload_weights(meta)
        assert receiver.wait(timeout=120) == 0
        got, sent = torch.load(tmp_path / "got.pt"), eng.full_state_dict(torch.bfloat16)
        assert all(torch.equal(got[k], sent[k]) for k in got)
    finally:
        receiver.kill()
        eng.destroy()


class _Unprepared:
    """The same engine with the contract's default ``prepare`` (the batch as is): ppo_update then
    packs the padded batch for every pass."""

    def __init__(self, inner):
        self._inner = inner

    def prepare(self, input_, mb_spec):
        return TrainEngine.prepare(self, input_, mb_spec)

    def __getattr__(self, name):
        return getattr(self._inner, name)


@pytest.mark.parametrize("minibatches", [1, 2])
def test_a_ppo_step_on_one_packing_equals_the_padded_path(tiny, make_engine, minibatches):
    """ppo_update packs each minibatch once (proximal forward, KL reference and update share it):
    the same statistics and weights as packing the padded batch for every pass."""
    from agentflow.algo import AlgoConfig, ppo_update, token_advantages

    algo = AlgoConfig(ppo=PPOConfig(kl_coef=0.1))
    items = token_advantages(make_trajs(3, [9, 14, 11, 8, 12, 10], shared_prompt=True), algo)
    got, want = make_engine(), make_engine()
    ref = make_engine()
    s1 = ppo_update(got, algo, items, max_tokens_per_mb=40, minibatches=minibatches, ref_engine=ref)
    s2 = ppo_update(_Unprepared(want), algo, items, max_tokens_per_mb=40, minibatches=minibatches,
                    ref_engine=_Unprepared(ref))
    for key in ("loss", "grad_norm", "n_tokens", "n_rows"):
        assert s1[key] == pytest.approx(s2[key], rel=1e-5, abs=1e-7), key
    a, b = got.full_state_dict(), want.full_state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


class _CountingForwards(_Unprepared):
    """The same engine, counting its no-grad forward passes."""

    def __init__(self, inner):
        super().__init__(inner)
        self.forwards = 0

    def prepare(self, input_, mb_spec):
        return self._inner.prepare(input_, mb_spec)

    def forward(self, *args, **kwargs):
        self.forwards += 1
        return self._inner.forward(*args, **kwargs)


@pytest.mark.parametrize("minibatches", [1, 2])
def test_the_first_minibatch_takes_its_proximal_logprobs_from_its_own_update_forward(make_engine, minibatches):
    """Decoupled PPO without a separate proximal forward for the first minibatch: the same loss,
    statistics, mismatch metrics and weights as recomputing it, with one forward fewer per step."""
    import dataclasses

    from agentflow.algo import AlgoConfig, ppo_update, token_advantages

    trajs = make_trajs(5, [9, 14, 11, 8, 12, 10], shared_prompt=True)
    trajs = [dataclasses.replace(t, versions=[v + 1 if v >= 0 else v for v in t.versions]) if i % 2 else t
             for i, t in enumerate(trajs)]  # half of them generated one version before the trainer's weights
    algo = AlgoConfig(ppo=PPOConfig(eps_clip=0.1))
    items = token_advantages(trajs, algo)
    reused, recomputed = _CountingForwards(make_engine()), _CountingForwards(make_engine())
    s1 = ppo_update(reused, algo, items, max_tokens_per_mb=40, minibatches=minibatches, version=1)
    recompute = dataclasses.replace(algo, ppo=dataclasses.replace(algo.ppo, recompute_prox=True))
    s2 = ppo_update(recomputed, recompute, items, max_tokens_per_mb=40, minibatches=minibatches, version=1)
    assert (reused.forwards, recomputed.forwards) == (minibatches - 1, minibatches)
    assert s1.keys() == s2.keys()
    assert s1["mismatch/tokens"] > 0 and s1["mismatch/all_tokens"] > s1["mismatch/tokens"]
    for key in s1:
        assert s1[key] == pytest.approx(s2[key], rel=1e-4, abs=1e-6), key
    a, b = reused.full_state_dict(), recomputed.full_state_dict()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-6


def test_recompute_prox_must_be_a_bool():
    with pytest.raises(ConfigError, match=r"ppo\.recompute_prox must be true or false, got .yes."):
        PPOConfig(recompute_prox="yes")
