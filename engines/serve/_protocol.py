"""SGLang's ``/generate`` contract: request parsing, validation and response bodies (0.5.23).

Pure functions and frozen dataclasses shared by ``agentflow serve`` (engines/serve/server.py).
They reproduce SGLang 0.5.23's HTTP contract (``docs/sglang.md``): the JSON contract gate (unknown
``sampling_params`` keys and wrong JSON types are a 400 whose ``error`` is a *string*), the
``SamplingParams.verify`` range checks (400 ``{"error": {"message": ...}}``), batch normalisation
(``text``/``input_ids`` lists, ``rid`` lists or a string expanded to ``f"{rid}_{i}"``, ``n > 1``
copies with fresh rids) and the ``meta_info`` keys of a finished or aborted response.

Not here: HTTP, generation, pausing (the server module). Sampling features the wrapped agentflow
engine cannot honour (``min_p``, penalties, grammars, seeds, prompt log-probs) are accepted by the
contract but rejected with a 400 that says so, unless they hold their default value.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass
from typing import Any

__all__ = ["ContractError", "GenerateItem", "SamplingSpec", "abort_finish", "build_meta_info", "lora_paths_of",
           "parse_generate"]


class ContractError(ValueError):
    """A JSON-contract violation: answered as ``400 {"error": "<text>"}`` (a string)."""


# name -> (serde type name used in messages, default). Order = the contract's field order.
_SAMPLING_FIELDS: dict[str, tuple[str, Any]] = {
    "max_new_tokens": ("i64", 128), "stop": ("string or sequence", None), "stop_token_ids": ("sequence", None),
    "stop_regex": ("string or sequence", None), "temperature": ("f64", 1.0), "top_p": ("f64", 1.0),
    "top_k": ("i64", -1), "min_p": ("f64", 0.0), "frequency_penalty": ("f64", 0.0),
    "presence_penalty": ("f64", 0.0), "repetition_penalty": ("f64", 1.0), "min_new_tokens": ("i64", 0),
    "n": ("i64", 1), "json_schema": ("string", None), "regex": ("string", None), "ebnf": ("string", None),
    "structural_tag": ("string", None), "ignore_eos": ("a boolean", False),
    "skip_special_tokens": ("a boolean", True), "spaces_between_special_tokens": ("a boolean", True),
    "no_stop_trim": ("a boolean", False), "stream_interval": ("i64", None), "logit_bias": ("map", None),
    "sampling_seed": ("i64", None), "custom_params": ("map", None), "beam_width": ("i64", None),
    "watermark": ("map", None), "choice": ("sequence", None),
}
# Known keys that the wrapped engine cannot honour: only their default is accepted.
_UNSUPPORTED = ("stop_regex", "min_p", "frequency_penalty", "presence_penalty", "repetition_penalty",
                "min_new_tokens", "json_schema", "regex", "ebnf", "structural_tag", "ignore_eos",
                "logit_bias", "sampling_seed", "custom_params", "beam_width", "watermark", "choice")


@dataclass(frozen=True, slots=True)
class SamplingSpec:
    """The validated ``sampling_params`` of one request (defaults filled in)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    n: int = 1
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    no_stop_trim: bool = False


@dataclass(frozen=True, slots=True)
class GenerateItem:
    """One prompt of a (possibly batched) ``/generate`` call, normalised."""

    rid: str
    input_ids: list[int]
    sampling: SamplingSpec
    return_logprob: bool = False
    return_text_in_logprobs: bool = False
    lora_path: str | None = None  # the LoRA adapter's name (None = the base model)


# ----------------------------------------------------------------------------------- JSON typing
def _unexpected(v: Any) -> str:
    """serde's description of an unexpected JSON value."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return f"boolean `{'true' if v else 'false'}`"
    if isinstance(v, int):
        return f"integer `{v}`"
    if isinstance(v, float):
        return f"floating point `{v}`"
    if isinstance(v, str):
        return f"string {json.dumps(v)}"
    return "sequence" if isinstance(v, list) else "map"


def _check_type(v: Any, kind: str) -> None:
    ok = {
        "i64": isinstance(v, int) and not isinstance(v, bool),
        "f64": isinstance(v, int | float) and not isinstance(v, bool),
        "a boolean": isinstance(v, bool),
        "string": isinstance(v, str),
        "sequence": isinstance(v, list),
        "map": isinstance(v, dict),
        "string or sequence": isinstance(v, str | list),
    }[kind]
    if not ok:
        raise ContractError(f"invalid type: {_unexpected(v)}, expected {kind}")


def _check_int_list(v: Any) -> list[int]:
    _check_type(v, "sequence")
    for x in v:
        _check_type(x, "i64")
    return list(v)


# ----------------------------------------------------------------------------------- sampling
def parse_sampling(raw: Any) -> SamplingSpec:
    """Contract gate, then ``SamplingParams.verify``-style range checks. ``null`` values = default."""
    if raw is None:
        return SamplingSpec()
    _check_type(raw, "map")
    for key, value in raw.items():
        if key not in _SAMPLING_FIELDS:
            expected = ", ".join(f"`{k}`" for k in _SAMPLING_FIELDS)
            raise ContractError(f"unknown field `{key}`, expected one of {expected}")
        if value is not None:
            _check_type(value, _SAMPLING_FIELDS[key][0])
    d = {k: v for k, v in raw.items() if v is not None}
    for key in _UNSUPPORTED:
        if key in d and d[key] != _SAMPLING_FIELDS[key][1]:
            raise ValueError(
                f"sampling_params.{key}={d[key]!r} is not supported by agentflow serve (the wrapped agentflow "
                f"engine cannot apply it); expected the default {_SAMPLING_FIELDS[key][1]!r}. Drop the key, "
                "or serve with `--backend sglang`."
            )
    stop = d.get("stop", ())
    stop_ids = d.get("stop_token_ids", [])
    spec = SamplingSpec(
        max_new_tokens=d.get("max_new_tokens", 128), temperature=float(d.get("temperature", 1.0)),
        top_p=float(d.get("top_p", 1.0)), top_k=d.get("top_k", -1),
        stop=(stop,) if isinstance(stop, str) else tuple(str(s) for s in stop),
        stop_token_ids=tuple(_check_int_list(stop_ids)), n=d.get("n", 1),
        skip_special_tokens=d.get("skip_special_tokens", True),
        spaces_between_special_tokens=d.get("spaces_between_special_tokens", True),
        no_stop_trim=d.get("no_stop_trim", False),
    )
    _verify(spec)
    return spec


def _verify(s: SamplingSpec) -> None:
    if not math.isfinite(s.temperature) or s.temperature < 0.0:
        raise ValueError(f"temperature must be a non-negative finite number, got {s.temperature}.")
    if not 0.0 < s.top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {s.top_p}.")
    if s.top_k < 1 and s.top_k != -1:
        raise ValueError(f"top_k must be -1 (disable) or at least 1, got {s.top_k}.")
    if s.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be at least 0, got {s.max_new_tokens}.")
    if s.n < 1:
        raise ValueError(f"n must be at least 1, got {s.n}.")


# ----------------------------------------------------------------------------------- requests
def _per_item(body: dict[str, Any], key: str, n: int, default: Any, kind: str) -> list[Any]:
    """A field that may be one value for the batch or a list with one value per item."""
    v = body.get(key)
    if v is None:
        return [default] * n
    if isinstance(v, list):
        if len(v) != n:
            raise ValueError(f"`{key}` has {len(v)} entries but the batch has {n} prompts; expected {n}.")
        for x in v:
            _check_type(x, kind)
        return list(v)
    _check_type(v, kind)
    return [v] * n


def _prompts(body: dict[str, Any], tokenizer: Any) -> tuple[list[list[int]], bool]:
    """(token prompts, is_batch). ``input_ids`` wins over ``text`` when both are given."""
    text, ids = body.get("text"), body.get("input_ids")
    if ids is not None:
        _check_type(ids, "sequence")
        if len(ids) == 0:
            raise ValueError("input_ids cannot be empty.")
        if isinstance(ids[0], list):
            prompts = [_check_int_list(p) for p in ids]
            if any(len(p) == 0 for p in prompts):
                raise ValueError("input_ids cannot be empty.")
            return prompts, True
        return [_check_int_list(ids)], False
    if text is not None:
        if tokenizer is None:
            raise ValueError("`text` needs a tokenizer, and this server has none; send `input_ids` instead.")
        _check_type(text, "string or sequence")
        texts = [text] if isinstance(text, str) else text
        for t in texts:
            _check_type(t, "string")
        return [list(tokenizer.encode(t)) for t in texts], isinstance(text, list)
    if body.get("input_embeds") is not None:
        raise ValueError("input_embeds are not supported by agentflow serve; send `input_ids` or `text`.")
    raise ValueError("Either text, input_ids or input_embeds should be provided.")


def _rids(body: dict[str, Any], n: int, is_batch: bool) -> list[str]:
    rid = body.get("rid")
    if rid is None:
        return [uuid.uuid4().hex for _ in range(n)]
    if isinstance(rid, list):
        if len(rid) != n:
            raise ValueError("The specified rids length mismatch with the batch_size for batch processing.")
        for r in rid:
            _check_type(r, "string")
        return list(rid)
    _check_type(rid, "string")
    return [rid] if not is_batch else [f"{rid}_{i}" for i in range(n)]


def _check_logprob_options(body: dict[str, Any]) -> None:
    start = body.get("logprob_start_len")
    if start not in (None, -1) and not (isinstance(start, list) and all(s in (None, -1) for s in start)):
        raise ValueError(
            f"logprob_start_len={start!r} is not supported by agentflow serve (the wrapped engine returns "
            "output log-probs only); expected -1 (the default)."
        )
    top = body.get("top_logprobs_num")
    if top not in (None, 0) and not (isinstance(top, list) and all(t in (None, 0) for t in top)):
        raise ValueError(f"top_logprobs_num={top!r} is not supported by agentflow serve; expected 0.")
    if body.get("token_ids_logprob") is not None:
        raise ValueError("token_ids_logprob is not supported by agentflow serve; drop the key.")


def parse_generate(body: Any, tokenizer: Any) -> tuple[list[GenerateItem], bool, bool]:
    """Normalise a ``/generate`` body into items. Returns (items, is_batch, stream)."""
    if not isinstance(body, dict):
        raise ContractError(f"invalid type: {_unexpected(body)}, expected struct GenerateRequest")
    prompts, is_batch = _prompts(body, tokenizer)
    n = len(prompts)
    raw_sp = body.get("sampling_params")
    if isinstance(raw_sp, list):
        if len(raw_sp) != n:
            raise ValueError(f"`sampling_params` has {len(raw_sp)} entries but the batch has {n} prompts.")
        specs = [parse_sampling(s) for s in raw_sp]
    else:
        specs = [parse_sampling(raw_sp)] * n
    _check_logprob_options(body)
    logprob = _per_item(body, "return_logprob", n, False, "a boolean")
    text_lp = body.get("return_text_in_logprobs")
    stream = body.get("stream")
    for v in (text_lp, stream):
        if v is not None:
            _check_type(v, "a boolean")
    rids = _rids(body, n, is_batch)
    loras = lora_paths_of(body, n)
    items: list[GenerateItem] = []
    for i in range(n):
        copies = specs[i].n
        if copies > 1:  # SGLang: n copies with fresh uuid rids, answered as a list
            is_batch = True
        for _ in range(copies):
            rid = rids[i] if copies == 1 else uuid.uuid4().hex
            items.append(GenerateItem(rid, prompts[i], specs[i], bool(logprob[i]), bool(text_lp), loras[i]))
    return items, is_batch, bool(stream)


# ----------------------------------------------------------------------------------- responses
def abort_finish(message: str = "Aborted") -> dict[str, Any]:
    return {"type": "abort", "message": message, "status_code": None, "err_type": None}


def version_spans(versions: list[str]) -> list[dict[str, Any]]:
    """Per-token weight versions as 0.5.23's ``weight_versions`` spans ``{version, start, end}``."""
    spans: list[dict[str, Any]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans


def build_meta_info(
    *, rid: str, finish_reason: dict[str, Any] | None, prompt_tokens: int, output_ids: list[int],
    logprobs: list[float] | None, token_texts: list[str | None] | None, versions: list[str],
    weight_version: str, e2e_latency: float | None, sent_ts: float,
) -> dict[str, Any]:
    """``meta_info`` of a finished (or, with ``finish_reason=None``, streamed) response."""
    meta: dict[str, Any] = {
        "id": rid, "finish_reason": finish_reason, "prompt_tokens": prompt_tokens,
        "weight_version": versions[-1] if versions else weight_version,
        "completion_tokens": len(output_ids), "cached_tokens": 0, "reasoning_tokens": 0, "num_retractions": 0,
    }
    if finish_reason is not None:
        meta["weight_versions"] = version_spans(versions)
    if logprobs is not None:
        texts = token_texts if token_texts is not None else [None] * len(output_ids)
        meta["input_token_logprobs"] = []
        triples = zip(logprobs, output_ids, texts, strict=True)
        meta["output_token_logprobs"] = [[lp if math.isfinite(lp) else None, tok, txt] for lp, tok, txt in triples]
        meta["output_token_logprobs_length"] = len(output_ids)
    if e2e_latency is not None:
        meta["e2e_latency"] = e2e_latency
    meta["response_sent_to_client_ts"] = sent_ts
    return meta


def lora_paths_of(body: dict[str, Any], n: int) -> list[str | None]:
    """``lora_path`` of a ``/generate`` body, one entry per prompt (ValueError on a bad shape)."""
    v = body.get("lora_path")
    if v is None or isinstance(v, str):
        return [v] * n
    if isinstance(v, list) and len(v) == n and all(x is None or isinstance(x, str) for x in v):
        return list(v)
    raise ValueError(f"`lora_path` must be a string, null, or a list of {n} strings or nulls (one per prompt); "
                     f"got {v!r}")
