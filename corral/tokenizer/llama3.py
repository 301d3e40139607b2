"""Meta's Llama 3 tokenizer (3.1 / 3.2 / 3.3 text and vision): tiktoken BPE over `tokenizer.model`.

`tokenizer.model` is 128,000 lines `base64(token_bytes) rank`; the 256 special tokens follow at ids
128000..128255 with Meta's names (spec §5). Encoding follows Meta's `Tokenizer.encode`: special-token
text inside the input is plain text unless `allow_special`, and the input is cut into 400,000-char
windows and runs of at most 25,000 whitespace / non-whitespace chars (tiktoken panics on longer ones).
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterator, Sequence

import tiktoken

# Meta's pre-tokenizer regex (Tokenizer.pat_str; identical in HF's converter).
PAT_STR = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")

NUM_RESERVED_SPECIAL_TOKENS = 256
SPECIAL_TOKENS = [
    "<|begin_of_text|>",        # 128000 bos
    "<|end_of_text|>",          # 128001 eos
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",  # 128004 pad
    "<|step_id|>",
    "<|start_header_id|>",      # 128006
    "<|end_header_id|>",        # 128007
    "<|eom_id|>",               # 128008 end of message (a tool call awaits its result)
    "<|eot_id|>",               # 128009 end of turn
    "<|python_tag|>",           # 128010
    "<|image|>",                # 128011 (the vision model reads it as 128256)
]
SPECIAL_TOKENS += [f"<|reserved_special_token_{2 + i}|>"
                   for i in range(NUM_RESERVED_SPECIAL_TOKENS - len(SPECIAL_TOKENS))]

TIKTOKEN_MAX_ENCODE_CHARS = 400_000
MAX_NO_WHITESPACES_CHARS = 25_000


def load_tiktoken_bpe(path: Path) -> dict[bytes, int]:
    """Read `base64(token) rank` lines (blank lines skipped), failing loudly on a malformed line."""
    ranks: dict[bytes, int] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split()
            try:
                token, rank = parts
                ranks[base64.b64decode(token, validate=True)] = int(rank)
            except Exception as e:
                raise ValueError(f"{path}:{lineno}: expected 'base64_token rank', got {line.strip()[:80]!r}") from e
    if not ranks:
        raise ValueError(f"{path}: no BPE ranks found (is this a tiktoken tokenizer.model?)")
    return ranks


def split_long_runs(s: str, max_run: int = MAX_NO_WHITESPACES_CHARS) -> Iterator[str]:
    """Cut `s` so no piece holds more than `max_run` consecutive whitespace or non-whitespace chars."""
    run_len = 0
    run_is_space = s[0].isspace() if s else False
    start = 0
    for i, ch in enumerate(s):
        is_space = ch.isspace()
        if run_is_space ^ is_space:
            run_len, run_is_space = 1, is_space
        else:
            run_len += 1
            if run_len > max_run:
                yield s[start:i]
                start, run_len = i, 1
    yield s[start:]


class Llama3Tokenizer:
    """The `Tokenizer` protocol over Meta's tiktoken model."""

    def __init__(self, path: str | Path):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Llama 3 tokenizer model not found: {path}")
        ranks = load_tiktoken_bpe(path)
        n_base = len(ranks)
        self.special_tokens: dict[str, int] = {tok: n_base + i for i, tok in enumerate(SPECIAL_TOKENS)}
        self.model = tiktoken.Encoding(name=path.name, pat_str=PAT_STR, mergeable_ranks=ranks,
                                       special_tokens=self.special_tokens)
        self.path = path
        self.vocab_size = n_base + len(SPECIAL_TOKENS)  # 128256
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.eot_id = self.special_tokens["<|eot_id|>"]
        self.eom_id = self.special_tokens["<|eom_id|>"]
        self.python_tag_id = self.special_tokens["<|python_tag|>"]
        self.image_id = self.special_tokens["<|image|>"]
        self.pad_id = self.special_tokens["<|finetune_right_pad_id|>"]
        self.stop_ids = frozenset({self.eos_id, self.eom_id, self.eot_id})
        self.bos_token, self.eos_token = "<|begin_of_text|>", "<|end_of_text|>"
        self.chat_template = None  # Llama 3 chat goes through chat.Llama3ChatFormat, not a template

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        allowed = "all" if allow_special else set()
        ids: list[int] = [self.bos_id] if bos else []
        for i in range(0, len(text), TIKTOKEN_MAX_ENCODE_CHARS):
            for piece in split_long_runs(text[i:i + TIKTOKEN_MAX_ENCODE_CHARS]):
                # disallowed_special=(): special-token text that is not allowed is ordinary text.
                ids.extend(self.model.encode(piece, allowed_special=allowed, disallowed_special=()))
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.model.decode(list(ids))

    def token_bytes(self, token_id: int) -> bytes:
        return self.model.decode_single_token_bytes(token_id)

    def __repr__(self) -> str:
        return f"Llama3Tokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"
