"""`corral distill`: logit distillation of a student from a teacher (Llama 3.2 1B/3B's recipe, small).

The loss at each trained position is the forward KL from the teacher's distribution to the student's,
both at temperature T, scaled by T^2 (Hinton et al.), optionally mixed with the next-token loss:

    loss = kd_weight * T^2 * KL(p_teacher,T || p_student,T) + (1 - kd_weight) * CE(student, next token)

The teacher's distribution is kept to its top-k logits, renormalised over those k (sparse KD): the
student's log-probabilities over the whole vocabulary are read at the k teacher tokens, so the student
is pushed to put its mass where the teacher's top-k is. With k = vocab this is the exact KL.

The teacher runs once: its top-k logits for every training sequence the run will visit (all of them
once the steps cover an epoch) are written to a cache directory (`values.npy` fp32 and `indices.npy`
int32, (n_sequences, seq_len, k), memory-mapped when read), keyed by the teacher's files, the token ids of
those sequences, k, the sequence length and the teacher's dtype; a second run with the same key reads the
cache. The teacher loads with the engine's int8 weight-only quantization
by default (`corral/engine/quantize.py`), a quarter of its fp32 memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from corral.customize.data import IGNORE, Batches, Sample, collate
from corral.customize.train import Dist, TrainConfig, config_dict, full_state_dict, init_distributed, train

CACHE_VERSION = 1


# ---- the loss ---------------------------------------------------------------------------------------

def kd_loss_sum(student_logits: Tensor, teacher_values: Tensor, teacher_indices: Tensor,
                temperature: float = 1.0) -> Tensor:
    """Summed T^2 * KL(teacher_T || student_T) over N positions.

    student_logits (N, V); teacher_values (N, k) the teacher's top-k logits at teacher_indices (N, k).
    The teacher distribution is softmax over its k logits / T; the student's log-probs are the full
    log-softmax / T read at those k tokens."""
    t = temperature
    log_p = F.log_softmax(teacher_values.float() / t, dim=-1)  # (N, k) teacher, renormalised over its top-k
    log_q = F.log_softmax(student_logits.float() / t, dim=-1).gather(-1, teacher_indices.long())  # (N, k)
    return (log_p.exp() * (log_p - log_q)).sum() * t * t


# ---- the teacher cache ------------------------------------------------------------------------------

def _files_fingerprint(path: Path) -> list:
    """Name, size and mtime of a checkpoint's files: a changed teacher is a new cache key."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    return [(p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def cache_key(teacher_path: Path, samples: list[Sample], k: int, seq_len: int, teacher_dtype: str,
              rows: list[int]) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "teacher": str(teacher_path.resolve()),
                         "files": _files_fingerprint(teacher_path), "k": k, "seq_len": seq_len,
                         "teacher_dtype": teacher_dtype, "rows": rows}).encode())
    for i in rows:
        h.update(np.asarray(samples[i].tokens, dtype=np.int64).tobytes())
        h.update(b"|")
    return h.hexdigest()[:24]


@dataclass
class TeacherCache:
    """Top-k teacher logits for some of a list of samples: row r of values (n, seq_len, k) fp32 and
    indices (int32) belongs to sample rows[r]."""

    path: Path | None
    values: np.ndarray
    indices: np.ndarray
    computed: bool  # whether this call ran the teacher (False: read from an earlier run)
    rows: list[int] | None = None  # sample index of each row (None: row i is sample i)

    def __post_init__(self):
        self._row = None if self.rows is None else {s: r for r, s in enumerate(self.rows)}

    def batch(self, sample_indices: list[int], t: int) -> tuple[Tensor, Tensor]:
        """(B, t, k) values and indices for a batch whose inputs are t positions long."""
        rows = sample_indices if self._row is None else [self._row[i] for i in sample_indices]
        v = torch.from_numpy(np.stack([self.values[r, :t] for r in rows]))
        ix = torch.from_numpy(np.stack([self.indices[r, :t] for r in rows]).astype(np.int64))
        return v, ix


@torch.no_grad()
def teacher_top_k(model, samples: list[Sample], k: int, batch_size: int = 8, device=None,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Run the teacher over samples: (n, seq_len, k) top-k logits and their token ids (zeros past a sample's end)."""
    from tqdm import tqdm

    t_max = max(len(s) for s in samples) - 1
    values = np.zeros((len(samples), t_max, k), dtype=np.float32)
    indices = np.zeros((len(samples), t_max, k), dtype=np.int32)
    for start in tqdm(range(0, len(samples), batch_size), desc="teacher", disable=not progress, unit="batch"):
        batch = samples[start:start + batch_size]
        inputs, _ = collate(batch)
        logits = model(inputs.to(device))  # (B, T, V) fp32
        top = logits.topk(k, dim=-1)
        for b, s in enumerate(batch):
            n = len(s) - 1
            values[start + b, :n] = top.values[b, :n].cpu().numpy()
            indices[start + b, :n] = top.indices[b, :n].cpu().numpy()
    return values, indices


def teacher_cache(teacher: str | Path, samples: list[Sample], *, k: int, seq_len: int, cache_dir: str | Path,
                  teacher_dtype: str = "int8", batch_size: int = 8, d: Dist | None = None,
                  progress: bool = False, rows: list[int] | None = None) -> TeacherCache:
    """The teacher's top-k logits for samples (only those listed in rows, if given), from the cache or
    computed once (by rank 0) and cached."""
    from corral.checkpoints.download import resolve_model

    d = d or Dist()
    if teacher_dtype not in ("int8", "fp32", "bf16"):
        raise ValueError(f"teacher dtype must be int8, fp32 or bf16, got {teacher_dtype!r}")
    rows = list(range(len(samples))) if rows is None else sorted(rows)
    teacher_path = Path(resolve_model(teacher))
    key = cache_key(teacher_path, samples, k, seq_len, teacher_dtype, rows)
    path = Path(cache_dir).expanduser() / key
    computed = False
    if d.main and not (path / "meta.json").is_file():
        from corral.checkpoints import load_model

        quantize = "int8" if teacher_dtype == "int8" else None
        dtype = torch.bfloat16 if teacher_dtype == "bf16" else torch.float32
        model, _ = load_model(teacher_path, dtype=dtype, quantize=quantize, device=d.device)
        t0 = time.perf_counter()
        values, indices = teacher_top_k(model, [samples[i] for i in rows], k, batch_size, d.device, progress)
        seconds = time.perf_counter() - t0
        del model
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        np.save(tmp / "values.npy", values)
        np.save(tmp / "indices.npy", indices)
        meta = {"teacher": str(teacher_path), "k": k, "seq_len": seq_len, "teacher_dtype": teacher_dtype,
                "n_samples": len(rows), "n_tokens": sum(len(samples[i]) - 1 for i in rows),
                "seconds": round(seconds, 2)}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
        if path.exists():  # another process finished first: keep its copy
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
        else:
            tmp.rename(path)
        computed = True
    if d.world > 1:
        torch.distributed.barrier()
    values = np.load(path / "values.npy", mmap_mode="r")
    indices = np.load(path / "indices.npy", mmap_mode="r")
    if values.shape[0] != len(rows) or values.shape[2] != k:
        raise ValueError(f"{path}: the cached teacher logits have shape {values.shape}, expected "
                         f"({len(rows)}, *, {k}); delete the directory to recompute")
    return TeacherCache(path, values, indices, computed, rows)


# ---- training ---------------------------------------------------------------------------------------

class DistillTask:
    """The distillation loss of a micro-batch, the teacher's top-k read from the cache by sample index."""

    def __init__(self, cache: TeacherCache, temperature: float = 1.0, kd_weight: float = 1.0, device=None):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not 0 <= kd_weight <= 1:
            raise ValueError(f"kd_weight must be in [0, 1], got {kd_weight}")
        self.cache, self.temperature, self.kd_weight, self.device = cache, temperature, kd_weight, device

    def loss(self, model, samples: list[Sample], indices: list[int]) -> tuple[Tensor, int]:
        inputs, labels = collate(samples)
        values, top_ids = self.cache.batch(indices, inputs.shape[1])  # (B, T, k)
        inputs, labels = inputs.to(self.device), labels.to(self.device)
        logits = model(inputs)  # (B, T, V)
        mask = labels != IGNORE
        loss = self.kd_weight * kd_loss_sum(logits[mask], values.to(self.device)[mask], top_ids.to(self.device)[mask],
                                            self.temperature)
        if self.kd_weight < 1:
            ce = F.cross_entropy(logits[mask], labels[mask], reduction="sum")
            loss = loss + (1 - self.kd_weight) * ce
        return loss, int(mask.sum())


def default_cache_dir() -> Path:
    from corral.paths import corral_home

    return corral_home() / "distill-cache"


@dataclass
class DistillResult:
    out: Path
    result: object  # train.TrainResult
    cache: TeacherCache
    recipe: dict


PROBE = "Distillation needs one tokenizer: 3 rivers, 12 bridges; naïve café — 東京 🙂"


def check_same_vocabulary(teacher_ckpt, student_ckpt, student_tokenizer, teacher, student) -> None:
    """Teacher and student must number tokens alike: same vocabulary size and the same ids for a probe text."""
    from corral.checkpoints import load_tokenizer

    tv, sv = teacher_ckpt.config.vocab_size, student_ckpt.config.vocab_size
    if tv != sv:
        raise ValueError(f"teacher {teacher} has a vocabulary of {tv} tokens and student {student} one of {sv}: "
                         "distillation needs the same tokenizer")
    if load_tokenizer(teacher_ckpt).encode(PROBE) != student_tokenizer.encode(PROBE):
        raise ValueError(f"teacher {teacher} and student {student} tokenize text differently: distillation needs "
                         "the same tokenizer")


def distill(teacher: str | Path, student: str | Path, data: str | Path, out: str | Path, *, top_k: int = 64,
            temperature: float = 1.0, kd_weight: float = 1.0, teacher_dtype: str = "int8",
            train_config: TrainConfig | None = None, seq_len: int = 512, eval_data: str | Path | None = None,
            eval_fraction: float = 0.05, cache_dir: str | Path | None = None, resume: bool = False,
            on_log=None) -> DistillResult:
    """Train every weight of `student` on the teacher's top-k logits over `data`; write a HF checkpoint to `out`."""
    from corral.checkpoints import load_checkpoint
    from corral.checkpoints.download import resolve_model
    from corral.checkpoints.save import save_hf
    from corral.customize.finetune import check_out_dir, prepare

    cfg = train_config or TrainConfig()
    cfg.validate()
    if top_k < 1:
        raise ValueError(f"top-k must be >= 1, got {top_k}")
    DistillTask(None, temperature, kd_weight)  # check the numbers before any model loads
    out = Path(out).expanduser()
    check_out_dir(out, resume)
    teacher_ckpt = load_checkpoint(resolve_model(teacher))  # a bad teacher path fails before training
    teacher_config = teacher_ckpt.config
    d = init_distributed()
    torch.manual_seed(cfg.seed)
    prep = prepare(student, data, seq_len=seq_len, eval_data=eval_data, eval_fraction=eval_fraction, seed=cfg.seed)
    check_same_vocabulary(teacher_ckpt, prep.checkpoint, prep.tokenizer, teacher, student)
    del teacher_ckpt  # its tensors are memory-mapped; the teacher is loaded again, quantized, if it has to run
    if top_k > teacher_config.vocab_size:
        raise ValueError(f"top-k {top_k} exceeds the vocabulary of {teacher_config.vocab_size}")
    # The teacher runs on the sequences this run visits only (a short run over a large corpus needs few).
    used = Batches(prep.train, cfg.batch_size, cfg.grad_accum, seed=cfg.seed, world=d.world).used(cfg.steps)
    cache = teacher_cache(teacher, prep.train, k=top_k, seq_len=seq_len,
                          cache_dir=cache_dir or default_cache_dir(), teacher_dtype=teacher_dtype,
                          batch_size=cfg.batch_size, d=d, progress=cfg.progress and d.main, rows=used)
    net = prep.model.to(d.device).requires_grad_(True)
    task = DistillTask(cache, temperature, kd_weight, d.device)
    result = train(net, task, prep.train, prep.eval, cfg, out, resume=resume, d=d, on_log=on_log,
                   run_meta={"command": "distill", "teacher_cache": cache.path.name, "temperature": temperature,
                             "kd_weight": kd_weight})
    recipe = {"command": "distill", "teacher": str(teacher), "student": str(student), "data": str(data),
              "eval_data": str(eval_data) if eval_data else None, "seq_len": seq_len, "top_k": top_k,
              "temperature": temperature, "kd_weight": kd_weight, "teacher_dtype": teacher_dtype,
              "teacher_cache": str(cache.path), "n_train_samples": len(prep.train),
              "n_eval_samples": len(prep.eval), "train": config_dict(cfg), "world_size": d.world,
              "final_train_loss": result.train_loss, "final_eval_loss": result.eval_loss,
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    state = full_state_dict(net)
    if d.main:
        save_hf(out, state, net.config, tokenizer_from=prep.checkpoint, recipe=recipe)
    return DistillResult(out, result, cache, recipe)
