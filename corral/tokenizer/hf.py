"""Hugging Face `tokenizers` behind Corral's `Tokenizer` protocol (tokenizer.json checkpoints and GGUF vocabularies).

Notable:
- `encode(..., allow_special=False)` encodes special-token text as plain text, like Meta's tiktoken encoder
  (spec §9 item 10); HF's own default (`allow_special=True` here) maps it to the special id. The switch is the
  tokenizer's `encode_special_tokens` flag, set under a lock for the duration of one encode.
- `token_bytes` gives the raw bytes of a token: byte-level BPE tokens are spelled in GPT-2's printable byte
  alphabet (`Ġ` = space) and are mapped back; SentencePiece tokens map `▁` to a space and `<0xAB>` to one byte.
- `from_dir` reads bos / eos / stop ids from tokenizer_config.json, config.json and generation_config.json
  (instruct models list several eos ids there, e.g. Llama 3's [128001, 128008, 128009]). Whether raw text
  starts with BOS (`add_bos`) is what transformers' AutoTokenizer does: tokenizer.json's post-processor
  (Llama 3 adds <|begin_of_text|> there, with no add_bos_token in its config), except for the classes that
  rebuild it from add_bos_token (LlamaTokenizerFast for Llama 2 / Mistral, Gemma, ...).
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any, Sequence

import tokenizers


def gpt2_byte_decoder() -> dict[str, int]:
    """GPT-2's printable-unicode alphabet back to byte values (the inverse of `bytes_to_unicode`)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


_BYTE_DECODER = gpt2_byte_decoder()


def _uses_component(spec: Any, kind: str) -> bool:
    """Whether a serialized decoder / pre-tokenizer (possibly a Sequence) contains a component of `kind`."""
    if isinstance(spec, dict):
        if spec.get("type") == kind:
            return True
        return any(_uses_component(v, kind) for v in spec.values() if isinstance(v, (dict, list)))
    if isinstance(spec, list):
        return any(_uses_component(v, kind) for v in spec)
    return False


class HFTokenizer:
    """A `tokenizers.Tokenizer` with Corral's encode/decode/token_bytes and the ids generation needs."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, *, bos_id: int | None, eos_id: int,
                 stop_ids: Sequence[int] | None = None, chat_template: str | None = None,
                 bos_token: str | None = None, eos_token: str | None = None, add_bos: bool = False):
        self.tokenizer = tokenizer
        self._lock = threading.Lock()  # guards the encode_special_tokens flag
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        for name, value in (("bos_id", bos_id), ("eos_id", eos_id)):
            if value is not None and not 0 <= value < self.vocab_size:
                raise ValueError(f"{name}={value} is outside the vocabulary (size {self.vocab_size})")
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.stop_ids = frozenset(stop_ids or ()) | {eos_id}
        added = sorted(tokenizer.get_added_tokens_decoder().items())
        self.special_tokens: dict[str, int] = {t.content: i for i, t in added if t.special}
        # special tokens that swallow the whitespace beside them when matched in text (chat.SpecialText)
        self.special_strip: dict[str, tuple[bool, bool]] = {
            t.content: (t.lstrip, t.rstrip) for _, t in added if t.special and (t.lstrip or t.rstrip)}
        self.bos_token = bos_token if bos_token is not None else (
            tokenizer.id_to_token(bos_id) if bos_id is not None else None)
        self.eos_token = eos_token if eos_token is not None else tokenizer.id_to_token(eos_id)
        self.chat_template = chat_template
        self.add_bos = add_bos  # what the checkpoint does by default; chat formats decide explicitly
        decoder = json.loads(tokenizer.decoder.__getstate__()) if tokenizer.decoder is not None else None
        self.byte_level = _uses_component(decoder, "ByteLevel")
        self._token_bytes: list[bytes] | None = None

    # --- loading -------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, directory: str | Path) -> HFTokenizer:
        """Load tokenizer.json (+ tokenizer_config.json, config.json, generation_config.json) from a directory."""
        directory = Path(directory)
        tok_file = directory / "tokenizer.json"
        if not tok_file.is_file():
            raise FileNotFoundError(f"{tok_file} not found (a Hugging Face fast tokenizer is required)")
        tokenizer = tokenizers.Tokenizer.from_file(str(tok_file))
        tok_config = _read_json(directory / "tokenizer_config.json")
        model_config = _read_json(directory / "config.json")
        gen_config = _read_json(directory / "generation_config.json")

        def token_id(field: str, source: str) -> int | None:
            value = tok_config.get(field)
            if isinstance(value, dict):  # {"content": "<s>", "lstrip": false, ...}
                value = value.get("content")
            if value is None:
                return None
            if not isinstance(value, str):
                raise ValueError(f"{source}: field {field!r} must be a string or an AddedToken dict, got {value!r}")
            tid = tokenizer.token_to_id(value)
            if tid is None:
                raise ValueError(f"{source}: {field}={value!r} is not in {tok_file.name}")
            return tid

        cfg_name = str(directory / "tokenizer_config.json")
        bos_id = token_id("bos_token", cfg_name)
        eos_id = token_id("eos_token", cfg_name)
        stop_ids: set[int] = set()
        for source, cfg in ((directory / "config.json", model_config), (directory / "generation_config.json", gen_config)):
            if bos_id is None and isinstance(cfg.get("bos_token_id"), int):
                bos_id = cfg["bos_token_id"]
            eos = cfg.get("eos_token_id")
            if eos is None:
                continue
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(i, int) for i in ids):
                raise ValueError(f"{source}: eos_token_id must be an int or a list of ints, got {eos!r}")
            stop_ids.update(ids)
            if eos_id is None:
                eos_id = ids[0]
        if eos_id is None:
            raise ValueError(f"{directory}: no eos token in tokenizer_config.json, config.json or generation_config.json")

        template = tok_config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_file = directory / "chat_template.jinja"
        if template is None and jinja_file.is_file():
            template = jinja_file.read_text(encoding="utf-8")
        lead = _leading_special_ids(tokenizer)
        if bos_id is None and len(lead) == 1:  # no bos_token named, but the post-processor adds one
            bos_id = lead[0]
        tok_class = tok_config.get("tokenizer_class") or model_config.get("tokenizer_class") or \
            _MODEL_TYPE_TOKENIZER.get(model_config.get("model_type"))
        tok_class = tok_class.removesuffix("Fast") if isinstance(tok_class, str) else None
        if tok_class in _BOS_FROM_CONFIG:  # transformers rebuilds the post-processor from add_bos_token
            add_bos = bool(tok_config.get("add_bos_token", _BOS_FROM_CONFIG[tok_class])) and bos_id is not None
        else:  # the post-processor of tokenizer.json decides, as in PreTrainedTokenizerFast
            add_bos = bos_id is not None and lead == [bos_id]
        return cls(tokenizer, bos_id=bos_id, eos_id=eos_id, stop_ids=sorted(stop_ids), chat_template=template,
                   add_bos=add_bos)

    # --- the Tokenizer protocol ----------------------------------------------------------------------------

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        with self._lock:
            self.tokenizer.encode_special_tokens = not allow_special
            try:
                ids = self.tokenizer.encode(text, add_special_tokens=False).ids
            finally:
                self.tokenizer.encode_special_tokens = False  # leave the wrapped tokenizer in its HF default
        if bos:
            if self.bos_id is None:
                raise ValueError("this tokenizer has no bos token")
            ids.insert(0, self.bos_id)
        if eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        if self._token_bytes is None:
            self._token_bytes = self._build_token_bytes()
        if not 0 <= token_id < len(self._token_bytes):
            raise IndexError(f"token id {token_id} is outside the vocabulary (size {len(self._token_bytes)})")
        return self._token_bytes[token_id]

    def _build_token_bytes(self) -> list[bytes]:
        added = {i: t.content for i, t in self.tokenizer.get_added_tokens_decoder().items()}
        table = []
        for i in range(self.vocab_size):
            token = self.tokenizer.id_to_token(i)
            if token is None:
                table.append(b"")
            elif i in added:
                table.append(added[i].encode("utf-8"))
            elif self.byte_level:
                try:
                    table.append(bytes(_BYTE_DECODER[c] for c in token))
                except KeyError:  # a token outside the byte alphabet: take it literally
                    table.append(token.encode("utf-8"))
            elif len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                table.append(bytes([int(token[3:5], 16)]))  # SentencePiece byte-fallback token
            else:
                table.append(token.replace("\u2581", " ").encode("utf-8"))
        return table

    def __repr__(self) -> str:
        return f"HFTokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"


# transformers' tokenizer classes that ignore tokenizer.json's post-processor and build one from
# tokenizer_config.json's add_bos_token (default here) / add_eos_token; and the class a model type gets when
# tokenizer_config.json names none. Every other class (PreTrainedTokenizerFast: Llama 3, Qwen, SmolLM2, ...)
# keeps the post-processor of tokenizer.json.
_BOS_FROM_CONFIG = {"LlamaTokenizer": True, "CodeLlamaTokenizer": True, "GemmaTokenizer": True,
                    "CohereTokenizer": True, "GPTNeoXTokenizer": False}
_MODEL_TYPE_TOKENIZER = {"llama": "LlamaTokenizer", "mistral": "LlamaTokenizer", "mixtral": "LlamaTokenizer",
                         "gemma": "GemmaTokenizer", "gemma2": "GemmaTokenizer", "cohere": "CohereTokenizer",
                         "gpt_neox": "GPTNeoXTokenizer"}


def _leading_special_ids(tokenizer: tokenizers.Tokenizer) -> list[int]:
    """The ids the tokenizer's post-processor puts before a text (Llama 3's TemplateProcessing: [128000])."""
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    full = tokenizer.encode("a", add_special_tokens=True).ids
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i]
    return []


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object at the top level")
    return data

