"""The inline provider: Corral's own serving engine (`corral.api.LLM` over `corral.engine.Engine`).

Concurrency: each model's `LLM` owns an engine whose loop thread is the scheduler: every request's
sequences run together in its batches (continuous batching, prefix caching). A request's own work,
encoding its prompt, turning engine steps into text and OpenAI chunks, runs on a thread of the
model's pool, so the event loop never runs model code. In front of it a bounded queue: at most
`max_num_seqs` requests running plus `max_queue` waiting; past that a 429 with Retry-After at once.
Streams hand chunks to the event loop through an asyncio queue; when the client goes away the
consumer sets a cancel flag, the request's thread closes its engine handles and the engine frees
their blocks at its next step.

One chat request:
  messages --chat_format.encode_dialog--> prompt ids --LLM.submit--> engine steps --LLM.stream_text-->
  text chunks --chat_format.tool_call_streamer--> content / tool-call deltas --> OpenAI chunks.
A non-streamed reply is the same stream, collected (`_collect_chat`, `_collect_completion`), so the
two cannot disagree. Constrained decoding (corral.engine.constrained) is a logits processor per choice:
the response format's JSON schema, or for tool_choice `required`/named a grammar of the model's own
call syntax. `n > 1` submits the choices together; the siblings reuse the first one's prefill.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

from corral.stack.api import (APIError, ChatCompletionRequest, CompletionRequest, ModelInfo, NamedToolChoice,
                              bad_request)
from corral.stack.config import INLINE, ModelEntry
from corral.tokenizer.tool_stream import ToolStreamEvent

log = logging.getLogger("corral.server")

ARGUMENT_PIECE = 16  # streamed tool-call arguments arrive in pieces of this many characters, as from OpenAI


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------
# One model: its LLM (and engine), its request threads and its bounded queue.


class ModelWorker:
    def __init__(self, entry: ModelEntry, max_queue: int):
        self.entry = entry
        self.max_queue = max_queue
        self.capacity = entry.max_num_seqs + max_queue  # requests running or waiting
        self.llm = None
        self.load_error: APIError | None = None  # a failed load is remembered, not retried per request
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(self.capacity, thread_name_prefix=f"corral-{entry.model_id}")
        self._pending = 0  # running + waiting; touched only on the event loop thread
        self.generated_tokens = 0  # counted by the jobs as chunks arrive (request threads)
        self._count_lock = threading.Lock()
        self.closed = threading.Event()  # server shutdown: running generations stop at the next token

    def stats(self) -> dict:
        out = {"loaded": self.llm is not None, "running_or_queued": self._pending,
               "generated_tokens": self.generated_tokens}
        if self.load_error is not None:
            out["error"] = self.load_error.message
        if self.llm is not None:
            pool = self.llm.engine.scheduler.blocks.stats()
            engine = self.llm.engine
            out["kv_cache"] = {"blocks": pool.n_blocks, "block_size": engine.scheduler.blocks.block_size,
                               "used": pool.used, "cached": pool.cached, "mib": round(engine.pool_bytes / 2**20),
                               "prefix_hit_tokens": pool.hit_tokens, "prefix_queried_tokens": pool.queried_tokens}
            out["engine"] = {"steps": engine.steps, "tokens_computed": engine.tokens_computed,
                             "running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting)}
            if (spec := engine.speculative_stats()) is not None:
                out["speculative"] = spec
        return out

    def load(self):
        """Load the checkpoint once (at start, or on first use); a failure is a 503 from then on."""
        with self._load_lock:
            if self.load_error is not None:
                raise self.load_error
            if self.llm is None:
                from corral.api import LLM  # torch and the model code load here, not at import
                from corral.checkpoints.errors import CheckpointError

                e = self.entry
                try:
                    llm = LLM.load(e.checkpoint or e.model_id, dtype=e.dtype, quantize=e.quantize,
                                   adapter=e.adapter, kv_cache_mb=e.kv_cache_mb, max_num_seqs=e.max_num_seqs,
                                   max_batch_tokens=e.max_batch_tokens, context_length=e.context_length)
                    if (s := e.speculative) is not None:  # a draft model loads here, its tokenizer checked
                        from corral.engine.speculative import enable_speculative

                        enable_speculative(llm, s.method, s.num_tokens, draft_model=s.draft_model,
                                           draft_quantize=s.draft_quantize, max_running=s.max_running)
                    self.llm = llm
                except Exception as exc:  # noqa: BLE001 - remembered and reported as a 503
                    log.exception("model %r failed to load", e.model_id)
                    # Checkpoint errors name the file and the problem: the operator's own config. Anything
                    # else is internal: the log has it.
                    why = str(exc) if isinstance(exc, (CheckpointError, FileNotFoundError)) else "see the server log"
                    self.load_error = APIError(503, f"model {e.model_id!r} failed to load: {why}",
                                               type="server_error", code="model_unavailable")
                    raise self.load_error from None
                log.info("model %r loaded; %s", e.model_id, self.llm.engine.describe())
            return self.llm

    def count(self, chunk) -> int:
        """Tokens a chunk accounts for (the last chunk's totals include a final stop token)."""
        done = getattr(chunk, "completion", None)
        n = len(chunk.token_ids)
        if done is not None:
            n += done.completion_tokens - len(done.token_ids)
        with self._count_lock:
            self.generated_tokens += n
        return n

    def _admit(self) -> None:
        if self.load_error is not None:
            raise self.load_error
        if self._pending >= self.capacity:
            raise APIError(429, f"model {self.entry.model_id!r} is busy: {self._pending} requests are running "
                                f"or queued (max_num_seqs={self.entry.max_num_seqs}, max_queue={self.max_queue}); "
                                f"retry shortly", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "2"})
        self._pending += 1

    def _release(self, _=None) -> None:
        self._pending -= 1

    async def call(self, fn: Callable[[Any, threading.Event], Any]) -> Any:
        """Run fn(llm, cancel) on a request thread. If the awaiting task is cancelled (the client went
        away), `cancel` is set: fn stops early or, if it has not started yet, never runs."""
        self._admit()
        cancel = threading.Event()

        def work():
            if cancel.is_set() or self.closed.is_set():
                return None
            return fn(self.load(), cancel)

        fut = asyncio.get_running_loop().run_in_executor(self._executor, work)
        fut.add_done_callback(self._release)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancel.set()
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: no "never retrieved"
            raise

    def stream(self, fn: Callable[[Any, threading.Event], Iterator[dict]]) -> AsyncIterator[dict]:
        """Run the generator fn(llm, cancel) on a request thread; its items arrive as an async iterator.

        Admission happens now (a 429 is raised before any response starts). Leaving the async iterator
        early (client disconnect) sets `cancel`; the request thread then closes fn's generator.
        """
        self._admit()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def put(kind, value=None):
            loop.call_soon_threadsafe(queue.put_nowait, (kind, value))

        def work():
            if cancel.is_set():  # the client left while we waited our turn
                return
            try:
                gen = fn(self.load(), cancel)
                try:
                    for item in gen:
                        if cancel.is_set() or self.closed.is_set():
                            break
                        put("item", item)
                finally:
                    getattr(gen, "close", lambda: None)()  # closes the engine handles: the engine frees them
                put("end")
            except BaseException as e:  # noqa: BLE001 - handed to the consumer (the server decides 4xx/5xx)
                put("error", e)

        fut = loop.run_in_executor(self._executor, work)
        fut.add_done_callback(self._release)

        async def items():
            try:
                while True:
                    kind, value = await queue.get()
                    if kind == "item":
                        yield value
                    elif kind == "end":
                        return
                    else:
                        raise value
            finally:
                cancel.set()

        return items()

    def shutdown(self) -> None:
        self.closed.set()
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self.llm is not None:
            self.llm.engine.shutdown()


# ---------------------------------------------------------------------------------------------
# Request -> engine inputs (request thread)


def _sampling(llm, entry: ModelEntry, req, n_prompt: int, *, default_max: int | None, index: int = 0,
              logprobs: int | None = None):
    """The engine's SamplingParams for one choice; 400 naming the field when something does not fit.

    The server-side cap (run config `max_tokens`) bounds every request: more is a 400, an omitted
    max_tokens gets the cap (or the room left in the context, if less)."""
    from corral.engine.sampling import SamplingParams

    context = llm.context_length
    chat = isinstance(req, ChatCompletionRequest)
    max_tokens = req.max_new_tokens if chat else req.max_tokens
    field = "max_completion_tokens" if chat and req.max_completion_tokens else "max_tokens"
    if n_prompt >= context:
        raise bad_request(f"the prompt is {n_prompt} tokens; model {llm.name!r} serves a context of {context} "
                          f"tokens", param="messages" if chat else "prompt", code="context_length_exceeded")
    cap = entry.max_tokens
    if max_tokens is not None and cap is not None and max_tokens > cap:
        raise bad_request(f"{field}={max_tokens} exceeds this server's limit of {cap} tokens per request for "
                          f"model {entry.model_id!r}", param=field, code="max_tokens_exceeded")
    if max_tokens is not None and n_prompt + max_tokens > context:
        raise bad_request(f"{field}={max_tokens} plus the prompt's {n_prompt} tokens exceeds the context of "
                          f"{context} tokens of model {llm.name!r}; use {field} <= {context - n_prompt}",
                          param=field, code="context_length_exceeded")
    if max_tokens is None:
        limit = min(x for x in (default_max, cap, context - n_prompt) if x is not None)
        max_tokens = limit
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
        seed=None if req.seed is None else req.seed + index,
        stop=req.stops, logprobs=logprobs, ignore_eos=bool(req.ignore_eos))
    try:
        params.validate()
    except ValueError as e:
        raise bad_request(str(e)) from None
    return params


def _image_bytes(url: str, where: str) -> bytes:
    """A data: URL's bytes. Nothing else is an image here: a request never names a file on this disk."""
    head, sep, payload = url.partition(",")
    if not (url.startswith("data:") and sep and head.endswith(";base64")):
        raise bad_request(f"{where}: only data: URLs (data:image/...;base64,...) are accepted", param=where)
    try:
        return base64.b64decode(payload, validate=True)
    except ValueError:
        raise bad_request(f"{where}: the data: URL is not valid base64", param=where) from None


# The message keys the chat formats read; the rest of what clients send back in history (name,
# refusal, annotations, audio, ...) is accepted by the API models and not shown to the model.
_MESSAGE_KEYS = ("role", "content", "tool_calls", "tool_call_id")


def _messages(req: ChatCompletionRequest, vision: bool) -> list[dict]:
    out = []
    for k, m in enumerate(req.messages):
        full = m.model_dump(exclude_none=True)
        d = {key: full[key] for key in _MESSAGE_KEYS if key in full}
        if d["role"] == "developer":
            d["role"] = "system"
        if isinstance(m.content, list):
            parts = []
            for j, p in enumerate(m.content):
                if p.type == "image_url":
                    where = f"messages[{k}].content[{j}]"
                    if not vision:
                        raise bad_request(f"{where}: model {req.model!r} does not accept images", param=where)
                    parts.append({"type": "image", "image": _image_bytes(p.image_url.url, where + ".image_url.url")})
                else:
                    parts.append({"type": "text", "text": p.text})
            d["content"] = parts if vision else "".join(p["text"] for p in parts)
        out.append(d)
    return out


def tool_call_style(llm) -> tuple[str, str, str]:
    """(style, prefix, suffix) of the model's own tool-call syntax, for the constrained tool grammar.

    A chat format may say so itself (`tool_call_syntax`); otherwise Llama 3 models use their config's
    tool_format (3.2: pythonic list, 3.1: JSON) and Jinja models the generic JSON call.
    """
    fmt = llm.chat_format
    syntax = getattr(fmt, "tool_call_syntax", None)
    if syntax is not None:
        return tuple(syntax() if callable(syntax) else syntax)
    if llm.config.chat_format == "llama3":
        return llm.config.tool_format, "", ""
    return "generic", "<tool_call>", "</tool_call>"  # corral.tokenizer.tool_calls' Jinja fallback


def _processor_factory(llm, req: ChatCompletionRequest, tools: list[dict] | None):
    """A function making one fresh logits processor per choice (None: unconstrained). 400 if uncompilable."""
    from corral.engine import constrained

    grammar = None
    try:
        rf = req.response_format
        if rf is not None and rf.type == "json_object":
            grammar = constrained.json_object_grammar()
        elif rf is not None and rf.type == "json_schema":
            grammar = constrained.json_schema_grammar(rf.json_schema.schema_)
        elif tools:
            # required / named: a call is forced. auto with a `strict` function: text or a strict call.
            forced = req.tool_choice == "required" or isinstance(req.tool_choice, NamedToolChoice)
            strict = any(t.function.strict for t in req.tools)
            if forced or strict:
                chosen = tools
                if isinstance(req.tool_choice, NamedToolChoice):
                    chosen = [t for t in tools if t["function"]["name"] == req.tool_choice.function.name]
                style, prefix, suffix = tool_call_style(llm)
                grammar = constrained.tool_call_grammar(chosen, style, prefix=prefix, suffix=suffix,
                                                        optional=not forced)
        if grammar is None:
            return lambda: None
        constrained.compile_grammar(grammar, llm.tokenizer)  # fail now, as a 400, if it cannot compile
    except constrained.GrammarError as e:
        param = "response_format" if req.response_format and req.response_format.type != "text" else "tools"
        raise bad_request(f"{param}: the schema cannot be compiled for constrained decoding: {e}",
                          param=param, code="invalid_schema") from None
    return lambda: constrained.GrammarLogitsProcessor(grammar, llm.tokenizer)


def _chat_logprobs(lps) -> list[dict]:
    if not lps:
        return []
    return [{"token": lp.token, "logprob": lp.logprob, "bytes": list(lp.bytes),
             "top_logprobs": [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in lp.top_logprobs]}
            for lp in lps]


class _ChatJob:
    """One chat request, on its request thread: its prompt, its choices' parameters, its stream."""

    def __init__(self, llm, req: ChatCompletionRequest, model_id: str, worker: ModelWorker):
        self.llm, self.req, self.model_id, self.worker = llm, req, model_id, worker
        self.messages = _messages(req, llm.supports_images)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        self.tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
        self.tool_choice = tool_choice if use_tools else None
        from corral.tokenizer.chat import dialog_images

        self.images = dialog_images(self.messages)
        if self.images and self.tools:
            raise bad_request("tool calling is not supported with images in the prompt (Llama 3.2 Vision); "
                              "send the images or the tools, not both", param="tools")
        try:
            self.prompt_ids = llm.encode_chat(self.messages, tools=self.tools, tool_choice=self.tool_choice)
        except (ValueError, KeyError, TypeError) as e:
            raise bad_request(f"messages: {e}", param="messages") from None
        self.want_logprobs = req.top_logprobs or 0 if req.logprobs else None
        self.params = [_sampling(llm, worker.entry, req, len(self.prompt_ids), default_max=None, index=i,
                                 logprobs=self.want_logprobs) for i in range(req.n)]
        self.make_processor = _processor_factory(llm, req, self.tools)
        self.id = _completion_id("chatcmpl")
        self.created = int(time.time())

    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model_id, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def stream(self, cancel: threading.Event, include_usage: bool | None = None) -> Iterator[dict]:
        """The reply as OpenAI chunks: every choice submitted at once, streamed one after the other."""
        if include_usage is None:
            include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        handles = []
        try:
            for i in range(self.req.n):
                handles.append(self.llm.submit(self.prompt_ids, self.params[i], self.make_processor(),
                                               images=self.images or None, leader=handles[0] if handles else None))
        except ValueError as e:
            for h in handles:
                h.close()
            raise bad_request(str(e)) from None
        total = 0
        try:
            for i, handle in enumerate(handles):
                yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                                   "logprobs": None}])
                streamer = self.llm.chat_format.tool_call_streamer(self.tools) if self.tools else None
                n_calls, finish = 0, "stop"
                for chunk in self.llm.stream_text(handle, self.params[i], parse_tools=self.tools, chat=True):
                    if cancel.is_set() or self.worker.closed.is_set():
                        return
                    total += self.worker.count(chunk)
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
                    events = streamer.push(chunk.text) if streamer else [ToolStreamEvent("content", chunk.text)]
                    if chunk.finish_reason and streamer:
                        events += streamer.finish()
                    lps = _chat_logprobs(chunk.logprobs) if self.want_logprobs is not None else None
                    for delta in self._deltas(events, n_calls):
                        if "tool_calls" in delta and delta["tool_calls"][0].get("id"):
                            n_calls += 1
                        yield self.chunk([{"index": i, "delta": delta, "finish_reason": None,
                                           "logprobs": {"content": lps} if lps else None}])
                        lps = None
                    if lps:  # text still held back: its logprobs go out now, with no text
                        yield self.chunk([{"index": i, "delta": {"content": ""}, "finish_reason": None,
                                           "logprobs": {"content": lps}}])
                if n_calls:
                    finish = "tool_calls"
                yield self.chunk([{"index": i, "delta": {}, "finish_reason": finish, "logprobs": None}])
        finally:
            for h in handles:
                h.close()
        if include_usage:
            n = len(self.prompt_ids)
            yield self.chunk([], usage={"prompt_tokens": n, "completion_tokens": total, "total_tokens": n + total})

    def _deltas(self, events, n_calls: int) -> Iterator[dict]:
        for ev in events:
            if ev.kind == "content":
                if ev.text:
                    yield {"content": ev.text}
                continue
            if self.req.parallel_tool_calls is False and n_calls >= 1:
                continue  # one call only: the rest are dropped, as OpenAI does
            yield {"tool_calls": [{"index": n_calls, "id": ev.id, "type": "function",
                                   "function": {"name": ev.name, "arguments": ""}}]}
            for k in range(0, len(ev.arguments), ARGUMENT_PIECE):
                yield {"tool_calls": [{"index": n_calls, "function": {"arguments": ev.arguments[k:k + ARGUMENT_PIECE]}}]}
            n_calls += 1

    def run(self, cancel: threading.Event | None = None) -> dict | None:
        return _collect_chat(self.stream(cancel or threading.Event(), include_usage=True),
                             with_logprobs=self.want_logprobs is not None)


def _walk(chunks: Iterator[dict]) -> tuple[dict | None, dict | None, list[dict]]:
    """Run a stream to its end: (its first chunk, its usage, every choice delta in order)."""
    head, usage, deltas = None, None, []
    for c in chunks:
        head = head or c
        usage = c.get("usage", usage)
        deltas += c["choices"]
    return head, usage, deltas


def _collect_chat(chunks: Iterator[dict], with_logprobs: bool) -> dict | None:
    """A chat.completion from its chunks: the one way a non-streamed reply is made."""
    head, usage, deltas = _walk(chunks)
    choices = {}
    for ch in deltas:
        slot = choices.setdefault(ch["index"], {"content": [], "calls": {}, "logprobs": [], "finish": None})
        delta = ch.get("delta", {})
        if delta.get("content"):
            slot["content"].append(delta["content"])
        for call in delta.get("tool_calls", []):
            entry = slot["calls"].setdefault(call["index"], {"id": None, "type": "function",
                                                             "function": {"name": "", "arguments": ""}})
            entry["id"] = call.get("id") or entry["id"]
            fn = call.get("function", {})
            entry["function"]["name"] += fn.get("name", "")
            entry["function"]["arguments"] += fn.get("arguments", "")
        if ch.get("logprobs"):
            slot["logprobs"].extend(ch["logprobs"]["content"])
        if ch.get("finish_reason"):
            slot["finish"] = ch["finish_reason"]
    if head is None:
        return None
    out = []
    for i in sorted(choices):
        slot = choices[i]
        content = "".join(slot["content"])
        calls = [slot["calls"][k] for k in sorted(slot["calls"])]
        message: dict = {"role": "assistant", "content": content if (content or not calls) else None}
        if calls:
            message["tool_calls"] = calls
        out.append({"index": i, "message": message, "finish_reason": slot["finish"],
                    "logprobs": {"content": slot["logprobs"]} if with_logprobs else None})
    return {"id": head["id"], "object": "chat.completion", "created": head["created"], "model": head["model"],
            "choices": out, "usage": usage}


# ---------------------------------------------------------------------------------------------
# Text completions


def _encode_prompts(llm, req: CompletionRequest) -> list[list[int]]:
    p = req.prompt
    if isinstance(p, str):
        p = [p]
    if not p:
        raise bad_request("prompt must not be empty", param="prompt")
    if all(isinstance(x, int) for x in p):
        p = [p]
    out = []
    for k, item in enumerate(p):
        if isinstance(item, str):
            ids = llm.encode(item, add_bos=True)  # BOS where the checkpoint's tokenizer adds one
        else:
            ids = list(item)
            bad = [t for t in ids if not 0 <= t < llm.tokenizer.vocab_size]
            if bad:
                raise bad_request(f"prompt[{k}]: token ids must be in [0, {llm.tokenizer.vocab_size}), got {bad[:3]}",
                                  param="prompt")
        if not ids:
            raise bad_request(f"prompt[{k}] is empty", param="prompt")
        out.append(ids)
    return out


class _CompletionJob:
    def __init__(self, llm, req: CompletionRequest, model_id: str, worker: ModelWorker):
        self.llm, self.req, self.model_id, self.worker = llm, req, model_id, worker
        self.prompts = _encode_prompts(llm, req)
        # OpenAI's default max_tokens for text completions is 16.
        self.params = [[_sampling(llm, worker.entry, req, len(ids), default_max=16, index=i, logprobs=req.logprobs)
                        for i in range(req.n)] for ids in self.prompts]
        self.id = _completion_id("cmpl")
        self.created = int(time.time())

    def _token_text(self, tid: int) -> str:
        return self.llm.tokenizer.token_bytes(tid).decode("utf-8", errors="replace")

    def _chunk(self, index: int, text: str, finish, logprobs) -> dict:
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": logprobs}]}

    def stream(self, cancel: threading.Event, include_usage: bool | None = None) -> Iterator[dict]:
        """Every prompt's choices submitted at once (the siblings reuse the first's prefill), streamed in order.
        With echo, each choice starts with its prompt (and, with logprobs, the prompt's log-probabilities,
        computed during the one prefill, a chunk of rows at a time)."""
        if include_usage is None:
            include_usage = bool(self.req.stream_options and self.req.stream_options.include_usage)
        k = self.req.logprobs
        echo_lps = self.req.echo and k is not None
        handles = []
        try:
            for p, ids in enumerate(self.prompts):
                lead = None
                for i in range(self.req.n):
                    h = self.llm.submit(ids, self.params[p][i], prompt_logprobs=k if echo_lps and lead is None else None,
                                        leader=lead)
                    lead = lead or h
                    handles.append((p, lead, h))
        except ValueError as e:
            for _, _, h in handles:
                h.close()
            raise bad_request(str(e)) from None
        total = 0
        try:
            for index, (p, lead, handle) in enumerate(handles):
                offset = 0
                chunks = self.llm.stream_text(handle, self.params[p][index % self.req.n])
                first = next(chunks)  # after the prefill: the prompt's log-probabilities are known
                if self.req.echo:
                    ids = self.prompts[p]
                    lps = None
                    if echo_lps:
                        entries = [(self._token_text(t), lp, [(self._token_text(a), v) for a, v in top])
                                   for t, (lp, top) in zip(ids, lead.prompt_logprobs)]
                        lps, offset = self._logprobs(entries, 0)
                    text = self.llm.tokenizer.decode(ids)
                    offset = len(text)
                    yield self._chunk(index, text, None, lps)
                for chunk in _prepend(first, chunks):
                    if cancel.is_set() or self.worker.closed.is_set():
                        return
                    total += self.worker.count(chunk)
                    lps = None
                    if k is not None:
                        lps, offset = self._logprobs([(x.token, x.logprob, list(x.top_logprobs))
                                                      for x in chunk.logprobs or []], offset)
                    yield self._chunk(index, chunk.text, chunk.finish_reason, lps)
        finally:
            for _, _, h in handles:
                h.close()
        if include_usage:
            n_prompt = sum(len(ids) for ids in self.prompts)
            yield {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                   "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": total,
                                            "total_tokens": n_prompt + total}}

    def _logprobs(self, entries, offset: int) -> tuple[dict, int]:
        tokens, lps, tops, offsets = [], [], [], []
        for tok, lp, top in entries:
            tokens.append(tok)
            lps.append(lp)
            tops.append(dict(top) if lp is not None else None)
            offsets.append(offset)
            offset += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}, offset

    def run(self, cancel: threading.Event | None = None) -> dict | None:
        return _collect_completion(self.stream(cancel or threading.Event(), include_usage=True),
                                   with_logprobs=self.req.logprobs is not None)


def _prepend(first, rest):
    yield first
    yield from rest


def _collect_completion(chunks: Iterator[dict], with_logprobs: bool) -> dict | None:
    """A text_completion from its chunks: the one way a non-streamed completion is made."""
    head, usage, deltas = _walk(chunks)
    choices = {}
    for ch in deltas:
        slot = choices.setdefault(ch["index"], {"text": [], "finish": None,
                                                "logprobs": {"tokens": [], "token_logprobs": [],
                                                             "top_logprobs": [], "text_offset": []}})
        slot["text"].append(ch["text"])
        for key, values in (ch.get("logprobs") or {}).items():
            slot["logprobs"][key] += values
        if ch.get("finish_reason"):
            slot["finish"] = ch["finish_reason"]
    if head is None:
        return None
    return {"id": head["id"], "object": "text_completion", "created": head["created"], "model": head["model"],
            "choices": [{"index": i, "text": "".join(choices[i]["text"]), "finish_reason": choices[i]["finish"],
                         "logprobs": choices[i]["logprobs"] if with_logprobs else None} for i in sorted(choices)],
            "usage": usage}


# ---------------------------------------------------------------------------------------------
# The provider


def _wrap_engine_errors(fn):
    """The engine's checks on a request (ValueError) raised while it is prepared become 400s."""

    def inner(*args):
        try:
            return fn(*args)
        except APIError:
            raise
        except ValueError as e:
            raise bad_request(str(e)) from None

    return inner


class InlineProvider:
    provider_type = INLINE

    def __init__(self, provider_id: str, entries: list[ModelEntry], *, max_queue: int = 8, load_at_start: bool = True):
        self.provider_id = provider_id
        self.load_at_start = load_at_start
        self.workers = {e.model_id: ModelWorker(e, max_queue) for e in entries}
        self._infos = {e.model_id: ModelInfo(id=e.model_id, provider_id=provider_id,
                                             provider_resource_id=e.checkpoint or e.model_id)
                       for e in entries}

    def models(self) -> list[ModelInfo]:
        for mid, w in self.workers.items():
            info = self._infos[mid]
            if w.llm is not None and "context_length" not in info.metadata:
                ckpt = getattr(w.llm, "checkpoint", None)
                info.metadata.update(context_length=w.llm.context_length, chat_format=w.llm.config.chat_format,
                                     max_tokens=w.entry.max_tokens, kv_cache_mb=round(w.llm.engine.pool_bytes / 2**20),
                                     vision=w.llm.supports_images)
                if ckpt is not None:
                    info.metadata.update(checkpoint=str(ckpt.path), format=ckpt.format,
                                         quantization=ckpt.quantization)
        return list(self._infos.values())

    async def start(self) -> None:
        if self.load_at_start:
            for w in self.workers.values():
                try:
                    await asyncio.get_running_loop().run_in_executor(w._executor, w.load)
                except APIError:
                    pass  # remembered: its requests get the 503, the other models serve on

    async def chat_completion(self, model: ModelInfo, req: ChatCompletionRequest):
        worker = self.workers[model.id]
        if req.stream:
            return await _first_then_rest(worker.stream(_wrap_engine_errors(
                lambda llm, cancel: _ChatJob(llm, req, model.id, worker).stream(cancel))))
        return await worker.call(_wrap_engine_errors(lambda llm, cancel: _ChatJob(llm, req, model.id, worker).run(cancel)))

    async def completion(self, model: ModelInfo, req: CompletionRequest):
        worker = self.workers[model.id]
        if req.stream:
            return await _first_then_rest(worker.stream(_wrap_engine_errors(
                lambda llm, cancel: _CompletionJob(llm, req, model.id, worker).stream(cancel))))
        return await worker.call(_wrap_engine_errors(
            lambda llm, cancel: _CompletionJob(llm, req, model.id, worker).run(cancel)))

    async def health(self) -> dict:
        return {"status": "OK", "models": {mid: w.stats() for mid, w in self.workers.items()}}

    async def close(self) -> None:
        for w in self.workers.values():
            w.shutdown()


async def _first_then_rest(items: AsyncIterator[dict]) -> AsyncIterator[dict]:
    """Wait for the first item so request errors (400s) surface before the response starts."""
    try:
        first = await items.__anext__()
    except StopAsyncIteration:
        first = None
    except BaseException:
        await items.aclose()
        raise

    async def rest():
        try:
            if first is not None:
                yield first
            async for item in items:
                yield item
        finally:
            await items.aclose()

    return rest()
