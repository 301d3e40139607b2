"""LoRA: low-rank adapters on the model's Linear layers, saved and loaded in PEFT's format.

A `LoRALinear` keeps the frozen base weight under its own name (`layers.0.attention.wq.weight`) and adds
`lora_A` (r, in) and `lora_B` (out, r): y = x W^T + (dropout(x) A^T B^T) * alpha / r. B starts at zero,
so a fresh adapter leaves the model unchanged (PEFT's default init).

On disk an adapter is what PEFT writes for a transformers `LlamaForCausalLM`: `adapter_config.json` and
`adapter_model.safetensors` with keys `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`.
Corral's q/k rows are in Meta's interleaved rotary order and HF's are permuted (spec §2.3); the adapter's
contribution B A adds to W row for row, so B's rows are permuted exactly like the weights (`hf.permute`)
and A is left alone.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from corral.checkpoints.errors import CheckpointError
from corral.checkpoints.hf import LAYER_NAMES, permute, unpermute
from corral.models.config import ModelConfig

# PEFT / HF module name -> Corral module name inside a block
HF_TO_CORRAL = {"q_proj": "attention.wq", "k_proj": "attention.wk", "v_proj": "attention.wv",
                "o_proj": "attention.wo", "gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3",
                "down_proj": "feed_forward.w2"}
CORRAL_SHORT = {"wq": "q_proj", "wk": "k_proj", "wv": "v_proj", "wo": "o_proj", "w1": "gate_proj",
                "w3": "up_proj", "w2": "down_proj"}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"


class AdapterError(CheckpointError):
    """An adapter that cannot be read or does not fit the model (a CheckpointError: the server reports it)."""


@dataclass
class LoRAConfig:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = DEFAULT_TARGETS  # HF names (q_proj, ...); Corral's (wq, ...) are accepted
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    extra: dict = field(default_factory=dict)  # e.g. base_model_name_or_path for adapter_config.json

    def __post_init__(self):
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        self.targets = tuple(normalize_target(t) for t in self.targets)

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def normalize_target(name: str) -> str:
    name = CORRAL_SHORT.get(name, name)
    if name not in HF_TO_CORRAL:
        raise ValueError(f"unknown LoRA target module {name!r}; choose from {', '.join(HF_TO_CORRAL)} "
                         f"(or Corral's {', '.join(CORRAL_SHORT)})")
    return name


class LoRALinear(nn.Module):
    """A frozen Linear (weight (out, in), no bias) plus a trainable low-rank update."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, use_rslora: bool = False):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        device, dtype = base.weight.device, base.weight.dtype
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as PEFT (and nn.Linear) initialise A
        self.scaling = alpha / (math.sqrt(rank) if use_rslora else rank)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)  # (..., out) through rank r
        return F.linear(x, self.weight) + update * self.scaling

    def delta(self) -> Tensor:
        """The update to the weight: scaling * B A, (out, in)."""
        return (self.lora_B.float() @ self.lora_A.float()) * self.scaling

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Module names (`layers.3.attention.wq`) that the config's targets select."""
    suffixes = {HF_TO_CORRAL[t] for t in config.targets}
    return [f"layers.{i}.{s}" for i in range(len(model.layers)) for s in sorted(suffixes)]


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Freeze the model and wrap the target Linears in LoRALinear (in place); returns the wrapped names."""
    for p in model.parameters():
        p.requires_grad_(False)
    names = target_names(model, config)
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, attr)
        if not isinstance(base, nn.Linear):
            raise TypeError(f"{name} is a {type(base).__name__}, not a float nn.Linear (LoRA trains on float weights)")
        setattr(parent, attr, LoRALinear(base, config.rank, config.alpha, config.dropout, config.use_rslora))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every LoRALinear back into a plain Linear with W + scaling * B A (in place)."""
    for name, m in lora_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        linear = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
        linear.weight = nn.Parameter((m.weight.float() + m.delta()).to(m.weight.dtype), requires_grad=False)
        setattr(model.get_submodule(parent_name), attr, linear)
    return model


# ---- PEFT format ------------------------------------------------------------------------------------

def _peft_key(module: str, which: str) -> str:
    """`layers.3.attention.wq`, "A" -> `base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`."""
    _, i, rest = module.split(".", 2)
    hf = LAYER_NAMES[rest + ".weight"].removesuffix(".weight")
    return f"{PEFT_PREFIX}model.layers.{i}.{hf}.lora_{which}.weight"


def _rotary_heads(module: str, config: ModelConfig) -> int | None:
    """Heads whose rows to permute for q/k (spec §2.3); None for modules without rotary rows."""
    if module.endswith("attention.wq"):
        return config.n_heads
    if module.endswith("attention.wk"):
        return config.n_kv_heads
    return None


def adapter_tensors(lora: dict[str, tuple[Tensor, Tensor]], config: ModelConfig) -> dict[str, Tensor]:
    """{module: (A (r, in), B (out, r))} in Corral's layout -> PEFT's state dict (B of q/k permuted to HF rows)."""
    out = {}
    for module, (a, b) in lora.items():
        heads = _rotary_heads(module, config)
        a, b = a.detach().cpu(), b.detach().cpu()
        out[_peft_key(module, "A")] = a.contiguous()
        out[_peft_key(module, "B")] = (b if heads is None else permute(b, heads)).contiguous()
    return out


def adapter_config_json(config: LoRAConfig, base_model: str | None) -> dict:
    """adapter_config.json as PEFT writes it for LoraConfig(task_type="CAUSAL_LM")."""
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model, "revision": None,
        "inference_mode": True, "r": config.rank, "lora_alpha": config.alpha, "lora_dropout": config.dropout,
        "target_modules": sorted(config.targets), "fan_in_fan_out": False, "bias": "none",
        "use_rslora": config.use_rslora, "use_dora": False, "modules_to_save": None, "init_lora_weights": True,
        "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
        "lora_bias": False, **config.extra,
    }


def save_adapter(directory: str | Path, model: nn.Module, lora_config: LoRAConfig, *,
                 base_model: str | None = None, metadata: dict | None = None) -> Path:
    """Write the model's LoRA weights as a PEFT adapter directory."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lora = {name: (m.lora_A, m.lora_B) for name, m in lora_modules(model).items()}
    if not lora:
        raise ValueError("the model has no LoRA layers to save")
    tensors = adapter_tensors(lora, model.config)
    save_file(tensors, directory / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    cfg = adapter_config_json(lora_config, base_model)
    if metadata:
        cfg["corral"] = metadata  # provenance; PEFT ignores unknown keys with a warning
    (directory / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    return directory


@dataclass
class Adapter:
    config: LoRAConfig
    lora: dict[str, tuple[Tensor, Tensor]]  # Corral module name -> (A (r, in), B (out, r)), Corral row order
    path: Path

    def deltas(self) -> dict[str, Tensor]:
        """Canonical weight name -> scaling * B A (out, in), fp32."""
        return {f"{m}.weight": (b.float() @ a.float()) * self.config.scaling for m, (a, b) in self.lora.items()}


def load_adapter(directory: str | Path, config: ModelConfig) -> Adapter:
    """Read a PEFT LoRA adapter written for a LlamaForCausalLM with `config`'s shapes."""
    from safetensors import safe_open

    directory = Path(directory).expanduser()
    if not directory.exists():
        raise AdapterError(f"{directory}: no such adapter directory")
    cfg_path, weights = directory / ADAPTER_CONFIG, directory / ADAPTER_WEIGHTS
    for p in (cfg_path, weights):
        if not p.is_file():
            raise AdapterError(f"{directory}: not a PEFT adapter ({p.name} is missing)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{cfg_path}: not valid JSON ({e})") from None
    if cfg.get("peft_type") != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r} is not supported (only LORA)")
    for unsupported in ("use_dora", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "modules_to_save",
                        "lora_bias"):
        if cfg.get(unsupported):
            raise AdapterError(f"{cfg_path}: {unsupported} is not supported")
    if cfg.get("bias", "none") != "none":
        raise AdapterError(f"{cfg_path}: bias={cfg['bias']!r} is not supported (only 'none')")
    lora_config = LoRAConfig(rank=int(cfg["r"]), alpha=float(cfg["lora_alpha"]),
                             dropout=float(cfg.get("lora_dropout") or 0.0), use_rslora=bool(cfg.get("use_rslora")),
                             targets=tuple(HF_TO_CORRAL) if cfg.get("target_modules") == "all-linear"
                             else tuple(t for t in cfg.get("target_modules") or () if t in HF_TO_CORRAL))
    try:
        f = safe_open(weights, framework="pt", device="cpu")
    except Exception as e:
        raise AdapterError(f"{weights}: truncated or corrupt safetensors file ({e})") from None
    by_module: dict[str, dict[str, Tensor]] = {}
    for key in f.keys():
        module, which = _corral_module(key, weights)
        by_module.setdefault(module, {})[which] = f.get_tensor(key)
    lora = {}
    for module, ab in sorted(by_module.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{weights}: {module} has lora_{'A' if 'A' in ab else 'B'} but not the other")
        a, b = ab["A"], ab["B"]
        layer = int(module.split(".")[1])
        linear_shape = _linear_shape(module, config)
        if layer >= config.n_layers or a.shape != (lora_config.rank, linear_shape[1]) or \
                b.shape != (linear_shape[0], lora_config.rank):
            raise AdapterError(f"{weights}: {_peft_key(module, 'A')} / lora_B have shapes {tuple(a.shape)} / "
                               f"{tuple(b.shape)}, which do not fit the model ({linear_shape}, rank {lora_config.rank})")
        heads = _rotary_heads(module, config)
        lora[module] = (a, b if heads is None else unpermute(b, heads))
    if not lora:
        raise AdapterError(f"{weights}: no LoRA tensors")
    return Adapter(lora_config, lora, directory)


def _corral_module(key: str, where: Path) -> tuple[str, str]:
    """`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight` -> ("layers.3.attention.wq", "A")."""
    parts = key.split(".")
    try:
        i = parts.index("layers")
        layer, hf_module, lora_name = int(parts[i + 1]), parts[i + 3], parts[i + 4]
        if parts[i + 2] not in ("self_attn", "mlp") or hf_module not in HF_TO_CORRAL or \
                lora_name not in ("lora_A", "lora_B"):
            raise ValueError
    except (ValueError, IndexError):
        raise AdapterError(f"{where}: unexpected tensor {key!r} in a LoRA adapter for a LlamaForCausalLM") from None
    return f"layers.{layer}.{HF_TO_CORRAL[hf_module]}", lora_name[-1]


def _linear_shape(module: str, config: ModelConfig) -> tuple[int, int]:
    d, hd, f = config.dim, config.head_dim, config.ffn_hidden_dim
    shapes = {"attention.wq": (config.n_heads * hd, d), "attention.wk": (config.n_kv_heads * hd, d),
              "attention.wv": (config.n_kv_heads * hd, d), "attention.wo": (d, config.n_heads * hd),
              "feed_forward.w1": (f, d), "feed_forward.w3": (f, d), "feed_forward.w2": (d, f)}
    return shapes[module.split(".", 2)[2]]


def merge_adapter_into_state_dict(state_dict: dict[str, Tensor], adapter: Adapter) -> dict[str, Tensor]:
    """A canonical state dict with the adapter folded in: W + scaling * B A, in W's dtype (a new dict)."""
    out = dict(state_dict)
    for name, delta in adapter.deltas().items():
        if name not in out:
            raise AdapterError(f"{adapter.path}: the adapter targets {name}, which the model does not have")
        w = out[name]
        out[name] = (w.float() + delta).to(w.dtype)
    return out


@torch.no_grad()
def merge_adapter_into_model(model: nn.Module, adapter: Adapter) -> nn.Module:
    """Fold an adapter into a loaded float model's weights in place (the engine's load-time merge)."""
    for name, delta in adapter.deltas().items():
        module = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(module, nn.Linear):
            raise AdapterError(f"{adapter.path}: cannot merge into {name}, a {type(module).__name__} "
                               "(load the model unquantized; quantize after the merge)")
        module.weight.copy_((module.weight.float() + delta).to(module.weight.dtype))
    return model


def lora_config_dict(config: LoRAConfig) -> dict:
    return asdict(config)


def load_model_with_adapter(model, adapter: str | Path, *, dtype=None, device="cpu", quantize: str | None = None):
    """`corral.checkpoints.load_model` with a LoRA adapter merged into the weights at load time.

    The model is loaded in float, the adapter folded in (W + scaling * B A), then quantized if asked:
    merging costs nothing per token, and an int8 model quantizes the merged weights."""
    import dataclasses

    from corral.checkpoints import BLOCK_QUANTIZATIONS, QUANTIZATIONS, load_model

    if quantize is not None and dtype is None and torch.device(device).type == "cpu":
        dtype = torch.float32  # as load_model does for int8 on the CPU: fp32 activations
    net, checkpoint = load_model(model, dtype=dtype, device=device, packed=False)  # float weights to merge into
    if net.config.family != "llama":
        raise AdapterError(f"{adapter}: LoRA adapters are supported for Llama text models, not {net.config.family!r}")
    merge_adapter_into_model(net, load_adapter(adapter, net.config))
    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"unknown quantization {quantize!r}; supported: {', '.join(QUANTIZATIONS)}")
    if quantize in BLOCK_QUANTIZATIONS:  # the blocks' linears in GGUF blocks, as load_model(quantize=...) does
        from corral.engine.int4 import assign_int4, int4_linear_names

        names = int4_linear_names(net)
        assign_int4(net, {n + ".weight": net.get_submodule(n).weight.detach() for n in names}, names,
                    BLOCK_QUANTIZATIONS[quantize])
    if quantize is not None:  # int8: every remaining Linear (all of them for int8; the head for the blocks)
        from corral.engine.quantize import quantize_model_int8

        quantize_model_int8(net)
        checkpoint = dataclasses.replace(checkpoint, state_dict={}, quantization=quantize)
    return net, checkpoint
