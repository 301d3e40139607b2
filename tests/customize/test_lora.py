"""LoRA: Corral's adapter equals the merged model and PEFT on the same adapter files.

The base is a tiny HF checkpoint (GQA: 8 heads, 2 kv heads, so q and k rows are permuted differently);
the adapter covers every projection, with random A and B, so a mistake in the q/k row order, the
scaling or a module name would show in the logits.
"""

import json

import pytest
import torch

from corral.checkpoints import load_checkpoint, load_model
from corral.customize.lora import (LoRAConfig, AdapterError, apply_lora, load_adapter, lora_modules, merge_lora,
                                   save_adapter)
from corral.customize.finetune import merge
from tests.checkpoints import tiny
from tests.customize.tiny_chat import write_tiny_chat_model
from tests.customize.tiny_chat import one_thread  # noqa: F401 (an autouse fixture: one torch thread)

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATOL = 1e-4


@pytest.fixture(scope="module")
def base(tmp_path_factory, llama3_tokenizer_model):
    return write_tiny_chat_model(tmp_path_factory.mktemp("lora") / "base", llama3_tokenizer_model)


@pytest.fixture(scope="module")
def adapter(base, tmp_path_factory):
    """A LoRA model with random A and B on every projection, its logits, and the saved adapter."""
    model, _ = load_model(base, dtype=torch.float32)
    cfg = LoRAConfig(rank=4, alpha=8.0, targets=ALL)
    apply_lora(model, cfg)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.copy_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    toks = tiny.tokens(2, 24) % 576
    logits = model(toks)
    out = save_adapter(tmp_path_factory.mktemp("lora") / "adapter", model, cfg, base_model=str(base))
    return {"dir": out, "model": model, "tokens": toks, "logits": logits.detach()}


def test_fresh_adapter_changes_nothing(base):
    model, _ = load_model(base, dtype=torch.float32)
    toks = tiny.tokens(1, 16) % 576
    before = model(toks)
    apply_lora(model, LoRAConfig(rank=8, targets=("q_proj", "v_proj")))
    assert torch.equal(model(toks), before)  # B = 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    assert len(trainable) == 2 * 2 * 3  # A and B, 2 targets, 3 layers


def test_adapter_files_are_peft_format(adapter):
    cfg = json.loads((adapter["dir"] / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    from safetensors import safe_open

    with safe_open(adapter["dir"] / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight" in keys
    assert len(keys) == 3 * 7 * 2


def test_merged_model_equals_adapter(adapter):
    model = adapter["model"]
    merged = merge_lora(model)
    assert not lora_modules(merged)
    diff = (merged(adapter["tokens"]) - adapter["logits"]).abs().max().item()
    assert diff <= ATOL, diff


def test_peft_equals_corral(base, adapter):
    """transformers' LlamaForCausalLM + PeftModel.from_pretrained on our files = Corral's LoRA model."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32, attn_implementation="eager").eval()
    peft_model = PeftModel.from_pretrained(hf, adapter["dir"]).eval()
    with torch.no_grad():
        ref = peft_model(adapter["tokens"]).logits.float()
    diff = (ref - adapter["logits"]).abs().max().item()
    print(f"\n[lora] peft vs corral: max abs logit diff {diff:.2e}")
    assert diff <= ATOL, diff


def test_peft_written_adapter_loads_in_corral(base, tmp_path):
    """The other direction: an adapter that PEFT itself trains and saves, merged by Corral, equals PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    hf = LlamaForCausalLM.from_pretrained(base, torch_dtype=torch.float32, attn_implementation="eager").eval()
    peft_model = get_peft_model(hf, LoraConfig(r=2, lora_alpha=5, target_modules=["q_proj", "k_proj", "up_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.1 * torch.randn_like(p))
    peft_model.save_pretrained(tmp_path / "peft")
    toks = tiny.tokens(1, 20) % 576
    with torch.no_grad():
        ref = peft_model.eval()(toks).logits.float()
    out = merge(base, tmp_path / "peft", tmp_path / "merged")
    ours, _ = load_model(out, dtype=torch.float32)
    diff = (ours(toks) - ref).abs().max().item()
    assert diff <= ATOL, diff


def test_corral_merge_checkpoint(base, adapter, tmp_path):
    """`merge` writes a HF checkpoint that Corral and transformers both load with the adapter's logits."""
    from transformers import LlamaForCausalLM

    out = merge(base, adapter["dir"], tmp_path / "merged")
    ours, ckpt = load_model(out, dtype=torch.float32)
    assert (ours(adapter["tokens"]) - adapter["logits"]).abs().max().item() <= ATOL
    hf = LlamaForCausalLM.from_pretrained(out, torch_dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        ref = hf(adapter["tokens"]).logits.float()
    assert (ref - adapter["logits"]).abs().max().item() <= ATOL
    from corral.checkpoints.save import read_recipe

    recipe = read_recipe(load_checkpoint(out))
    assert recipe["command"] == "merge" and recipe["lora"]["rank"] == 4


def test_llm_load_with_adapter(base, adapter):
    """The engine merges the adapter at load time: greedy logits through the engine path match."""
    from corral.api import LLM

    llm = LLM.load(base, dtype="fp32", adapter=adapter["dir"])
    assert (llm.model(adapter["tokens"]) - adapter["logits"]).abs().max().item() <= ATOL
    for scheme in ("int8", "int4"):  # merged first, then quantized
        q = LLM.load(base, adapter=adapter["dir"], quantize=scheme)
        assert q.generate("hello", max_tokens=3, temperature=0).completion_tokens >= 1
        err = (q.model(adapter["tokens"]) - adapter["logits"]).abs().max().item()
        assert err < 0.1 * adapter["logits"].abs().max().item(), (scheme, err)


def test_adapter_errors(base, tmp_path):
    config = load_checkpoint(base).config
    with pytest.raises(AdapterError, match="no such adapter"):
        load_adapter(tmp_path / "missing", config)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text("{not json")
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(b"")
    with pytest.raises(AdapterError, match="not valid JSON"):
        load_adapter(tmp_path / "bad", config)
    with pytest.raises(ValueError, match="unknown LoRA target"):
        LoRAConfig(targets=("qkv",))


def test_run_config_adapter(base, adapter, tmp_path):
    """`adapter:` in a run-config model entry reaches the inline engine's LLM.load; remote models refuse it."""
    from corral.stack.config import ConfigError, load_run_config
    from corral.stack.providers.inline import ModelWorker

    path = tmp_path / "run.yaml"
    path.write_text(f"""
providers:
  - {{provider_id: corral, provider_type: "inline::corral"}}
models:
  - {{model_id: tuned, provider_id: corral, checkpoint: "{base}", adapter: "{adapter['dir']}", dtype: fp32}}
""")
    entry = load_run_config(path).models[0]
    assert entry.adapter == str(adapter["dir"])
    worker = ModelWorker(entry, max_queue=1)
    worker.load()
    assert (worker.llm.model(adapter["tokens"]) - adapter["logits"]).abs().max().item() <= ATOL
    worker.shutdown()
    path.write_text("""
providers:
  - {provider_id: vllm, provider_type: "remote::openai-compatible", config: {base_url: "http://x:1/v1"}}
models:
  - {model_id: m, provider_id: vllm, adapter: /some/dir}
""")
    with pytest.raises(ConfigError, match="adapter: only inline::corral models"):
        load_run_config(path)
