"""Run untrusted Python in a locked-down subprocess, without blocking the event loop.

``await run_python(code, stdin=..., timeout_s=..., memory_mb=..., max_output_bytes=...)`` writes
``code`` to ``main.py`` in a fresh private temp dir (the process's cwd, removed afterwards) and
runs it with ``python -I -u`` under these layers, each applied where the machine allows
(:func:`detect_isolation` says which are active):

- **resource limits** (always): CPU seconds, address space (``memory_mb``), processes, file size,
  open files, no core dumps; soft = hard so the code cannot raise them;
- **a wall-clock deadline** (always) that SIGKILLs the whole process group; stdout and stderr are
  read as they arrive and each is capped at ``max_output_bytes`` (the process is killed at the cap);
- **a scrubbed environment** (always): only ``PATH``, ``HOME``/``TMPDIR`` (= the temp dir), a UTF-8
  locale; nothing of the parent's environment (API keys, tokens) is passed on;
- **namespaces** via ``unshare`` (a user namespace where the kernel allows one, for root too; else,
  as root, the others alone): no network (a new network namespace has only a down loopback), a
  PID namespace with its own ``/proc`` (the code cannot see, signal or read the environment of
  host processes; killing the namespace kills every process in it, including ones that called
  ``setsid``), its own UTS namespace (hostname) and IPC namespace (System V shared memory,
  semaphores and message queues vanish with the run instead of staying on the host);
- **a private disk and /dev** (with namespaces): the work dir is a tmpfs of ``max_disk_mb``
  megabytes and ``max_files`` inodes inside the sandbox's own mount namespace, so total bytes
  written and files created are capped (writes past either fail with ``ENOSPC``) and vanish with
  the run; ``/dev`` holds only ``null``, ``zero``, ``full``, ``random``, ``urandom`` (no ``kmsg``,
  disks, ttys, ``/dev/shm``);
- **no capabilities** (always): every capability set emptied and the secure bits locked, plus
  ``no_new_privs``: uid 0 in the sandbox cannot ``sethostname``, mount, load modules, set the
  clock or override file permissions;
- **Landlock** (Linux >= 5.13): writes only beneath the temp dir, no reads of ``/proc``/``/sys``
  except its own, of ``/dev`` except the five nodes above, nor of credential files
  (``/etc/shadow``, ``/etc/gshadow``, ``/etc/sudoers*``, ``/etc/ssh``, ``~/.ssh`` and ``~/.gnupg``
  of root and of ``/home/*``) even as root, no TCP connect/bind, no signals to processes outside
  the sandbox;
- **seccomp** (x86-64, aarch64), always: no ``socket(AF_UNIX)`` (host UNIX sockets such as a Docker
  socket, an ssh-agent, X11 or a database are unreachable; ``socketpair`` still works), no
  ``unshare``/``setns``/``clone(CLONE_NEWUSER)`` (no user or other namespaces), no io_uring, no
  kernel keyring (``add_key``/``request_key``/``keyctl``: keys are per uid, not namespaced);
  with ``max_processes=1`` (the default) no new processes at all (threads are fine). This is what
  bounds fork bombs for uid 0, for which the kernel does not enforce ``RLIMIT_NPROC``.

What is NOT isolated (this is a guard against buggy or reward-hacking model code, not a security
boundary against a determined attacker; use a VM or gVisor for that):

- **reads**: the code can read every file the parent's user can read outside ``/proc``, ``/sys``
  and the credential files above (model weights, the source tree, other users' files when run as
  root); without Landlock, the credential files too (``/etc/shadow`` when run as root);
- **without Landlock** it can write anywhere the parent's user can (``/tmp``, the home dir), and
  **without namespaces** it can reach the network, see host processes and read
  ``/proc/<pid>/environ`` of processes of the same user;
- **with ``max_processes > 1`` as uid 0** nothing but the deadline bounds the number of processes;
- CPU and memory are bounded per process only (no cgroup): ``max_processes`` processes may each
  use ``memory_mb``; **without namespaces** disk use is bounded per file (``max_file_mb``), not
  in total nor in file count (no private tmpfs);
- **without seccomp** (other architectures, with ``max_processes > 1``): host UNIX sockets and the
  uid's kernel keyring stay reachable and user namespaces can be created where the kernel allows
  them; **without namespaces** System V IPC objects it creates outlive the run and ``/dev`` is
  the host's (Landlock still denies reading it but for the five nodes);
- the kernel itself: a kernel exploit escapes all of the above. UDP without namespaces is open.

Not here: deciding what the output means (see :mod:`agentflow.envs.tools` and the code workflow).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import math
import os
import shutil
import signal
import sys
import tempfile
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from agentflow.errors import ConfigError, SandboxError

__all__ = [
    "Isolation",
    "SandboxLimits",
    "SandboxPool",
    "SandboxResult",
    "SandboxStatus",
    "default_pool",
    "detect_isolation",
    "run_python",
]

SandboxStatus = Literal["ok", "error", "timeout", "memory", "output_limit", "killed"]
_CHILD = str(Path(__file__).with_name("_sandbox_child.py"))
_SETUP_FAILED, _OUT_OF_MEMORY = 250, 251  # exit codes of _sandbox_child.py
_EOF_GRACE_S = 2.0  # after exit, how long to wait for the last output of escaped grandchildren


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Limits of one execution.

    Attributes:
        timeout_s: wall-clock seconds until the process group is killed (status ``timeout``).
        memory_mb: address-space limit per process (``RLIMIT_AS``); allocations beyond it raise
            ``MemoryError`` (status ``memory``).
        max_output_bytes: cap on stdout and on stderr each; reaching it kills the process
            (status ``output_limit``).
        cpu_s: CPU seconds per process (``RLIMIT_CPU``); default ``ceil(timeout_s) + 1``.
        max_processes: 1 = no subprocesses (seccomp); more allows that many (``RLIMIT_NPROC``,
            counted per user: not enforced for uid 0).
        max_file_mb: largest file the code may write (``RLIMIT_FSIZE``).
        max_open_files: ``RLIMIT_NOFILE``.
        network: False = no network (namespace and Landlock where available).
        max_disk_mb: total bytes the code may write (its work dir is a tmpfs of this size; needs
            namespaces, see :func:`detect_isolation`).
        max_files: files and directories the code may create (the tmpfs's inode count).
    """

    timeout_s: float = 10.0
    memory_mb: int = 512
    max_output_bytes: int = 1 << 20
    cpu_s: int | None = None
    max_processes: int = 1
    max_file_mb: int = 16
    max_open_files: int = 64
    network: bool = False
    max_disk_mb: int = 64
    max_files: int = 1000

    def __post_init__(self) -> None:
        problems = [
            f"sandbox {name} must be > 0, got {value!r}"
            for name, value in (("timeout_s", self.timeout_s), ("memory_mb", self.memory_mb),
                                ("max_output_bytes", self.max_output_bytes), ("max_processes", self.max_processes),
                                ("max_file_mb", self.max_file_mb), ("max_open_files", self.max_open_files),
                                ("max_disk_mb", self.max_disk_mb), ("max_files", self.max_files),
                                ("cpu_s", 1 if self.cpu_s is None else self.cpu_s))
            if not (isinstance(value, int | float) and value > 0 and math.isfinite(value))
        ]
        if self.memory_mb < 32:
            problems.append(f"sandbox memory_mb must be >= 32 (Python itself needs ~20 MB), got {self.memory_mb}")
        if problems:
            raise ConfigError(problems)

    def child_args(self, landlock: bool, private_disk: bool = False) -> str:
        cpu = self.cpu_s if self.cpu_s is not None else math.ceil(self.timeout_s) + 1
        return json.dumps({
            "cpu_s": int(cpu), "memory_mb": int(self.memory_mb), "max_processes": int(self.max_processes),
            "max_file_mb": int(self.max_file_mb), "max_open_files": int(self.max_open_files),
            "landlock": landlock, "private_disk": private_disk, "max_disk_mb": int(self.max_disk_mb),
            "max_files": int(self.max_files),
        })


@dataclass(frozen=True, slots=True)
class SandboxResult:
    """What one execution did. ``stdout``/``stderr`` are decoded UTF-8 (invalid bytes replaced),
    cut at the cap; ``exit_code`` is negative for a signal, None when we killed it first."""

    status: SandboxStatus
    exit_code: int | None
    stdout: str
    stderr: str
    wall_s: float
    stdout_truncated: bool = False
    stderr_truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"


@dataclass(frozen=True, slots=True)
class Isolation:
    """Which layers this machine gives the sandbox (see the module docstring)."""

    unshare: tuple[str, ...]  # command prefix; () = no namespaces
    landlock_abi: int  # 0 = no Landlock
    seccomp: bool

    @property
    def network_isolated(self) -> bool:
        return "--net" in self.unshare or self.landlock_abi >= 4

    @property
    def signals_isolated(self) -> bool:
        return "--pid" in self.unshare or self.landlock_abi >= 6

    @property
    def writes_isolated(self) -> bool:
        return self.landlock_abi >= 1


# ------------------------------------------------------------------------------------ isolation
_isolation: dict[bool, Isolation] = {}


def _landlock_abi() -> int:
    if sys.platform != "linux":
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    return max(0, libc.syscall(444, None, ctypes.c_size_t(0), ctypes.c_uint32(1)))


async def _works(cmd: list[str]) -> bool:
    try:
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
    except OSError:
        return False
    return await proc.wait() == 0


async def detect_isolation(network: bool = False) -> Isolation:
    """Probe (once per process) which isolation layers work here."""
    if network in _isolation:
        return _isolation[network]
    ns = ["--pid", "--mount-proc", "--fork", "--kill-child", "--uts", "--ipc"] + ([] if network else ["--net"])
    user = ["--user", "--map-root-user"]  # as root too: its capabilities then only reach the sandbox's own
    prefix: tuple[str, ...] = ()
    unshare = shutil.which("unshare")
    # a user namespace where the kernel allows one; as root without it, the other namespaces still work
    for cmd in ([unshare, *user, *ns], [unshare, *ns]) if os.geteuid() == 0 else ([unshare, *user, *ns],):
        if unshare and await _works([*cmd, "--", "true"]):
            prefix = (*cmd, "--")
            break
    machine = os.uname().machine if hasattr(os, "uname") else ""
    iso = Isolation(prefix, _landlock_abi(), sys.platform == "linux" and machine in ("x86_64", "aarch64"))
    _isolation[network] = iso
    return iso


# ------------------------------------------------------------------------------------ one run
class _Capture(asyncio.Protocol):
    """Collects a pipe's bytes up to ``cap``; calls ``on_overflow`` once when more arrive."""

    def __init__(self, cap: int, on_overflow: Callable[[], None], eof: asyncio.Future[None]) -> None:
        self.cap, self.on_overflow, self.eof = cap, on_overflow, eof
        self.buf = bytearray()
        self.truncated = False

    def data_received(self, data: bytes) -> None:
        room = self.cap - len(self.buf)
        self.buf += data[:room]
        if len(data) > room and not self.truncated:
            self.truncated = True
            self.on_overflow()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.eof.done():
            self.eof.set_result(None)

    def text(self) -> str:
        return self.buf.decode("utf-8", errors="replace")


class _Run:
    """One execution: spawn, watch (deadline, output caps), report. Owns its pipes and process."""

    def __init__(self, limits: SandboxLimits, iso: Isolation, workdir: str) -> None:
        self.limits, self.iso, self.workdir = limits, iso, workdir
        self.loop = asyncio.get_running_loop()
        self.proc: asyncio.subprocess.Process | None = None
        self.reason: SandboxStatus | None = None
        self.transports: list[asyncio.BaseTransport] = []
        self.captures: list[_Capture] = []

    def stop(self, reason: SandboxStatus) -> None:
        """Kill the whole process group (once); ``reason`` becomes the status."""
        if self.reason is None:
            self.reason = reason
        if self.proc is not None and self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)

    async def _pipe(self) -> int:
        """A pipe whose read end feeds a :class:`_Capture`; returns the write end for the child."""
        r, w = os.pipe()
        cap = _Capture(self.limits.max_output_bytes, lambda: self.stop("output_limit"), self.loop.create_future())
        transport, _ = await self.loop.connect_read_pipe(lambda: cap, os.fdopen(r, "rb", buffering=0))
        self.transports.append(transport)
        self.captures.append(cap)
        return w

    async def execute(self, stdin: IO[bytes] | int) -> SandboxResult:
        t0 = self.loop.time()
        status_r, status_w = os.pipe()
        out_w, err_w = await self._pipe(), await self._pipe()
        try:
            self.proc = await asyncio.create_subprocess_exec(
                *self.iso.unshare, sys.executable, "-I", "-u", _CHILD,
                self.limits.child_args(self.iso.landlock_abi > 0, bool(self.iso.unshare)), str(status_w),
                stdin=stdin, stdout=out_w, stderr=err_w, cwd=self.workdir, env=_scrubbed_env(self.workdir),
                start_new_session=True, pass_fds=(status_w,),
            )
        except OSError as e:
            raise SandboxError(f"could not start the sandbox process ({e}); expected {sys.executable} "
                               "to be executable") from e
        finally:
            for fd in (status_w, out_w, err_w):
                os.close(fd)
        try:
            await self._watch()
            report = _read_report(status_r)
        finally:
            os.close(status_r)
        return self._result(report, self.loop.time() - t0)

    async def _watch(self) -> None:
        assert self.proc is not None
        try:
            async with asyncio.timeout(self.limits.timeout_s):
                await self.proc.wait()
        except TimeoutError:
            self.stop("timeout")
            await self.proc.wait()
        # Output written just before exit is still in the pipes; with a PID namespace every writer is
        # gone now, without one an escaped grandchild may hold them: wait a bounded grace only.
        await asyncio.wait([c.eof for c in self.captures], timeout=_EOF_GRACE_S)

    def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.stop("killed")
        for t in self.transports:
            t.close()

    def _result(self, report: dict[str, int] | None, wall_s: float) -> SandboxResult:
        out, err = self.captures
        status, code = _classify(self.reason, report, err.text())
        return SandboxResult(status, code, out.text(), err.text(), wall_s, out.truncated, err.truncated)


def _classify(
    reason: SandboxStatus | None, report: dict[str, int] | None, stderr: str
) -> tuple[SandboxStatus, int | None]:
    code = None if report is None else report.get("exit", -report.get("signal", 0))
    if reason is not None:
        return reason, code
    if report is None:
        raise SandboxError(f"the sandbox exited without reporting a status; its stderr: {stderr[-2000:]!r}")
    if "signal" in report:
        return ("timeout" if report["signal"] == signal.SIGXCPU else "killed"), code
    if code == _SETUP_FAILED and "agentflow-sandbox-setup" in stderr:
        raise SandboxError(f"the sandbox could not lock the process down: {stderr.strip()[-2000:]}")
    if code == _OUT_OF_MEMORY:
        return "memory", code
    return ("ok" if code == 0 else "error"), code


def _read_report(fd: int) -> dict[str, int] | None:
    os.set_blocking(fd, False)
    try:
        raw = os.read(fd, 4096)
    except BlockingIOError:
        return None
    return json.loads(raw) if raw else None


def _scrubbed_env(workdir: str) -> dict[str, str]:
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": workdir,
        "TMPDIR": workdir,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "MALLOC_ARENA_MAX": "2",  # glibc reserves 64 MB of address space per thread arena otherwise
    }


@contextlib.contextmanager
def _stdin_file(data: str | bytes | None):
    if data is None:
        yield asyncio.subprocess.DEVNULL
        return
    with tempfile.TemporaryFile() as f:
        f.write(data.encode() if isinstance(data, str) else data)
        f.seek(0)
        yield f


def _prepare_workdir(code: str) -> str:
    """A private (0700) temp dir holding ``main.py``: small local writes, done inline."""
    workdir = tempfile.mkdtemp(prefix="agentflow-sandbox-")
    Path(workdir, "main.py").write_text(code, encoding="utf-8")
    return workdir


async def _execute(code: str, stdin: str | bytes | None, limits: SandboxLimits) -> SandboxResult:
    iso = await detect_isolation(limits.network)
    workdir = _prepare_workdir(code)
    run = _Run(limits, iso, workdir)
    try:
        with _stdin_file(stdin) as stdin_f:
            return await run.execute(stdin_f)
    finally:
        run.close()
        if run.proc is not None and run.proc.returncode is None:
            await asyncio.shield(run.proc.wait())
        await asyncio.to_thread(shutil.rmtree, workdir, True)


# ------------------------------------------------------------------------------------ pool
class SandboxPool:
    """At most ``max_concurrent`` executions at once (default: the number of CPUs); the rest wait.

    Create one per event loop (asyncio primitives belong to a loop); :func:`run_python` keeps one
    default pool per running loop.
    """

    def __init__(self, max_concurrent: int | None = None, limits: SandboxLimits | None = None) -> None:
        n = max_concurrent if max_concurrent is not None else os.cpu_count() or 1
        if n < 1:
            raise ConfigError(f"SandboxPool max_concurrent must be >= 1, got {n}")
        self.max_concurrent = n
        self.limits = limits or SandboxLimits()
        self._slots = asyncio.Semaphore(n)

    async def run(
        self, code: str, *, stdin: str | bytes | None = None, limits: SandboxLimits | None = None
    ) -> SandboxResult:
        """Run ``code``; raises :class:`SandboxError` only when the sandbox itself failed."""
        async with self._slots:
            return await _execute(code, stdin, limits or self.limits)


_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, SandboxPool] = weakref.WeakKeyDictionary()


def default_pool() -> SandboxPool:
    """This event loop's shared pool (one slot per CPU)."""
    loop = asyncio.get_running_loop()
    if loop not in _pools:
        _pools[loop] = SandboxPool()
    return _pools[loop]


async def run_python(
    code: str,
    *,
    stdin: str | bytes | None = None,
    timeout_s: float = 10.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1 << 20,
    cpu_s: int | None = None,
    max_processes: int = 1,
    max_file_mb: int = 16,
    max_open_files: int = 64,
    network: bool = False,
    pool: SandboxPool | None = None,
    max_disk_mb: int = 64,
    max_files: int = 1000,
) -> SandboxResult:
    """Run ``code`` as a Python script in the sandbox; see :class:`SandboxLimits` for the limits.

    Returns a :class:`SandboxResult` whatever the code does (errors, loops, floods); raises
    :class:`SandboxError` only when the sandbox could not run it at all. Waits for a slot of
    ``pool`` (default: this loop's pool, one slot per CPU).
    """
    limits = SandboxLimits(timeout_s, memory_mb, max_output_bytes, cpu_s, max_processes, max_file_mb,
                           max_open_files, network, max_disk_mb, max_files)
    return await (pool or default_pool()).run(code, stdin=stdin, limits=limits)
