"""Sampling parameters that other servers take and agentflow's engines cannot honour: one refusal text.

Agents written for vLLM, SGLang or OpenAI send parameters such as ``min_p``,
``repetition_penalty``, ``min_tokens`` or ``seed``. agentflow's engines sample with temperature,
top-p, top-k, a token limit and stops only; honouring a request partially would train on samples
from another distribution than the one the agent asked for, so such a parameter is accepted only
at its neutral value and refused otherwise, with a message that names the server, the parameter,
what is accepted and how to change the agent. The chat, Responses, Messages and tokens-only routes
share this table (:func:`refusal`).

``seed`` is refused: the local engine already gives every request a random stream of its own,
derived from the engine's seed and the request's prompt, and a remote server's per-request seed
would not survive an interrupted, resumed generation (the continuation is a new request).

Not here: the parameters each API does accept (the client and the route modules).
"""

from __future__ import annotations

from typing import Any

__all__ = ["ACCEPTED", "NEUTRAL", "refusal"]

ACCEPTED = "temperature, top_p, top_k, max_tokens, stop, stop_token_ids"

# name -> (neutral values, why the engines cannot honour it)
NEUTRAL: dict[str, tuple[tuple[Any, ...], str]] = {
    "min_p": ((None, 0, 0.0), "the engines have no min-p filter"),
    "repetition_penalty": ((None, 1, 1.0), "the engines apply no repetition penalty"),
    "presence_penalty": ((None, 0, 0.0), "the engines apply no presence penalty"),
    "frequency_penalty": ((None, 0, 0.0), "the engines apply no frequency penalty"),
    "min_tokens": ((None, 0), "the engines cannot forbid stopping before a minimum length"),
    "seed": (
        (None,),
        "each request's random stream comes from the engine's seed (inference.local.seed, or agentflow serve "
        "--random-seed) and its prompt, and a resumed generation could not keep a per-request one",
    ),
    "ignore_eos": ((None, False), "generation always ends at the end-of-sequence token"),
    "typical_p": ((None, 1, 1.0), "the engines have no typical-p filter"),
    "top_a": ((None, 0, 0.0), "the engines have no top-a filter"),
    "length_penalty": ((None, 1, 1.0), "the engines do not search beams"),
    "use_beam_search": ((None, False), "the engines do not search beams"),
    "best_of": ((None, 1), "the engines draw one sample per request"),
    "logit_bias": ((None, {}), "the engines apply no logit bias"),
    "bad_words": ((None, []), "the engines cannot forbid words"),
    "allowed_token_ids": ((None,), "the engines cannot restrict the vocabulary"),
    "prompt_logprobs": ((None, 0), "the engines return the sampled tokens' log-probs only"),
    "truncate_prompt_tokens": ((None,), "prompts are never truncated (training needs the whole prompt)"),
    "guided_json": ((None,), "the engines have no constrained decoding"),
    "guided_regex": ((None,), "the engines have no constrained decoding"),
    "guided_choice": ((None,), "the engines have no constrained decoding"),
    "guided_grammar": ((None,), "the engines have no constrained decoding"),
    "structured_outputs": ((None,), "the engines have no constrained decoding"),
    "logits_processors": ((None, []), "the engines run no custom logits processors"),
}


def refusal(name: str, value: Any, who: str, where: str = "the agent's request") -> str | None:
    """The message refusing ``name=value``, or None when it is not a refused parameter or is neutral."""
    spec = NEUTRAL.get(name)
    if spec is None or value in spec[0]:
        return None
    neutral = [v for v in spec[0] if v is not None]
    at = f" (or {name}={neutral[0]!r}, its neutral value)" if neutral else ""
    return (
        f"sampling parameter {name}={value!r} is refused by {who}: {spec[1]}, and training on samples drawn "
        f"otherwise than the agent asked would be wrong. Accepted sampling parameters: {ACCEPTED}{at}. "
        f"Change the agent: remove {name} from {where} (openai SDK: from extra_body; verifiers: from "
        "sampling_args)"
    )
