"""``ServerProcess.stop`` returns only when the server's whole process group is gone (vLLM's
engine core outlives its API process; a server started again on the same port while it runs can
crash at start)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from agentflow.engines.launch import ServerCommand, ServerProcess

# The server's main process exits at once on SIGTERM; its worker (same group) takes its time, or
# ignores SIGTERM altogether.
SERVER = """
import os, signal, sys, time
pidfile, worker_exit_s = sys.argv[1], float(sys.argv[2])
if os.fork() == 0:
    if worker_exit_s < 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    else:
        signal.signal(signal.SIGTERM, lambda *a: (time.sleep(worker_exit_s), os._exit(0)))
    with open(pidfile + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pidfile + ".tmp", pidfile)
    while True:
        time.sleep(0.05)
signal.signal(signal.SIGTERM, lambda *a: os._exit(0))
while True:
    time.sleep(0.05)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _started(tmp_path: Path, worker_exit_s: float) -> tuple[ServerProcess, int]:
    pidfile = tmp_path / "worker.pid"
    cmd = ServerCommand([sys.executable, "-c", SERVER, str(pidfile), str(worker_exit_s)], {}, "127.0.0.1", 1, "toy")
    server = ServerProcess(cmd, tmp_path / "server.log")
    server.start()
    deadline = time.monotonic() + 30
    while not pidfile.exists():
        assert time.monotonic() < deadline, "the toy server's worker never started"
        time.sleep(0.02)
    return server, int(pidfile.read_text())


def test_stop_waits_for_a_worker_that_outlives_the_main_process(tmp_path: Path) -> None:
    server, worker = _started(tmp_path, worker_exit_s=1.0)
    server.stop(grace_s=20)
    assert not _running(worker), "stop() returned while the server's worker still ran"
    assert not server.alive


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path: Path) -> None:
    server, worker = _started(tmp_path, worker_exit_s=-1)
    t0 = time.monotonic()
    server.stop(grace_s=1.0)
    assert not _running(worker)
    assert time.monotonic() - t0 < 15
    server.stop()  # idempotent


def test_stop_cleans_up_a_group_whose_main_process_already_died(tmp_path: Path) -> None:
    server, worker = _started(tmp_path, worker_exit_s=0.2)
    assert server.proc is not None
    os.kill(server.proc.pid, 9)
    server.proc.wait()
    assert _running(worker)  # orphaned, still in the server's group
    server.stop(grace_s=5)
    assert not _running(worker)
