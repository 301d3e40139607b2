"""The server's API layer: request models (Pydantic) and provider interfaces (Protocols). No torch.

Requests are validated here once, at the edge, and one request object is passed down
(route -> router -> provider). Every request model forbids unknown fields: a field we do not implement
is a 400 that names it, never silently ignored (fail closed). Fields we accept are all honoured; the
few OpenAI fields whose value we cannot honour (e.g. `suffix`, `logit_bias`) are declared here so that
the error can say why rather than just "unknown".

Responses are OpenAI's JSON shapes (plain dicts built by the providers); streams are async iterators
of OpenAI chunk dicts that the server frames as Server-Sent Events.
"""

from __future__ import annotations

import base64
import binascii
import re
import time
from typing import Any, AsyncIterator, Literal, Protocol, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from corral import limits


class APIError(Exception):
    """An error with an HTTP status and OpenAI's error body `{"error": {message, type, param, code}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Chat completions


# Images come inline only: the server fetches nothing (it may have no network) and never reads a
# path on its own disk, so a URL, a `file://` or a bare path is refused here, before any provider.
_DATA_URL = re.compile(r"data:image/[A-Za-z0-9.+-]+;base64,")


class ImageURL(Strict):
    url: str
    detail: Literal["auto", "low", "high"] | None = None

    @field_validator("url")
    @classmethod
    def _data_url_only(cls, v: str) -> str:
        head = _DATA_URL.match(v)
        if head is None:
            shown = v if len(v) <= 40 else v[:40] + "..."
            raise ValueError(f"only data: URLs are accepted ('data:image/<type>;base64,<data>'), got {shown!r}: "
                             "the server does not fetch URLs or read files")
        try:
            base64.b64decode(v[head.end():], validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("the data: URL's payload is not valid base64") from None
        return v


class ContentPart(Strict):
    type: Literal["text", "image_url"]
    text: str | None = None
    image_url: ImageURL | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs `text`")
        if self.type == "image_url" and self.image_url is None:
            raise ValueError("an image_url part needs `image_url`")
        return self


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCallIn(Strict):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    name: str | None = None  # a participant's name (OpenAI); kept in the store, not rendered
    # What an OpenAI SDK's assistant message carries when a client appends it to the history as is:
    # accepted when empty (null, or annotations, which are output-only citations). A non-null value
    # is something we cannot honour, so it is refused below.
    refusal: str | None = None
    reasoning_content: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None
    function_call: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _check(self):
        for field in ("refusal", "reasoning_content", "audio", "function_call", "annotations"):
            if getattr(self, field) is not None and self.role != "assistant":
                raise ValueError(f"`{field}` belongs to `assistant` messages")
        for field in ("refusal", "reasoning_content", "audio", "function_call"):
            if getattr(self, field) is not None:
                raise ValueError(f"`{field}` in the history must be null: Corral does not take it as input"
                                 + (" (send `tool_calls`)" if field == "function_call" else ""))
        if self.name is not None and self.role in ("tool", "ipython"):
            raise ValueError(f"a `{self.role}` message has no `name`")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a `tool` message needs `tool_call_id`")
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError(f"a `{self.role}` message needs `content`")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("only `assistant` messages carry `tool_calls`")
        return self


class FunctionDef(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9_.\-]{1,64}$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None  # required/named calls are always strict; with auto, strict constrains too


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


class JSONSchemaFormat(Strict):
    name: str
    description: str | None = None
    schema_: dict[str, Any] | bool | None = Field(default=None, alias="schema")
    strict: bool | None = None

    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check(self):
        if self.type == "json_schema" and (self.json_schema is None or self.json_schema.schema_ is None):
            raise ValueError("response_format of type json_schema needs `json_schema.schema`")
        return self


class StreamOptions(Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # newer SDKs may send it; we never obfuscate


class SamplingFields(Strict):
    """What chat and text completions share: OpenAI's sampling fields plus vLLM's extensions."""

    model: str
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, **limits.N.field())
    temperature: float | None = Field(None, **limits.TEMPERATURE.field())
    top_p: float | None = Field(None, **limits.TOP_P.field())
    max_tokens: int | None = Field(None, **limits.MAX_TOKENS.field())
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **limits.SEED.field())
    frequency_penalty: float | None = Field(None, **limits.FREQUENCY_PENALTY.field())
    presence_penalty: float | None = Field(None, **limits.PRESENCE_PENALTY.field())
    user: str | None = None
    # vLLM-style extensions (llama-stack-client's sampling params map onto these)
    top_k: int | None = Field(None, **limits.TOP_K.field())
    min_p: float | None = Field(None, **limits.MIN_P.field())
    repetition_penalty: float | None = Field(None, **limits.REPETITION_PENALTY.field())
    ignore_eos: bool | None = None  # keep generating past the model's end tokens (benchmarks)
    # OpenAI fields we cannot honour: declared so the error can say so (see `unsupported`)
    logit_bias: dict[str, float] | None = None

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        if isinstance(v, list):
            if len(v) > limits.MAX_STOP:
                raise ValueError(f"at most {limits.MAX_STOP} stop sequences")
            if not all(s for s in v):
                raise ValueError("stop sequences must be non-empty")
        elif v == "":
            raise ValueError("stop must be a non-empty string")
        return v

    @property
    def stops(self) -> list[str]:
        return [] if self.stop is None else [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def unsupported(self) -> list[tuple[str, str]]:
        """(field, why) for accepted fields whose value we cannot honour."""
        out = []
        if self.logit_bias:
            out.append(("logit_bias", "logit_bias is not supported"))
        return out


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, **limits.MAX_TOKENS.field())
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    response_format: ResponseFormat | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, **limits.LOGPROBS.field())
    store: bool | None = None  # every completion is stored; store=false opts out
    metadata: dict[str, str] | None = None

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.top_logprobs and not self.logprobs:
            out.append(("top_logprobs", "top_logprobs needs logprobs: true"))
        if self.tool_choice not in (None, "none") and not self.tools:
            out.append(("tool_choice", "tool_choice needs `tools`"))
        if isinstance(self.tool_choice, NamedToolChoice) and self.tools:
            if self.tool_choice.function.name not in {t.function.name for t in self.tools}:
                out.append(("tool_choice", f"tool_choice names function {self.tool_choice.function.name!r}, "
                                           f"which is not in `tools`"))
        if self.tools and self.response_format and self.response_format.type != "text":
            out.append(("response_format", "response_format cannot be combined with tools"))
        return out


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, **limits.LOGPROBS.field())
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = Field(None, ge=1)

    def unsupported(self) -> list[tuple[str, str]]:
        out = super().unsupported()
        if self.suffix:
            out.append(("suffix", "suffix (fill-in-the-middle) is not supported by this model"))
        if self.best_of not in (None, self.n):
            out.append(("best_of", "best_of other than n is not supported"))
        if self.echo and self.stream:
            out.append(("echo", "echo is not supported with stream: true"))
        return out


class EmbeddingRequest(Strict):
    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None


# ---------------------------------------------------------------------------------------------
# Models and providers


class ModelInfo(BaseModel):
    """One servable model (`GET /v1/models` entry)."""

    id: str
    provider_id: str
    provider_resource_id: str
    model_type: Literal["llm", "embedding"] = "llm"
    metadata: dict[str, Any] = Field(default_factory=dict)  # e.g. context_length, embedding_dimension
    created: int = Field(default_factory=lambda: int(time.time()))

    def to_openai(self) -> dict:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "corral",
                "custom_metadata": {"model_type": self.model_type, "provider_id": self.provider_id,
                                    "provider_resource_id": self.provider_resource_id, **self.metadata}}


ChatResult = Union[dict, AsyncIterator[dict]]


class InferenceProvider(Protocol):
    """Chat and text completions for the models it serves. Streams are async iterators of chunk dicts."""

    provider_id: str
    provider_type: str

    def models(self) -> list[ModelInfo]: ...

    async def start(self) -> None:
        """Load what must be loaded before serving (called once at server start)."""

    async def chat_completion(self, model: ModelInfo, req: ChatCompletionRequest) -> ChatResult: ...

    async def completion(self, model: ModelInfo, req: CompletionRequest) -> ChatResult: ...

    async def health(self) -> dict: ...

    async def close(self) -> None: ...


class EmbeddingsProvider(Protocol):
    provider_id: str
    provider_type: str

    def models(self) -> list[ModelInfo]: ...

    async def start(self) -> None: ...

    async def embeddings(self, model: ModelInfo, req: EmbeddingRequest) -> dict: ...

    async def health(self) -> dict: ...

    async def close(self) -> None: ...
