"""A model's reply parsed while it streams: content deltas and tool calls, as the whole text would parse.

A chat format hands out `ToolCallStreamer`s (`chat_format.tool_call_streamer(tools)`) set up for its own reply
syntax, and its `parse_response` is one streamer fed the whole text, so the streamed and the non-streamed
readings of a reply cannot disagree. Three layers, each holding back only what it has not decided yet:
- the frame: what opens the reply (Llama 3's assistant header, <|python_tag|>) and what ends it (<|eot_id|>,
  <|im_end|>, ... and trailing whitespace); after <|python_tag|> everything is held (it is code or a call);
- the `tool_calls.ToolCallScanner`: text and calls, for the syntaxes the format enables;
- the content: outer whitespace stripped (leading dropped, trailing held until more text follows).
Content text is released as soon as it cannot become part of a call; a tool call comes whole once complete.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from corral.tokenizer.base import AssistantMessage, ToolCall
from corral.tokenizer.tool_calls import ToolCallScanner, normalize_builtin, python_tag_calls

PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolStreamEvent:
    """One step of a streamed reply: content text, or one complete tool call."""

    kind: str  # "content" | "tool_call"
    text: str = ""  # content
    index: int = -1  # tool_call: its position among the reply's calls (0-based)
    id: str = ""  # tool_call: "call_<hex>", the same id as in the parsed message
    name: str = ""
    arguments: str = ""  # tool_call: the arguments as a JSON object string


class ToolCallStreamer:
    """Feed a reply with `push(delta)`, end it with `finish()`; `message` is then the parsed reply.

    syntaxes: the `tool_calls.SYNTAXES` the format reads. lead: characters skipped before the opening checks
    (None: whitespace). header: text dropped when the reply opens with it. ends: end markers, each with the
    stop reason it sets (None: keep `stop_reason`); one is removed when it closes the reply."""

    def __init__(self, syntaxes, tools: list[dict] | None = None, *, lead: str | None = None,
                 header: str | None = None, ends: dict[str, str | None] | None = None,
                 stop_reason: str | None = None):
        self.syntaxes = frozenset(syntaxes)
        self.tools = tools
        self.lead, self.header = lead, header
        self.python_tag = "python_tag" in self.syntaxes
        self.ends = {e: r for e, r in (ends or {}).items() if e}
        self.stop_reason = stop_reason or "end_of_turn"
        markers = sorted(self.ends, key=len, reverse=True)
        prefixes = sorted({m[:k] for m in markers for k in range(1, len(m))}, key=len, reverse=True)
        alternatives = "|".join(re.escape(m) for m in markers)
        # what may still be the end of the reply: whitespace, a marker, the start of one (leftmost match)
        held = rf"\s*(?:(?:{alternatives})\s*|{'|'.join(re.escape(p) for p in prefixes)})?\Z" if markers else r"\s*\Z"
        self._tail = re.compile(held)
        self._end = re.compile(rf"(?:{alternatives})\s*\Z") if markers else None
        self._scanner = ToolCallScanner(self.syntaxes - {"python_tag"}, tools)
        self._pending = ""  # received, not yet given to the scanner
        self._opened = False  # the opening (header, <|python_tag|>) has been decided
        self._code = False  # the reply opened with <|python_tag|>
        self._started = False  # some content has been released
        self._space = ""  # whitespace after the released content, held until more content follows
        self._content: list[str] = []
        self._calls: list[ToolCall] = []
        self._message: AssistantMessage | None = None

    def push(self, delta: str) -> list[ToolStreamEvent]:
        if self._message is not None:
            raise RuntimeError("push after finish")
        self._pending += delta
        if not self._opened and not self._open(final=False):
            return []
        if self._code:
            return []
        held = self._tail.search(self._pending).start()
        text, self._pending = self._pending[:held], self._pending[held:]
        return self._events(self._scanner.push(text)) if text else []

    def finish(self) -> list[ToolStreamEvent]:
        if self._message is not None:
            return []
        if not self._opened:
            self._open(final=True)
        body = self._pending
        m = self._end.search(body) if self._end else None
        if m:
            body = body[:m.start()]
            self.stop_reason = self.ends[m.group().rstrip()] or self.stop_reason
        self._pending = ""
        if self._code:
            events = self._events(python_tag_calls(body, self.syntaxes - {"python_tag"}, self.tools))
        else:
            events = self._events(self._scanner.push(body) + self._scanner.finish())
        self._message = AssistantMessage(content="".join(self._content), tool_calls=list(self._calls),
                                         stop_reason=self.stop_reason)
        return events

    @property
    def message(self) -> AssistantMessage:
        """The parsed reply (what `parse_response` returns for the whole text); available after finish()."""
        if self._message is None:
            raise RuntimeError("the reply is not finished: call finish() first")
        return self._message

    # --- internals ---------------------------------------------------------------------------------------

    def _open(self, final: bool) -> bool:
        """Drop the header and <|python_tag|> the reply opens with, once the text decides it."""
        rest = self._pending.lstrip(self.lead)
        if self.header:
            if rest.startswith(self.header):
                rest = rest[len(self.header):]
            elif not final and self.header.startswith(rest):
                return False
        if self.python_tag:
            if rest.startswith(PYTHON_TAG):
                rest, self._code = rest[len(PYTHON_TAG):], True
            elif not final and PYTHON_TAG.startswith(rest):
                return False
        self._pending, self._opened = rest, True  # the skipped lead is whitespace the content drops anyway
        return True

    def _events(self, pieces: list[tuple]) -> list[ToolStreamEvent]:
        events = []
        for kind, value in pieces:
            if kind == "text":
                if text := self._release(value):
                    self._content.append(text)
                    events.append(ToolStreamEvent("content", text=text))
                continue
            for name, args in value:
                call = ToolCall(name=name, arguments=normalize_builtin(name, args))
                events.append(ToolStreamEvent("tool_call", index=len(self._calls), id=call.id, name=call.name,
                                              arguments=json.dumps(call.arguments, ensure_ascii=False)))
                self._calls.append(call)
        return events

    def _release(self, text: str) -> str:
        """Content text less its outer whitespace: what can be shown now."""
        if not self._started:
            text = text.lstrip()
        body = text.rstrip()
        if not body:
            self._space += text
            return ""
        out = self._space + body
        self._space, self._started = text[len(body):], True
        return out
