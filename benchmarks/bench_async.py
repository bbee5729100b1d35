"""Asynchronous vs synchronous RL: the same training run with max_staleness 0 and 2, side by side.

Both runs use the same model, data, seed and step count; only ``rollout.max_staleness`` differs.
With eta = 0 rollout and training alternate (step time = generation + training); with eta = 2
generation for later steps overlaps training (ideal step time = max(generation, training)).
Prints one JSON line per run and a summary line with the speed-up, and writes both reward curves
to ``--out`` (PNG).

``--engine local`` (default): generation runs in the trainer's process (LocalEngine); torch uses
one intra-op thread per thread of work (``threads=1``), so the generation worker and the trainer
can each keep one of the two cores busy, but they share one Python interpreter (the GIL) and the
memory bus. ``--engine remote``: generation runs in an ``agentflow serve`` process pinned to
core 0 and training in the trainer process pinned to core 1 (weights shipped through disk), the
layout of a real deployment where inference servers and trainers own separate devices. With
``--server vllm`` the server on core 0 is a real vLLM (``--vllm-python``: the interpreter of a vLLM
0.32 install, default the venv of ``scripts/vllm_env.sh``; fp32, one OpenMP thread bound to core 0)
and the trainer talks to it with ``inference.protocol=vllm``, weights reloaded from disk each step.
Both eta values run under the same layout. Measured figures: ``docs/benchmarks.md``.

    python benchmarks/bench_async.py                     # ~2 minutes on 2 cores

The defaults (2 prompts x 4 samples, 128 new tokens, a random 512-wide 6-layer Llama) make one
step's generation and training take about the same time on 2 cores (~1.4 s and ~1.7 s), where the
ideal speed-up approaches 2x; larger batches make training dominate (the ideal then is
(generation + training) / training).
    python benchmarks/bench_async.py --engine remote     # inference and training on separate cores
    python benchmarks/bench_async.py --engine remote --server vllm   # the same with vLLM serving
    python benchmarks/bench_async.py --steps 6 --quick   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/_servers.py, also when this file is loaded by path
from _servers import pinned, server_on_core  # noqa: E402


def run(eta: int, args: argparse.Namespace, run_dir: pathlib.Path) -> list[dict]:
    rows = args.batch * args.n_samples * (eta + 1)
    if args.engine == "remote":
        model_dir = run_dir.parent / "model"
        if not model_dir.exists():
            from agentflow.testing import tiny_model_and_tokenizer

            model, tok = tiny_model_and_tokenizer(seed=0, hidden_size=args.hidden, num_layers=args.layers)
            model.save_pretrained(model_dir)
            tok.save_pretrained(model_dir)
        extra = ["--chunk-tokens", str(args.chunk_tokens)] if args.server == "serve" else []
        with server_on_core(args.server, str(model_dir), run_dir.parent, core=0, rows=rows,
                            python=args.vllm_python, extra=extra) as address:
            extra = [f"model.path={model_dir}", "inference.backend=remote", f"inference.addresses=[{address}]",
                     "trainer.weight_update=disk"]
            if args.server == "vllm":
                extra.append("inference.protocol=vllm")
            return _train(eta, args, run_dir, extra, pinned({1}))
    extra = ["model.path=tiny", f"model.tiny_hidden_size={args.hidden}", f"model.tiny_layers={args.layers}",
             f"inference.local.max_batch_size={rows}", "inference.local.max_seq_len=256"]
    return _train(eta, args, run_dir, extra, None)


def _train(eta: int, args: argparse.Namespace, run_dir: pathlib.Path, extra: list[str],
           preexec: Callable[[], None] | None) -> list[dict]:
    overrides = [
        *extra,
        "data.task=addition", "data.size=2000", "data.eval_size=8", "data.shots=0",
        f"generation.n_samples={args.n_samples}", f"generation.max_new_tokens={args.max_new_tokens}",
        f"rollout.max_staleness={eta}", f"rollout.consumer_batch_size={args.batch}",
        f"rollout.max_concurrent={args.batch * (eta + 1)}", "rollout.stale_policy=keep",
        f"trainer.total_steps={args.steps}", "trainer.checkpoint_every=0", "trainer.eval_every=0",
        f"trainer.max_queued={args.batch * 2}", "train.lr=1e-4", "threads=1",
        f"logging.run_dir={run_dir}", "logging.progress=false",
    ]
    if "inference.protocol=vllm" not in extra:
        # A stop id that never occurs: every answer runs to max_new_tokens, so --max-new-tokens sets
        # the generation time (a random model would otherwise stop at a random early token). vLLM
        # refuses ids outside the vocabulary; there the eos id stops as in the other runs.
        overrides.append("generation.stop_token_ids=[1000000]")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # examples/addition.yaml: the single-turn addition run these overrides were measured on
    out = subprocess.run([sys.executable, "-m", "agentflow", "train", str(ROOT / "examples" / "addition.yaml"),
                          *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, preexec_fn=preexec)
    if out.returncode != 0:
        raise SystemExit(f"eta={eta} run failed:\n{out.stderr[-4000:]}")
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
            if "reward/mean" in line]


def summarize(eta: int, records: list[dict], engine: str, server: str) -> dict:
    steady = records[1:]  # step 1 includes start-up (first rollouts, warm-up)
    step_s = statistics.fmean(r["time/step_s"] for r in steady)
    wall = records[-1]["time/elapsed_s"] - records[0]["time/elapsed_s"]
    return {
        "bench": "async_rl", "engine": engine, "server": server, "max_staleness": eta, "steps": len(records),
        "mean_step_s": round(step_s, 3), "steady_wall_s": round(wall, 2),
        "train_s_per_step": round(statistics.fmean(r["time/train_s"] for r in steady), 3),
        "wait_s_per_step": round(statistics.fmean(r["time/wait_s"] for r in steady), 3),
        "max_staleness_seen": max(r["staleness/max"] for r in records),
        "gen_tokens_mean": round(statistics.fmean(r.get("rollout/gen_tokens_mean", 0.0) for r in steady), 1),
        "reward_first": records[0]["reward/mean"], "reward_last": records[-1]["reward/mean"],
    }


def plot(curves: dict[int, list[dict]], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    for eta, recs in curves.items():
        a.plot([r["step"] for r in recs], [r["reward/mean"] for r in recs], label=f"eta={eta}")
        b.plot([r["time/elapsed_s"] for r in recs], [r["reward/mean"] for r in recs], label=f"eta={eta}")
    a.set_xlabel("step")
    b.set_xlabel("wall-clock seconds")
    for ax in (a, b):
        ax.set_ylabel("train reward")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--batch", type=int, default=2, help="prompts per step")
    p.add_argument("--n-samples", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_async.png"))
    p.add_argument("--quick", action="store_true", help="small model, few tokens")
    p.add_argument("--engine", choices=("local", "remote"), default="local",
                   help="local: generation in the trainer's process; remote: agentflow serve on core 0, "
                   "the trainer on core 1")
    p.add_argument("--chunk-tokens", type=int, default=16, help="agentflow serve --chunk-tokens (remote)")
    p.add_argument("--server", choices=("serve", "vllm"), default="serve",
                   help="the server of --engine remote: agentflow serve or a real vLLM")
    p.add_argument("--vllm-python", default=None, help="interpreter of a vLLM 0.32 install (--server vllm)")
    args = p.parse_args()
    if args.server == "vllm" and args.engine != "remote":
        raise SystemExit("--server vllm needs --engine remote (vLLM runs in its own process)")
    if args.quick:
        # vLLM's CPU attention needs a head size of 32 or more (64 / 4 heads is refused)
        args.hidden, args.layers, args.max_new_tokens = 256 if args.server == "vllm" else 64, 2, 16
    curves, rows = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for eta in (0, 2):
            curves[eta] = run(eta, args, pathlib.Path(tmp) / f"eta{eta}")
            rows[eta] = summarize(eta, curves[eta], args.engine, args.server if args.engine == "remote" else "")
            print(json.dumps(rows[eta]), flush=True)
    print(json.dumps({"bench": "async_rl_speedup", "engine": args.engine, "server": args.server, "speedup_eta2_vs_eta0":
                      round(rows[0]["mean_step_s"] / rows[2]["mean_step_s"], 3),
                      "train_s_per_step_eta0": rows[0]["train_s_per_step"],
                      "wait_s_per_step_eta0": rows[0]["wait_s_per_step"]}))
    plot(curves, pathlib.Path(args.out))


if __name__ == "__main__":
    main()
