"""The server-protocol adapter contract and the registry of protocols.

A remote inference engine (:class:`agentflow.engines.remote.RemoteEngine`) is two parts:

- the **server pool** (``engines/remote/_pool.py``): health checks, retries, routing, sticky
  sessions, failover, rejoin, deadlines, fan-out of pause/resume and weight updates. It knows
  HTTP (a connection error or a 5xx is worth a retry, a 4xx is not) but no server's routes;
- a **protocol adapter** (this contract, :class:`ServerProtocol`): which route and JSON body each
  operation is on one server, and how to read the answer. SGLang's is
  ``engines/remote/sglang.py``.

Adding a protocol is one adapter module plus one line in :data:`PROTOCOLS` (see
``docs/sglang.md``, "Adding a server protocol"); LoRA adapters, the weight version and every
weight update are protocol methods too, so nothing else changes. Not here: any HTTP, retry or routing code, or
any protocol's routes.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from agentflow import GenerationConfig
from agentflow.errors import ConfigError

__all__ = ["PROTOCOLS", "BroadcastSpec", "GenerateJob", "Generated", "ServerLink", "ServerProtocol", "WeightGroup",
           "resolve_protocol"]

# name -> "module:attribute" of the adapter class (imported on first use, so the registry is light).
PROTOCOLS: dict[str, str] = {
    "sglang": "agentflow.engines.remote.sglang:SGLangProtocol",
    "vllm": "agentflow.engines.remote.vllm:VLLMProtocol",
}

Finish = Literal["stop", "length", "abort"]


@dataclass(frozen=True, slots=True)
class GenerateJob:
    """One generation attempt on one server.

    Attributes:
        input_ids: the prompt plus the tokens generated before an earlier abort.
        gconfig: the request's sampling parameters.
        max_new_tokens: tokens still to generate (``gconfig.max_new_tokens`` minus those so far).
        rid: a fresh request id for this attempt (32 hex digits: never reused, never a prefix).
        adapter: the served name of the LoRA adapter to generate with (None: the base model).
    """

    input_ids: list[int]
    gconfig: GenerationConfig
    max_new_tokens: int
    rid: str
    adapter: str | None = None


@dataclass(frozen=True, slots=True)
class Generated:
    """What one attempt produced.

    Attributes:
        tokens: the output token ids of this attempt.
        logprobs: one log-probability per token (``-inf`` for a non-finite one).
        versions: the policy version of each token, or None where the server did not say (the
            engine then uses its own version at the time of the answer).
        finish: ``"stop"``/``"length"`` (done) or ``"abort"`` (paused or aborted: the engine waits
            for resume and asks for the rest).
    """

    tokens: list[int]
    logprobs: list[float]
    versions: list[int | None]
    finish: Finish

    def __post_init__(self) -> None:
        n = len(self.tokens)
        if len(self.logprobs) != n or len(self.versions) != n:
            raise ValueError(f"Generated needs one logprob and one version per token; got {n} tokens, "
                             f"{len(self.logprobs)} logprobs, {len(self.versions)} versions (adapter bug)")
        if self.finish not in ("stop", "length", "abort"):
            raise ValueError(f"Generated.finish must be 'stop', 'length' or 'abort', got {self.finish!r} "
                             "(adapter bug: map the server's finish reason onto these three)")


@dataclass(frozen=True, slots=True)
class WeightGroup:
    """This server's place in the trainer's weight-broadcast group (the trainer is rank 0)."""

    master_address: str
    master_port: int
    group_name: str
    backend: str
    rank_offset: int
    world_size: int


@dataclass(frozen=True, slots=True)
class BroadcastSpec:
    """The tensors the trainer is about to broadcast, in broadcast order."""

    names: list[str]
    dtypes: list[str]  # torch dtype names without "torch.": "bfloat16", "float32"
    shapes: list[list[int]]
    group_name: str
    version: int | None


class ServerLink(Protocol):
    """One server as an adapter sees it; the pool makes one per call.

    ``call`` sends one HTTP request and returns the decoded JSON answer (``{}`` for an empty or
    non-JSON body). A connection error or a 5xx raises an error the pool retries (and may mark the
    server down); a 4xx raises :class:`~agentflow.errors.ServerError` with the server's message (a
    401 with how to set the API key, which the pool sends as ``Authorization: Bearer <key>``).
    The pool sets the deadline around the whole adapter method.
    """

    address: str

    async def call(self, method: str, path: str, body: Any = None) -> Any: ...


class ServerProtocol(Protocol):
    """How each engine operation is spoken to one server. Stateless: one instance serves any pool.

    Raise :class:`~agentflow.errors.ServerError` for an answer that breaks the protocol; never
    retry, sleep or pick servers (the pool does).
    """

    name: str  # for messages: "SGLang"
    launch_hint: str  # how to start a server, for the "no server became healthy" error

    def error_text(self, body: str) -> str:
        """The readable message in the body of an error answer (4xx, 5xx)."""
        ...

    async def health(self, link: ServerLink) -> None:
        """Return when the server is ready to generate; raise when it is not."""
        ...

    async def tp_size(self, link: ServerLink) -> int:
        """How many ranks the server has in a weight-broadcast group."""
        ...

    async def weight_version(self, link: ServerLink) -> int | None:
        """The policy version of the server's weights; None when it cannot tell."""
        ...

    async def generate(self, link: ServerLink, job: GenerateJob) -> Generated:
        """Generate for one attempt; an aborted attempt returns its partial output."""
        ...

    async def pause(self, link: ServerLink) -> None:
        """Stop generating: in-flight requests return their partial output (finish ``"abort"``)."""
        ...

    async def resume(self, link: ServerLink) -> None:
        """Generate again after :meth:`pause`."""
        ...

    async def update_weights_from_disk(self, link: ServerLink, path: str, version: int | None) -> None:
        """Load the checkpoint directory ``path`` (readable by the server) as ``version``."""
        ...

    async def init_weight_group(self, link: ServerLink, group: WeightGroup) -> None:
        """Join the trainer's broadcast group (once per group)."""
        ...

    async def update_weights_from_distributed(self, link: ServerLink, spec: BroadcastSpec) -> None:
        """Receive the broadcast tensors of ``spec`` and load them; return when loaded."""
        ...

    # LoRA (optional: a protocol without these three cannot serve adapters, and an adapter update on
    # it fails naming the missing methods)
    async def load_adapter(self, link: ServerLink, name: str, path: str) -> None:
        """Load the PEFT adapter directory ``path`` (readable by the server) under the served ``name``."""
        ...

    async def unload_adapter(self, link: ServerLink, name: str) -> None:
        """Unload the served adapter ``name`` (its requests in flight finish first)."""
        ...

    async def set_weight_version(self, link: ServerLink, version: int) -> None:
        """Set the version the server reports for its weights, aborting nothing."""
        ...

    # Optional: a protocol without it accepts every healthy server.
    async def check_server(self, link: ServerLink) -> None:
        """Refuse a server the adapter cannot speak to (e.g. an unsupported version): raise
        :class:`~agentflow.errors.ConfigError` naming what is supported. The pool calls it when a
        server is first healthy (a refusal fails ``open``) and before a server rejoins (a refused
        one stays down)."""
        ...


# Members an adapter may leave out: without them it serves no LoRA adapters.
LORA_METHODS = ("load_adapter", "unload_adapter", "set_weight_version")
# Every member an adapter must have: the attributes, then the methods, in the contract's order.
_MEMBERS = [*ServerProtocol.__annotations__,
            *(n for n, v in vars(ServerProtocol).items()
              if callable(v) and not n.startswith("_") and n not in (*LORA_METHODS, "check_server"))]


def resolve_protocol(protocol: str | ServerProtocol) -> ServerProtocol:
    """A registered name (:data:`PROTOCOLS`) or an adapter object -> the adapter object."""
    if isinstance(protocol, str):
        if protocol not in PROTOCOLS:
            raise ConfigError(f"unknown server protocol {protocol!r}; expected one of {sorted(PROTOCOLS)}. To add "
                              "one, write an adapter module and register it in PROTOCOLS (engines/remote/protocol.py)")
        module, _, attr = PROTOCOLS[protocol].partition(":")
        protocol = getattr(importlib.import_module(module), attr)()
    missing = [m for m in _MEMBERS if not hasattr(protocol, m)]
    if missing:
        raise ConfigError(f"{type(protocol).__name__} is not a ServerProtocol adapter: it lacks {missing}; "
                          "implement every member of engines/remote/protocol.py:ServerProtocol")
    return protocol  # type: ignore[return-value]  # checked member by member just above
