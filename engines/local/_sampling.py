"""Per-row sampling for :class:`~agentflow.engines.local.LocalEngine`, vectorised over the batch.

Each row has its own temperature, top-k, top-p and greedy flag. The order is SGLang's: scale by
temperature, keep the top-k logits, then the smallest set of tokens whose probability (after
top-k) reaches top-p, renormalise, draw.

Each row draws with one uniform number of its own (inverse CDF: the first token whose cumulative
probability exceeds it), taken from the request's own random stream (``_worker.py``). So which
token a request draws does not depend on which other requests share its batch, or how many.

Returned log-probs are of the distribution the token was drawn from:

- sampled rows: ``log_softmax`` of the processed logits (after temperature, top-k and top-p). With
  top-k/top-p a trainer recomputing ``log_softmax(logits / T)`` gets a different (lower) number
  for the same token, since the truncated mass is renormalised away; use top_k=-1, top_p=1 when
  the behaviour log-probs feed a PPO importance ratio.
- greedy rows (``greedy=True`` or temperature 0): ``log_softmax`` of the raw logits (temperature
  1, no truncation), as SGLang reports for greedy requests.

Not here: repetition penalties, min-p, logit bias (not in :class:`agentflow.GenerationConfig`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from agentflow import GenerationConfig

__all__ = ["RowParams", "sample"]


@dataclass(frozen=True, slots=True)
class RowParams:
    """Sampling parameters of one row, resolved from a :class:`GenerationConfig`."""

    greedy: bool
    temperature: float
    top_k: int  # <= 0: whole vocabulary
    top_p: float

    @classmethod
    def of(cls, g: GenerationConfig) -> RowParams:
        return cls(greedy=g.is_greedy, temperature=g.temperature, top_k=g.top_k, top_p=g.top_p)

    @property
    def truncates(self) -> bool:
        return not self.greedy and (self.top_k > 0 or self.top_p < 1.0)


def sample(
    logits: torch.Tensor, params: Sequence[RowParams], draws: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of ``logits`` ``[n, V]`` with the row's uniform number in ``draws``
    (``[0, 1)``, ignored by greedy rows); return ``(tokens [n], logprobs [n])`` (fp32)."""
    logits = logits.float()
    if all(p.greedy for p in params):
        tokens = logits.argmax(-1)
        return tokens, _gather_logprob(logits, tokens)
    device = logits.device
    greedy = torch.tensor([p.greedy for p in params], device=device)
    temps = torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device)
    scores = logits / temps[:, None]
    if any(p.truncates for p in params):
        scores = _truncate(scores, params)
    probs = torch.softmax(scores, -1)
    drawn = _inverse_cdf(probs, torch.tensor(draws, dtype=probs.dtype, device=device))
    tokens = torch.where(greedy, logits.argmax(-1), drawn)
    # Greedy rows report raw log-probs; their ``scores`` are the raw logits (temperature 1, no truncation).
    return tokens, _gather_logprob(scores, tokens)


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Per row, the first token whose cumulative probability exceeds ``u * total``. A token of
    probability 0 adds nothing to the sum, so it is never the first to exceed; rounding can put
    ``u * total`` at the very end, where the row's last token of positive probability is taken."""
    cdf = probs.cumsum(-1)
    drawn = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None], right=True)[:, 0]
    vocab = probs.shape[1]
    if bool((drawn >= vocab).any()):
        last_positive = vocab - 1 - (probs.flip(-1) > 0).to(torch.uint8).argmax(-1)
        drawn = torch.minimum(drawn, last_positive)
    return drawn


def _gather_logprob(scores: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return scores.gather(1, tokens[:, None])[:, 0] - torch.logsumexp(scores, -1)


def _truncate(scores: torch.Tensor, params: Sequence[RowParams]) -> torch.Tensor:
    """Set logits outside each row's top-k / top-p set to -inf (rows without truncation untouched)."""
    vocab = scores.shape[1]
    device = scores.device
    ks = torch.tensor([p.top_k if (p.truncates and 0 < p.top_k < vocab) else vocab for p in params], device=device)
    ps = torch.tensor([p.top_p if p.truncates else 1.0 for p in params], device=device)
    sorted_scores, order = scores.sort(-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    sorted_scores = sorted_scores.masked_fill(rank >= ks[:, None], float("-inf"))
    probs = torch.softmax(sorted_scores, -1)
    mass_before = probs.cumsum(-1) - probs
    sorted_scores = sorted_scores.masked_fill(mass_before > ps[:, None], float("-inf"))
    return torch.full_like(scores, float("-inf")).scatter_(1, order, sorted_scores)
