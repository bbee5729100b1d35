"""Rollout-training mismatch: the inference engine's log-probs against the trainer's, same tokens.

The inference engine reports ``log pi_behav`` for every token it sampled; before an update the
trainer recomputes ``log pi_prox`` for the same tokens with its own weights (the proximal forward
of decoupled PPO). For tokens the engine generated with *those same weights* (token version ==
the trainer's current version) the two differ only through numerics: precision (a bf16 engine
against an fp32 trainer), kernels, batch-dependent reductions, sampling-side logit processing. That
difference is what makes "on-policy" RL off-policy and is the usual first suspect when a run
collapses, so it is measured every step. With ``delta = log pi_prox - log pi_behav`` on the
selected tokens:

- ``mismatch/kl``: mean of ``exp(delta) - 1 - delta``, the k3 estimate of KL(pi_behav || pi_prox)
  from the engine's samples (unbiased, >= 0; Schulman 2020, "Approximating KL divergence");
- ``mismatch/mean_abs_diff`` and ``mismatch/max_abs_diff``: mean and max of ``|delta|``;
- ``mismatch/frac_over``: fraction of tokens with ``|delta| > threshold``;
- ``mismatch/tokens``: how many tokens were measured (0: no token of this version in the batch,
  the other values are then omitted);
- ``mismatch/current_version_only``: 1 when only current-version tokens were selected, 0 when the
  version was unknown and every loss token was used (then older tokens' policy change is mixed in);
- ``mismatch/all_*``: the same over every loss token, whatever its version (logged when the version
  is known). In an asynchronous run most tokens may be older than the trainer's weights; these then
  measure numerics *plus* staleness, i.e. the full off-policyness that the behaviour weight of
  decoupled PPO (and TIS / MIS) corrects.

Sums are kept so that shards (minibatches, ranks) combine exactly: :func:`mismatch_sums` and
:func:`accumulate_sums` per shard, then :func:`reduce_sums` across ranks, then
:func:`mismatch_stats`. Not here: the corrections that act on the same ratio (:mod:`agentflow.algo._loss`).
"""

from __future__ import annotations

import torch

__all__ = ["accumulate_sums", "mismatch_stats", "mismatch_sums", "reduce_sums"]

_N, _KL, _ABS, _OVER, _MAX = range(5)


def mismatch_sums(
    behav_logp: torch.Tensor, prox_logp: torch.Tensor, loss_mask: torch.Tensor, threshold: float,
    versions: torch.Tensor | None = None, version: int | None = None,
) -> torch.Tensor:
    """``[count, sum k3, sum |delta|, count over threshold, max |delta|]`` over the loss tokens
    (those of ``version`` only, when both ``versions`` and ``version`` are given)."""
    sel = loss_mask.bool()
    if versions is not None and version is not None:
        sel = sel & (versions == version)
    delta = (prox_logp.float() - behav_logp.float())[sel]
    out = torch.zeros(5, dtype=torch.float64)
    if delta.numel() == 0:
        return out
    absd = delta.abs()
    out[_N] = delta.numel()
    out[_KL] = (torch.expm1(delta) - delta).double().sum()
    out[_ABS] = absd.double().sum()
    out[_OVER] = (absd > threshold).sum()
    out[_MAX] = absd.max()
    return out


def accumulate_sums(total: torch.Tensor, sums: torch.Tensor) -> None:
    """Add one shard's :func:`mismatch_sums` (a minibatch, a micro-batch) into ``total``, in place:
    the totals add up, the max is the larger of the two."""
    total[:_MAX] += sums[:_MAX]
    total[_MAX] = torch.maximum(total[_MAX], sums[_MAX])


def reduce_sums(sums: torch.Tensor) -> torch.Tensor:
    """Combine :func:`mismatch_sums` across ranks (sum the totals, max the max); a no-op at world 1."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return sums
    totals, peak = sums[:_MAX].clone(), sums[_MAX:].clone()
    dist.all_reduce(totals)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    return torch.cat([totals, peak])


def mismatch_stats(sums: torch.Tensor, current_version_only: bool | None = None,
                   prefix: str = "mismatch/") -> dict[str, float]:
    """The logged metrics (module docstring) from combined sums; ``current_version_only`` adds its
    flag. ``prefix="mismatch/all_"`` names the every-token variant."""
    n = float(sums[_N])
    out = {f"{prefix}tokens": n}
    if current_version_only is not None:
        out["mismatch/current_version_only"] = float(current_version_only)
    if n == 0:
        return out
    out.update({
        f"{prefix}kl": float(sums[_KL]) / n,
        f"{prefix}mean_abs_diff": float(sums[_ABS]) / n,
        f"{prefix}max_abs_diff": float(sums[_MAX]),
        f"{prefix}frac_over": float(sums[_OVER]) / n,
    })
    return out
