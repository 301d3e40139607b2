"""Corral's int8 decode kernel: the packed layout, the product against a float64 reference, the
compiled library's cache under $CORRAL_HOME, and the fallbacks (disabled, no compiler)."""

from __future__ import annotations

import platform

import pytest
import torch

from corral.engine import cpu_kernels


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """A kernel module that has not tried to build yet, with its own CORRAL_HOME."""
    monkeypatch.setenv("CORRAL_HOME", str(tmp_path))
    monkeypatch.setattr(cpu_kernels, "_tried", False)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    return tmp_path


def test_pack_unpack_and_row_lookup():
    q = torch.randint(-127, 128, (12, 48), dtype=torch.int8)
    packed = cpu_kernels.pack(q)
    assert packed.shape == (3, 3, 4, 16) and not torch.equal(packed.flatten(), q.flatten())
    assert torch.equal(cpu_kernels.unpack(packed), q)
    ids = torch.tensor([[0, 5, 11], [7, 7, 2]])
    assert torch.equal(cpu_kernels.rows(packed, ids), q[ids])
    with pytest.raises(ValueError, match="N % 4 == 0 and K % 16 == 0, got 10 x 48"):
        cpu_kernels.pack(torch.zeros(10, 48, dtype=torch.int8))


def test_kernel_builds_on_this_machine():
    """Where the CPU has AVX2/FMA and a C compiler exists (these CI machines), the kernel must be in use."""
    expected = cpu_kernels._cpu_supported() and cpu_kernels._compiler() is not None
    assert cpu_kernels.available() == expected


def test_int8_path_is_the_best_this_cpu_has():
    """No silent fallback: AVX-512 where the CPU has it (Linux's flag avx512f), AVX2 otherwise."""
    if not cpu_kernels.available():
        assert cpu_kernels.int8_isa() is None
        return
    if platform.machine().lower() in cpu_kernels.ARM:
        assert cpu_kernels.int8_isa() == "neon"
    else:
        assert cpu_kernels.int8_isa() == ("avx512" if "avx512f" in cpu_kernels.cpu_flags() else "avx2")


def test_int8_avx2_path_on_an_avx512_cpu(tmp_path, monkeypatch):
    """CORRAL_CPU_ISA=avx2 caps the choice: a copy of the library (the choice is made once per process)
    runs the AVX2 code against float64, whatever the CPU, so both paths are tested where AVX-512 exists."""
    import ctypes
    import subprocess

    if not cpu_kernels.available():
        pytest.fail("the int8 kernels did not build on this machine")
    out = tmp_path / "avx2.so"
    subprocess.run([cpu_kernels._compiler(), *cpu_kernels.FLAGS, "-o", str(out),
                    *map(str, sorted(cpu_kernels.SOURCES.glob("*.c")))], check=True)
    monkeypatch.setenv("CORRAL_CPU_ISA", "avx2")
    lib = ctypes.CDLL(str(out))
    lib.corral_int8_matvec.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_int]
    lib.corral_int8_isa.restype = ctypes.c_char_p
    assert lib.corral_int8_isa() == b"avx2"
    gen = torch.Generator().manual_seed(7)
    q = torch.randint(-127, 128, (64, 576), generator=gen, dtype=torch.int8)
    scales, x = torch.rand(64, generator=gen) / 100, torch.randn(3, 576, generator=gen)
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    got = cpu_kernels._matvec(lib, x, cpu_kernels.pack(q), scales)
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_int8_rows_do_not_depend_on_the_batch():
    """Rows of x go 4, 2 or 1 at a time through a widened block (AVX-512) or 2 and 1 (AVX2): each row's sums
    are the same chain whichever, so a sequence's output is bit-identical alone and in any batch."""
    if not cpu_kernels.available():
        pytest.fail("the int8 kernels did not build on this machine")
    gen = torch.Generator().manual_seed(11)
    q = torch.randint(-127, 128, (64, 576), generator=gen, dtype=torch.int8)
    scales, x = torch.rand(64, generator=gen) / 100, torch.randn(17, 576, generator=gen)
    packed = cpu_kernels.pack(q)
    batch = cpu_kernels.matvec(x, packed, scales)
    for m in (1, 2, 3, 4, 5, 7, 9):
        for i in (0, 17 - m):
            assert torch.equal(cpu_kernels.matvec(x[i:i + m], packed, scales), batch[i:i + m]), (m, i)


@pytest.mark.parametrize("m,n,k", [(1, 4, 16), (1, 64, 96), (3, 20, 48), (8, 128, 576), (17, 36, 64), (32, 128, 576)])
def test_matvec_matches_float64(m, n, k):
    if not cpu_kernels.available():
        with pytest.raises(RuntimeError, match="not available"):
            cpu_kernels.matvec(torch.zeros(1, 16), torch.zeros(1, 1, 4, 16, dtype=torch.int8), torch.zeros(4))
        return
    gen = torch.Generator().manual_seed(m * n + k)
    q = torch.randint(-127, 128, (n, k), generator=gen, dtype=torch.int8)
    scales, x = torch.rand(n, generator=gen) / 100, torch.randn(m, k, generator=gen)
    got = cpu_kernels.matvec(x, cpu_kernels.pack(q), scales)
    want = x.double() @ (q.double() * scales.double()[:, None]).T
    assert got.shape == (m, n) and got.dtype == torch.float32
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item())
    with pytest.raises(ValueError, match="fp32"):
        cpu_kernels.matvec(x.bfloat16(), cpu_kernels.pack(q), scales)


def test_library_is_cached_in_corral_home(fresh_build):
    if not (cpu_kernels._cpu_supported() and cpu_kernels._compiler()):
        assert not cpu_kernels.available()
        return
    assert cpu_kernels.available()
    built = list((fresh_build / "kernels").glob("corral_kernels-*.so"))
    assert len(built) == 1
    mtime = built[0].stat().st_mtime_ns
    cpu_kernels._tried = False  # a second process: loads the cached file, no rebuild
    assert cpu_kernels.available() and built[0].stat().st_mtime_ns == mtime


def test_disabled_by_environment(fresh_build, monkeypatch):
    monkeypatch.setenv("CORRAL_CPU_KERNELS", "0")
    assert not cpu_kernels.available()
    from corral.engine.quantize import quantize_model_int8

    layer = quantize_model_int8(torch.nn.Sequential(torch.nn.Linear(32, 16)))[0]
    assert layer.packed is None and layer.weight is not None  # torch's kernels, same results
    x = torch.randn(1, 32)
    assert torch.allclose(layer(x), x @ (layer.weight.float() * layer.scales[:, None]).T + layer.bias, atol=1e-5)


def test_failed_compile_falls_back_with_a_warning(fresh_build, monkeypatch, caplog):
    if not cpu_kernels._cpu_supported():  # never tries to compile: no warning to check
        assert not cpu_kernels.available()
        return
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level("WARNING", logger="corral.engine.cpu_kernels"):
        assert not cpu_kernels.available()
    assert "false failed" in caplog.text and "torch's slower int8 kernels" in caplog.text
    assert not (fresh_build / "kernels").exists() or not list((fresh_build / "kernels").glob("*.so"))
