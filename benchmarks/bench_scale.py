"""Rollout at scale, simulated on one machine: many episodes, a big buffer, a fleet of servers that die.

One run: ``--episodes`` single-turn episodes with long-tailed generation latencies (log-normal),
``--concurrency`` of them in flight, generated through ``RemoteSGLangEngine`` (its public
constructor only) on ``--servers`` simulated SGLang servers (an in-process ``httpx.MockTransport``:
every request is a real HTTP request object with a JSON body, routed, retried and failed over by
the engine). A chaos task kills random servers (their in-flight requests fail with a dropped
connection) so that each server dies once every ``--server-mtbf`` median generation times on
average, and restarts each ``--down`` medians later with fresh weights, so the engine must
re-apply the last weight update when it rejoins (``--kill-every-s`` / ``--down-s`` set seconds
instead). A trainer thread takes ``--batch`` groups per step and publishes new weights after each
step (pause with abort on every server, disk update, resume: in-flight generations resume under
the new version). The replay buffer holds a resident backlog of ``--buffer-groups`` groups
throughout (filed under a newer version, so the oldest-first trainer takes fresh episodes first
and the backlog stays).

Printed as JSON lines: a ``progress`` line per second of the run, then one ``summary`` line:
throughput (episodes that ended with trajectories per second, from the first submit until no
episode runs, and accepted per second between 10% and 90% of the run), CPU milliseconds per
episode (this process, all threads: robust on a shared machine), admission latency p50/p99 (slot
freed -> next episode running, last 10,000 admissions), resident memory per in-flight episode
((RSS - RSS before the first episode) / episodes in flight, median over the samples with >= 90%
of the concurrency in flight), episodes lost (ended without trajectories: retries exhausted,
timeouts...; goal 0), groups the staleness policy requeued or dropped (``--max-staleness``, by
design, reported apart), and what the chaos did.

    python benchmarks/bench_scale.py                          # 10^5 episodes, 10^4 in flight, 64 servers
    python benchmarks/bench_scale.py --episodes 1000000       # 10^6
    python benchmarks/bench_scale.py --sweep --out runs/scale # the growth table and docs/bench_scale.png

Time is compressed and set by the load: the median generation time is chosen so that the fleet
delivers ``--offered-rate`` episodes/s at ``--concurrency`` in flight (10^4 in flight at 400/s:
median 15 s), log-normal with sigma 1 (p99 ~10x the median), cut at ``--latency-cap`` medians.
What the simulation measures is the rollout machinery's own cost at that load: the event loop, the
executor, the buffer and the HTTP client, all in one process, as on a real run's rank 0.

Not here: real servers or real models (``bench_remote.py``), training cost (``bench_train.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import pathlib
import random
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from agentflow import GenerationConfig, Group, ModelRequest, Rollout, RolloutConfig, Trajectory, WeightUpdateMeta
from agentflow.engines.remote import RemoteEngineConfig, RemoteSGLangEngine

PROMPT = list(range(3, 19))  # 16 prompt tokens
_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


# ---------------------------------------------------------------------------- the simulated fleet
@dataclass(slots=True)
class _SimServer:
    up: bool = True
    paused: bool = False
    weight_version: str = "0"
    inflight: dict[asyncio.Future[str], tuple[float, float]] = field(default_factory=dict)  # fut -> (start, latency)


@dataclass(slots=True)
class FleetStats:
    requests: int = 0
    completed: int = 0
    aborted_by_pause: int = 0
    dropped_by_kill: int = 0
    refused_while_down: int = 0
    kills: int = 0
    restarts: int = 0


class SimFleet:
    """``n`` SGLang-shaped servers behind one MockTransport handler, keyed by host name.

    A generation takes a log-normal time (``median_s``, ``sigma``) cut at ``cap`` x the median
    (real generations end at ``max_new_tokens``); a resumed one (prompt + tokens so far, after an
    abort) takes the same draw scaled by the fraction of tokens left.
    """

    def __init__(self, n: int, median_s: float, sigma: float, cap: float, seed: int) -> None:
        self.servers = {f"sim{i}": _SimServer() for i in range(n)}
        self.addresses = [f"sim{i}:30000" for i in range(n)]
        self.stats = FleetStats()
        self._rng = random.Random(seed)
        self._mu = math.log(median_s)
        self._sigma = sigma
        self._max = cap * median_s

    def latency(self) -> float:
        return min(self._max, self._rng.lognormvariate(self._mu, self._sigma))

    async def __call__(self, request: httpx.Request) -> httpx.Response:
        s = self.servers[request.url.host]
        if not s.up:
            self.stats.refused_while_down += 1
            raise httpx.ConnectError("connection refused (simulated dead server)", request=request)
        path = request.url.path
        if path == "/generate":
            return await self._generate(s, json.loads(request.content), request)
        return self._control(s, path, json.loads(request.content) if request.content else None)

    def _control(self, s: _SimServer, path: str, body: Any) -> httpx.Response:
        if path == "/health":
            return httpx.Response(200)
        if path == "/get_server_info":
            return httpx.Response(200, json={"tp_size": 1})
        if path == "/get_model_info":
            return httpx.Response(200, json={"weight_version": s.weight_version})
        if path == "/pause_generation":
            s.paused = True
            for fut in s.inflight:
                _resolve(fut, "abort")
        elif path == "/continue_generation":
            s.paused = False
        elif path == "/update_weights_from_disk":
            s.weight_version = str(body.get("weight_version"))
        return httpx.Response(200, json={"success": True, "message": "ok", "status": "ok"})

    async def _generate(self, s: _SimServer, body: dict[str, Any], request: httpx.Request) -> httpx.Response:
        self.stats.requests += 1
        want = int(body["sampling_params"]["max_new_tokens"])
        version = s.weight_version
        if s.paused:
            return _gen_response([], version, "abort")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[str] = loop.create_future()
        done_before = len(body["input_ids"]) - len(PROMPT)  # a resumed request: tokens already generated
        lat = self.latency() * want / (want + done_before)  # decoding time is proportional to the tokens left
        start = loop.time()
        handle = loop.call_later(lat, _resolve, fut, "done")
        s.inflight[fut] = (start, lat)
        try:
            outcome = await fut
        finally:
            handle.cancel()
            s.inflight.pop(fut, None)
        if outcome == "killed":
            self.stats.dropped_by_kill += 1
            raise httpx.RemoteProtocolError("server disconnected without a response (simulated kill)",
                                            request=request)
        if outcome == "abort":
            self.stats.aborted_by_pause += 1
            done = int(want * min(1.0, (loop.time() - start) / lat))
            return _gen_response([5] * done, version, "abort")
        self.stats.completed += 1
        return _gen_response([5] * want, version, "length")

    def kill(self, host: str) -> None:
        """The process dies: in-flight requests see a dropped connection, new ones are refused."""
        s = self.servers[host]
        s.up = False
        self.stats.kills += 1
        for fut in list(s.inflight):
            _resolve(fut, "killed")

    def restart(self, host: str) -> None:
        """A fresh process from the initial checkpoint: weight version "0", not paused."""
        self.servers[host] = _SimServer()
        self.stats.restarts += 1

    def down(self) -> list[str]:
        return [h for h, s in self.servers.items() if not s.up]


def _resolve(fut: asyncio.Future[str], value: str) -> None:
    if not fut.done():
        fut.set_result(value)


def _gen_response(ids: list[int], version: str, finish: str) -> httpx.Response:
    reason = {"type": finish, "length": len(ids)} if finish == "length" else {"type": finish, "message": "Aborted"}
    return httpx.Response(200, json={"text": "", "output_ids": ids, "meta_info": {
        "id": "sim", "finish_reason": reason, "prompt_tokens": len(PROMPT), "completion_tokens": len(ids),
        "weight_version": version, "output_token_logprobs": [[-0.5, t, None] for t in ids]}})


async def chaos(fleet: SimFleet, every_s: float, down_s: float, seed: int) -> None:
    """Kill a random live server every ``every_s`` seconds on average; restart it ``down_s`` later (±50%)."""
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    while True:
        await asyncio.sleep(rng.expovariate(1.0 / every_s))
        live = [h for h, s in fleet.servers.items() if s.up]
        if len(live) <= len(fleet.servers) // 2:
            continue  # never more than half the fleet down at once
        host = rng.choice(live)
        fleet.kill(host)
        loop.call_later(down_s * rng.uniform(0.5, 1.5), fleet.restart, host)


# ---------------------------------------------------------------------------- the rollout side
class OneTurn:
    """One generation per episode (the engine does the routing, retries and resume-after-abort)."""

    def __init__(self, max_new_tokens: int) -> None:
        self.g = GenerationConfig(max_new_tokens=max_new_tokens)

    async def arun_episode(self, engine, data):
        resp = await engine.agenerate(ModelRequest(PROMPT, self.g))
        return Trajectory.from_response(resp, reward=1.0)


_BACKLOG_VERSION = 10**6


def fill_backlog(rollout: Rollout, n: int) -> None:
    """``n`` resident groups, filed under versions newer than any the run reaches (consumed last)."""
    traj = Trajectory([*PROMPT, 5, 5], [0] * len(PROMPT) + [1, 1], [0.0] * len(PROMPT) + [-0.5, -0.5],
                      [-1] * len(PROMPT) + [0, 0], reward=1.0)
    for i in range(n):
        g = Group(f"held-{i}", [traj])
        g.min_version = _BACKLOG_VERSION + i % 64
        rollout.buffer.put_nowait(g)


@dataclass(slots=True)
class TrainerSim:
    """The trainer thread: take ``batch`` fresh groups, publish new weights; stop when fewer than a
    batch can still come (a real run would move on to the next prompts)."""

    rollout: Rollout
    loop: asyncio.AbstractEventLoop
    episodes: int
    batch: int
    consumed: int = 0
    steps: int = 0
    backlog_returned: int = 0
    update_s: list[float] = field(default_factory=list)

    def remaining(self) -> int:
        """Fresh groups that may still be consumed (episodes not consumed nor dropped as stale)."""
        return self.episodes - self.consumed - self.rollout.buffer.stats.dropped

    def fresh_buffered(self) -> int:
        b = self.rollout.buffer.stats
        return b.put - b.requeued - b.dropped - self.consumed

    def run(self) -> None:
        buf = self.rollout.buffer
        while self.remaining() >= self.batch:
            with buf._cond:  # benchmark only: sleep until a batch of fresh groups was put (no polling)
                buf._cond.wait_for(lambda: self.fresh_buffered() >= self.batch, timeout=600)
            groups = buf.get_groups(self.batch, timeout=600)
            held = [g for g in groups if g.group_id.startswith("held-")]
            for g in held:  # a stale group was requeued mid-take and the take reached the backlog
                buf.put_nowait(g)
            self.backlog_returned += len(held)
            self.consumed += len(groups) - len(held)
            self._publish()

    def _publish(self) -> None:
        self.steps += 1
        t0 = time.perf_counter()
        meta = WeightUpdateMeta(type="disk", path=f"/sim/ckpt/{self.steps}", version=self.steps)
        asyncio.run_coroutine_threadsafe(self.rollout.update_weights(meta), self.loop).result(600)
        self.update_s.append(time.perf_counter() - t0)


async def feed(rollout: Rollout, workflow: Any, n: int, max_queued: int) -> None:
    for i in range(n):
        await rollout.wait_for_room(max_queued)
        rollout.submit(i, workflow)


async def drained(rollout: Rollout, every_s: float = 0.1) -> None:
    """Return once no episode runs or waits (the benchmark's end; a short poll is fine here)."""
    ex = rollout.executor
    while ex.n_running or ex.n_queued:  # noqa: ASYNC110  # the end condition is the executor's counters
        await asyncio.sleep(every_s)


async def sample(rollout: Rollout, trainer: TrainerSim, fleet: SimFleet, t0: float, base_rss: int,
                 out: list[dict[str, Any]], every_s: float = 1.0) -> None:
    """One progress record per ``every_s``: accepted, consumed, in flight, queued, RSS, servers down."""
    ex = rollout.executor
    while True:
        await asyncio.sleep(every_s)
        rss = rss_bytes()
        rec = {"bench": "scale_progress", "t_s": round(time.perf_counter() - t0, 2),
               "accepted": ex.staleness.stats.accepted, "consumed": trainer.consumed,
               "in_flight": ex.n_running, "queued": ex.n_queued, "buffered": len(rollout.buffer),
               "version": trainer.steps, "rss_mib": round(rss / 2**20, 1),
               "rss_delta_mib": round((rss - base_rss) / 2**20, 1), "servers_down": len(fleet.down())}
        out.append(rec)
        print(json.dumps(rec), flush=True)


def _percentile(xs: list[float], q: float, scale: float = 1.0) -> float | None:
    """The ``q`` quantile times ``scale``, rounded; None without samples (e.g. no episode ever
    waited for a slot: every admission latency is taken from a slot freed by an ending episode)."""
    xs = sorted(xs)
    return round(xs[min(len(xs) - 1, int(q * len(xs)))] * scale, 3) if xs else None


def steady_rate(progress: list[dict[str, Any]], total: int) -> float:
    """Episodes accepted per second between 10% and 90% of the run (no ramp-up, no long-tail drain)."""
    lo = next((p for p in progress if p["accepted"] >= 0.1 * total), None)
    hi = next((p for p in progress if p["accepted"] >= 0.9 * total), None)
    if lo is None or hi is None or hi["t_s"] <= lo["t_s"]:
        return float("nan")
    return (hi["accepted"] - lo["accepted"]) / (hi["t_s"] - lo["t_s"])


def summarise(args: argparse.Namespace, rollout: Rollout, trainer: TrainerSim, fleet: SimFleet,
              elapsed: float, cpu_s: float, progress: list[dict[str, Any]], base_rss: int) -> dict[str, Any]:
    s = rollout.executor.stats()
    lat = list(rollout.executor.admission_latencies)
    steady = [p for p in progress if p["in_flight"] >= 0.9 * args.concurrency]
    per_ep = [p["rss_delta_mib"] * 2**20 / p["in_flight"] for p in steady] or [float("nan")]
    produced = s["accepted"] - s["requeued_stale"]  # episodes that ended with a group (a requeued one counts once)
    return {
        "bench": "scale_summary", "episodes": args.episodes, "concurrency": args.concurrency,
        "servers": args.servers, "buffer_groups": args.buffer_groups, "batch": args.batch,
        "offered_rate": args.offered_rate, "median_latency_s": round(args.median_latency_s, 3),
        "kill_every_s": round(args.kill_every_s, 3), "down_s": round(args.down_s, 3),
        "latency_cap": args.latency_cap,
        "sigma": args.sigma, "wall_s": round(elapsed, 1),
        "episodes_per_s": round(produced / elapsed, 1),
        "steady_episodes_per_s": round(steady_rate(progress, args.episodes), 1),
        "cpu_ms_per_episode": round(cpu_s / max(1, trainer.consumed) * 1e3, 3),
        "admission_p50_ms": _percentile(lat, 0.5, 1e3), "admission_p99_ms": _percentile(lat, 0.99, 1e3),
        "rss_per_inflight_kib": round(statistics.median(per_ep) / 1024, 2),
        "rss_base_mib": round(base_rss / 2**20, 1), "rss_peak_mib": max((p["rss_mib"] for p in progress), default=0),
        "max_in_flight": max((p["in_flight"] for p in progress), default=0),
        "produced": produced, "episodes_lost": s["rejected"], "rejected_by_reason": s["rejected_by_reason"],
        "unaccounted": args.episodes - produced - s["rejected"],
        "dropped_stale": s["dropped_stale"], "requeued_stale": s["requeued_stale"], "consumed": trainer.consumed,
        "steps": trainer.steps, "weight_update_p50_s": _percentile(trainer.update_s, 0.5),
        "kills": fleet.stats.kills, "restarts": fleet.stats.restarts,
        "requests": fleet.stats.requests, "requests_dropped_by_kill": fleet.stats.dropped_by_kill,
        "requests_aborted_by_pause": fleet.stats.aborted_by_pause,
        "requests_refused_while_down": fleet.stats.refused_while_down,
    }


def _engine(args: argparse.Namespace, fleet: SimFleet) -> RemoteSGLangEngine:
    rollout = RolloutConfig(
        max_concurrent=args.concurrency, consumer_batch_size=args.batch, max_staleness=args.max_staleness,
        stale_policy="requeue", buffer_size=args.buffer_groups + 4 * args.concurrency + args.batch,
        episode_timeout_s=600.0,
    )
    config = RemoteEngineConfig(
        request_timeout_s=600.0, probe_interval_s=0.25, health_timeout_s=2.0, startup_timeout_s=30.0,
        server_wait_timeout_s=60.0, backoff_initial_s=0.01, backoff_max_s=0.25, max_attempts=args.max_attempts,
    )
    return RemoteSGLangEngine(fleet.addresses, rollout=rollout, config=config,
                              transport=httpx.MockTransport(fleet))


async def run(args: argparse.Namespace) -> dict[str, Any]:
    logging.getLogger("agentflow").setLevel(logging.ERROR)  # a kill logs a warning per server marked down
    fleet = SimFleet(args.servers, args.median_latency_s, args.sigma, args.latency_cap, args.seed)
    engine = _engine(args, fleet)
    async with engine, asyncio.TaskGroup() as tg:
        rollout = Rollout.of(engine)
        fill_backlog(rollout, args.buffer_groups)
        base_rss = rss_bytes()
        loop = asyncio.get_running_loop()
        trainer = TrainerSim(rollout, loop, args.episodes, args.batch)
        progress: list[dict[str, Any]] = []
        t0, c0 = time.perf_counter(), time.process_time()
        helpers = [tg.create_task(feed(rollout, OneTurn(args.max_new_tokens), args.episodes, 2 * args.concurrency)),
                   tg.create_task(sample(rollout, trainer, fleet, t0, base_rss, progress))]
        if args.kill_every_s > 0:
            helpers.append(tg.create_task(chaos(fleet, args.kill_every_s, args.down_s, args.seed + 1)))
        await asyncio.to_thread(trainer.run)
        await helpers[0]  # every episode submitted
        await drained(rollout)
        elapsed, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        for h in helpers[1:]:
            h.cancel()
    summary = summarise(args, rollout, trainer, fleet, elapsed, cpu_s, progress, base_rss)
    print(json.dumps(summary), flush=True)
    return summary


# ---------------------------------------------------------------------------- sweep and plot
# (episodes, in flight): the first row grows the total work, the second the work in flight, both at
# the same offered rate (the median latency follows the concurrency), so the per-episode cost is compared.
SWEEP_EPISODES = [(10_000, 10_000), (30_000, 10_000), (100_000, 10_000), (1_000_000, 10_000)]
SWEEP_CONCURRENCY = [(30_000, 100), (30_000, 1_000), (30_000, 10_000)]


def _cell_cmd(args: argparse.Namespace, episodes: int, concurrency: int) -> list[str]:
    return [sys.executable, __file__, "--episodes", str(episodes), "--concurrency", str(concurrency),
            "--servers", str(args.servers), "--buffer-groups", str(args.buffer_groups),
            "--batch", str(min(args.batch, max(64, concurrency))), "--offered-rate", str(args.offered_rate),
            "--latency-cap", str(args.latency_cap), "--server-mtbf", str(args.server_mtbf), "--down", str(args.down),
            "--max-attempts", str(args.max_attempts), "--seed", str(args.seed)]


def sweep(args: argparse.Namespace) -> None:
    """Each configuration in a fresh process (clean RSS); summaries to ``out/scale.jsonl``; the plot.

    Cells already in ``out/scale.jsonl`` are not run again (run it again to redraw the plot only).
    """
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in (out / "scale.jsonl").read_text().splitlines()] \
        if (out / "scale.jsonl").exists() else []
    have = {(r["episodes"], r["concurrency"]) for r in rows}
    cells = sorted({*SWEEP_EPISODES, *SWEEP_CONCURRENCY} - have)
    for episodes, concurrency in [(e, c) for e, c in cells if e <= args.sweep_max_episodes]:
        cmd = _cell_cmd(args, episodes, concurrency)
        print(json.dumps({"bench": "scale_sweep_cell", "cmd": " ".join(cmd[1:])}), flush=True)
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        summary = json.loads(done.stdout.strip().splitlines()[-1])
        print(json.dumps(summary), flush=True)
        rows.append(summary)
        with open(out / "scale.jsonl", "a") as f:
            f.write(json.dumps(summary) + "\n")
    plot(rows, pathlib.Path(args.plot))


def plot(rows: list[dict[str, Any]], path: pathlib.Path) -> None:
    """Log-log panels: each figure against total episodes (top) and against episodes in flight (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5))
    series = [("episodes", SWEEP_EPISODES, "total episodes (10^4 in flight)"),
              ("concurrency", SWEEP_CONCURRENCY, "episodes in flight (same offered rate)")]
    panels = [("per second / CPU ms", [("episodes/s (steady)", "steady_episodes_per_s"),
                                       ("CPU ms per episode", "cpu_ms_per_episode")]),
              ("admission latency (ms)", [("p50", "admission_p50_ms"), ("p99", "admission_p99_ms")]),
              ("memory", [("RSS per in-flight episode (KiB)", "rss_per_inflight_kib"),
                          ("peak RSS (MiB)", "rss_peak_mib")])]
    for row_axes, (xkey, cells, xlabel) in zip(axes, series, strict=True):
        rs = sorted((r for r in rows if (r["episodes"], r["concurrency"]) in cells), key=lambda r: r[xkey])
        xs = [r[xkey] for r in rs]
        for ax, (ylabel, keys) in zip(row_axes, panels, strict=True):
            for label, key in keys:
                ax.plot(xs, [r[key] for r in rs], "o-", label=label)
            if ylabel == panels[0][0] and rs:
                ax.axhline(rs[0]["offered_rate"], ls="--", color="gray", label="offered rate")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    lost = sum(r["episodes_lost"] for r in rows)
    kills = sum(r["kills"] for r in rows)
    fig.suptitle(f"bench_scale.py: {rows[0]['servers'] if rows else '?'} simulated servers, "
                 f"{rows[0]['buffer_groups'] if rows else '?'} resident buffered groups; "
                 f"{kills} server kills in all, {lost} episodes lost")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(json.dumps({"bench": "scale_plot", "path": str(path)}), flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--episodes", type=int, default=100_000)
    p.add_argument("--concurrency", type=int, default=10_000)
    p.add_argument("--servers", type=int, default=64)
    p.add_argument("--buffer-groups", type=int, default=100_000, help="resident backlog in the replay buffer")
    p.add_argument("--batch", type=int, default=8192, help="groups the trainer takes per step")
    p.add_argument("--max-staleness", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--offered-rate", type=float, default=400.0,
                   help="episodes/s the fleet can deliver at this concurrency: sets the median latency")
    p.add_argument("--median-latency-s", type=float, default=None, help="override the median generation time")
    p.add_argument("--sigma", type=float, default=1.0, help="log-normal sigma of the generation time")
    p.add_argument("--latency-cap", type=float, default=8.0, help="longest generation, in medians")
    p.add_argument("--server-mtbf", type=float, default=16.0,
                   help="mean time between failures of one server, in median generation times (0 = no kills)")
    p.add_argument("--down", type=float, default=1.0, help="mean time a killed server stays down, in medians")
    p.add_argument("--kill-every-s", type=float, default=None, help="seconds between kills (overrides --server-mtbf)")
    p.add_argument("--down-s", type=float, default=None, help="seconds a killed server stays down (overrides --down)")
    p.add_argument("--max-attempts", type=int, default=10,
                   help="RemoteEngineConfig.max_attempts: tries per generation before its episode is rejected")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sweep", action="store_true", help="run the growth table in subprocesses and plot it")
    p.add_argument("--sweep-max-episodes", type=int, default=1_000_000)
    p.add_argument("--out", default="runs/scale")
    p.add_argument("--plot", default="docs/bench_scale.png")
    args = p.parse_args(argv)
    if args.median_latency_s is None:  # concurrency / mean latency = offered rate
        args.median_latency_s = args.concurrency / (args.offered_rate * math.exp(args.sigma**2 / 2))
    if args.kill_every_s is None:  # one kill per server per `server_mtbf` medians, spread over the fleet
        args.kill_every_s = args.server_mtbf * args.median_latency_s / args.servers
    if args.down_s is None:
        args.down_s = args.down * args.median_latency_s
    return args


if __name__ == "__main__":
    a = parse_args()
    if a.sweep:
        sweep(a)
    else:
        asyncio.run(run(a))
