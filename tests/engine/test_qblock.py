"""GGUF block quantization (corral/engine/qblock.py, kernels/qblock.c): the quantizers and dequantizers
bit-exact with the `gguf` package's own, the kernel against a float64 reference for every decode batch
size, the code path the CPU should take, the modules (kernel, prefill and no-kernel paths), and block
checkpoints (`corral quantize --scheme int4 / q4_1 / q8_0`) saved and loaded back."""

from __future__ import annotations

import ctypes
import platform

import gguf
import numpy as np
import pytest
import torch

from corral.engine import cpu_kernels, qblock
from corral.engine.qblock import BlockEmbedding, BlockLinear, QType

from tests.conftest import needs_cpu_kernels

TYPES = list(QType)
DECODE_ROWS = [1, 2, 3, 4, 5, 8, 16, 17, 31, 32]


def gguf_type(qtype: QType) -> gguf.GGMLQuantizationType:
    return gguf.GGMLQuantizationType[qtype.name]


def awkward_weight(n: int = 96, k: int = 320) -> torch.Tensor:
    """Random weights with the blocks a quantizer can get wrong."""
    torch.manual_seed(0)
    w = torch.randn(n, k) * 0.05
    w[0, :32] = 0  # an all-zero block (d = 0)
    w[1, 3], w[1, 9] = 1.0, -1.0  # a tie of magnitude: the first one sets Q4_0's sign
    w[2, 32:64] = 0.25  # a constant block (max == min for Q4_1)
    w[3, 64:96] = torch.linspace(-3, 3, 32)  # values on exact rounding boundaries
    w[4, 96:128] = 1e-6  # tiny scales (fp16 subnormals)
    return w


@pytest.fixture
def no_kernel(monkeypatch):
    """qblock as on a machine without the compiled kernels."""
    monkeypatch.setattr(qblock, "_tried", True)
    monkeypatch.setattr(qblock, "_lib", None)


@pytest.mark.parametrize("qtype", TYPES, ids=str)
def test_quantize_and_dequantize_equal_gguf(qtype):
    w = awkward_weight()
    ref = gguf.quants.quantize(w.numpy(), gguf_type(qtype))
    ours = qblock.quantize(w, qtype)
    assert ours.shape == (96, 320 // 32 * qtype.block_bytes) and ours.dtype == torch.uint8
    assert np.array_equal(ours.numpy(), ref)  # the same bytes: GGUF's layout
    want = torch.from_numpy(gguf.quants.dequantize(ref, gguf_type(qtype)))
    assert torch.equal(qblock._dequantize_torch(ours, qtype), want)
    assert torch.equal(qblock.dequantize(ours, qtype), want)  # the C dequantizer where it runs
    assert torch.equal(qblock.dequantize(ours, str(qtype), torch.bfloat16), want.bfloat16())


@pytest.mark.parametrize("qtype", TYPES, ids=str)
def test_round_trip(qtype):
    """Blocks -> floats -> the same blocks; floats -> blocks -> floats within one quantization step."""
    w = torch.randn(40, 256) * 0.05
    blocks = qblock.quantize(w, qtype)
    back = qblock.dequantize(blocks, qtype)
    assert torch.equal(qblock.quantize(back, qtype), blocks)
    step = {QType.Q8_0: 1 / 127, QType.Q4_0: 1 / 8, QType.Q4_1: 1 / 15}[qtype]
    block_range = w.view(40, 8, 32).abs().amax(-1, keepdim=True) * 2
    assert ((back - w).view(40, 8, 32).abs() <= block_range * step + 1e-6).all()


def test_quantize_checks_shapes():
    with pytest.raises(ValueError, match="multiple of 32"):
        qblock.quantize(torch.randn(4, 40), "q8_0")
    with pytest.raises(ValueError, match="unknown block type 'q5_0'"):
        qblock.quantize(torch.randn(4, 64), "q5_0")
    assert QType.of("Q4_1") is QType.Q4_1 and QType.of(8) is QType.Q8_0 and int(QType.Q4_0) == 2


def test_isa_is_the_best_this_cpu_has():
    """No silent fallback: where the kernels build, they take the widest path the CPU offers."""
    flags = cpu_kernels.cpu_flags()
    if not cpu_kernels.available():
        assert qblock.kernel_isa() is None
        return
    if platform.machine().lower() in cpu_kernels.ARM:
        want = "neon-dotprod" if "asimddp" in flags else "neon"
    else:
        want = "avx512vnni" if {"avx512f", "avx512_vnni", "avx512bw", "avx512vl"} <= flags else "avx2"  # Linux's names
    assert qblock.kernel_isa() == want


def prepared(lib, qtype: QType | int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernel's quantized activations (its layout: int16 q[K/32][M][32], then fp32 d[K/32][M]) as
    (M, K) values and (M, K/32) scales: 16-bit for Q8_0, 8-bit for the 4-bit types, as llama.cpp."""
    m, k = x.shape
    nb = k // 32
    act = torch.zeros(lib.corral_q_act_bytes(int(qtype), m, k), dtype=torch.uint8)
    lib.corral_q_prepare(int(qtype), x.data_ptr(), act.data_ptr(), m, k)
    q = act[: nb * m * 64].view(torch.int16).view(nb, m, 32).permute(1, 0, 2).reshape(m, k)
    d = act[nb * m * 64: nb * m * 68].view(torch.float32).view(nb, m).T
    return q, d


def quantized_x(lib, qtype: QType, x: torch.Tensor) -> torch.Tensor:
    """x as the kernel multiplies it (float64): its integers times their block's scale."""
    q, d = prepared(lib, qtype, x)
    return q.double() * d.double().repeat_interleave(32, dim=1)


@needs_cpu_kernels
@pytest.mark.parametrize("m", DECODE_ROWS)
@pytest.mark.parametrize("qtype", TYPES, ids=str)
def test_kernel_matches_float64(qtype, m):
    """y = (the kernel's quantized x) @ dequantized W^T in float64, for every decode batch size, odd N
    (a tail of rows past the last group of four) and a wide K; x rounded to 16 bits for Q8_0 and for a
    4-bit type | A16, to 8 bits for the 4-bit types (as llama.cpp)."""
    lib = qblock._kernel()
    assert lib is not None, "the block kernels did not build or failed their self-test"
    kinds = [int(qtype)] + ([int(qtype) | qblock.A16] if qtype in FOUR_BIT else [])
    for n, k in [(37, 96), (13, 576), (4, 32)]:
        gen = torch.Generator().manual_seed(m * 1000 + n)
        w, x = torch.randn(n, k, generator=gen) * 0.05, torch.randn(m, k, generator=gen)
        x[0, :32] = 0  # an all-zero activation block
        blocks = qblock.quantize(w, qtype)
        for kind in kinds:
            q, d = prepared(lib, kind, x)
            xq = q.double() * d.double().repeat_interleave(32, dim=1)
            levels = 127 if kind in FOUR_BIT else 32767  # 8 or 16 bits per block of 32
            block_max = q.abs().view(m, -1, 32).amax(-1)
            assert torch.equal(block_max, torch.where(x.view(m, -1, 32).abs().amax(-1) > 0, levels, 0).to(block_max))
            assert (xq - x.double()).abs().max() <= x.abs().max() / (2 * levels) * 1.001
            want = xq @ qblock.dequantize(blocks, qtype).double().T
            got = qblock._matvec(lib, x, blocks, kind, n)
            assert got.shape == (m, n) and got.dtype == torch.float32
            assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (n, k, kind)


@needs_cpu_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=str)
def test_rows_do_not_depend_on_the_batch(qtype):
    """A row's result is bit-identical alone, in any batch and with any number of threads: a sequence's
    logits do not depend on what else the engine batches with it."""
    assert qblock._kernel() is not None, "the block kernels did not build or failed their self-test"
    w, x = torch.randn(64, 256), torch.randn(17, 256)
    blocks = qblock.quantize(w, qtype)
    batch = qblock.matvec(x, blocks, qtype)
    for i in (0, 5, 16):
        assert torch.equal(qblock.matvec(x[i:i + 1], blocks, qtype)[0], batch[i])
        assert torch.equal(qblock.matvec(x[i:i + 3], blocks, qtype)[0], batch[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(qblock.matvec(x, blocks, qtype), batch)
    finally:
        torch.set_num_threads(threads)


@needs_cpu_kernels
@pytest.mark.parametrize("qtype", TYPES, ids=str)
def test_row_ranges(qtype):
    """corral_q_matvec_rows (what the native decode step calls) fills exactly columns n0..n1-1."""
    lib = qblock._kernel()
    assert lib is not None, "the block kernels did not build or failed their self-test"
    align = lib.corral_q_row_align(int(qtype))
    n, k, m = 6 * align + 3, 64, 3
    w, x = torch.randn(n, k), torch.randn(m, k)
    blocks = qblock.quantize(w, qtype)
    full = qblock.matvec(x, blocks, qtype)
    act = torch.zeros(lib.corral_q_act_bytes(int(qtype), m, k), dtype=torch.uint8)
    lib.corral_q_prepare(int(qtype), x.data_ptr(), act.data_ptr(), m, k)
    y = torch.full((m, n), float("nan"))
    for n0, n1 in [(0, align), (align, 4 * align), (4 * align, n)]:
        lib.corral_q_matvec_rows(int(qtype), act.data_ptr(), blocks.data_ptr(), y.data_ptr(), m, n, k, n0, n1)
    assert torch.equal(y, full)


@pytest.mark.parametrize("qtype", TYPES, ids=str)
def test_block_linear(qtype):
    """Decode-sized inputs through the kernel (the product of the kernel's rounded activations: 16 bits
    for Q8_0, 8 for the 4-bit types), prefill-sized ones through the dequantized weights (the float product), bias and bf16."""
    torch.manual_seed(1)
    w, b = torch.randn(48, 128) * 0.05, torch.randn(48)
    lin = BlockLinear(128, 48, qtype, bias=True)
    lin.weight, lin.bias = qblock.quantize(w, qtype), torch.nn.Parameter(b)
    assert lin.blocks is lin.weight and lin.qtype == qtype
    ref = qblock.dequantize(lin.blocks, qtype)
    prefill = torch.randn(2, 20, 128)  # 40 rows
    assert torch.allclose(lin(prefill), prefill @ ref.T + b, atol=1e-5)
    decode = torch.randn(3, 1, 128)
    lib = qblock._kernel()
    xq = decode if lib is None else quantized_x(lib, qtype, decode.view(3, 128)).float().view(3, 1, 128)
    want = xq @ ref.T + b
    assert torch.allclose(lin(decode), want, atol=1e-5 * want.abs().max().item())
    out = lin(decode.bfloat16())
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), want, atol=0.05 * want.abs().max().item())


@needs_cpu_kernels
def test_block_linear_prefill_in_chunks(monkeypatch):
    """Prefill dequantizes a chunk of rows at a time into the thread's reused buffer: 48 rows in chunks of
    5 (the last one short) give the float product."""
    from corral.engine import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "SCRATCH_ELEMENTS", 5 * 128)
    w = torch.randn(48, 128) * 0.05
    lin = BlockLinear(128, 48, "q4_0")
    lin.weight = qblock.quantize(w, "q4_0")
    x = torch.randn(40, 128)
    with torch.inference_mode():
        got = lin(x)
    assert torch.allclose(got, x @ qblock.dequantize(lin.blocks, "q4_0").T, atol=1e-5)


def test_block_linear_without_the_kernel(no_kernel):
    """Without the compiled kernels every input takes the dequantizing path: the float product."""
    w = torch.randn(40, 64)
    lin = BlockLinear(64, 40, "q4_1")
    lin.weight = qblock.quantize(w, "q4_1")
    x = torch.randn(1, 64)
    assert torch.allclose(lin(x), x @ qblock._dequantize_torch(lin.blocks, QType.Q4_1).T, atol=1e-5)
    assert qblock.kernel_isa() is None
    with pytest.raises(RuntimeError, match="not available"):
        qblock.matvec(x, lin.blocks, "q4_1")


def test_embedding_rows():
    w = torch.randn(50, 64)
    emb = BlockEmbedding(50, 64, "q8_0")
    emb.weight = qblock.quantize(w, "q8_0")
    ids = torch.tensor([[0, 7, 49], [7, 7, 3]])
    assert torch.equal(emb(ids), qblock.dequantize(emb.weight, "q8_0")[ids])


# ---- the interleaved 4-bit layout (groups of 8 rows) ---------------------------------------------------------

FOUR_BIT = [QType.Q4_0, QType.Q4_1]


@pytest.mark.parametrize("qtype", FOUR_BIT, ids=str)
def test_interleave_round_trip(qtype):
    """interleave is a permutation of the bytes: deinterleave gives GGUF's rows back, whole or picked, and
    the interleaved rows dequantize (kernel and torch) to the same numbers. Byte 4i + t of the j-th 32
    nibble bytes of a group's block is row i's nibble byte 4j + t; the group's fp16 d (and m) come first."""
    w = awkward_weight(96, 320)
    blocks = qblock.quantize(w, qtype)
    packed = qblock.interleave(blocks, qtype)
    assert packed.shape == blocks.shape and not torch.equal(packed, blocks)
    assert torch.equal(packed.flatten().sort().values, blocks.flatten().sort().values)
    assert torch.equal(qblock.deinterleave(packed, qtype), blocks)
    ids = torch.tensor([95, 0, 8, 7, 8, 41])
    assert torch.equal(qblock.deinterleave(packed, qtype, ids), blocks[ids])
    bb, header = qtype.block_bytes, 4 if qtype == QType.Q4_1 else 2
    group_block = packed[8:16].reshape(-1)[3 * 8 * bb:4 * 8 * bb]  # group 1, block 3
    row = blocks[8 + 5, 3 * bb:4 * bb]  # its row 5
    assert torch.equal(group_block[2 * 5:2 * 5 + 2], row[:2])  # d
    nibbles = group_block[8 * header:]
    assert torch.equal(nibbles[2 * 32 + 4 * 5:2 * 32 + 4 * 5 + 4], row[header + 8:header + 12])  # j = 2
    want = qblock.dequantize(blocks, qtype)
    assert torch.equal(qblock.dequantize(packed, qtype, interleaved=True), want)
    assert torch.equal(qblock._dequantize_torch(qblock.deinterleave(packed, qtype), qtype), want)
    with pytest.raises(ValueError, match="groups of 8"):
        qblock.interleave(blocks[:12], qtype)
    with pytest.raises(ValueError, match="groups of 8"):
        qblock.interleave(qblock.quantize(w, "q8_0"), "q8_0")


@needs_cpu_kernels
@pytest.mark.parametrize("m", DECODE_ROWS)
@pytest.mark.parametrize("qtype", FOUR_BIT, ids=str)
def test_interleaved_kernel_matches_float64(qtype, m):
    """The interleaved kernel: y = (the kernel's quantized x) @ dequantized W^T in float64 for every decode
    batch size, as the row-by-row kernel (the same integer products, summed in another order)."""
    lib = qblock._kernel()
    assert lib is not None, "the block kernels did not build or failed their self-test"
    for n, k in [(40, 96), (16, 576), (8, 32)]:
        gen = torch.Generator().manual_seed(m * 1000 + n)
        w, x = torch.randn(n, k, generator=gen) * 0.05, torch.randn(m, k, generator=gen)
        x[0, :32] = 0
        blocks = qblock.quantize(w, qtype)
        q, d = prepared(lib, qtype, x)
        want = (q.double() * d.double().repeat_interleave(32, dim=1)) @ qblock.dequantize(blocks, qtype).double().T
        got = qblock.matvec(x, qblock.interleave(blocks, qtype), qtype, interleaved=True)
        assert got.shape == (m, n)
        assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-5 * want.abs().max().item()), (n, k)


@needs_cpu_kernels
@pytest.mark.parametrize("qtype", FOUR_BIT, ids=str)
def test_interleaved_rows_do_not_depend_on_the_batch_or_range(qtype):
    """As the row-by-row kernel: bit-identical alone, in a batch, on 1 thread, and computed group range by
    group range (corral_q_matvec_rows, as the native step calls it)."""
    lib = qblock._kernel()
    assert lib is not None, "the block kernels did not build or failed their self-test"
    kind = int(qtype) | qblock.X8
    assert lib.corral_q_row_align(kind) == 8
    w, x = torch.randn(64, 256), torch.randn(17, 256)
    packed = qblock.interleave(qblock.quantize(w, qtype), qtype)
    batch = qblock.matvec(x, packed, qtype, interleaved=True)
    for i in (0, 5, 16):
        assert torch.equal(qblock.matvec(x[i:i + 1], packed, qtype, interleaved=True)[0], batch[i])
        assert torch.equal(qblock.matvec(x[i:i + 3], packed, qtype, interleaved=True)[0], batch[i])
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert torch.equal(qblock.matvec(x, packed, qtype, interleaved=True), batch)
    finally:
        torch.set_num_threads(threads)
    act = torch.zeros(lib.corral_q_act_bytes(kind, 17, 256), dtype=torch.uint8)
    lib.corral_q_prepare(kind, x.data_ptr(), act.data_ptr(), 17, 256)
    y = torch.full((17, 64), float("nan"))
    for n0, n1 in [(0, 8), (8, 40), (40, 64)]:
        lib.corral_q_matvec_rows(kind, act.data_ptr(), packed.data_ptr(), y.data_ptr(), 17, 64, 256, n0, n1)
    assert torch.equal(y, batch)


@needs_cpu_kernels
def test_every_simd_path_gives_the_same_numbers(tmp_path, monkeypatch):
    """Each SIMD path below the best one this CPU has (CORRAL_CPU_ISA caps the choice; a copy of the
    library per path, as the choice is made once per process) computes the same integers and the same
    float steps: bit-identical to the best path, every type and layout, 1 to 17 rows of x (the AVX-512
    path takes rows of x 8 at a time, the AVX2 one 4 at a time: a row's arithmetic must not depend on it)."""
    import subprocess
    from pathlib import Path

    best = qblock.kernel_isa()
    paths = ["avx2", "avx512vnni"][: ["avx2", "avx512vnni"].index(best) + 1]
    src = Path(qblock.__file__).parent / "kernels"
    gen = torch.Generator().manual_seed(5)
    w, x = torch.randn(40, 256, generator=gen) * 0.05, torch.randn(17, 256, generator=gen)
    layouts = [(qblock.quantize(w, qtype), int(qtype)) for qtype in QType]
    layouts += [(qblock.quantize(w, qtype), int(qtype) | qblock.A16) for qtype in FOUR_BIT]
    layouts += [(qblock.interleave(qblock.quantize(w, qtype), qtype), int(qtype) | qblock.X8) for qtype in FOUR_BIT]
    for isa in paths:
        out = tmp_path / f"{isa}.so"
        subprocess.run([cpu_kernels._compiler(), *cpu_kernels.FLAGS, "-o", str(out), str(src / "qblock.c"),
                        str(src / "pool.c")], check=True)
        monkeypatch.setenv("CORRAL_CPU_ISA", isa)
        lib = ctypes.CDLL(str(out))
        qblock._declare(lib)
        assert lib.corral_q_isa().decode() == isa
        for data, kind in layouts:
            for m in (1, 2, 3, 4, 5, 8, 9, 13, 16, 17):
                assert torch.equal(qblock._matvec(lib, x[:m], data, kind, 40),
                                   qblock._matvec(qblock._kernel(), x[:m], data, kind, 40)), (isa, kind, m)


def test_the_scalar_path_for_other_cpus(tmp_path):
    """qblock.c compiled without AVX2 (what a CPU without it, or another architecture, runs): every type
    and layout against float64, through the same C entry points."""
    import shutil
    import subprocess
    from pathlib import Path

    compiler = shutil.which("gcc") or shutil.which("cc")
    assert compiler, "no C compiler on this machine"
    src = Path(qblock.__file__).parent / "kernels"
    out = tmp_path / "scalar.so"
    subprocess.run([compiler, "-O2", "-pthread", "-shared", "-fPIC", "-o", str(out), str(src / "qblock.c"),
                    str(src / "pool.c")], check=True)
    lib = ctypes.CDLL(str(out))
    qblock._declare(lib)
    assert lib.corral_q_isa() == b"scalar"
    gen = torch.Generator().manual_seed(3)
    w, x = torch.randn(24, 96, generator=gen) * 0.05, torch.randn(3, 96, generator=gen)
    for qtype in QType:
        blocks = qblock.quantize(w, qtype)
        want = quantized_x(lib, qtype, x) @ qblock.dequantize(blocks, qtype).double().T
        layouts = [(blocks, int(qtype))]
        if qtype in FOUR_BIT:
            layouts.append((qblock.interleave(blocks, qtype), int(qtype) | qblock.X8))
        for data, kind in layouts:
            got = qblock._matvec(lib, x, data, kind, 24)
            assert torch.allclose(got.double(), want, rtol=1e-4, atol=1e-4 * want.abs().max().item()), kind
            deq = torch.empty(24, 96)
            lib.corral_q_dequantize_rows(kind, data.data_ptr(), deq.data_ptr(), 24, 96)
            assert torch.equal(deq, qblock._dequantize_torch(blocks, qtype)), kind


@pytest.mark.parametrize("qtype", FOUR_BIT, ids=str)
def test_block_linear_interleaved(qtype):
    """interleave_() repacks in place: decode outputs stay those of the GGUF layout, prefill-sized inputs
    go through the kernel too (each row the product of its own 8-bit activations, bit for bit what the
    row gives alone), `blocks` and the state dict still give GGUF's bytes, and loading a state dict puts
    the module back in GGUF's layout."""
    torch.manual_seed(4)
    lin = BlockLinear(128, 48, qtype, bias=True)
    lin.weight, lin.bias = qblock.quantize(torch.randn(48, 128) * 0.05, qtype), torch.nn.Parameter(torch.randn(48))
    gguf_bytes = lin.weight.clone()
    decode, prefill = torch.randn(3, 128), torch.randn(40, 128)
    with torch.inference_mode():
        before_decode, before_prefill = lin(decode), lin(prefill)
    storage = lin.weight.data_ptr()
    assert lin.interleave_() and lin.interleaved and lin.kernel_type == int(qtype) | qblock.X8
    assert lin.weight.data_ptr() == storage and not torch.equal(lin.weight, gguf_bytes)  # in place
    assert torch.equal(lin.blocks, gguf_bytes) and torch.equal(lin.state_dict()["weight"], gguf_bytes)
    lib = qblock._kernel()
    with torch.inference_mode():
        got = lin(prefill)
        assert torch.allclose(lin(decode), before_decode, atol=1e-5 * before_decode.abs().max().item())
        for i in (0, 17, 39):  # 40 rows, past MATVEC_MAX_ROWS: the same arithmetic as each row alone
            assert torch.equal(lin(prefill[i:i + 1])[0], got[i])
    want = quantized_x(lib, qtype, prefill) @ qblock.dequantize(gguf_bytes, qtype).double().T
    assert torch.allclose(got.double(), want + lin.bias.double(), rtol=1e-5, atol=1e-5 * want.abs().max().item())
    assert torch.allclose(got, before_prefill, atol=0.05 * before_prefill.abs().max().item())  # ~ the float product
    assert torch.equal(lin.dequantized(), qblock.dequantize(gguf_bytes, qtype))
    lin.load_state_dict({"weight": gguf_bytes, "bias": lin.bias.detach()})
    assert not lin.interleaved and torch.equal(lin.weight, gguf_bytes)
    odd = BlockLinear(64, 12, qtype)  # 12 rows: no whole groups
    odd.weight = qblock.quantize(torch.randn(12, 64), qtype)
    assert not odd.interleave_() and odd.kernel_type == int(qtype)


@pytest.mark.parametrize("interleaved", [False, True])
def test_block_linear_passes_gradients_to_its_input(interleaved):
    """An input autograd follows (a LoRA or distillation step through a quantized model) takes the dequantized
    matmul, whose backward gives x's gradient: dL/dx = dL/dy @ W, for decode- and prompt-sized inputs."""
    lin = BlockLinear(64, 16, "q4_0")
    lin.weight = qblock.quantize(torch.randn(16, 64), "q4_0")
    if interleaved:
        assert lin.interleave_()
    w = qblock.dequantize(lin.blocks, "q4_0")
    for rows in (1, 40):
        x = torch.randn(rows, 64, requires_grad=True)
        out = lin(x)
        assert torch.allclose(out, x @ w.T, atol=1e-5)  # the float product, not the kernel's rounding
        out.sum().backward()
        assert torch.allclose(x.grad, torch.ones(rows, 16) @ w, atol=1e-5)


def test_block_linear_interleaved_without_the_kernel(no_kernel):
    lin = BlockLinear(64, 16, "q4_1")
    lin.weight = qblock.quantize(torch.randn(16, 64), "q4_1")
    x = torch.randn(2, 64)
    want = x @ qblock._dequantize_torch(lin.blocks, QType.Q4_1).T
    lin.interleave_()
    assert torch.allclose(lin(x), want, atol=1e-5)


def tiny_transformer(tie: bool = True):
    from corral.models.config import ModelConfig
    from corral.models.llama import Transformer

    torch.manual_seed(0)
    config = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=96, ffn_hidden_dim=128,
                         head_dim=16, tie_embeddings=tie, max_seq_len=64)
    model = Transformer(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1) if p.ndim == 2 else p.fill_(1.0)
    if tie:
        model.output.weight = model.tok_embeddings.weight
    return model.eval()


@pytest.mark.parametrize("qtype", TYPES, ids=str)
def test_quantize_model_blocks(qtype):
    """Every Linear becomes a BlockLinear, the tied embedding reads the head's blocks, and a prefill gives
    the logits of the float model with the dequantized weights."""
    import copy

    model = tiny_transformer()
    ref = copy.deepcopy(model)
    qblock.quantize_model_blocks(model, qtype)
    assert isinstance(model.output, BlockLinear) and isinstance(model.layers[1].feed_forward.w2, BlockLinear)
    assert isinstance(model.tok_embeddings, BlockEmbedding) and model.tok_embeddings.weight is model.output.weight
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.ndim == 2:
                p.copy_(qblock.dequantize(qblock.quantize(p, qtype), qtype))
    toks = torch.randint(0, 96, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(model(toks), ref(toks), atol=1e-4)


@needs_cpu_kernels
def test_interleave_model_with_a_tied_head(monkeypatch):
    """interleave_model repacks the 4-bit layers and the tied embedding follows its head: a prefill's and a
    decode-sized input's logits stay those of the GGUF layout's kernel (the same integer products), and the
    state dict still holds GGUF's bytes."""
    model = tiny_transformer()
    qblock.quantize_model_blocks(model, "q4_0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    toks = torch.randint(0, 96, (1, 40), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        with monkeypatch.context() as m:  # the GGUF layout's kernel for the 40 rows too, as interleaved layers take
            m.setattr(qblock, "MATVEC_MAX_ROWS", 1 << 30)
            want = model(toks)
        want_one = model(toks[:, :1])
    assert qblock.interleave_model(model) == 1 + 2 * 7 and qblock.interleave_model(model) == 0
    assert model.tok_embeddings.interleaved and model.tok_embeddings.weight is model.output.weight
    with torch.no_grad():
        # summed in another order; a last-bit difference can flip the next layer's rounding of x
        assert torch.allclose(model(toks), want, atol=3e-4 * want.abs().max().item())
        assert torch.allclose(model(toks[:, :1]), want_one, atol=3e-4 * want_one.abs().max().item())
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, smollm2_gguf):
    from tests.customize.test_save import make_hf_source

    return make_hf_source(tmp_path_factory.mktemp("qblock"), smollm2_gguf, n_layers=2)[0]


@pytest.mark.parametrize("scheme", ["int4", "q4_1", "q8_0"])
def test_block_checkpoint_saves_and_reloads(tmp_path, hf_source, scheme):
    """`corral quantize --scheme SCHEME` writes the blocks with the scheme in the metadata; the directory
    loads back alone to the logits of quantizing at load time."""
    import json

    from corral.checkpoints import load_model
    from corral.customize.quantize import quantize_checkpoint
    from tests.checkpoints import tiny

    source = hf_source
    out = quantize_checkpoint(source, tmp_path / scheme, scheme, progress=False)
    meta = json.loads((out / "config.json").read_text())["quantization_config"]
    assert meta["scheme"] == scheme and meta["format"] == {"int4": "q4_0"}.get(scheme, scheme)
    reloaded, checkpoint = load_model(out)
    assert checkpoint.quantization == scheme
    wq = reloaded.layers[0].attention.wq
    assert isinstance(wq, BlockLinear) and wq.qtype == QType.of(meta["format"])
    at_load, _ = load_model(source, quantize=scheme)
    toks = torch.randint(0, reloaded.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for n_prefill in (12, 4):  # the prefill path, then decode steps through the kernel
            assert torch.equal(tiny.corral_logits(reloaded, toks, n_prefill), tiny.corral_logits(at_load, toks, n_prefill))


def test_the_cli_and_run_config_accept_the_block_schemes():
    import argparse

    from corral.cli.common import add_model_arguments
    from corral.stack.config import ModelEntry

    p = argparse.ArgumentParser()
    add_model_arguments(p)
    for name in ("int4", "q4_0", "q4_1", "q8_0"):
        assert p.parse_args(["--quantize", name]).quantize == name
        assert ModelEntry(model_id="m", provider_id="inline", quantize=name).quantize == name
@needs_cpu_kernels
def test_declared_c_api():
    """The C functions the native decode step calls exist with these names."""
    lib = cpu_kernels.library()
    assert lib is not None, "the kernel library did not build"
    for name in ("corral_q_act_bytes", "corral_q_prepare", "corral_q_matvec_rows", "corral_q_row_align",
                 "corral_q_matvec", "corral_q_dequantize", "corral_q_dequantize_rows", "corral_q_isa"):
        assert isinstance(getattr(lib, name), ctypes._CFuncPtr)
