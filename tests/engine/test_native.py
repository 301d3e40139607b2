"""The native decode step (corral/engine/native.py, kernels/decode.c) against the eager model.

Each check runs the same engine step twice, on the same KV cache contents: once through the eager
`Transformer.forward` with a PagedBatch, once through the compiled step, and compares the logits of
every sequence (sequences of different lengths, across block boundaries, with grouped-query heads).
"""

from __future__ import annotations

import pytest
import torch

from corral.engine.engine import Engine
from corral.engine.native import NativeDecoder
from corral.engine.quantize import quantize_model_int8
from corral.engine.sampling import SamplingParams

from tests.conftest import needs_cpu_kernels
from tests.engine.test_engine import tiny


def decode_step_both_ways(model, prompts: list[list[int]], kv_dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill the prompts in an engine, then run one all-decode step eagerly and natively. An fp32 KV cache
    unless asked: with fp16 the two paths' keys (equal to ~1e-7) can round to neighbouring halves."""
    engine = Engine(model, kv_cache_mb=8, max_num_seqs=len(prompts), max_batch_tokens=512, kv_dtype=kv_dtype)
    assert engine.cache.k.dtype == kv_dtype
    assert engine.native is not None, "the native decoder must be in use for this model on this machine"
    handles = [engine.submit(p, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)) for p in prompts]
    while any(not h.seq.generated for h in handles):  # prompts in, one token sampled each
        engine.step()
    plan = [(h.seq, 1) for h in handles]
    native = engine.native
    engine.native = None
    eager, rows = engine._forward(plan)
    engine.native = native
    fast, fast_rows = engine._forward(plan)  # writes the same slots again, with its own keys/values
    assert fast_rows == list(range(len(plan)))
    return eager[rows].float(), fast


@needs_cpu_kernels
@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 1}, {"n_kv_heads": 4, "n_heads": 4},
                                       {"tie_embeddings": True}])
def test_fp32_step_equals_eager(overrides):
    model = tiny(**overrides)
    prompts = [[(5 * i + j) % 97 for j in range(n)] for i, n in enumerate((1, 15, 16, 17, 40, 100))]
    eager, fast = decode_step_both_ways(model, prompts)
    assert fast.shape == (6, 97)
    torch.testing.assert_close(fast, eager, rtol=2e-6, atol=1e-4)  # fp32 rounding at |logits| ~ 500


@needs_cpu_kernels
def test_fp16_kv_cache_step_equals_eager():
    """The CPU engine's default cache is fp16: both paths store each key/value rounded to half and attend in
    fp32 over the stored values. A key computed 1e-7 apart in the two paths may round to neighbouring
    halves (a relative 5e-4), hence the looser bound than fp32's; a wrong layout or conversion is off by
    the size of the logits."""
    model = tiny(n_kv_heads=2, n_heads=4)
    assert Engine(model, kv_cache_mb=8).cache.k.dtype == torch.float16  # the default on the CPU
    prompts = [[(5 * i + j) % 97 for j in range(n)] for i, n in enumerate((1, 15, 16, 17, 40, 100, 300))]
    eager, fast = decode_step_both_ways(model, prompts, kv_dtype=torch.float16)
    torch.testing.assert_close(fast, eager, rtol=0, atol=2e-3 * eager.abs().max().item())
    eager32, _ = decode_step_both_ways(model, prompts)
    assert (eager32 - eager).abs().max() > 0  # the cache really stored halves


@needs_cpu_kernels
def test_int8_step_equals_eager():
    model = quantize_model_int8(tiny(seed=1, vocab_size=96))  # the int8 kernel packs rows by 4
    eager, fast = decode_step_both_ways(model, [[1, 2, 3], list(range(50)), list(range(20, 37))])
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-4 * eager.abs().max().item())


@needs_cpu_kernels
@pytest.mark.parametrize("qtype", ["q8_0", "q4_0", "q4_1"])
def test_gguf_block_step_equals_eager(qtype):
    """Both paths run the same block kernel (activations rounded to int16 per block of 32) on the same
    inputs; an output width that is not a multiple of the kernels' 4-row groups included. The native
    decoder repacks the 4-bit layers into the interleaved layout (the head's 98 rows have none)."""
    from corral.engine.qblock import X8, quantize_model_blocks

    model = quantize_model_blocks(tiny(seed=2, vocab_size=98, dim=128, n_heads=4, n_kv_heads=2), qtype)
    assert type(model.layers[0].attention.wq).__name__ == "BlockLinear"
    eager, fast = decode_step_both_ways(model, [[1, 2, 3], list(range(50)), list(range(20, 37))])
    torch.testing.assert_close(fast, eager, rtol=0, atol=1e-4 * eager.abs().max().item())
    four_bit = qtype != "q8_0"
    assert model.layers[1].feed_forward.w2.interleaved == four_bit and not model.output.interleaved
    assert model.layers[1].feed_forward.w2.kernel_type == (X8 if four_bit else 0) | model.output.qtype


@needs_cpu_kernels
@pytest.mark.parametrize("quantize, bits", [(None, 16), (None, 8), ("int8", 8)])
def test_real_model_step_equals_eager_and_greedy_tokens_agree(smollm2_gguf, quantize, bits, monkeypatch):
    """The real Q4_1 file (or int8): one step natively and eagerly, and whole greedy generations. With
    16-bit activations in the 4-bit layers the two paths agree to float noise; with the default 8-bit
    ones the same noise can flip an activation's rounding (as it can in llama.cpp), so the logits agree
    to ~0.5, and the tokens."""
    from corral.checkpoints import load_model
    from corral.engine import qblock

    monkeypatch.setattr(qblock, "Q4_ACTIVATION_BITS", bits)
    model, _ = load_model(smollm2_gguf, quantize=quantize)
    eager, fast = decode_step_both_ways(model, [list(range(100, 140)), list(range(300, 303))])
    w2 = model.layers[1].feed_forward.w2
    assert quantize == "int8" or w2.interleaved == (bits == 8)
    scale = max(1.0, eager.abs().max().item())
    print(f"\n[native] SmolLM2 {quantize or 'Q4_1'} ({bits}-bit activations) step vs eager: max |dlogit| "
          f"{(fast - eager).abs().max():.1e}")
    # int8: 1e-4 of the largest logit; Q4_1 with 16-bit activations: 2e-4 (GGUF's layout, whose float
    # summation order lets the paths' noise grow to ~2.5e-3 over 30 layers); 8-bit: ~2% (a flipped rounding)
    tolerance = 1e-4 if quantize else 2e-4 if bits == 16 else 0.05
    torch.testing.assert_close(fast, eager, rtol=0, atol=tolerance * scale)
    # whole greedy generations, batched, natively and eagerly
    outs = []
    for native in (True, False):
        engine = Engine(model, kv_cache_mb=16, max_num_seqs=3, native=native)
        handles = [engine.submit(list(range(200 + i, 230 + 9 * i)), SamplingParams(temperature=0, max_tokens=24,
                                                                                  ignore_eos=True))
                   for i in range(3)]
        outs.append([[s.token_id for s in h] for h in handles])
    assert outs[0] == outs[1]


def test_eager_fallbacks():
    """bf16 weights, a disabled environment switch or native=False: the engine decodes eagerly."""
    assert Engine(tiny().to(torch.bfloat16), kv_cache_mb=1).native is None
    assert Engine(tiny(), kv_cache_mb=1, native=False).native is None


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("CORRAL_NATIVE_DECODE", "0")
    assert Engine(tiny(), kv_cache_mb=1).native is None


@needs_cpu_kernels
def test_refuses_positions_outside_its_tables():
    model = tiny()
    engine = Engine(model, kv_cache_mb=1)
    decoder = NativeDecoder.build(model, engine.cache)
    with pytest.raises(RuntimeError, match="refused"):
        decoder([1], [40], [[0]])  # position 40 needs a third block of 16


@needs_cpu_kernels
@pytest.mark.parametrize("lengths", [(300,), (450, 3), (200, 130, 64, 65)])
def test_long_contexts_split_across_threads_equal_eager(lengths):
    """Long contexts are attended in splits merged afterwards (flash-decoding); a batch mixes lengths."""
    model = tiny(seed=3, n_kv_heads=1)
    prompts = [[(3 * i + 7 * j) % 97 for j in range(n)] for i, n in enumerate(lengths)]
    eager, fast = decode_step_both_ways(model, prompts)
    torch.testing.assert_close(fast, eager, rtol=2e-6, atol=1e-4)
