"""The run config: what `corral serve` serves, from a YAML file or from nothing at all.

With no file, Corral serves the built-in default model (SmolLM2-135M-Instruct) through the inline
engine and all-MiniLM-L6-v2 embeddings through sentence-transformers. A run config looks like:

    port: 8321
    host: 127.0.0.1
    storage_dir: ~/.corral/server       # SQLite store of chat completions, responses, conversations
    storage: {dsn: postgresql://user:pass@db:5432/corral}   # optional: those stores on PostgreSQL instead
    api_keys: [sk-local-1]              # optional: then every route but /v1/health needs one
    load: startup                       # startup (default) | first_use
    max_queue: 8                        # waiting requests per model before 429
    max_body_bytes: 4194304
    code_interpreter: {timeout_s: 10, cpu_s: 5, memory_mb: 256}   # agents' sandbox (docs/agents.md)
    web_search: {provider: tavily, api_key: ...}                 # agents' search: tavily | brave
    providers:
      - provider_id: corral
        provider_type: inline::corral
      - provider_id: embeddings
        provider_type: inline::sentence-transformers
      - provider_id: vllm
        provider_type: remote::openai-compatible
        config: {base_url: http://gpu-box:8000/v1, api_key: ...}
      - provider_id: localfs                    # RAG (docs/rag.md): files on disk ...
        provider_type: inline::localfs
      - provider_id: pgvector                   # ... and vector stores (default: inline::sqlite-vec)
        provider_type: remote::pgvector
        config: {dsn: postgresql://user:pass@db:5432/corral}
    models:
      - model_id: SmolLM2-135M-Instruct
        provider_id: corral
        checkpoint: ~/.corral/models/SmolLM2-135M-Instruct/model.gguf   # optional: name or path
        adapter: null           # a LoRA adapter directory (`corral finetune`), merged at load
        max_tokens: 4096        # cap on tokens generated per request (null: no cap but the context)
        context_length: null    # cap on prompt + generation per request (null: the model's own)
        kv_cache_mb: null       # memory for the engine's paged KV-cache pool (null: from free memory)
        max_num_seqs: 32        # sequences the engine runs at once
        max_batch_tokens: 512   # tokens one engine step processes (longer prompts prefill in chunks)
        speculative: {method: prompt_lookup, num_tokens: 3}   # optional: speculative decoding, or
        # speculative: {method: draft, draft_model: NAME-OR-PATH, draft_quantize: int8, num_tokens: 4}
      - model_id: all-MiniLM-L6-v2
        provider_id: embeddings
        model_type: embedding
      - model_id: llama-8b
        provider_id: vllm
        provider_model_id: meta-llama/Llama-3.1-8B-Instruct

The per-model limits bound what one request can take: a request's `max_tokens` above the model's
`max_tokens` is a 400 that names the cap, and a request that omits it gets min(cap, room left in the
context), so nobody holds a model for its whole 131K context by forgetting `max_tokens`. They are
read by the inline engine only: set on a remote or embedding model they are an error.

Every key is checked at start; an error names the file and the key (`models[1].provider_id: ...`).
Values may come from the environment, `${env.NAME}` or `${env.NAME:=default}`, and `--config` also takes
the name of a shipped run config (local, postgres, remote-vllm: corral/stack/distributions).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from corral.paths import corral_home
from corral.stack import distributions
from corral.safety.config import SAFETY, GuardrailsConfig, LlamaGuardConfig, ShieldEntry, check_safety
from corral.stack.rag.config import RAG_APIS, check_rag_provider, default_rag_providers
from corral.stack.agents.tools.sandbox import SandboxConfig
from corral.stack.agents.tools.web_search import WebSearchConfig

INLINE = "inline::corral"
EMBEDDINGS = "inline::sentence-transformers"
REMOTE = "remote::openai-compatible"
DEFAULT_EMBEDDING_MODEL = "all-MiniLM-L6-v2"
# ModelEntry keys that only the inline engine reads
INLINE_ONLY = ("dtype", "quantize", "adapter", "max_tokens", "context_length", "kv_cache_mb", "max_num_seqs",
               "max_batch_tokens", "speculative")


class ConfigError(ValueError):
    """A run config that cannot be used; the message names the file and the key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RemoteConfig(_Strict):
    base_url: str = Field(pattern=r"^https?://")
    api_key: str | None = None
    timeout_s: float = Field(600.0, gt=0)


class ProviderConfig(_Strict):
    provider_id: str = Field(min_length=1)
    provider_type: Literal["inline::corral", "inline::sentence-transformers", "remote::openai-compatible",
                           "inline::llama-guard", "inline::localfs", "inline::sqlite-vec", "remote::pgvector"]
    config: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _check(self):
        if self.provider_type == REMOTE:
            RemoteConfig.model_validate(self.config)  # errors surface under this provider's `config`
        elif self.provider_type == SAFETY:
            LlamaGuardConfig.model_validate(self.config)  # see corral/safety/config.py
        elif self.provider_type in RAG_APIS:
            check_rag_provider(self.provider_type, self.config)  # see corral/stack/rag/config.py
        elif self.config:
            raise ValueError(f"{self.provider_type} takes no `config` (got keys {sorted(self.config)})")
        return self

    @property
    def remote(self) -> RemoteConfig:
        return RemoteConfig.model_validate(self.config)


class StorageConfig(_Strict):
    """Where the server's own stores (chat completions, responses, conversations) live: absent, SQLite
    under storage_dir; with a `dsn`, PostgreSQL, in their own schema (uploaded files and RAG stay apart)."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    dsn: str = Field(min_length=1)  # a libpq DSN, e.g. postgresql://corral:secret@db:5432/corral
    pg_schema: str = Field("corral", alias="schema", pattern=r"^[a-z_][a-z0-9_]{0,62}$")

    @property
    def store_args(self) -> dict:
        return {"dsn": self.dsn, "pg_schema": self.pg_schema}


class SpeculativeEntry(_Strict):
    """Speculative decoding for an inline model (corral/engine/speculative.py): guesses from the text itself
    (prompt_lookup) or from a smaller draft model with the same tokenizer, checked by the model in one step."""

    method: Literal["prompt_lookup", "draft"]
    num_tokens: int = Field(3, ge=1, le=16)  # tokens guessed per step (engine/speculative.py's default)
    draft_model: str | None = None  # method draft: a registry name, checkpoint directory or .gguf file
    draft_quantize: Literal["int8", "int4", "q4_0", "q4_1", "q8_0"] | None = None  # as `quantize`, for the draft
    max_running: int = Field(8, ge=1)  # guess only while at most this many sequences decode

    @model_validator(mode="after")
    def _check(self):
        if (self.method == "draft") != (self.draft_model is not None):
            raise ValueError("draft_model goes with method 'draft', and method 'draft' needs one")
        if self.draft_quantize is not None and self.method != "draft":
            raise ValueError("draft_quantize goes with method 'draft'")
        return self


class ModelEntry(_Strict):
    model_id: str = Field(min_length=1)
    provider_id: str
    model_type: Literal["llm", "embedding"] = "llm"
    provider_model_id: str | None = None  # remote: the id the remote server knows
    checkpoint: str | None = None  # inline: a registry name or a checkpoint path (default: model_id)
    dtype: Literal["fp32", "bf16", "fp16"] | None = None  # inline: None = the file's (a GGUF's blocks kept)
    # inline: weight-only quantization at load: int8 per channel, or GGUF blocks (int4 = q4_0, q4_1, q8_0)
    quantize: Literal["int8", "int4", "q4_0", "q4_1", "q8_0"] | None = None
    adapter: str | None = None  # inline: a PEFT LoRA adapter directory, merged into the weights at load
    # Inline serving limits: what one request may take of the model, and how the engine batches.
    max_tokens: int | None = Field(4096, ge=1)  # cap on tokens generated per request (None: the context's room)
    context_length: int | None = Field(None, ge=16)  # cap on prompt + generation (None: the model's own)
    kv_cache_mb: int | None = Field(None, ge=1)  # the paged KV-cache pool (None: derived from free memory)
    max_num_seqs: int = Field(32, ge=1)  # sequences the engine runs at once
    max_batch_tokens: int = Field(512, ge=1)  # tokens one engine step may process (chunked prefill)
    speculative: SpeculativeEntry | None = None  # speculative decoding (None: off)

    @model_validator(mode="after")
    def _check(self):
        if self.max_batch_tokens < self.max_num_seqs:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_num_seqs "
                             f"({self.max_num_seqs}): each running sequence needs one token per step")
        return self


class RunConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8321, ge=0, le=65535)
    storage_dir: Path = Field(default_factory=lambda: corral_home() / "server")
    storage: StorageConfig | None = None  # the server's stores on PostgreSQL (None: SQLite under storage_dir)
    api_keys: list[str] = Field(default_factory=list)
    load: Literal["startup", "first_use"] = "startup"
    max_queue: int = Field(8, ge=0)  # requests waiting for a busy model, beyond the one running
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    providers: list[ProviderConfig] = Field(default_factory=list)
    models: list[ModelEntry] = Field(default_factory=list)
    shields: list[ShieldEntry] = Field(default_factory=list)  # Llama Guard shields (corral/safety/config.py)
    guardrails: GuardrailsConfig | None = None  # shields that check every chat completion
    code_interpreter: SandboxConfig = Field(default_factory=SandboxConfig)  # agents' sandbox limits
    web_search: WebSearchConfig | None = None  # agents' search provider (tavily | brave)

    @model_validator(mode="after")
    def _check(self):
        ids = [p.provider_id for p in self.providers]
        dup = {i for i in ids if ids.count(i) > 1}
        if dup:
            raise ValueError(f"providers: provider_id {sorted(dup)[0]!r} appears twice")
        types = {p.provider_id: p.provider_type for p in self.providers}
        seen = set()
        for k, m in enumerate(self.models):
            if m.provider_id not in types:
                raise ValueError(f"models[{k}].provider_id: {m.provider_id!r} is not a provider_id under "
                                 f"`providers` (have {sorted(types)})")
            if m.model_id in seen:
                raise ValueError(f"models[{k}].model_id: {m.model_id!r} appears twice")
            seen.add(m.model_id)
            kind = types[m.provider_id]
            if kind in RAG_APIS:
                raise ValueError(f"models[{k}].provider_id: {m.provider_id!r} is a {RAG_APIS[kind]} provider, "
                                 f"it serves no models")
            if (kind == EMBEDDINGS) != (m.model_type == "embedding"):
                raise ValueError(f"models[{k}].model_type: {m.model_type!r} does not match provider "
                                 f"{m.provider_id!r} of type {kind}")
            if kind == REMOTE and m.checkpoint:
                raise ValueError(f"models[{k}].checkpoint: a remote model has no checkpoint "
                                 f"(use provider_model_id)")
            if kind != REMOTE and m.provider_model_id:
                raise ValueError(f"models[{k}].provider_model_id: only remote models have one")
            if kind != INLINE:  # fail closed: a limit that nothing would enforce is a mistake
                for key in sorted(m.model_fields_set & set(INLINE_ONLY)):
                    raise ValueError(f"models[{k}].{key}: only inline::corral models have one "
                                     f"(provider {m.provider_id!r} is {kind})")
        check_safety(self)
        if any(not k for k in self.api_keys):
            raise ValueError("api_keys: an API key must not be empty")
        return self

    @classmethod
    def default(cls, **overrides) -> RunConfig:
        """The zero-configuration server: the default model inline plus MiniLM embeddings, and a Llama Guard
        shield for each guard model whose weights are in the model cache."""
        from corral.models.config import DEFAULT_MODEL
        from corral.paths import models_dir
        from corral.safety.config import default_guards

        guards = default_guards(models_dir())
        safety = [ProviderConfig(provider_id="llama-guard", provider_type=SAFETY)] if guards else []
        return cls(providers=[ProviderConfig(provider_id="corral", provider_type=INLINE),
                              ProviderConfig(provider_id="sentence-transformers", provider_type=EMBEDDINGS), *safety,
                              *default_rag_providers(ProviderConfig)],
                   models=[ModelEntry(model_id=DEFAULT_MODEL, provider_id="corral"),
                           ModelEntry(model_id=DEFAULT_EMBEDDING_MODEL, provider_id="sentence-transformers",
                                      model_type="embedding"),
                           *(ModelEntry(model_id=g, provider_id="corral") for g in guards)],
                   shields=[ShieldEntry(shield_id=g, provider_id="llama-guard") for g in guards],
                   **overrides)


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in e["loc"]).lstrip(".")
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key"
        lines.append(f"{loc or '(top level)'}: {msg}")
    return "; ".join(lines)


def load_run_config(path: str | Path | None = None, **overrides) -> RunConfig:
    """Read and validate a run config (None: the default). `overrides` (e.g. port) win over the file."""
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if path is None:
        try:
            return RunConfig.default(**overrides)
        except ValidationError as e:
            raise ConfigError(f"default run config: {_format_errors(e)}") from None
    path = distributions.resolve(path)  # a file, or a shipped config's name (corral/stack/distributions)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: run config not found (shipped configs: {', '.join(distributions.names())})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a run config is a YAML mapping, got {type(data).__name__}")
    try:
        data = distributions.substitute_env(data)  # ${env.NAME} and ${env.NAME:=default}
    except distributions.MissingEnv as e:
        raise ConfigError(f"{path}: {e}") from None
    data.update(overrides)
    try:
        cfg = RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{path}: {_format_errors(e)}") from None
    if not cfg.providers and not cfg.models:  # only server settings: serve the defaults
        default = RunConfig.default()
        cfg = cfg.model_copy(update={"providers": default.providers, "models": default.models,
                                     "shields": cfg.shields or default.shields})
    elif not cfg.models:
        raise ConfigError(f"{path}: models: no models to serve")
    cfg.storage_dir = Path(cfg.storage_dir).expanduser()
    return cfg
