"""vLLM's tokens-only route (``POST /inference/v1/generate``) over a recording client.

Trainers that keep their own tokens (verifiers' training client, the one prime-rl uses) send
token ids and read token ids and log-probs back, as vLLM serves them:

- request: ``{"model", "token_ids": [...], "sampling_params": {...}, "request_id"?}``;
- reply: ``{"request_id", "prompt_token_ids", "choices": [{"index": 0, "token_ids",
  "finish_reason", "logprobs": {"content": [{"token": "token_id:N", "logprob", ...}]}}],
  "usage"}`` (log-probs always: they are what training needs).

Sampling parameters: ``max_tokens``, ``temperature``, ``top_p``, ``top_k`` (0 or -1: all),
``stop``, ``stop_token_ids``, ``n`` (1), ``logprobs`` (None, 0 or 1: the sampled token's);
vLLM's text options (``detokenize``, ``skip_special_tokens``, ``spaces_between_special_tokens``,
``include_stop_str_in_output``) are accepted and have nothing to act on (no text is returned);
parameters the engines cannot honour are refused as everywhere (:mod:`agentflow._sampling`).

Each generation is recorded in the session like a chat completion, token-exact: a prompt that
extends one of the session's 64 newest recorded generations (its prompt + output, then new tokens)
continues that conversation, so the ``concat`` export chains the turns and masks the new tokens.

Not covered: streaming, ``n > 1``, multimodal ``features``, prompt log-probs, LoRA adapters by
model name (the ``model`` is not checked).
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from agentflow import _sampling
from agentflow._types import GenerationConfig, ModelRequest
from agentflow.errors import ConfigError

if TYPE_CHECKING:
    from agentflow.client import CompletionRecord, OpenAIClient

__all__ = ["TOKENS_CONTEXT", "TokensRequest", "generate", "parse_request"]

TOKENS_CONTEXT = "<tokens-only route>"  # CompletionRecord.context of tokens-route records
_TOP = frozenset(
    {
        "model",
        "token_ids",
        "sampling_params",
        "request_id",
        "stream",
        "stream_options",
        "cache_salt",
        "priority",
        "kv_transfer_params",
        "features",
    }
)
_USED = frozenset({"max_tokens", "temperature", "top_p", "top_k", "stop", "stop_token_ids", "n", "logprobs"})
_TEXT_ONLY = frozenset(
    {"detokenize", "skip_special_tokens", "spaces_between_special_tokens", "include_stop_str_in_output", "output_kind"}
)
_OFF_LOOP_TOKENS = 16_384
_PARENT_WINDOW = 64


@dataclass(frozen=True, slots=True)
class TokensRequest:
    request_id: str
    token_ids: list[int]
    gconfig: GenerationConfig


def _fail(problem: str) -> ConfigError:
    return ConfigError(f"POST /inference/v1/generate: {problem}")


def parse_request(body: Mapping[str, Any], base: GenerationConfig, vocab_size: int, who: str) -> TokensRequest:
    """Check a tokens-only request body; errors name the field, what was expected and got."""
    unknown = sorted(set(body) - _TOP)
    if unknown:
        raise _fail(f"unknown field(s) {unknown}; expected {sorted(_TOP)} (vLLM's GenerateRequest)")
    if body.get("stream"):
        raise _fail(f"stream=true is not served by {who}; send stream=false (the reply comes whole)")
    if body.get("features") is not None:
        raise _fail("multimodal 'features' are not served; send text token ids only")
    if body.get("priority", 0) != 0:
        raise _fail(f"priority={body['priority']!r} is not served (no priority scheduling); leave it out")
    ids = _token_ids(body.get("token_ids"), vocab_size)
    params = body.get("sampling_params", {})
    if not isinstance(params, Mapping):
        raise _fail(f"sampling_params must be an object, got {type(params).__name__}")
    rid = body.get("request_id")
    if rid is not None and (not isinstance(rid, str) or not 0 < len(rid) <= 256):
        raise _fail(f"request_id must be a string of 1 to 256 characters, got {rid!r:.80}")
    return TokensRequest(rid or f"generate-tokens-{uuid.uuid4().hex}", ids, _gconfig(params, base, who))


def _token_ids(ids: Any, vocab_size: int) -> list[int]:
    if not isinstance(ids, list) or not ids:
        raise _fail(f"token_ids must be a non-empty list of token ids, got {ids!r:.80}")
    for i, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise _fail(
                f"token_ids[{i}] is {t!r:.40}; expected integers in [0, {vocab_size}) (the served model's "
                "vocabulary): tokenize with the served model's tokenizer"
            )
    return ids


def _gconfig(params: Mapping[str, Any], base: GenerationConfig, who: str) -> GenerationConfig:
    problems = []
    for name, value in params.items():
        refused = _sampling.refusal(name, value, who, where="sampling_params")
        if refused is not None:
            problems.append(refused)
        elif name not in _USED and name not in _TEXT_ONLY and name not in _sampling.NEUTRAL:
            problems.append(
                f"sampling_params.{name} is not known to {who}; accepted: {sorted(_USED)} "
                f"(and, with nothing to act on, {sorted(_TEXT_ONLY)}); remove it from sampling_params"
            )
    if params.get("n", 1) != 1:
        problems.append(
            f"sampling_params.n={params['n']!r}: {who} draws one sample per request; send n=1 and "
            "one request per sample"
        )
    if params.get("logprobs") not in (None, 0, 1):
        problems.append(
            f"sampling_params.logprobs={params['logprobs']!r}: only the sampled token's log-prob "
            "exists; send 0 or 1 (it is always returned)"
        )
    if problems:
        raise ConfigError([f"POST /inference/v1/generate: {p}" for p in problems])
    return _sampling_config(params, base)


def _sampling_config(params: Mapping[str, Any], base: GenerationConfig) -> GenerationConfig:
    changes: dict[str, Any] = {"n_samples": 1}
    for name, kind in (("max_tokens", int), ("temperature", float), ("top_p", float), ("top_k", int)):
        value = params.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int if kind is int else int | float):
            raise _fail(f"sampling_params.{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
        changes["max_new_tokens" if name == "max_tokens" else name] = value
    stop = params.get("stop")
    if stop is not None:
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _fail(f"sampling_params.stop must be a string or a list of strings, got {stop!r:.80}")
        changes["stop"] = tuple(stop)
    extra = params.get("stop_token_ids") or []
    if not isinstance(extra, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in extra):
        raise _fail(f"sampling_params.stop_token_ids must be a list of integers, got {extra!r:.80}")
    changes["stop_token_ids"] = tuple(dict.fromkeys((*base.stop_token_ids, *extra)))
    return base.new(**changes)


def _continued(client: OpenAIClient, ids: list[int]) -> CompletionRecord | None:
    """The longest of the session's newest tokens-route records whose prompt + output is a prefix of
    ``ids`` (the newest :data:`_PARENT_WINDOW` records are looked at: a turn continues a recent one)."""
    best, best_len = None, 0
    for rec in itertools.islice(reversed(client._records.values()), _PARENT_WINDOW):
        n_prompt, n = len(rec.prompt_ids), len(rec.prompt_ids) + len(rec.output_ids)
        if rec.context != TOKENS_CONTEXT or n <= best_len or n > len(ids):
            continue
        if ids[:n_prompt] == rec.prompt_ids and ids[n_prompt:n] == rec.output_ids:
            best, best_len = rec, n
    return best


async def generate(client: OpenAIClient, req: TokensRequest) -> tuple[CompletionRecord, dict[str, Any]]:
    """Generate, record in ``client`` and build vLLM's reply; (record, reply body)."""
    from agentflow.client import CompletionRecord  # the client module imports this one

    if len(req.token_ids) > _OFF_LOOP_TOKENS:
        parent = await asyncio.to_thread(_continued, client, req.token_ids)
    else:
        parent = _continued(client, req.token_ids)
    if client.bounds.budget is not None:
        client.bounds.budget.check(len(req.token_ids) + req.gconfig.max_new_tokens)
    resp = await client._generate(ModelRequest(input_ids=req.token_ids, gconfig=req.gconfig), None)
    start = 0 if parent is None else len(parent.prompt_ids) + len(parent.output_ids)
    finish = "length" if resp.stop_reason == "length" else "stop"
    rec = CompletionRecord(
        id=req.request_id if req.request_id not in client._records else f"{req.request_id}-{uuid.uuid4().hex[:8]}",
        messages=(),
        reply={"role": "assistant", "content": None},
        prompt_ids=req.token_ids,
        delta_ids=req.token_ids[start:],
        output_ids=list(resp.output_tokens),
        logprobs=list(resp.output_logprobs),
        versions=list(resp.output_versions),
        finish_reason=finish,
        parent=None if parent is None else parent.id,
        context=TOKENS_CONTEXT,
    )
    client._record(rec, None)
    return rec, _reply(rec, req.request_id)


def _reply(rec: CompletionRecord, request_id: str) -> dict[str, Any]:
    content = [
        {"token": f"token_id:{t}", "logprob": lp, "bytes": None, "top_logprobs": []}
        for t, lp in zip(rec.output_ids, rec.logprobs, strict=True)
    ]
    n_prompt, n_out = len(rec.prompt_ids), len(rec.output_ids)
    return {
        "request_id": request_id,
        "prompt_token_ids": rec.prompt_ids,
        "choices": [
            {
                "index": 0,
                "token_ids": rec.output_ids,
                "finish_reason": rec.finish_reason,
                "logprobs": {"content": content},
            }
        ],
        "usage": {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out},
    }
