"""The sandbox against hostile code: every case is contained with a clear status, the host unharmed.

Limits are small so the whole suite stays fast. Cases that depend on an isolation layer the
machine lacks (namespaces, Landlock) are skipped with the reason, never passed silently.
"""

from __future__ import annotations

import asyncio
import os
import signal
import textwrap

import pytest

from agentflow.envs.sandbox import SandboxLimits, SandboxPool, detect_isolation, run_python
from agentflow.errors import ConfigError

FAST = {"timeout_s": 3.0, "memory_mb": 256, "max_output_bytes": 64 * 1024}


def exists(path: str) -> bool:
    """Sync helper: a stat in a test is fine, ruff's ASYNC240 wants it outside the coroutine."""
    return os.path.exists(path)


def code(src: str) -> str:
    return textwrap.dedent(src).strip() + "\n"


async def test_ok_returns_stdout_and_exit_code_zero():
    r = await run_python("print(6 * 7)", **FAST)
    assert (r.status, r.exit_code, r.stdout) == ("ok", 0, "42\n")
    assert r.wall_s > 0


async def test_stdin_is_fed_to_the_code():
    r = await run_python("import sys; print(sys.stdin.read()[::-1])", stdin="abc", **FAST)
    assert r.stdout == "cba\n"


async def test_exception_is_error_with_traceback_from_main_py():
    r = await run_python("def f():\n    raise ValueError('boom')\nf()", **FAST)
    assert r.status == "error" and r.exit_code == 1
    assert 'File "main.py", line 2' in r.stderr and "ValueError: boom" in r.stderr
    assert "_sandbox_child" not in r.stderr


async def test_sys_exit_code_is_reported():
    r = await run_python("import sys; sys.exit(7)", **FAST)
    assert (r.status, r.exit_code) == ("error", 7)


async def test_infinite_loop_is_killed_at_the_wall_deadline():
    r = await run_python("while True:\n    pass", **{**FAST, "timeout_s": 1.0})
    assert r.status == "timeout"
    assert r.wall_s < 3.0


async def test_cpu_limit_reports_timeout():
    r = await run_python("while True:\n    pass", **{**FAST, "timeout_s": 5.0, "cpu_s": 1})
    assert r.status == "timeout" and r.exit_code == -signal.SIGXCPU


async def test_sleeping_code_is_killed_at_the_deadline():
    r = await run_python("import time\nprint('start', flush=True)\ntime.sleep(60)", **{**FAST, "timeout_s": 0.5})
    assert r.status == "timeout" and r.stdout == "start\n"


async def test_fork_bomb_is_contained():
    r = await run_python(code("""
        import os
        while True:
            os.fork()
    """), **FAST)
    assert r.status == "error" and "Operation not permitted" in r.stderr


def processes_with_home(home: str) -> list[int]:
    """Host pids whose environment has HOME=<home> (the sandbox's unique temp dir)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                if f"HOME={home}".encode() in f.read().split(b"\0"):
                    found.append(int(pid))
        except OSError:
            continue
    return found


async def test_children_that_escape_with_setsid_die_with_the_sandbox():
    iso = await detect_isolation()
    if "--pid" not in iso.unshare:
        pytest.skip("no PID namespace: a setsid'd child can outlive the run (documented)")
    r = await run_python(code("""
        import os, time
        print(os.getcwd(), flush=True)
        for _ in range(3):
            if os.fork() == 0:
                os.setsid()
                time.sleep(60)
                os._exit(0)
    """), **{**FAST, "max_processes": 8})
    assert r.status == "ok", r.stderr
    assert await asyncio.to_thread(processes_with_home, r.stdout.strip()) == []


async def test_subprocess_is_refused_by_default():
    r = await run_python("import subprocess\nsubprocess.run(['true'])", **FAST)
    assert r.status == "error" and "PermissionError" in r.stderr


async def test_threads_still_work():
    r = await run_python(code("""
        import threading
        out = []
        ts = [threading.Thread(target=out.append, args=(i,)) for i in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print(sorted(out))
    """), **FAST)
    assert r.status == "ok" and r.stdout == "[0, 1, 2, 3]\n"


async def test_memory_bomb_reports_memory():
    r = await run_python("x = bytearray(4 * 1024 ** 3)", **FAST)
    assert r.status == "memory" and "MemoryError" in r.stderr


async def test_growing_memory_bomb_reports_memory():
    r = await run_python("xs = []\nwhile True:\n    xs.append(' ' * 10_000_000)", **FAST)
    assert r.status == "memory"


async def test_one_gigabyte_of_output_is_capped_and_killed():
    r = await run_python(code("""
        import sys
        chunk = 'x' * (1 << 20)
        for _ in range(1024):
            sys.stdout.write(chunk)
    """), **FAST)
    assert r.status == "output_limit" and r.stdout_truncated
    assert len(r.stdout) == FAST["max_output_bytes"]
    assert r.wall_s < 3.0


async def test_stderr_flood_is_capped_too():
    r = await run_python("import sys\nwhile True:\n    sys.stderr.write('e' * 4096)", **FAST)
    assert r.status == "output_limit" and r.stderr_truncated and not r.stdout_truncated


async def test_writing_outside_its_dir_is_refused(tmp_path):
    iso = await detect_isolation()
    if not iso.writes_isolated:
        pytest.skip("no Landlock on this kernel: writes are not confined (documented)")
    target = tmp_path / "pwned.txt"
    r = await run_python(code(f"""
        import os
        open("inside.txt", "w").write("fine")
        print(os.path.exists("inside.txt"))
        for path in [{str(target)!r}, "/tmp/agentflow-sandbox-escape.txt", "../agentflow-sandbox-escape2.txt"]:
            try:
                open(path, "w").write("pwned")
                print("WROTE", path)
            except OSError as e:
                print("refused", type(e).__name__)
    """), **FAST)
    assert r.status == "ok", r.stderr
    assert "WROTE" not in r.stdout and r.stdout.startswith("True")
    for path in (str(target), "/tmp/agentflow-sandbox-escape.txt", "/tmp/agentflow-sandbox-escape2.txt"):
        assert not exists(path)


async def test_big_file_is_refused_by_file_size_limit():
    r = await run_python("open('big', 'wb').write(b'x' * (32 << 20))", **{**FAST, "max_file_mb": 1})
    assert r.status == "error" and "File too large" in r.stderr


async def test_temp_dir_is_removed_afterwards():
    r = await run_python("import os; print(os.getcwd())", **FAST)
    assert r.status == "ok"
    assert r.stdout.startswith("/") and not exists(r.stdout.strip())


async def test_parent_environment_secrets_are_not_visible(monkeypatch):
    secret = "sk-agentflow-test-SECRET-1234"
    monkeypatch.setenv("AGENTFLOW_FAKE_API_KEY", secret)
    r = await run_python(code(f"""
        import os, glob
        print(dict(os.environ))
        for path in ["/proc/%d/environ" % os.getppid(), "/proc/1/environ", *glob.glob("/proc/*/environ")]:
            try:
                print(open(path, "rb").read())
            except OSError as e:
                print("refused", path, type(e).__name__)
        try:
            print(open("/proc/{os.getpid()}/environ", "rb").read())
        except OSError as e:
            print("refused host pid", type(e).__name__)
    """), **FAST)
    assert r.status == "ok", r.stderr
    assert secret not in r.stdout and "AGENTFLOW_FAKE_API_KEY" not in r.stdout
    assert "OPENAI" not in r.stdout


async def test_network_connection_is_refused():
    iso = await detect_isolation()
    if not iso.network_isolated:
        pytest.skip("no network namespace or Landlock net rules here (documented)")
    r = await run_python(code("""
        import socket
        for host in [("127.0.0.1", 22), ("1.1.1.1", 53), ("8.8.8.8", 443)]:
            try:
                socket.create_connection(host, timeout=1).close()
                print("CONNECTED", host)
            except OSError as e:
                print("refused", type(e).__name__)
        try:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.sendto(b"x", ("8.8.8.8", 53))
            print("UDP SENT")
        except OSError as e:
            print("udp refused", type(e).__name__)
    """), **FAST)
    assert r.status == "ok", r.stderr
    assert "CONNECTED" not in r.stdout
    if "--net" in iso.unshare:
        assert "UDP SENT" not in r.stdout


async def test_signalling_the_parent_does_not_reach_the_host():
    iso = await detect_isolation()
    if not iso.signals_isolated:
        pytest.skip("no PID namespace or Landlock signal scoping here (documented)")
    host_pid = os.getpid()
    r = await run_python(code(f"""
        import os, signal
        for pid in [os.getppid(), {host_pid}, 1]:
            try:
                os.kill(pid, signal.SIGTERM)
                print("sent", pid)
            except OSError as e:
                print("refused", pid, type(e).__name__)
        print("still here")
    """), **FAST)
    assert r.status in ("ok", "killed")
    assert os.getpid() == host_pid  # we are alive to assert: the host process was not signalled
    await asyncio.sleep(0)


async def test_killing_its_own_process_group_is_contained():
    r = await run_python("import os, signal\nos.killpg(0, signal.SIGKILL)", **FAST)
    assert r.status in ("killed", "error")


async def test_pool_bounds_concurrency_and_runs_all():
    pool = SandboxPool(max_concurrent=2, limits=SandboxLimits(**FAST))
    results = await asyncio.gather(*(pool.run(f"print({i})") for i in range(6)))
    assert [r.stdout for r in results] == [f"{i}\n" for i in range(6)]


async def test_caller_deadline_kills_the_process():
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.5):
            await run_python("import time\ntime.sleep(30)", timeout_s=30)


def test_limits_are_validated():
    with pytest.raises(ConfigError, match="timeout_s"):
        SandboxLimits(timeout_s=0)
    with pytest.raises(ConfigError, match="memory_mb"):
        SandboxLimits(memory_mb=8)


# ------------------------------------------------------------------------------------ host sockets, users, disk
def _listen_unix(path: str):
    import socket

    srv = socket.socket(socket.AF_UNIX)
    srv.bind(path)
    os.chmod(path, 0o777)
    srv.listen(1)
    srv.settimeout(4)
    return srv


async def test_host_unix_sockets_are_unreachable(tmp_path):
    """A socket file a host process listens on (a Docker socket, an ssh-agent, X11, a database)."""
    path = str(tmp_path / "host.sock")
    srv = _listen_unix(path)
    got: list = []

    def accept():
        try:
            conn, _ = srv.accept()
            got.append(conn.recv(64))
        except OSError as e:  # the timeout: nobody connected
            got.append(type(e).__name__)

    acceptor = asyncio.create_task(asyncio.to_thread(accept))
    src = f"import socket\ns = socket.socket(socket.AF_UNIX)\ns.connect({path!r})\ns.sendall(b'from the sandbox')\n"
    r = await run_python(src, **FAST)
    await acceptor
    srv.close()
    iso = await detect_isolation()
    if not iso.seccomp:
        pytest.skip("no seccomp filter on this architecture: host UNIX sockets stay reachable (documented)")
    assert r.status == "error" and "Operation not permitted" in r.stderr
    assert got == ["TimeoutError"]


async def test_socketpair_still_works():
    r = await run_python("import socket\na, b = socket.socketpair()\na.send(b'x')\nprint(b.recv(1))", **FAST)
    assert r.ok and r.stdout == "b'x'\n", r.stderr


async def test_no_user_namespaces():
    src = code("""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.unshare(0x10000000), ctypes.get_errno())   # CLONE_NEWUSER
    """)
    r = await run_python(src, **FAST)
    if not (await detect_isolation()).seccomp:
        pytest.skip("no seccomp filter on this architecture (documented)")
    assert r.stdout == "-1 1\n", r.stdout + r.stderr


async def test_shadow_is_unreadable_even_as_root():
    if not (await detect_isolation()).writes_isolated:
        pytest.skip("no Landlock: /etc/shadow is as readable as the parent's user can read it (documented)")
    r = await run_python("print(open('/etc/shadow').read()[:1])", **FAST)
    assert r.status == "error" and "PermissionError" in r.stderr
    r = await run_python("print(bool(open('/etc/passwd').read()))", **FAST)
    assert r.stdout == "True\n"  # the rest of /etc stays readable


async def test_file_count_and_total_bytes_are_capped():
    if not (await detect_isolation()).unshare:
        pytest.skip("no namespaces: no private tmpfs, only the per-file size cap holds (documented)")
    files = code("""
        n = 0
        try:
            while True:
                open(f"f{n}", "w").close()
                n += 1
        except OSError as e:
            print(n, e.errno)
    """)
    r = await run_python(files, max_files=200, **FAST)
    assert r.ok and r.stdout == "200 28\n", r.stdout + r.stderr  # ENOSPC at the cap
    total = code("""
        n = 0
        try:
            for i in range(64):
                with open(f"b{i}", "wb") as f:
                    f.write(b"x" * (1 << 20))
                n += 1
        except OSError as e:
            print(n, e.errno)
    """)
    r = await run_python(total, max_disk_mb=8, **FAST)
    assert r.ok and r.stdout.split()[1] == "28" and int(r.stdout.split()[0]) <= 8, r.stdout + r.stderr


# ------------------------------------------------------------------------------------ host state it must not own
async def test_no_capability_is_held_so_sethostname_is_refused():
    src = code("""
        import socket
        status = dict(line.split(":\\t", 1) for line in open("/proc/self/status").read().splitlines() if ":\\t" in line)
        print(*(status[k].strip() for k in ("CapEff", "CapPrm", "CapBnd", "CapAmb", "CapInh", "NoNewPrivs")))
        try:
            socket.sethostname(socket.gethostname())  # the same name: harmless if it were allowed
            print("sethostname allowed")
        except PermissionError:
            print("sethostname refused")
    """)
    r = await run_python(src, **FAST)
    zero = "0000000000000000"
    assert r.stdout == f"{zero} {zero} {zero} {zero} {zero} 1\nsethostname refused\n", r.stdout + r.stderr


async def test_the_kernel_keyring_is_unreachable():
    if not (await detect_isolation()).seccomp:
        pytest.skip("no seccomp filter on this architecture (documented)")
    nr = {"x86_64": (248, 250), "aarch64": (217, 219)}[os.uname().machine]
    src = code(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        # keyctl(KEYCTL_GET_KEYRING_ID, KEY_SPEC_USER_KEYRING, 0): the uid's keyring, shared with the host
        print(libc.syscall({nr[1]}, 0, -4, 0), ctypes.get_errno())
        # add_key("user", "agentflow-sandbox", "x", 1, KEY_SPEC_USER_KEYRING)
        print(libc.syscall({nr[0]}, b"user", b"agentflow-sandbox", b"x", 1, -4), ctypes.get_errno())
    """)
    r = await run_python(src, **FAST)
    assert r.stdout == "-1 1\n-1 1\n", r.stdout + r.stderr  # EPERM


def _host_shm_keys() -> set[int]:
    with open("/proc/sysvipc/shm") as f:
        return {int(line.split()[0]) for line in f.read().splitlines()[1:] if line.strip()}


def _remove_host_shm(key: int) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    shmid = libc.shmget(key, 0, 0)
    if shmid >= 0:
        libc.shmctl(shmid, 0, None)  # IPC_RMID


async def test_system_v_shared_memory_does_not_outlive_the_run():
    if not (await detect_isolation()).unshare:
        pytest.skip("no namespaces: no IPC namespace (documented)")
    key = 0x5AF00000 + os.getpid() % 0xFFFF
    src = code(f"""
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        shmid = libc.shmget({key}, 4 << 20, 0o1000 | 0o600)   # IPC_CREAT
        print(shmid >= 0)
    """)
    try:
        r = await run_python(src, **FAST)
        assert r.stdout == "True\n", r.stdout + r.stderr
        assert key not in _host_shm_keys()
    finally:
        _remove_host_shm(key)


async def test_dev_holds_only_what_python_needs():
    iso = await detect_isolation()
    if not (iso.unshare or iso.writes_isolated):
        pytest.skip("neither namespaces nor Landlock: /dev is the host's (documented)")
    src = code("""
        import os
        for path in ("/dev/kmsg", "/dev/mem", "/dev/vda", "/dev/tty"):
            try:
                open(path, "rb").close()
                print(path, "opened")
            except OSError:
                pass
        print(len(os.urandom(8)), open("/dev/zero", "rb").read(2), open("/dev/null", "w").write("x"))
    """)
    r = await run_python(src, **FAST)
    assert r.stdout == "8 b'\\x00\\x00' 1\n", r.stdout + r.stderr
    if iso.unshare:
        r = await run_python("import os; print(sorted(os.listdir('/dev')))", **FAST)
        assert r.stdout == "['fd', 'full', 'null', 'random', 'stderr', 'stdin', 'stdout', 'urandom', 'zero']\n"


async def test_it_runs_in_its_own_uts_ipc_and_user_namespaces():
    iso = await detect_isolation()
    if not iso.unshare:
        pytest.skip("no namespaces on this machine (documented)")
    kinds = ("uts", "ipc", "pid", "mnt") + (("user",) if "--user" in iso.unshare else ())
    r = await run_python(f"import os; print(*(os.readlink('/proc/self/ns/' + k) for k in {kinds!r}))", **FAST)
    host = [os.readlink(f"/proc/self/ns/{k}") for k in kinds]
    inside = r.stdout.split()
    assert len(inside) == len(kinds), r.stdout + r.stderr
    assert [k for k, a, b in zip(kinds, host, inside, strict=True) if a == b] == []
