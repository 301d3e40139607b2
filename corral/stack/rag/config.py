"""Run-config entries of the RAG providers, the Llama Stack way: `providers` with an api and a type.

    providers:
      - provider_id: localfs
        provider_type: inline::localfs          # api: files
        config: {max_upload_bytes: 536870912}  # optional; storage_dir defaults to <storage_dir>/files
      - provider_id: sqlite-vec
        provider_type: inline::sqlite-vec       # api: vector_io (the embedded default)
        config: {}                              # optional db_path, default <storage_dir>/vector_io/sqlite_vec.db
      - provider_id: pgvector
        provider_type: remote::pgvector         # api: vector_io
        config: {dsn: "postgresql://user:pass@db:5432/corral"}

Vector stores go to the first vector_io provider unless created with `provider_id`. This module
imports nothing of the server, so the run config can validate these entries without loading them.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

FILES = "inline::localfs"
SQLITE_VEC = "inline::sqlite-vec"
PGVECTOR = "remote::pgvector"
RAG_APIS = {FILES: "files", SQLITE_VEC: "vector_io", PGVECTOR: "vector_io"}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LocalFSConfig(_Strict):
    storage_dir: str | None = None  # default: <storage_dir>/files
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1024)


class SqliteVecConfig(_Strict):
    db_path: str | None = None  # default: <storage_dir>/vector_io/sqlite_vec.db


class PgVectorConfig(_Strict):
    dsn: str = Field(min_length=1)  # any libpq connection string or URI; the server needs the `vector` extension


CONFIGS = {FILES: LocalFSConfig, SQLITE_VEC: SqliteVecConfig, PGVECTOR: PgVectorConfig}


def check_rag_provider(provider_type: str, config: dict) -> BaseModel:
    """Validate a RAG provider's `config` (errors surface under that provider's `config`)."""
    return CONFIGS[provider_type].model_validate(config)


def default_rag_providers(provider_cls) -> list:
    """What `corral serve` runs with no config: files on disk and the embedded vector store."""
    return [provider_cls(provider_id="localfs", provider_type=FILES),
            provider_cls(provider_id="sqlite-vec", provider_type=SQLITE_VEC)]
