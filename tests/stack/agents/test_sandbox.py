"""The code interpreter's sandbox, attacked: host files, the network, processes, memory, CPU, time and output.

Each attack runs real code under bubblewrap and must end contained, with a result that says why.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from pathlib import Path

import pytest

import corral
from corral.stack.agents.tools.sandbox import SandboxConfig, available, run_python, seccomp_program



@pytest.fixture(autouse=True)
def _bubblewrap():
    # Not a skip: these tests are the sandbox's proof, and .ci/run installs bubblewrap.
    assert available() is None, available()

CFG = SandboxConfig(timeout_s=8, cpu_s=2, memory_mb=128, max_output_bytes=4096, tmp_mb=4)


def run(code: str, cfg: SandboxConfig = CFG):
    return asyncio.run(run_python(code, cfg))


def test_output_errors_and_exit_status_come_back():
    r = run("import sys\nprint('out')\nprint('err', file=sys.stderr)\nraise SystemExit(3)")
    assert (r.stdout, r.stderr, r.exit_code, r.reason) == ("out\n", "err\n", 3, None)
    assert r.for_model() == "out\nerr\n[exit status 3]"
    r = run("1/0")
    assert r.exit_code == 1 and "ZeroDivisionError" in r.stderr


def test_host_files_are_not_there():
    repo_file = Path(corral.__file__).resolve()
    r = run(f"""
import os
print(sorted(os.listdir('/')))
for path in ['/etc/passwd', '/etc/shadow', '/root/.bashrc', '/home', {str(repo_file)!r}, {str(Path.cwd())!r}]:
    try:
        open(path).read(); print('READ', path)
    except OSError as e:
        print(type(e).__name__, path)
""")
    lines = r.stdout.splitlines()
    top = eval(lines[0])  # noqa: S307 - our own printout of a list of names
    assert set(top) <= {"usr", "lib", "lib64", "bin", "root", "tmp", "proc", "dev"}, top
    assert "etc" not in top and "home" not in top and "work" not in top
    assert not any(line.startswith("READ") for line in lines), r.stdout
    assert sum(line.startswith(("FileNotFoundError", "IsADirectoryError")) for line in lines[1:]) == 6


def test_the_filesystem_is_read_only_but_tmp_and_tmp_is_capped():
    r = run("""
try:
    open('/usr/evil', 'w')
except OSError as e:
    print('usr', type(e).__name__)
open('/tmp/ok', 'w').write('fine'); print('tmp', open('/tmp/ok').read())
try:
    with open('/tmp/big', 'wb') as f:
        for _ in range(64):
            f.write(b'x' * 2**20)
except OSError as e:
    print('big', type(e).__name__)
""")
    assert r.stdout.splitlines() == ["usr OSError", "tmp fine", "big OSError"], r.for_model()


def test_no_network_not_even_the_hosts_loopback():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        r = run(f"""
import socket
for host in [('127.0.0.1', {port}), ('1.1.1.1', 80)]:
    try:
        socket.create_connection(host, timeout=2); print('CONNECTED', host)
    except OSError as e:
        print('refused', type(e).__name__)
try:
    socket.getaddrinfo('example.com', 80); print('RESOLVED')
except OSError as e:
    print('no dns')
""")
    assert "CONNECTED" not in r.stdout and "RESOLVED" not in r.stdout
    assert r.stdout.count("refused") == 2 and "no dns" in r.stdout


def test_a_fork_bomb_fails_at_its_first_fork():
    start = time.monotonic()
    r = run("import os\nwhile True:\n    os.fork()")
    assert "PermissionError" in r.stderr and r.exit_code == 1
    assert time.monotonic() - start < 5
    r = run("import subprocess\nsubprocess.run(['/bin/sh', '-c', 'echo hi'])")
    assert "PermissionError" in r.stderr and "hi" not in r.stdout
    r = run("import threading\nt = threading.Thread(target=print, args=('threads work',))\nt.start(); t.join()")
    assert r.stdout == "threads work\n"  # threads are not processes: allowed


def test_unbounded_allocation_hits_the_memory_limit():
    r = run("x = []\nwhile True:\n    x.append(bytearray(10**7))")
    assert "MemoryError" in r.stderr and r.exit_code == 1


def test_an_infinite_loop_hits_the_cpu_limit_and_sleeping_the_wall_clock():
    start = time.monotonic()
    r = run("while True:\n    pass")
    assert r.reason == "cpu_limit" and "CPU time limit" in r.for_model()
    assert time.monotonic() - start < CFG.timeout_s + 2
    r = run("import time\ntime.sleep(60)", CFG.model_copy(update={"timeout_s": 1.5}))
    assert r.reason == "timeout" and r.exit_code is None and "wall-clock" in r.for_model()


def test_output_is_capped():
    r = run("while True:\n    print('x' * 1000)")
    assert r.reason == "output_limit" and len(r.stdout) <= CFG.max_output_bytes


def test_the_hosts_environment_stays_outside(monkeypatch):
    monkeypatch.setenv("CORRAL_TEST_SECRET", "hunter2")
    r = run("import os\nprint(sorted(os.environ))")
    assert "CORRAL_TEST_SECRET" not in r.stdout and "hunter2" not in r.stdout


def test_seccomp_program_shape():
    prog = seccomp_program("x86_64")
    assert len(prog) % 8 == 0 and len(prog) // 8 < 32  # classic BPF instructions, 8 bytes each
    with pytest.raises(Exception):
        seccomp_program("sparc")
    assert os.uname().machine in ("x86_64", "aarch64")
