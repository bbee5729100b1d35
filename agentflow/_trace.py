"""A run's timeline in the Trace Event Format: open it in https://ui.perfetto.dev or chrome://tracing.

One clock for everything that decides how stale a trained batch is and where a step's seconds go:

- each episode group, from the version it started at to where it ended: an async slice on its
  own row, named after its start version (``v3``: one colour per version), with its outcome
  (``buffered``, ``filtered``, ``cancelled`` or the rejection's reason) and the version it ended at;
- the trainer thread's phases: ``wait`` (for a batch; ``held_s``: of it, kept for episodes about to
  expire), ``train`` and ``publish`` (upload, pause, load, resume), each a slice;
- what the buffer gave the trainer (``take``: the groups, their lag in versions) and what it
  discarded and why (``stale``, ``filter``, ``requeue``), as instants;
- every version bump, as a global instant.

The file is a JSON array written as events happen and closed with ``]`` when the run ends; an
interrupted run leaves it without the bracket, which both viewers accept (and :func:`read_trace`).
Writes are buffered and flushed once per train step, so tracing costs a few microseconds an event.

Not here: when events happen (the executor, the buffer and the trainer call in), metrics
(``metrics.jsonl``), viewing (Perfetto reads the file as it is).
"""

from __future__ import annotations

import json
import pathlib
import threading
import time
from typing import Any, TextIO

__all__ = ["Timeline", "read_trace"]

_PID = 1
TRAINER_TID = 1  # the trainer thread's row
BUFFER_TID = 2  # the buffer's take / discard instants


class Timeline:
    """Writes trace events to ``path`` (thread-safe: the loop and the trainer thread both emit)."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO | None = self.path.open("w", encoding="utf-8")
        self._lock = threading.Lock()
        self._t0 = time.perf_counter()
        self._f.write("[\n")
        self._meta("process_name", 0, "agentflow")
        self._meta("thread_name", TRAINER_TID, "trainer")
        self._meta("thread_name", BUFFER_TID, "buffer")

    @classmethod
    def in_run_dir(cls, run_dir: str | pathlib.Path) -> Timeline:
        """``<run_dir>/trace.json``, or ``trace-2.json``, ... when a resumed run's earlier one is there."""
        run_dir = pathlib.Path(run_dir)
        path, n = run_dir / "trace.json", 1
        while path.exists():
            n += 1
            path = run_dir / f"trace-{n}.json"
        return cls(path)

    def now_us(self) -> int:
        return int((time.perf_counter() - self._t0) * 1e6)

    def _write(self, event: dict[str, Any]) -> None:
        line = json.dumps(event, separators=(",", ":"), default=str) + ",\n"
        with self._lock:
            if self._f is not None:
                self._f.write(line)

    def _meta(self, kind: str, tid: int, label: str) -> None:
        self._write({"name": kind, "ph": "M", "pid": _PID, "tid": tid, "args": {"name": label}})

    # ------------------------------------------------------------------ episodes (the event loop)
    def episode_start(self, group_id: str, version: int | None, *, direct: bool = False) -> None:
        name = "rollout()" if direct else f"v{version}"
        self._write({"name": name, "cat": "episode", "ph": "b", "id": group_id, "pid": _PID, "tid": 0,
                     "ts": self.now_us(), "args": {"group": group_id, "start_version": version}})

    def episode_end(self, group_id: str, start_version: int | None, end_version: int, outcome: str, *,
                    direct: bool = False, samples: int = 0) -> None:
        name = "rollout()" if direct else f"v{start_version}"  # the begin event's name (viewers pair both)
        self._write({"name": name, "cat": "episode", "ph": "e", "id": group_id, "pid": _PID, "tid": 0,
                     "ts": self.now_us(), "args": {"outcome": outcome, "end_version": end_version, "samples": samples}})

    def discard(self, group_id: str, why: str, min_version: int | None) -> None:
        """The buffer let go of a finished group: ``why`` is the buffer's word for it."""
        why = {"drop": "stale", "requeue": "stale, requeued"}.get(why, why)
        self.instant("discard", BUFFER_TID, group=group_id, why=why, min_version=min_version)

    # ------------------------------------------------------------------ trainer thread
    def span(self, name: str, start_us: int, end_us: int, **args: Any) -> None:
        """A finished phase of the trainer thread (``start_us`` / ``end_us`` from :meth:`now_us`)."""
        self._write({"name": name, "cat": "trainer", "ph": "X", "pid": _PID, "tid": TRAINER_TID,
                     "ts": start_us, "dur": max(end_us - start_us, 0), "args": args})

    def instant(self, name: str, tid: int, **args: Any) -> None:
        self._write({"name": name, "ph": "i", "s": "t", "pid": _PID, "tid": tid, "ts": self.now_us(), "args": args})

    def version(self, version: int) -> None:
        self._write({"name": f"version {version}", "ph": "i", "s": "g", "pid": _PID, "tid": TRAINER_TID,
                     "ts": self.now_us(), "args": {"version": version}})

    # ------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        with self._lock:
            if self._f is not None:
                self._f.flush()

    def close(self) -> None:
        """End the array (the file is valid JSON from here on). Idempotent."""
        with self._lock:
            f, self._f = self._f, None
        if f is not None:
            end = {"name": "end", "ph": "i", "s": "g", "pid": _PID, "tid": TRAINER_TID, "ts": self.now_us()}
            f.write(json.dumps(end, separators=(",", ":")) + "\n]\n")
            f.close()


def read_trace(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The events of a trace file, also one an interrupted run left without its closing ``]``."""
    text = pathlib.Path(path).read_text(encoding="utf-8").rstrip()
    if not text.endswith("]"):
        text = text.rstrip(",") + "]"
    try:
        events = json.loads(text)
    except json.JSONDecodeError:  # a crash mid-line: keep every complete event before it
        lines = text.splitlines()
        events = json.loads("\n".join(lines[:-1]).rstrip(",") + "]") if len(lines) > 1 else []
    return events
