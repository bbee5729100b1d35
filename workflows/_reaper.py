"""Run one agent command so that every process it starts ends with it (Linux).

Run as ``python -I _reaper.py ARGV...`` by :mod:`agentflow.workflows.agent_command` (never imported:
standard library only). This process becomes a *child subreaper* (``PR_SET_CHILD_SUBREAPER``), so
a descendant whose parent exits (a double fork, ``setsid``, a daemon) is re-parented here rather
than to init, then forks and execs ``ARGV``. When that process exits, or this one gets SIGTERM (the
workflow's deadline) or loses its parent (``PR_SET_PDEATHSIG``), it SIGKILLs every descendant it
can see in ``/proc`` (its children, theirs, and whatever was re-parented to it), round after round
until none is left, reaps them, and exits with the command's status (``128 + signal`` for a
signal). Its own stdin and stdout are closed at once, so only the command's processes hold the
workflow's pipes, and those all end with it.

A command that cannot be started exits 127 with ``agentflow: cannot start ...`` on stderr.

Not here: descendants that left through another PID namespace or were adopted by another
subreaper of their own making; resource limits (the command runs with the workflow's permissions).
"""

import contextlib
import ctypes
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG, _PR_SET_CHILD_SUBREAPER = 1, 36
_CANNOT_START = 127
_KILL_ROUNDS_S = 10.0  # give up (and report) after this long; each round kills what it sees


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live (not zombie) process in /proc."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in (b"Z", b"X"):
            out[int(entry)] = int(fields[1])
    return out


def descendants(root: int) -> set[int]:
    parents = _parents()
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parents.items() if ppid in frontier} - found
        found |= frontier
    return found


def _reap() -> bool:
    """Reap every exited child; False once there is no child left at all."""
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return False
        if pid == 0:
            return True


def kill_descendants() -> None:
    deadline = time.monotonic() + _KILL_ROUNDS_S
    while time.monotonic() < deadline:
        pids = descendants(os.getpid())
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        if not _reap() and not pids:
            return
        time.sleep(0.005)  # a separate process: nothing else waits on this one
    sys.stderr.write("agentflow: some processes of the agent command could not be killed\n")


def _on_signal(signum: int, frame: object) -> None:
    kill_descendants()
    os._exit(128 + signum)


def _start(argv: list[str]) -> int:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_DFL)
        os.set_inheritable(w, False)
        try:
            os.execvp(argv[0], argv)
        except OSError as e:
            os.write(w, f"{type(e).__name__}: {e}".encode())
        os._exit(_CANNOT_START)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        failure = f.read().decode(errors="replace")  # empty once exec succeeded (close-on-exec)
    if failure:
        sys.stderr.write(f"agentflow: cannot start agent command {argv}: {failure}\n")
    return pid


def main() -> None:
    argv = sys.argv[1:]
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if os.getppid() == 1:  # the workflow died before the line above
        os._exit(128 + signal.SIGTERM)
    pid = _start(argv)
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    _, status = os.waitpid(pid, 0)
    kill_descendants()
    os._exit(os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))


if __name__ == "__main__":
    main()
