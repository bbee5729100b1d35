"""Test doubles at the seams: a fake inference engine, a byte tokenizer, a tiny model.

Nothing here downloads anything. ``FakeEngine`` needs only the standard library;
``byte_tokenizer`` needs ``tokenizers`` and ``transformers``; ``tiny_model_and_tokenizer`` needs
torch as well (imported on call).

Not here: anything for production runs; nothing in it downloads or loads real weights.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from agentflow._engine_api import InferenceEngine, WeightUpdateMeta
from agentflow._rollout_config import RolloutConfig
from agentflow._types import ModelRequest, ModelResponse

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerFast

__all__ = ["CHATML_TEMPLATE", "FakeEngine", "byte_tokenizer", "random_latency", "tiny_model_and_tokenizer"]

Latency = float | Callable[[], float]
Reply = Callable[[ModelRequest], list[int]]


def _default_reply(req: ModelRequest) -> list[int]:
    base = sum(req.input_ids)
    return [(base + i) % 250 + 3 for i in range(req.gconfig.max_new_tokens)]


class FakeEngine(InferenceEngine):
    """An :class:`InferenceEngine` that returns tokens after a latency, tagged with the version.

    Args:
        latency: seconds per ``agenerate`` call, or a callable drawing them (e.g.
            ``lambda: random.expovariate(100)``). 0 returns without sleeping.
        rollout: rollout configuration of the owned executor.
        reply: maps a request to its output tokens (default: ``max_new_tokens`` tokens derived
            from the prompt); output is cut after the first stop token id.
        logprob: the log-prob reported for every token.

    Pauses behave like a real engine's: a call in flight when :meth:`pause` runs stops, waits for
    :meth:`resume` and finishes the rest of its tokens under the new version.
    """

    def __init__(
        self,
        latency: Latency = 0.0,
        rollout: RolloutConfig | None = None,
        *,
        reply: Reply = _default_reply,
        logprob: float = -0.5,
    ) -> None:
        super().__init__(rollout)
        self.latency = latency
        self.reply = reply
        self.logprob = logprob
        self.n_calls = 0
        self.n_interrupted = 0
        self.weight_updates: list[WeightUpdateMeta] = []
        self._sleepers: set[asyncio.Future[bool]] = set()

    def _draw_latency(self) -> float:
        return float(self.latency() if callable(self.latency) else self.latency)

    async def agenerate(self, req: ModelRequest) -> ModelResponse:
        self.n_calls += 1
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        tokens = self.reply(req)
        stops = set(req.gconfig.stop_token_ids)
        stop_at = next((i for i, t in enumerate(tokens) if t in stops), None)
        if stop_at is not None:
            tokens = tokens[: stop_at + 1]
        versions = await self._generate_over_time(len(tokens), self._draw_latency())
        latency = loop.time() - t0
        return ModelResponse(
            input_tokens=list(req.input_ids),
            output_tokens=tokens,
            output_logprobs=[self.logprob] * len(tokens),
            output_versions=versions,
            stop_reason="stop" if stop_at is not None else "length",
            latency=latency,
            ttft=latency,
        )

    async def _generate_over_time(self, n: int, delay: float) -> list[int]:
        """Spread ``n`` tokens over ``delay`` seconds; a pause splits them between versions."""
        versions: list[int] = []
        while len(versions) < n:
            await self.wait_until_resumed()
            v, start = self._version, asyncio.get_running_loop().time()
            left = n - len(versions)
            if delay <= 0 or not await self._interrupted_within(delay * left / n):
                versions += [v] * left
                break
            self.n_interrupted += 1
            done = int(left * min(1.0, (asyncio.get_running_loop().time() - start) / (delay * left / n)))
            versions += [v] * done
        return versions

    async def _interrupted_within(self, seconds: float) -> bool:
        """Sleep ``seconds``; return True early if :meth:`pause` interrupts the sleep."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[bool] = loop.create_future()
        handle = loop.call_later(seconds, _resolve, fut, False)
        self._sleepers.add(fut)
        try:
            return await fut
        finally:
            handle.cancel()
            self._sleepers.discard(fut)

    async def _interrupt(self) -> None:
        for fut in self._sleepers:
            _resolve(fut, True)

    async def aupdate_weights(self, meta: WeightUpdateMeta) -> None:
        self.weight_updates.append(meta)


def _resolve(fut: asyncio.Future[bool], value: bool) -> None:
    if not fut.done():
        fut.set_result(value)


def random_latency(mean_s: float, seed: int = 0) -> Callable[[], float]:
    """Exponentially distributed latencies with the given mean (seeded)."""
    rng = random.Random(seed)
    return lambda: rng.expovariate(1.0 / mean_s)


# ChatML with Qwen-style tool calls: tools listed in the system turn, calls as
# <tool_call>{"name": ..., "arguments": ...}</tool_call>, results as <tool_response> in a user turn.
CHATML_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n"
    "{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "# Tools\n\nYou may call one or more functions. Available tools:\n<tools>\n"
    "{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}</tools>\n\n"
    'Call a tool as <tool_call>\n{"name": <name>, "arguments": <args-json>}\n</tool_call><|im_end|>\n'
    "{% endif %}"
    "{% for message in messages %}"
    "{% if message.role == 'system' and tools %}"
    "{% elif message.role == 'tool' %}<|im_start|>user\n<tool_response>\n{{ message.content }}\n"
    "</tool_response><|im_end|>\n"
    "{% else %}<|im_start|>{{ message.role }}\n{% if message.content %}{{ message.content }}{% endif %}"
    "{% if message.tool_calls %}{% for tc in message.tool_calls %}"
    '<tool_call>\n{"name": "{{ tc.function.name }}", "arguments": '
    "{% if tc.function.arguments is string %}{{ tc.function.arguments }}"
    "{% else %}{{ tc.function.arguments | tojson }}{% endif %}}\n</tool_call>"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (256 byte tokens + 3 specials) with the ChatML chat template.

    Ids 0-255 are bytes, 256 ``<|endoftext|>`` (pad), 257 ``<|im_start|>``, 258 ``<|im_end|>`` (eos).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    byte_of = {ch: i for i, ch in enumerate(_bytes_to_unicode())}
    vocab = {ch: byte_of[ch] for ch in alphabet}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(_SPECIALS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token=None
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _bytes_to_unicode() -> list[str]:
    """GPT-2's byte -> printable character map, as a list indexed by byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in printable:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tiny_model_and_tokenizer(
    seed: int = 0, *, hidden_size: int = 64, num_layers: int = 2, **overrides: Any
) -> tuple[PreTrainedModel, PreTrainedTokenizerFast]:
    """A 2-layer Llama built from a config (random, seeded) and :func:`byte_tokenizer`. No files."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = byte_tokenizer()
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, bos_token_id=None, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, **overrides,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok
