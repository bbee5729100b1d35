"""Per-token log-probs of given labels without materialising full-vocabulary logits for the batch.

The engine replaces the model's ``lm_head`` by :class:`PassThroughHead` (same weight Parameter,
identity forward) before sharding, so the model's "logits" are its final hidden states; then
:func:`token_logprobs` projects only the positions it needs, in chunks, each chunk under
activation checkpointing: memory stays flat in the vocabulary size (measured:
+4.9 GiB vs +27.8 GiB at 16k tokens x 152k vocab). Under FSDP2 the head weight is the root
group's unsharded Parameter right after the root forward, and its gradient is reduce-scattered
normally.

Models that transform the logits after ``lm_head`` (final logit soft-capping, logit scales) keep
their head; then the full logits are returned and the same function gathers from them.

Not here: packing (:mod:`agentflow.engines.fsdp._packing`), the loss (:mod:`agentflow.algo._loss`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["PassThroughHead", "install_passthrough_head", "token_logprobs"]


class PassThroughHead(torch.nn.Linear):
    """An ``nn.Linear`` whose forward returns its input; its weight/bias are the real head's."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def install_passthrough_head(model: torch.nn.Module) -> bool:
    """Swap ``model``'s output embedding for a :class:`PassThroughHead` sharing its parameters.

    Returns False (and leaves the model alone) when the model post-processes logits, so the
    pass-through would change its output.
    """
    cfg = getattr(model, "config", None)
    if any(getattr(cfg, name, None) for name in ("final_logit_softcapping", "logit_scale", "output_multiplier")):
        return False
    head = model.get_output_embeddings()
    if type(head) is not torch.nn.Linear:
        return False
    new = PassThroughHead(head.in_features, head.out_features, bias=head.bias is not None, device="meta")
    new.weight = head.weight
    if head.bias is not None:
        new.bias = head.bias
    model.set_output_embeddings(new)
    return True


def _chunk_logprobs(
    hidden: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, labels: torch.Tensor,
    temperature: float, entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = (hidden if weight is None else F.linear(hidden, weight, bias)).float()
    if temperature != 1.0:
        logits = logits / temperature
    lse = logits.logsumexp(-1)
    lp = logits.gather(-1, labels[:, None])[:, 0] - lse
    with torch.set_grad_enabled(entropy_grad and torch.is_grad_enabled()):
        entropy = lse - (torch.softmax(logits, -1) * logits).sum(-1)
    return lp, entropy


def token_logprobs(
    hidden: torch.Tensor,
    labels: torch.Tensor,
    positions: torch.Tensor,
    length: int,
    head: torch.nn.Module | None,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    entropy_grad: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs (with grad) and entropies (detached unless ``entropy_grad``) of ``labels``,
    scattered to ``positions``.

    Args:
        hidden: ``[N, H]`` final hidden states (``head`` = the pass-through head) or ``[N, V]``
            logits (``head`` = None) at the positions *predicting* the labels (``positions - 1``;
            the engine selects them with the model's ``logits_to_keep``).
        labels: ``[N]`` the tokens at ``positions``.
        positions: ``[N]`` indices ``t >= 1`` in the packed row.
        length: the packed row's length ``T``.
        head: the :class:`PassThroughHead` whose weight projects hidden states, or None.
        temperature: divide logits by it (the sampling temperature of the behaviour policy).
        chunk_size: positions per chunk; more than one chunk runs under activation checkpointing.
        entropy_grad: keep the entropies differentiable (for an entropy bonus in the loss).

    Returns:
        ``(logprobs, entropy)``, both ``[T]`` float32, 0 off ``positions``.
    """
    weight = None if head is None else head.weight
    bias = None if head is None else head.bias
    n = positions.numel()
    if n <= chunk_size:
        lp, ent = _chunk_logprobs(hidden, weight, bias, labels, temperature, entropy_grad)
    else:
        parts = [
            checkpoint(_chunk_logprobs, hidden[i : i + chunk_size], weight, bias, labels[i : i + chunk_size],
                       temperature, entropy_grad, use_reentrant=False)
            for i in range(0, n, chunk_size)
        ]
        lp = torch.cat([p[0] for p in parts])
        ent = torch.cat([p[1] for p in parts])
    full = hidden.new_zeros(length, dtype=torch.float32)
    return full.index_put((positions,), lp), full.index_put((positions,), ent if entropy_grad else ent.detach())
