"""Math answers: extract the final answer from a completion, and check it against a reference.

- :func:`extract_answer` (pure, instant): the last ``\\boxed{...}``, else ``#### x``, else
  "the answer is x", else the last number in the text.
- :func:`math_reward` (async): 1.0 if the completion's answer equals the reference, else 0.0.
  Exact and numeric matches are decided inline; everything else (fractions, LaTeX, expressions)
  goes to ``math-verify`` in a small process pool. math-verify bounds its own parsing and
  verification with ``signal.alarm``, which only works in a process's main thread: pool workers
  run tasks in their main thread, so its timeouts work there, and the event loop is never blocked.
  The caller's ``timeout_s`` bounds the whole check; when it passes, :class:`EnvError` is raised
  (a rejected sample, never a silent 0).

Not here: datasets (:mod:`agentflow.envs.tasks`), prompting (the workflows).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import multiprocessing
import os
import re
import threading

from agentflow.errors import EnvError

__all__ = [
    "extract_answer",
    "extract_boxed",
    "extract_hash_answer",
    "extract_last_number",
    "math_reward",
    "math_verify_equal",
    "numbers_equal",
    "shutdown_verifier_pool",
]

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*[:\s]*\$?\\?\(?\s*(" + _NUMBER + r"|[^\s.,;$]+)", re.IGNORECASE)


def extract_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None if absent."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j].strip()
    return None  # unbalanced: the completion was cut off inside the box


def extract_hash_answer(text: str) -> str | None:
    """The text after the last ``####`` (GSM8K's answer marker), first line only."""
    if "####" not in text:
        return None
    tail = text.rsplit("####", 1)[1].strip().splitlines()
    return _clean_number(tail[0]) if tail else None


def extract_last_number(text: str) -> str | None:
    found = re.findall(_NUMBER, text)
    return _clean_number(found[-1]) if found else None


def extract_answer(text: str) -> str | None:
    """The final answer of a completion: boxed, then ``####``, then "answer is", then last number."""
    for found in (extract_boxed(text), extract_hash_answer(text)):
        if found:
            return found
    m = list(_ANSWER_IS.finditer(text))
    if m:
        return _clean_number(m[-1].group(1))
    return extract_last_number(text)


def _clean_number(s: str) -> str:
    s = s.strip().rstrip(".").replace("$", "")
    return s.replace(",", "") if re.fullmatch(r"-?[\d,]+(\.\d+)?", s) else s


def numbers_equal(a: str, b: str, rel_tol: float = 1e-6) -> bool | None:
    """True/False when both parse as plain numbers, None when either does not."""
    try:
        x, y = float(_clean_number(a)), float(_clean_number(b))
    except ValueError:
        return None
    return math.isclose(x, y, rel_tol=rel_tol, abs_tol=1e-9)


# ------------------------------------------------------------------------------------ math-verify
def math_verify_equal(completion: str, answer: str) -> bool:
    """math-verify's verdict, run in the calling process (must be a main thread: uses SIGALRM)."""
    try:
        from math_verify import parse, verify
    except ImportError as e:
        raise EnvError("math-verify is not installed; expected it for symbolic answers. "
                       "Fix: pip install 'agentflow-rl[math]'") from e
    gold = parse(answer if "$" in answer or "\\" in answer else f"${answer}$")
    if not gold:
        raise EnvError(f"math-verify could not parse the reference answer {answer!r}; expected LaTeX or a number")
    return bool(verify(gold, parse(completion)))


_pool: concurrent.futures.ProcessPoolExecutor | None = None
_pool_lock = threading.Lock()


def _verifier_pool() -> concurrent.futures.ProcessPoolExecutor:
    """Two spawn workers (never fork a process that may hold threads), created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            ctx = multiprocessing.get_context("spawn")
            _pool = concurrent.futures.ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1), mp_context=ctx)
        return _pool


def shutdown_verifier_pool(wait: bool = True) -> None:
    """Stop the math-verify workers (they also stop at interpreter exit)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool.shutdown(wait=wait, cancel_futures=True)
            _pool = None


async def math_reward(completion: str, answer: str, *, timeout_s: float = 10.0) -> float:
    """1.0 if ``completion``'s final answer equals ``answer``, else 0.0.

    Raises:
        EnvError: the check did not finish within ``timeout_s``, or math-verify failed; the
            caller should reject the sample rather than score it.
    """
    pred = extract_answer(completion)
    if pred is not None:
        same = numbers_equal(pred, answer)
        if same is not None:
            return float(same)
        if pred.replace(" ", "") == answer.replace(" ", ""):
            return 1.0
    text = f"\\boxed{{{pred}}}" if pred is not None else completion
    fut = asyncio.wrap_future(_verifier_pool().submit(math_verify_equal, text, answer))
    try:
        async with asyncio.timeout(timeout_s):
            return float(await fut)
    except TimeoutError as e:
        raise EnvError(f"math verification took longer than timeout_s={timeout_s}s for answer {answer!r}; "
                       "rejecting the sample (raise timeout_s if the answers are large expressions)") from e
    except concurrent.futures.process.BrokenProcessPool as e:
        shutdown_verifier_pool(wait=False)
        raise EnvError(f"a math-verify worker died checking answer {answer!r}: {e}") from e
