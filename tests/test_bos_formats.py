"""Same weights, same tokens, whatever the checkpoint format.

A tiny Llama-3-shaped model is written twice from the same weights: as a Hugging Face checkpoint (safetensors,
tokenizer.json converted from tiktoken the way transformers' Llama 3 converter does it, with <|begin_of_text|>
added by the TemplateProcessing post-processor and no add_bos_token in tokenizer_config.json) and as a Meta
checkpoint (consolidated.00.pth, params.json, tokenizer.model). Its vocabulary is the first 320 BPE ranks of
the real Llama 3 tokenizer.model plus the 256 Llama 3 special tokens (ids 320..575). Raw prompts must encode
and generate alike in both, and like transformers on the Hugging Face directory.
"""

import json
import shutil

import pytest
import torch

from corral.api import LLM
from corral.tokenizer.hf import HFTokenizer
from corral.tokenizer.llama3 import PAT_STR, SPECIAL_TOKENS
from tests.checkpoints import tiny

N_BASE = 320
VOCAB = N_BASE + len(SPECIAL_TOKENS)  # 576
BOS, EOS = N_BASE, N_BASE + 1  # <|begin_of_text|>, <|end_of_text|>
STOPS = [EOS, N_BASE + 8, N_BASE + 9]  # <|end_of_text|>, <|eom_id|>, <|eot_id|>
PROMPTS = ["The capital of France is", "  two spaces, digits 12345 and émoji 🙂", "a\n\nb", "x",
           "<|eot_id|> typed by a user is text"]


def write_tokenizer_model(source, path):
    lines = source.read_text().splitlines()[:N_BASE]
    path.write_text("\n".join(lines) + "\n")
    return path


def hf_tokenizer_object(tokenizer_model, bos: bool = True):
    """tokenizer.json as transformers' convert_llama_weights_to_hf.py writes Llama 3's."""
    from tokenizers import processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    tok = TikTokenConverter(vocab_file=str(tokenizer_model), pattern=PAT_STR,
                            additional_special_tokens=SPECIAL_TOKENS).converted()
    steps = [processors.ByteLevel(trim_offsets=False)]
    if bos:
        steps.append(processors.TemplateProcessing(
            single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
            special_tokens=[("<|begin_of_text|>", BOS)]))
    tok.post_processor = processors.Sequence(steps)
    return tok


def save_hf_tokenizer(tok, directory, **config):
    """Save with transformers, then set (value) or drop (None) tokenizer_config.json fields."""
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                            model_input_names=["input_ids", "attention_mask"]).save_pretrained(directory)
    path = directory / "tokenizer_config.json"
    data = json.loads(path.read_text())
    for key, value in config.items():
        data.pop(key, None) if value is None else data.__setitem__(key, value)
    path.write_text(json.dumps(data))
    return directory


def tiny_model():
    """tiny.hf_model's weights, over the 576-token vocabulary; rope factor 8 (what Meta's params.json implies)."""
    config = tiny.hf_config(factor=8.0)
    config.vocab_size, config.bos_token_id, config.eos_token_id = VOCAB, BOS, STOPS
    return tiny.hf_model(config=config)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, llama3_tokenizer_model):
    root = tmp_path_factory.mktemp("bos")
    tokenizer_model = write_tokenizer_model(llama3_tokenizer_model, root / "tokenizer.model")
    model = tiny_model()
    hf_dir = tiny.write_hf(model, root / "hf")
    save_hf_tokenizer(hf_tokenizer_object(tokenizer_model), hf_dir)
    meta_dir = root / "meta"
    tiny.save_meta_shards(tiny.meta_state_dict(model), meta_dir)
    (meta_dir / "params.json").write_text(json.dumps({**tiny.params_json(), "vocab_size": VOCAB}))
    shutil.copy(tokenizer_model, meta_dir / "tokenizer.model")
    return {"hf": hf_dir, "meta": meta_dir, "tokenizer.model": tokenizer_model}


@pytest.fixture(scope="module")
def llms(checkpoints):
    return {fmt: LLM.load(checkpoints[fmt]) for fmt in ("hf", "meta")}


def transformers_ids(directory, text):
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(directory)
    return ref(text, split_special_tokens=True)["input_ids"]  # special-token text typed in a prompt is text


def test_hf_and_meta_encode_alike(checkpoints, llms):
    hf, meta = llms["hf"], llms["meta"]
    assert type(hf.tokenizer).__name__ == "HFTokenizer" and type(meta.tokenizer).__name__ == "Llama3Tokenizer"
    assert hf.tokenizer.add_bos and hf.tokenizer.bos_id == meta.tokenizer.bos_id == BOS
    for prompt in PROMPTS:
        ids = hf.encode(prompt)
        assert ids[0] == BOS and ids.count(BOS) == 1, prompt
        assert ids == meta.encode(prompt) == transformers_ids(checkpoints["hf"], prompt), prompt
        assert hf.encode(prompt, add_bos=False) == meta.encode(prompt, add_bos=False) == ids[1:]


def test_hf_and_meta_generate_alike(checkpoints, llms):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ref_tok = AutoTokenizer.from_pretrained(checkpoints["hf"])
    ref = AutoModelForCausalLM.from_pretrained(checkpoints["hf"], dtype=torch.float32).eval()
    for prompt in PROMPTS[:4]:
        hf = llms["hf"].generate(prompt, max_tokens=8, temperature=0).token_ids
        meta = llms["meta"].generate(prompt, max_tokens=8, temperature=0).token_ids
        assert hf == meta, prompt
        inputs = ref_tok(prompt, return_tensors="pt")
        with torch.no_grad():
            out = ref.generate(**inputs, max_new_tokens=8, do_sample=False, pad_token_id=EOS)
        new = out[0, inputs["input_ids"].shape[1]:].tolist()
        # transformers keeps the stop token it ended on; Corral's text does not
        assert hf == [t for t in new if t not in STOPS][:len(hf)] and (len(hf) == 8 or new[len(hf)] in STOPS), prompt


@pytest.mark.parametrize("variant", ["llama3", "no_template_processor", "llama_class_no_bos", "llama_class_default",
                                     "model_type_llama", "gpt_neox_class"])
def test_add_bos_follows_transformers(checkpoints, tmp_path, variant):
    """Where BOS comes from, as transformers' AutoTokenizer decides it, for the tokenizer files seen in the wild."""
    from transformers import AutoTokenizer

    tok_model = checkpoints["tokenizer.model"]
    if variant == "llama3":  # Llama 3: TemplateProcessing, no add_bos_token
        save_hf_tokenizer(hf_tokenizer_object(tok_model), tmp_path)
    elif variant == "no_template_processor":  # PreTrainedTokenizerFast ignores add_bos_token
        save_hf_tokenizer(hf_tokenizer_object(tok_model, bos=False), tmp_path, add_bos_token=True)
    elif variant == "llama_class_no_bos":  # LlamaTokenizerFast rebuilds the post-processor from add_bos_token
        save_hf_tokenizer(hf_tokenizer_object(tok_model), tmp_path, tokenizer_class="LlamaTokenizerFast",
                          add_bos_token=False)
    elif variant == "llama_class_default":  # ... which defaults to True
        save_hf_tokenizer(hf_tokenizer_object(tok_model, bos=False), tmp_path, tokenizer_class="LlamaTokenizer",
                          add_bos_token=None)
    elif variant == "model_type_llama":  # no tokenizer_class: the model type's (LlamaTokenizerFast)
        save_hf_tokenizer(hf_tokenizer_object(tok_model, bos=False), tmp_path, tokenizer_class=None)
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    else:  # GPTNeoXTokenizerFast: add_bos_token defaults to False
        save_hf_tokenizer(hf_tokenizer_object(tok_model), tmp_path, tokenizer_class="GPTNeoXTokenizerFast")
    tok = HFTokenizer.from_dir(tmp_path)
    ref = AutoTokenizer.from_pretrained(tmp_path)
    for prompt in PROMPTS[:4]:
        ours = ([tok.bos_id] if tok.add_bos else []) + tok.encode(prompt)
        assert ours == ref(prompt)["input_ids"], (variant, prompt)
    assert tok.add_bos == (variant in ("llama3", "llama_class_default", "model_type_llama"))


def test_smollm2_gguf_keeps_no_bos(smollm2_llm):
    tok = smollm2_llm.tokenizer
    assert tok.add_bos is False and tok.bos_id is not None
    assert smollm2_llm.encode("Hello there") == tok.encode("Hello there")
