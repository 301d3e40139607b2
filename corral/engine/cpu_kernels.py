"""Corral's own CPU kernels: the weight x fp32 activation matrix-vector products of the decode step.

torch's `_weight_int8pack_mm` streams int8 weights at 12-18 GB/s on a 2-core AVX2 machine where memory
gives about 24; decode is that stream, so a kernel that reads a packed layout sequentially
(kernels/int8.c, about 23-25 GB/s there) is most of a decode step's speed. The C files in kernels/ ship
with the package and are compiled on first use, together, into one library with the system C compiler,
into $CORRAL_HOME/kernels (a few seconds; cached by a hash of the sources and flags). They share one
thread pool (kernels/pool.c). On x86 they need AVX2/FMA (AVX-512 paths are chosen at run time); on ARM
(aarch64) the int8 and block kernels and the native decode step run in NEON (the dot-product
instructions where the CPU has them; tested under qemu-aarch64). Without a compiler, on another CPU, or
with CORRAL_CPU_KERNELS=0, `available()` is False and callers use torch's kernels: same results, slower.

    pack(q)                      int8 (N, K) -> the kernel's layout, (N // ROWS, K // CHUNK, ROWS, CHUNK)
    unpack(packed)               and back
    rows(packed, ids)            rows ids of the unpacked matrix (an embedding lookup)
    matvec(x, packed, scales)    x (M, K) fp32 -> (M, N) fp32, for small M (decode)
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

from corral.paths import corral_home

log = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("kernels")
ARM = ("aarch64", "arm64")  # platform.machine() of a 64-bit ARM CPU (Linux, macOS)


def flags_for(machine: str) -> list[str]:
    """The compiler flags of the library for a CPU architecture (platform.machine()); NEON is part of every
    64-bit ARM CPU, and its dot-product code is compiled per function and chosen at run time."""
    base = ["-O3", "-pthread", "-shared", "-fPIC"]
    return base if machine.lower() in ARM else ["-O3", "-mavx2", "-mfma", "-mf16c", *base[1:]]


FLAGS = flags_for(platform.machine())
ROWS, CHUNK = 4, 16  # must match kernels/int8.c (checked when the library loads)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_tried = False


# Prefill dequantizes every quantized weight, a chunk of rows at a time, into a working buffer of the thread
# (`scratch`) that stays allocated: a fresh 16-64 MB buffer per chunk is a fresh mmap, whose page faults and
# zeroing were ~10% of a Llama-3.2-1B int8 prefill. At most this many elements (16 MiB of fp32) at a time.
SCRATCH_ELEMENTS = 1 << 22
_scratch = threading.local()


def scratch(rows: int, cols: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A (rows, cols) buffer of the calling thread, the same memory from call to call (contents undefined).
    Only for values used before the next call: never for a tensor autograd keeps for a backward pass."""
    buffers = _scratch.__dict__.setdefault("buffers", {})
    buf = buffers.get(dtype)
    if buf is None or buf.numel() < rows * cols:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = buffers[dtype] = torch.empty(rows * cols, dtype=dtype)
    return buf[:rows * cols].view(rows, cols)


def scratch_for(x: Tensor) -> bool:
    """Whether a layer given input x may dequantize its weights into `scratch`: on the CPU, and not where
    autograd keeps the weight for a backward pass."""
    return x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo: "flags" on x86, "Features" on ARM); empty where they cannot
    be read."""
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features")))
    except (OSError, StopIteration):
        return set()
    return set(line.split(":", 1)[1].split())


def _cpu_has_avx2_fma() -> bool:
    return {"avx2", "fma"} <= cpu_flags()


def _cpu_supported() -> bool:
    """x86 with AVX2 and FMA, or 64-bit ARM."""
    return platform.machine().lower() in ARM or _cpu_has_avx2_fma()


def can_build() -> bool:
    """Whether the kernels can exist here at all: Linux on x86 with AVX2/FMA or on 64-bit ARM, and a C
    compiler."""
    return sys.platform.startswith("linux") and _cpu_supported() and _compiler() is not None


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL | None:
    if os.environ.get("CORRAL_CPU_KERNELS", "1") == "0":
        return None
    if not sys.platform.startswith("linux") or not _cpu_supported():
        log.info("corral CPU kernels: not Linux on an x86 CPU with AVX2 and FMA or on 64-bit ARM; using torch's "
                 "kernels")
        return None
    compiler = _compiler()
    if compiler is None:
        log.warning("corral CPU kernels: no C compiler found (set CC); using torch's slower int8 kernels")
        return None
    sources = sorted(SOURCES.glob("*.c"))
    digest = hashlib.sha256(" ".join([compiler, *FLAGS]).encode())
    for path in sorted(SOURCES.iterdir()):
        if path.suffix in (".c", ".h"):
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    target = corral_home() / "kernels" / f"corral_kernels-{digest.hexdigest()[:16]}.so"
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            proc = subprocess.run([compiler, *FLAGS, "-o", str(out), *map(str, sources)], capture_output=True, text=True)
            if proc.returncode != 0:
                log.warning("corral CPU kernels: %s failed (%s); using torch's slower int8 kernels",
                            compiler, proc.stderr.strip()[-500:])
                return None
            os.replace(out, target)  # atomic: a concurrent process sees the old state or the whole file
    lib = ctypes.CDLL(str(target))
    lib.corral_int8_matvec.restype = None
    lib.corral_int8_matvec.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.corral_int8_isa.restype = ctypes.c_char_p
    if (lib.corral_int8_rows(), lib.corral_int8_chunk()) != (ROWS, CHUNK):
        log.warning("corral CPU kernels: %s does not match this Python module; using torch's kernels", target)
        return None
    return lib


def library() -> ctypes.CDLL | None:
    """The compiled kernel library (declare a function's argtypes before calling it), or None."""
    return _library()


def _library() -> ctypes.CDLL | None:
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                _lib = _build()
                if _lib is not None and not _self_test(_lib):
                    log.warning("corral CPU kernels: self-test failed; using torch's kernels")
                    _lib = None
                _tried = True
    return _lib


def int8_isa() -> str | None:
    """The int8 kernel's code path on this CPU ("avx512", "avx2" or "neon"), None without the kernels."""
    lib = _library()
    return lib.corral_int8_isa().decode() if lib is not None else None


def available() -> bool:
    """True when the compiled kernel can be used on this machine."""
    return _library() is not None


def fits(n: int, k: int) -> bool:
    """Whether an (n, k) weight has a shape the kernel handles."""
    return n % ROWS == 0 and k % CHUNK == 0


def pack(q: Tensor) -> Tensor:
    """int8 (N, K) -> (N // ROWS, K // CHUNK, ROWS, CHUNK), contiguous."""
    n, k = q.shape
    if not fits(n, k):
        raise ValueError(f"the int8 kernel needs N % {ROWS} == 0 and K % {CHUNK} == 0, got {n} x {k}")
    return q.view(n // ROWS, ROWS, k // CHUNK, CHUNK).transpose(1, 2).contiguous()


def unpack(packed: Tensor) -> Tensor:
    """The inverse of pack: int8 (N, K), contiguous."""
    blocks, chunks, rows, chunk = packed.shape
    return packed.transpose(1, 2).reshape(blocks * rows, chunks * chunk)


def rows(packed: Tensor, ids: Tensor) -> Tensor:
    """unpack(packed)[ids] without unpacking the rest: (*ids.shape, K) int8."""
    blocks, chunks, n_rows, chunk = packed.shape
    return packed[ids // n_rows, :, ids % n_rows].reshape(*ids.shape, chunks * chunk)


def matvec(x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    """x (M, K) fp32 (small M) -> (M, N) fp32 = x @ (unpack(packed) * scales[:, None]).T."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the corral CPU kernel is not available on this machine")
    return _matvec(lib, x, packed, scales)


def _matvec(lib, x: Tensor, packed: Tensor, scales: Tensor) -> Tensor:
    blocks, chunks, block_rows, chunk = packed.shape
    n, k = blocks * block_rows, chunks * chunk
    if x.dtype != torch.float32 or scales.dtype != torch.float32 or x.shape[-1] != k or scales.shape != (n,):
        raise ValueError(f"matvec needs x (M, {k}) fp32 and scales ({n},) fp32; got x {tuple(x.shape)} "
                         f"{x.dtype}, scales {tuple(scales.shape)} {scales.dtype}")
    x, packed, scales = x.contiguous(), packed.contiguous(), scales.contiguous()
    y = torch.empty(x.shape[0], n, dtype=torch.float32)
    lib.corral_int8_matvec(x.data_ptr(), packed.data_ptr(), scales.data_ptr(), y.data_ptr(),
                           x.shape[0], n, k, torch.get_num_threads())
    return y


def _self_test(lib) -> bool:
    """The built library against a float reference on a small problem (a miscompile must not pass)."""
    gen = torch.Generator().manual_seed(0)
    q = torch.randint(-127, 128, (8, 64), generator=gen, dtype=torch.int8)
    scales, x = torch.rand(8, generator=gen), torch.randn(3, 64, generator=gen)
    got = _matvec(lib, x, pack(q), scales)
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    return torch.allclose(got.double(), want, rtol=1e-5, atol=1e-4)
