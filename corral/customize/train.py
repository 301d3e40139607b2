"""The training loop shared by `corral finetune` and `corral distill`, one process or many (torchrun).

A step is `grad_accum` micro-batches of `batch_size` sequences on each of `world` processes. Losses are
sums over target tokens divided by the target count of the whole global batch (all micro-batches, all
ranks), so a step's gradient is that of the global batch's mean token loss however it is split: under
DDP, which averages gradients over ranks, each rank's sum is scaled by world / n_global.

Under torchrun (WORLD_SIZE > 1) the process group is gloo on CPU, NCCL on GPUs; the model is wrapped in
DDP, or sharded with FSDP2 (`fully_shard` per block, then the root; tied embeddings stay in the root's
group) when `fsdp=True`. Every rank reads the same `Batches` and takes its own slice.

Checkpoints (`OUT/checkpoint/`): the trainable parameters and the optimizer state as full (unsharded)
tensors, and `trainer.json` with the step. The data of step s and the dropout seed of step s are pure
functions of (seed, s), so a resumed run continues exactly where the saved one was.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from corral.customize.data import IGNORE, Batches, Sample, collate

CHECKPOINT_DIR = "checkpoint"
LOG_FILE = "train_log.jsonl"


@dataclass
class TrainConfig:
    steps: int = 100
    batch_size: int = 4  # sequences per micro-batch per process
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at the last step
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    eval_every: int = 0  # held-out loss every N steps (0: at the end only)
    eval_batches: int | None = None  # None: the whole held-out set
    save_every: int = 0  # checkpoint every N steps (0: at the end only)
    seed: int = 0
    activation_checkpointing: bool = False
    fsdp: bool = False  # under torchrun: shard parameters (FSDP2) instead of replicating them (DDP)
    progress: bool = True

    def validate(self) -> None:
        for name in ("steps", "batch_size", "grad_accum"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        for name in ("warmup_steps", "eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")

    def lr_at(self, step: int) -> float:
        """Linear warmup, then cosine decay from lr to lr * min_lr_ratio over the remaining steps."""
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        span = max(1, self.steps - self.warmup_steps - 1)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


class Task(Protocol):
    """What is trained: the summed loss of a micro-batch over its target tokens, and that target count."""

    def loss(self, model: nn.Module, samples: list[Sample], indices: list[int]) -> tuple[Tensor, int]:
        ...


def next_token_loss_sum(model: nn.Module, samples: list[Sample], device=None) -> tuple[Tensor, int]:
    """Summed cross-entropy of the trained tokens of samples, and their count."""
    inputs, labels = collate(samples)
    inputs, labels = inputs.to(device), labels.to(device)
    logits = model(inputs)  # (B, T, vocab) fp32
    loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=IGNORE, reduction="sum")
    return loss, int((labels != IGNORE).sum())


class NextTokenTask:
    """Plain language-model fine-tuning: cross-entropy on the trained tokens."""

    def __init__(self, device=None):
        self.device = device

    def loss(self, model, samples, indices):
        return next_token_loss_sum(model, samples, self.device)


def samples_digest(samples: list[Sample]) -> str:
    """A hash of the training tokens and masks: a resume on other data is refused."""
    h = hashlib.sha256()
    for s in samples:
        h.update(json.dumps([s.tokens, s.trained]).encode())
    return h.hexdigest()[:16]


def n_targets(samples: list[Sample]) -> int:
    return sum(sum(s.trained[1:]) for s in samples)


# ---- processes --------------------------------------------------------------------------------------

@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, x: float) -> float:
        if self.world == 1:
            return x
        t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return float(t)


def init_distributed() -> Dist:
    """One process, or this process's place under torchrun (the process group is set up once)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return Dist(rank, world, device)


def wrap_model(model: nn.Module, d: Dist, fsdp: bool) -> nn.Module:
    """DDP or FSDP2 under torchrun; the model itself in one process."""
    if d.world == 1:
        return model
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)  # the root: embeddings, final norm, head (tied weights stay together)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[d.device.index] if d.device.type == "cuda" else None)


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations in the backward pass instead of keeping them."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.layers:
        layer.forward = functools.partial(checkpoint, layer.forward, use_reentrant=False)


# ---- checkpoints ------------------------------------------------------------------------------------

def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def trainable_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters as full CPU tensors (gathered from every rank under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(cpu_offload=True, ignore_frozen_params=True))


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(cpu_offload=True))


def save_training_state(out_dir: Path, model: nn.Module, optimizer, step: int, meta: dict, d: Dist) -> None:
    """OUT/checkpoint/: trainable weights, optimizer state and the step, written by rank 0."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    weights = trainable_state_dict(model)
    optim = get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
    if d.main:
        tmp = out_dir / (CHECKPOINT_DIR + ".tmp")
        tmp.mkdir(parents=True, exist_ok=True)
        torch.save(weights, tmp / "trainable.pt")
        torch.save(optim, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({"step": step, **meta}, indent=2) + "\n")
        final = out_dir / CHECKPOINT_DIR
        if final.exists():
            for f in final.iterdir():
                f.unlink()
            final.rmdir()
        tmp.rename(final)  # a crash mid-save leaves the previous checkpoint intact
    if d.world > 1:
        dist.barrier()


def load_training_state(out_dir: Path, model: nn.Module, optimizer, meta: dict) -> int:
    """Restore the checkpoint in OUT/checkpoint/; returns the step to continue from. The run's data
    settings must match the saved ones, or the data order would silently differ."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    ckpt = out_dir / CHECKPOINT_DIR
    if not (ckpt / "trainer.json").is_file():
        raise FileNotFoundError(f"{ckpt}: no checkpoint to resume from")
    saved = json.loads((ckpt / "trainer.json").read_text())
    for key, value in meta.items():
        if key in saved and saved[key] != value:
            raise ValueError(f"{ckpt}: cannot resume: {key} was {saved[key]!r}, now {value!r}")
    weights = torch.load(ckpt / "trainable.pt", map_location="cpu", weights_only=True)
    set_model_state_dict(model, weights, options=_state_options(strict=False))
    optim = torch.load(ckpt / "optimizer.pt", map_location="cpu", weights_only=False)
    set_optimizer_state_dict(model, optimizer, optim, options=_state_options())
    return int(saved["step"])


# ---- evaluation -------------------------------------------------------------------------------------

@torch.no_grad()
def evaluate(model: nn.Module, samples: list[Sample], batch_size: int, d: Dist | None = None,
             max_batches: int | None = None) -> float:
    """Mean next-token loss over the trained tokens of held-out samples (each rank takes every world-th)."""
    d = d or Dist()
    was_training = model.training
    model.eval()
    batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)][:max_batches]
    total = count = 0.0
    # Every rank runs the same number of forwards (FSDP gathers weights in each); a rank without a batch
    # of its own left runs the first one again and drops the result.
    for j in range(math.ceil(len(batches) / d.world)):
        k = j * d.world + d.rank
        loss, n = next_token_loss_sum(model, batches[k if k < len(batches) else 0], d.device)
        if k < len(batches):
            total, count = total + float(loss), count + n
    model.train(was_training)
    total, count = d.all_sum(total), d.all_sum(count)
    return total / count if count else float("nan")


# ---- the loop ---------------------------------------------------------------------------------------

@dataclass
class TrainResult:
    step: int
    train_loss: float | None
    eval_loss: float | None
    history: list[dict]
    tokens_per_s: float


def train(model: nn.Module, task: Task, train_samples: list[Sample], eval_samples: list[Sample],
          cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, d: Dist | None = None,
          on_log: Callable[[dict], None] | None = None, run_meta: dict | None = None) -> TrainResult:
    """Train the model's trainable parameters in place. Returns the last losses and the log history.

    run_meta: what else must not change between a run and its resume (the method, the teacher, ...)."""
    cfg.validate()
    d = d or init_distributed()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.train()
    if cfg.activation_checkpointing:
        enable_activation_checkpointing(model)
    net = wrap_model(model, d, cfg.fsdp)
    params = [p for p in net.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    # The settings that fix the data order; a resume with different ones is refused.
    meta = {"seed": cfg.seed, "global_batch": cfg.batch_size * cfg.grad_accum * d.world,
            "data_sha256": samples_digest(train_samples), **(run_meta or {})}
    meta = json.loads(json.dumps(meta))  # as it reads back from trainer.json (tuples become lists)
    start = load_training_state(out_dir, net, optimizer, meta) if resume else 0
    batches = Batches(train_samples, cfg.batch_size, cfg.grad_accum, seed=cfg.seed, rank=d.rank, world=d.world)
    history: list[dict] = []
    log_path = out_dir / LOG_FILE
    train_loss = eval_loss = None
    tokens_seen, t0 = 0, time.perf_counter()

    from tqdm import tqdm

    bar = tqdm(total=cfg.steps, initial=start, disable=not (cfg.progress and d.main), unit="step",
               dynamic_ncols=True)
    for step in range(start, cfg.steps):
        lr = cfg.lr_at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(cfg.seed * 1_000_003 + step * d.world + d.rank)  # dropout: a function of the step
        micro = [batches.micro_batch(step, m) for m in range(cfg.grad_accum)]
        idx = [batches.indices(step, m) for m in range(cfg.grad_accum)]
        n_global = d.all_sum(sum(n_targets(s) for s in micro))
        loss_total = 0.0
        for m, samples in enumerate(micro):
            last = m == cfg.grad_accum - 1
            sync = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
            with sync:
                loss_sum, _ = task.loss(net, samples, idx[m])
                (loss_sum * (d.world / n_global)).backward()
            loss_total += float(loss_sum.detach())
            tokens_seen += sum(len(s) - 1 for s in samples) * d.world
        if cfg.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        train_loss = d.all_sum(loss_total) / n_global
        tok_s = tokens_seen / max(time.perf_counter() - t0, 1e-9)
        record = {"step": step + 1, "loss": round(train_loss, 6), "lr": lr, "tokens_per_s": round(tok_s, 1)}
        done = step + 1 == cfg.steps
        if eval_samples and ((cfg.eval_every and (step + 1) % cfg.eval_every == 0) or done):
            eval_loss = evaluate(net, eval_samples, cfg.batch_size, d, cfg.eval_batches)
            record["eval_loss"] = round(eval_loss, 6)
        history.append(record)
        if d.main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            if on_log:
                on_log(record)
        postfix = {"loss": f"{train_loss:.4f}", "tok/s": f"{tok_s:.0f}"}
        if eval_loss is not None:
            postfix["eval"] = f"{eval_loss:.4f}"
        bar.set_postfix(postfix, refresh=False)
        bar.update(1)
        if (cfg.save_every and (step + 1) % cfg.save_every == 0) or done:
            save_training_state(out_dir, net, optimizer, step + 1, meta, d)
    bar.close()
    if start >= cfg.steps and eval_samples:  # resumed a finished run: report its held-out loss
        eval_loss = evaluate(net, eval_samples, cfg.batch_size, d, cfg.eval_batches)
    model.eval()
    tok_s = tokens_seen / max(time.perf_counter() - t0, 1e-9)
    return TrainResult(cfg.steps, train_loss, eval_loss, history, tok_s)


def config_dict(cfg: TrainConfig) -> dict:
    return dataclasses.asdict(cfg)
