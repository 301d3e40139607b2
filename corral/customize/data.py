"""Training data for fine-tuning and distillation: files -> token samples -> deterministic batches.

Two kinds of data, one sample type:
  - chat: OpenAI messages JSONL, one conversation per line (`{"messages": [{"role": ..., "content": ...}]}`),
    rendered with the model's own chat format (`corral.tokenizer.chat`); only the assistant turns are
    trained on. A turn's tokens are found by rendering the conversation up to it with and without it:
    the tokens the longer rendering adds are the reply (its end-of-turn token included).
  - text: plain text (a .txt/.md file, a directory of them, or JSONL lines `{"text": ...}`), documents
    joined by EOS and cut into windows of seq_len + 1 tokens; every token is trained on.

A `Sample` is the tokens of one sequence and a `trained` flag per token (the target mask). Batches are
a pure function of (seed, step): `Batches.micro_batch(step, micro)` draws from a per-epoch permutation,
so a resumed run sees the same data in the same order, and under torchrun every rank takes its own
slice of the same global batch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

IGNORE = -100  # label of a position that is not trained on (torch's cross_entropy ignore_index)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")


class DatasetError(ValueError):
    """A dataset that cannot be used; the message names the file and, for JSONL, the line."""


@dataclass
class Sample:
    tokens: list[int]
    trained: list[bool]  # trained[i]: tokens[i] is a target (predicted from tokens[:i])

    def __len__(self) -> int:
        return len(self.tokens)


# ---- reading files ----------------------------------------------------------------------------------

def read_records(path: str | Path) -> list[dict]:
    """A dataset file or directory -> records {"messages": [...]} or {"text": str}, each with its "where".

    JSONL lines are checked here: a line that is not a JSON object with a "messages" list of role/content
    objects or a "text" string fails with its line number. Text files are one record each."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DatasetError(f"{path}: no such file or directory")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (*TEXT_SUFFIXES, ".jsonl"))
        if not files:
            raise DatasetError(f"{path}: no .jsonl or text files ({', '.join(TEXT_SUFFIXES)}) in the directory")
        return [r for f in files for r in read_records(f)]
    if path.suffix == ".jsonl":
        return list(_read_jsonl(path))
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DatasetError(f"{path}: not UTF-8 text ({e})") from None
    return [{"text": text, "where": str(path)}] if text.strip() else []


def _read_jsonl(path: Path):
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            where = f"{path}:{lineno}"
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DatasetError(f"{where}: not valid JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise DatasetError(f"{where}: expected a JSON object, got {type(record).__name__}")
            if "messages" in record:
                _check_messages(record["messages"], where)
                yield {"messages": record["messages"], "where": where}
            elif isinstance(record.get("text"), str):
                yield {"text": record["text"], "where": where}
            else:
                raise DatasetError(f'{where}: expected {{"messages": [...]}} (chat) or {{"text": "..."}} (plain text)')


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DatasetError(f"{where}: messages must be a non-empty list")
    for j, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant", "tool", "ipython"):
            raise DatasetError(f"{where}: messages[{j}] needs a role of system, user, assistant or tool")
        if not isinstance(m.get("content"), (str, list)) and not m.get("tool_calls"):
            raise DatasetError(f"{where}: messages[{j}] needs a content string (or tool_calls)")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: no assistant message, so nothing to train on")


# ---- tokenizing -------------------------------------------------------------------------------------

def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def tokenize_chat(messages: list[dict], chat_format, where: str = "messages") -> Sample:
    """One conversation -> a Sample that trains on the assistant turns only.

    For each assistant turn i, render messages[:i] with the generation prompt (ends in the assistant
    header) and messages[:i+1] without it; the tokens after their common prefix are the reply and its
    end-of-turn token. Rendering whole conversations, not turns, keeps whatever the template does between
    turns (a default system prompt, separators) exactly as at inference."""
    try:
        full = chat_format.encode_dialog(messages, add_generation_prompt=False)
        trained = [False] * len(full)
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            before = chat_format.encode_dialog(messages[:i], add_generation_prompt=True) if i else []
            upto = chat_format.encode_dialog(messages[: i + 1], add_generation_prompt=False)
            start = _common_prefix(before, upto)
            end = len(upto)
            if full[:end] != upto:  # the template renders earlier turns differently once later ones follow
                raise DatasetError(f"{where}: the chat template renders the conversation differently turn by "
                                   "turn; cannot tell which tokens are the assistant's")
            trained[start:end] = [True] * (end - start)
    except ValueError as e:
        if isinstance(e, DatasetError):
            raise
        raise DatasetError(f"{where}: {e}") from None
    return Sample(full, trained)


def tokenize_text(text: str, tokenizer) -> list[int]:
    """A document's ids: BOS first where the tokenizer adds one by default, EOS last."""
    bos = tokenizer.bos_id is not None and getattr(tokenizer, "add_bos", True)
    return tokenizer.encode(text, bos=bos) + [tokenizer.eos_id]


def pack_text(documents: list[list[int]], seq_len: int) -> list[Sample]:
    """Documents joined into one stream and cut into windows of seq_len + 1 tokens (inputs + shifted targets).
    The last partial window is kept if it holds at least two tokens."""
    stream = [t for doc in documents for t in doc]
    window = seq_len + 1
    samples = []
    for start in range(0, len(stream), window):
        chunk = stream[start:start + window]
        if len(chunk) >= 2:
            samples.append(Sample(chunk, [False] + [True] * (len(chunk) - 1)))
    return samples


def load_samples(path: str | Path | list[dict], tokenizer, chat_format=None, *, seq_len: int = 512,
                 chat_format_error: str | None = None) -> list[Sample]:
    """A dataset path (or its `read_records`) -> Samples of at most seq_len + 1 tokens. Chat records need
    `chat_format`; text records are packed. Conversations longer than seq_len + 1 are cut (their tail is
    not trained on)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    records = read_records(path) if isinstance(path, (str, Path)) else path
    if not records:
        raise DatasetError(f"{path}: the dataset is empty" if isinstance(path, (str, Path)) else "the dataset is empty")
    samples, documents = [], []
    for r in records:
        if "messages" in r:
            if chat_format is None:
                why = f" ({chat_format_error})" if chat_format_error else ""
                raise DatasetError(f"{r['where']}: chat data needs a model with a chat format{why}")
            s = tokenize_chat(r["messages"], chat_format, r["where"])
            samples.append(Sample(s.tokens[: seq_len + 1], s.trained[: seq_len + 1]))
        else:
            documents.append(tokenize_text(r["text"], tokenizer))
    samples += pack_text(documents, seq_len)
    samples = [s for s in samples if any(s.trained[1:])]
    if not samples:
        raise DatasetError(f"{records[0]['where'].split(':')[0]}: no trainable tokens (every assistant turn "
                           f"cut off by the sequence length {seq_len}?)")
    return samples


def split_samples(samples: list[Sample], eval_fraction: float, seed: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Hold out a fraction of the samples (at least one when there are two or more) for evaluation."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"the eval fraction must be in [0, 1), got {eval_fraction}")
    n_eval = 0 if eval_fraction == 0 or len(samples) < 2 else max(1, round(len(samples) * eval_fraction))
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:n_eval])
    return [s for i, s in enumerate(samples) if i not in held], [samples[i] for i in sorted(held)]


# ---- batching ---------------------------------------------------------------------------------------

def collate(samples: list[Sample], pad_id: int = 0) -> tuple[Tensor, Tensor]:
    """Samples -> inputs (B, T) and labels (B, T), T = longest sample - 1; padding gets label IGNORE."""
    t = max(len(s) for s in samples) - 1
    inputs = torch.full((len(samples), t), pad_id, dtype=torch.long)
    labels = torch.full((len(samples), t), IGNORE, dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s) - 1
        inputs[b, :n] = torch.tensor(s.tokens[:-1])
        targets = torch.tensor(s.tokens[1:])
        labels[b, :n] = torch.where(torch.tensor(s.trained[1:]), targets, IGNORE)
    return inputs, labels


class Batches:
    """Deterministic batches: global sample k of the run is permutation_{k // n}[k % n], the permutation
    of epoch e drawn from seed + e. A step of `accum` micro-batches of `batch_size` samples per rank takes
    global samples [step * G, (step + 1) * G), G = accum * batch_size * world; rank r takes its own
    batch_size of each micro-batch. So the data of step s does not depend on how the run got there."""

    def __init__(self, samples: list, batch_size: int, accum: int = 1, *, seed: int = 0, rank: int = 0,
                 world: int = 1):
        if not samples:
            raise ValueError("no samples to batch")
        self.samples, self.batch_size, self.accum = samples, batch_size, accum
        self.seed, self.rank, self.world = seed, rank, world
        self._perms: dict[int, list[int]] = {}

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.accum * self.world

    def _index(self, k: int) -> int:
        n = len(self.samples)
        epoch = k // n
        if epoch not in self._perms:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perms = {epoch: torch.randperm(n, generator=g).tolist()}  # keep one epoch's permutation
        return self._perms[epoch][k % n]

    def indices(self, step: int, micro: int) -> list[int]:
        first = step * self.global_batch + (micro * self.world + self.rank) * self.batch_size
        return [self._index(k) for k in range(first, first + self.batch_size)]

    def micro_batch(self, step: int, micro: int) -> list:
        return [self.samples[i] for i in self.indices(step, micro)]

    def used(self, steps: int) -> list[int]:
        """The sample indices that steps 0..steps-1 visit, on all ranks together, sorted."""
        return sorted({self._index(k) for k in range(steps * self.global_batch)})
