"""What every tokenizer and chat format offers the rest of Corral.

Messages are OpenAI-style dicts everywhere in Corral (Python API, CLI, server):
    {"role": "system" | "user" | "assistant" | "tool" | "ipython",
     "content": str | [{"type": "text", "text": ...} | {"type": "image", "image": <path|bytes|PIL|data URL>}
                       | {"type": "image_url", "image_url": {"url": ...}}],
     "tool_calls": [{"id": ..., "type": "function", "function": {"name": ..., "arguments": <json str>}}],
     "tool_call_id": ...}
Tools are OpenAI function tools: {"type": "function", "function": {"name", "description", "parameters"}}.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int  # number of ids the tokenizer can produce (may be < the model's embedding rows)
    bos_id: int | None
    eos_id: int
    stop_ids: frozenset[int]  # ids that end a generation (eos, <|eot_id|>, <|eom_id|>, <|im_end|>, ...)
    special_tokens: dict[str, int]

    def encode(self, text: str, *, bos: bool = False, eos: bool = False, allow_special: bool = False) -> list[int]:
        """Text to ids. Special-token text is plain text unless allow_special (Meta's default)."""
        ...

    def decode(self, ids: Sequence[int]) -> str:
        """Ids to text; special tokens decode to their literal text."""
        ...

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (may be part of a UTF-8 character): streaming decodes from these."""
        ...


@dataclass
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)}}


@dataclass
class AssistantMessage:
    """A model's reply parsed back: text plus tool calls."""

    content: str
    tool_calls: list[ToolCall] = field(default_factory=list)
    stop_reason: str = "end_of_turn"  # "end_of_turn" | "end_of_message" (<|eom_id|>: awaiting a tool result)

    def to_openai(self) -> dict:
        msg: dict[str, Any] = {"role": "assistant", "content": self.content or (None if self.tool_calls else "")}
        if self.tool_calls:
            msg["tool_calls"] = [c.to_openai() for c in self.tool_calls]
        return msg


class ChatFormat(Protocol):
    """Turns a conversation into prompt ids and the model's output back into a message."""

    tokenizer: Tokenizer

    def encode_dialog(self, messages: list[dict], *, tools: list[dict] | None = None,
                      tool_choice: str | dict | None = None, add_generation_prompt: bool = True) -> list[int]:
        ...

    def parse_response(self, text: str, *, tools: list[dict] | None = None) -> AssistantMessage:
        ...

    def tool_call_streamer(self, tools: list[dict] | None = None):
        """A `tool_stream.ToolCallStreamer` for this format's replies: push(delta) / finish() give content and
        tool-call events; its `message` is then what parse_response gives for the whole text."""
        ...


class StreamDecoder:
    """Incremental detokenizer: `push(id)` returns only complete UTF-8 characters, `flush()` the rest.

    Works from `token_bytes`, so a character split across tokens (emoji, CJK byte-fallback tokens) comes out
    once, whole. Invalid bytes become U+FFFD, as in a full `decode`.
    """

    def __init__(self, tokenizer: Tokenizer):
        import codecs

        self.tokenizer = tokenizer
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        return self._decoder.decode(self.tokenizer.token_bytes(token_id), final=False)

    def flush(self) -> str:
        """Whatever is still buffered (an incomplete character becomes U+FFFD); the decoder is then reset."""
        text = self._decoder.decode(b"", final=True)
        self._decoder.reset()
        return text
