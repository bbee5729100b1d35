"""``torchrun --nproc_per_node 2 tests/_lora_worker.py OUT.json``: FSDPEngine with a LoRA adapter at
world size 2 (gloo, CPU). Rank 0 writes the results that tests/test_lora_distributed.py asserts.

Rank 0 trains on five sequences and rank 1 on one (unbalanced on purpose: rank 1 runs a padding
micro-batch); the reference is a plain PEFT model stepped on the union of both shares.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from typing import Any

import torch
import torch.distributed as dist
from _fsdp_worker import LR, _slice_adv, make_trajs, ppo_batch, reference_logprobs, reference_step

from agentflow import MicroBatchSpec, SaveLoadMeta
from agentflow.algo import PPOConfig, PPOLoss, pad_trajectories, sft_loss, token_count
from agentflow.engines._lora import LoRAConfig, adapter_config_dict, merge_adapter, write_adapter

LORA = LoRAConfig(rank=4, alpha=8.0)
SPEC = MicroBatchSpec(n_mbs=2, max_tokens_per_mb=48)


def _engine(model: torch.nn.Module, tok: Any, lr: float = LR) -> Any:
    from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig

    eng = FSDPEngine(FSDPEngineConfig(lr=lr, device="cpu", grad_clip=1.0, lora=LORA), model=model, tokenizer=tok)
    eng.initialize()
    return eng


def _plain_peft(base: torch.nn.Module, adapter: dict[str, torch.Tensor]) -> Any:
    from peft import get_peft_model, set_peft_model_state_dict

    model = get_peft_model(copy.deepcopy(base), LORA.peft())
    set_peft_model_state_dict(model, adapter)
    return model


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in b)


def _step_checks(base: torch.nn.Module, tok: Any, shares: list[list[Any]], res: dict[str, Any]) -> None:
    from peft import get_peft_model_state_dict

    rank = dist.get_rank()
    mine, everything = shares[rank], shares[0] + shares[1]
    eng = _engine(copy.deepcopy(base), tok)
    adapter = [eng.adapter_state_dict()]
    dist.broadcast_object_list(adapter, src=0)
    ref = _plain_peft(base, adapter[0])
    opt = torch.optim.AdamW([p for p in ref.parameters() if p.requires_grad], lr=LR)
    with torch.no_grad():
        all_batch = ppo_batch(everything, reference_logprobs(ref, pad_trajectories(everything)))
    my_batch = ppo_batch(mine, eng.forward(mine, SPEC))
    my_batch["advantages"] = _slice_adv(all_batch["advantages"], shares, rank, my_batch["advantages"].shape[1])
    loss_fn = PPOLoss(PPOConfig(eps_clip=0.2, behav_imp_weight_cap=5.0))
    res["step_losses"], res["ref_losses"] = [], []
    for _ in range(2):
        res["step_losses"].append(eng.train_batch(my_batch, SPEC, loss_fn, token_count)["loss"])
        res["ref_losses"].append(reference_step(ref, all_batch, loss_fn, opt))
    got = eng.adapter_state_dict()
    if rank == 0:
        res["step_max_adapter_diff"] = _max_diff(got, get_peft_model_state_dict(ref))
    eng.destroy()


def _forward_and_resume_checks(base: torch.nn.Module, tok: Any, mine: list[Any], res: dict[str, Any]) -> None:
    rank = dist.get_rank()
    eng = _engine(copy.deepcopy(base), tok, lr=1e-2)
    for _ in range(2):
        eng.train_batch(mine, SPEC, sft_loss, token_count)
    path = [tempfile.mkdtemp(prefix="agentflow-lora-") if rank == 0 else None]
    dist.broadcast_object_list(path, src=0)
    eng.save(SaveLoadMeta(path=path[0], tokenizer=tok))
    adapter = eng.adapter_state_dict()
    lp = eng.forward(mine, SPEC, temperature=0.7)
    merged_dir = os.path.join(path[0], "flat")
    if rank == 0:
        write_adapter(merged_dir, adapter, adapter_config_dict(LORA, None))
    dist.barrier()
    merged = merge_adapter(copy.deepcopy(base), merged_dir)
    with torch.no_grad():
        res[f"merged_forward_max_diff_rank{rank}"] = float(
            (lp - reference_logprobs(merged, pad_trajectories(mine), temperature=0.7)).abs().max())
        base_lp = reference_logprobs(base, pad_trajectories(mine))
    res[f"reference_max_diff_rank{rank}"] = float((eng.reference().forward(mine, SPEC) - base_lp).abs().max())
    eng.train_batch(mine, SPEC, sft_loss, token_count)
    continued = eng.adapter_state_dict()
    other = _engine(copy.deepcopy(base), tok, lr=1e-2)
    other.load(SaveLoadMeta(path=path[0]))
    other.train_batch(mine, SPEC, sft_loss, token_count)
    resumed = other.adapter_state_dict()
    if rank == 0:
        res["resume_max_adapter_diff"] = _max_diff(continued, resumed)
    other.destroy()
    eng.destroy()


def main(out_path: str) -> None:
    from agentflow.testing import tiny_model_and_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    base, tok = tiny_model_and_tokenizer(seed=0)
    trajs = make_trajs(0, [9, 31, 4, 17, 12, 25, 6, 20, 5])
    shares = [[t for i, t in enumerate(trajs) if i % ws == 0], [trajs[1]]]
    res: dict[str, Any] = {"world_size": ws}
    _step_checks(base, tok, shares, res)
    _forward_and_resume_checks(base, tok, shares[rank], res)
    gathered: list[Any] = [None] * ws
    dist.all_gather_object(gathered, res)
    if rank == 0:
        merged = {k: v for part in gathered for k, v in part.items() if k.endswith(("rank0", "rank1"))}
        with open(out_path, "w") as f:
            json.dump({**res, **merged}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.path.insert(0, os.path.dirname(__file__))
    main(sys.argv[1])
    # The results are written and the group is destroyed: skip interpreter teardown, where gloo's
    # threads can abort the process (SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
