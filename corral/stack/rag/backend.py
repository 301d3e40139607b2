"""The one interface both vector_io backends implement (SQLite + sqlite-vec, PostgreSQL + pgvector).

A backend holds chunks only: their text, vector, file id, position, metadata and attributes, keyed by
(vector store id, chunk id). Vector stores, their files and batches are the service's own records
(`vector_stores.py`), as in Llama Stack, where the registry and the vector database are separate.

The calls are blocking; `VectorIOProvider` runs them on the provider's one thread. `replace_file` is
the durability hinge: it swaps all of one file's chunks in one transaction, so a store never holds
half of a file, and a file is marked completed only after that transaction commits.

Scores are on one scale whatever the backend:
  - vector: cosine similarity of the (normalized) embeddings;
  - keyword: the backend's BM25-style rank r mapped to r / (1 + r), in [0, 1): SQLite FTS5's bm25()
    and PostgreSQL's ts_rank_cd (which has that normalization built in as flag 32).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Protocol, Sequence

import numpy as np

from corral.stack.rag.api import Filter


@dataclass
class StoredChunk:
    chunk_id: str
    text: str
    file_id: str | None = None  # None: inserted through vector-io, not from a file
    position: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)
    attributes: dict[str, Any] = field(default_factory=dict)  # what filters see
    embedding: list[float] | None = None


@dataclass
class Hit:
    chunk: StoredChunk
    score: float


class VectorBackend(Protocol):
    def create_store(self, store_id: str, dimension: int) -> None: ...

    def drop_store(self, store_id: str) -> None: ...

    def replace_file(self, store_id: str, file_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        """Atomically make `chunks` the file's only chunks."""

    def delete_file(self, store_id: str, file_id: str) -> None: ...

    def upsert_chunks(self, store_id: str, chunks: Sequence[StoredChunk], vectors: np.ndarray) -> None:
        """vector-io: insert (or replace, by chunk id) pre-embedded chunks."""

    def set_attributes(self, store_id: str, file_id: str, attributes: dict[str, Any]) -> None: ...

    def file_chunks(self, store_id: str, file_id: str) -> list[StoredChunk]: ...

    def count(self, store_id: str, file_id: str | None = None) -> int: ...

    def search_vector(self, store_id: str, vector: np.ndarray, k: int, flt: Filter | None,
                      with_embeddings: bool = False) -> list[Hit]: ...

    def search_keyword(self, store_id: str, query: str, k: int, flt: Filter | None,
                       with_embeddings: bool = False) -> list[Hit]: ...

    def describe(self) -> dict: ...

    def close(self) -> None: ...


class VectorIOProvider:
    """A backend as a server provider: listed by /v1/providers, its calls on one worker thread."""

    def __init__(self, provider_id: str, provider_type: str, backend_factory):
        self.provider_id, self.provider_type = provider_id, provider_type
        self._factory = backend_factory
        self.backend: VectorBackend | None = None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix=f"corral-{provider_id}")

    def models(self) -> list:
        return []

    async def start(self) -> None:
        # Connecting (and creating tables) happens on the worker thread: a PostgreSQL server that is
        # slow to answer does not hold the event loop.
        self.backend = await self.run_raw(self._factory)

    async def run_raw(self, fn, *args, **kwargs):
        return await asyncio.get_running_loop().run_in_executor(self._thread, partial(fn, *args, **kwargs))

    async def call(self, method: str, *args, **kwargs):
        """Run one backend method on the provider's thread."""
        return await self.run_raw(getattr(self.backend, method), *args, **kwargs)

    async def health(self) -> dict:
        if self.backend is None:
            return {"status": "Error", "message": "not started"}
        try:
            await self.call("count", "__health__")
        except Exception as e:  # noqa: BLE001 - health reports, it does not raise
            return {"status": "Error", "message": type(e).__name__}
        return {"status": "OK"}

    async def close(self) -> None:
        if self.backend is not None:
            await self.call("close")
        self._thread.shutdown(wait=True)


def rrf_fuse(lists: Sequence[Sequence[Hit]], k: int, impact: float = 60.0) -> list[Hit]:
    """Reciprocal-rank fusion: score = sum over lists of 1 / (impact + rank), rank from 1.

    Scaled by (impact + 1) / len(lists) so that a chunk ranked first by every list scores 1.0.
    """
    fused: dict[str, tuple[StoredChunk, float]] = {}
    for hits in lists:
        for rank, h in enumerate(hits, start=1):
            chunk, score = fused.get(h.chunk.chunk_id, (h.chunk, 0.0))
            fused[h.chunk.chunk_id] = (chunk, score + 1.0 / (impact + rank))
    scale = (impact + 1) / max(len(lists), 1)
    ranked = sorted(fused.values(), key=lambda cs: -cs[1])[:k]
    return [Hit(c, s * scale) for c, s in ranked]


def keyword_terms(query: str) -> list[str]:
    """The words of a keyword query (letters, digits, underscore), lower-cased and de-duplicated."""
    import re

    seen: list[str] = []
    for w in re.findall(r"\w+", query.lower()):
        if w not in seen:
            seen.append(w)
    return seen[:64]
