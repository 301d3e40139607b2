"""Vector stores: the OpenAI / Llama Stack API over the registry, the files and a vector_io backend.

Ingestion runs in the background on `WORKERS` asyncio tasks fed by a queue: read the file's bytes,
parse and chunk them on a worker thread, embed the chunks in batches of `EMBED_BATCH` through the
embeddings provider (its own thread; progress in the log), then swap the file's chunks into the
backend in one transaction and only then mark the file completed. Between batches a job checks that
its file is still in progress, so a cancel or a delete stops it; the final status update is
conditional, and a job that lost the race removes the chunks it wrote. Nothing here blocks the event
loop: SQLite, parsing, embedding and the backends all run on threads.

Durability: a file is `completed` only after its chunks are committed, and both stores are
synchronous=FULL (or PostgreSQL's commit). A kill -9 mid-ingestion leaves the file `in_progress` with
none or all of its new chunks; at start every file still in progress is queued again, and its job
replaces whatever chunks it finds. A file whose bytes are gone fails with a `last_error`.

Search modes: `vector` (cosine similarity), `keyword` (BM25 / ts_rank_cd mapped to [0, 1)) and
`hybrid`: reciprocal-rank fusion (k = 60) of the two lists, each `HYBRID_CANDIDATES` deep, scaled so
that a chunk ranked first by both scores 1.0. A list `query` is joined into one query string.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import Any

import numpy as np

from corral.stack.api import APIError, EmbeddingRequest
from corral.stack.rag import api as rag
from corral.stack.rag.backend import Hit, StoredChunk, VectorIOProvider, rrf_fuse
from corral.stack.rag.files import LocalFiles
from corral.stack.rag.ingest import Chunking, IngestError, chunk_text, extract_text, tokenizer_for
from corral.stack.rag.registry import Registry

log = logging.getLogger("corral.vector_stores")

WORKERS = 2
EMBED_BATCH = 32
HYBRID_CANDIDATES = 50
SWEEP_EVERY_S = 60.0


def not_found(kind: str, ident: str) -> APIError:
    return APIError(404, f"{kind} {ident!r} not found", type="not_found_error", code="not_found")


class VectorStores:
    def __init__(self, stack, files: LocalFiles | None, providers: dict[str, VectorIOProvider], registry_path):
        self.stack, self.files, self.providers = stack, files, providers
        self.registry = Registry(registry_path)
        self.clock = time.time
        self._queue: asyncio.Queue | None = None
        self._queued: set[tuple[str, str]] = set()
        self._tasks: list[asyncio.Task] = []
        self._busy = 0

    # -- life cycle -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._tasks = [asyncio.create_task(self._worker(), name=f"corral-ingest-{i}") for i in range(WORKERS)]
        self._tasks.append(asyncio.create_task(self._sweeper(), name="corral-rag-sweeper"))
        resumed = await self._reg("in_progress")
        for store_id, file_id in resumed:
            self._enqueue(store_id, file_id)
        if resumed:
            log.info("resuming the ingestion of %d file(s) interrupted by the last shutdown", len(resumed))

    async def close(self) -> None:
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await asyncio.to_thread(self.registry.close)

    async def _reg(self, method: str, *args, **kwargs):
        return await asyncio.to_thread(getattr(self.registry, method), *args, **kwargs)

    def _now(self) -> int:
        return int(self.clock())

    def idle(self) -> bool:
        """No ingestion queued or running (for tests and benchmarks)."""
        return self._busy == 0 and (self._queue is None or self._queue.empty())

    # -- vector stores ----------------------------------------------------------------------------
    async def create_store(self, req: rag.CreateVectorStoreRequest) -> dict:
        provider_id = req.provider_id or next(iter(self.providers), None)
        if provider_id is None:
            raise APIError(400, "no vector_io provider is configured", code="no_vector_io_provider")
        if provider_id not in self.providers:
            raise APIError(400, f"provider_id {provider_id!r} is not a vector_io provider here "
                                f"(have {sorted(self.providers)})", param="provider_id")
        model_id = req.embedding_model or self._default_embedding_model()
        model, _ = self.stack.resolve(model_id, "embedding")
        dim = model.metadata["embedding_dimension"]
        if req.embedding_dimension is not None and req.embedding_dimension > dim:
            raise APIError(400, f"embedding_dimension {req.embedding_dimension} exceeds {model_id!r}'s {dim}",
                           param="embedding_dimension")
        for fid in req.file_ids:
            await self._file_or_404(fid, param="file_ids")
        store_id = f"vs_{uuid.uuid4().hex}"
        rec = {"id": store_id, "provider_id": provider_id, "name": req.name, "description": req.description,
               "metadata": req.metadata or {}, "created_at": self._now(),
               "expires_after": req.expires_after.model_dump() if req.expires_after else None,
               "embedding_model": model_id, "embedding_dimension": req.embedding_dimension or dim}
        await self.providers[provider_id].call("create_store", store_id, rec["embedding_dimension"])
        await self._reg("add_store", rec)
        chunking = rag.resolve_chunking(req.chunking_strategy)
        for fid in req.file_ids:
            await self._attach(store_id, fid, {}, chunking)
        return await self.get_store(store_id)

    def _default_embedding_model(self) -> str:
        models = [m.id for m in self.stack.models() if m.model_type == "embedding"]
        if not models:
            raise APIError(400, "no embedding model is served here: a vector store needs one", param="embedding_model")
        return models[0]

    async def _store(self, store_id: str, *, live: bool = False) -> dict:
        rec = await self._reg("store", store_id)
        if rec is None:
            raise not_found("vector store", store_id)
        if live and self._expired(rec):
            raise APIError(400, f"vector store {store_id!r} has expired", code="vector_store_expired")
        return rec

    async def _touch(self, rec: dict) -> None:
        """Move `last_active_at` (the expiry anchor) to now; at most once a minute, not a disk write per search."""
        if self._now() - rec["last_active_at"] >= 60:
            await self._reg("update_store", rec["id"], last_active_at=self._now())

    def _expired(self, rec: dict) -> bool:
        """Expired by the sweep, or due and not yet swept."""
        ea = rec["expires_after"]
        return bool(rec["expired"]) or (ea is not None and rec["last_active_at"] + ea["days"] * 86400 <= self._now())

    async def get_store(self, store_id: str) -> dict:
        return await self._store_object(await self._store(store_id))

    async def _store_object(self, rec: dict) -> dict:
        summary = await self._reg("counts", rec["id"])
        counts = summary["counts"]
        status = "expired" if self._expired(rec) else "in_progress" if counts["in_progress"] else "completed"
        ea = rec["expires_after"]
        return {"id": rec["id"], "object": "vector_store", "created_at": rec["created_at"], "name": rec["name"],
                "description": rec["description"], "usage_bytes": summary["usage_bytes"], "file_counts": counts,
                "status": status, "expires_after": ea,
                "expires_at": rec["last_active_at"] + ea["days"] * 86400 if ea else None,
                "last_active_at": rec["last_active_at"], "metadata": rec["metadata"],
                "embedding_model": rec["embedding_model"], "embedding_dimension": rec["embedding_dimension"],
                "provider_id": rec["provider_id"]}

    async def list_stores(self, **page) -> dict:
        recs, more = await self._paged("list_stores", **page)
        data = [await self._store_object(r) for r in recs]
        return _list(data, more)

    async def update_store(self, store_id: str, req: rag.UpdateVectorStoreRequest) -> dict:
        await self._store(store_id)
        fields: dict[str, Any] = {}
        if "name" in req.model_fields_set:
            fields["name"] = req.name
        if "metadata" in req.model_fields_set:
            fields["metadata"] = req.metadata or {}
        if "expires_after" in req.model_fields_set:
            fields["expires_after"] = req.expires_after.model_dump() if req.expires_after else None
        fields["last_active_at"] = self._now()
        await self._reg("update_store", store_id, **fields)
        return await self.get_store(store_id)

    async def delete_store(self, store_id: str) -> dict:
        rec = await self._store(store_id)
        await self._reg("delete_store", store_id)
        await self.providers[rec["provider_id"]].call("drop_store", store_id)
        return {"id": store_id, "object": "vector_store.deleted", "deleted": True}

    # -- a store's files --------------------------------------------------------------------------
    async def attach_file(self, store_id: str, req: rag.AttachFileRequest) -> dict:
        await self._store(store_id, live=True)
        await self._file_or_404(req.file_id, param="file_id")
        await self._attach(store_id, req.file_id, req.attributes or {}, rag.resolve_chunking(req.chunking_strategy))
        return await self.get_file(store_id, req.file_id)

    async def _attach(self, store_id: str, file_id: str, attributes: dict, chunking: Chunking,
                      batch_id: str | None = None) -> None:
        await self._reg("add_file", store_id, file_id, attributes,
                        {"max_tokens": chunking.max_tokens, "overlap_tokens": chunking.overlap_tokens,
                         "kind": chunking.kind}, self._now(), batch_id)
        await self._reg("update_store", store_id, last_active_at=self._now())
        self._enqueue(store_id, file_id)

    async def _file_or_404(self, file_id: str, param: str) -> dict:
        meta = await self.files.run(self.files.get, file_id) if self.files else None
        if meta is None:
            raise APIError(404, f"file {file_id!r} not found", type="not_found_error", param=param, code="not_found")
        return meta

    async def get_file(self, store_id: str, file_id: str) -> dict:
        await self._store(store_id)
        rec = await self._reg("file", store_id, file_id)
        if rec is None:
            raise not_found("file", f"{file_id}' in vector store '{store_id}")
        return _file_object(rec)

    async def list_files(self, store_id: str, *, status: str | None, batch_id: str | None = None, **page) -> dict:
        await self._store(store_id)
        if status is not None and status not in ("in_progress", "completed", "failed", "cancelled"):
            raise APIError(400, f"filter must be in_progress, completed, failed or cancelled, got {status!r}",
                           param="filter")
        recs, more = await self._paged("list_files", store_id, status=status, batch_id=batch_id, **page)
        return _list([_file_object(r) for r in recs], more)

    async def update_file(self, store_id: str, file_id: str, req: rag.UpdateFileRequest) -> dict:
        rec = await self._store(store_id)
        attrs = req.attributes or {}
        if not await self._reg("set_attributes", store_id, file_id, attrs):
            raise not_found("file", f"{file_id}' in vector store '{store_id}")
        await self.providers[rec["provider_id"]].call("set_attributes", store_id, file_id, attrs)
        return await self.get_file(store_id, file_id)

    async def delete_file(self, store_id: str, file_id: str) -> dict:
        rec = await self._store(store_id)
        if not await self._reg("remove_file", store_id, file_id):
            raise not_found("file", f"{file_id}' in vector store '{store_id}")
        await self.providers[rec["provider_id"]].call("delete_file", store_id, file_id)
        return {"id": file_id, "object": "vector_store.file.deleted", "deleted": True}

    async def file_content(self, store_id: str, file_id: str) -> dict:
        rec = await self._store(store_id)
        if await self._reg("file", store_id, file_id) is None:
            raise not_found("file", f"{file_id}' in vector store '{store_id}")
        chunks = await self.providers[rec["provider_id"]].call("file_chunks", store_id, file_id)
        return {"object": "vector_store.file_content.page", "data": [{"type": "text", "text": c.text} for c in chunks],
                "has_more": False, "next_page": None}

    async def forget_file(self, file_id: str) -> None:
        """A deleted (or expired) file leaves every store, chunks and all."""
        for store_id in await self._reg("stores_with_file", file_id):
            rec = await self._reg("store", store_id)
            await self._reg("remove_file", store_id, file_id)
            if rec is not None:
                await self.providers[rec["provider_id"]].call("delete_file", store_id, file_id)

    # -- file batches -----------------------------------------------------------------------------
    async def create_batch(self, store_id: str, req: rag.CreateFileBatchRequest) -> dict:
        await self._store(store_id, live=True)
        entries = req.entries()
        for e in entries:
            await self._file_or_404(e.file_id, param="file_ids")
        batch_id = f"vsfb_{uuid.uuid4().hex}"
        await self._reg("add_batch", batch_id, store_id, self._now())
        for e in entries:
            await self._attach(store_id, e.file_id, e.attributes or {}, rag.resolve_chunking(e.chunking_strategy),
                               batch_id)
        return await self.get_batch(store_id, batch_id)

    async def get_batch(self, store_id: str, batch_id: str) -> dict:
        await self._store(store_id)
        b = await self._reg("batch", store_id, batch_id)
        if b is None:
            raise not_found("file batch", batch_id)
        counts = (await self._reg("counts", store_id, batch_id))["counts"]
        if b["cancelled"]:
            status = "cancelled"
        elif counts["in_progress"]:
            status = "in_progress"
        elif counts["total"] and counts["failed"] == counts["total"]:
            status = "failed"
        else:
            status = "completed"
        return {"id": batch_id, "object": "vector_store.files_batch", "created_at": b["created_at"],
                "vector_store_id": store_id, "status": status, "file_counts": counts}

    async def cancel_batch(self, store_id: str, batch_id: str) -> dict:
        await self.get_batch(store_id, batch_id)
        await self._reg("cancel_batch", batch_id)
        return await self.get_batch(store_id, batch_id)

    async def list_batch_files(self, store_id: str, batch_id: str, *, status: str | None, **page) -> dict:
        await self.get_batch(store_id, batch_id)
        return await self.list_files(store_id, status=status, batch_id=batch_id, **page)

    # -- search -----------------------------------------------------------------------------------
    async def search(self, store_id: str, req: rag.SearchRequest) -> dict:
        rec = await self._store(store_id, live=True)
        flt = rag.parse_filter(req.filters)
        threshold = req.ranking_options.score_threshold if req.ranking_options else 0.0
        hits = await self._search(rec, " ".join(req.queries()), req.search_mode, req.max_num_results, flt)
        await self._touch(rec)
        data = []
        for h in hits:
            if h.score < threshold:
                continue
            meta = h.chunk.metadata.get("metadata", {})
            data.append({"file_id": h.chunk.file_id or meta.get("document_id") or "",
                         "filename": meta.get("filename", ""), "score": h.score,
                         "attributes": h.chunk.attributes, "content": [{"type": "text", "text": h.chunk.text}]})
        return {"object": "vector_store.search_results.page", "search_query": req.queries(), "data": data,
                "has_more": False, "next_page": None}

    async def _search(self, rec: dict, query: str, mode: str, k: int, flt, *, impact: float = 60.0,
                      with_embeddings: bool = False) -> list[Hit]:
        provider = self.providers[rec["provider_id"]]
        if mode == "keyword":
            return await provider.call("search_keyword", rec["id"], query, k, flt, with_embeddings)
        qvec = (await self._embed(rec, [query]))[0]
        if mode == "vector":
            return await provider.call("search_vector", rec["id"], qvec, k, flt, with_embeddings)
        depth = max(k, HYBRID_CANDIDATES)
        by_vector = await provider.call("search_vector", rec["id"], qvec, depth, flt, with_embeddings)
        by_keyword = await provider.call("search_keyword", rec["id"], query, depth, flt, with_embeddings)
        return rrf_fuse([by_vector, by_keyword], k, impact)

    async def _embed(self, rec: dict, texts: list[str]) -> np.ndarray:
        model, provider = self.stack.resolve(rec["embedding_model"], "embedding")
        dims = rec["embedding_dimension"]
        req = EmbeddingRequest(model=rec["embedding_model"], input=texts,
                               dimensions=dims if dims != model.metadata["embedding_dimension"] else None)
        out = await provider.embeddings(model, req)
        return np.asarray([d["embedding"] for d in out["data"]], dtype=np.float32)

    # -- vector-io (Llama Stack) ------------------------------------------------------------------
    async def insert_chunks(self, req: rag.InsertChunksRequest) -> None:
        rec = await self._store(req.vector_store_id, live=True)
        dim = rec["embedding_dimension"]
        for i, c in enumerate(req.chunks):
            if len(c.embedding) != dim:
                raise APIError(400, f"chunks[{i}].embedding has {len(c.embedding)} dimensions; vector store "
                                    f"{rec['id']!r} holds {dim}", param=f"chunks[{i}].embedding")
        stored = [StoredChunk(chunk_id=c.chunk_id, text=c.text(), file_id=None,
                              metadata={"metadata": c.metadata,
                                        "chunk_metadata": c.chunk_metadata.model_dump(exclude_none=True)
                                        if c.chunk_metadata else {}},
                              attributes=_primitives(c.metadata)) for c in req.chunks]
        vectors = np.asarray([c.embedding for c in req.chunks], dtype=np.float32)
        await self.providers[rec["provider_id"]].call("upsert_chunks", rec["id"], stored, vectors)
        await self._touch(rec)

    async def query_chunks(self, req: rag.QueryChunksRequest) -> dict:
        rec = await self._store(req.vector_store_id, live=True)
        params = req.params or rag.QueryParams()
        impact = params.ranker.impact_factor if params.ranker else 60.0
        hits = await self._search(rec, rag.content_text(req.query), params.mode, params.max_chunks, None,
                                  impact=impact, with_embeddings=True)
        hits = [h for h in hits if h.score >= params.score_threshold]
        chunks = []
        for h in hits:
            meta = h.chunk.metadata
            chunks.append({"content": h.chunk.text, "chunk_id": h.chunk.chunk_id, "metadata": meta.get("metadata", {}),
                           "chunk_metadata": meta.get("chunk_metadata", {"chunk_id": h.chunk.chunk_id}),
                           "embedding": h.chunk.embedding, "embedding_model": rec["embedding_model"],
                           "embedding_dimension": rec["embedding_dimension"]})
        return {"chunks": chunks, "scores": [h.score for h in hits]}

    # -- ingestion --------------------------------------------------------------------------------
    def _enqueue(self, store_id: str, file_id: str) -> None:
        if (store_id, file_id) not in self._queued and self._queue is not None:
            self._queued.add((store_id, file_id))
            self._queue.put_nowait((store_id, file_id))

    async def _worker(self) -> None:
        while True:
            store_id, file_id = await self._queue.get()
            self._queued.discard((store_id, file_id))
            self._busy += 1
            try:
                await self._ingest(store_id, file_id)
            except IngestError as e:
                await self._reg("finish_file", store_id, file_id, "failed", last_error={"code": e.code, "message": e.message})
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - one bad file must not stop the worker
                log.exception("ingesting %s into %s failed", file_id, store_id)
                await self._reg("finish_file", store_id, file_id, "failed",
                                last_error={"code": "server_error",
                                            "message": "internal error while processing the file (see the server log)"})
            finally:
                self._busy -= 1

    async def _still_in_progress(self, store_id: str, file_id: str) -> dict | None:
        rec = await self._reg("file", store_id, file_id)
        return rec if rec is not None and rec["status"] == "in_progress" else None

    async def _ingest(self, store_id: str, file_id: str) -> None:
        job = await self._still_in_progress(store_id, file_id)
        store = await self._reg("store", store_id)
        if job is None or store is None:
            return
        meta = await self.files.run(self.files.get, file_id) if self.files else None
        data = await self.files.run(self.files.read, file_id) if meta else None
        if data is None:
            raise IngestError("invalid_file", f"file {file_id!r} no longer exists (deleted or expired)")
        model, _ = self.stack.resolve(store["embedding_model"], "embedding")
        chunking = Chunking(job["chunking"]["max_tokens"], job["chunking"]["overlap_tokens"], job["chunking"]["kind"])
        tokenizer = await asyncio.to_thread(tokenizer_for, model.provider_resource_id)  # loads from disk once
        pieces = await asyncio.to_thread(lambda: chunk_text(extract_text(data, meta["filename"]), tokenizer, chunking))
        vectors = []
        for start in range(0, len(pieces), EMBED_BATCH):
            if await self._still_in_progress(store_id, file_id) is None:
                log.info("ingesting %s into %s stopped: cancelled or removed", file_id, store_id)
                return
            vectors.append(await self._embed(store, [p.text for p in pieces[start:start + EMBED_BATCH]]))
            log.info("ingesting %s (%s) into %s: %d/%d chunks embedded", file_id, meta["filename"], store_id,
                     min(start + EMBED_BATCH, len(pieces)), len(pieces))
        job = await self._still_in_progress(store_id, file_id)  # the latest attributes
        if job is None:
            return
        chunks = [StoredChunk(chunk_id=f"{file_id}:{p.position}", text=p.text, file_id=file_id, position=p.position,
                              metadata={"metadata": {"file_id": file_id, "filename": meta["filename"],
                                                     "document_id": file_id},
                                        "chunk_metadata": {"chunk_id": f"{file_id}:{p.position}", "document_id": file_id,
                                                           "source": meta["filename"], "chunk_tokenizer": tokenizer.name,
                                                           "content_token_count": p.n_tokens}},
                              attributes=job["attributes"]) for p in pieces]
        provider = self.providers[store["provider_id"]]
        await provider.call("replace_file", store_id, file_id, chunks, np.concatenate(vectors))
        if not await self._reg("finish_file", store_id, file_id, "completed", usage_bytes=len(data)):
            await provider.call("delete_file", store_id, file_id)  # cancelled or removed while we wrote
            return
        log.info("ingested %s (%s) into %s: %d chunks", file_id, meta["filename"], store_id, len(chunks))

    # -- expiry -----------------------------------------------------------------------------------
    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_EVERY_S)
            try:
                await self.sweep()
            except Exception:  # noqa: BLE001 - try again next time
                log.exception("the expiry sweep failed")

    async def sweep(self) -> None:
        """Delete expired files (from every store too) and mark expired vector stores, dropping their chunks."""
        if self.files is not None:
            for file_id in await self.files.run(self.files.expired_ids):
                await self.forget_file(file_id)
                await self.files.run(self.files.delete, file_id)
                log.info("file %s expired and was deleted", file_id)
        for rec in await self._reg("stores_to_expire", self._now()):
            await self._reg("update_store", rec["id"], expired=1)
            await self.providers[rec["provider_id"]].call("drop_store", rec["id"])
            log.info("vector store %s expired", rec["id"])

    # -- paging helper ----------------------------------------------------------------------------
    async def _paged(self, method: str, *args, **page):
        """A registry list call; an unknown `after` / `before` id is a 400 naming it."""
        try:
            return await self._reg(method, *args, **page)
        except KeyError as e:
            which = "after" if page.get("after") == e.args[0] else "before"
            raise APIError(400, f"{which}: no such id {e.args[0]!r}", param=which) from None


def _file_object(rec: dict) -> dict:
    ch = rec["chunking"]
    return {"id": rec["file_id"], "object": "vector_store.file", "usage_bytes": rec["usage_bytes"],
            "created_at": rec["created_at"], "vector_store_id": rec["store_id"], "status": rec["status"],
            "last_error": rec["last_error"], "attributes": rec["attributes"],
            "chunking_strategy": {"type": "static", "static": {"max_chunk_size_tokens": ch["max_tokens"],
                                                               "chunk_overlap_tokens": ch["overlap_tokens"]}}}


def _list(data: list[dict], more: bool) -> dict:
    return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None, "has_more": more}


def _primitives(meta: dict) -> dict:
    """The filterable part of a vector-io chunk's metadata: strings, numbers and booleans."""
    return {k: v for k, v in meta.items() if isinstance(v, (str, int, float, bool)) and len(k) <= 64}
