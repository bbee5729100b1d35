"""Value types that cross every boundary: generation requests and responses, trajectories.

Token sequences are plain Python lists (no torch import here): rollout code builds thousands of
them per second and the train engine turns a batch into tensors once.

Not here: batching into tensors (``agentflow.algo.pad_trajectories``), generation itself (engines).
"""

from __future__ import annotations

import itertools
import math
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from agentflow.errors import ConfigError, TrajectoryError

__all__ = ["GenerationConfig", "ModelRequest", "ModelResponse", "StopReason", "Trajectory"]

StopReason = Literal["stop", "length", "tool_calls", "abort"]
_STOP_REASONS = ("stop", "length", "tool_calls", "abort")
_MINUS_ONE, _ZERO = -1, 0
REWARD_LIMIT = 1e9  # |reward| above this overflows float32 advantage statistics (variance of 1e300 is inf)
_RID_PREFIX = uuid.uuid4().hex[:12]
_rid_counter = itertools.count()


def new_rid() -> str:
    """A process-unique request id. Fixed width, so no id is a prefix of another (SGLang's abort
    matches rids by prefix)."""
    return f"{_RID_PREFIX}-{next(_rid_counter):012x}"


def check_reward(reward: Any) -> float:
    """``reward`` as a float; :class:`TrajectoryError` unless it is a finite number within ±REWARD_LIMIT."""
    if isinstance(reward, bool) or not isinstance(reward, int | float):
        raise TrajectoryError(f"reward must be a number, got {type(reward).__name__} {reward!r}")
    if not (math.isfinite(reward) and abs(reward) <= REWARD_LIMIT):
        raise TrajectoryError(f"reward must be finite and within ±{REWARD_LIMIT:g}, got {reward!r} (larger rewards "
                              "overflow the float32 advantage statistics and every update is skipped); "
                              "rescale the reward")
    return float(reward)


@dataclass(frozen=True, slots=True)
class GenerationConfig:
    """Sampling parameters of one generation call.

    Attributes:
        n_samples: samples per prompt (workflows that sample groups read it; engines take 1).
        max_new_tokens: generated tokens at most.
        temperature: softmax temperature; 0 means greedy.
        top_p: nucleus sampling mass, in (0, 1].
        top_k: sample from the k most likely tokens; <= 0 means the whole vocabulary.
        stop_token_ids: tokens that end generation (the matched token is part of the output, as in SGLang).
        stop: strings that end generation.
        greedy: greedy decoding regardless of temperature.
    """

    n_samples: int = 1
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    greedy: bool = False

    def __post_init__(self) -> None:
        problems = []
        if self.n_samples < 1:
            problems.append(f"n_samples must be >= 1, got {self.n_samples}")
        if self.max_new_tokens < 1:
            problems.append(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            problems.append(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            problems.append(f"top_p must be in (0, 1], got {self.top_p}")
        ConfigError.check(problems)
        # Accept lists from YAML/JSON but store tuples so the config stays hashable.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature == 0

    def new(self, **changes: Any) -> GenerationConfig:
        """Return a copy with ``changes`` applied (validated again)."""
        return replace(self, **changes)


@dataclass(frozen=True, slots=True)
class ModelRequest:
    """One generation call: a prompt as token ids and how to sample from it."""

    input_ids: list[int]
    gconfig: GenerationConfig = field(default_factory=GenerationConfig)
    rid: str = field(default_factory=new_rid)
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.input_ids) == 0:
            raise TrajectoryError("ModelRequest.input_ids is empty; expected at least one prompt token")


@dataclass(frozen=True, slots=True)
class ModelResponse:
    """What an engine returns for one :class:`ModelRequest`.

    ``output_versions[i]`` is the policy version that produced ``output_tokens[i]``; when a
    generation was interrupted by a weight update, the tokens after it carry the new version.
    ``latency`` and ``ttft`` are seconds (time to first token, or to the whole output where the
    engine cannot tell).
    """

    input_tokens: list[int]
    output_tokens: list[int]
    output_logprobs: list[float]
    output_versions: list[int]
    stop_reason: StopReason = "stop"
    latency: float = 0.0
    ttft: float = 0.0

    def __post_init__(self) -> None:
        n = len(self.output_tokens)
        if len(self.output_logprobs) != n or len(self.output_versions) != n:
            raise TrajectoryError(
                f"ModelResponse fields disagree: {n} output_tokens, {len(self.output_logprobs)} "
                f"output_logprobs, {len(self.output_versions)} output_versions; expected equal lengths"
            )
        if self.stop_reason not in _STOP_REASONS:
            raise TrajectoryError(f"stop_reason must be one of {_STOP_REASONS}, got {self.stop_reason!r}")

    @property
    def output_len(self) -> int:
        return len(self.output_tokens)


@dataclass(frozen=True, slots=True)
class Trajectory:
    """One training sequence.

    Attributes:
        input_ids: every token of the sequence (prompt, generated, tool/user turns).
        loss_mask: 1 on tokens the policy generated (trained on), 0 elsewhere.
        logprobs: behaviour log-probs of the policy tokens, 0.0 where ``loss_mask`` is 0.
        versions: policy version that produced each policy token, -1 on other tokens.
        reward: scalar episode reward.
        group_id: shared by the samples of one prompt (group-relative advantages).
        info: free metadata. The trainer reads only ``finish_reason`` / ``truncated`` (see
            :attr:`truncated`), for overlong handling and the truncation-rate metric.
    """

    input_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    versions: list[int]
    reward: float = 0.0
    group_id: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.input_ids)
        lens = (len(self.loss_mask), len(self.logprobs), len(self.versions))
        if lens != (n, n, n):
            raise TrajectoryError(
                f"Trajectory fields disagree: input_ids {n}, loss_mask {lens[0]}, logprobs {lens[1]}, "
                f"versions {lens[2]}; expected equal lengths"
            )
        mask, versions = self.loss_mask, self.versions
        # C-speed checks (map/count); the slow loop below only runs to name the bad token.
        if (
            mask.count(0) + mask.count(1) != n
            or (n and min(versions) < -1)
            or list(map(_MINUS_ONE.__eq__, versions)) != list(map(_ZERO.__eq__, mask))
        ):
            for i, (m, v) in enumerate(zip(mask, versions, strict=True)):
                if m not in (0, 1) or (m == 1) != (v >= 0) or v < -1:
                    raise TrajectoryError(
                        f"token {i}: loss_mask={m}, version={v}; expected loss_mask in {{0, 1}}, "
                        "version >= 0 on policy tokens (mask 1) and -1 elsewhere"
                    )
        check_reward(self.reward)
        if not math.isfinite(sum(self.logprobs)):  # one C-speed pass; the loop below only names the token
            i, lp = next((i, lp) for i, lp in enumerate(self.logprobs) if not math.isfinite(lp))
            raise TrajectoryError(f"token {i}: log-prob {lp}; expected finite log-probs (a NaN or infinite "
                                  "log-prob makes the update skip); check the engine that produced them")
        if n and mask[0] == 1:
            raise TrajectoryError("loss_mask[0] = 1; expected the first token to be prompt (loss_mask 0): nothing "
                                  "predicts the first token, so it cannot be trained on")

    # ----------------------------------------------------------------------------- builders
    @classmethod
    def from_response(
        cls,
        resp: ModelResponse,
        reward: float = 0.0,
        *,
        prompt_ids: Sequence[int] | None = None,
        group_id: str = "",
        info: dict[str, Any] | None = None,
    ) -> Trajectory:
        """Prompt (masked) followed by the generated tokens (trained on)."""
        prompt = list(resp.input_tokens if prompt_ids is None else prompt_ids)
        p, o = len(prompt), len(resp.output_tokens)
        return cls(
            input_ids=prompt + list(resp.output_tokens),
            loss_mask=[0] * p + [1] * o,
            logprobs=[0.0] * p + list(resp.output_logprobs),
            versions=[-1] * p + list(resp.output_versions),
            reward=reward,
            group_id=group_id,
            info=dict(info or {}),
        )

    @classmethod
    def concat(cls, parts: Sequence[Trajectory], reward: float | None = None) -> Trajectory:
        """Join turns into one sequence; reward defaults to the last part's."""
        if not parts:
            raise TrajectoryError("Trajectory.concat needs at least one part, got none")
        last = parts[-1]
        return cls(
            input_ids=list(itertools.chain.from_iterable(p.input_ids for p in parts)),
            loss_mask=list(itertools.chain.from_iterable(p.loss_mask for p in parts)),
            logprobs=list(itertools.chain.from_iterable(p.logprobs for p in parts)),
            versions=list(itertools.chain.from_iterable(p.versions for p in parts)),
            reward=last.reward if reward is None else reward,
            group_id=last.group_id,
            info=dict(last.info),
        )

    def extend(self, tokens: Sequence[int], resp: ModelResponse | None = None) -> Trajectory:
        """Append masked ``tokens`` (tool/user text), then ``resp``'s generated tokens if given."""
        ids, mask = self.input_ids + list(tokens), self.loss_mask + [0] * len(tokens)
        lps, vers = self.logprobs + [0.0] * len(tokens), self.versions + [-1] * len(tokens)
        if resp is not None:
            ids += resp.output_tokens
            mask += [1] * resp.output_len
            lps += resp.output_logprobs
            vers += resp.output_versions
        return replace(self, input_ids=ids, loss_mask=mask, logprobs=lps, versions=vers)

    def with_(self, **changes: Any) -> Trajectory:
        """A copy with ``changes`` applied (e.g. ``traj.with_(reward=1.0)``)."""
        return replace(self, **changes)

    # ----------------------------------------------------------------------------- views
    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_policy_tokens(self) -> int:
        return sum(self.loss_mask)

    @property
    def truncated(self) -> bool:
        """Whether generation was cut at the token budget: ``info["truncated"]`` if the workflow set
        it, else ``info["finish_reason"] == "length"`` (the built-in workflows and the client record
        the finish reason of the last generation there)."""
        flag = self.info.get("truncated")
        return bool(flag) if flag is not None else self.info.get("finish_reason") == "length"

    @property
    def min_version(self) -> int | None:
        """Oldest policy version among the policy tokens (None if there are none)."""
        vs = [v for v in self.versions if v >= 0]
        return min(vs) if vs else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "input_ids": self.input_ids,
            "loss_mask": self.loss_mask,
            "logprobs": self.logprobs,
            "versions": self.versions,
            "reward": self.reward,
            "group_id": self.group_id,
            "info": self.info,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trajectory:
        return cls(**d)
