"""SGLang's native HTTP protocol as a :class:`~agentflow.engines.remote.protocol.ServerProtocol` adapter.

Speaks to real SGLang servers (0.5.x) and to ``agentflow serve``, which reproduces the same
protocol (``docs/sglang.md``). Each engine operation is one route:

- health: ``GET /health`` (200 = ready; SGLang answers 503 while paused, after ~20 s);
- generation: ``POST /generate`` with ``input_ids``, ``sampling_params``, ``return_logprob``, a
  ``rid``; the answer's ``output_ids``, ``meta_info.output_token_logprobs`` (``[logprob, id, text]``
  triples, ``null`` for a non-finite log-prob), ``finish_reason.type`` (``stop``/``length``/
  ``abort``) and per-token ``weight_versions`` spans, else ``weight_version``;
- pause/resume: ``POST /pause_generation {"mode": "abort"}`` (in-flight requests answer 200 with
  their partial output; ``"in_place"`` or ``"retract"`` with :class:`SGLangProtocol`'s
  ``pause_mode``) and ``POST /continue_generation {}``;
- weights: ``/update_weights_from_disk``, ``/init_weights_update_group`` and
  ``/update_weights_from_distributed``; versions travel as strings (``weight_version``);
- ``GET /get_server_info`` (``tp_size``) and ``GET /get_model_info`` (``weight_version``);
- LoRA: ``/load_lora_adapter``, ``/unload_lora_adapter`` (``lora_path`` names the adapter of a
  ``/generate``) and ``/update_weight_version`` (without aborting requests).

Not here: retries, deadlines, routing, failover, and the API key (the server pool,
``engines/remote/_pool.py``, sends ``RemoteEngineConfig.api_key`` as ``Authorization: Bearer <key>``
on every request, which is what SGLang's ``--api-key`` checks), and the server side of the
protocol (``engines/serve/_protocol.py``, ``engines/serve/server.py``).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from agentflow.engines.remote.protocol import BroadcastSpec, Generated, GenerateJob, ServerLink, WeightGroup
from agentflow.errors import ConfigError, ServerError

__all__ = ["SGLangProtocol"]


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None


def _label(version: int | None) -> str | None:
    """agentflow's int version as SGLang's ``weight_version`` string."""
    return None if version is None else str(version)


def sampling_params(job: GenerateJob) -> dict[str, Any]:
    g = job.gconfig
    return {
        "max_new_tokens": job.max_new_tokens, "temperature": 0.0 if g.is_greedy else g.temperature,
        "top_p": g.top_p, "top_k": g.top_k if g.top_k > 0 else -1, "stop": list(g.stop) or None,
        "stop_token_ids": list(g.stop_token_ids) or None,
    }


def token_versions(meta: dict[str, Any], n: int) -> list[int | None]:
    """Per-token versions from ``weight_versions`` spans, else ``weight_version``; None = unknown."""
    spans = meta.get("weight_versions")
    if isinstance(spans, list) and spans:
        out: list[int | None] = [None] * n
        for s in spans:
            v = _as_int(s.get("version"))
            for i in range(max(0, int(s.get("start", 0))), min(n, int(s.get("end", 0)))):
                out[i] = v
        return out
    return [_as_int(meta.get("weight_version"))] * n


def parse_generated(body: Any) -> Generated:
    """A ``/generate`` answer (finished or aborted, both abort shapes) -> :class:`Generated`."""
    if not isinstance(body, dict):
        raise ServerError(f"/generate answered {type(body).__name__}; expected a JSON object with output_ids "
                          "and meta_info (one prompt per request)")
    ids = [int(t) for t in body.get("output_ids") or []]
    meta = body.get("meta_info") or {}
    lps = meta.get("output_token_logprobs") or []
    if len(lps) != len(ids):
        raise ServerError(f"server sent {len(ids)} output_ids but {len(lps)} output_token_logprobs; "
                          "expected one [logprob, token_id, text] triple per token (return_logprob=true)")
    finish = meta.get("finish_reason") or {}
    kind = finish.get("type")
    if kind not in ("stop", "length", "abort"):
        raise ServerError(f"unexpected finish_reason {finish!r}; expected type stop, length or abort")
    logprobs = [float("-inf") if t[0] is None else float(t[0]) for t in lps]  # null = non-finite
    return Generated(ids, logprobs, token_versions(meta, len(ids)), kind)


class SGLangProtocol:
    """SGLang's native protocol (see the module docstring).

    Args:
        pause_mode: what a pause does to requests in flight. ``"abort"`` (default): they return
            their partial output and the engine asks for the rest after the update; each sample
            of a group then has its own context, so the prompt a group shared is prefilled again
            once per sample. ``"in_place"`` (SGLang >= 0.5.23, ``agentflow serve``): they freeze
            with their KV cache and continue under the new weights; the tokens before the update
            keep their old version. ``"retract"``: they freeze and their KV is recomputed on
            resume. Both keep the prefix cache through weight updates (SGLang cannot flush it
            while requests wait in place), so a cached prompt can keep the previous weights' KV.
    """

    name = "SGLang"
    launch_hint = "`agentflow serve --port N` or `python -m sglang.launch_server`"

    def __init__(self, pause_mode: Literal["abort", "in_place", "retract"] = "abort") -> None:
        if pause_mode not in ("abort", "in_place", "retract"):
            raise ConfigError(f"pause_mode must be 'abort', 'in_place' or 'retract', got {pause_mode!r}")
        self.pause_mode = pause_mode

    def error_text(self, body: str) -> str:
        """Any of SGLang's error shapes: ``{"error": str | {"message"}}``, ``{"message"}``, or raw text."""
        try:
            parsed = json.loads(body)
        except ValueError:
            return body[:500]
        if isinstance(parsed, dict):
            err = parsed.get("error")
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])
            if err is not None:
                return str(err)
            if "message" in parsed:
                return str(parsed["message"])
        return body[:500]

    async def health(self, link: ServerLink) -> None:
        await link.call("GET", "/health")

    async def tp_size(self, link: ServerLink) -> int:
        info = await link.call("GET", "/get_server_info")
        return int(info.get("tp_size") or 1)

    async def weight_version(self, link: ServerLink) -> int | None:
        info = await link.call("GET", "/get_model_info")
        return _as_int(info.get("weight_version"))

    async def generate(self, link: ServerLink, job: GenerateJob) -> Generated:
        payload = {"input_ids": job.input_ids, "sampling_params": sampling_params(job), "return_logprob": True,
                   "stream": False, "rid": job.rid}
        if job.adapter is not None:
            payload["lora_path"] = job.adapter  # SGLang's name for the served adapter
        return parse_generated(await link.call("POST", "/generate", payload))

    async def pause(self, link: ServerLink) -> None:
        await link.call("POST", "/pause_generation", {"mode": self.pause_mode})

    async def resume(self, link: ServerLink) -> None:
        await link.call("POST", "/continue_generation", {})

    async def update_weights_from_disk(self, link: ServerLink, path: str, version: int | None) -> None:
        await link.call("POST", "/update_weights_from_disk", {
            "model_path": path, "weight_version": _label(version), "abort_all_requests": False,
            "flush_cache": self.pause_mode == "abort"})

    async def init_weight_group(self, link: ServerLink, group: WeightGroup) -> None:
        await link.call("POST", "/init_weights_update_group", {
            "master_address": group.master_address, "master_port": group.master_port,
            "rank_offset": group.rank_offset, "world_size": group.world_size, "group_name": group.group_name,
            "backend": group.backend})

    async def update_weights_from_distributed(self, link: ServerLink, spec: BroadcastSpec) -> None:
        await link.call("POST", "/update_weights_from_distributed", {
            "names": spec.names, "dtypes": spec.dtypes, "shapes": spec.shapes, "group_name": spec.group_name,
            "weight_version": _label(spec.version), "flush_cache": self.pause_mode == "abort"})

    async def load_adapter(self, link: ServerLink, name: str, path: str) -> None:
        await link.call("POST", "/load_lora_adapter", {"lora_name": name, "lora_path": path, "pinned": False})

    async def unload_adapter(self, link: ServerLink, name: str) -> None:
        await link.call("POST", "/unload_lora_adapter", {"lora_name": name})

    async def set_weight_version(self, link: ServerLink, version: int) -> None:
        await link.call("POST", "/update_weight_version", {"new_version": str(version), "abort_all_requests": False})
