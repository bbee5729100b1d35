"""The ``agentflow`` command: ``train``, ``launch``, ``eval``, ``serve``, ``plot``, ``merge-lora``.

``agentflow train [CONFIG.yaml ...] [key=value ...]`` trains with the built-in recipe; with no
config it trains the embedded SmolLM2-135M to call a calculator on two-digit multiplication.
``agentflow train --help`` lists every configuration field with its default. ``agentflow launch``
takes the same arguments and runs the same training on a Ray cluster (the ``launch`` section).

Not here: what the commands run (``agentflow.recipe``, ``agentflow.engines.serve.server``); it only
parses arguments, prints results and turns agentflow's errors into one-line messages.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence

__all__ = ["exit_process", "main", "run"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; every error agentflow raises on purpose becomes one message and exit code 2,
    an interrupt (Ctrl-C, SIGTERM) one line and 128 + the signal's number."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[0] if argv and not argv[0].startswith("-") else "train"
    from agentflow.errors import AgentflowError, Interrupted

    _sigterm_as_interrupt()
    try:
        return _dispatch(argv)
    except Interrupted as e:
        _say(f"agentflow {command}: interrupted by {e}")
        return e.exit_code
    except AgentflowError as e:
        _say(f"agentflow {command}: error: {e}")
        return 2
    except KeyboardInterrupt as e:
        _say(f"agentflow {command}: interrupted{f' by {e}' if str(e) else ''} before the run started; nothing "
             "was written")
        return 130 if not str(e) else 143


def run() -> None:
    """The ``agentflow`` console script: :func:`main`, then :func:`exit_process`."""
    exit_process(main())


def exit_process(code: int) -> None:
    """Exit with ``code``. A rank of a multi-process run (``WORLD_SIZE`` > 1: torchrun, ``agentflow
    launch``) leaves without interpreter teardown once its work is flushed: torch.distributed's
    gloo threads can abort a finished process there (SIGABRT, "terminate called without an active
    exception"), which its launcher would take for a crash."""
    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


def _dispatch(argv: list[str]) -> int:
    if argv and argv[0] == "serve":  # the server owns its flags
        from agentflow.engines.serve.server import serve_main

        return int(serve_main(argv[1:]) or 0)
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return int(args.func(args) or 0)


def _say(line: str) -> None:
    print(line, file=sys.stderr)  # noqa: T201


def _sigterm_as_interrupt() -> None:
    """SIGTERM before the training loop runs ends like Ctrl-C (one line, no traceback); the loop
    installs its own handlers while it runs. SIGINT stops a command also when the shell that started
    it ignored SIGINT (a job a script put in the background with ``&`` inherits SIG_IGN, and Python
    then leaves Ctrl-C ignored): ``kill -INT`` is how such a job is stopped cleanly."""
    if threading.current_thread() is not threading.main_thread():
        return

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, handler)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="agentflow", description="Asynchronous RL for LLM agents.")
    sub = p.add_subparsers(dest="command")

    train = sub.add_parser("train", help="train a policy (the built-in recipe)",
                           formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_fields_help())
    train.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                       help="YAML files, then dotted overrides (later wins)")
    train.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    train.add_argument("-v", "--verbose", action="store_true")
    train.set_defaults(func=_cmd_train)

    launch = sub.add_parser("launch", help="train on a Ray cluster: servers and trainer ranks placed by Ray",
                            formatter_class=argparse.RawDescriptionHelpFormatter,
                            epilog="The launch.* fields place the run (`agentflow train --help` lists them; "
                                   "docs/launch.md); RAY_ADDRESS names the cluster (default: a local one).")
    launch.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value",
                        help="YAML files, then dotted overrides (later wins)")
    launch.add_argument("--resume", action="store_true", help="continue from the run directory's last checkpoint")
    launch.add_argument("-v", "--verbose", action="store_true")
    launch.set_defaults(func=_cmd_launch)

    ev = sub.add_parser("eval", help="score a model or checkpoint on a dataset with a workflow")
    ev.add_argument("items", nargs="*", metavar="CONFIG.yaml | key=value")
    ev.add_argument("--model", help="checkpoint or model directory (default: model.path of the config)")
    ev.add_argument("--n", type=int, default=None, help="prompts to score (default: data.eval_size)")
    ev.add_argument("-v", "--verbose", action="store_true")
    ev.set_defaults(func=_cmd_eval)

    plot = sub.add_parser("plot", help="write a PNG of a run's curves")
    plot.add_argument("run_dir")
    plot.add_argument("--out", default=None, help="output PNG (default RUN_DIR/curves.png)")
    plot.add_argument("-v", "--verbose", action="store_true")
    plot.set_defaults(func=_cmd_plot)

    trace = sub.add_parser("trace", help="summarise a run's timeline (logging.trace=true): each step's wait, "
                                         "train, publish and the lag of the groups it took")
    trace.add_argument("path", help="a run directory (its newest trace*.json) or a trace file")
    trace.add_argument("--json", action="store_true", help="print the summary as JSON")
    trace.add_argument("-v", "--verbose", action="store_true")
    trace.set_defaults(func=_cmd_trace)

    merge = sub.add_parser("merge-lora", help="fold a LoRA adapter into its base model (an HF checkpoint)")
    merge.add_argument("adapter", help="a LoRA adapter directory or a LoRA run checkpoint (runs/X/checkpoints/step-N)")
    merge.add_argument("out", help="directory of the merged HF checkpoint")
    merge.add_argument("--base", default=None,
                       help="base model (default: the adapter's base_model_name_or_path)")
    merge.add_argument("--overwrite", action="store_true",
                       help="replace OUT if it is an existing, non-empty directory (never the adapter itself)")
    merge.add_argument("-v", "--verbose", action="store_true")
    merge.set_defaults(func=_cmd_merge_lora)

    sub.add_parser("serve", help="serve a model over SGLang's HTTP protocol (see `agentflow serve --help`)")
    return p


def _split(items: Sequence[str]) -> tuple[list[str], list[str]]:
    files = [i for i in items if "=" not in i]
    overrides = [i for i in items if "=" in i]
    return files, overrides


def _cmd_train(args: argparse.Namespace) -> int:
    from agentflow.recipe import load_recipe_config, train

    files, overrides = _split(args.items)
    cfg = load_recipe_config(files, overrides)
    summary = train(cfg, resume=args.resume)
    print(summary)  # noqa: T201
    return 0


def _cmd_launch(args: argparse.Namespace) -> int:
    from agentflow.recipe.launch import launch, load_launch_config

    logging.getLogger("agentflow.launch").setLevel(logging.INFO)  # placement, addresses, restarts
    files, overrides = _split(args.items)
    cfg = load_launch_config(files, overrides)
    print(launch(cfg, resume=args.resume, verbose=args.verbose))  # noqa: T201
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from agentflow.recipe import evaluate_model, load_recipe_config

    files, overrides = _split(args.items)
    cfg = load_recipe_config(files, overrides)
    print(evaluate_model(cfg, model=args.model, n=args.n))  # noqa: T201
    return 0


def _cmd_merge_lora(args: argparse.Namespace) -> int:
    from agentflow.recipe.build import merge_lora

    print(merge_lora(args.adapter, args.out, args.base, overwrite=args.overwrite))  # noqa: T201
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from agentflow._plot import plot_run

    print(plot_run(args.run_dir, args.out))  # noqa: T201
    return 0


def _cmd_trace(args: argparse.Namespace) -> int:
    import json

    from agentflow._trace import format_summary, read_trace, summarize_trace, trace_file

    path = trace_file(args.path)
    summary = summarize_trace(read_trace(path))
    print(json.dumps({"trace": str(path), **summary}) if args.json else format_summary(summary, str(path)))  # noqa: T201
    return 0


def _fields_help() -> str:
    try:
        from agentflow.config import describe
        from agentflow.recipe import TrainRecipeConfig
    except ImportError as e:  # a broken install should still print --help
        return f"(configuration fields unavailable: {e})"
    rows = describe(TrainRecipeConfig)
    width = max(len(r[0]) for r in rows)
    lines = ["configuration fields (set with key=value or in a YAML file):", ""]
    for name, tp, default, doc in rows:
        lines.append(f"  {name:<{width}}  {tp} = {default}")
        if doc:
            lines.append(f"  {'':<{width}}    {doc}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
