"""`/metrics` (Prometheus text format, read back with prometheus_client's own parser) and the JSON access log.

The counters are checked to move with real traffic on the real SmolLM2 server (`inline_server`):
requests by route and status, tokens in and out, time to first token and per-token latency for a
stream, the engine's KV-cache and prefix-cache figures.
"""

from __future__ import annotations

import json
import logging
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.stack.conftest import API_KEY, MODEL

AUTH = {"Authorization": f"Bearer {API_KEY}"}


def scrape(server) -> dict[tuple, float]:
    """{(sample name, sorted labels): value} of one /metrics scrape."""
    r = httpx.get(server.url + "/metrics", headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def chat(server, *, stream: bool, content: str = "Name a color.") -> dict:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 6,
            "temperature": 0, "stream": stream}
    if not stream:
        r = httpx.post(server.base_url + "/chat/completions", json=body, headers=AUTH, timeout=300)
        assert r.status_code == 200, r.text
        return r.json()["usage"]
    body["stream_options"] = {"include_usage": True}
    usage = None
    with httpx.stream("POST", server.base_url + "/chat/completions", json=body, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
    return usage


def test_metrics_parse_and_move_with_traffic(inline_server):
    chat(inline_server, stream=False)  # the model is warm and the engine stats exist
    before = scrape(inline_server)

    u1 = chat(inline_server, stream=False, content="Name a fruit.")
    u2 = chat(inline_server, stream=True, content="Name a fruit.")  # same prompt: the prefix cache serves it
    assert httpx.get(inline_server.base_url + "/models").status_code == 401  # no key
    after = scrape(inline_server)

    route = {"method": "POST", "route": "/v1/chat/completions"}
    assert value(after, "corral_http_requests_total", **route, status="200") - \
        value(before, "corral_http_requests_total", **route, status="200") == 2
    assert value(after, "corral_http_requests_total", method="GET", route="/v1/models", status="401") - \
        value(before, "corral_http_requests_total", method="GET", route="/v1/models", status="401") == 1
    # Tokens in and out: exactly what the two replies' usage said.
    assert value(after, "corral_prompt_tokens_total", model=MODEL) - value(before, "corral_prompt_tokens_total", model=MODEL) \
        == u1["prompt_tokens"] + u2["prompt_tokens"]
    generated = u1["completion_tokens"] + u2["completion_tokens"]
    assert value(after, "corral_completion_tokens_total", model=MODEL) - \
        value(before, "corral_completion_tokens_total", model=MODEL) == generated
    assert value(after, "corral_engine_generated_tokens_total", model=MODEL) - \
        value(before, "corral_engine_generated_tokens_total", model=MODEL) >= generated
    # The stream's timings: one time to first token, and the gaps between its later tokens.
    assert value(after, "corral_time_to_first_token_seconds_count", model=MODEL) - \
        value(before, "corral_time_to_first_token_seconds_count", model=MODEL) == 1
    assert value(after, "corral_time_to_first_token_seconds_sum", model=MODEL) > \
        value(before, "corral_time_to_first_token_seconds_sum", model=MODEL)
    assert value(after, "corral_time_per_output_token_seconds_count", model=MODEL) > \
        value(before, "corral_time_per_output_token_seconds_count", model=MODEL)
    assert value(after, "corral_http_request_duration_seconds_count", **route) - \
        value(before, "corral_http_request_duration_seconds_count", **route) == 2
    # The engine: a KV-cache pool, nothing running now, and the repeated prompt hit the prefix cache.
    assert value(after, "corral_kv_cache_blocks", model=MODEL) > 0
    assert 0 <= value(after, "corral_kv_cache_usage_ratio", model=MODEL) <= 1
    assert value(after, "corral_queue_depth", model=MODEL) == 0
    assert value(after, "corral_prefix_cache_hit_tokens_total", model=MODEL) > \
        value(before, "corral_prefix_cache_hit_tokens_total", model=MODEL)
    assert 0 < value(after, "corral_prefix_cache_hit_rate", model=MODEL) <= 1
    assert value(after, "corral_http_requests_in_flight") == 1  # the scrape itself


def test_metrics_need_the_api_key_when_keys_are_set(inline_server):
    assert httpx.get(inline_server.url + "/metrics", timeout=30).status_code == 401


def test_one_json_access_log_line_per_request(fake_server, caplog):
    caplog.set_level(logging.INFO, logger="corral.access")
    httpx.get(fake_server.base_url + "/models", timeout=30)
    httpx.post(fake_server.base_url + "/chat/completions", timeout=30,
               json={"model": "fake-llm", "messages": [{"role": "user", "content": "hi"}]})
    httpx.get(fake_server.base_url + "/no/such/route", timeout=30)
    # The line is written once the response has gone out: the client may see the answer a moment before.
    deadline = time.monotonic() + 10
    while len([r for r in caplog.records if r.name == "corral.access"]) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    lines = [json.loads(r.getMessage()) for r in caplog.records if r.name == "corral.access"]
    assert [(x["method"], x["route"], x["status"]) for x in lines] == [
        ("GET", "/v1/models", 200), ("POST", "/v1/chat/completions", 200), ("GET", "unmatched", 404)]
    chat_line = lines[1]
    assert chat_line["model"] == "fake-llm" and chat_line["prompt_tokens"] == 1 and chat_line["completion_tokens"] == 1
    assert chat_line["path"] == "/v1/chat/completions" and chat_line["duration_ms"] >= 0
    assert "ttft_ms" not in chat_line  # not a stream


@pytest.mark.parametrize("level, shown", [("INFO", True), ("WARNING", False)])
def test_serve_access_log_is_bare_json_on_stderr(level, shown, capfd):
    from corral.stack.metrics import access_log, configure_access_log

    saved = (access_log.handlers[:], access_log.level, access_log.propagate)
    access_log.handlers.clear()
    try:
        configure_access_log(level)
        access_log.info(json.dumps({"status": 200}))
        err = capfd.readouterr().err
        assert (err == '{"status": 200}\n') if shown else (err == "")
    finally:
        access_log.handlers[:], access_log.level, access_log.propagate = saved
