"""The code interpreter's sandbox: Python under bubblewrap, with no network, no host files and hard limits.

One run is one `bwrap` process (Debian package `bubblewrap`):
  - namespaces: `--unshare-all` (user, pid, net, ipc, uts, cgroup): no network interface but a
    loopback that is down, its own pid 1, `--die-with-parent`, `--new-session`, every capability dropped;
  - files: only the interpreter's own install and the directories of the shared libraries it links
    against, read-only; `/proc`, a minimal `/dev`, and a size-capped tmpfs as the working directory.
    `/etc`, the home directories and the server's repository do not exist inside;
  - processes: a seccomp filter refuses fork/vfork and non-thread clone (EPERM) and clone3 (ENOSYS,
    so glibc falls back to clone for threads): a fork bomb gets an error at its first fork. (An rlimit
    on processes would not do: it does not bind a server that runs as root.)
  - limits, set by the bootstrap before the code runs (hard limits, so the code cannot raise them):
    address space (memory), CPU seconds, file size, open files, no core dumps; plus a wall-clock timeout
    and an output cap enforced from outside (the process is killed when either is reached).
The code arrives on stdin; stdout and stderr come back with the exit status and what stopped it.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import struct
import subprocess
import sys
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

BWRAP = "/usr/bin/bwrap"


class SandboxConfig(BaseModel):
    """Run-config `code_interpreter:` limits of one run."""

    model_config = ConfigDict(extra="forbid")
    timeout_s: float = Field(10.0, gt=0, le=600)  # wall clock
    cpu_s: int = Field(5, ge=1, le=600)
    memory_mb: int = Field(256, ge=32, le=65536)  # address space
    max_output_bytes: int = Field(16384, ge=256, le=10 * 2**20)  # stdout and stderr, each
    tmp_mb: int = Field(16, ge=1, le=4096)  # the writable work directory
    python: str | None = None  # the interpreter to run (default: the server's own base interpreter)


@dataclass
class RunResult:
    stdout: str
    stderr: str
    exit_code: int | None  # None: killed from outside (timeout, output cap)
    reason: str | None = None  # "timeout" | "output_limit" | "cpu_limit" | "signal N" | None

    def for_model(self) -> str:
        """What the model reads back: the output, then what ended the run if not a clean exit."""
        out = self.stdout
        if self.stderr:
            out += ("\n" if out and not out.endswith("\n") else "") + self.stderr
        sep = "\n" if out and not out.endswith("\n") else ""
        notes = {"timeout": "[stopped: the wall-clock time limit was reached]",
                 "output_limit": "[stopped: the output limit was reached]",
                 "cpu_limit": "[stopped: the CPU time limit was reached]"}
        if self.reason:
            out += sep + notes.get(self.reason, f"[stopped: {self.reason}]")
        elif self.exit_code:
            out += sep + f"[exit status {self.exit_code}]"
        return out or "[no output]"


class SandboxUnavailable(RuntimeError):
    pass


# --- the seccomp filter (classic BPF, as bwrap --seccomp takes it) -----------------------------------

_ARCH = {  # machine: (AUDIT_ARCH, clone, clone3, [fork, vfork])
    "x86_64": (0xC000003E, 56, 435, [57, 58]),
    "aarch64": (0xC00000B7, 220, 435, []),
}
_CLONE_THREAD = 0x00010000
_RET_ALLOW, _RET_KILL = 0x7FFF0000, 0x80000000


def _errno(n: int) -> int:
    return 0x00050000 | n


def seccomp_program(machine: str | None = None) -> bytes:
    """No new processes: fork/vfork and clone without CLONE_THREAD fail with EPERM, clone3 with ENOSYS."""
    machine = machine or os.uname().machine
    if machine not in _ARCH:
        raise SandboxUnavailable(f"the code interpreter's seccomp filter does not know the {machine} architecture")
    arch, clone, clone3, forks = _ARCH[machine]
    # (code, jt-label, jf-label, k); labels resolve to instruction offsets below
    prog = [("ld", None, None, 4),  # seccomp_data.arch
            ("jeq", None, "kill", arch),
            ("ld", None, None, 0),  # seccomp_data.nr
            ("jge", "kill", None, 0x40000000),  # the x32 ABI
            ("jeq", "enosys", None, clone3)]
    prog += [("jeq", "eperm", None, nr) for nr in forks]
    prog += [("jeq", None, "allow", clone),
             ("ld", None, None, 16),  # seccomp_data.args[0], low 32 bits: clone's flags
             ("jset", "allow", "eperm", _CLONE_THREAD)]
    labels = {"allow": len(prog), "eperm": len(prog) + 1, "enosys": len(prog) + 2, "kill": len(prog) + 3}
    prog += [("ret", None, None, _RET_ALLOW), ("ret", None, None, _errno(1)), ("ret", None, None, _errno(38)),
             ("ret", None, None, _RET_KILL)]
    codes = {"ld": 0x20, "jeq": 0x15, "jge": 0x35, "jset": 0x45, "ret": 0x06}
    out = b""
    for pc, (op, jt, jf, k) in enumerate(prog):
        rel = lambda label: 0 if label is None else labels[label] - pc - 1  # noqa: E731
        out += struct.pack("=HBBI", codes[op], rel(jt), rel(jf), k)
    return out


# --- the bwrap command -------------------------------------------------------------------------------

BOOTSTRAP = """\
import resource, sys
mem, cpu, fsize = {mem}, {cpu}, {fsize}
for res, soft, hard in ((resource.RLIMIT_AS, mem, mem), (resource.RLIMIT_CPU, cpu, cpu + 1),
                        (resource.RLIMIT_FSIZE, fsize, fsize), (resource.RLIMIT_NOFILE, 64, 64),
                        (resource.RLIMIT_CORE, 0, 0)):
    resource.setrlimit(res, (soft, hard))
code = sys.stdin.read()
sys.stdin.close()
sys.argv = ["<code>"]
exec(compile(code, "<code>", "exec"), {{"__name__": "__main__", "__builtins__": __builtins__}})
"""


def interpreter(cfg: SandboxConfig) -> Path:
    path = Path(cfg.python or getattr(sys, "_base_executable", None) or sys.executable).resolve()
    if not path.is_file():
        raise SandboxUnavailable(f"the code interpreter's Python {path} does not exist")
    return path


@lru_cache(maxsize=8)
def _mounts(python: Path) -> tuple[tuple[str, ...], tuple[tuple[str, str], ...]]:
    """(directories to bind read-only, (target, link) symlinks): the interpreter's install prefix and
    the real directories of the libraries it links, plus top-level links the loader's path goes
    through on a merged-/usr system (/lib64 -> usr/lib64)."""
    prefix = python.parent.parent  # <prefix>/bin/python3.X
    dirs, links = {str(prefix)}, {}
    out = subprocess.run(["ldd", str(python)], capture_output=True, text=True, timeout=30).stdout
    for line in out.splitlines():
        path = line.split("=>")[-1].strip().split(" (")[0].strip()
        if not path.startswith("/"):
            continue
        dirs.add(str(Path(path).resolve().parent))  # the library itself
        dirs.add(os.path.realpath(Path(path).parent))  # the links leading to it (/usr/lib64/ld-linux...)
        top = "/" + Path(path).parts[1]
        if Path(top).is_symlink():
            links[top] = os.readlink(top)
    return tuple(sorted(dirs)), tuple(sorted((t, l) for l, t in links.items()))


def bwrap_command(cfg: SandboxConfig, seccomp_fd: int) -> list[str]:
    python = interpreter(cfg)
    cmd = [BWRAP, "--unshare-all", "--die-with-parent", "--new-session", "--cap-drop", "ALL",
           "--hostname", "sandbox", "--clearenv", "--setenv", "HOME", "/tmp", "--setenv", "LANG", "C.UTF-8",
           "--setenv", "PYTHONDONTWRITEBYTECODE", "1"]
    dirs, links = _mounts(python)
    for d in dirs:
        cmd += ["--ro-bind", d, d]
    for target, link in links:
        cmd += ["--symlink", target, link]
    cmd += ["--proc", "/proc", "--dev", "/dev", "--size", str(cfg.tmp_mb * 2**20), "--tmpfs", "/tmp",
            "--remount-ro", "/", "--chdir", "/tmp", "--seccomp", str(seccomp_fd)]  # only /tmp is writable
    boot = BOOTSTRAP.format(mem=cfg.memory_mb * 2**20, cpu=cfg.cpu_s, fsize=cfg.tmp_mb * 2**20)
    return cmd + [str(python), "-I", "-S", "-B", "-c", boot]


def available() -> str | None:
    """None if the sandbox can run here, else why not."""
    if not Path(BWRAP).is_file() or shutil.which("ldd") is None:
        return f"the code interpreter needs bubblewrap ({BWRAP}; Debian package `bubblewrap`)"
    if os.uname().machine not in _ARCH:
        return f"the code interpreter's sandbox does not support the {os.uname().machine} architecture"
    return None


async def run_python(code: str, cfg: SandboxConfig) -> RunResult:
    """Run `code` in a fresh sandbox; never raises for what the code does (only if the sandbox is missing)."""
    why = available()
    if why:
        raise SandboxUnavailable(why)
    read_fd, write_fd = os.pipe()
    os.write(write_fd, seccomp_program())  # a few hundred bytes: fits in the pipe's buffer
    os.close(write_fd)
    try:
        cmd = await asyncio.to_thread(bwrap_command, cfg, read_fd)  # the first one runs ldd: not on the event loop
        proc = await asyncio.create_subprocess_exec(
            *cmd, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, pass_fds=(read_fd,), env={"PATH": "/usr/bin:/bin"},
            start_new_session=True)
    finally:
        os.close(read_fd)
    reason = None
    limit = cfg.max_output_bytes

    async def read(stream) -> bytes:
        """Up to `limit` bytes; past it the sandbox is killed, and the pipe drained to its end."""
        nonlocal reason
        buf = b""
        while chunk := await stream.read(65536):
            if len(buf) <= limit:
                buf += chunk
            if len(buf) > limit and reason is None:
                reason = "output_limit"
                _kill(proc)
        return buf[:limit]

    async def feed():
        try:
            proc.stdin.write(code.encode())
            await proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it ended before reading all of its code
        finally:
            proc.stdin.close()

    readers = [asyncio.ensure_future(read(proc.stdout)), asyncio.ensure_future(read(proc.stderr))]
    feeder = asyncio.ensure_future(feed())
    try:
        try:
            await asyncio.wait_for(proc.wait(), timeout=cfg.timeout_s)
        except asyncio.TimeoutError:
            reason = reason or "timeout"
            _kill(proc)
            await proc.wait()
        # The sandbox's processes died with it (pid namespace), so the pipes end: what was written comes back.
        out, err = await asyncio.wait_for(asyncio.gather(*readers), timeout=5)
        await feeder
    except BaseException:
        _kill(proc)
        for t in (*readers, feeder):
            t.cancel()
        raise
    status = proc.returncode  # bwrap exits with its child's status, 128 + N for a signal
    if reason is None and status is not None and status > 128:
        sig = status - 128
        # SIGXCPU at the soft CPU limit, SIGKILL at the hard one (a second later)
        reason = "cpu_limit" if sig in (signal.SIGXCPU, signal.SIGKILL) else f"signal {sig}"
    return RunResult(out.decode(errors="replace"), err.decode(errors="replace"),
                     None if reason in ("timeout", "output_limit") else status, reason)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # bwrap and, through --die-with-parent, everything inside
    except ProcessLookupError:
        pass
