"""Llama 3.2 Vision (11B / 90B, Llama Guard 3 11B-Vision), read top to bottom (spec §1.2, §4).

Three parts:
- the vision encoder (Meta `VisionEncoder`): 14x14 patch embedding, class token, gated position and
  tile-position embeddings, 32 local layers, 8 tanh-gated global layers, and the hidden states of
  five local layers appended in the reference's *interleaved* layout (feature 1280 + c*5 + k is channel
  c of intermediate k); then a projection to the text width;
- gated cross-attention blocks (q/k RMSNorm per head, GQA) that run just before the text self-attention
  layers of the fusion schedule ([3, 7, ..., 31] for 11B);
- `MllamaTransformer`, the text trunk of `models/llama.py` (its blocks, by import) with those blocks.

Weight names are Meta's consolidated-checkpoint names (`vision_model.vision_encoder.*`,
`text_model.cross_attention_layers.*`), except that the patch embedding is a Conv2d (`conv1.weight`,
(width, 3, 14, 14)) rather than Meta's Unfold + Linear; checkpoint loaders convert at the edge.

Per request, `encode_images(images, prompt_tokens)` runs the encoder once, computes every
cross-attention layer's keys/values (a cache sized by image tokens) and records which text rows see
which image (`<|image|>` spans, spec §4.3): a `CrossAttentionState`. The serving engine keeps it with
its sequence and passes it in the `PagedBatch`, so sequences with different images run in one batch.
`set_images` keeps one state in the model for the contiguous-cache path (`setup_caches` /
`forward(tokens, input_pos)`), used by parity tests. Without images the cross-attention
blocks are skipped entirely. Text rows that see no image (those before the first `<|image|>`) get a
zero cross-attention contribution, as in Meta's reference (Hugging Face 4.57 only zeroes the MLP
branch there; spec §9 item 4).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corral.models.config import ModelConfig
from corral.models.llama import FeedForward, PagedBatch, RMSNorm, Transformer

@dataclass(frozen=True)
class VisionArgs:
    """The vision hyperparameters of a ModelConfig (its `vision` dict); defaults are the 11B/90B values."""

    image_size: int = 560  # tile side in pixels (Meta vision_chunk_size)
    patch_size: int = 14
    max_num_tiles: int = 4
    width: int = 1280
    layers: int = 32  # local (ungated) encoder layers
    global_layers: int = 8  # tanh-gated layers after the tile-position embedding
    heads: int = 16
    mlp_dim: int = 5120
    norm_eps: float = 1e-5
    intermediate_layers: tuple[int, ...] = (3, 7, 15, 23, 30)  # inputs of these local layers are kept
    # Text self-attention layers that a cross-attention block runs just before (Meta's fusion schedule).
    cross_attention_layers: tuple[int, ...] = (3, 7, 11, 15, 19, 23, 27, 31)
    n_learnable_embeddings: int = 8  # extra embedding rows after the vocabulary; row 0 is `<|image|>`
    # `<|image|>` as Meta's tokenizer.model writes it; the model reads it as row 0 of the extra rows
    # (id vocab_size = 128256, which Hugging Face's tokenizer writes directly).
    image_placeholder_id: int = 128011

    @classmethod
    def from_config(cls, config: ModelConfig) -> VisionArgs:
        known = {f.name for f in fields(cls)}
        unknown = set(config.vision) - known
        if unknown:
            raise ValueError(f"unknown keys in the vision config of {config.name or 'model'}: {sorted(unknown)}")
        values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.vision.items()}
        args = cls(**values)
        if any(i >= args.layers for i in args.intermediate_layers):
            raise ValueError(f"intermediate_layers {args.intermediate_layers} exceed the {args.layers} local layers")
        if any(i >= config.n_layers for i in args.cross_attention_layers):
            raise ValueError(f"cross_attention_layers {args.cross_attention_layers} exceed n_layers={config.n_layers}")
        return args

    @property
    def tokens_per_tile(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS: 1601 for 560/14

    @property
    def output_dim(self) -> int:
        return self.width * (len(self.intermediate_layers) + 1)  # 7680


def fusion_schedule(n_layers: int, n_cross_attention_layers: int) -> list[int]:
    """Meta's `_init_fusion_schedule`: spread the cross-attention blocks evenly, ending at the last layer."""
    k = -(-n_layers // n_cross_attention_layers)
    return list(range(n_layers))[::-1][::k][:n_cross_attention_layers][::-1]


# ---------------------------------------------------------------------------------------------------
# Vision encoder


class ImageAttention(nn.Module):
    """Non-causal multi-head attention over all tiles of an image, no biases."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads, self.head_dim = heads, width // heads
        self.wq = nn.Linear(width, width, bias=False)
        self.wk = nn.Linear(width, width, bias=False)
        self.wv = nn.Linear(width, width, bias=False)
        self.wo = nn.Linear(width, width, bias=False)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        b, s, _ = x.shape
        q, k, v = (w(x).view(b, s, self.heads, self.head_dim).transpose(1, 2) for w in (self.wq, self.wk, self.wv))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, heads, S, head_dim)
        return self.wo(out.transpose(1, 2).reshape(b, s, -1))


class ImageFeedForward(nn.Module):
    def __init__(self, width: int, hidden: int):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden, bias=True)
        self.c_proj = nn.Linear(hidden, width, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.c_proj(F.gelu(self.c_fc(x)))  # exact (erf) GELU


class ImageTransformerBlock(nn.Module):
    def __init__(self, args: VisionArgs, gated: bool):
        super().__init__()
        self.attn = ImageAttention(args.width, args.heads)
        self.ln_1 = nn.LayerNorm(args.width, eps=args.norm_eps)
        self.mlp = ImageFeedForward(args.width, args.mlp_dim)
        self.ln_2 = nn.LayerNorm(args.width, eps=args.norm_eps)
        self.gated = gated
        if gated:
            self.gate_attn = nn.Parameter(torch.zeros(1))
            self.gate_ffn = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        gate_attn = self.gate_attn.tanh() if self.gated else 1
        gate_ffn = self.gate_ffn.tanh() if self.gated else 1
        x = x + gate_attn * self.attn(self.ln_1(x), mask)
        return x + gate_ffn * self.mlp(self.ln_2(x))


class ImageTransformer(nn.Module):
    def __init__(self, args: VisionArgs, n_layers: int, gated: bool):
        super().__init__()
        self.resblocks = nn.ModuleList(ImageTransformerBlock(args, gated) for _ in range(n_layers))

    def forward(self, x: Tensor, mask: Tensor, keep: tuple[int, ...] = ()) -> tuple[Tensor, list[Tensor]]:
        kept = []
        for i, block in enumerate(self.resblocks):
            if i in keep:
                kept.append(x)  # the *input* of block i
            x = block(x, mask)
        return x, kept


class TilePositionEmbedding(nn.Module):
    """A gated embedding per tile position (row, col) of the canvas: (max_tiles, max_tiles, 1, width)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.embedding = nn.Parameter(torch.zeros(args.max_num_tiles, args.max_num_tiles, 1, args.width))
        self.gate = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, aspect_ratios: Tensor) -> Tensor:
        """x (B*N, tiles, tokens, width); aspect_ratios (B*N, 2) as (tiles_h, tiles_w)."""
        pos = x.new_zeros(x.shape[0], x.shape[1], 1, x.shape[-1])
        for i, (h, w) in enumerate(aspect_ratios.tolist()):
            pos[i, : h * w] = self.embedding[:h, :w].reshape(h * w, 1, -1)  # row-major over the canvas
        return x + pos * self.gate.tanh()


def encoder_attention_mask(aspect_ratios: Tensor, n_tiles: int, n_tokens: int, n_pad: int) -> Tensor:
    """(B*N, 1, S, S) bool "may attend" mask over the n_tiles * (n_tokens + n_pad) tokens of each image.

    A token is padding if it is one of the n_pad tokens added to a tile or lies in a tile beyond
    tiles_h * tiles_w. Like the reference (`build_encoder_attention_mask`), only (padding query,
    padding key) pairs are masked: real tokens do attend to padding tokens.
    """
    per_tile = n_tokens + n_pad
    tile = torch.arange(n_tiles * per_tile, device=aspect_ratios.device) // per_tile
    in_tile = torch.arange(n_tiles * per_tile, device=aspect_ratios.device) % per_tile
    n_real = aspect_ratios.prod(-1)  # (B*N,)
    pad = (tile[None] >= n_real[:, None]) | (in_tile[None] >= n_tokens)  # (B*N, S)
    return ~(pad[:, :, None] & pad[:, None, :])[:, None]


class VisionEncoder(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        w, grid = args.width, args.image_size // args.patch_size
        self.conv1 = nn.Conv2d(3, w, kernel_size=args.patch_size, stride=args.patch_size, bias=False)
        self.class_embedding = nn.Parameter(torch.zeros(w))
        self.positional_embedding = nn.Parameter(torch.zeros(grid * grid + 1, w))
        self.gated_positional_embedding = nn.Parameter(
            torch.zeros(args.max_num_tiles, args.max_num_tiles, grid * grid + 1, w)
        )
        self.gated_positional_embedding_gate = nn.Parameter(torch.zeros(1))
        self.ln_pre = nn.LayerNorm(w, eps=args.norm_eps)
        self.ln_post = nn.LayerNorm(w, eps=args.norm_eps)
        self.transformer = ImageTransformer(args, args.layers, gated=False)
        self.global_transformer = ImageTransformer(args, args.global_layers, gated=True)
        self.pre_tile_pos_embed = TilePositionEmbedding(args)
        self.post_tile_pos_embed = TilePositionEmbedding(args)

    def apply_positional_embedding(self, x: Tensor, aspect_ratios: Tensor) -> Tensor:
        """x (B*N, tiles, tokens, width): a shared per-token embedding, plus a gated one per canvas tile."""
        gate = self.gated_positional_embedding_gate.tanh()
        x = x + self.positional_embedding * (1 - gate)
        tile_pos = torch.zeros_like(x)
        for i, (h, w) in enumerate(aspect_ratios.tolist()):
            tile_pos[i, : h * w] = self.gated_positional_embedding[:h, :w].reshape(h * w, *x.shape[2:])
        return x + tile_pos * gate

    def forward(self, images: Tensor, aspect_ratios: Tensor) -> Tensor:
        """images (B, N, tiles, 3, T, T), aspect_ratios (B, N, 2) -> (B, N, tiles, tokens, output_dim)."""
        b, n, n_tiles = images.shape[:3]
        ar = aspect_ratios.reshape(b * n, 2)
        x = self.conv1(images.flatten(0, 2).to(self.conv1.weight.dtype))  # (B*N*tiles, width, grid, grid)
        x = x.flatten(2).transpose(1, 2)  # (B*N*tiles, patches, width), patches row-major
        width = x.shape[-1]
        x = self.pre_tile_pos_embed(x.reshape(b * n, n_tiles, -1, width), ar)
        cls = self.class_embedding.to(x.dtype).expand(b * n, n_tiles, 1, width)
        x = torch.cat([cls, x], dim=2)  # (B*N, tiles, tokens = patches + 1, width), CLS first
        n_tok = x.shape[2]
        x = self.ln_pre(self.apply_positional_embedding(x, ar))

        # Pad each tile to a multiple of 8 tokens (1601 -> 1608); the padding is dropped at the end.
        n_pad = (8 - n_tok % 8) % 8
        x = F.pad(x, (0, 0, 0, n_pad))
        mask = encoder_attention_mask(ar, n_tiles, n_tok, n_pad)
        x, kept = self.transformer(x.view(b * n, -1, width), mask, self.args.intermediate_layers)
        x = self.ln_post(x)
        x = self.post_tile_pos_embed(x.view(b * n, n_tiles, n_tok + n_pad, width), ar)
        x, _ = self.global_transformer(x.view(b * n, -1, width), mask)

        # Intermediates stacked on a new last axis then flattened: feature c * K + k (interleaved).
        kept = torch.stack(kept, dim=-1).flatten(-2)  # (B*N, S, width * K)
        x = torch.cat([x, kept], dim=-1).view(b, n, n_tiles, n_tok + n_pad, -1)
        return x[:, :, :, :n_tok]


class VisionModel(nn.Module):
    """Encoder + projection of the 7680 features to the text width: the tokens cross-attention reads."""

    def __init__(self, args: VisionArgs, dim: int):
        super().__init__()
        self.vision_encoder = VisionEncoder(args)
        self.vision_projection = nn.Linear(args.output_dim, dim, bias=True)

    def forward(self, images: Tensor, aspect_ratios: Tensor) -> Tensor:
        return self.vision_projection(self.vision_encoder(images, aspect_ratios))  # (B, N, tiles, tokens, dim)


# ---------------------------------------------------------------------------------------------------
# Cross-attention in the decoder


class CrossAttention(nn.Module):
    """Text queries attend to the vision tokens of the request; keys/values are computed once."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = config.n_heads, config.n_kv_heads, config.head_dim
        self.wq = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=False)
        self.wk = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wv = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=False)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)  # per head, no RoPE
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def project_kv(self, vision_tokens: Tensor) -> tuple[Tensor, Tensor]:
        """vision_tokens (B, S, dim), all tiles of all images of each prompt -> k, v (B, n_kv_heads, S, hd)."""
        b, s, _ = vision_tokens.shape
        k = self.k_norm(self.wk(vision_tokens).view(b, s, self.n_kv_heads, self.head_dim)).transpose(1, 2)
        v = self.wv(vision_tokens).view(b, s, self.n_kv_heads, self.head_dim).transpose(1, 2)
        return k, v

    def forward(self, x: Tensor, mask: Tensor, row_mask: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        b, t, _ = x.shape
        q = self.q_norm(self.wq(x).view(b, t, self.n_heads, self.head_dim)).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, kv[0][:b], kv[1][:b], attn_mask=mask, enable_gqa=True)
        out = out * row_mask  # rows that see no image contribute nothing (Meta)
        return self.wo(out.transpose(1, 2).reshape(b, t, -1))


class CrossAttentionTransformerBlock(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.attention = CrossAttention(config)
        self.attention_norm = RMSNorm(config.dim, config.norm_eps)
        self.gate_attn = nn.Parameter(torch.zeros(1))
        self.feed_forward = FeedForward(config.dim, config.ffn_hidden_dim)
        self.ffn_norm = RMSNorm(config.dim, config.norm_eps)
        self.gate_ffwd = nn.Parameter(torch.zeros(1))

    def forward(self, x: Tensor, mask: Tensor, row_mask: Tensor, kv: tuple[Tensor, Tensor]) -> Tensor:
        """mask (B, 1, T, S) bool; row_mask (B, 1, T, 1): 1 where the row sees at least one tile; kv: this
        block's keys/values of the vision tokens."""
        h = x + self.gate_attn.tanh() * self.attention(self.attention_norm(x), mask, row_mask, kv)
        return h + self.gate_ffwd.tanh() * (self.feed_forward(self.ffn_norm(h)) * row_mask[:, 0])


class MllamaTextModel(Transformer):
    """The Llama text trunk plus 8 learnable embedding rows and the cross-attention blocks."""

    def __init__(self, config: ModelConfig, args: VisionArgs):
        super().__init__(config)
        self.learnable_embedding = nn.Embedding(args.n_learnable_embeddings, config.dim)
        self.cross_attention_layers = nn.ModuleList(
            CrossAttentionTransformerBlock(config) for _ in args.cross_attention_layers
        )
        self.fusion = {layer: j for j, layer in enumerate(args.cross_attention_layers)}  # self layer -> xattn block

    def embed(self, tokens: Tensor) -> Tensor:
        """Ids below vocab_size use tok_embeddings, ids vocab_size.. use learnable_embedding."""
        v = self.config.vocab_size
        x = self.tok_embeddings(tokens.clamp(max=v - 1))
        extra = tokens >= v
        if extra.any():
            x = torch.where(extra[..., None], self.learnable_embedding((tokens - v).clamp(min=0)).to(x.dtype), x)
        return x

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None,
                last_only: bool = False, xattn: tuple | None = None, kv_len: int | None = None,
                batch: PagedBatch | None = None) -> Tensor:
        """As `Transformer.forward`; xattn = (mask, row_mask, state) runs the cross-attention blocks before
        the self-attention layers of the fusion schedule. With a PagedBatch, each sequence of batch.cross
        runs them over its own tokens with its own state; the others skip them (they see no image)."""
        if batch is not None:
            x = self.embed(tokens)[None]  # (1, N, dim)
            rope = self.paged_rope(batch.positions)
            masks = [(start, end, state, *state.masks(batch.positions[start:end], x.dtype))
                     for start, end, state in batch.cross or []]
            for i, layer in enumerate(self.layers):
                if i in self.fusion and masks:
                    x = x.clone()
                    for start, end, state, m, row in masks:
                        j = self.fusion[i]
                        x[:, start:end] = self.cross_attention_layers[j](x[:, start:end], m, row, state.kv[j])
                x = layer(x, rope, None, None, None, batch, i)
            return self.paged_logits(x, batch)
        rope, mask, kv_len = self.positions(tokens.shape[1], input_pos, mask, kv_len, tokens.device)
        x = self.embed(tokens)
        for i, layer in enumerate(self.layers):
            if xattn is not None and i in self.fusion:
                m, row, state = xattn
                x = self.cross_attention_layers[self.fusion[i]](x, m, row, state.kv[self.fusion[i]])
            x = layer(x, rope, input_pos, mask, kv_len)
        x = self.norm(x)
        if last_only:
            x = x[:, -1:]
        return self.output(x).float()


def image_spans(tokens: list[int], image_token_ids: tuple[int, ...]) -> list[tuple[int, int]]:
    """[start, end) of the text rows that see each image: Meta's `create_vision_mask` (spec §4.3).

    Each image is seen from its `<|image|>` token up to the next image token. A single image is seen
    to the end of the sequence, generated tokens included (end = -1); with several images the last
    one is seen up to the end of the *prompt* (end = len(tokens)), so in Meta's reference tokens
    generated after a multi-image prompt attend to no image (Hugging Face's generate instead repeats
    the last prompt row's mask). In a run of consecutive image tokens every image gets the run's end.
    """
    positions = [i for i, tok in enumerate(tokens) if tok in image_token_ids]
    if len(positions) <= 1:
        return [(p, -1) for p in positions]
    spans = [[p, q] for p, q in zip(positions, positions[1:])] + [[positions[-1], len(tokens)]]
    last_end = spans[-1][1]
    for span in reversed(spans):
        if span[0] == span[1] - 1:
            span[1] = last_end
        last_end = span[1]
    return [tuple(s) for s in spans]


@dataclass
class CrossAttentionState:
    """One request's images, as the cross-attention layers see them: computed once per request.

    kv: per cross-attention block, keys/values (B, n_kv_heads, S, hd) of all vision tokens of each prompt;
    spans (B, N_img, 2): [start, end) of the text rows that see each image; tiles (B, N_img, tiles) bool:
    the real tiles of each image.
    """

    kv: list[tuple[Tensor, Tensor]]
    spans: Tensor
    tiles: Tensor
    tokens_per_tile: int

    def masks(self, positions: Tensor, dtype: torch.dtype, batch: int = 1) -> tuple[Tensor, Tensor]:
        """(mask (B, 1, T, S) bool, row_mask (B, 1, T, 1)) for the text rows at positions (T,)."""
        pos = positions[None, :, None]
        start, end = self.spans[:batch, None, :, 0], self.spans[:batch, None, :, 1]
        sees = (pos >= start) & (pos < end)  # (B, T, N): row t sees image k
        tiles = sees[..., None] & self.tiles[:batch, None]  # (B, T, N, tiles)
        row = tiles.flatten(2).any(-1)[:, None, :, None]  # (B, 1, T, 1)
        mask = tiles.repeat_interleave(self.tokens_per_tile, dim=3).flatten(2)[:, None]
        # A row that sees nothing attends uniformly (as the reference's all-zero bias does) and is zeroed.
        mask = mask | ~row
        return mask, row.to(dtype)


class MllamaTransformer(nn.Module):
    """Llama 3.2 Vision: `encode_images(...)` once per request; then, for the engine, a `PagedBatch` whose
    `cross` carries each sequence's state, or for the contiguous path `set_images` + `forward(tokens, input_pos)`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.args = VisionArgs.from_config(config)
        self.vision_model = VisionModel(self.args, config.dim)
        self.text_model = MllamaTextModel(config, self.args)
        self.image_token_id = config.vocab_size  # the first learnable row (128256)
        self._state: CrossAttentionState | None = None  # set_images: the contiguous path's images

    # The text model's cache interface, so the engine can treat this like a Transformer.
    @property
    def tok_embeddings(self) -> nn.Embedding:
        return self.text_model.tok_embeddings

    @property
    def layers(self) -> nn.ModuleList:
        return self.text_model.layers

    @property
    def max_seq_len(self) -> int:
        return self.text_model.max_seq_len

    @property
    def max_batch(self) -> int:
        return self.text_model.max_batch

    def setup_caches(self, max_batch: int, max_seq_len: int, dtype: torch.dtype | None = None) -> None:
        self.text_model.setup_caches(max_batch, max_seq_len, dtype)

    def clear_caches(self) -> None:
        self.text_model.clear_caches()
        self.clear_images()

    def clear_images(self) -> None:
        self._state = None

    @property
    def has_images(self) -> bool:
        return self._state is not None

    def _model_tokens(self, tokens: Tensor) -> Tensor:
        """Meta's tokenizer writes `<|image|>` as 128011; the model reads it as image_token_id (128256)."""
        return torch.where(tokens == self.args.image_placeholder_id, self.image_token_id, tokens)

    @torch.no_grad()
    def set_images(self, images, prompt_tokens) -> None:
        """The contiguous-cache path: encode a request's images (see encode_images) and keep them."""
        self._state = self.encode_images(images, prompt_tokens)

    @torch.no_grad()
    def encode_images(self, images, prompt_tokens) -> CrossAttentionState | None:
        """Run the encoder once and compute every cross-attention layer's keys/values; None without images.

        images: an `ImageBatch`, or the images of one prompt (a list of paths / bytes / PIL images /
        data URLs), or a list of such lists for a batch. prompt_tokens: (B, T) ids or a list of ids;
        the k-th `<|image|>` token of a row marks where its k-th image is placed.
        """
        from corral.models.image import ImageBatch, preprocess_images

        if not isinstance(images, ImageBatch):
            images = preprocess_images(list(images), self.args.image_size, self.args.max_num_tiles)
        rows = torch.as_tensor(prompt_tokens)
        rows = rows[None] if rows.ndim == 1 else rows
        if rows.shape[0] != len(images.num_images):
            raise ValueError(f"{rows.shape[0]} prompts but images for {len(images.num_images)} prompts")
        ids = (self.image_token_id, self.args.image_placeholder_id)
        if sum(images.num_images) == 0:
            if any(bool(torch.isin(r, torch.tensor(ids)).any()) for r in rows):
                raise ValueError("the prompt has <|image|> tokens but no images were given")
            return None
        if images.pixel_values.shape[-1] != self.args.image_size:
            raise ValueError(f"images were tiled at {images.pixel_values.shape[-1]} px, the model expects "
                             f"{self.args.image_size} px tiles")
        b, n = images.aspect_ratios.shape[:2]
        spans = torch.zeros(b, n, 2, dtype=torch.long)  # padding images: empty span
        for r, row in enumerate(rows.tolist()):
            row_spans = image_spans(row, ids)
            if len(row_spans) != images.num_images[r]:
                raise ValueError(f"prompt {r} has {len(row_spans)} <|image|> tokens but "
                                 f"{images.num_images[r]} images were given")
            for k, (start, end) in enumerate(row_spans):
                spans[r, k] = torch.tensor([start, torch.iinfo(torch.long).max if end == -1 else end])
        n_real = images.aspect_ratios.prod(-1)  # (B, N)
        tiles = torch.arange(images.max_num_tiles)[None, None] < n_real[..., None]
        tiles &= (torch.arange(n)[None] < torch.tensor(images.num_images)[:, None])[..., None]

        weight = self.text_model.tok_embeddings.weight
        vision = self.vision_model(images.pixel_values.to(weight.device), images.aspect_ratios.to(weight.device))
        vision = vision.to(weight.dtype).reshape(b, -1, vision.shape[-1])  # (B, N*tiles*tokens, dim)
        kv = [block.attention.project_kv(vision) for block in self.text_model.cross_attention_layers]
        return CrossAttentionState(kv, spans.to(weight.device), tiles.to(weight.device), self.args.tokens_per_tile)

    def cross_attention_masks(self, input_pos: Tensor, batch: int) -> tuple[Tensor, Tensor]:
        """(mask (B, 1, T, S) bool, row_mask (B, 1, T, 1)) for the text rows at input_pos (T,)."""
        return self._state.masks(input_pos, self.text_model.tok_embeddings.weight.dtype, batch)

    def forward(self, tokens: Tensor, input_pos: Tensor | None = None, mask: Tensor | None = None,
                last_only: bool = False, kv_len: int | None = None, batch: PagedBatch | None = None) -> Tensor:
        """tokens (B, T) -> logits (B, T, vocab) fp32; as `Transformer.forward`, plus the images set.
        With a PagedBatch: the engine's flat batch, each sequence with its own images (batch.cross)."""
        tokens = self._model_tokens(tokens)
        if batch is not None:
            return self.text_model(tokens, batch=batch)
        xattn = None
        if self.has_images:
            pos = input_pos if input_pos is not None else torch.arange(tokens.shape[1], device=tokens.device)
            xattn = (*self.cross_attention_masks(pos, tokens.shape[0]), self._state)
        return self.text_model(tokens, input_pos, mask, last_only, xattn, kv_len)
