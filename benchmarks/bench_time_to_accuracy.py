"""Time to accuracy: the same task and seed trained at several staleness settings, side by side.

Each setting is one ``agentflow train`` run of a shipped example (``examples/addition.yaml``,
``examples/calculator.yaml``) that differs only in its rollout settings: ``eta0`` is synchronous
(``rollout.max_staleness=0``), ``eta1`` / ``eta2`` / ``eta4`` asynchronous; a ``-ramp`` suffix adds
``rollout.staleness_ramp=true``, a ``-ds`` suffix DAPO's dynamic sampling (``algo.dynamic_sampling=true``:
groups whose samples all scored alike are dropped and replaced by fresh prompts), a ``-bN`` suffix
``rollout.consumer_batch_size=N`` (groups per train step). Held-out accuracy
(``data.eval_size`` problems x ``trainer.eval_samples`` samples at the example's temperature) is
measured every ``--eval-every`` versions. A version's time is when the step that made it finished
(seconds since the training loop started, model loading excluded). By default evaluation runs
beside rollout, in every setting alike, and its time is on the clock (the next version is published
once it is done). With ``--offline-eval`` (``--remote`` only) the run keeps the weights it publishes
and nothing else shares the clock: each evaluated version is scored after the run by
``agentflow eval`` on the same problems, samples and sampling seed.

Reported per run, as one JSON line each: held-out per version, time to each ``--targets`` accuracy
(null = not reached), held-out at each ``--budgets`` wall-clock second (the last evaluated version
published by then), median seconds per step (steps 2..N) and episodes trained. Then one line per
(task, layout, setting) with the means over seeds, and a plot (held-out accuracy against
wall-clock seconds, one curve per setting, one panel per task and layout) at ``--out``.

Layouts: in process (default: generation and training share the process and the cores), and with
``--remote`` generation in an ``agentflow serve`` process (``--server vllm``: a real vLLM, fp32,
``inference.protocol=vllm``) pinned to core 0 (one thread) and the trainer pinned to core 1 (one
thread), weights through a tmpfs (``trainer.weights_dir`` under ``/dev/shm`` when it exists, as in
``examples/remote.yaml``; else the run directory): the layout where inference has devices of its own. Runs go one
after the other, every setting of a seed before the next seed (so a drift in the machine's speed
hits all settings alike); ``--reuse`` keeps runs whose metrics are complete.

    python benchmarks/bench_time_to_accuracy.py --tasks addition --settings eta0,eta1,eta2 --seeds 0,1
    python benchmarks/bench_time_to_accuracy.py --tasks addition,calculator --remote
    python benchmarks/bench_time_to_accuracy.py --quick        # plumbing only: tiny model, 2 steps

Measured figures and the commands that produced them: ``docs/benchmarks.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import queue
import shutil
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))  # benchmarks/_servers.py, also when this file is loaded by path
from _servers import pinned, server_on_core  # noqa: E402

CONTEXT = {"addition": 256, "calculator": 320}  # the examples' inference.local.max_seq_len


def setting_overrides(name: str) -> list[str]:
    """``eta2`` -> ``rollout.max_staleness=2``; suffixes: ``-ramp`` adds ``rollout.staleness_ramp=true``,
    ``-ds`` adds ``algo.dynamic_sampling=true``, ``-bN`` sets ``rollout.consumer_batch_size=N`` (groups
    per train step), ``-minN`` sets ``rollout.min_consumer_batch_size=N`` (a step that would wait starts
    with N ready groups), ``-capN`` sets ``algo.ppo.behav_imp_weight_cap=N`` (the behaviour-weight
    threshold, N >= 2), ``-betaNN`` sets AdamW's first beta to 0.NN (``train.betas=[0.NN, 0.999]``),
    ``-waitload`` makes the trainer wait for every weight load (``trainer.overlap_weight_load=false``); e.g.
    ``eta1-ds``, ``eta2-ramp-ds``, ``eta1-ds-b4``, ``eta1-ds-min4``, ``eta1-ds-cap2``, ``eta1-ds-beta50``,
    ``eta1-waitload``."""
    base, *flags = name.split("-")
    sizes = [f for f in flags if f[:1] == "b" and f[1:].isdigit() and int(f[1:]) > 0]
    mins = [f for f in flags if f[:3] == "min" and f[3:].isdigit() and int(f[3:]) > 0]
    caps = [f for f in flags if f[:3] == "cap" and f[3:].isdigit() and int(f[3:]) >= 2]
    betas = [f for f in flags if f[:4] == "beta" and f[4:].isdigit() and len(f) == 6]
    if (not base.startswith("eta") or not base[3:].isdigit() or len(sizes) > 1 or len(mins) > 1 or len(caps) > 1
            or len(betas) > 1
            or not set(flags) - set(sizes) - set(mins) - set(caps) - set(betas) <= {"ramp", "ds", "waitload"}):
        raise SystemExit("--settings: expected names like eta0, eta2, eta2-ramp, eta1-ds, eta1-ds-b4, eta1-ds-min4, "
                         f"eta1-ds-cap2, eta1-ds-beta50 or eta1-waitload, got {name!r}")
    out = [f"rollout.max_staleness={int(base[3:])}", f"rollout.staleness_ramp={'true' if 'ramp' in flags else 'false'}"]
    if "ds" in flags:
        out.append("algo.dynamic_sampling=true")
    if "waitload" in flags:
        out.append("trainer.overlap_weight_load=false")
    return [*out, *(f"rollout.consumer_batch_size={int(f[1:])}" for f in sizes),
            *(f"rollout.min_consumer_batch_size={int(f[3:])}" for f in mins),
            *(f"algo.ppo.behav_imp_weight_cap={int(f[3:])}" for f in caps),
            *(f"train.betas=[0.{f[4:]},0.999]" for f in betas)]


def _complete(run_dir: pathlib.Path, steps: int) -> bool:
    path = run_dir / "metrics.jsonl"
    return path.exists() and any(
        json.loads(line).get("eval/version") == steps for line in path.read_text().splitlines()
    )


def _servable(model: str, where: pathlib.Path) -> str:
    """``agentflow serve`` loads HF directories and embedded models: save ``tiny`` to a directory once."""
    if model != "tiny":
        return model
    path = where / "tiny_model"
    if not path.exists():
        from agentflow.testing import tiny_model_and_tokenizer

        tiny, tok = tiny_model_and_tokenizer(seed=0)
        tiny.save_pretrained(path)
        tok.save_pretrained(path)
    return str(path)


def train(task: str, setting: str, seed: int, args: argparse.Namespace, run_dir: pathlib.Path) -> None:
    """One ``agentflow train`` run into ``run_dir`` (skipped with ``--reuse`` when already complete)."""
    if args.reuse and _complete(run_dir, args.steps):
        return
    # --offline-eval keeps the versions it scores: all of them on disk; on a tmpfs only the newest
    # _TMPFS_KEEP, each evaluated one kept by hard links and copied out at idle priority (_Keeper)
    kept = _TMPFS_KEEP if args.remote and _in_memory(_tmpfs_weights_dir(run_dir)) else "null"
    evaluation = (["trainer.eval_every=0", f"trainer.keep_weight_versions={kept}"] if args.offline_eval
                  else [f"trainer.eval_every={args.eval_every}"])
    overrides = [
        *setting_overrides(setting),
        f"inference.local.seed={seed}",
        f"trainer.total_steps={args.steps}",
        *evaluation,
        f"trainer.eval_samples={args.eval_samples}",
        f"data.eval_size={args.eval_size}",
        "trainer.checkpoint_every=0",
        "logging.progress=false",
        f"logging.run_dir={run_dir}",
        *args.override,
    ]
    model = _servable(args.model, pathlib.Path(args.runs)) if args.remote and args.model else args.model
    if model:
        overrides.append(f"model.path={model}")
    head = [sys.executable, "-m", "agentflow", "train", str(ROOT / "examples" / f"{task}.yaml")]
    run_dir.mkdir(parents=True, exist_ok=True)
    if not args.remote:
        _run([*head, *overrides], run_dir, os.environ, None)
    else:
        _run_remote(head, overrides, model, seed, task, args, run_dir)
    if not args.keep_checkpoints:  # the final checkpoint (1.6 GB for SmolLM2 with its optimiser) is not read
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if args.offline_eval:
        evaluate_offline(task, seed, model, args, run_dir, setting)


def evaluate_offline(task: str, seed: int, model: str | None, args: argparse.Namespace,
                     run_dir: pathlib.Path, setting: str = "eta0") -> None:
    """Score every ``--eval-every``-th published version (and the last) with ``agentflow eval`` into
    ``metrics.jsonl``, as the run's own evaluation would have logged them; then delete the weights."""
    weights = _weights_dir(run_dir)
    versions = _evaluated(args)
    records = []
    for v in versions:
        path = weights / f"v{v:06d}" if v else None  # version 0 is the model the run started from
        if path is not None and not path.is_dir():
            raise SystemExit(f"{run_dir}: no weights for version {v} at {path}; expected trainer.keep_weight_versions="
                             "null and trainer.weight_update=disk (--offline-eval runs with --remote)")
        cmd = [sys.executable, "-m", "agentflow", "eval", "--n", str(args.eval_size),
               *(["--model", str(path or model)] if path is not None or model else []),
               str(ROOT / "examples" / f"{task}.yaml"), f"generation.n_samples={args.eval_samples}",
               f"inference.local.seed={seed}", "logging.progress=false", f"logging.run_dir={run_dir / 'eval'}",
               *setting_overrides(setting), *args.override]  # the run's own config (an override may need a setting's)
        out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if out.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
        score = json.loads(out.stdout.strip().splitlines()[-1])
        records.append({"eval/version": v, "eval/reward": score["mean_reward"], "eval/n": score["n"],
                        "eval/offline": True})
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if not args.keep_checkpoints:
        shutil.rmtree(weights, ignore_errors=True)
    elif weights != run_dir / "weights":  # kept beside the run, not in memory
        shutil.move(weights, run_dir / "weights")


def _weights_dir(run_dir: pathlib.Path) -> pathlib.Path:
    """Where a run's kept versions are: ``weights`` in the run directory when it exists (copied there
    from a tmpfs), else its ``config.json``'s ``trainer.weights_dir``."""
    if (run_dir / "weights").is_dir():
        return run_dir / "weights"
    config = run_dir / "config.json"
    trainer = json.loads(config.read_text()).get("trainer", {}) if config.exists() else {}
    return pathlib.Path(trainer.get("weights_dir") or run_dir / "weights")


def _cores(text: str) -> set[int]:
    try:
        cores = {int(c) for c in text.split(",")}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated core numbers (1 or 0,1), got {text!r}") from None
    if not cores or min(cores) < 0:
        raise argparse.ArgumentTypeError(f"expected core numbers >= 0, got {text!r}")
    return cores


def _tmpfs_weights_dir(run_dir: pathlib.Path) -> pathlib.Path:
    """The server shares this host: publish through ``/dev/shm`` (no disk write per step) where it exists."""
    shm = pathlib.Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        return run_dir / "weights"
    return shm / "agentflow-bench" / run_dir.resolve().relative_to(run_dir.resolve().anchor)


def _run_remote(head: list[str], overrides: list[str], model: str | None, seed: int, task: str,
                args: argparse.Namespace, run_dir: pathlib.Path) -> None:
    served = model or "smollm2-135m"
    if args.server == "vllm":
        from agentflow.engines.model_loading import resolve_model_dir

        served = str(resolve_model_dir(served))  # vLLM loads HF directories only
    weights = _tmpfs_weights_dir(run_dir)
    shutil.rmtree(weights, ignore_errors=True)  # versions of an earlier try at this run
    with server_on_core(args.server, served, run_dir / "servers", core=0, context=1024 if args.quick else CONTEXT[task],
                        python=args.vllm_python, seed=seed, dtype=args.server_dtype) as address:
        remote = [
            "inference.backend=remote",
            f"inference.protocol={'vllm' if args.server == 'vllm' else 'sglang'}",
            f"inference.addresses=[{address}]",
            "trainer.weight_update=disk",
            f"trainer.weights_dir={weights}",
            "threads=1",
        ]
        keeper = None
        if args.offline_eval and _in_memory(weights):
            keeper = _Keeper(weights, run_dir / "weights", _evaluated(args))
            keeper.start()
        # the layout's settings first, so that --override (last in ``overrides``) can change them
        try:
            env = {**os.environ, "OMP_NUM_THREADS": "1"}
            _run([*head, *remote, *overrides], run_dir, env, pinned(args.trainer_cores))
            if keeper is not None:
                keeper.finish()
        finally:
            if keeper is not None:
                keeper.stop.set()
                shutil.rmtree(keeper.held, ignore_errors=True)
            if _in_memory(weights):  # the versions would hold memory
                shutil.rmtree(weights, ignore_errors=True)


_TMPFS_KEEP = 2


def _in_memory(path: pathlib.Path) -> bool:
    return path.is_relative_to("/dev/shm")


def _evaluated(args: argparse.Namespace) -> list[int]:
    """The versions --offline-eval scores (version 0 is the model the run started from)."""
    return sorted({*range(0, args.steps + 1, args.eval_every), args.steps})


class _Keeper(threading.Thread):
    """Keeps each evaluated version of a run that holds only the newest :data:`_TMPFS_KEEP` in a
    tmpfs, without taking CPU from the run.

    Once version v+1 exists (so v is complete) its files are hard-linked into ``<src>.kept`` on the
    same tmpfs: no bytes move, and the trainer's pruning of v no longer frees them. A second thread
    at idle priority (``SCHED_IDLE``: it runs only on a core nothing else wants) copies each kept
    version to ``dest`` and unlinks it from memory. Both matter on a 2-core machine:

    - copying each version (513 MiB) as soon as it was complete slowed an asynchronous run's
      training by up to 2x (32 sequences a step trained in 3.7-8.1 s against 3.0-3.7 s without the
      copy): there the copy lands while the trainer trains, in a synchronous run while it waits for
      the server, so it favoured synchronous training;
    - every version left in /dev/shm slowed training as they piled up (16 sequences trained in
      4.1-4.7 s at versions 4-7 against 2.0-2.2 s keeping one)."""

    def __init__(self, src: pathlib.Path, dest: pathlib.Path, versions: list[int]) -> None:
        super().__init__(name="bench-weights-keeper", daemon=True)
        self.src, self.dest, self.todo = src, dest, [v for v in versions if v > 0]
        self.held = src.with_name(src.name + ".kept")
        self.stop = threading.Event()
        self.missed: list[int] = []
        self._linked: queue.Queue[str | None] = queue.Queue()
        self._mover = threading.Thread(target=self._move, args=(True,), name="bench-weights-mover", daemon=True)
        self._error: BaseException | None = None

    def start(self) -> None:
        self._mover.start()
        super().start()

    def run(self) -> None:
        while self.todo and not self.stop.wait(0.2):
            self._link(final=False)

    def finish(self) -> None:
        """(After the run.) Keep what is left, wait for the copies, and fail if a version was
        deleted before it was linked."""
        self.stop.set()
        if self.ident is not None:  # started
            self.join()
        self._link(final=True)
        self._linked.put(None)
        if self._mover.ident is not None:
            self._mover.join()
        else:
            self._move(idle=False)
        shutil.rmtree(self.held, ignore_errors=True)
        if self._error is not None:
            raise SystemExit(f"copying kept versions from {self.held} to {self.dest} failed: {self._error}")
        if self.missed or self.todo:
            raise SystemExit(f"{self.src}: versions {self.missed + self.todo} were gone before they were kept; "
                             "raise _TMPFS_KEEP")

    def _link(self, *, final: bool) -> None:
        while self.todo:
            v = self.todo[0]
            name = f"v{v:06d}"
            if not final and not (self.src / f"v{v + 1:06d}").is_dir():
                return  # v may still be being written
            try:
                shutil.copytree(self.src / name, self.held / name, copy_function=os.link, dirs_exist_ok=True)
                self._linked.put(name)
            except OSError:
                shutil.rmtree(self.held / name, ignore_errors=True)
                self.missed.append(v)
            self.todo.pop(0)

    def _move(self, idle: bool) -> None:
        if idle and hasattr(os, "SCHED_IDLE"):
            try:
                os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))  # this thread only (Linux)
            except OSError:
                pass
        while (name := self._linked.get()) is not None:
            tmp = self.dest / f".{name}.tmp"
            try:
                shutil.copytree(self.held / name, tmp, dirs_exist_ok=True)
                tmp.rename(self.dest / name)
                shutil.rmtree(self.held / name)
            except OSError as e:
                shutil.rmtree(tmp, ignore_errors=True)
                self._error = e
                return


def _run(cmd: list[str], run_dir: pathlib.Path, env: Any, preexec: Callable[[], None] | None) -> None:
    with (run_dir / "train.log").open("w") as log:
        code = subprocess.run(
            cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, preexec_fn=preexec
        ).returncode
    if code != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({code}):\n{(run_dir / 'train.log').read_text()[-3000:]}")


def summarize(records: list[dict[str, Any]], targets: list[float], budgets: list[float]) -> dict[str, Any]:
    """Held-out per version with the version's time, times to ``targets``, held-out at ``budgets``."""
    steps = {r["step"]: r for r in records if "reward/mean" in r}
    published = {0: 0.0, **{v: r["time"] for v, r in steps.items()}}  # version v exists from this second
    evals = sorted((r["eval/version"], r["eval/reward"]) for r in records if "eval/reward" in r)
    curve = [(v, round(published[v], 1), round(acc, 4)) for v, acc in evals if v in published]
    step_s = sorted(r["time/step_s"] for v, r in steps.items() if v >= 2)
    return {
        "heldout": [{"version": v, "time_s": t, "accuracy": a} for v, t, a in curve],
        "time_to": {f"{x:g}": next((t for _, t, a in curve if a >= x), None) for x in targets},
        "heldout_at": {
            f"{b:g}s": max(((t, a) for _, t, a in curve if t <= b), default=(None, None))[1] for b in budgets
        },
        "median_step_s": round(statistics.median(step_s), 2) if step_s else None,
        "episodes_trained": sum(r.get("rollout/episodes", 0) for r in steps.values()),
        "steps": len(steps),
    }


def _mean(xs: list[Any]) -> float | None:
    vals = [x for x in xs if x is not None]
    return round(statistics.fmean(vals), 4) if vals and len(vals) == len(xs) else None


def aggregate(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Means over seeds (a time to a target is null unless every seed reached it)."""
    first = rows[0]
    versions = [h["version"] for h in first["heldout"]]
    return {
        "bench": "time_to_accuracy_mean",
        **{k: first[k] for k in ("task", "layout", "setting")},
        "seeds": [r["seed"] for r in rows],
        "heldout_mean": {
            str(v): _mean([next((h["accuracy"] for h in r["heldout"] if h["version"] == v), None) for r in rows])
            for v in versions
        },
        "time_to_mean": {k: _mean([r["time_to"][k] for r in rows]) for k in first["time_to"]},
        "heldout_at_mean": {k: _mean([r["heldout_at"][k] for r in rows]) for k in first["heldout_at"]},
        "median_step_s_mean": _mean([r["median_step_s"] for r in rows]),
    }


def plot(rows: list[dict[str, Any]], out: pathlib.Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["task"], r["layout"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False, constrained_layout=True)
    for ax, (task, layout) in zip(axes[0], panels, strict=True):
        settings = sorted({r["setting"] for r in rows if (r["task"], r["layout"]) == (task, layout)})
        for i, setting in enumerate(settings):
            mine = [r for r in rows if (r["task"], r["layout"], r["setting"]) == (task, layout, setting)]
            for j, r in enumerate(mine):  # one line per seed, one colour per setting
                ax.plot(
                    [h["time_s"] for h in r["heldout"]],
                    [100 * h["accuracy"] for h in r["heldout"]],
                    marker="o",
                    color=f"C{i}",
                    alpha=0.9 if j == 0 else 0.5,
                    label=setting if j == 0 else None,
                )
        ax.set_title(f"{task}, {layout}")
        ax.set_xlabel("wall-clock seconds (training loop)")
        ax.set_ylabel("held-out accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="addition,calculator", help="comma-separated: addition, calculator")
    p.add_argument("--settings", default="eta0,eta1,eta2,eta4", help="comma-separated: etaN, etaN-ramp, etaN-ds")
    p.add_argument("--seeds", default="0",
                   help="comma-separated sampling seeds (inference.local.seed; with --remote, the server's)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--eval-size", type=int, default=64, help="held-out problems")
    p.add_argument("--eval-samples", type=int, default=2, help="samples per held-out problem")
    p.add_argument("--targets", default="0.5,0.6,0.7,0.9", help="held-out accuracies to time")
    p.add_argument("--budgets", default="120,240,480", help="wall-clock seconds to read held-out at")
    p.add_argument("--remote", action="store_true", help="generation in a server on core 0, training on core 1")
    p.add_argument("--server", choices=("serve", "vllm"), default="serve",
                   help="with --remote: agentflow serve or a real vLLM generates")
    p.add_argument("--vllm-python", default=None, help="interpreter of a vLLM 0.32 install (--server vllm)")
    p.add_argument("--server-dtype", choices=("float32", "bfloat16"), default="float32",
                   help="with --remote: the dtype the server generates in (its --dtype)")
    p.add_argument("--trainer-cores", type=_cores, default={1},
                   help="with --remote: the trainer process's cores (the server has core 0); e.g. 0,1 with "
                        "--override trainer.train_cpus=[1] keeps training on core 1 and lets the event loop use "
                        "the server's spare time")
    p.add_argument("--model", default=None, help="model.path override (e.g. tiny for a plumbing check)")
    p.add_argument("--override", action="append", default=[], help="extra key=value for every run (repeatable)")
    p.add_argument("--runs", default=str(ROOT / "runs" / "bench_tta"), help="run directories go here")
    p.add_argument("--reuse", action="store_true", help="keep runs whose metrics are complete")
    p.add_argument("--keep-checkpoints", action="store_true",
                   help="keep each run's final checkpoint (and --offline-eval's weights; deleted otherwise)")
    p.add_argument("--offline-eval", action="store_true",
                   help="with --remote: score the published weights after each run, off the training clock")
    p.add_argument("--out", default=str(ROOT / "runs" / "bench_tta" / "time_to_accuracy.png"))
    p.add_argument("--quick", action="store_true", help="plumbing check: tiny model, 2 steps, 8 held-out problems")
    args = p.parse_args()
    if args.quick:
        args.model, args.steps, args.eval_every, args.eval_size = args.model or "tiny", 2, 1, 8
        # the tiny model's byte tokenizer makes the calculator's prompt (399 tokens) longer than its context
        args.override += ["data.shots=0", "generation.max_new_tokens=8", "inference.local.max_seq_len=1024"]
    if args.offline_eval and not args.remote:
        raise SystemExit("--offline-eval needs --remote (it scores the weight directories a remote run publishes)")
    if args.server == "vllm" and not args.remote:
        raise SystemExit("--server vllm needs --remote (vLLM runs in its own process)")
    layout = ("remote_vllm" if args.server == "vllm" else "remote") if args.remote else "in_process"
    targets = [float(x) for x in args.targets.split(",")]
    budgets = [float(x) for x in args.budgets.split(",")]
    rows: list[dict[str, Any]] = []
    settings = args.settings.split(",")
    for task in args.tasks.split(","):
        mine: dict[str, list[dict[str, Any]]] = {setting: [] for setting in settings}
        # settings alternate within each seed, so a drift in the machine's speed hits all of them
        for seed in (int(s) for s in args.seeds.split(",")):
            for setting in settings:
                run_dir = pathlib.Path(args.runs) / layout / task / setting / f"seed{seed}"
                train(task, setting, seed, args, run_dir)
                records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                row = {
                    "bench": "time_to_accuracy",
                    "task": task,
                    "layout": layout,
                    "setting": setting,
                    "seed": seed,
                    **({"server_dtype": args.server_dtype} if args.remote else {}),
                    **summarize(records, targets, budgets),
                    "run_dir": str(run_dir),
                }
                print(json.dumps(row), flush=True)
                mine[setting].append(row)
        for setting in settings:
            rows += mine[setting]
            print(json.dumps(aggregate(mine[setting])), flush=True)
    plot(rows, pathlib.Path(args.out))


if __name__ == "__main__":
    main()
