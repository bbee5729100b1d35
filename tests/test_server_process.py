"""``engines.launch.ServerProcess``: a started server dies with the process that started it, even
when that process is killed without cleaning up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agentflow.engines.launch import ServerCommand, ServerProcess
from agentflow.errors import EngineError

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")

# A parent that starts a "server" (a sleeping child that writes its pid), then blocks until killed.
PARENT = """
import sys, time
from pathlib import Path
from agentflow.engines.launch import ServerCommand, ServerProcess
pidfile = sys.argv[1]
child = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(600)"
cmd = ServerCommand([sys.executable, "-c", child, pidfile], {}, "127.0.0.1", 1, "toy")
ServerProcess(cmd, Path(pidfile).with_suffix(".log")).start()
time.sleep(600)
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _wait_for(cond, timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < end, what
        time.sleep(0.05)


@linux
def test_a_server_gets_sigterm_when_its_parent_is_killed(tmp_path: Path) -> None:
    pidfile = tmp_path / "server.pid"
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(pidfile)])
    try:
        _wait_for(lambda: pidfile.exists() and pidfile.read_text(), 60, "the server never started")
        server = int(pidfile.read_text())
        assert _running(server)
        parent.send_signal(signal.SIGKILL)  # no cleanup runs in the parent
        parent.wait(10)
        _wait_for(lambda: not _running(server), 10, "the server outlived its killed parent")
    finally:
        parent.kill()
        if pidfile.exists() and pidfile.read_text():
            with_pid = int(pidfile.read_text())
            if _running(with_pid):
                os.kill(with_pid, signal.SIGKILL)


def test_a_missing_program_is_named_before_anything_starts(tmp_path: Path) -> None:
    cmd = ServerCommand(["/nonexistent/python", "-m", "server"], {}, "127.0.0.1", 1, "toy")
    server = ServerProcess(cmd, tmp_path / "toy.log")
    with pytest.raises(EngineError, match=r"cannot start '/nonexistent/python': no such executable"):
        server.start()
    assert server.proc is None and not server.alive
