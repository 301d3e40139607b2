"""The kernel library built for 64-bit ARM (NEON, and the dot-product instructions where the CPU has them),
run under user-mode emulation: qemu-aarch64 runs tests/engine/arm_driver.c linked against the library that
cpu_kernels.flags_for("aarch64") builds. Its results are compared with this machine's x86 kernels (bit for
bit where both follow the same float steps) and with float64. Needs Debian's gcc-aarch64-linux-gnu and
qemu-user (.ci/run installs them)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from corral.engine import cpu_kernels, qblock
from corral.engine.qblock import QType
from tests.conftest import needs_cpu_kernels
from tests.engine.test_qblock import quantized_x

CC, QEMU, SYSROOT = "aarch64-linux-gnu-gcc", "qemu-aarch64", Path("/usr/aarch64-linux-gnu")
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    """run(*args, cpu=None, env=None) -> the driver's stdout, under qemu; the build directory as .dir."""
    missing = [tool for tool in (CC, QEMU) if shutil.which(tool) is None]
    if missing or not SYSROOT.is_dir():
        pytest.fail(f"{', '.join(missing) or SYSROOT} missing: apt-get install gcc-aarch64-linux-gnu qemu-user")
    d = tmp_path_factory.mktemp("arm")
    sources = sorted(map(str, cpu_kernels.SOURCES.glob("*.c")))
    subprocess.run([CC, *cpu_kernels.flags_for("aarch64"), "-o", str(d / "libcorral.so"), *sources], check=True)
    subprocess.run([CC, "-O2", "-o", str(d / "driver"), str(HERE / "arm_driver.c"), str(d / "libcorral.so"),
                    "-Wl,-rpath,$ORIGIN"], check=True)

    class Runner:
        dir = d

        @staticmethod
        def run(*args, cpu: str | None = None, env: dict | None = None) -> str:
            cmd = [QEMU, "-L", str(SYSROOT)] + (["-cpu", cpu] if cpu else []) + [str(d / "driver"), *map(str, args)]
            environment = {"PATH": "/usr/bin:/bin", **(env or {})}
            return subprocess.run(cmd, check=True, capture_output=True, text=True, env=environment,
                                  timeout=120).stdout

    return Runner


def arm_q(arm, kind: int, x: torch.Tensor, data: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """y = x @ W^T through the ARM library's corral_q_matvec (2 threads)."""
    m, k = x.shape
    (arm.dir / "in.bin").write_bytes(x.contiguous().numpy().tobytes() + data.contiguous().numpy().tobytes())
    arm.run("q", kind, m, n, k, 2, arm.dir / "in.bin", arm.dir / "out.bin", **kw)
    return torch.frombuffer(bytearray((arm.dir / "out.bin").read_bytes()), dtype=torch.float32).view(m, n)


def test_the_arm_build_chooses_its_paths_at_run_time(arm):
    """The dot-product path where the CPU has it (qemu's default CPU does), plain NEON on an ARMv8.0 core
    (Cortex-A53, as in many phones), CORRAL_CPU_ISA caps it; int8 is NEON; no native decode step yet."""
    assert arm.run("isa").split() == ["neon-dotprod", "neon"]
    assert arm.run("isa", cpu="cortex-a53").split() == ["neon", "neon"]
    assert arm.run("isa", env={"CORRAL_CPU_ISA": "neon"}).split() == ["neon", "neon"]
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", str(arm.dir / "libcorral.so")], capture_output=True,
                             text=True, check=True).stdout
    assert "corral_q_matvec" in symbols and "corral_int8_matvec" in symbols and "corral_decode_step" not in symbols


@needs_cpu_kernels
@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1], ids=str)
def test_interleaved_kernel_is_bit_identical_to_x86(arm, qtype):
    """sdot by lane computes the same integers as vpdpbusd / vpmaddubsw, and the float steps follow the AVX
    code's order: the same bits as this machine's kernel, for decode and prompt batch sizes."""
    gen = torch.Generator().manual_seed(21)
    w, x = torch.randn(48, 256, generator=gen) * 0.05, torch.randn(9, 256, generator=gen)
    x[0, :32] = 0  # a block of zeros (scale 0)
    packed = qblock.interleave(qblock.quantize(w, qtype), qtype)
    for m in (1, 3, 8, 9):
        want = qblock.matvec(x[:m], packed, qtype, interleaved=True)
        assert torch.equal(arm_q(arm, int(qtype) | qblock.X8, x[:m], packed, 48), want), m


@needs_cpu_kernels
def test_every_arm_path_matches_float64(arm):
    """Each type and layout against the float64 product of the kernel's rounded activations (as this
    machine's x86 kernel rounds them: the ARM build must round the same way): the GGUF layout on NEON, the
    interleaved one on dotprod and, on a Cortex-A53 without it, on the scalar code."""
    lib = qblock._kernel()
    gen = torch.Generator().manual_seed(22)
    w, x = torch.randn(40, 160, generator=gen) * 0.05, torch.randn(5, 160, generator=gen)
    for qtype in QType:
        blocks = qblock.quantize(w, qtype)
        cases = [(int(qtype), blocks, 40, None)]
        if qtype != QType.Q8_0:
            cases += [(int(qtype) | qblock.A16, blocks, 40, None)]
            cases += [(int(qtype) | qblock.X8, qblock.interleave(blocks, qtype), 40, cpu)
                      for cpu in (None, "cortex-a53")]
        for kind, data, n, cpu in cases:
            want = quantized_x(lib, kind & ~qblock.X8, x) @ qblock.dequantize(blocks, qtype).double().T
            got = arm_q(arm, kind, x, data, n, cpu=cpu)
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (kind, cpu)


def test_int8_kernel_on_arm_matches_float64(arm):
    gen = torch.Generator().manual_seed(23)
    q = torch.randint(-127, 128, (64, 576), generator=gen, dtype=torch.int8)
    scales = torch.rand(64, generator=gen) / 100
    for m in (1, 2, 3, 8):
        x = torch.randn(m, 576, generator=gen)
        data = x.numpy().tobytes() + cpu_kernels.pack(q).numpy().tobytes() + scales.numpy().tobytes()
        (arm.dir / "in8.bin").write_bytes(data)
        arm.run("int8", m, 64, 576, 2, arm.dir / "in8.bin", arm.dir / "out8.bin")
        got = torch.frombuffer(bytearray((arm.dir / "out8.bin").read_bytes()), dtype=torch.float32).view(m, 64)
        want = x.double() @ (q.double() * scales.double()[:, None]).T
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), m


def test_dequantize_on_arm_is_ggufs(arm):
    """Both layouts dequantize bit for bit as gguf.quants does (qblock's torch reference): no fused
    multiply-add where ggml rounds the product first (ARM compilers fuse by default)."""
    gen = torch.Generator().manual_seed(24)
    w = torch.randn(16, 96, generator=gen)
    for qtype in QType:
        blocks = qblock.quantize(w, qtype)
        layouts = [(int(qtype), blocks)]
        if qtype != QType.Q8_0:
            layouts.append((int(qtype) | qblock.X8, qblock.interleave(blocks, qtype)))
        for kind, data in layouts:
            (arm.dir / "w.bin").write_bytes(data.numpy().tobytes())
            arm.run("deq", kind, 16, 96, arm.dir / "w.bin", arm.dir / "deq.bin")
            got = torch.frombuffer(bytearray((arm.dir / "deq.bin").read_bytes()), dtype=torch.float32).view(16, 96)
            assert torch.equal(got, qblock._dequantize_torch(blocks, qtype)), kind
