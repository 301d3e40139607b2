"""The kernel library built for 64-bit ARM (NEON, and the dot-product instructions where the CPU has them),
run under user-mode emulation: qemu-aarch64 runs tests/engine/arm_driver.c linked against the library that
cpu_kernels.flags_for("aarch64") builds. Its results are compared with this machine's x86 kernels (bit for
bit where both follow the same float steps), with float64, and (the native decode step) with the step
written out in torch. Needs Debian's gcc-aarch64-linux-gnu and
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


def build_driver(compiler: str, machine: str, directory: Path) -> Path:
    """The kernel library as cpu_kernels builds it for `machine`, and arm_driver.c linked against it."""
    sources = sorted(map(str, cpu_kernels.SOURCES.glob("*.c")))
    lib, driver = directory / "libcorral.so", directory / "driver"
    subprocess.run([compiler, *cpu_kernels.flags_for(machine), "-o", str(lib), *sources], check=True)
    subprocess.run([compiler, "-O2", "-o", str(driver), str(HERE / "arm_driver.c"), str(lib), "-Wl,-rpath,$ORIGIN",
                    "-lm"], check=True)
    return driver


@pytest.fixture(scope="module")
def arm(tmp_path_factory):
    """run(*args, cpu=None, env=None) -> the driver's stdout, under qemu; the build directory as .dir."""
    missing = [tool for tool in (CC, QEMU) if shutil.which(tool) is None]
    if missing or not SYSROOT.is_dir():
        pytest.fail(f"{', '.join(missing) or SYSROOT} missing: apt-get install gcc-aarch64-linux-gnu qemu-user")
    d = tmp_path_factory.mktemp("arm")
    driver = build_driver(CC, "aarch64", d)

    class Runner:
        dir = d

        @staticmethod
        def run(*args, cpu: str | None = None, env: dict | None = None) -> str:
            cmd = [QEMU, "-L", str(SYSROOT)] + (["-cpu", cpu] if cpu else []) + [str(driver), *map(str, args)]
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
    (Cortex-A53, as in many phones), CORRAL_CPU_ISA caps it; int8 is NEON; the native decode step is built."""
    assert arm.run("isa").split() == ["neon-dotprod", "neon"]
    assert arm.run("isa", cpu="cortex-a53").split() == ["neon", "neon"]
    assert arm.run("isa", env={"CORRAL_CPU_ISA": "neon"}).split() == ["neon", "neon"]
    symbols = subprocess.run(["aarch64-linux-gnu-nm", "-D", str(arm.dir / "libcorral.so")], capture_output=True,
                             text=True, check=True).stdout
    assert all(f in symbols for f in ("corral_q_matvec", "corral_int8_matvec", "corral_decode_step"))


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


# ---- the native decode step (kernels/decode.c) -------------------------------------------------------------

CONFIG = dict(n_layers=2, dim=64, n_heads=4, n_kv_heads=2, head_dim=16, hidden=128, vocab=96)


def decode_input(weight_type: int, seed: int = 0):
    """A random tiny model, KV cache and batch of 3 sequences (at positions 5, 17, 0) as arm_driver.c's decode
    mode reads them -> (the file's bytes, the fp32 tensors for the reference)."""
    c, gen = CONFIG, torch.Generator().manual_seed(seed)
    n_slots, bs, B, max_blocks, rope_len = 64, 8, 3, 4, 32
    hd, kv = c["head_dim"], c["n_kv_heads"]
    shapes = dict(wq=(c["n_heads"] * hd, c["dim"]), wk=(kv * hd, c["dim"]), wv=(kv * hd, c["dim"]),
                  wo=(c["dim"], c["n_heads"] * hd), w1=(c["hidden"], c["dim"]), w3=(c["hidden"], c["dim"]),
                  w2=(c["dim"], c["hidden"]))
    parts, ref = [], {"layers": []}

    def weight(shape):
        w = torch.randn(*shape, generator=gen) * 0.1
        if weight_type == 0:
            parts.append(w.numpy().tobytes())
            return w
        qtype = QType(weight_type & 0xFF)
        blocks = qblock.quantize(w, qtype)
        parts.append((qblock.interleave(blocks, qtype) if weight_type & qblock.X8 else blocks).numpy().tobytes())
        return qblock.dequantize(blocks, qtype)

    header = [c["n_layers"], c["dim"], c["n_heads"], kv, hd, c["hidden"], c["vocab"], rope_len, n_slots, bs, 1, B,
              max_blocks, weight_type, 2, 0]
    parts.append(torch.tensor(header, dtype=torch.int64).numpy().tobytes())
    parts.append(torch.tensor([1e-5], dtype=torch.float64).numpy().tobytes())
    for _ in range(c["n_layers"]):
        layer = {}
        for name in ("attn_norm", "ffn_norm"):
            layer[name] = 1 + 0.1 * torch.randn(c["dim"], generator=gen)
            parts.append(layer[name].numpy().tobytes())
        for name, shape in shapes.items():
            layer[name] = weight(shape)
        ref["layers"].append(layer)
    ref["norm"] = 1 + 0.1 * torch.randn(c["dim"], generator=gen)
    parts.append(ref["norm"].numpy().tobytes())
    ref["output"] = weight((c["vocab"], c["dim"]))
    angles = torch.arange(rope_len)[:, None] * 10000.0 ** (-torch.arange(hd // 2) * 2 / hd)
    ref["rope"] = torch.stack([angles.cos(), angles.sin()], dim=-1).float()  # (rope_len, hd / 2, 2)
    parts.append(ref["rope"].numpy().tobytes())
    for name in ("cache_k", "cache_v"):
        ref[name] = torch.randn(c["n_layers"], n_slots, kv, hd, generator=gen).half()
        parts.append(ref[name].numpy().tobytes())
    ref["x"] = torch.randn(B, c["dim"], generator=gen)
    ref["positions"] = torch.tensor([5, 17, 0])
    ref["tables"] = torch.tensor([[3, 0, 0, 0], [1, 6, 2, 0], [7, 0, 0, 0]], dtype=torch.int32)
    for name in ("x", "positions", "tables"):
        parts.append(ref[name].numpy().tobytes())
    ref["block_size"] = bs
    return b"".join(parts), ref


def reference_step(ref) -> torch.Tensor:
    """The decode step written out in torch (float64): what kernels/decode.c computes, from the same tensors."""
    c = CONFIG
    hd, group = c["head_dim"], c["n_heads"] // c["n_kv_heads"]

    def rmsnorm(x, w):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w.double()

    def rope(v, pos):  # (heads, hd): rotate the pairs (2i, 2i + 1)
        cs = ref["rope"][pos].double()
        a, d = v[:, 0::2], v[:, 1::2]
        out = torch.empty_like(v)
        out[:, 0::2], out[:, 1::2] = a * cs[:, 0] - d * cs[:, 1], a * cs[:, 1] + d * cs[:, 0]
        return out

    x = ref["x"].double().clone()
    caches = {k: ref[k].clone() for k in ("cache_k", "cache_v")}
    for li, layer in enumerate(ref["layers"]):
        w = {k: v.double() for k, v in layer.items()}
        h = rmsnorm(x, w["attn_norm"])
        att = torch.empty(x.shape[0], c["n_heads"] * hd, dtype=torch.float64)
        for b, pos in enumerate(ref["positions"].tolist()):
            q = rope((h[b] @ w["wq"].T).view(c["n_heads"], hd), pos)
            k = rope((h[b] @ w["wk"].T).view(c["n_kv_heads"], hd), pos)
            v = (h[b] @ w["wv"].T).view(c["n_kv_heads"], hd)
            slots = [int(ref["tables"][b][p // ref["block_size"]]) * ref["block_size"] + p % ref["block_size"]
                     for p in range(pos + 1)]
            caches["cache_k"][li, slots[-1]], caches["cache_v"][li, slots[-1]] = k.half(), v.half()
            keys, values = caches["cache_k"][li, slots].double(), caches["cache_v"][li, slots].double()
            for head in range(c["n_heads"]):
                p = torch.softmax(keys[:, head // group] @ q[head] / hd ** 0.5, dim=0)
                att[b, head * hd:(head + 1) * hd] = p @ values[:, head // group]
        x = x + att @ w["wo"].T
        h = rmsnorm(x, w["ffn_norm"])
        x = x + (torch.nn.functional.silu(h @ w["w1"].T) * (h @ w["w3"].T)) @ w["w2"].T
    return rmsnorm(x, ref["norm"]) @ ref["output"].double().T


def arm_decode(arm, data: bytes) -> torch.Tensor:
    (arm.dir / "model.bin").write_bytes(data)
    arm.run("decode", arm.dir / "model.bin", arm.dir / "logits.bin")
    return torch.frombuffer(bytearray((arm.dir / "logits.bin").read_bytes()), dtype=torch.float32).view(3, -1)


@pytest.fixture(scope="module")
def x86_decode(tmp_path_factory):
    """decode(data) -> logits: the same driver and input on this machine's x86 build (built once)."""
    d = tmp_path_factory.mktemp("x86")
    driver = build_driver(cpu_kernels._compiler(), "x86_64", d)

    def decode(data: bytes) -> torch.Tensor:
        (d / "model.bin").write_bytes(data)
        subprocess.run([str(driver), "decode", str(d / "model.bin"), str(d / "logits.bin")], check=True)
        return torch.frombuffer(bytearray((d / "logits.bin").read_bytes()), dtype=torch.float32).view(3, -1)

    return decode


def test_native_decode_step_on_arm_matches_the_reference(arm):
    """fp32 weights, an fp16 KV cache with earlier positions in it, three sequences at different positions
    and block tables: the ARM build's decode step against the step written out in torch."""
    data, ref = decode_input(0)
    got, want = arm_decode(arm, data), reference_step(ref)
    assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


@needs_cpu_kernels
@pytest.mark.parametrize("weight_type", [0, int(QType.Q8_0), int(QType.Q4_1) | qblock.X8], ids=["f32", "q8_0", "q4_1x8"])
def test_native_decode_step_on_arm_equals_x86(arm, x86_decode, weight_type):
    """The same step on x86 and ARM: the same vector operations in the same order, so the logits agree to
    float noise (measured: fp32 2e-7 of the largest logit, the interleaved Q4_1 bit for bit). Q8_0's blocks
    sum their per-block floats in another order on NEON, and the next layer's 16-bit rounding of x
    amplifies that: 2e-5 to 6e-5 over seeds 1-3."""
    data, ref = decode_input(weight_type, seed=1)
    got, x86 = arm_decode(arm, data), x86_decode(data)
    tolerance = 2e-4 if weight_type == int(QType.Q8_0) else 1e-5
    assert torch.allclose(got, x86, rtol=tolerance, atol=tolerance * x86.abs().max().item())
    if weight_type == 0:
        assert torch.allclose(x86.double(), reference_step(ref), rtol=1e-4, atol=1e-4 * x86.abs().max().item())
