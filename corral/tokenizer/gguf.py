"""Build a tokenizer from GGUF metadata (`tokenizer.ggml.*` keys), as llama.cpp reads it.

Supported: `tokenizer.ggml.model == "gpt2"` (byte-level BPE: SmolLM2, Llama 3 GGUFs, ...). The
pre-tokenizer is chosen by `tokenizer.ggml.pre`, following llama.cpp's table:
- "llama-bpe" / "llama3": Meta's Llama 3 regex, and whole pre-tokens found in the vocabulary skip the merges
  (`ignore_merges`, which is what tiktoken does);
- "smollm" (and the StarCoder-family names llama.cpp groups with it): every digit is its own pre-token, then
  GPT-2's regex. NOTE: transformers' GGUF loader ignores `tokenizer.ggml.pre` and uses GPT-2's regex alone,
  so it tokenizes multi-digit numbers differently from the model's own tokenizer; we follow llama.cpp and the
  original SmolLM2 tokenizer.json (Digits(individual_digits) + ByteLevel).
- "gpt2" / "default": GPT-2's regex.
Control tokens (token_type 3) and user-defined tokens (4) become added tokens matched in text (the control
ones as special tokens). SentencePiece vocabularies (`"llama"`) are not supported yet: a clear error says so.
"""

from __future__ import annotations

from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers

from corral.tokenizer.hf import HFTokenizer
from corral.tokenizer.llama3 import PAT_STR as LLAMA3_PAT_STR

# llama.cpp token types
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva"}
_LLAMA3 = {"llama-bpe", "llama3"}
_GPT2 = {"gpt2", "default", "gpt-2"}

# End-of-generation tokens llama.cpp recognises by their text (besides eos / eot / eom ids).
_END_TEXTS = {"<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>",
              "<|end|>", "<EOT>", "<|return|>"}


def _pre_tokenizer(pre: str) -> tuple[pre_tokenizers.PreTokenizer, bool]:
    """The pre-tokenizer for a `tokenizer.ggml.pre` name, and whether whole pre-tokens skip the merges."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=True)
    if pre in _LLAMA3:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_PAT_STR), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]), True
    if pre in _DIGITS_THEN_GPT2:
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), False
    if pre in _GPT2:
        return byte_level, False
    known = ", ".join(sorted(_LLAMA3 | _DIGITS_THEN_GPT2 | _GPT2))
    raise ValueError(f"GGUF tokenizer.ggml.pre={pre!r} is not supported (supported: {known})")


def _require(metadata: dict, key: str, kind: type | tuple[type, ...], what: str) -> Any:
    if key not in metadata:
        raise ValueError(f"GGUF metadata has no {key!r}")
    value = metadata[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"GGUF metadata {key!r} must be {what}, got {type(value).__name__}")
    return value


def tokenizer_from_gguf(metadata: dict) -> HFTokenizer:
    """GGUF key/value metadata (plain Python values) -> HFTokenizer."""
    model = metadata.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"GGUF tokenizer.ggml.model={model!r} is not supported: Corral reads byte-level BPE "
                         "vocabularies ('gpt2'); SentencePiece ('llama') GGUF vocabularies are not implemented")
    tokens = list(_require(metadata, "tokenizer.ggml.tokens", (list, tuple), "a list of strings"))
    merges_raw = list(_require(metadata, "tokenizer.ggml.merges", (list, tuple), "a list of strings"))
    types = list(metadata.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens))
    if len(types) != len(tokens):
        raise ValueError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    pre = str(metadata.get("tokenizer.ggml.pre", "default"))
    pre_tokenizer, ignore_merges = _pre_tokenizer(pre)

    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)  # a few GGUF vocabularies repeat a string; the first id wins (as in llama.cpp)
    merges = []
    for n, m in enumerate(merges_raw):
        parts = m.split(" ")
        if len(parts) != 2:
            raise ValueError(f"GGUF tokenizer.ggml.merges[{n}]={m!r} is not two tokens separated by one space")
        merges.append((parts[0], parts[1]))

    tok = tokenizers.Tokenizer(models.BPE(vocab, merges, ignore_merges=ignore_merges))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    added = [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == TOKEN_CONTROL]
    added += [AddedToken(tokens[i], special=False, normalized=False)
              for i, t in enumerate(types) if t == TOKEN_USER_DEFINED]
    tok.add_tokens(added)

    eos_id = _require(metadata, "tokenizer.ggml.eos_token_id", int, "an integer")
    bos_id = metadata.get("tokenizer.ggml.bos_token_id")
    for key, value in (("eos_token_id", eos_id), ("bos_token_id", bos_id)):
        if value is not None and not 0 <= value < len(tokens):
            raise ValueError(f"GGUF tokenizer.ggml.{key}={value} is outside the vocabulary ({len(tokens)} tokens)")
    stop_ids = {eos_id}
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        if isinstance(metadata.get(key), int) and 0 <= metadata[key] < len(tokens):
            stop_ids.add(metadata[key])
    stop_ids |= {i for i, t in enumerate(types) if t == TOKEN_CONTROL and tokens[i] in _END_TEXTS}

    return HFTokenizer(tok, bos_id=bos_id, eos_id=eos_id, stop_ids=sorted(stop_ids),
                       chat_template=metadata.get("tokenizer.chat_template"),
                       bos_token=tokens[bos_id] if bos_id is not None else None, eos_token=tokens[eos_id],
                       add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)))


def read_gguf_metadata(path) -> dict:
    """All key/value metadata of a GGUF file as plain Python values (reads the header; tensors are mmapped)."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {key: field.contents() for key, field in reader.fields.items()}
