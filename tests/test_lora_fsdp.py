"""FSDPEngine with a LoRA adapter (``train.lora``) at world size 1: the adapter's log-probs equal a
merged-weights forward, one step equals a plain PEFT model's step with AdamW, the reference is the
base model, and checkpoints resume exactly."""

from __future__ import annotations

import copy

import pytest
import torch
from _fsdp_worker import LR, make_trajs, ppo_batch, reference_logprobs, reference_step

from agentflow import ConfigError, MicroBatchSpec, SaveLoadMeta, WeightUpdateMeta
from agentflow.algo import PPOConfig, PPOLoss, pad_trajectories, sft_loss, token_count
from agentflow.engines._lora import LoRAConfig, adapter_config_dict, merge_adapter, read_adapter, write_adapter
from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig
from agentflow.errors import CheckpointError

pytest.importorskip("peft")

LENS = [9, 31, 4, 17, 12, 25]
SPEC = MicroBatchSpec(n_mbs=2, max_tokens_per_mb=40)
LORA = LoRAConfig(rank=4, alpha=8.0)


@pytest.fixture
def make_engine(tiny):
    engines = []

    def make(model=None, **overrides):
        cfg = FSDPEngineConfig(**{"lr": LR, "device": "cpu", "lora": LORA, **overrides})
        eng = FSDPEngine(cfg, model=model if model is not None else copy.deepcopy(tiny[0]), tokenizer=tiny[1])
        eng.initialize()
        engines.append(eng)
        return eng

    yield make
    for eng in reversed(engines):
        eng.destroy()


def plain_peft(base: torch.nn.Module, adapter: dict[str, torch.Tensor]):
    """A plain (unsharded, unpacked) PEFT model with the given adapter tensors."""
    from peft import get_peft_model, set_peft_model_state_dict

    model = get_peft_model(copy.deepcopy(base), LORA.peft())
    result = set_peft_model_state_dict(model, adapter)
    assert not result.unexpected_keys
    return model


def trained_adapter(eng, trajs, steps: int = 2) -> None:
    """Move the adapter away from its init (lora_B = 0) so it changes the outputs."""
    for _ in range(steps):
        eng.train_batch(trajs, SPEC, sft_loss, token_count)


def test_only_the_adapter_trains_and_is_in_the_optimizer(make_engine):
    eng = make_engine()
    trainable = [n for n, p in eng.model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    in_opt = {id(p) for g in eng.optimizer.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in eng.model.parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in eng.model.named_parameters() if not p.requires_grad}
    trained_adapter(eng, make_trajs(0, LENS), steps=1)
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in eng.model.named_parameters() if n in frozen)


def test_lora_logprobs_equal_merged_weights_forward(tiny, make_engine, tmp_path):
    eng = make_engine(lr=1e-2)
    trajs = make_trajs(1, LENS)
    trained_adapter(eng, trajs)
    write_adapter(tmp_path, eng.adapter_state_dict(), adapter_config_dict(LORA, None))
    merged = merge_adapter(copy.deepcopy(tiny[0]), tmp_path)
    with torch.no_grad():
        ref = reference_logprobs(merged, pad_trajectories(trajs), temperature=0.7)
        base = reference_logprobs(tiny[0], pad_trajectories(trajs), temperature=0.7)
    got = eng.forward(trajs, SPEC, temperature=0.7)
    assert float((got - base).abs().max()) > 1e-3  # the adapter matters
    torch.testing.assert_close(got, ref, atol=5e-6, rtol=0)


def test_shared_prompt_packing_and_checkpointing_keep_lora_exact(tiny, make_engine):
    trajs = make_trajs(4, LENS, shared_prompt=True)
    plain = make_engine(lr=1e-2, share_prefix=False)
    trained_adapter(plain, trajs)
    adapter = plain.adapter_state_dict()
    shared = make_engine(share_prefix=True, gradient_checkpointing=True)
    shared.load_adapter_tensors(adapter)
    got = shared.forward(trajs, SPEC)
    torch.testing.assert_close(got, plain.forward(trajs, SPEC), atol=2e-6, rtol=0)
    stats = shared.train_batch(trajs, SPEC, sft_loss, token_count)
    assert stats["n_rows"] < stats["n_tokens"]  # prompts were shared: the keyword reached the attention


def test_one_lora_step_equals_plain_peft_step_with_adamw(tiny, make_engine):
    trajs = make_trajs(3, LENS)
    eng = make_engine()
    ref = plain_peft(tiny[0], eng.adapter_state_dict())
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR)
    loss_fn = PPOLoss(PPOConfig(eps_clip=0.2, behav_imp_weight_cap=5.0))
    batch = ppo_batch(trajs, eng.forward(trajs, SPEC))
    for _ in range(2):  # the first step moves only lora_B (lora_A's gradient is 0 while B = 0)
        stats = eng.train_batch(batch, SPEC, loss_fn, token_count)
        ref_loss = reference_step(ref, batch, loss_fn, opt)
        assert stats["loss"] == pytest.approx(ref_loss, abs=1e-6)
    from peft import get_peft_model_state_dict

    want = get_peft_model_state_dict(ref)
    got = eng.adapter_state_dict()
    assert set(got) == set(want)
    assert max(float((got[k] - want[k]).abs().max()) for k in want) < 5e-5  # 5% of lr (see test_fsdp_engine)


def test_reference_is_the_base_model_and_training_continues(tiny, make_engine):
    eng = make_engine(lr=1e-2)
    trajs = make_trajs(5, LENS)
    trained_adapter(eng, trajs)
    with torch.no_grad():
        base = reference_logprobs(tiny[0], pad_trajectories(trajs))
    ref = eng.reference()
    torch.testing.assert_close(ref.forward(trajs, SPEC), base, atol=2e-6, rtol=0)
    assert all(p.requires_grad for n, p in eng.model.named_parameters() if ".lora_" in n)
    before = eng.forward(trajs, SPEC)
    trained_adapter(eng, trajs, steps=1)
    assert float((eng.forward(trajs, SPEC) - before).abs().max()) > 0


def test_upload_mem_and_disk_carry_the_adapter_only(make_engine, tmp_path):
    eng = make_engine()
    mem = eng.upload_weights(WeightUpdateMeta(type="mem", version=3))
    assert mem.adapter == "policy" and mem.lora_config["r"] == 4 and mem.version == 3
    assert mem.state_dict is not None and all(k.startswith("base_model.model.") for k in mem.state_dict)
    total = sum(p.numel() * 4 for p in eng.model.parameters())
    assert mem.nbytes == sum(t.numel() * 4 for t in mem.state_dict.values()) < total / 10
    disk = eng.upload_weights(WeightUpdateMeta(type="disk", path=str(tmp_path / "v1")))
    config, tensors = read_adapter(tmp_path / "v1")
    assert config["r"] == 4 and set(tensors) == set(mem.state_dict) and disk.nbytes == mem.nbytes
    with pytest.raises(ConfigError, match="weight_update=disk"):
        eng.upload_weights(WeightUpdateMeta(type="nccl"))


def test_save_load_resumes_the_next_step_bit_identically(tiny, make_engine, tmp_path):
    trajs = make_trajs(6, LENS)
    eng = make_engine(lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1))
    trained_adapter(eng, trajs)
    eng.save(SaveLoadMeta(path=str(tmp_path), tokenizer=tiny[1], base_model_path="tiny"))
    assert read_adapter(tmp_path)[0]["base_model_name_or_path"] == "tiny"
    eng.train_batch(trajs, SPEC, sft_loss, token_count)  # dropout draws from the saved RNG state
    continued = eng.adapter_state_dict()
    other = make_engine(lora=LoRAConfig(rank=4, alpha=8.0, dropout=0.1), seed=99)
    other.load(SaveLoadMeta(path=str(tmp_path)))
    other.train_batch(trajs, SPEC, sft_loss, token_count)
    resumed = other.adapter_state_dict()
    assert all(torch.equal(continued[k], resumed[k]) for k in continued)


def test_loading_an_adapter_of_another_rank_is_a_clear_error(make_engine, tmp_path):
    make_engine().save(SaveLoadMeta(path=str(tmp_path), with_optim=False))
    other = make_engine(lora=LoRAConfig(rank=8))
    with pytest.raises(CheckpointError, match=r"rank 4.*rank 8"):
        other.load(SaveLoadMeta(path=str(tmp_path), with_optim=False))


def test_missing_target_modules_are_a_clear_error(tiny):
    eng = FSDPEngine(FSDPEngineConfig(device="cpu", lora=LoRAConfig(target_modules=("q_proj", "c_attn"))),
                     model=copy.deepcopy(tiny[0]))
    with pytest.raises(ConfigError, match=r"\['c_attn'\] not found in LlamaForCausalLM.*q_proj"):
        eng.initialize()
    eng.destroy()


def test_lora_config_is_checked():
    with pytest.raises(ConfigError, match="rank must be an integer >= 1"):
        LoRAConfig(rank=0)
    with pytest.raises(ConfigError, match="dropout must be in"):
        LoRAConfig(dropout=1.5)


def test_inference_model_can_share_the_frozen_base(tiny, make_engine):
    eng = make_engine(lr=1e-2)
    inference = copy.deepcopy(tiny[0])
    freed = eng.share_base_with(inference)
    assert freed == sum(p.numel() * 4 for p in inference.parameters())  # every base weight is held once
    trajs = make_trajs(7, LENS)
    with torch.no_grad():
        before = reference_logprobs(inference, pad_trajectories(trajs))
    trained_adapter(eng, trajs)  # the adapter moves, the shared base does not
    with torch.no_grad():
        after = reference_logprobs(inference, pad_trajectories(trajs))
    assert torch.equal(before, after)
    torch.testing.assert_close(after, reference_logprobs(tiny[0], pad_trajectories(trajs)).detach(), atol=0, rtol=0)


def test_tied_embeddings_stay_out_of_the_adapter(tiny):
    from transformers import LlamaForCausalLM

    cfg = copy.deepcopy(tiny[0].config)
    cfg.tie_word_embeddings = True
    torch.manual_seed(0)
    eng = FSDPEngine(FSDPEngineConfig(device="cpu", lora=LORA), model=LlamaForCausalLM(cfg))
    eng.initialize()
    try:
        sd = eng.upload_weights(WeightUpdateMeta(type="mem")).state_dict
        assert sd and all(".lora_A." in k or ".lora_B." in k for k in sd)
    finally:
        eng.destroy()
