"""A run's timeline in the Trace Event Format: open it in https://ui.perfetto.dev or chrome://tracing.

One clock for everything that decides how stale a trained batch is and where a step's seconds go:

- each episode group, from the version it started at to where it ended: an async slice on its
  own row, named after its start version (``v3``: one colour per version), with its outcome
  (``buffered``, ``filter``, ``cancelled`` or the rejection's reason) and the version it ended at;
- the trainer thread's phases: ``wait`` (for a batch; ``held_s``: of it, kept for episodes about to
  expire), ``train`` and ``publish`` (upload, pause, load, resume), each a slice; held-out
  evaluations on a row of their own;
- what the buffer gave the trainer (``take``: the groups, their lag in versions) and what it
  discarded and why (``stale``, ``filter``, ``requeue``), as instants;
- every version bump, as a global instant.

The file is a JSON array written as events happen and closed with ``]`` when the run ends; an
interrupted run leaves it without the bracket, which both viewers accept (and :func:`read_trace`).
Events are queued in memory and written once per train step by the trainer thread, so the event
loop does no file I/O for them and tracing costs a few microseconds an event.

Not here: when events happen (the executor, the buffer and the trainer call in), metrics
(``metrics.jsonl``), viewing (Perfetto reads the file as it is).
"""

from __future__ import annotations

import json
import pathlib
import re
import statistics
import threading
import time
from collections import Counter
from typing import Any, TextIO

from agentflow.errors import ConfigError

__all__ = ["Timeline", "format_summary", "read_trace", "summarize_trace"]

_PID = 1
TRAINER_TID = 1  # the trainer thread's row
BUFFER_TID = 2  # the buffer's take / discard instants
EVAL_TID = 3  # held-out evaluations


class Timeline:
    """Writes trace events to ``path`` (thread-safe: the loop and the trainer thread both emit)."""

    def __init__(self, path: str | pathlib.Path) -> None:
        self.path = pathlib.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f: TextIO | None = self.path.open("w", encoding="utf-8")
        self._lock = threading.Lock()
        self._pending: list[str] = []  # events since the last flush
        self._t0 = time.perf_counter()
        self._f.write("[\n")
        self._meta("process_name", 0, "agentflow")
        self._meta("thread_name", TRAINER_TID, "trainer")
        self._meta("thread_name", BUFFER_TID, "buffer")
        self._meta("thread_name", EVAL_TID, "evaluation")
        self.flush()

    @classmethod
    def in_run_dir(cls, run_dir: str | pathlib.Path) -> Timeline:
        """``<run_dir>/trace.json``, or ``trace-2.json``, ... when a resumed run's earlier one is there."""
        run_dir = pathlib.Path(run_dir)
        path, n = run_dir / "trace.json", 1
        while path.exists():
            n += 1
            path = run_dir / f"trace-{n}.json"
        return cls(path)

    def now_us(self, at: float | None = None) -> int:
        """Microseconds since the timeline began, now or at ``at`` (a ``time.perf_counter()`` value)."""
        return int(((time.perf_counter() if at is None else at) - self._t0) * 1e6)

    def _write(self, event: dict[str, Any]) -> None:
        """Queue one event; the file is written only by :meth:`flush` (the trainer thread, once a step)
        and :meth:`close`, so the event loop never does file I/O for the timeline."""
        line = json.dumps(event, separators=(",", ":"), default=str) + ",\n"
        with self._lock:
            if self._f is not None:
                self._pending.append(line)

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
    def span(self, name: str, start: float, end: float, **args: Any) -> None:
        """A finished phase of the trainer thread, from ``start`` to ``end`` (``time.perf_counter()``)."""
        ts = self.now_us(start)
        self._write({"name": name, "cat": "trainer", "ph": "X", "pid": _PID, "tid": TRAINER_TID,
                     "ts": ts, "dur": max(self.now_us(end) - ts, 0), "args": args})

    def evaluation(self, version: int, start: float, end: float, **args: Any) -> None:
        """A held-out evaluation of ``version`` (it runs on the event loop beside rollout)."""
        ts = self.now_us(start)
        self._write({"name": f"evaluate v{version}", "cat": "eval", "ph": "X", "pid": _PID, "tid": EVAL_TID,
                     "ts": ts, "dur": max(self.now_us(end) - ts, 0), "args": {"version": version, **args}})

    def instant(self, name: str, tid: int, at: float | None = None, **args: Any) -> None:
        """A point event on row ``tid``, now or at ``at`` (``time.perf_counter()``)."""
        self._write({"name": name, "ph": "i", "s": "t", "pid": _PID, "tid": tid, "ts": self.now_us(at), "args": args})

    def version(self, version: int) -> None:
        self._write({"name": f"version {version}", "ph": "i", "s": "g", "pid": _PID, "tid": TRAINER_TID,
                     "ts": self.now_us(), "args": {"version": version}})

    # ------------------------------------------------------------------ lifetime
    def flush(self) -> None:
        """Write the queued events (whole lines only, so a killed run leaves no torn event)."""
        with self._lock:
            lines, self._pending, f = self._pending, [], self._f
        if f is not None and lines:
            f.write("".join(lines))
            f.flush()

    def close(self) -> None:
        """Write what is queued and end the array (the file is valid JSON from here on). Idempotent."""
        self.flush()
        with self._lock:
            f, self._f, rest = self._f, None, self._pending
        if f is not None:
            end = {"name": "end", "ph": "i", "s": "g", "pid": _PID, "tid": TRAINER_TID, "ts": self.now_us()}
            f.write("".join(rest) + json.dumps(end, separators=(",", ":")) + "\n]\n")
            f.close()


def trace_file(path: str | pathlib.Path) -> pathlib.Path:
    """``path`` itself if it is a file, else the newest ``trace*.json`` of the run directory ``path``."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise ConfigError(f"expected a run directory or a trace file, got {str(path)!r}, which does not exist")
    found = [(int(m.group(1) or 1), f) for f in path.glob("trace*.json") if (m := _TRACE_NAME.fullmatch(f.name))]
    if not found:
        raise ConfigError(f"no trace.json in {str(path)!r}; run with logging.trace=true "
                          "(Trainer(trace=True)) to write one")
    return max(found)[1]


_TRACE_NAME = re.compile(r"trace(?:-(\d+))?\.json")


def read_trace(path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The events of a trace file, also one an interrupted run left without its closing ``]``."""
    path = pathlib.Path(path)
    text = path.read_text(encoding="utf-8").rstrip()
    if not text.startswith("["):
        raise ConfigError(f"{str(path)!r} is not a trace agentflow wrote: expected a JSON array of trace events, "
                          f"got text starting {text[:40]!r}")
    if not text.endswith("]"):
        text = text.rstrip(",") + "]"
    try:
        events = json.loads(text)
    except json.JSONDecodeError:  # a crash mid-line: keep every complete event before it
        lines = text.splitlines()
        try:
            events = json.loads("\n".join(lines[:-1]).rstrip(",") + "]") if len(lines) > 1 else []
        except json.JSONDecodeError as e:
            raise ConfigError(f"{str(path)!r} is not a trace agentflow wrote (a JSON array of trace events): "
                              f"{e}") from None
    if not isinstance(events, list) or not all(isinstance(e, dict) for e in events):
        raise ConfigError(f"{str(path)!r} is not a trace agentflow wrote: expected a JSON array of event objects")
    return events


def summarize_trace(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per step: wait / held / train / publish seconds and the lags of the groups taken; per run:
    the episode groups' outcomes and durations by start version, and the discards."""
    steps: dict[int, dict[str, Any]] = {}
    begins: dict[str, dict[str, Any]] = {}
    durations: dict[str, list[float]] = {}
    outcomes: Counter[str] = Counter()
    discards: Counter[str] = Counter()
    evaluations: list[dict[str, Any]] = []
    for e in events:
        name, args = e.get("name"), e.get("args") or {}
        if e.get("cat") == "eval":
            evaluations.append({"version": args.get("version"), "s": round(e.get("dur", 0) / 1e6, 3),
                                "reward": args.get("reward")})
        elif e.get("cat") == "trainer":
            step = steps.setdefault(args.get("step", args.get("version")), {})
            step[f"{name}_s"] = round(e.get("dur", 0) / 1e6, 3)
            if name == "wait":
                step["held_s"] = args.get("held_s", 0.0)
        elif name == "take":
            lags = Counter(args.get("lags") or [])
            steps.setdefault(args.get("step"), {})["lags"] = {str(k): lags[k] for k in sorted(lags, key=str)}
        elif name == "discard":
            discards[args.get("why", "?")] += 1
        elif e.get("cat") == "episode" and e.get("ph") == "b":
            begins[e["id"]] = e
        elif e.get("cat") == "episode" and e.get("ph") == "e":
            outcomes[args.get("outcome", "?")] += 1
            b = begins.pop(e["id"], None)
            if b is not None:
                durations.setdefault(b["name"], []).append((e["ts"] - b["ts"]) / 1e6)
    every = [d for ds in durations.values() for d in ds]
    return {
        "steps": [{"step": k, **v} for k, v in sorted(steps.items(), key=lambda kv: (kv[0] is None, kv[0] or 0))],
        "episodes": dict(outcomes), "unfinished": len(begins), "discarded": dict(discards),
        "episode_s": {"median": round(statistics.median(every), 3), "max": round(max(every), 3)} if every else {},
        "by_start": {k: {"n": len(durations[k]), "median_s": round(statistics.median(durations[k]), 3)}
                     for k in sorted(durations, key=_version_order)},
        "evaluations": evaluations,
    }


def _version_order(name: str) -> tuple[int, int | str]:
    return (0, int(name[1:])) if name[:1] == "v" and name[1:].isdigit() else (1, name)


def format_summary(summary: dict[str, Any], source: str = "") -> str:
    """``summarize_trace``'s result as a table for a terminal."""
    eps = summary["episodes"]
    lines = [f"{source}: {len(summary['steps'])} steps; {sum(eps.values())} episode groups ended ("
             + (", ".join(f"{k} {v}" for k, v in sorted(eps.items())) or "none")
             + (f"; {summary['unfinished']} still running when the trace ended" if summary["unfinished"] else "")
             + "); discarded: " + (", ".join(f"{k} {v}" for k, v in sorted(summary["discarded"].items())) or "none"),
             f"{'step':>5} {'wait_s':>7} {'held_s':>7} {'train_s':>8} {'publish_s':>10}  groups taken by lag"]
    for s in summary["steps"]:
        lags = ", ".join(f"{k}: {v}" for k, v in s.get("lags", {}).items())
        cells = [f"{s.get(k, float('nan')):{w}.2f}" for k, w in (("wait_s", 7), ("held_s", 7), ("train_s", 8),
                                                                   ("publish_s", 10))]
        lines.append(f"{s['step']!s:>5} " + " ".join(cells) + f"  {lags}")
    if summary["episode_s"]:
        by = ", ".join(f"{k} {v['n']} ({v['median_s']:.1f} s)" for k, v in summary["by_start"].items())
        lines.append(f"episode groups, admission to end: median {summary['episode_s']['median']:.2f} s, max "
                     f"{summary['episode_s']['max']:.2f} s; by start version: {by}")
    if summary["evaluations"]:
        lines.append("evaluations: " + ", ".join(
            f"v{e['version']} {e['s']:.1f} s" + ("" if e["reward"] is None else f" (reward {e['reward']:.3f})")
            for e in summary["evaluations"]))
    return "\n".join(lines)
