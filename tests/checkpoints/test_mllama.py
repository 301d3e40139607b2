"""Vision checkpoints: HF safetensors (sharded, as transformers writes them) and Meta consolidated
(one shard and model-parallel shards) of the same tiny weights load to the same canonical state dict
and give identical logits; int8 loading; clear errors for bad files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from corral.checkpoints import load_checkpoint, load_model
from corral.checkpoints.errors import CheckpointError
from corral.checkpoints.mllama import (config_from_hf, config_from_params, load_mllama_checkpoint,
                                       load_mllama_model, to_hf_state_dict, to_meta_state_dict)
from corral.engine.quantize import Int8Linear, int8_linear_names, quantize_weight
from corral.models.image import preprocess_images
from tests.checkpoints.tiny import save_meta_shards
from tests.models.test_vision import TILE, VOCAB, hf_config_dict, prompt, random_images, random_model

META_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
             "original_max_position_embeddings": 8192}
PARAMS = {"dim": 64, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2, "vocab_size": VOCAB, "multiple_of": 32,
          "ffn_dim_multiplier": None, "norm_eps": 1e-5, "rope_theta": 500000.0, "use_scaled_rope": True,
          "vision_chunk_size": TILE, "vision_max_num_chunks": 4, "vision_num_cross_attention_layers": 2,
          # Corral extension: Meta hard-codes the encoder's numbers, a tiny encoder must state them.
          "vision": {"patch_size": 14, "width": 32, "layers": 4, "global_layers": 2, "heads": 2, "mlp_dim": 64,
                     "intermediate_layers": [0, 2]}}


def hf_cfg() -> dict:
    cfg = hf_config_dict()
    cfg["text_config"]["rope_scaling"] = META_ROPE  # the rope Meta's use_scaled_rope means
    return cfg


@pytest.fixture(scope="module")
def reference():
    config = config_from_hf(hf_cfg(), "test")
    model = random_model(config, seed=5)
    return model, {k: v.clone() for k, v in model.state_dict().items()}


def write_hf(directory, state_dict, config, n_shards=2):
    """Sharded safetensors with an index, on-disk (hub) names."""
    directory.mkdir(parents=True, exist_ok=True)
    hf = to_hf_state_dict(state_dict, config)
    names = sorted(hf)
    weight_map = {}
    for i in range(n_shards):
        part = names[i::n_shards]
        file = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file({k: hf[k].contiguous() for k in part}, str(directory / file))
        weight_map.update({k: file for k in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(hf_cfg()))
    return directory


def write_meta(directory, state_dict, config, n_shards=1):
    meta = to_meta_state_dict(state_dict, config)
    meta["text_model.rope.freqs"] = torch.zeros(8)  # present in Meta files, dropped by the loader
    save_meta_shards(meta, directory, n_shards)
    (directory / "params.json").write_text(json.dumps(PARAMS))
    return directory


def logits(model, tokens, images):
    with torch.no_grad():
        model.set_images(preprocess_images(images, TILE, 4), tokens)
        out = model(torch.tensor([tokens]))
        model.clear_images()
    return out


def test_hf_and_meta_formats_give_identical_logits(tmp_path, reference):
    model, sd = reference
    config = model.config
    hf_dir = write_hf(tmp_path / "hf", sd, config)
    meta_dir = write_meta(tmp_path / "meta", sd, config)
    meta8_dir = write_meta(tmp_path / "meta_mp2", sd, config, n_shards=2)

    tokens, images = prompt([3, 10], 18), random_images([(50, 50), (100, 20)])
    expected = logits(model, tokens, images)
    for directory, fmt in ((hf_dir, "hf"), (meta_dir, "meta"), (meta8_dir, "meta")):
        ckpt = load_checkpoint(directory)  # the generic entry point delegates to mllama.py
        assert ckpt.format == fmt and ckpt.config.family == "mllama"
        assert ckpt.state_dict.keys() == sd.keys()
        for name, w in sd.items():
            assert torch.equal(ckpt.state_dict[name], w), name
        loaded, _ = load_model(directory, dtype=torch.float32)
        assert torch.equal(logits(loaded, tokens, images), expected)


def test_transformers_save_pretrained_loads(tmp_path, reference):
    """The files transformers itself writes (its names, its config.json) load to the same weights."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    model, sd = reference
    cfg = hf_cfg()
    hf = MllamaForConditionalGeneration(MllamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}))
    renamed = {}
    for k, v in to_hf_state_dict(sd, model.config).items():
        k = k.replace("language_model.model.", "model.language_model.", 1).replace("language_model.lm_head.", "lm_head.", 1)
        renamed["model." + k if k.startswith(("vision_model.", "multi_modal_projector.")) else k] = v
    hf.load_state_dict(renamed, strict=False)
    hf.save_pretrained(tmp_path / "saved", max_shard_size="500KB")
    assert len(list((tmp_path / "saved").glob("*.safetensors"))) > 1
    ckpt = load_mllama_checkpoint(tmp_path / "saved")
    assert ckpt.state_dict.keys() == sd.keys()
    for name, w in sd.items():
        assert torch.equal(ckpt.state_dict[name], w), name


def test_int8_load(tmp_path, reference):
    model, sd = reference
    directory = write_hf(tmp_path / "hf", sd, model.config)
    q, _ = load_mllama_model(directory, dtype=torch.float32, int8=True)
    assert isinstance(q.text_model.layers[0].attention.wq, Int8Linear)
    assert isinstance(q.vision_model.vision_encoder.transformer.resblocks[0].mlp.c_fc, Int8Linear)
    assert q.text_model.layers[0].attention.wq.weight.dtype == torch.int8
    assert isinstance(q.text_model.output, Int8Linear)  # the head too: the largest matrix of a decode step
    # Reference: the float model with every quantized weight replaced by its dequantized value.
    fake = random_model(model.config, seed=5)
    fake.load_state_dict(sd)
    with torch.no_grad():
        for name in int8_linear_names(fake):
            lin = fake.get_submodule(name)
            qw, scales = quantize_weight(lin.weight, torch.float32)
            lin.weight.copy_(qw.float() * scales[:, None])
    tokens, images = prompt([0], 12), random_images([(50, 50)])
    ref, fq, got = logits(model, tokens, images), logits(fake, tokens, images), logits(q, tokens, images)
    assert (got - fq).abs().max().item() < 1e-4
    # The common entry point streams the same way for a vision checkpoint.
    via_load_model, checkpoint = load_model(directory, dtype=torch.float32, quantize="int8")
    assert isinstance(via_load_model.text_model.layers[0].attention.wq, Int8Linear)
    assert checkpoint.quantization == "int8"
    # equal up to rounding: one of the two may run Corral's packed kernel, the other torch's int8 path
    torch.testing.assert_close(logits(via_load_model, tokens, images), got, atol=1e-5, rtol=1e-5)
    rel = ((got - ref).norm() / ref.norm()).item()  # int8 error on these random weights: ~2.5%
    assert 0 < rel < 0.05, rel


def test_bad_checkpoints_are_clear_errors(tmp_path, reference):
    model, sd = reference
    broken = {k: v for k, v in sd.items() if "cross_attention_layers.1.gate_attn" not in k}
    with pytest.raises(CheckpointError, match="missing.*cross_attention_layers.1.gate_attn"):
        load_checkpoint(write_hf(tmp_path / "missing", broken, model.config, n_shards=1))

    # A tile-embedding table whose aspect ratios disagree on a canvas cell cannot come from Meta's grid.
    d = write_hf(tmp_path / "tiles", sd, model.config, n_shards=1)
    from safetensors.torch import load_file

    file = d / "model-00001-of-00001.safetensors"
    tensors = load_file(str(file))
    tensors["vision_model.pre_tile_positional_embedding.embedding.weight"][2] += 1.0
    save_file(tensors, str(file))
    with pytest.raises(CheckpointError, match="pre_tile_positional_embedding.*disagrees"):
        load_checkpoint(d)

    bad = dict(hf_cfg(), image_token_index=7)
    (d / "config.json").write_text(json.dumps(bad))
    with pytest.raises(CheckpointError, match="image_token_index=7"):
        load_checkpoint(d)

    m = write_meta(tmp_path / "meta", sd, model.config)
    (m / "params.json").write_text(json.dumps({**PARAMS, "vision_num_cross_attention_layers": 0,
                                               "vision_chunk_size": TILE}))
    with pytest.raises(CheckpointError, match="vision_num_cross_attention_layers"):
        load_mllama_checkpoint(m)


def test_hub_config_matches_the_registry():
    """The config.json of meta-llama/Llama-3.2-11B-Vision-Instruct (as on the hub) gives the registry's
    numbers: Meta's fusion schedule from HF's merged indices [3, 8, ..., 38], rope factor 8, 560 px tiles."""
    from corral.checkpoints.mllama import _registry_extras
    from corral.models.config import get_config
    from corral.models.vision import VisionArgs

    hub = {
        "model_type": "mllama", "image_token_index": 128256,
        "text_config": {"vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 40,
                        "cross_attention_layers": [3, 8, 13, 18, 23, 28, 33, 38], "num_attention_heads": 32,
                        "num_key_value_heads": 8, "intermediate_size": 14336, "rope_theta": 500000.0,
                        "rms_norm_eps": 1e-05, "max_position_embeddings": 131072, "rope_scaling": META_ROPE},
        "vision_config": {"attention_heads": 16, "hidden_act": "gelu", "hidden_size": 1280, "image_size": 560,
                          "intermediate_layers_indices": [3, 7, 15, 23, 30], "intermediate_size": 5120,
                          "max_num_tiles": 4, "norm_eps": 1e-05, "num_channels": 3, "num_global_layers": 8,
                          "num_hidden_layers": 32, "patch_size": 14, "vision_output_dim": 7680,
                          "supported_aspect_ratios": [[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1], [4, 1]]},
    }
    config = _registry_extras(config_from_hf(hub, "config.json"), "Llama-3.2-11B-Vision-Instruct")
    entry = get_config("Llama-3.2-11B-Vision-Instruct")
    assert config.name == entry.name and config.chat_format == "llama3" and config.tool_format == "json"
    assert VisionArgs.from_config(config) == VisionArgs.from_config(entry)
    assert (config.dim, config.n_layers, config.ffn_hidden_dim, config.rope_scaling) == \
        (entry.dim, entry.n_layers, entry.ffn_hidden_dim, entry.rope_scaling)


def test_llm_chat_with_images_end_to_end(tmp_path):
    """A Meta vision checkpoint with the real tokenizer through `corral.api.LLM`: chat with an image gives
    the tokens of the model driven by Meta's own ChatFormat prompt; the next text-only request does not
    see the previous request's image; tools with images are refused (Meta: not supported)."""
    import io
    import shutil
    from pathlib import Path

    import llama_models
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from corral.api import LLM
    from corral.engine.generate import generate_tokens
    from corral.engine.sampling import SamplingParams

    params = {**PARAMS, "vocab_size": 128256}  # the real vocabulary, so the real tokenizer fits
    config = config_from_params(params, Path("params.json"))
    model = random_model(config, seed=9)
    directory = write_meta(tmp_path / "vision", model.state_dict(), config)
    (directory / "params.json").write_text(json.dumps(params))
    tokenizer_model = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    shutil.copy(tokenizer_model, directory / "tokenizer.model")
    llm = LLM.load(directory, dtype="fp32")

    image = random_images([(50, 50)])[0]
    buf = io.BytesIO()
    image.save(buf, "PNG")
    question = "What is in this picture?"
    messages = [{"role": "user", "content": [{"type": "image", "image": buf.getvalue()},
                                             {"type": "text", "text": question}]}]
    sampling = dict(max_tokens=5, temperature=0, ignore_eos=True)
    got = llm.chat(messages, **sampling).token_ids

    meta_input = ChatFormat(MetaTokenizer(tokenizer_model)).encode_dialog_prompt(
        [RawMessage(role="user", content=[RawMediaItem(data=buf.getvalue()), RawTextItem(text=question)])])
    ids = [128011 if t == 128256 else t for t in meta_input.tokens]  # the engine takes ids below the vocabulary
    expected = [s.token_id for s in generate_tokens(model, ids, SamplingParams(**sampling),
                                                    cross_state=model.encode_images([image], ids))]
    assert got == expected

    # A raw completion as for the base models: `<|begin_of_text|><|image|>If I had to write a haiku ...`.
    haiku = "If I had to write a haiku for this one"
    got = llm.generate("<|image|>" + haiku, images=[image], **sampling).token_ids
    meta_input = ChatFormat(MetaTokenizer(tokenizer_model)).encode_content(
        [RawMediaItem(data=buf.getvalue()), RawTextItem(text=haiku)])
    ids = [128011 if t == 128256 else t for t in meta_input.tokens]
    assert got == [s.token_id for s in generate_tokens(model, ids, SamplingParams(**sampling),
                                                       cross_state=model.encode_images([image], ids))]

    text_only = [{"role": "user", "content": question}]
    ids = llm.encode_chat(text_only)
    expected = [s.token_id for s in generate_tokens(model, ids, SamplingParams(**sampling))]
    assert llm.chat(text_only, **sampling).token_ids == expected

    tools = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object",
                                                                                              "properties": {}}}}]
    with pytest.raises(ValueError, match="images"):
        llm.chat(messages, tools=tools, **sampling)

    # The command line: `corral generate MODEL PROMPT --image PATH` and `/image PATH` inside `corral chat`.
    import contextlib

    from corral.cli import chat as chat_cli
    from corral.cli import generate as generate_cli

    path = tmp_path / "picture.png"
    path.write_bytes(buf.getvalue())
    reply = llm.chat([{"role": "user", "content": [{"type": "image", "image": str(path)},
                                                   {"type": "text", "text": question}]}], **sampling).text
    flags = ["--dtype", "fp32", "--temperature", "0", "--max-tokens", "5", "--ignore-eos"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        generate_cli.main([str(directory), question, "--image", str(path), "--json", *flags])
    assert json.loads(out.getvalue().strip().splitlines()[-1])["text"] == reply

    stdin = io.StringIO(f"/image {tmp_path / 'missing.png'}\n/image {path}\n{question}\n/exit\n")
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        import sys

        old, sys.stdin = sys.stdin, stdin
        try:
            chat_cli.main([str(directory), *flags])
        finally:
            sys.stdin = old
    assert "no such file" in err.getvalue()
    assert out.getvalue().strip() == reply.strip()
