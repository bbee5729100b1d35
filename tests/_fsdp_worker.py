"""Helpers shared by the FSDP engine tests, and the script they launch in subprocesses.

``torchrun --nproc_per_node 2 tests/_fsdp_worker.py dist OUT.json`` runs the world-size-2 checks
and rank 0 writes their results to ``OUT.json`` (tests/test_fsdp_distributed.py asserts them).
``python tests/_fsdp_worker.py receive PORT SPECS.json OUT.pt [MODE]`` plays an inference server
in a weight-update group (rank 1 of 2, gloo): it joins, receives the tensors listed in SPECS.json
and saves them (MODE ``join-only``: joins, then exits without receiving).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import torch

from agentflow import MicroBatchSpec, SaveLoadMeta, Trajectory, WeightUpdateMeta
from agentflow.algo import AlgoConfig, PPOConfig, PPOLoss, compute_advantages, pad_trajectories, sft_loss, token_count

LR = 1e-3


def make_trajs(
    seed: int, lens: list[int], n_prompt: int = 3, group_size: int = 2, shared_prompt: bool = False,
    system: int = 0,
) -> list[Trajectory]:
    """Random trajectories (byte tokens) with fake behaviour log-probs and rewards, in groups (whose
    members start with the same ``n_prompt`` tokens if ``shared_prompt``; every prompt starts with
    the same ``system`` tokens, as under one system prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    prompt: list[int] = []
    head = torch.randint(0, 256, (system,), generator=g).tolist()
    for i, n in enumerate(lens):
        ids = torch.randint(0, 256, (n,), generator=g).tolist()
        if shared_prompt:
            prompt = ids[:n_prompt] if i % group_size == 0 else prompt
            ids[:n_prompt] = prompt
        ids[:system] = head
        k = n - n_prompt
        out.append(Trajectory(
            input_ids=ids, loss_mask=[0] * n_prompt + [1] * k,
            logprobs=[0.0] * n_prompt + (-5.6 + 0.1 * torch.randn(k, generator=g)).tolist(),
            versions=[-1] * n_prompt + [0] * k, reward=float(torch.rand((), generator=g)),
            group_id=f"g{i // group_size}",
        ))
    return out


def ppo_batch(trajs: list[Trajectory], prox: torch.Tensor) -> dict[str, torch.Tensor]:
    batch = pad_trajectories(trajs)
    batch["prox_logp"] = prox
    batch["advantages"] = compute_advantages(trajs, AlgoConfig(group_norm="grpo"))
    return batch


def reference_logprobs(
    model: torch.nn.Module, batch: Mapping[str, torch.Tensor], temperature: float = 1.0
) -> torch.Tensor:
    """Token-aligned log-probs from a plain padded forward (attention mask, no packing)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    lp = torch.log_softmax(logits[:, :-1].float() / temperature, -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return torch.cat([torch.zeros(lp.shape[0], 1), lp], 1) * batch["attention_mask"]


def reference_step(model: torch.nn.Module, batch: Mapping[str, torch.Tensor], loss_fn: Callable[..., Any],
                   opt: torch.optim.Optimizer, grad_clip: float = 1.0) -> float:
    """A plain single-process step: one padded forward, the loss over all loss tokens, AdamW."""
    model.train()
    opt.zero_grad()
    lp = reference_logprobs(model, batch) * batch["loss_mask"]
    flat = {k: v.flatten() for k, v in batch.items() if v.dim() == 2}
    out = loss_fn(lp.flatten(), flat)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return float(loss.detach())


def max_param_diff(sd: Mapping[str, torch.Tensor], model: torch.nn.Module) -> float:
    ref = model.state_dict()
    return max(float((sd[k].float() - ref[k].float()).abs().max()) for k in ref)


# ----------------------------------------------------------------------------- world size 2
def _engine(model: torch.nn.Module, tok: Any) -> Any:
    from agentflow.engines.fsdp import FSDPEngine, FSDPEngineConfig

    eng = FSDPEngine(FSDPEngineConfig(lr=LR, device="cpu", grad_clip=1.0), model=model, tokenizer=tok)
    eng.initialize()
    return eng


def _distributed_checks(out_path: str) -> None:
    import torch.distributed as dist

    from agentflow.testing import tiny_model_and_tokenizer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, ws = dist.get_rank(), dist.get_world_size()
    base, tok = tiny_model_and_tokenizer(seed=0)
    lens = [9, 31, 4, 17, 12, 25, 6, 20, 5]
    trajs = make_trajs(0, lens)
    mine = [t for i, t in enumerate(trajs) if i % ws == rank] if rank == 0 else [trajs[1]]  # unbalanced on purpose
    shares = [[t for i, t in enumerate(trajs) if i % ws == 0], [trajs[1]]]
    everything = shares[0] + shares[1]
    res: dict[str, Any] = {"world_size": ws}
    spec = MicroBatchSpec(n_mbs=2, max_tokens_per_mb=48)

    eng = _engine(copy.deepcopy(base), tok)
    # packed forward at world 2 vs a plain padded forward
    lp = eng.forward(mine, spec, temperature=0.7)
    with torch.no_grad():
        ref_lp = reference_logprobs(base, pad_trajectories(mine), temperature=0.7)
    res["forward_max_diff"] = float((lp - ref_lp).abs().max())
    # one PPO step == a plain step over the union of both ranks' data
    my_batch = ppo_batch(mine, eng.forward(mine, spec))
    ref_model = copy.deepcopy(base)
    with torch.no_grad():
        all_batch = ppo_batch(everything, reference_logprobs(ref_model, pad_trajectories(everything)))
    my_batch["advantages"] = _slice_adv(all_batch["advantages"], shares, rank, my_batch["advantages"].shape[1])
    loss_fn = PPOLoss(PPOConfig(eps_clip=0.2, behav_imp_weight_cap=5.0))
    stats = eng.train_batch(my_batch, spec, loss_fn, token_count)
    ref_loss = reference_step(ref_model, all_batch, loss_fn, torch.optim.AdamW(ref_model.parameters(), lr=LR))
    sd = eng.full_state_dict()
    res["step_loss"], res["ref_loss"] = stats["loss"], ref_loss
    res["n_mbs"] = stats["n_mbs"]
    if rank == 0:
        res["step_max_param_diff"] = max_param_diff(sd, ref_model)
    _save_load_checks(eng, tok, mine, spec, res)
    eng.destroy()
    # loss decreases on a fixed batch
    eng = _engine(copy.deepcopy(base), tok)
    res["sft_losses"] = [eng.train_batch(mine, spec, sft_loss, token_count)["loss"] for _ in range(4)]
    eng.destroy()
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(res, f)
    dist.barrier()
    dist.destroy_process_group()


def _slice_adv(adv: torch.Tensor, shares: list[list[Trajectory]], rank: int, width: int) -> torch.Tensor:
    start = sum(len(s) for s in shares[:rank])
    return adv[start : start + len(shares[rank]), :width]


def _save_load_checks(eng: Any, tok: Any, mine: list[Trajectory], spec: MicroBatchSpec, res: dict[str, Any]) -> None:
    import torch.distributed as dist

    from agentflow.testing import tiny_model_and_tokenizer

    path = [tempfile.mkdtemp(prefix="agentflow-ckpt-") if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(path, src=0)
    eng.save(SaveLoadMeta(path=path[0], tokenizer=tok))
    before = eng.forward(mine, spec)
    eng.train_batch(mine, spec, sft_loss, token_count)
    continued = eng.full_state_dict()
    other = _engine(tiny_model_and_tokenizer(seed=123)[0], tok)  # different weights until load
    other.load(SaveLoadMeta(path=path[0]))
    res["load_forward_max_diff"] = float((other.forward(mine, spec) - before).abs().max())
    other.train_batch(mine, spec, sft_loss, token_count)
    resumed = other.full_state_dict()
    if dist.get_rank() == 0:
        res["resume_max_param_diff"] = max(float((continued[k] - resumed[k]).abs().max()) for k in continued)
    mem = other.upload_weights(WeightUpdateMeta(type="mem"))
    res["mem_rank_has_state"] = mem.state_dict is not None
    other.destroy()


# ----------------------------------------------------------------------------- weight receiver
def _receive(port: int, specs_path: str, out_path: str, mode: str) -> None:
    from agentflow.engines._handoff import WeightSpec, init_weight_update_group, receive_tensors

    with open(specs_path) as f:
        specs = [WeightSpec(s["name"], s["dtype"], tuple(s["shape"])) for s in json.load(f)]
    pg = init_weight_update_group("127.0.0.1", port, 1, 2, "agentflow_test_update", "gloo", timeout_s=30)
    try:
        if mode != "join-only":
            torch.save(receive_tensors(pg, specs, "cpu", timeout_s=30), out_path)
    finally:
        # Leave the group before exiting: a gloo group still alive at interpreter exit can abort the
        # process ("terminate called without an active exception") after the work is done.
        torch.distributed.destroy_process_group(pg)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if sys.argv[1] == "dist":
        _distributed_checks(sys.argv[2])
    elif sys.argv[1] == "receive":
        _receive(int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5] if len(sys.argv) > 5 else "all")
    else:
        raise SystemExit(f"unknown mode {sys.argv[1]!r}; expected 'dist' or 'receive'")
    # The results are written and the groups destroyed: skip interpreter teardown, where gloo's
    # threads can abort the process (SIGABRT, "terminate called without an active exception").
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
