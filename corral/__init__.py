"""Corral: the whole Llama 3.2 stack in one Python package."""

import os

# torch's OpenMP workers otherwise spin-wait after every operator, holding cores that Corral's kernel
# threads (corral/engine/kernels/pool.c) and other processes need: a decode step measured 2.3x slower.
# libgomp reads this once, when torch loads, so it is set before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _return_large_blocks_to_the_system() -> None:
    """glibc serves a freed block of up to 32 MB from its heap next time and keeps it: a prompt's
    activations (4-16 MB each at 1B) then stay in the heap in pieces, and the 1B int8 model peaked 90 MB
    higher (1.36x its weights instead of 1.29x, bench/bench.py's VmHWM). Blocks of 4 MB and more are
    mapped and unmapped instead (decode never allocates that much; prefill's dequantization reuses its own
    buffer). CORRAL_MALLOC_TUNING=0 leaves malloc alone."""
    if os.environ.get("CORRAL_MALLOC_TUNING", "1") == "0":
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None)
        if hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version"):  # glibc
            libc.mallopt(-3, 4 << 20)  # M_MMAP_THRESHOLD (fixing it also ends glibc's dynamic raising)
    except OSError:
        pass


_return_large_blocks_to_the_system()

__version__ = "0.1.0"
