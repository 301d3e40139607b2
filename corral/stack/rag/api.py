"""Request models of the Files, Vector Stores and vector-io APIs (OpenAI's shapes plus Llama Stack's extras).

As everywhere in the server, an unknown field is a 400 that names it. Limits are OpenAI's: 16 attributes
(keys up to 64 characters, string values up to 512), `max_num_results` 1..50, static chunking
100..4096 tokens with an overlap of at most half.

Filters are OpenAI's: a comparison `{key, type: eq|ne|gt|gte|lt|lte|in|nin, value}` or a compound
`{type: and|or, filters: [...]}`, nested. They are validated here into `Comparison` / `Compound` and
each backend compiles them to its own SQL (one semantics, tested on both):
  - a string matches only a string attribute, a number only a number, a boolean only a boolean;
  - gt/gte/lt/lte compare numbers (a string value there is a 400);
  - in/nin take a list of strings and numbers;
  - a file that lacks the key matches no comparison but the negations (`ne`, `nin`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from corral.stack.rag.ingest import AUTO_MAX_TOKENS, AUTO_OVERLAP_TOKENS, Chunking

MAX_ATTRIBUTES = 16
AttributeValue = Union[Annotated[str, Field(max_length=512)], bool, float, int]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def check_attributes(attrs: dict[str, Any] | None) -> dict[str, Any] | None:
    if attrs is None:
        return None
    if len(attrs) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} attributes, got {len(attrs)}")
    for k in attrs:
        if not 1 <= len(k) <= 64:
            raise ValueError(f"attribute keys are 1 to 64 characters, got {k!r}")
    return attrs


def check_metadata(meta: dict[str, Any] | None) -> dict[str, Any] | None:
    """OpenAI's `metadata`: 16 string pairs (keys up to 64 characters, values up to 512)."""
    if meta is None:
        return None
    if len(meta) > MAX_ATTRIBUTES:
        raise ValueError(f"at most {MAX_ATTRIBUTES} metadata keys, got {len(meta)}")
    for k, v in meta.items():
        if len(k) > 64 or not isinstance(v, str) or len(v) > 512:
            raise ValueError(f"metadata values are strings of up to 512 characters with keys of up to 64 ({k!r})")
    return meta


Attributes = Annotated[Union[dict[str, AttributeValue], None], AfterValidator(check_attributes)]
Metadata = Annotated[Union[dict[str, Any], None], AfterValidator(check_metadata)]


# ---------------------------------------------------------------------------------------------
# Chunking strategy


class StaticChunking(Strict):
    max_chunk_size_tokens: int = Field(AUTO_MAX_TOKENS, ge=100, le=4096)
    chunk_overlap_tokens: int = Field(AUTO_OVERLAP_TOKENS, ge=0)

    @model_validator(mode="after")
    def _overlap(self):
        if self.chunk_overlap_tokens > self.max_chunk_size_tokens // 2:
            raise ValueError(f"chunk_overlap_tokens ({self.chunk_overlap_tokens}) must not exceed half of "
                             f"max_chunk_size_tokens ({self.max_chunk_size_tokens})")
        return self


class ChunkingStrategy(Strict):
    type: Literal["auto", "static"]
    static: StaticChunking | None = None

    @model_validator(mode="after")
    def _shape(self):
        if self.type == "static" and self.static is None:
            raise ValueError("a static chunking_strategy needs `static`: {max_chunk_size_tokens, chunk_overlap_tokens}")
        if self.type == "auto" and self.static is not None:
            raise ValueError("an auto chunking_strategy takes no `static`")
        return self

    def resolve(self) -> Chunking:
        if self.type == "auto":
            return Chunking()
        return Chunking(self.static.max_chunk_size_tokens, self.static.chunk_overlap_tokens, "static")


def resolve_chunking(strategy: ChunkingStrategy | None) -> Chunking:
    return strategy.resolve() if strategy is not None else Chunking()


# ---------------------------------------------------------------------------------------------
# Filters


class Comparison(Strict):
    key: str = Field(min_length=1, max_length=64)
    type: Literal["eq", "ne", "gt", "gte", "lt", "lte", "in", "nin"]
    value: Union[str, bool, float, list[Union[str, float]]]

    @model_validator(mode="after")
    def _value_fits(self):
        if self.type in ("in", "nin"):
            if not isinstance(self.value, list) or not self.value:
                raise ValueError(f"a {self.type!r} filter takes a non-empty list value")
        elif isinstance(self.value, list):
            raise ValueError(f"a {self.type!r} filter takes one value, not a list (use 'in')")
        elif self.type in ("gt", "gte", "lt", "lte") and (isinstance(self.value, (str, bool))):
            raise ValueError(f"a {self.type!r} filter compares numbers, got {self.value!r}")
        return self


class Compound(Strict):
    type: Literal["and", "or"]
    filters: list[Union[Comparison, Compound]] = Field(min_length=1)


Filter = Union[Comparison, Compound]


def parse_filter(raw: dict | None) -> Filter | None:
    """A filter from its JSON (compound when it has `filters`); pydantic's ValueError when malformed."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ValueError("filters must be an object")
    return Compound.model_validate(raw) if "filters" in raw else Comparison.model_validate(raw)


def matches(f: Filter, attrs: dict[str, Any]) -> bool:
    """The filter's meaning in Python: the reference the backends' SQL is tested against."""
    if isinstance(f, Compound):
        results = (matches(sub, attrs) for sub in f.filters)
        return all(results) if f.type == "and" else any(results)
    if f.type in ("ne", "nin"):
        return not matches(Comparison(key=f.key, type="eq" if f.type == "ne" else "in", value=f.value), attrs)
    if f.key not in attrs:
        return False
    have = attrs[f.key]
    if f.type == "eq":
        return _same_kind(have, f.value) and have == f.value
    if f.type == "in":
        return any(_same_kind(have, v) and have == v for v in f.value)
    if not _is_number(have):
        return False
    return {"gt": have > f.value, "gte": have >= f.value, "lt": have < f.value, "lte": have <= f.value}[f.type]


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _same_kind(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool)
    return (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))


# ---------------------------------------------------------------------------------------------
# Vector stores


class StoreExpiresAfter(Strict):
    anchor: Literal["last_active_at"]
    days: int = Field(ge=1, le=365)


class CreateVectorStoreRequest(Strict):
    name: str | None = None
    file_ids: list[str] = Field(default_factory=list)
    expires_after: StoreExpiresAfter | None = None
    chunking_strategy: ChunkingStrategy | None = None
    metadata: Metadata = None
    description: str | None = None
    # Llama Stack's extras (sent by its client, or by the openai SDK through extra_body)
    embedding_model: str | None = None
    embedding_dimension: int | None = Field(None, ge=1)
    provider_id: str | None = None


class UpdateVectorStoreRequest(Strict):
    name: str | None = None
    expires_after: StoreExpiresAfter | None = None
    metadata: Metadata = None


class AttachFileRequest(Strict):
    file_id: str
    attributes: Attributes = None
    chunking_strategy: ChunkingStrategy | None = None


class UpdateFileRequest(Strict):
    attributes: Attributes


class BatchFile(Strict):
    file_id: str
    attributes: Attributes = None
    chunking_strategy: ChunkingStrategy | None = None


class CreateFileBatchRequest(Strict):
    file_ids: list[str] | None = None
    files: list[BatchFile] | None = None
    attributes: Attributes = None
    chunking_strategy: ChunkingStrategy | None = None

    @model_validator(mode="after")
    def _one_list(self):
        if (self.file_ids is None) == (self.files is None):
            raise ValueError("give exactly one of file_ids and files")
        items = self.file_ids if self.file_ids is not None else self.files
        if not 1 <= len(items) <= 2000:
            raise ValueError(f"a file batch holds 1 to 2000 files, got {len(items)}")
        if self.files is not None and (self.attributes is not None or self.chunking_strategy is not None):
            raise ValueError("with `files`, attributes and chunking_strategy go on each file")
        return self

    def entries(self) -> list[BatchFile]:
        if self.files is not None:
            return self.files
        return [BatchFile(file_id=f, attributes=self.attributes, chunking_strategy=self.chunking_strategy)
                for f in self.file_ids]


class RankingOptions(Strict):
    # OpenAI's rankers (none, auto, default-2024-11-15) and Llama Stack's `rrf`: Corral has no re-ranking
    # model, so all rank by the search mode's own score (hybrid: reciprocal-rank fusion).
    ranker: Literal["none", "auto", "default-2024-11-15", "rrf"] | None = None
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)


class SearchRequest(Strict):
    query: Union[str, list[str]]
    filters: dict[str, Any] | None = None
    max_num_results: int = Field(10, ge=1, le=50)
    ranking_options: RankingOptions | None = None
    rewrite_query: bool = False
    search_mode: Literal["vector", "keyword", "hybrid"] = "vector"

    @field_validator("query")
    @classmethod
    def _nonempty(cls, v):
        parts = [v] if isinstance(v, str) else v
        if not parts or not any(p.strip() for p in parts):
            raise ValueError("query must not be empty")
        return v

    @field_validator("rewrite_query")
    @classmethod
    def _no_rewrite(cls, v):
        if v:
            raise ValueError("rewrite_query is not supported: Corral searches with the query as given")
        return v

    @field_validator("filters")
    @classmethod
    def _filters(cls, v):
        parse_filter(v)
        return v

    def queries(self) -> list[str]:
        return [self.query] if isinstance(self.query, str) else list(self.query)


# ---------------------------------------------------------------------------------------------
# vector-io (Llama Stack)


class TextContent(Strict):
    type: Literal["text"]
    text: str


class ChunkMetadata(BaseModel):
    model_config = ConfigDict(extra="allow")
    chunk_id: str | None = None
    document_id: str | None = None
    source: str | None = None


class EmbeddedChunk(Strict):
    content: Union[str, TextContent, list[TextContent]]
    chunk_id: str = Field(min_length=1)
    metadata: dict[str, Any] = Field(default_factory=dict)
    chunk_metadata: ChunkMetadata | None = None
    embedding: list[float] = Field(min_length=1)
    embedding_model: str | None = None
    embedding_dimension: int | None = None

    def text(self) -> str:
        return content_text(self.content)


def content_text(content) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, TextContent):
        return content.text
    return "\n".join(c.text for c in content)


class InsertChunksRequest(Strict):
    vector_store_id: str
    chunks: list[EmbeddedChunk] = Field(min_length=1)
    ttl_seconds: int | None = None

    @field_validator("ttl_seconds")
    @classmethod
    def _no_ttl(cls, v):
        if v is not None:
            raise ValueError("ttl_seconds is not supported: chunks live until deleted (or their store expires)")
        return v


class RrfRanker(Strict):
    type: Literal["rrf"]
    impact_factor: float = Field(60.0, gt=0)


class QueryParams(Strict):
    max_chunks: int = Field(3, ge=1, le=1000)
    mode: Literal["vector", "keyword", "hybrid"] = "vector"
    score_threshold: float = Field(0.0, ge=0.0, le=1.0)
    ranker: RrfRanker | None = None


class QueryChunksRequest(Strict):
    vector_store_id: str
    query: Union[str, TextContent, list[TextContent]]
    params: QueryParams | None = None
