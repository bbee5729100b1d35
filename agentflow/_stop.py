"""Stopping a run on SIGINT / SIGTERM within a bounded time, with one line of output.

:class:`GracefulStop` is entered on the event loop around a :class:`~agentflow.Trainer` run. The
first signal asks the trainer to stop (:meth:`Trainer.request_stop`): the trainer thread stops
waiting for rollouts at once, and if a step finished since the last checkpoint it writes a final
one. A watchdog then gives the run ``grace_s`` seconds; if it has not returned by then (a train
step or a weight update still running), or when a second signal arrives, the process exits at once
with a one-line message naming the last complete checkpoint. Checkpoints are written atomically,
so the last complete one is usable whichever way the run ends.

Exit codes follow the shell convention: 128 + the signal number (130 for SIGINT, 143 for SIGTERM).

Not here: what a stop does inside the loop (the trainer), printing the graceful stop's line (the CLI).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable

__all__ = ["GracefulStop"]


class GracefulStop:
    """Route SIGINT and SIGTERM to ``request_stop(signal_name)``; force an exit after ``grace_s``.

    Args:
        request_stop: called on the loop with the signal's name at the first signal.
        describe: returns the line printed when the process is forced to exit (e.g. the step and
            the last complete checkpoint).
        grace_s: seconds from the first signal until a forced exit.
        signals: the signals handled (main thread only; elsewhere this is a no-op).
    """

    def __init__(self, request_stop: Callable[[str], None], describe: Callable[[], str], *, grace_s: float = 8.0,
                 signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM)) -> None:
        self.request_stop = request_stop
        self.describe = describe
        self.grace_s = grace_s
        self.signals = signals
        self.received: signal.Signals | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: threading.Timer | None = None

    async def __aenter__(self) -> GracefulStop:
        if threading.current_thread() is not threading.main_thread():
            return self
        self._loop = asyncio.get_running_loop()
        for sig in self.signals:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._loop is not None:
            for sig in self.signals:
                with contextlib.suppress(Exception):
                    self._loop.remove_signal_handler(sig)

    @property
    def exit_code(self) -> int:
        return 128 + int(self.received) if self.received is not None else 0

    def _on_signal(self, sig: signal.Signals) -> None:
        if self.received is not None:  # the second signal: do not wait for anything
            self._force_exit(f"{sig.name} again")
            return
        self.received = sig
        why = f"no clean stop within {self.grace_s:.0f}s"
        self._timer = threading.Timer(self.grace_s, self._force_exit, args=(why,))
        self._timer.daemon = True
        self._timer.start()
        self.request_stop(sig.name)

    def _force_exit(self, why: str) -> None:
        try:
            line = self.describe()
        except Exception as e:  # never let the message keep the process alive
            line = f"({type(e).__name__} while describing the run)"
        _say(f"agentflow: stopped ({why}): {line}")
        os._exit(self.exit_code or 130)


def _say(line: str) -> None:
    with contextlib.suppress(Exception):
        sys.stderr.write(line + "\n")
        sys.stderr.flush()

