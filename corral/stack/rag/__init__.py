"""RAG: the Files and Vector Stores APIs (OpenAI-compatible) and Llama Stack's vector-io.

    config.py     the run-config entries (inline::localfs, inline::sqlite-vec, remote::pgvector)
    api.py        request models, filters (with their reference semantics), chunking strategies
    files.py      the files provider: bytes on disk under server-chosen names, metadata in SQLite
    ingest.py     parsing (text, Markdown, HTML, JSON, CSV, PDF) and token chunking
    backend.py    the VectorBackend protocol both backends implement, and reciprocal-rank fusion
    sqlite_vec.py SQLite + sqlite-vec + FTS5, the embedded default
    pgvector.py   PostgreSQL + pgvector + PostgreSQL full-text search
    registry.py   vector stores, their files and batches (SQLite)
    service.py    the vector store service: background ingestion, search, vector-io, expiry
    routes.py     the HTTP routes
    quality.py    recall@k of each search mode on a labelled corpus (python -m corral.stack.rag.quality)

`build` makes the providers and the service for the server's `Stack` (docs/rag.md has the design).
"""

from __future__ import annotations

from pathlib import Path

from corral.stack.rag.config import FILES, PGVECTOR, RAG_APIS, SQLITE_VEC, check_rag_provider


def build_provider(p, storage_dir: Path):
    """The provider object for one RAG entry of the run config (nothing connects before `start`)."""
    cfg = check_rag_provider(p.provider_type, p.config)
    if p.provider_type == FILES:
        from corral.stack.rag.files import LocalFiles

        return LocalFiles(p.provider_id, Path(cfg.storage_dir).expanduser() if cfg.storage_dir else storage_dir / "files",
                          cfg.max_upload_bytes)
    from corral.stack.rag.backend import VectorIOProvider

    if p.provider_type == SQLITE_VEC:
        from corral.stack.rag.sqlite_vec import SqliteVecBackend

        path = Path(cfg.db_path).expanduser() if cfg.db_path else storage_dir / "vector_io" / "sqlite_vec.db"
        return VectorIOProvider(p.provider_id, p.provider_type, lambda: SqliteVecBackend(path))
    from corral.stack.rag.pgvector import PgVectorBackend

    return VectorIOProvider(p.provider_id, p.provider_type, lambda: PgVectorBackend(cfg.dsn))


def build_service(stack, storage_dir: Path):
    """(files provider, vector store service) from the stack's RAG providers; None where not configured."""
    from corral.stack.rag.backend import VectorIOProvider
    from corral.stack.rag.files import LocalFiles

    files = next((p for p in stack.providers.values() if isinstance(p, LocalFiles)), None)
    vector_io = {pid: p for pid, p in stack.providers.items() if isinstance(p, VectorIOProvider)}
    if not vector_io:
        return files, None
    from corral.stack.rag.service import VectorStores

    return files, VectorStores(stack, files, vector_io, storage_dir / "vector_stores.db")


def provider_config(provider, raw: dict) -> dict:
    """A RAG provider's config as /v1/providers shows it: defaults filled in, secrets redacted."""
    shown = dict(raw)
    if getattr(provider, "backend", None) is not None:
        shown.update(provider.backend.describe())
    elif hasattr(provider, "max_upload_bytes"):
        shown.update({"storage_dir": str(provider.dir), "max_upload_bytes": provider.max_upload_bytes})
    if "dsn" in shown and getattr(provider, "backend", None) is None:
        from corral.stack.rag.pgvector import redact_dsn

        shown["dsn"] = redact_dsn(shown["dsn"])
    return shown


__all__ = ["FILES", "PGVECTOR", "RAG_APIS", "SQLITE_VEC", "build_provider", "build_service", "provider_config"]
