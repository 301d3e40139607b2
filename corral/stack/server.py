"""The Corral server: FastAPI routes over a few providers (OpenAI and Llama Stack compatible).

A request crosses at most route -> router (`Stack`: model id -> provider) -> provider, as one
validated request object. Around the routes:
  - errors are OpenAI's body `{"error": {message, type, param, code}}`; an unknown request field is a
    400 that names it (the request models forbid extras);
  - an ASGI guard refuses bodies over `max_body_bytes` (413) and, when API keys are configured,
    requests without a valid `Authorization: Bearer` key (401) on every route but /v1/health and the
    chat page (`/`, `/ui/*`: corral/ui);
  - `Observer` (corral/stack/metrics.py), outside the guard, counts and times every request for
    `/metrics` and writes one JSON access-log line per request;
  - streams are Server-Sent Events ending in `data: [DONE]`; a client that disconnects closes the
    provider's iterator, which stops its generation;
  - every chat completion (streamed or not; inline or remote) is stored in SQLite for
    `GET /v1/chat/completions[/{id}]`, unless the request says `store: false`; it is stored before
    the answer (or a stream's `[DONE]`) goes out, under an id no other stored completion has;
  - an unexpected exception is logged with its traceback and answered with a generic 500 (in a
    stream that already started: a generic error event): its text never reaches the client.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import corral
from corral.stack.api import APIError, ChatCompletionRequest, CompletionRequest, EmbeddingRequest, ModelInfo
from corral.stack.config import EMBEDDINGS, INLINE, REMOTE, RunConfig
from corral.safety.config import SAFETY
from corral.stack.routes_safety import configured_guardrails, guarded_chat, router as safety_router
from corral.stack.rag import RAG_APIS, build_provider, build_service, provider_config as rag_provider_config
from corral.stack.agents.service import Agents
from corral.stack.routes_agents import agents_router
from corral.stack.http import unless_disconnected
from corral.stack.store import CompletionStore
from corral.stack.metrics import Metrics, Observer, add_metrics_route
from corral.ui import add_ui_routes, is_public

# Llama Stack's clients page with up to 1000 items (OpenAI's own lists stop at 100).
MAX_PAGE = 1000

log = logging.getLogger("corral.server")


# ---------------------------------------------------------------------------------------------
# The router


class Stack:
    """Providers, the models they serve, and the completion store."""

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg
        self.providers: dict[str, object] = {}
        load_at_start = cfg.load == "startup"
        for p in cfg.providers:
            entries = [m for m in cfg.models if m.provider_id == p.provider_id]
            if p.provider_type == INLINE:
                from corral.stack.providers.inline import InlineProvider

                prov = InlineProvider(p.provider_id, entries, max_queue=cfg.max_queue, load_at_start=load_at_start)
            elif p.provider_type == EMBEDDINGS:
                from corral.stack.providers.embeddings import SentenceTransformersProvider

                prov = SentenceTransformersProvider(p.provider_id, entries, load_at_start=load_at_start)
            elif p.provider_type == REMOTE:
                from corral.stack.providers.remote import RemoteProvider

                prov = RemoteProvider(p.provider_id, p.remote, entries)
            elif p.provider_type == SAFETY:  # Llama Guard shields over the guard models of the inline providers
                from corral.stack.providers.safety import LlamaGuardProvider

                prov = LlamaGuardProvider(p.provider_id, p.config,
                                          [s for s in cfg.shields if s.provider_id == p.provider_id], self.providers)
            elif p.provider_type in RAG_APIS:  # files and vector_io (corral/stack/rag)
                prov = build_provider(p, cfg.storage_dir)
            else:  # pragma: no cover - the config validates provider_type
                raise ValueError(p.provider_type)
            self.providers[p.provider_id] = prov
        self.store = CompletionStore(cfg.storage_dir, **(cfg.storage.store_args if cfg.storage else {}))
        self.files, self.vector_stores = build_service(self, cfg.storage_dir)  # None where not configured
        # Responses, conversations and their tools (corral/stack/agents): after vector_stores (file_search)
        self.agents = Agents(self, cfg.storage_dir, code_interpreter=cfg.code_interpreter, web_search=cfg.web_search)
        self.agents.guardrails = configured_guardrails(self)  # the run config's shields check responses too

    def models(self) -> list[ModelInfo]:
        return [m for p in self.providers.values() for m in p.models()]

    def resolve(self, model_id: str, kind: str) -> tuple[ModelInfo, object]:
        for p in self.providers.values():
            for m in p.models():
                if m.id == model_id:
                    if m.model_type != kind:
                        raise APIError(400, f"model {model_id!r} is an {m.model_type} model, not an {kind} model",
                                       param="model", code="wrong_model_type")
                    return m, p
        known = sorted(m.id for m in self.models() if m.model_type == kind)
        raise APIError(404, f"model {model_id!r} is not served here (available: {known})",
                       param="model", code="model_not_found")

    async def start(self) -> None:
        for p in self.providers.values():
            await p.start()
        if self.vector_stores is not None:  # after the providers: it resumes ingestion with them
            await self.vector_stores.start()
        await self.agents.start()

    async def close(self) -> None:
        await self.agents.close()  # first: its background responses use the providers
        if self.vector_stores is not None:
            await self.vector_stores.close()
        for p in self.providers.values():
            await p.close()
        await asyncio.to_thread(self.store.close)


# ---------------------------------------------------------------------------------------------
# Body limit and API keys (plain ASGI, so a large body is refused before it is read into memory)


class Guard:
    def __init__(self, app, *, max_body_bytes: int, api_keys: list[str], path_limits: dict[str, int] | None = None):
        self.app, self.max_body_bytes, self.api_keys = app, max_body_bytes, [k.encode() for k in api_keys]
        self.path_limits = path_limits or {}  # routes with their own body limit (file uploads)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        if self.api_keys and scope["path"].rstrip("/") != "/v1/health" and not is_public(scope["path"]):
            auth = headers.get(b"authorization", b"")
            key = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            if not any(hmac.compare_digest(key, k) for k in self.api_keys):
                msg = "missing API key: send 'Authorization: Bearer <key>'" if not key else "invalid API key"
                return await _send_error(send, APIError(401, msg, type="authentication_error",
                                                        code="invalid_api_key"))
        limit = self.path_limits.get(scope["path"].rstrip("/"), self.max_body_bytes)
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            return await _send_error(send, _too_large(limit))
        seen = 0
        started = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not started:
                await _send_error(send, _too_large(limit))
        except Exception as e:  # noqa: BLE001 - the last line of defence: nothing internal leaks
            # Starlette answers through the app's `Exception` handler (which logs) and then re-raises.
            if not getattr(e, "_corral_logged", False):
                log.exception("request failed: %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_error(send, _internal_error())


class _BodyTooLarge(Exception):
    pass


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds the server's limit of {limit} bytes", code="request_too_large")


async def _send_error(send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in err.headers.items()]
    if err.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


# ---------------------------------------------------------------------------------------------
# Errors


def _internal_error() -> APIError:
    """What a client sees of an unexpected exception: nothing of its text (that goes to the log)."""
    return APIError(500, "internal server error", type="server_error", code="internal_error")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_message(errors: list[dict]) -> tuple[str, str | None, str]:
    """One readable message for pydantic's errors; the first error's field is the `param`."""
    parts, param, code = [], None, "invalid_request"

    def is_member(p) -> bool:  # union members show up as loc steps like 'str' / 'list[int]'
        return isinstance(p, str) and ("[" in p or "-" in p or p in ("str", "int", "float", "bool", "dict"))

    def shallow(e) -> bool:
        # A union member that failed on the type alone ("should be a valid string") while another member
        # of the same union failed deeper inside: the deeper error is the one that says what is wrong.
        loc = tuple(e.get("loc", ()))
        return bool(loc) and is_member(loc[-1]) and any(
            tuple(o.get("loc", ()))[:len(loc) - 1] == loc[:-1] and len(o.get("loc", ())) > len(loc) for o in errors)

    errors = [e for e in errors if not shallow(e)] or errors
    for e in errors:
        loc = [p for p in e.get("loc", ()) if p != "body" and not is_member(p)]
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc).lstrip(".")
        if e["type"] == "extra_forbidden":
            parts.append(f"unrecognized request field {path!r}: Corral does not implement it")
            code = "unknown_field"
        elif e["type"] == "json_invalid":
            parts.append(f"the request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}")
        elif not path and e["type"] in ("model_attributes_type", "dict_type", "model_type"):
            parts.append("the request body must be a JSON object (send Content-Type: application/json)")
        elif e["type"] == "missing":
            parts.append(f"{path}: field required")
        else:
            parts.append(f"{path}: {e['msg'].removeprefix('Value error, ')}" if path else e["msg"])
        param = param or path or None
    seen, unique = set(), []
    for p in parts:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return "; ".join(unique[:5]), param, code


# ---------------------------------------------------------------------------------------------
# Streams


def _sse(chunks: AsyncIterator[dict]) -> StreamingResponse:
    async def events():
        try:
            async for chunk in chunks:
                yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"
        except APIError as e:  # after the response started: report in-band, as OpenAI does
            yield f"data: {json.dumps(e.body())}\n\n"
        except Exception:  # noqa: BLE001
            log.exception("stream failed")
            yield f"data: {json.dumps(_internal_error().body())}\n\n"
        finally:
            await chunks.aclose()

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _stored_stream(store: CompletionStore, chunks: AsyncIterator[dict], messages: list[dict],
                         extra: dict) -> AsyncIterator[dict]:
    """The provider's chunks, under a claimed id, with the whole completion stored after the last one.

    The write happens before `_sse` sends `[DONE]`: a client that has read the whole stream can
    retrieve the completion at once. A stream that fails or is abandoned stores nothing.
    """
    acc = _ChatAccumulator()
    cid = None
    try:
        async for chunk in chunks:
            if cid is None:
                cid = await store.aclaim(chunk["id"])
            chunk = {**chunk, "id": cid}
            acc.add(chunk)
            yield chunk
        if cid is not None:
            await store.aput({**acc.completion(), **extra}, messages)
    finally:
        if cid is not None:
            store.release(cid)  # a no-op once stored
        await chunks.aclose()


class _ChatAccumulator:
    """Rebuilds the chat.completion object from its streamed chunks (for the store)."""

    def __init__(self):
        self.head: dict | None = None
        self.choices: dict[int, dict] = {}
        self.usage = None

    def add(self, chunk: dict) -> None:
        if self.head is None:
            self.head = {k: chunk[k] for k in ("id", "created", "model") if k in chunk}
        if chunk.get("usage"):
            self.usage = chunk["usage"]
        for c in chunk.get("choices", []):
            ch = self.choices.setdefault(c["index"], {"index": c["index"], "finish_reason": None, "logprobs": None,
                                                      "message": {"role": "assistant", "content": None}})
            delta = c.get("delta") or {}
            msg = ch["message"]
            if delta.get("content"):
                msg["content"] = (msg["content"] or "") + delta["content"]
            for tc in delta.get("tool_calls") or []:
                calls = msg.setdefault("tool_calls", [])
                while len(calls) <= tc.get("index", 0):
                    calls.append({"id": None, "type": "function", "function": {"name": "", "arguments": ""}})
                call = calls[tc.get("index", 0)]
                if tc.get("id"):
                    call["id"] = tc["id"]
                fn = tc.get("function") or {}
                call["function"]["name"] += fn.get("name") or ""
                call["function"]["arguments"] += fn.get("arguments") or ""
            lp = c.get("logprobs")
            if lp and lp.get("content"):
                ch["logprobs"] = ch["logprobs"] or {"content": []}
                ch["logprobs"]["content"].extend(lp["content"])
            if c.get("finish_reason"):
                ch["finish_reason"] = c["finish_reason"]

    def completion(self) -> dict:
        out = {**(self.head or {}), "object": "chat.completion",
               "choices": [self.choices[i] for i in sorted(self.choices)]}
        for ch in out["choices"]:
            if ch["message"]["content"] is None and not ch["message"].get("tool_calls"):
                ch["message"]["content"] = ""
        if self.usage:
            out["usage"] = self.usage
        return out


# ---------------------------------------------------------------------------------------------
# The app


def create_app(cfg: RunConfig) -> FastAPI:
    stack = Stack(cfg)

    @asynccontextmanager
    async def lifespan(app):
        await stack.start()
        log.info("serving %s", ", ".join(m.id for m in stack.models()))
        yield
        await stack.close()

    app = FastAPI(title="Corral", version=corral.__version__, lifespan=lifespan, docs_url="/docs",
                  openapi_url="/openapi.json", redoc_url=None)
    app.state.stack = stack
    app.include_router(safety_router)  # shields, run-shield, moderations (corral/stack/routes_safety.py)
    app.include_router(agents_router(stack.agents))  # responses, conversations (corral/stack/routes_agents.py)

    @app.exception_handler(APIError)
    async def _api_error(request, err: APIError):
        return _error_response(err)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, err: RequestValidationError):
        message, param, code = _validation_message(err.errors())
        return _error_response(APIError(400, message, param=param, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, err: StarletteHTTPException):
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"no route {request.method} {request.url.path}" if err.status_code in (404, 405) else str(err.detail)
        return _error_response(APIError(err.status_code, message, type=kind))

    @app.exception_handler(Exception)
    async def _crash(request, err: Exception):
        log.error("request failed: %s %s", request.method, request.url.path, exc_info=err)
        err._corral_logged = True  # Starlette re-raises it to the Guard: log it once
        return _error_response(_internal_error())

    # -- inference ------------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        _check_supported(req)
        model, provider = stack.resolve(req.model, "llm")
        # guarded_chat: the run config's guardrails check the input and the answer (corral/safety/guardrails.py)
        call = guarded_chat(stack, req, lambda: provider.chat_completion(model, req))
        result = await unless_disconnected(request, call)
        if req.store is False:
            return _sse(result) if req.stream else result
        messages = [m.model_dump(exclude_none=True) for m in req.messages]
        extra = {k: v for k, v in (("metadata", req.metadata), ("user", req.user)) if v}
        if req.stream:
            return _sse(_stored_stream(stack.store, result, messages, extra))
        # The provider's id, unless a stored completion has it already (remote ids need not be unique).
        result = {**result, "id": await stack.store.aclaim(result["id"])}
        try:
            await stack.store.aput({**result, **extra}, messages)
        finally:
            stack.store.release(result["id"])  # a no-op once stored; frees the id if the write failed
        return result

    @app.get("/v1/chat/completions")
    async def list_chat_completions(limit: int = 20, order: str = "desc", after: str | None = None,
                                    model: str | None = None):
        if not 1 <= limit <= MAX_PAGE:
            raise APIError(400, f"limit must be between 1 and {MAX_PAGE}, got {limit}", param="limit")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order")
        try:
            return await stack.store.alist(limit=limit, order=order, after=after, model=model)
        except KeyError:
            raise APIError(400, f"after: no chat completion with id {after!r}", param="after") from None

    @app.get("/v1/chat/completions/{completion_id}")
    async def get_chat_completion(completion_id: str):
        found = await stack.store.aget(completion_id)
        if found is None:
            raise APIError(404, f"chat completion {completion_id!r} not found", type="not_found_error",
                           code="not_found")
        return found

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        _check_supported(req)
        model, provider = stack.resolve(req.model, "llm")
        result = await unless_disconnected(request, provider.completion(model, req))
        return _sse(result) if req.stream else result

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest):
        model, provider = stack.resolve(req.model, "embedding")
        return await provider.embeddings(model, req)

    # -- models, providers, health ------------------------------------------------------------
    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [m.to_openai() for m in stack.models()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        for m in stack.models():
            if m.id == model_id:
                return m.to_openai()
        raise APIError(404, f"model {model_id!r} not found", type="not_found_error", code="model_not_found")

    async def provider_info(pid: str) -> dict:
        p = next(c for c in cfg.providers if c.provider_id == pid)
        config = copy.deepcopy(p.config)
        if config.get("api_key"):
            config["api_key"] = "********"
        api = "embeddings" if p.provider_type == EMBEDDINGS else RAG_APIS.get(p.provider_type, "inference")
        api = "safety" if p.provider_type == SAFETY else api
        if p.provider_type in RAG_APIS:
            config = rag_provider_config(stack.providers[pid], config)
        return {"api": api, "provider_id": pid, "provider_type": p.provider_type, "config": config,
                "health": await stack.providers[pid].health()}

    @app.get("/v1/providers")
    async def list_providers():
        # the configured providers, then the agents' server-side tools (code interpreter, MCP, file search, web search)
        return {"data": [await provider_info(pid) for pid in stack.providers] + stack.agents.tool_runtimes()}

    @app.get("/v1/providers/{provider_id}")
    async def get_provider(provider_id: str):
        if provider_id in stack.providers:
            return await provider_info(provider_id)
        tools = {t["provider_id"]: t for t in stack.agents.tool_runtimes()}
        if provider_id not in tools:
            raise APIError(404, f"provider {provider_id!r} not found (have {sorted([*stack.providers, *tools])})",
                           type="not_found_error", code="not_found")
        return tools[provider_id]

    @app.get("/v1/health")
    async def health():
        return {"status": "OK"}

    @app.get("/v1/version")
    async def version():
        return {"version": corral.__version__}

    @app.get("/v1/inspect/routes")
    async def inspect_routes():
        inference = sorted({p.provider_type for p in cfg.providers
                            if p.provider_type not in (EMBEDDINGS, SAFETY) and p.provider_type not in RAG_APIS})
        rag = {api: sorted({p.provider_type for p in cfg.providers if RAG_APIS.get(p.provider_type) == api})
               for api in ("files", "vector_io")}
        embedding = sorted({p.provider_type for p in cfg.providers if p.provider_type == EMBEDDINGS})
        data = []

        def flat(routes):  # FastAPI >= 0.16x wraps an included router's routes (`original_router`)
            for r in routes:
                inner = getattr(r, "original_router", None)
                yield from (flat(inner.routes) if inner is not None else (r,))

        for r in flat(app.routes):
            if getattr(r, "path", "").startswith("/v1/"):
                types = (inference if r.path in ("/v1/chat/completions", "/v1/completions")
                         else embedding if r.path == "/v1/embeddings"
                         else rag["files"] if r.path.startswith("/v1/files")
                         else rag["vector_io"] if r.path.startswith(("/v1/vector_stores", "/v1/vector-io")) else [])
                for method in sorted(getattr(r, "methods", ()) - {"HEAD"}):
                    data.append({"route": r.path, "method": method, "provider_types": types})
        return {"data": data}

    from corral.stack.rag.routes import router as rag_router

    app.include_router(rag_router)
    uploads = {"/v1/files": stack.files.max_upload_bytes} if stack.files is not None else {}
    add_ui_routes(app)  # the chat page at / (corral/ui), public: the page sends the user's key itself
    metrics = Metrics(stack)
    add_metrics_route(app, metrics)  # /metrics (corral/stack/metrics.py)
    guarded = Guard(app, max_body_bytes=cfg.max_body_bytes, api_keys=cfg.api_keys, path_limits=uploads)
    observed = Observer(guarded, metrics, app)  # outside the Guard: its 401s and 413s are counted and logged
    observed.fastapi = app
    return observed


def _check_supported(req) -> None:
    problems = req.unsupported()
    if problems:
        field, why = problems[0]
        raise APIError(400, why, param=field, code="unsupported_parameter")
