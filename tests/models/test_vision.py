"""Llama 3.2 Vision parity against Hugging Face's MllamaForConditionalGeneration (tiny config, fp32).

The same random weights (every gate non-zero, so gated paths contribute) are loaded into both models
through Corral's own HF converter. Logits are compared on the rows where Meta's reference and Hugging
Face agree: from the first `<|image|>` on. Rows before the first image follow Meta (no cross-attention
contribution), which we check against a text-only run (Meta's `text_only_inference`), and we check
that HF 4.57 really differs there (transformers #39379).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from corral.checkpoints.mllama import config_from_hf, to_hf_state_dict
from corral.models.image import preprocess_images
from corral.models.vision import MllamaTransformer, VisionArgs, fusion_schedule, image_spans


VOCAB = 512
PLACEHOLDER = VOCAB - 1  # plays the part of Meta's 128011: the id our tokenizer writes for <|image|>
TILE = 28  # 2x2 patches of 14 + CLS = 5 tokens per tile, padded to 8 inside the encoder
ATOL = 1e-4


def hf_config_dict() -> dict:
    return {
        "model_type": "mllama",
        "image_token_index": VOCAB,
        "text_config": dict(vocab_size=VOCAB, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                            intermediate_size=192, num_hidden_layers=6, cross_attention_layers=[1, 4],
                            rope_theta=500000.0, rms_norm_eps=1e-5, max_position_embeddings=256, pad_token_id=0,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
        "vision_config": dict(hidden_size=32, num_attention_heads=2, intermediate_size=64, num_hidden_layers=4,
                              num_global_layers=2, intermediate_layers_indices=[0, 2], vision_output_dim=96,
                              image_size=TILE, patch_size=14, max_num_tiles=4, norm_eps=1e-5),
    }


def ours_config(cfg: dict):
    """Our config for the HF tiny config. transformers 4.57.1 returns the *outputs* of the layers
    listed in intermediate_layers_indices (its encoder records states after each layer; fixed by
    huggingface/transformers#39785), Meta the *inputs*: output of layer i = input of layer i + 1."""
    config = config_from_hf(cfg, "test")
    vision = dict(config.vision, intermediate_layers=[i + 1 for i in config.vision["intermediate_layers"]],
                  image_placeholder_id=PLACEHOLDER)
    return config.replace(vision=vision)


def random_model(config, seed: int = 0) -> MllamaTransformer:
    torch.manual_seed(seed)
    model = MllamaTransformer(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight")):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif name.rsplit(".", 1)[-1] in ("gate", "gate_attn", "gate_ffn", "gate_ffwd", "gated_positional_embedding_gate"):
                p.copy_(0.5 + 0.5 * torch.rand_like(p))  # tanh(gate) well away from 0
            else:
                p.copy_(0.08 * torch.randn_like(p))
        # Canvas cells that no aspect ratio uses ((r+1)*(c+1) > max tiles) are never read and HF's
        # per-aspect-ratio tables cannot hold them: zero, so both formats carry the same weights.
        enc = model.vision_model.vision_encoder
        n = enc.args.max_num_tiles
        for grid in (enc.gated_positional_embedding, enc.pre_tile_pos_embed.embedding, enc.post_tile_pos_embed.embedding):
            for r in range(n):
                for c in range(n):
                    if (r + 1) * (c + 1) > n:
                        grid[r, c] = 0
    return model.eval()


@pytest.fixture(scope="module")
def models():
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    cfg = hf_config_dict()
    config = ours_config(cfg)
    ours = random_model(config)
    hf_config = MllamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"})
    hf_config._attn_implementation = "eager"
    hf_config.text_config._attn_implementation = "eager"
    hf_config.vision_config._attn_implementation = "eager"
    hf = MllamaForConditionalGeneration(hf_config).eval()
    hf_sd = to_hf_state_dict(ours.state_dict(), config)
    # transformers >= 4.52 names the modules model.language_model / model.vision_model in memory.
    renamed = {}
    for k, v in hf_sd.items():
        k = k.replace("language_model.model.", "model.language_model.", 1).replace("language_model.lm_head.", "lm_head.", 1)
        if k.startswith(("vision_model.", "multi_modal_projector.")):
            k = "model." + k
        renamed[k] = v
    missing, unexpected = hf.load_state_dict(renamed, strict=False)
    assert not unexpected and not [m for m in missing if "rotary" not in m], (missing, unexpected)
    return ours, hf, config


def random_images(sizes, seed=1):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]


def hf_inputs(tokens: list[int], batch, n_tiles: int = 4):
    spans = image_spans(tokens, (VOCAB,))
    mask = torch.zeros(1, len(tokens), len(spans), n_tiles, dtype=torch.long)
    for k, (start, end) in enumerate(spans):
        n_real = int(batch.aspect_ratios[0, k].prod())
        mask[0, start: len(tokens) if end == -1 else end, k, :n_real] = 1
    return dict(input_ids=torch.tensor([tokens]), pixel_values=batch.pixel_values,
                aspect_ratio_ids=batch.aspect_ratio_ids, aspect_ratio_mask=batch.aspect_ratio_mask,
                cross_attention_mask=mask)


def prompt(image_slots: list[int], length: int, seed=3) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, PLACEHOLDER, (length,), generator=g).tolist()
    tokens[0] = 1
    for p in image_slots:
        tokens[p] = VOCAB
    return tokens


def test_fusion_schedule_and_spans():
    assert fusion_schedule(32, 8) == [3, 7, 11, 15, 19, 23, 27, 31]
    assert fusion_schedule(80, 20) == list(range(3, 80, 4))
    img = 9
    # spec §8.2 item 2 (Meta create_vision_mask)
    assert image_spans([0] * 5 + [img] + [0] * 4, (img,)) == [(5, -1)]
    t = [0] * 20
    t[3] = t[10] = img
    assert image_spans(t, (img,)) == [(3, 10), (10, 20)]
    t[4] = img
    assert image_spans(t, (img,)) == [(3, 10), (4, 10), (10, 20)]


def test_span_masks_match_llama_models():
    from llama_models.llama3.chat_format import create_vision_mask

    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        n = int(torch.randint(5, 30, (1,), generator=g))
        tokens = torch.where(torch.rand(n, generator=g) < 0.25, 7, 1).tolist()
        assert [list(s) for s in image_spans(tokens, (7,))] == create_vision_mask(tokens, 7)


def test_generated_rows_see_images_as_meta(models):
    """Past the prompt: one image stays visible; after several images nothing is (Meta's _pad_masks)."""
    ours, _, _ = models
    for slots, sizes, expect in (([0], [(20, 20)], 1.0), ([0, 4], [(20, 20), (20, 20)], 0.0)):
        tokens = prompt(slots, 8)
        ours.set_images(preprocess_images(random_images(sizes), TILE, 4), tokens)
        _, row = ours.cross_attention_masks(torch.arange(12), 1)
        ours.clear_images()
        assert row[0, 0, :8].flatten().tolist() == [1.0] * 8
        assert row[0, 0, 8:].flatten().tolist() == [expect] * 4


def test_hf_config_maps_to_meta_schedule():
    config = config_from_hf(hf_config_dict(), "test")
    args = VisionArgs.from_config(config)
    assert config.n_layers == 4 and args.cross_attention_layers == (1, 3)
    assert args.cross_attention_layers == tuple(fusion_schedule(4, 2))
    assert args.tokens_per_tile == 5 and args.output_dim == 96


@pytest.mark.parametrize("size", [(20, 20), (50, 20), (20, 100), (100, 20), (50, 50)])
def test_vision_tokens_match_hf(models, size):
    """Projected vision tokens for aspect ratios (1,1), (1,2), (4,1), (1,4), (2,2) (w x h sizes)."""
    ours, hf, _ = models
    batch = preprocess_images(random_images([size]), TILE, 4)
    with torch.no_grad():
        theirs = hf.model.vision_model(batch.pixel_values, batch.aspect_ratio_ids, batch.aspect_ratio_mask)[0]
        theirs = hf.model.multi_modal_projector(theirs)
        mine = ours.vision_model(batch.pixel_values, batch.aspect_ratios)
    n_real = int(batch.aspect_ratios.prod())
    assert mine.shape == theirs.shape
    # Padding tiles are never attended by the text; compare the real ones.
    diff = (mine[:, :, :n_real] - theirs[:, :, :n_real]).abs().max().item()
    assert diff < 1e-5, diff


def _ours_cached(model, tokens, images, prefill: int):
    """Prefill `prefill` tokens, then decode the rest one at a time through the KV cache."""
    model.setup_caches(1, len(tokens) + 4)
    model.set_images(images, tokens)
    t = torch.tensor([tokens])
    rows = [model(t[:, :prefill], torch.arange(prefill))]
    for i in range(prefill, len(tokens)):
        rows.append(model(t[:, i: i + 1], torch.tensor([i])))
    model.clear_caches()
    return torch.cat(rows, dim=1)


def meta_zeroing_forward(self, hidden_states, cross_attention_states, cross_attention_mask, attention_mask,
                         full_text_row_masked_out_mask, position_ids=None, past_key_values=None, use_cache=False,
                         cache_position=None, position_embeddings=None, **kwargs):
    """HF's MllamaCrossAttentionDecoderLayer.forward with Meta's zeroing of the attention output for
    rows that see no image (Meta `CrossAttention.forward`: `output * full_text_row_masked_out_mask`)."""
    residual = hidden_states
    hidden_states, _ = self.cross_attn(hidden_states=self.input_layernorm(hidden_states),
                                       attention_mask=cross_attention_mask,
                                       cross_attention_states=cross_attention_states,
                                       past_key_values=past_key_values, cache_position=cache_position, **kwargs)
    hidden_states = hidden_states * full_text_row_masked_out_mask[:, 0]
    hidden_states = residual + self.cross_attn_attn_gate.tanh() * hidden_states
    residual = hidden_states
    hidden_states = full_text_row_masked_out_mask[:, 0] * self.mlp(self.post_attention_layernorm(hidden_states))
    return residual + self.cross_attn_mlp_gate.tanh() * hidden_states


CASES = {  # name: (image token positions, prompt length, image sizes w x h)
    "one_image_first": ([0], 20, [(50, 50)]),
    "two_images": ([0, 9], 24, [(50, 50), (20, 100)]),  # a 2x2 and a 4x1 image, text between
    "two_consecutive_images": ([0, 1], 16, [(100, 20), (20, 20)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_hf(models, case):
    """With the first image at row 0 every row sees an image, so Meta and HF agree on all rows;
    ours runs in full and through the KV cache (prefill, then one token at a time)."""
    ours, hf, _ = models
    slots, length, sizes = CASES[case]
    tokens = prompt(slots, length)
    batch = preprocess_images(random_images(sizes, seed=len(sizes)), TILE, 4)
    with torch.no_grad():
        ref = hf(**hf_inputs(tokens, batch)).logits
        ours.set_images(batch, tokens)
        full = ours(torch.tensor([tokens]))
        cached = _ours_cached(ours, tokens, batch, prefill=4)
    ours.clear_images()
    assert (full - ref).abs().max().item() < ATOL
    assert (cached - ref).abs().max().item() < ATOL


def test_text_before_image_follows_meta(models, monkeypatch):
    """Rows before the first `<|image|>` get no cross-attention (Meta): they equal a text-only run, and
    every row equals HF once HF is given Meta's zeroing. Stock HF 4.57 differs (transformers #39379)."""
    from transformers.models.mllama import modeling_mllama

    ours, hf, _ = models
    first = 6
    tokens = prompt([first, 14], 22)
    batch = preprocess_images(random_images([(50, 50), (50, 20)]), TILE, 4)
    with torch.no_grad():
        stock = hf(**hf_inputs(tokens, batch)).logits
        ours.set_images(batch, tokens)
        with_image = ours(torch.tensor([tokens]))
        cached = _ours_cached(ours, tokens, batch, prefill=3)
        ours.clear_images()
        text_only = ours(torch.tensor([tokens[:first]]))
        hf_text_only = hf(input_ids=torch.tensor([tokens[:first]])).logits  # HF skips cross-attention too
        monkeypatch.setattr(modeling_mllama.MllamaCrossAttentionDecoderLayer, "forward", meta_zeroing_forward)
        meta_like = hf(**hf_inputs(tokens, batch)).logits
    assert (text_only - hf_text_only).abs().max().item() < ATOL
    assert (with_image[:, :first] - text_only).abs().max().item() < ATOL
    assert (with_image - meta_like).abs().max().item() < ATOL
    assert (cached - meta_like).abs().max().item() < ATOL
    assert (stock[:, :first] - text_only).abs().max().item() > 1e-3  # the divergence is real


def test_text_only_prompt_skips_cross_attention(models):
    ours, _, _ = models
    tokens = torch.tensor([prompt([], 12)])
    with torch.no_grad():
        plain = ours(tokens)
        for block in ours.text_model.cross_attention_layers:
            block.gate_attn.add_(1.0)  # would change any row that ran cross-attention
        try:
            assert torch.equal(ours(tokens), plain)
        finally:
            for block in ours.text_model.cross_attention_layers:
                block.gate_attn.sub_(1.0)


def test_image_count_mismatch_is_an_error(models):
    ours, _, _ = models
    batch = preprocess_images(random_images([(50, 50), (30, 30)]), TILE, 4)
    with pytest.raises(ValueError, match="2 images"):
        ours.set_images(batch, prompt([2], 10))


def test_intermediate_features_are_block_inputs_interleaved(models):
    """Meta's convention, checked directly (the HF comparison above shifts indices by one): the kept
    features are the *inputs* of the listed local blocks, laid out interleaved (W + c*K + k)."""
    ours, _, _ = models
    enc = ours.vision_model.vision_encoder
    width, keep = enc.args.width, enc.args.intermediate_layers
    captured = {}
    hooks = [enc.transformer.resblocks[i].register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0]))
             for i in keep]
    batch = preprocess_images(random_images([(50, 20)]), TILE, 4)
    try:
        with torch.no_grad():
            out = enc(batch.pixel_values, batch.aspect_ratios)[0, 0]  # (tiles, 5 tokens, W * (K + 1))
    finally:
        for h in hooks:
            h.remove()
    for k, i in enumerate(keep):
        block_input = captured[i].view(4, 8, width)[:, :5]  # 5 tokens per tile, padded to 8
        assert torch.equal(out[..., width + k:: len(keep)], block_input)


def test_chat_format_with_images_matches_llama_models(tmp_path):
    """Corral's Llama3ChatFormat + the model-input remap + image spans == Meta ChatFormat's LLMInput."""
    import io
    from pathlib import Path

    import llama_models
    from llama_models.datatypes import RawMediaItem, RawMessage, RawTextItem
    from llama_models.llama3.chat_format import ChatFormat
    from llama_models.llama3.tokenizer import Tokenizer as MetaTokenizer

    from corral.models.config import get_config
    from corral.tokenizer.chat import Llama3ChatFormat, dialog_images
    from corral.tokenizer.llama3 import Llama3Tokenizer

    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    ours = Llama3ChatFormat(Llama3Tokenizer(path), tool_format="json")
    meta = ChatFormat(MetaTokenizer(path))
    with torch.device("meta"):
        model = MllamaTransformer(get_config("Llama-3.2-11B-Vision-Instruct"))
    buf = io.BytesIO()
    random_images([(40, 30)])[0].save(buf, "PNG")
    png = buf.getvalue()
    url = "data:image/png;base64," + __import__("base64").b64encode(png).decode()

    dialogs = [
        [("user", ["img", "Describe this image in two sentences"])],
        [("system", ["Be brief."]), ("user", ["img", "What is this?"]), ("assistant", ["A dog."]),
         ("user", ["And this one?", "img"])],
        [("user", ["img", "img", "Compare these two."])],  # consecutive images
        [("user", ["Look: ", "img", " and ", "img", " then ", "img"])],
    ]
    for dialog in dialogs:
        meta_msgs = [RawMessage(role=role, content=[RawMediaItem(data=png) if c == "img" else RawTextItem(text=c)
                                                    for c in content]) for role, content in dialog]
        our_msgs = [{"role": role, "content": [{"type": "image_url", "image_url": {"url": url}} if c == "img"
                                               else {"type": "text", "text": c} for c in content]}
                    for role, content in dialog]
        expected = meta.encode_dialog_prompt(meta_msgs)
        ids = ours.encode_dialog(our_msgs)
        assert model._model_tokens(torch.tensor(ids)).tolist() == expected.tokens
        assert [list(s) for s in image_spans(ids, (128011,))] == expected.vision.mask
        assert len(dialog_images(our_msgs)) == len(expected.vision.images)


def test_engine_generate_matches_hf_generate(models):
    """The serving engine with the request's cross-attention state: greedy tokens equal HF generate."""
    from corral.engine.generate import generate_tokens
    from corral.engine.sampling import SamplingParams

    ours, hf, _ = models
    tokens = prompt([0], 10)
    meta_style = [PLACEHOLDER if t == VOCAB else t for t in tokens]  # as Meta's tokenizer writes <|image|>
    batch = preprocess_images(random_images([(50, 20)]), TILE, 4)
    state = ours.encode_images(batch, meta_style)
    got = [step.token_id for step in generate_tokens(ours, meta_style, SamplingParams(max_tokens=6, temperature=0),
                                                     cross_state=state)]
    with torch.no_grad():
        ref = hf.generate(**hf_inputs(tokens, batch), max_new_tokens=6, do_sample=False)[0, len(tokens):].tolist()
    assert got == ref


def test_engine_batches_sequences_with_different_images(models):
    """Two prompts with different images and one text-only prompt run in the same engine steps: the logits
    each samples from equal transformers' forward of that sequence alone (<= 1e-4), at every step."""
    from corral.engine.engine import Engine
    from corral.engine.sampling import SamplingParams

    ours, hf, _ = models
    # One image at row 0: rows before an image, and rows generated after several images, are where Meta
    # and transformers differ (spec §9 item 4; test_generated_rows_see_images_as_meta).
    cases = [(prompt([0], 10, seed=3), [(50, 20)]), (prompt([0], 17, seed=4), [(20, 100)]), (prompt([], 13, seed=5), [])]
    engine = Engine(ours, kv_cache_mb=1, max_num_seqs=4, max_batch_tokens=12,  # chunked prefill beside decodes
                    kv_dtype=torch.float32)  # compared with Meta's forward at 1e-4
    seen: list[list] = [[] for _ in cases]
    handles = []
    for (tokens, sizes), log in zip(cases, seen):
        ids = [PLACEHOLDER if t == VOCAB else t for t in tokens]
        state = ours.encode_images(preprocess_images(random_images(sizes), TILE, 4), ids) if sizes else None
        handles.append(engine.submit(ids, SamplingParams(max_tokens=4, temperature=0), cross_state=state,
                                     logits_processor=lambda g, logits, log=log: log.append((list(g), logits.clone()))
                                     or logits))
    outs = [[s.token_id for s in h] for h in handles]
    assert engine.steps < 3 * 4  # they ran together
    worst = 0.0
    with torch.no_grad():
        for (tokens, sizes), log, out in zip(cases, seen, outs):
            for generated, logits in log:
                full = tokens + generated
                if sizes:
                    ref = hf(**hf_inputs(full, preprocess_images(random_images(sizes), TILE, 4))).logits[0, -1]
                else:
                    ref = hf(input_ids=torch.tensor([full])).logits[0, -1]
                worst = max(worst, float((logits - ref).abs().max()))
            assert len(log) == len(out) == 4
    assert worst <= 1e-4
