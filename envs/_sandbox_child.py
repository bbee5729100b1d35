"""The sandbox's in-child half: lock the process down, then run ``main.py`` from the cwd.

Run as ``python -I _sandbox_child.py '<json limits>'`` by :mod:`agentflow.envs.sandbox` (never
imported by it: this file must work with the standard library alone, before any user code).
Steps, each before the first line of user code runs:

1. resource limits (soft = hard, so the code cannot raise them back; CPU hard = soft + 1 s): CPU seconds, address space,
   processes, file size, open files, core size 0; then, inside the sandbox's own mount namespace,
   a tmpfs of ``max_disk_mb`` / ``max_files`` over the cwd (``main.py`` copied in), and a private
   ``/dev`` holding only ``null``, ``zero``, ``full``, ``random`` and ``urandom``;
2. ``PR_SET_NO_NEW_PRIVS`` and ``PR_SET_PDEATHSIG(SIGKILL)`` (dies with its parent);
3. Landlock (Linux >= 5.13, when the kernel has it): writes only beneath the cwd (and ``/dev/null``),
   reads everywhere except ``/proc`` and ``/sys`` (other processes' environments), ``/dev`` (but
   the five nodes above) and credential files (``_SECRETS``), no TCP connect/bind (ABI >= 4), no
   signals to or abstract sockets of processes outside the sandbox (ABI >= 6);
4. every capability dropped (bounding, ambient, effective, permitted, inheritable sets; secure bits
   locked), so uid 0 is an ordinary user: no ``sethostname``, mounts, raw devices or
   ``CAP_DAC_OVERRIDE``;
5. a seccomp filter: no ``socket(AF_UNIX)``, ``unshare``, ``setns``, ``io_uring_setup``,
   kernel keyring calls (``add_key``, ``request_key``, ``keyctl``) or ``clone(CLONE_NEWUSER)``; when
   ``max_processes == 1`` also no new processes (fork, vfork, clone
   without ``CLONE_THREAD``): threads still work, and this bounds fork bombs even for uid 0, where
   the kernel does not enforce ``RLIMIT_NPROC``.

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


_SECRETS = ("/etc/shadow", "/etc/shadow-", "/etc/gshadow", "/etc/gshadow-", "/etc/sudoers", "/etc/sudoers.d",
            "/etc/ssh", "/root/.ssh", "/root/.gnupg")


def _secrets() -> set[str]:
    """Paths never readable in the sandbox (what root could otherwise read), plus /proc and /sys."""
    homes = [f"/home/{h}/{d}" for h in _listdir("/home") for d in (".ssh", ".gnupg")]
    return {"/proc", "/sys", "/dev", *_SECRETS, *homes}


def _listdir(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except OSError:
        return []


def _allow_reads_except(ruleset: int, root: str, read: int, handled: int, denied: set[str]) -> None:
    """Allow ``read`` beneath ``root`` except the ``denied`` paths: a directory holding one gets
    only a listing right, and a rule per other entry (recursively where another is deeper)."""
    for entry in _listdir(root):
        path = os.path.join(root, entry)
        if path in denied:
            continue
        if any(d.startswith(path + "/") for d in denied) and os.path.isdir(path) and not os.path.islink(path):
            _add_path_rule(ruleset, path, _FS_READ_DIR, handled)
            _allow_reads_except(ruleset, path, read, handled, denied)
        else:
            _add_path_rule(ruleset, path, read, handled)


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
    _allow_reads_except(ruleset, "/", read, handled, _secrets())
    _add_path_rule(ruleset, f"/proc/{os.getpid()}", read, handled)
    _add_path_rule(ruleset, "/dev/null", _FILE_RIGHTS, handled)
    _add_path_rule(ruleset, "/dev", _FS_READ_DIR, handled)  # listing only; files beneath need their own rule
    for name in DEV_NODES[1:]:
        _add_path_rule(ruleset, f"/dev/{name}", read, handled)
    _add_path_rule(ruleset, cwd, handled, handled)
    _check(_libc.syscall(_LL_RESTRICT, ruleset, 0), "landlock_restrict_self")
    os.close(ruleset)
    return abi


# ------------------------------------------------------------------------------------ seccomp
# arch audit value, then syscall numbers: clone, fork, vfork, clone3, socket, unshare, setns, io_uring_setup,
# and the kernel keyring's add_key, request_key, keyctl (None = no such syscall on that architecture)
_ARCHES = {
    "x86_64": (0xC000003E, {"clone": 56, "fork": 57, "vfork": 58, "clone3": 435, "socket": 41, "unshare": 272,
                            "setns": 308, "io_uring_setup": 425, "add_key": 248, "request_key": 249,
                            "keyctl": 250}),
    "aarch64": (0xC00000B7, {"clone": 220, "fork": None, "vfork": None, "clone3": 435, "socket": 198,
                             "unshare": 97, "setns": 268, "io_uring_setup": 425, "add_key": 217,
                             "request_key": 218, "keyctl": 219}),
}
_ALWAYS_DENIED = ("unshare", "setns", "io_uring_setup", "add_key", "request_key", "keyctl")
_LD_W_ABS, _JEQ, _JGE, _JSET, _RET = 0x20, 0x15, 0x35, 0x45, 0x06
_ALLOW, _ERRNO = 0x7FFF0000, 0x00050000
_CLONE_THREAD, _CLONE_NEWUSER, _AF_UNIX, _EPERM, _ENOSYS = 0x00010000, 0x10000000, 1, 1, 38
_RETURNS = {"deny": _ERRNO | _EPERM, "nosys": _ERRNO | _ENOSYS, "allow": _ALLOW}


def _assemble(prog: list) -> list[tuple]:
    """Resolve ``("jeq", k, "label_true", "label_false")`` jumps (None = next) and ``("ret", what)``."""
    out, labels, i = [], {}, 0
    for op in prog:
        if op[0] == "label":
            labels[op[1]] = i
        else:
            i += 1
    for op in prog:
        if op[0] == "label":
            continue
        pc = len(out)
        if op[0] == "ld":
            out.append((_LD_W_ABS, 0, 0, op[1]))
        elif op[0] == "ret":
            out.append((_RET, 0, 0, _RETURNS[op[1]]))
        else:
            code = {"jeq": _JEQ, "jge": _JGE, "jset": _JSET}[op[0]]
            jt = 0 if op[2] is None else labels[op[2]] - pc - 1
            jf = 0 if op[3] is None else labels[op[3]] - pc - 1
            out.append((code, jt, jf, op[1]))
    return out


def _filter_program(arch: int, nr: dict, no_fork: bool) -> list[tuple]:
    """BPF: wrong arch or x32 -> EPERM; unshare, setns, io_uring -> EPERM (no new namespaces, no
    io_uring side door); add_key, request_key, keyctl -> EPERM (the kernel keyring is not
    namespaced: uid 0's keys would be readable); socket(AF_UNIX) -> EPERM (no host UNIX sockets;
    socketpair still works); clone3 -> ENOSYS (libc falls back to clone, whose flags can be read).
    With ``no_fork``: fork, vfork -> EPERM, clone only with CLONE_THREAD; else clone with CLONE_NEWUSER -> EPERM."""
    prog: list = [("ld", 4), ("jeq", arch, None, "deny"), ("ld", 0), ("jge", 0x40000000, "deny", None)]
    for name in _ALWAYS_DENIED + (("fork", "vfork") if no_fork else ()):
        if nr[name] is not None:
            prog.append(("jeq", nr[name], "deny", None))
    prog += [("jeq", nr["clone3"], "nosys", None), ("jeq", nr["socket"], "socket", None),
             ("jeq", nr["clone"], "clone", "allow"),
             ("label", "socket"), ("ld", 16), ("jeq", _AF_UNIX, "deny", "allow"),
             ("label", "clone"), ("ld", 16)]
    prog += [("jset", _CLONE_THREAD, "allow", "deny")] if no_fork else [("jset", _CLONE_NEWUSER, "deny", "allow")]
    prog += [("label", "allow"), ("ret", "allow"), ("label", "deny"), ("ret", "deny"),
             ("label", "nosys"), ("ret", "nosys")]
    return _assemble(prog)


def install_seccomp(no_fork: bool) -> bool:
    """Install the filter; False when the architecture is not covered."""
    spec = _ARCHES.get(os.uname().machine)
    if spec is None:
        return False
    prog = _filter_program(spec[0], spec[1], no_fork)
    raw = b"".join(struct.pack("=HBBI", *ins) for ins in prog)
    filt = ctypes.create_string_buffer(raw, len(raw))
    fprog = struct.pack("@HP", len(prog), ctypes.addressof(filt))  # struct sock_fprog, native layout
    fbuf = ctypes.create_string_buffer(fprog, len(fprog))
    _check(_libc.prctl(_PR_SET_SECCOMP, 2, fbuf, 0, 0), "prctl(PR_SET_SECCOMP)")
    return True


# ------------------------------------------------------------------------------------ a private disk
_MS_NOSUID, _MS_NODEV = 2, 4


def private_disk(cwd: str, max_disk_mb: int, max_files: int, uid: int) -> None:
    """Replace the cwd by a tmpfs of ``max_disk_mb`` and ``max_files`` inodes holding main.py (only
    inside the sandbox's own mount namespace: the host never sees it)."""
    with open("main.py", "rb") as f:
        src = f.read()
    opts = f"size={max_disk_mb}m,nr_inodes={max_files + 2},mode=0700,uid={uid},gid={uid}".encode()
    _check(_libc.mount(b"tmpfs", cwd.encode(), b"tmpfs", _MS_NOSUID | _MS_NODEV, opts), "mount(tmpfs)")
    os.chdir(cwd)  # enter the new mount
    with open("main.py", "wb") as f:
        f.write(src)


# ------------------------------------------------------------------------------------ a private /dev
DEV_NODES = ("null", "zero", "full", "random", "urandom")  # what Python and its standard library open
_DEV_LINKS = (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"), ("stdout", "/proc/self/fd/1"),
              ("stderr", "/proc/self/fd/2"))
_MS_NOEXEC, _MS_BIND = 8, 4096


def private_dev() -> None:
    """Replace ``/dev`` (in the sandbox's own mount namespace) by a tiny tmpfs holding only
    :data:`DEV_NODES`, bind-mounted from the host's, and the ``fd``/``std*`` links: no ``kmsg``,
    disks, ttys, ``kvm``, ``fuse``, ``/dev/shm``..."""
    fds = {n: os.open(f"/dev/{n}", os.O_PATH | os.O_CLOEXEC) for n in DEV_NODES if os.path.exists(f"/dev/{n}")}
    try:
        _check(_libc.mount(b"tmpfs", b"/dev", b"tmpfs", _MS_NOSUID | _MS_NOEXEC, b"size=64k,nr_inodes=64,mode=0755"),
               "mount(tmpfs on /dev)")
        for name, fd in fds.items():
            os.close(os.open(f"/dev/{name}", os.O_CREAT | os.O_WRONLY | os.O_CLOEXEC, 0o666))
            _check(_libc.mount(f"/proc/self/fd/{fd}".encode(), f"/dev/{name}".encode(), None, _MS_BIND, None),
                   f"bind-mount /dev/{name}")
        for name, target in _DEV_LINKS:
            os.symlink(target, f"/dev/{name}")
    finally:
        for fd in fds.values():
            os.close(fd)


# ------------------------------------------------------------------------------------ capabilities
_PR_CAPBSET_DROP, _PR_SET_SECUREBITS, _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL = 24, 28, 47, 4
_SECURE_ALL_LOCKED = 0x2F  # NOROOT, NO_SETUID_FIXUP, KEEP_CAPS_LOCKED and their locks: uid 0 gains nothing
_CAP_VERSION_3, _CAP_LAST = 0x20080522, 63


def _capabilities() -> tuple[int, int]:
    """(effective, permitted) of this process, as 64-bit masks."""
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    data = ctypes.create_string_buffer(24)
    _check(_libc.capget(ctypes.create_string_buffer(header, len(header)), data), "capget")
    e0, p0, _, e1, p1, _ = struct.unpack("=6I", data.raw)
    return e0 | e1 << 32, p0 | p1 << 32


def drop_capabilities() -> None:
    """Empty the bounding, ambient, effective, permitted and inheritable sets and lock the secure
    bits, so uid 0 holds no capability now or after any ``execve`` (no ``sethostname``, mounts,
    module loading, raw I/O, ``CAP_DAC_OVERRIDE``...). A process with no capabilities (not root,
    no user namespace) has nothing to drop."""
    if _capabilities() == (0, 0):
        return
    for cap in range(_CAP_LAST + 1):
        if _libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0) < 0 and ctypes.get_errno() != 22:  # EINVAL: no such cap
            _check(-1, f"prctl(PR_CAPBSET_DROP, {cap})")
    _check(_libc.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0), "prctl(PR_CAP_AMBIENT_CLEAR_ALL)")
    _check(_libc.prctl(_PR_SET_SECUREBITS, _SECURE_ALL_LOCKED, 0, 0, 0), "prctl(PR_SET_SECUREBITS)")
    header = struct.pack("=Ii", _CAP_VERSION_3, 0)
    empty = bytes(24)
    _check(_libc.capset(ctypes.create_string_buffer(header, len(header)), ctypes.create_string_buffer(empty, 24)),
           "capset")
    if _capabilities() != (0, 0):
        raise OSError("capabilities are still held after capset; refusing to run the code")


# ------------------------------------------------------------------------------------ main
def lock_down(lim: dict) -> None:
    cwd = os.getcwd()
    set_limits(lim)
    if lim["private_disk"]:
        private_disk(cwd, lim["max_disk_mb"], lim["max_files"], os.geteuid())
        private_dev()
    _check(_libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    _check(_libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    if lim["landlock"]:
        landlock(os.getcwd())
    drop_capabilities()
    if not install_seccomp(no_fork=lim["max_processes"] == 1) and lim["max_processes"] == 1:
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
