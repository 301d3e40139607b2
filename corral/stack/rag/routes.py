"""HTTP routes of the Files, Vector Stores and vector-io APIs: thin, each one call into the service.

The upload is multipart (`file`, `purpose`, optional `expires_after[anchor]` / `expires_after[seconds]`,
the way the openai SDK flattens it). Its size limit is the files provider's `max_upload_bytes`, which the
server's ASGI guard applies to this one route instead of the general body limit (see server.py).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.datastructures import UploadFile
from starlette.responses import FileResponse

from corral.stack.api import APIError
from corral.stack.rag import api as rag
from corral.stack.rag.files import MAX_EXPIRY_S, MIN_EXPIRY_S, PURPOSES, LocalFiles
from corral.stack.rag.service import VectorStores

router = APIRouter()

MAX_FILES_PAGE = 10_000  # OpenAI's own limit for GET /v1/files
MAX_PAGE = 1000
UPLOAD_FIELDS = {"file", "purpose", "expires_after[anchor]", "expires_after[seconds]"}


def _files(request: Request) -> LocalFiles:
    files = request.app.state.stack.files
    if files is None:
        raise APIError(404, "the files API is not configured on this server (add an inline::localfs provider)",
                       type="not_found_error", code="not_configured")
    return files


def _stores(request: Request) -> VectorStores:
    stores = request.app.state.stack.vector_stores
    if stores is None:
        raise APIError(404, "vector stores are not configured on this server (add a vector_io provider)",
                       type="not_found_error", code="not_configured")
    return stores


def _page(limit: int, order: str, max_limit: int) -> None:
    if not 1 <= limit <= max_limit:
        raise APIError(400, f"limit must be between 1 and {max_limit}, got {limit}", param="limit")
    if order not in ("asc", "desc"):
        raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")


# ---------------------------------------------------------------------------------------------
# Files


@router.post("/v1/files")
async def upload_file(request: Request):
    files = _files(request)
    form = await request.form(max_files=1, max_fields=len(UPLOAD_FIELDS))
    try:
        unknown = sorted(set(form.keys()) - UPLOAD_FIELDS)
        if unknown:
            raise APIError(400, f"unrecognized form field {unknown[0]!r}", param=unknown[0], code="unknown_field")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "file: field required (a multipart/form-data upload with a `file` part)", param="file")
        purpose = form.get("purpose")
        if purpose not in PURPOSES:
            raise APIError(400, f"purpose must be one of {list(PURPOSES)}, got {purpose!r}", param="purpose")
        expires_in = _expires_in(form.get("expires_after[anchor]"), form.get("expires_after[seconds]"))
        filename = (upload.filename or "upload").replace("\\", "/").rsplit("/", 1)[-1][:255] or "upload"
        return await files.run(files.create, upload.file, filename, purpose, expires_in)
    finally:
        await form.close()


def _expires_in(anchor, seconds) -> int | None:
    if anchor is None and seconds is None:
        return None
    if anchor != "created_at":
        raise APIError(400, f"expires_after[anchor] must be 'created_at', got {anchor!r}", param="expires_after[anchor]")
    try:
        value = int(seconds)
    except (TypeError, ValueError):
        raise APIError(400, f"expires_after[seconds] must be an integer, got {seconds!r}",
                       param="expires_after[seconds]") from None
    if not MIN_EXPIRY_S <= value <= MAX_EXPIRY_S:
        raise APIError(400, f"expires_after[seconds] must be between {MIN_EXPIRY_S} (1 hour) and {MAX_EXPIRY_S} "
                            f"(30 days), got {value}", param="expires_after[seconds]")
    return value


@router.get("/v1/files")
async def list_files(request: Request, after: str | None = None, limit: int = MAX_FILES_PAGE, order: str = "desc",
                     purpose: str | None = None):
    files = _files(request)
    _page(limit, order, MAX_FILES_PAGE)
    try:
        return await files.run(files.list, limit=limit, order=order, after=after, purpose=purpose)
    except KeyError:
        raise APIError(400, f"after: no file with id {after!r}", param="after") from None


async def _file(files: LocalFiles, file_id: str) -> dict:
    meta = await files.run(files.get, file_id)
    if meta is None:
        raise APIError(404, f"file {file_id!r} not found", type="not_found_error", code="not_found")
    return meta


@router.get("/v1/files/{file_id}")
async def get_file(request: Request, file_id: str):
    return await _file(_files(request), file_id)


@router.delete("/v1/files/{file_id}")
async def delete_file(request: Request, file_id: str):
    files = _files(request)
    await _file(files, file_id)
    stores = request.app.state.stack.vector_stores
    if stores is not None:
        await stores.forget_file(file_id)  # no chunks of a deleted file stay searchable
    await files.run(files.delete, file_id)
    return {"id": file_id, "object": "file", "deleted": True}


@router.get("/v1/files/{file_id}/content")
async def file_content(request: Request, file_id: str):
    files = _files(request)
    await _file(files, file_id)
    path = await files.run(files.path, file_id)
    if path is None:
        raise APIError(404, f"file {file_id!r} not found", type="not_found_error", code="not_found")
    return FileResponse(path, media_type="application/octet-stream")


# ---------------------------------------------------------------------------------------------
# Vector stores


@router.post("/v1/vector_stores")
async def create_vector_store(request: Request, req: rag.CreateVectorStoreRequest):
    return await _stores(request).create_store(req)


@router.get("/v1/vector_stores")
async def list_vector_stores(request: Request, limit: int = 20, order: str = "desc", after: str | None = None,
                             before: str | None = None):
    _page(limit, order, MAX_PAGE)
    return await _stores(request).list_stores(limit=limit, order=order, after=after, before=before)


@router.get("/v1/vector_stores/{store_id}")
async def get_vector_store(request: Request, store_id: str):
    return await _stores(request).get_store(store_id)


@router.post("/v1/vector_stores/{store_id}")
async def update_vector_store(request: Request, store_id: str, req: rag.UpdateVectorStoreRequest):
    return await _stores(request).update_store(store_id, req)


@router.delete("/v1/vector_stores/{store_id}")
async def delete_vector_store(request: Request, store_id: str):
    return await _stores(request).delete_store(store_id)


@router.post("/v1/vector_stores/{store_id}/search")
async def search_vector_store(request: Request, store_id: str, req: rag.SearchRequest):
    return await _stores(request).search(store_id, req)


@router.post("/v1/vector_stores/{store_id}/files")
async def attach_file(request: Request, store_id: str, req: rag.AttachFileRequest):
    return await _stores(request).attach_file(store_id, req)


@router.get("/v1/vector_stores/{store_id}/files")
async def list_store_files(request: Request, store_id: str, limit: int = 20, order: str = "desc",
                           after: str | None = None, before: str | None = None, filter: str | None = None):
    _page(limit, order, MAX_PAGE)
    return await _stores(request).list_files(store_id, status=filter, limit=limit, order=order, after=after,
                                             before=before)


@router.get("/v1/vector_stores/{store_id}/files/{file_id}")
async def get_store_file(request: Request, store_id: str, file_id: str):
    return await _stores(request).get_file(store_id, file_id)


@router.post("/v1/vector_stores/{store_id}/files/{file_id}")
async def update_store_file(request: Request, store_id: str, file_id: str, req: rag.UpdateFileRequest):
    return await _stores(request).update_file(store_id, file_id, req)


@router.delete("/v1/vector_stores/{store_id}/files/{file_id}")
async def delete_store_file(request: Request, store_id: str, file_id: str):
    return await _stores(request).delete_file(store_id, file_id)


@router.get("/v1/vector_stores/{store_id}/files/{file_id}/content")
async def store_file_content(request: Request, store_id: str, file_id: str):
    return await _stores(request).file_content(store_id, file_id)


@router.post("/v1/vector_stores/{store_id}/file_batches")
async def create_file_batch(request: Request, store_id: str, req: rag.CreateFileBatchRequest):
    return await _stores(request).create_batch(store_id, req)


@router.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}")
async def get_file_batch(request: Request, store_id: str, batch_id: str):
    return await _stores(request).get_batch(store_id, batch_id)


@router.post("/v1/vector_stores/{store_id}/file_batches/{batch_id}/cancel")
async def cancel_file_batch(request: Request, store_id: str, batch_id: str):
    return await _stores(request).cancel_batch(store_id, batch_id)


@router.get("/v1/vector_stores/{store_id}/file_batches/{batch_id}/files")
async def list_batch_files(request: Request, store_id: str, batch_id: str, limit: int = 20, order: str = "desc",
                           after: str | None = None, before: str | None = None, filter: str | None = None):
    _page(limit, order, MAX_PAGE)
    return await _stores(request).list_batch_files(store_id, batch_id, status=filter, limit=limit, order=order,
                                                   after=after, before=before)


# ---------------------------------------------------------------------------------------------
# vector-io (Llama Stack)


@router.post("/v1/vector-io/insert")
async def insert_chunks(request: Request, req: rag.InsertChunksRequest):
    await _stores(request).insert_chunks(req)
    return None  # Llama Stack answers insert with an empty (null) body


@router.post("/v1/vector-io/query")
async def query_chunks(request: Request, req: rag.QueryChunksRequest):
    return await _stores(request).query_chunks(req)
