"""Observability: `/metrics` in the Prometheus text format and one JSON log line per request.

Two sources, one registry per app (tests run several apps in one process):
  - `Observer`, a plain ASGI middleware outside the API-key guard (so 401s and 413s count too), sees
    every request: its route template, status and duration. On the generating routes it also reads
    what goes back: `usage` in a JSON reply or in a stream's last event gives the tokens in and out;
    a stream's first content event gives the time to first token (from the request's arrival, so
    queueing counts, as a client sees it) and the gaps between content events the per-token latency.
    The inline engine streams about one event per token; a stream without `usage` (the client did not
    ask for `stream_options.include_usage`) counts no tokens here, the engine counter below does.
  - `EngineCollector` reads the inline engines' own stats at scrape time: queue depth, running and
    waiting sequences, KV-cache blocks in use, prefix-cache hits, tokens generated, engine steps.

The access log is the logger `corral.access`: one JSON object per line (method, path, route, status,
duration, model, tokens, time to first token). `corral serve` shows it at `--log-level info` (the
default).
"""

from __future__ import annotations

import json
import logging
import sys
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.routing import Match

access_log = logging.getLogger("corral.access")

# Routes whose replies carry generated text (and `usage`).
GENERATING = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
# Seconds; TTFT on a CPU runs from tens of milliseconds to minutes under load.
TTFT_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1, 2.5)
MAX_JSON_BODY = 1 << 20  # replies above this are not parsed for `usage`


class Metrics:
    """The app's Prometheus registry and the metrics the middleware updates."""

    def __init__(self, stack=None):
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter("corral_http_requests", "HTTP requests answered, by route and status",
                                ["method", "route", "status"], registry=r)
        self.duration = Histogram("corral_http_request_duration_seconds", "Time to answer a request (whole stream)",
                                  ["method", "route"], registry=r)
        self.in_flight = Gauge("corral_http_requests_in_flight", "Requests being answered now", registry=r)
        self.prompt_tokens = Counter("corral_prompt_tokens", "Prompt tokens of answered requests (from usage)",
                                     ["model"], registry=r)
        self.completion_tokens = Counter("corral_completion_tokens", "Generated tokens of answered requests "
                                         "(from usage)", ["model"], registry=r)
        self.ttft = Histogram("corral_time_to_first_token_seconds", "Streams: request arrival to first content",
                              ["model"], buckets=TTFT_BUCKETS, registry=r)
        self.token_latency = Histogram("corral_time_per_output_token_seconds", "Streams: gap between content "
                                       "events (about one per token)", ["model"], buckets=TOKEN_BUCKETS, registry=r)
        if stack is not None:
            r.register(EngineCollector(stack))

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class EngineCollector:
    """Scrape-time gauges and counters from every inline model's `ModelWorker.stats()`."""

    def __init__(self, stack):
        self.stack = stack

    def describe(self):
        return []  # collected lazily: the models may not be loaded at registration

    def collect(self):
        g = {name: GaugeMetricFamily(f"corral_{name}", doc, labels=["model"]) for name, doc in (
            ("queue_depth", "Requests running or waiting for the model (the server's bounded queue)"),
            ("engine_running_sequences", "Sequences in the engine's running batch"),
            ("engine_waiting_sequences", "Sequences waiting for the engine's batch"),
            ("kv_cache_blocks", "Blocks in the paged KV-cache pool"),
            ("kv_cache_used_blocks", "KV-cache blocks held by running sequences"),
            ("kv_cache_usage_ratio", "Fraction of the KV-cache pool held by running sequences"),
            ("prefix_cache_hit_rate", "Prompt tokens served from the prefix cache / prompt tokens looked up"))}
        c = {name: CounterMetricFamily(f"corral_{name}", doc, labels=["model"]) for name, doc in (
            ("prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache"),
            ("prefix_cache_queried_tokens", "Prompt tokens looked up in the prefix cache"),
            ("engine_generated_tokens", "Tokens generated by the engine (every request, streamed or not)"),
            ("engine_steps", "Engine steps (one batched forward pass each)"))}
        for model, stats in self._inline_stats():
            g["queue_depth"].add_metric([model], stats["running_or_queued"])
            c["engine_generated_tokens"].add_metric([model], stats["generated_tokens"])
            kv, engine = stats.get("kv_cache"), stats.get("engine")
            if kv is None:  # not loaded yet
                continue
            g["engine_running_sequences"].add_metric([model], engine["running"])
            g["engine_waiting_sequences"].add_metric([model], engine["waiting"])
            g["kv_cache_blocks"].add_metric([model], kv["blocks"])
            g["kv_cache_used_blocks"].add_metric([model], kv["used"])
            g["kv_cache_usage_ratio"].add_metric([model], kv["used"] / max(1, kv["blocks"]))
            g["prefix_cache_hit_rate"].add_metric([model], kv["prefix_hit_tokens"] / max(1, kv["prefix_queried_tokens"]))
            c["prefix_cache_hit_tokens"].add_metric([model], kv["prefix_hit_tokens"])
            c["prefix_cache_queried_tokens"].add_metric([model], kv["prefix_queried_tokens"])
            c["engine_steps"].add_metric([model], engine["steps"])
        yield from g.values()
        yield from c.values()

    def _inline_stats(self):
        for provider in self.stack.providers.values():
            for model, worker in (getattr(provider, "workers", None) or {}).items():
                yield model, worker.stats()


# ---------------------------------------------------------------------------------------------
# The middleware


class _Reply:
    """What one request's reply said: status, and for generating routes the model, tokens and timings."""

    def __init__(self, start: float):
        self.start = start
        self.status = 500  # if the app fails before answering, the Guard answers 500
        self.sse = self.json = False
        self.model = None
        self.prompt_tokens = self.completion_tokens = None
        self.first_content = self.last_content = None
        self.gaps: list[float] = []
        self._buffer = b""

    def feed(self, body: bytes) -> None:
        if self.sse:
            self._buffer += body
            *events, self._buffer = self._buffer.split(b"\n\n")
            for event in events:
                self._event(event)
        elif self.json and len(self._buffer) + len(body) <= MAX_JSON_BODY:
            self._buffer += body

    def finish(self) -> None:
        if self.json and self._buffer:
            try:
                self._read(json.loads(self._buffer))
            except ValueError:
                pass

    def _event(self, event: bytes) -> None:
        for line in event.split(b"\n"):
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            try:
                data = json.loads(line[5:])
            except ValueError:
                continue
            if self._has_content(data):
                now = time.perf_counter()
                if self.first_content is None:
                    self.first_content = now
                else:
                    self.gaps.append(now - self.last_content)
                self.last_content = now
            self._read(data.get("response") if isinstance(data.get("response"), dict) else data)

    @staticmethod
    def _has_content(data: dict) -> bool:
        if data.get("type") in ("response.output_text.delta", "response.function_call_arguments.delta"):
            return bool(data.get("delta"))
        for c in data.get("choices") or ():
            delta = c.get("delta") or {}
            if delta.get("content") or delta.get("tool_calls") or c.get("text"):
                return True
        return False

    def _read(self, data: dict) -> None:
        """model and usage, in the chat/completions shape or the responses shape."""
        if isinstance(data.get("model"), str):
            self.model = data["model"]
        usage = data.get("usage")
        if isinstance(usage, dict):
            self.prompt_tokens = usage.get("prompt_tokens", usage.get("input_tokens"))
            self.completion_tokens = usage.get("completion_tokens", usage.get("output_tokens"))


class Observer:
    """ASGI middleware: counts, times and logs every HTTP request (see the module docstring)."""

    def __init__(self, app, metrics: Metrics, routes_app):
        self.app, self.metrics, self.routes_app = app, metrics, routes_app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        reply = _Reply(time.perf_counter())
        route = self._route(scope)
        generating = scope["method"] == "POST" and route in GENERATING

        async def observing_send(message):
            if message["type"] == "http.response.start":
                reply.status = message["status"]
                if generating:
                    ctype = dict(message.get("headers") or []).get(b"content-type", b"")
                    reply.sse = ctype.startswith(b"text/event-stream")
                    reply.json = ctype.startswith(b"application/json")
            elif message["type"] == "http.response.body" and generating:
                reply.feed(message.get("body", b""))
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, observing_send)
        finally:
            self.metrics.in_flight.dec()
            reply.finish()
            self._record(scope, route, reply)

    def _route(self, scope) -> str:
        """The route's template (`/v1/models/{model_id:path}`), so labels stay few; else 'unmatched'."""
        for r in self.routes_app.router.routes:
            match, _ = r.matches(scope)
            if match is Match.FULL:
                return getattr(r, "path", "") or "/"
        return "unmatched"

    def _record(self, scope, route: str, reply: _Reply) -> None:
        m, method = self.metrics, scope["method"]
        elapsed = time.perf_counter() - reply.start
        m.requests.labels(method, route, str(reply.status)).inc()
        m.duration.labels(method, route).observe(elapsed)
        model = reply.model or ""
        if reply.prompt_tokens:
            m.prompt_tokens.labels(model).inc(reply.prompt_tokens)
        if reply.completion_tokens:
            m.completion_tokens.labels(model).inc(reply.completion_tokens)
        ttft = None if reply.first_content is None else reply.first_content - reply.start
        if ttft is not None:
            m.ttft.labels(model).observe(ttft)
        for gap in reply.gaps:
            m.token_latency.labels(model).observe(gap)
        line = {"ts": round(time.time(), 3), "method": method, "path": scope["path"], "route": route,
                "status": reply.status, "duration_ms": round(elapsed * 1000, 1),
                "client": (scope.get("client") or ("",))[0]}
        if reply.model:
            line["model"] = reply.model
        if reply.prompt_tokens is not None:
            line.update(prompt_tokens=reply.prompt_tokens, completion_tokens=reply.completion_tokens)
        if ttft is not None:
            line["ttft_ms"] = round(ttft * 1000, 1)
        access_log.info(json.dumps(line))


def configure_access_log(level: int = logging.INFO) -> None:
    """Send `corral.access` to stderr as bare JSON lines (no timestamp prefix: the object has `ts`)."""
    if not access_log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access_log.addHandler(handler)
    access_log.setLevel(level)
    access_log.propagate = False


def add_metrics_route(app, metrics: Metrics) -> None:
    """GET /metrics (behind the API key when keys are configured: Prometheus sends it as a bearer token)."""
    from fastapi.responses import Response

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics():
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)
