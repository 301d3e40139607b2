"""Request models of the Responses and Conversations APIs (Pydantic, no torch).

As everywhere in the server, unknown fields are a 400 that names them (`Strict`). The shapes are
OpenAI's; `input` items and `tools` are checked by `items.py` and `tools/` (whose errors name the item).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from corral import limits
from corral.stack.api import Strict

# What `include` may ask for, and what each adds.
INCLUDABLE = {
    "file_search_call.results": "the search results in file_search_call items",
    "code_interpreter_call.outputs": "the logs in code_interpreter_call items",
    "web_search_call.action.sources": "the sources in web_search_call items",
    "web_search_call.results": "the sources in web_search_call items",
}


class TextFormat(Strict):
    type: Literal["text", "json_schema", "json_object"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and (self.schema_ is None or not self.name):
            raise ValueError("a json_schema format needs `name` and `schema`")
        return self


class TextConfig(Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None  # the only one we honour: the model's own


class ConversationRef(Strict):
    id: str


class GuardrailSpec(Strict):
    type: str  # a shield id (Llama Stack's ResponseGuardrailSpec)


class StreamOptions(Strict):
    include_obfuscation: bool | None = None  # we never obfuscate


class CreateResponseRequest(Strict):
    model: str
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    previous_response_id: str | None = None
    conversation: str | ConversationRef | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    max_tool_calls: int | None = Field(None, ge=1)
    max_output_tokens: int | None = Field(None, **limits.MAX_TOKENS.field())
    temperature: float | None = Field(None, **limits.TEMPERATURE.field())
    top_p: float | None = Field(None, **limits.TOP_P.field())
    text: TextConfig | None = None
    include: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    background: bool | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    guardrails: list[str | GuardrailSpec] | None = None  # Llama Stack: shields that check this response

    @property
    def shield_ids(self) -> list[str]:
        return [g if isinstance(g, str) else g.type for g in self.guardrails or []]

    @model_validator(mode="after")
    def _check(self):
        for k, what in enumerate(self.include or []):
            if what not in INCLUDABLE:
                raise ValueError(f"include[{k}]: {what!r} is not supported (supported: {sorted(INCLUDABLE)})")
        if self.metadata and len(self.metadata) > 16:
            raise ValueError("metadata: at most 16 keys")
        return self

    @property
    def conversation_id(self) -> str | None:
        c = self.conversation
        return c.id if isinstance(c, ConversationRef) else c


class CreateConversationRequest(Strict):
    items: list[dict[str, Any]] | None = Field(None, max_length=20)
    metadata: dict[str, str] | None = None


class UpdateConversationRequest(Strict):
    metadata: dict[str, str]


class AddItemsRequest(Strict):
    items: list[dict[str, Any]] = Field(min_length=1, max_length=20)
