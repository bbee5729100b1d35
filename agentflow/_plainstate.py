"""Plain-data encoding of run state for checkpoints: JSON that round-trips tuples, bytes and
non-string dict keys, and can never run code when read.

:func:`dumps` accepts ``None``, bools, ints, floats (NaN and infinities included), strings, lists,
tuples, dicts and bytes, nested. Anything else is refused with the path of the offending value,
except below keys named ``info`` (free trajectory metadata the trainer never reads), where an
unknown object is stored as its ``repr`` string and reported once in the ``lossy`` list the caller
passes. :func:`loads` is ``json.loads`` plus the inverse of the three tags below; it builds only
the types listed, so a crafted file cannot execute anything.

Tags: ``{"__tuple__": [...]}``, ``{"__bytes__": "<base64>"}``, ``{"__items__": [[k, v], ...]}``
(a dict with a non-string key, or one that itself looks like a tag).

Not here: where the files go or how they are verified (:mod:`agentflow._checkpoint`).
"""

from __future__ import annotations

import base64
import json
from typing import Any

from agentflow.errors import CheckpointError

__all__ = ["dumps", "loads"]

_TAGS = ("__tuple__", "__bytes__", "__items__")


def dumps(obj: Any, *, what: str, lossy: list[str] | None = None) -> bytes:
    """``obj`` as UTF-8 JSON bytes; ``what`` names it in errors (e.g. ``"rollout state"``)."""
    return json.dumps(_encode(obj, what, lossy, in_info=False), separators=(",", ":")).encode()


def loads(raw: bytes | str, *, what: str) -> Any:
    """Parse what :func:`dumps` wrote. Raises :class:`CheckpointError` on anything malformed."""
    try:
        return json.loads(raw, object_hook=_decode_tag)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{what} is not valid JSON ({e}); the file is damaged or not an agentflow "
                              "checkpoint file") from e


def _encode(obj: Any, path: str, lossy: list[str] | None, *, in_info: bool) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, list):
        return [_encode(v, f"{path}[{i}]", lossy, in_info=in_info) for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, f"{path}[{i}]", lossy, in_info=in_info) for i, v in enumerate(obj)]}
    if isinstance(obj, bytes | bytearray):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, dict):
        return _encode_dict(obj, path, lossy, in_info=in_info)
    if in_info:
        if lossy is not None:
            lossy.append(f"{path} ({type(obj).__name__})")
        return repr(obj)
    raise CheckpointError(
        f"{path} is a {type(obj).__module__}.{type(obj).__qualname__}; checkpoints store plain data only "
        "(None, bool, int, float, str, list, tuple, dict, bytes) so that loading them cannot run code. "
        "Make dataset rows and workflow data plain data."
    )


def _encode_dict(obj: dict[Any, Any], path: str, lossy: list[str] | None, *, in_info: bool) -> Any:
    plain = all(isinstance(k, str) for k in obj) and not any(k in _TAGS for k in obj)
    if plain:
        return {k: _encode(v, f"{path}[{k!r}]", lossy, in_info=in_info or k == "info") for k, v in obj.items()}
    items = [[_encode(k, f"{path} key {k!r}", lossy, in_info=in_info),
              _encode(v, f"{path}[{k!r}]", lossy, in_info=in_info)] for k, v in obj.items()]
    return {"__items__": items}


def _decode_tag(d: dict[str, Any]) -> Any:
    if len(d) != 1:
        return d
    (key, value), = d.items()
    if key == "__tuple__" and isinstance(value, list):
        return tuple(value)
    if key == "__bytes__" and isinstance(value, str):
        return base64.b64decode(value)
    if key == "__items__" and isinstance(value, list):
        return {_hashable(k): v for k, v in value}
    return d


def _hashable(k: Any) -> Any:
    if isinstance(k, list):
        return tuple(_hashable(x) for x in k)
    if isinstance(k, dict):
        raise ValueError("a dict cannot be a dict key")
    return k
