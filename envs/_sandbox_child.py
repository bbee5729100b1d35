"""The sandbox's in-child half: lock the process down, then run ``main.py`` from the cwd.

Run as ``python -I _sandbox_child.py '<json limits>'`` by :mod:`agentflow.envs.sandbox` (never
imported by it: this file must work with the standard library alone, before any user code).
Steps, each before the first line of user code runs:

1. resource limits (soft = hard, so the code cannot raise them back; CPU hard = soft + 1 s): CPU seconds, address space,
   processes, file size, open files, core size 0;
2. ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_PDEATHSIG(SIGKILL)`` (dies with its parent);
3. Landlock (Linux >= 5.13, when the kernel has it): writes only beneath the cwd (and ``/dev/null``),
   reads everywhere except ``/proc`` and ``/sys`` (other processes' environments), no TCP
   connect/bind (ABI >= 4), no signals to or abstract sockets of processes outside the sandbox
   (ABI >= 6);
4. a seccomp filter that refuses new processes (fork, vfork, clone without ``CLONE_THREAD``,
   clone3) when ``max_processes == 1``: threads still work, and this bounds fork bombs even for
   uid 0, where the kernel does not enforce ``RLIMIT_NPROC``.

This script forks first: the parent only waits and reports the child's exit status or signal as
one JSON object on the status fd (``argv[2]``); through ``unshare --fork`` a signal death would be
blurred. Child exit codes: 250 = the lock-down itself failed (message on stderr, the code did not
run); 251 = the code raised ``MemoryError``; anything else is the code's own exit status.
"""

import ctypes
import json
import os
import resource
import signal
import struct
import sys
import traceback

SETUP_FAILED, OUT_OF_MEMORY = 250, 251
_libc = ctypes.CDLL(None, use_errno=True)
_PR_SET_PDEATHSIG, _PR_SET_NO_NEW_PRIVS, _PR_SET_SECCOMP = 1, 38, 22


def _check(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def set_limits(lim: dict) -> None:
    mb = 1 << 20
    # CPU: SIGXCPU at the soft limit (reported as a timeout), SIGKILL a second later
    resource.setrlimit(resource.RLIMIT_CPU, (lim["cpu_s"], lim["cpu_s"] + 1))
    for name, value in (
        ("RLIMIT_AS", lim["memory_mb"] * mb),
        ("RLIMIT_NPROC", lim["max_processes"]),
        ("RLIMIT_FSIZE", lim["max_file_mb"] * mb),
        ("RLIMIT_NOFILE", lim["max_open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))


# ------------------------------------------------------------------------------------ Landlock
_LL_CREATE, _LL_ADD_RULE, _LL_RESTRICT = 444, 445, 446  # same numbers on every architecture
_FS_EXECUTE, _FS_WRITE_FILE, _FS_READ_FILE, _FS_READ_DIR = 1, 2, 4, 8
_FS_TRUNCATE, _FS_IOCTL_DEV = 1 << 14, 1 << 15
_FILE_RIGHTS = _FS_EXECUTE | _FS_WRITE_FILE | _FS_READ_FILE | _FS_TRUNCATE | _FS_IOCTL_DEV


def _landlock_abi() -> int:
    ret = _libc.syscall(_LL_CREATE, None, ctypes.c_size_t(0), ctypes.c_uint32(1))
    return max(ret, 0)


def _fs_rights(abi: int) -> int:
    """Every filesystem right this ABI knows (bits 0-12 in v1, REFER v2, TRUNCATE v3, IOCTL_DEV v5)."""
    bits = {1: 13, 2: 14, 3: 15, 4: 15}.get(abi, 16)
    return (1 << bits) - 1


def _add_path_rule(ruleset: int, path: str, rights: int, handled: int) -> None:
    try:
        fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
    except OSError:
        return  # a dangling top-level symlink: nothing to allow
    try:
        rights &= handled if os.path.isdir(path) else handled & _FILE_RIGHTS
        attr = struct.pack("=Qi", rights, fd)  # struct landlock_path_beneath_attr is packed
        buf = ctypes.create_string_buffer(attr, len(attr))
        _check(_libc.syscall(_LL_ADD_RULE, ruleset, 1, buf, 0), f"landlock_add_rule({path})")
    finally:
        os.close(fd)


def landlock(cwd: str) -> int:
    """Apply the Landlock policy; return the ABI used (0 = kernel without Landlock)."""
    abi = _landlock_abi()
    if abi == 0:
        return 0
    handled = _fs_rights(abi)
    net = 0b11 if abi >= 4 else 0  # BIND_TCP | CONNECT_TCP, no rule allows any port
    scoped = 0b11 if abi >= 6 else 0  # ABSTRACT_UNIX_SOCKET | SIGNAL
    attr = struct.pack("=QQQ", handled, net, scoped)[: 8 if abi < 4 else 16 if abi < 6 else 24]
    buf = ctypes.create_string_buffer(attr, len(attr))
    ruleset = _check(_libc.syscall(_LL_CREATE, buf, ctypes.c_size_t(len(attr)), 0), "landlock_create_ruleset")
    read = _FS_EXECUTE | _FS_READ_FILE | _FS_READ_DIR
    for entry in sorted(os.listdir("/")):
        if entry not in ("proc", "sys"):
            _add_path_rule(ruleset, "/" + entry, read, handled)
    _add_path_rule(ruleset, f"/proc/{os.getpid()}", read, handled)
    _add_path_rule(ruleset, "/dev/null", _FILE_RIGHTS, handled)
    _add_path_rule(ruleset, cwd, handled, handled)
    _check(_libc.syscall(_LL_RESTRICT, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return abi


# ------------------------------------------------------------------------------------ seccomp
# arch audit value, clone, fork, vfork, clone3 (None = no such syscall on that architecture)
_ARCHES = {"x86_64": (0xC000003E, 56, 57, 58, 435), "aarch64": (0xC00000B7, 220, None, None, 435)}
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_CLONE_THREAD, _EPERM, _ENOSYS = 0x00010000, 1, 38


def _no_fork_program(arch: int, clone: int, fork: int | None, vfork: int | None, clone3: int) -> list[tuple]:
    """BPF: wrong arch or x32 -> EPERM; fork/vfork -> EPERM; clone3 -> ENOSYS (libc falls back to
    clone); clone -> allowed only with CLONE_THREAD; everything else allowed."""
    deny, nosys, allow = ("deny",), ("nosys",), ("allow",)
    prog: list[tuple] = [
        (_LD_W_ABS, 0, 0, 4), (_JEQ, 1, 0, arch), deny,
        (_LD_W_ABS, 0, 0, 0), (_JGE, 0, 1, 0x40000000), deny,
    ]
    for nr in (fork, vfork):
        if nr is not None:
            prog += [(_JEQ, 0, 1, nr), deny]
    prog += [(_JEQ, 0, 1, clone3), nosys, (_JEQ, 0, 4, clone), (_LD_W_ABS, 0, 0, 16),
             (_JSET, 0, 1, _CLONE_THREAD), allow, deny, allow]
    ret = {"deny": _ERRNO | _EPERM, "nosys": _ERRNO | _ENOSYS, "allow": _ALLOW}
    return [(_RET, 0, 0, ret[op[0]]) if len(op) == 1 else op for op in prog]


def seccomp_no_fork() -> bool:
    """Install the no-new-process filter; False when the architecture is not covered."""
    spec = _ARCHES.get(os.uname().machine)
    if spec is None:
        return False
    prog = _no_fork_program(*spec)
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    filt = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(filt))  # struct sock_fprog, native layout
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(_PR_SET_SECCOMP, 2, fbuf, 0, 0), "prctl(PR_SET_SECCOMP)")
    return True


# ------------------------------------------------------------------------------------ main
def lock_down(lim: dict) -> None:
    set_limits(lim)
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if lim["landlock"]:
        landlock(os.getcwd())
    if lim["max_processes"] == 1 and not seccomp_no_fork():
        raise OSError(f"no seccomp filter for architecture {os.uname().machine}; set max_processes > 1")


def run_main() -> int:
    with open("main.py", encoding="utf-8") as f:
        src = f.read()
    sys.argv = ["main.py"]
    sys.path.insert(0, os.getcwd())
    scope = {"__name__": "__main__", "__file__": "main.py", "__builtins__": __builtins__}
    try:
        exec(compile(src, "main.py", "exec"), scope)
    except MemoryError:
        sys.stderr.write("MemoryError: the sandbox's memory limit was reached\n")
        return OUT_OF_MEMORY
    except SystemExit:
        raise
    except BaseException as e:  # the user's error: print its traceback without this file's frame
        traceback.print_exception(type(e), e, e.__traceback__.tb_next if e.__traceback__ else None)
        return 1
    return 0


def main() -> None:
    """Fork; the child locks down and runs the code; this process (PID 1 of the sandbox's PID
    namespace when there is one) waits and writes the child's fate to the status fd, which the
    child closed first, so the code cannot forge it."""
    lim, status_fd = json.loads(sys.argv[1]), int(sys.argv[2])
    pid = os.fork()
    if pid == 0:
        os.close(status_fd)
        try:
            lock_down(lim)
        except Exception as e:
            sys.stderr.write(f"agentflow-sandbox-setup: {type(e).__name__}: {e}\n")
            os._exit(SETUP_FAILED)
        sys.exit(run_main())
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        report = {"signal": os.WTERMSIG(status)}
    else:
        report = {"exit": os.WEXITSTATUS(status)}
    os.write(status_fd, json.dumps(report).encode())
    os._exit(0)


if __name__ == "__main__":
    main()
