"""The inline provider: Corral's own engine (`corral.api.LLM`) behind the OpenAI routes.

Concurrency: an LLM is not thread-safe, so each model has one worker thread that runs its
generations one at a time, and a bounded queue in front of it: one request running plus at most
`max_queue` waiting; past that a request gets 429 with Retry-After at once. The event loop never runs
model code, so health, models and other routes answer while a model generates. Streams hand chunks
from the worker thread to the event loop through an asyncio queue; when the client goes away the
stream's consumer sets a cancel flag, the worker closes the engine's iterator and generation stops.

One chat request, in the worker thread:
  messages --chat_format.encode_dialog--> prompt ids --LLM.generate(stream)--> text chunks
  --chat_format.parse_response--> content + tool calls --> OpenAI chunk / completion dicts.
Constrained decoding (corral.engine.constrained) is a logits processor per choice: the response
format's JSON schema, or for tool_choice `required`/named a grammar of the model's own call syntax.
Streams with tools active buffer text until it is clear whether the output is a tool call, then
stream either content or tool-call deltas (first delta: id, name, `arguments: ""`; then arguments).
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any, AsyncIterator, Callable, Iterator

from corral.stack.api import (APIError, ChatCompletionRequest, CompletionRequest, ModelInfo, NamedToolChoice,
                              bad_request)
from corral.stack.config import INLINE, ModelEntry

# What a tool call's text starts with, per syntax; while the output so far could still become one of
# these, a stream with tools holds its text back.
TOOL_CALL_OPENERS = ("<|python_tag|>", "<tool_call>", "<function=", "[", "{")


def _completion_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# ---------------------------------------------------------------------------------------------
# One model: its LLM, its worker thread and its bounded queue.


class ModelWorker:
    def __init__(self, entry: ModelEntry, max_queue: int):
        self.entry = entry
        self.max_queue = max_queue
        self.llm = None
        self._load_lock = threading.Lock()
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"corral-{entry.model_id}")
        self._pending = 0  # running + waiting; touched only on the event loop thread
        self.generated_tokens = 0  # counted by the jobs as chunks arrive (worker thread)
        self.closed = threading.Event()  # server shutdown: running generations stop at the next token

    def stats(self) -> dict:
        return {"loaded": self.llm is not None, "running_or_queued": self._pending,
                "generated_tokens": self.generated_tokens}

    def load(self):
        """Load the checkpoint once (in the worker thread, or at start)."""
        with self._load_lock:
            if self.llm is None:
                from corral.api import LLM  # torch and the model code load here, not at import

                self.llm = LLM.load(self.entry.checkpoint or self.entry.model_id, dtype=self.entry.dtype,
                                    quantize=self.entry.quantize)
            return self.llm

    def count(self, chunk) -> int:
        """Tokens a chunk accounts for (the last chunk's totals include a final stop token)."""
        done = getattr(chunk, "completion", None)
        n = len(chunk.token_ids)
        if done is not None:
            n += done.completion_tokens - len(done.token_ids)
        self.generated_tokens += n
        return n

    def _admit(self) -> None:
        if self._pending >= 1 + self.max_queue:
            raise APIError(429, f"model {self.entry.model_id!r} is busy: {self._pending} requests are running "
                                f"or queued (max_queue={self.max_queue}); retry shortly",
                           type="rate_limit_error", code="queue_full", headers={"Retry-After": "2"})
        self._pending += 1

    def _release(self, _=None) -> None:
        self._pending -= 1

    async def call(self, fn: Callable[[Any, threading.Event], Any]) -> Any:
        """Run fn(llm, cancel) on the worker thread, after the requests ahead of it.

        If the awaiting task is cancelled (the client went away), `cancel` is set: fn stops early
        or, if it has not started yet, never runs.
        """
        self._admit()
        cancel = threading.Event()

        def work():
            if cancel.is_set() or self.closed.is_set():
                raise asyncio.CancelledError()
            return fn(self.load(), cancel)

        fut = asyncio.get_running_loop().run_in_executor(self._executor, work)
        fut.add_done_callback(self._release)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            cancel.set()
            raise

    def stream(self, fn: Callable[[Any, threading.Event], Iterator[dict]]) -> AsyncIterator[dict]:
        """Run the generator fn(llm, cancel) on the worker thread; its items arrive as an async iterator.

        Admission happens now (a 429 is raised before any response starts). Leaving the async iterator
        early (client disconnect) sets `cancel`; the worker then closes fn's generator.
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
                    getattr(gen, "close", lambda: None)()  # stops the engine's generator
                put("end")
            except APIError as e:
                put("error", e)
            except ValueError as e:  # the engine's checks on a request: the request's fault
                put("error", bad_request(str(e)))
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
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


# ---------------------------------------------------------------------------------------------
# Request -> engine inputs (worker thread)


def _sampling(llm, req, n_prompt: int, *, default_max: int | None, index: int = 0, logprobs: int | None = None):
    """The engine's SamplingParams for one choice; 400 naming the field when something does not fit."""
    from corral.engine.sampling import SamplingParams

    context = llm.context_length
    max_tokens = req.max_new_tokens if isinstance(req, ChatCompletionRequest) else req.max_tokens
    field = "max_tokens"
    if isinstance(req, ChatCompletionRequest) and req.max_completion_tokens:
        field = "max_completion_tokens"
    if n_prompt >= context:
        raise bad_request(f"the prompt is {n_prompt} tokens; model {llm.name!r} has a context of {context} tokens",
                          param="messages" if isinstance(req, ChatCompletionRequest) else "prompt",
                          code="context_length_exceeded")
    if max_tokens is not None and n_prompt + max_tokens > context:
        raise bad_request(f"{field}={max_tokens} plus the prompt's {n_prompt} tokens exceeds the context of "
                          f"{context} tokens of model {llm.name!r}; use {field} <= {context - n_prompt}",
                          param=field, code="context_length_exceeded")
    if max_tokens is None and default_max is not None:
        max_tokens = min(default_max, context - n_prompt)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        top_k=req.top_k or 0, min_p=req.min_p or 0.0,
        repetition_penalty=req.repetition_penalty or 1.0,
        frequency_penalty=req.frequency_penalty or 0.0, presence_penalty=req.presence_penalty or 0.0,
        seed=None if req.seed is None else req.seed + index,
        stop=req.stops, logprobs=logprobs)
    try:
        params.validate()
    except ValueError as e:
        raise bad_request(str(e)) from None
    return params


def _messages(req: ChatCompletionRequest, vision: bool) -> list[dict]:
    out = []
    for k, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":
            d["role"] = "system"
        if isinstance(m.content, list):
            parts = []
            for j, p in enumerate(m.content):
                if p.type == "image_url":
                    if not vision:
                        raise bad_request(f"messages[{k}].content[{j}]: model {req.model!r} does not accept images",
                                          param=f"messages[{k}].content[{j}]")
                    parts.append({"type": "image_url", "image_url": {"url": p.image_url.url}})
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
    """Everything one chat request needs in the worker thread."""

    def __init__(self, llm, req: ChatCompletionRequest, model_id: str, worker: ModelWorker):
        self.llm, self.req, self.model_id, self.worker = llm, req, model_id, worker
        # Images only where the engine takes them with the prompt (fail closed: never drop an image).
        vision = bool(getattr(llm, "supports_images", False))
        self.messages = _messages(req, vision)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        self.tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        tool_choice = req.tool_choice.model_dump() if isinstance(req.tool_choice, NamedToolChoice) else req.tool_choice
        self.tool_choice = tool_choice if use_tools else None
        self.has_images = any(isinstance(m.get("content"), list) and
                              any(p.get("type") == "image_url" for p in m["content"]) for m in self.messages)
        try:
            self.prompt_ids = llm.chat_format.encode_dialog(self.messages, tools=self.tools,
                                                            tool_choice=self.tool_choice)
        except (ValueError, KeyError, TypeError) as e:
            raise bad_request(f"messages: {e}", param="messages") from None
        self.want_logprobs = req.top_logprobs or 0 if req.logprobs else None
        self.params = [_sampling(llm, req, len(self.prompt_ids), default_max=None, index=i,
                                 logprobs=self.want_logprobs) for i in range(req.n)]
        self.make_processor = _processor_factory(llm, req, self.tools)
        self.id = _completion_id("chatcmpl")
        self.created = int(time.time())

    def generate(self, i: int) -> Iterator:
        if self.has_images:  # the LLM encodes the images along with the prompt
            return self.llm.chat(self.messages, tools=self.tools, tool_choice=self.tool_choice, stream=True,
                                 params=self.params[i], logits_processor=self.make_processor())
        return self.llm.generate(self.prompt_ids, self.params[i], stream=True, add_bos=False,
                                 logits_processor=self.make_processor())

    def parse(self, text: str):
        """content and OpenAI tool_calls of one choice's text."""
        if not self.tools:
            return text, []
        msg = self.llm.chat_format.parse_response(text, tools=self.tools)
        calls = [c.to_openai() for c in msg.tool_calls]
        if self.req.parallel_tool_calls is False:
            calls = calls[:1]
        return msg.content, calls

    def usage(self, completion_tokens: int) -> dict:
        n = len(self.prompt_ids)
        return {"prompt_tokens": n, "completion_tokens": completion_tokens, "total_tokens": n + completion_tokens}

    # -- non-streaming --------------------------------------------------------------------------
    def run(self, cancel: threading.Event | None = None) -> dict:
        choices, total = [], 0
        for i in range(self.req.n):
            text, lps, finish, n_tokens = "", [], "stop", 0
            for chunk in self.generate(i):
                if cancel is not None and cancel.is_set() or self.worker.closed.is_set():
                    raise asyncio.CancelledError()  # closes the engine's generator on the way out
                text += chunk.text
                n_tokens += self.worker.count(chunk)
                if chunk.logprobs:
                    lps.extend(chunk.logprobs)
                if chunk.finish_reason:
                    finish = chunk.finish_reason
            total += n_tokens
            content, calls = self.parse(text)
            message: dict = {"role": "assistant", "content": content if (content or not calls) else None}
            if calls:
                message["tool_calls"] = calls
                finish = "tool_calls"
            choices.append({"index": i, "message": message, "finish_reason": finish,
                            "logprobs": {"content": _chat_logprobs(lps)} if self.want_logprobs is not None else None})
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model_id,
                "choices": choices, "usage": self.usage(total)}

    # -- streaming ------------------------------------------------------------------------------
    def chunk(self, choices: list[dict], usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": "chat.completion.chunk", "created": self.created,
               "model": self.model_id, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def stream(self, cancel: threading.Event) -> Iterator[dict]:
        total = 0
        for i in range(self.req.n):
            yield self.chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                               "logprobs": None}])
            held, holding, finish = "", bool(self.tools), "stop"
            gen = self.generate(i)
            try:
                for chunk in gen:
                    if cancel.is_set() or self.worker.closed.is_set():
                        return
                    total += self.worker.count(chunk)
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
                    if holding:
                        held += chunk.text
                        start = held.lstrip()
                        if start and not any(o.startswith(start[:len(o)]) for o in TOOL_CALL_OPENERS):
                            holding = False  # plain content after all: release what we held
                            text, held = held, ""
                        else:
                            continue
                    else:
                        text = chunk.text
                    lps = _chat_logprobs(chunk.logprobs)
                    if text or lps:
                        yield self.chunk([{"index": i, "delta": {"content": text}, "finish_reason": None,
                                           "logprobs": {"content": lps} if self.want_logprobs is not None else None}])
            finally:
                gen.close()
            if holding and held:
                content, calls = self.parse(held)
                if content:
                    yield self.chunk([{"index": i, "delta": {"content": content}, "finish_reason": None}])
                for j, call in enumerate(calls):
                    args = call["function"]["arguments"]
                    yield self.chunk([{"index": i, "finish_reason": None, "delta": {"tool_calls": [
                        {"index": j, "id": call["id"], "type": "function",
                         "function": {"name": call["function"]["name"], "arguments": ""}}]}}])
                    for k in range(0, len(args), 16):  # arguments arrive in pieces, as from OpenAI
                        yield self.chunk([{"index": i, "finish_reason": None, "delta": {"tool_calls": [
                            {"index": j, "function": {"arguments": args[k:k + 16]}}]}}])
                if calls:
                    finish = "tool_calls"
            yield self.chunk([{"index": i, "delta": {}, "finish_reason": finish, "logprobs": None}])
        opts = self.req.stream_options
        if opts is not None and opts.include_usage:
            yield self.chunk([], usage=self.usage(total))


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


def _prompt_logprobs(llm, ids: list[int], k: int) -> list[tuple[float | None, list[tuple[int, float]]]]:
    """Log-probabilities of each prompt token given the ones before it (the first has none): for echo."""
    import torch

    from corral.engine.generate import ensure_cache

    model = llm.model
    ensure_cache(model, len(ids))
    with torch.inference_mode():
        logits = model(torch.tensor([ids]), torch.arange(len(ids)))[0].float()  # (T, vocab)
        logp = torch.log_softmax(logits, dim=-1)
    out: list[tuple[float | None, list[tuple[int, float]]]] = [(None, [])]
    for t in range(1, len(ids)):
        row = logp[t - 1]
        top = []
        if k:
            v, i = torch.topk(row, k)
            top = list(zip(i.tolist(), v.tolist()))
        out.append((float(row[ids[t]]), top))
    return out


class _CompletionJob:
    def __init__(self, llm, req: CompletionRequest, model_id: str, worker: ModelWorker):
        self.llm, self.req, self.model_id, self.worker = llm, req, model_id, worker
        self.prompts = _encode_prompts(llm, req)
        # OpenAI's default max_tokens for text completions is 16.
        self.params = [[_sampling(llm, req, len(ids), default_max=16, index=i, logprobs=req.logprobs)
                        for i in range(req.n)] for ids in self.prompts]
        self.id = _completion_id("cmpl")
        self.created = int(time.time())

    def _token_text(self, tid: int) -> str:
        return self.llm.tokenizer.token_bytes(tid).decode("utf-8", errors="replace")

    def _logprobs(self, entries: list[tuple[str, float | None, list[tuple[str, float]]]], start: int) -> dict:
        tokens, lps, tops, offsets, pos = [], [], [], [], start
        for tok, lp, top in entries:
            tokens.append(tok)
            lps.append(lp)
            tops.append(dict(top) if lp is not None else None)
            offsets.append(pos)
            pos += len(tok)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}

    def run(self, cancel=None) -> dict:
        choices, total = [], 0
        for p, ids in enumerate(self.prompts):
            prompt_text = self.llm.tokenizer.decode(ids) if self.req.echo else ""
            echo_lps = []
            if self.req.echo and self.req.logprobs is not None:
                k = self.req.logprobs
                echo_lps = [(self._token_text(t), lp, [(self._token_text(a), v) for a, v in top])
                            for t, (lp, top) in zip(ids, _prompt_logprobs(self.llm, ids, k))]
            for i in range(self.req.n):
                text, finish, entries, n_tok = "", "stop", [], 0
                for chunk in self.llm.generate(ids, self.params[p][i], stream=True, add_bos=False):
                    if cancel is not None and cancel.is_set() or self.worker.closed.is_set():
                        raise asyncio.CancelledError()
                    text += chunk.text
                    n_tok += self.worker.count(chunk)
                    for lp in chunk.logprobs or []:
                        entries.append((lp.token, lp.logprob, list(lp.top_logprobs)))
                    if chunk.finish_reason:
                        finish = chunk.finish_reason
                total += n_tok
                logprobs = None
                if self.req.logprobs is not None:
                    logprobs = self._logprobs(echo_lps + entries, 0)
                choices.append({"index": len(choices), "text": prompt_text + text, "finish_reason": finish,
                                "logprobs": logprobs})
        n_prompt = sum(len(ids) for ids in self.prompts)
        return {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": total, "total_tokens": n_prompt + total}}

    def stream(self, cancel: threading.Event) -> Iterator[dict]:
        total, index = 0, 0
        for p, ids in enumerate(self.prompts):
            for i in range(self.req.n):
                gen = self.llm.generate(ids, self.params[p][i], stream=True, add_bos=False)
                try:
                    for chunk in gen:
                        if cancel.is_set() or self.worker.closed.is_set():
                            return
                        total += self.worker.count(chunk)
                        lp = None
                        if self.req.logprobs is not None:
                            lp = self._logprobs([(x.token, x.logprob, list(x.top_logprobs))
                                                 for x in chunk.logprobs or []], 0)
                        yield {"id": self.id, "object": "text_completion", "created": self.created,
                               "model": self.model_id, "choices": [{"index": index, "text": chunk.text,
                                                                     "finish_reason": chunk.finish_reason,
                                                                     "logprobs": lp}]}
                finally:
                    gen.close()
                index += 1
        opts = self.req.stream_options
        if opts is not None and opts.include_usage:
            n_prompt = sum(len(ids) for ids in self.prompts)
            yield {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model_id,
                   "choices": [], "usage": {"prompt_tokens": n_prompt, "completion_tokens": total,
                                            "total_tokens": n_prompt + total}}


# ---------------------------------------------------------------------------------------------
# The provider


def _wrap_engine_errors(fn):
    """Engine ValueErrors raised while a request is prepared become 400s."""

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
                info.metadata.update(context_length=w.llm.context_length, chat_format=w.llm.config.chat_format)
                if ckpt is not None:
                    info.metadata.update(checkpoint=str(ckpt.path), format=ckpt.format,
                                         quantization=ckpt.quantization)
        return list(self._infos.values())

    async def start(self) -> None:
        if self.load_at_start:
            for w in self.workers.values():
                await asyncio.get_running_loop().run_in_executor(w._executor, w.load)

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
