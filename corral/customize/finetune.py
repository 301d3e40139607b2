"""`corral finetune`: LoRA or full fine-tuning of any model Corral loads, and `corral merge`.

    finetune(model, data, out)                       # LoRA r=8 on q/k/v/o -> OUT/adapter_config.json + ...
    finetune(model, data, out, method="full")        # every weight -> a Hugging Face checkpoint in OUT
    merge(model, adapter, out)                       # W + alpha/r * B A -> a Hugging Face checkpoint

The model is loaded in fp32 (training on a CPU), the data tokenized with its own tokenizer and chat
format (`data.py`), then `train.py` runs the loop (one process or torchrun). OUT holds the result, the
training log (`train_log.jsonl`) and the resumable state (`checkpoint/`, safe to delete when done).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from corral.customize.data import DatasetError, Sample, load_samples, read_records, split_samples
from corral.customize.lora import LoRAConfig, apply_lora, load_adapter, merge_adapter_into_state_dict, save_adapter
from corral.customize.train import (CHECKPOINT_DIR, LOG_FILE, NextTokenTask, TrainConfig, TrainResult, config_dict,
                                    full_state_dict, init_distributed, train)


@dataclass
class Prepared:
    """A model ready to train and its data."""

    model: torch.nn.Module
    checkpoint: object  # corral.checkpoints.Checkpoint of the base model
    tokenizer: object
    train: list[Sample]
    eval: list[Sample]


def check_out_dir(out: Path, resume: bool) -> None:
    """Refuse to train over an earlier run's state unless resuming it."""
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"{out}: exists and is not a directory")
    if resume and not (out / CHECKPOINT_DIR).is_dir():
        raise FileNotFoundError(f"{out / CHECKPOINT_DIR}: no checkpoint to resume from")
    if not resume and (out / CHECKPOINT_DIR).exists():
        raise FileExistsError(f"{out}: holds a training checkpoint of an earlier run; pass --resume to continue "
                              "it, or choose another output directory")


def prepare(model: str | Path, data: str | Path, *, seq_len: int, eval_data: str | Path | None,
            eval_fraction: float, seed: int, model_obj=None) -> Prepared:
    """Check the data, load the model in fp32 and tokenize the data with the model's chat format."""
    from corral.checkpoints import load_model, load_tokenizer
    from corral.tokenizer.chat import chat_format_for

    records = read_records(data)  # a malformed line fails before the model loads
    eval_records = read_records(eval_data) if eval_data is not None else None
    if model_obj is None:
        net, checkpoint = load_model(model, dtype=torch.float32)
    else:
        net, checkpoint = model_obj
    if net.config.family != "llama":
        raise ValueError(f"{model}: fine-tuning supports Llama text models, not {net.config.family!r}")
    tokenizer = load_tokenizer(checkpoint)
    try:
        chat_format, why = chat_format_for(net.config, tokenizer, checkpoint.chat_template), None
    except ValueError as e:
        chat_format, why = None, str(e)
    kw = dict(seq_len=seq_len, chat_format_error=why)
    samples = load_samples(records, tokenizer, chat_format, **kw)
    if eval_records is not None:
        held = load_samples(eval_records, tokenizer, chat_format, **kw)
    else:
        samples, held = split_samples(samples, eval_fraction, seed)
    if not samples:
        raise DatasetError(f"{data}: no training samples left after holding out the evaluation set")
    return Prepared(net, checkpoint, tokenizer, samples, held)


@dataclass
class FinetuneResult:
    out: Path
    result: TrainResult
    recipe: dict
    model: torch.nn.Module  # the trained model (LoRA layers in place; under torchrun, DDP- or FSDP-wrapped)


def finetune(model: str | Path, data: str | Path, out: str | Path, *, method: str = "lora",
             lora: LoRAConfig | None = None, train_config: TrainConfig | None = None, seq_len: int = 512,
             eval_data: str | Path | None = None, eval_fraction: float = 0.05, resume: bool = False,
             on_log=None) -> FinetuneResult:
    """Fine-tune `model` (registry name, HF / Meta directory, GGUF) on `data`; write the result to `out`.

    method "lora": an adapter in PEFT's format (`lora` sets rank, alpha, dropout, targets); "full": every
    parameter, saved as a Hugging Face checkpoint. Returns the training result and the recipe recorded
    with the output."""
    if method not in ("lora", "full"):
        raise ValueError(f"method must be 'lora' or 'full', got {method!r}")
    cfg = train_config or TrainConfig()
    cfg.validate()
    lora = lora or LoRAConfig()
    out = Path(out).expanduser()
    check_out_dir(out, resume)
    d = init_distributed()
    torch.manual_seed(cfg.seed)  # LoRA's A init
    prep = prepare(model, data, seq_len=seq_len, eval_data=eval_data, eval_fraction=eval_fraction, seed=cfg.seed)
    net = prep.model.to(d.device)
    if method == "lora":
        apply_lora(net, lora)
    else:
        net.requires_grad_(True)
    if not resume and d.main and (out / LOG_FILE).exists():
        (out / LOG_FILE).unlink()
    result = train(net, NextTokenTask(d.device), prep.train, prep.eval, cfg, out, resume=resume, d=d, on_log=on_log,
                   run_meta={"command": "finetune", "method": method,
                             "lora": _lora_recipe(lora) if method == "lora" else None})
    recipe = {"command": "finetune", "method": method, "base_model": str(model), "data": str(data),
              "eval_data": str(eval_data) if eval_data else None, "seq_len": seq_len,
              "n_train_samples": len(prep.train), "n_eval_samples": len(prep.eval),
              "lora": _lora_recipe(lora) if method == "lora" else None, "train": config_dict(cfg),
              "world_size": d.world, "final_train_loss": result.train_loss, "final_eval_loss": result.eval_loss,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    if method == "lora":
        if d.main:
            save_adapter(out, _unwrapped(net), lora, base_model=str(model), metadata=recipe)
    else:
        from corral.checkpoints.save import save_hf

        state = full_state_dict(net)  # every rank joins the gather under FSDP
        if d.main:
            save_hf(out, state, net.config, tokenizer_from=prep.checkpoint, recipe=recipe)
    return FinetuneResult(out, result, recipe, net)


def _lora_recipe(lora: LoRAConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(lora).items() if k != "extra"}


def _unwrapped(net):
    return getattr(net, "module", net)


def merge(model: str | Path, adapter: str | Path, out: str | Path, *, dtype=None) -> Path:
    """Fold a PEFT LoRA adapter into the model's weights and write a Hugging Face checkpoint to `out`."""
    from corral.checkpoints import load_checkpoint
    from corral.checkpoints.download import resolve_model
    from corral.checkpoints.save import save_hf

    checkpoint = load_checkpoint(resolve_model(model))
    if checkpoint.config.family != "llama":
        raise ValueError(f"{model}: merging supports Llama text models, not {checkpoint.config.family!r}")
    if checkpoint.quantization is not None and dtype is None:
        dtype = torch.float32  # a quantized GGUF is dequantized to fp32; keep it so
    ad = load_adapter(adapter, checkpoint.config)
    state = merge_adapter_into_state_dict(checkpoint.state_dict, ad)
    recipe = {"command": "merge", "base_model": str(model), "adapter": str(adapter),
              "lora": _lora_recipe(ad.config), "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return save_hf(out, state, checkpoint.config, tokenizer_from=checkpoint, recipe=recipe, dtype=dtype)
