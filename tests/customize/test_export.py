"""corral export: the GGUF round-trips through Corral's loader (weights equal gguf's own quantize ->
dequantize of the originals, the recipe kept), and llama.cpp (llama-cpp-python) runs it with the same
greedy tokens as Corral on the same file."""

import gguf
import numpy as np
import pytest
import torch

from corral.checkpoints import CheckpointError, load_checkpoint, load_model, load_tokenizer
from corral.cli.main import main as cli
from corral.customize.export import export_gguf
from tests.customize.test_save import (LOGIT_ATOL, SMOLLM2_VOCAB, corral_logits, make_hf_source, make_meta_source,
                                       sample_tokens)


def reference_roundtrip(w: torch.Tensor, qtype: str) -> torch.Tensor:
    """gguf's own quantizer and dequantizer (llama.cpp's reference algorithms) on a float weight."""
    q = gguf.GGMLQuantizationType[qtype]
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(w.float().numpy(), q), q)).reshape(w.shape)


@pytest.fixture(scope="module")
def hf_source(tmp_path_factory, smollm2_gguf):
    return make_hf_source(tmp_path_factory.mktemp("export"), smollm2_gguf)


def test_f32_round_trip_and_recipe(tmp_path, hf_source):
    source, model = hf_source
    out = export_gguf(source, tmp_path / "m.gguf", type="f32", recipe={"why": "test"}, progress=False)
    checkpoint = load_checkpoint(out)
    assert checkpoint.recipe["why"] == "test" and checkpoint.recipe["type"] == "f32"
    assert checkpoint.config.rope_scaling == model.config.rope_scaling  # rope_freqs tensor read back
    assert checkpoint.config.tie_embeddings and "output.weight" not in checkpoint.state_dict
    reloaded, _ = load_model(out, dtype=torch.float32)
    toks = sample_tokens(SMOLLM2_VOCAB)
    assert (corral_logits(reloaded, toks) - corral_logits(model, toks)).abs().max() <= LOGIT_ATOL
    # the tokenizer in the metadata is the source's: same ids, same chat template
    ours, theirs = load_tokenizer(checkpoint), load_tokenizer(load_checkpoint(source))
    text = "Exported: 1234 tokens, ünïcödé!"
    assert ours.encode(text) == theirs.encode(text)
    assert ours.chat_template == theirs.chat_template and ours.stop_ids == theirs.stop_ids


@pytest.mark.parametrize("qtype", ["F16", "Q8_0", "Q4_0", "Q4_1"])
def test_quantized_weights_equal_ggufs_reference(tmp_path, hf_source, qtype):
    source, model = hf_source
    out = export_gguf(source, tmp_path / "m.gguf", type=qtype.lower(), progress=False)
    checkpoint = load_checkpoint(out)
    assert checkpoint.quantization == (None if qtype == "F16" else qtype)
    for name, w in model.state_dict().items():
        if name == "output.weight":
            continue  # tied
        got = checkpoint.state_dict[name].float()
        if w.ndim == 1:
            assert torch.equal(got, w), name  # norms stay F32
        elif qtype == "F16":
            assert torch.equal(got, w.half().float()), name
        else:
            assert torch.equal(got, reference_roundtrip(w, qtype)), name


def test_meta_source_llama3_tokenizer(tmp_path, llama3_tokenizer_model):
    """Meta's tiktoken vocabulary as tokenizer.ggml.* keys: llama.cpp's "llama-bpe" pre-tokenizer, Llama 3's
    ids. (Checked through the metadata itself: reading a 128k-token GGUF header back costs a minute here.)"""
    from corral.customize.export import tokenizer_fields
    from corral.tokenizer.gguf import tokenizer_from_gguf

    source, _ = make_meta_source(tmp_path, llama3_tokenizer_model)
    checkpoint = load_checkpoint(source)
    fields = tokenizer_fields(checkpoint, 128256)
    assert fields["tokenizer.ggml.pre"] == "llama-bpe"
    assert fields["tokenizer.ggml.eot_token_id"] == 128009 and fields["tokenizer.ggml.bos_token_id"] == 128000
    assert fields["tokenizer.ggml.token_type"][128000] == 3 and fields["tokenizer.ggml.token_type"][1000] == 1
    ours, meta = tokenizer_from_gguf(fields), load_tokenizer(checkpoint)
    for text in ["Hello, world! 12345 ünïcödé", "  indented\n\tcode()", "日本語 🙂"]:
        assert ours.encode(text) == meta.encode(text)
    assert ours.stop_ids == meta.stop_ids


def test_cli_errors(tmp_path, hf_source, capsys):
    source, _ = hf_source
    assert cli(["export", str(tmp_path / "nope"), str(tmp_path / "x.gguf")]) == 1
    assert "nope: no such file or directory" in capsys.readouterr().err
    assert cli(["export", str(source), str(tmp_path / "x.bin")]) == 1
    assert "must end in .gguf" in capsys.readouterr().err
    (tmp_path / "x.gguf").write_text("")
    assert cli(["export", str(source), str(tmp_path / "x.gguf")]) == 1
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["export", str(source), str(tmp_path / "y.gguf"), "--type", "q2_k"])
    with pytest.raises(CheckpointError, match="no such directory"):
        export_gguf(source, tmp_path / "missing" / "y.gguf")


# ---- llama.cpp ------------------------------------------------------------------------------------------

NEAR_TIE = 0.1  # logits: closer top-two than this and rounding decides the greedy token


def corral_greedy(model, ids: list[int], n: int, forced: list[int] | None = None) -> tuple[list[int], list[float]]:
    """Corral's greedy tokens and, at each step, the margin between its top two logits. With forced, the
    given tokens are fed instead of Corral's own choices (to follow another engine's sequence)."""
    model.setup_caches(1, len(ids) + n)
    out, margins = [], []
    with torch.no_grad():
        logits = model(torch.tensor([ids]), torch.arange(len(ids)), last_only=True)
        for pos in range(len(ids), len(ids) + n):
            top = logits[0, -1].topk(2)
            out.append(int(top.indices[0]))
            margins.append(float(top.values[0] - top.values[1]))
            nxt = forced[len(out) - 1] if forced else out[-1]
            logits = model(torch.tensor([[nxt]]), torch.tensor([pos]))
    model.clear_caches()
    return out, margins


def assert_same_greedy(model, ids: list[int], theirs: list[int]) -> int:
    """llama.cpp's greedy tokens equal Corral's, step by step along llama.cpp's sequence, except where
    Corral's own top two are a near-tie (llama.cpp's CPU matmuls round activations to 8 or 16 bits, so a
    near-tie may go either way); returns how many steps were exact."""
    ours, margins = corral_greedy(model, ids, len(theirs), forced=theirs)
    exact = 0
    for step, (a, b, margin) in enumerate(zip(ours, theirs, margins)):
        if a == b:
            exact += 1
        else:
            assert margin < NEAR_TIE, f"step {step}: Corral picks {a}, llama.cpp {b}; Corral's margin {margin:.3f}"
    return exact


def llama_cpp_greedy(path, ids: list[int], n: int) -> tuple[list[int], object]:
    from llama_cpp import Llama  # llama-cpp-python, the `export` extra

    llm = Llama(str(path), n_ctx=len(ids) + n + 8, n_threads=2, n_threads_batch=2, verbose=False)
    out = []
    for tok in llm.generate(ids, temp=0.0, top_k=1, reset=True):
        out.append(int(tok))
        if len(out) == n:
            break
    return out, llm


@pytest.mark.parametrize("qtype", ["f16", "q4_0"])
def test_llama_cpp_same_greedy_tokens_real_smollm2(tmp_path, smollm2_gguf, qtype):
    """The real SmolLM2 exported by Corral: llama.cpp picks Corral's greedy tokens (20 steps)."""
    out = export_gguf(smollm2_gguf, tmp_path / f"smollm2-{qtype}.gguf", type=qtype, progress=False)
    model, checkpoint = load_model(out, dtype=torch.float32)
    tok = load_tokenizer(checkpoint)
    text = "The three primary colors are"
    ids = tok.encode(text)
    theirs, llm = llama_cpp_greedy(out, ids, 20)
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids  # the tokenizer metadata works
    exact = assert_same_greedy(model, ids, theirs)
    assert exact >= 18, f"only {exact}/20 steps agree"


@pytest.mark.parametrize("qtype", ["f32", "q8_0", "q4_0", "q4_1"])
def test_llama_cpp_logits_tiny(tmp_path, hf_source, qtype):
    """A tiny random model in each type: llama.cpp's logits over a prompt equal Corral's on the same file
    (a q/k layout or rope mistake shows as differences of the logits' own size)."""
    source, _ = hf_source
    out = export_gguf(source, tmp_path / f"tiny-{qtype}.gguf", type=qtype, progress=False)
    model, _ = load_model(out, dtype=torch.float32)
    ids = sample_tokens(SMOLLM2_VOCAB, n=40, batch=1)[0].tolist()
    from llama_cpp import Llama

    llm = Llama(str(out), n_ctx=64, n_threads=2, logits_all=True, verbose=False)
    llm.eval(ids)
    theirs = torch.from_numpy(np.array(llm.scores[:len(ids)]))
    ours = corral_logits(model, torch.tensor([ids]))[0]
    diff = (theirs - ours).abs().max().item()
    # llama.cpp keeps its KV cache in fp16 and rounds activations to 8 bits for quantized matmuls
    print(f"\n[llama.cpp] {qtype}: max logit diff {diff:.4f}, logits up to {ours.abs().max().item():.2f}")
    tolerance = (0.002 if qtype == "f32" else 0.02) * ours.abs().max().item()
    assert diff <= tolerance, f"max logit difference {diff:.4f} > {tolerance:.4f}"
    assert torch.equal(theirs.argmax(-1)[ours.topk(2).values.diff().abs().squeeze(-1) > NEAR_TIE],
                       ours.argmax(-1)[ours.topk(2).values.diff().abs().squeeze(-1) > NEAR_TIE])
