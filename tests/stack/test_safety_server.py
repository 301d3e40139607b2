"""Safety through a real `corral serve`: shields, run-shield, moderations (string, list, image) and the
guardrails around chat completions (streamed and not), through the `openai` SDK and raw HTTP.

One server for the module serves tiny random models with the real Llama 3 tokenizer (tests/safety/
tiny_guard.py): `tiny-chat` (the chat model), the text guard as Llama-Guard-3-1B, the vision guard as
Llama-Guard-3-11B-Vision, and a guard whose checkpoint does not exist. A random guard's verdicts are
arbitrary, so the server runs with the TEST-ONLY bias CORRAL_TEST_GUARD_VERDICTS: regexes over the
conversation the guard reads -> the answer it is forced to give.
"""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest

from corral.safety.guard import TEST_VERDICTS_ENV
from corral.safety.moderation import OPENAI_CATEGORIES, REFUSAL
from tests.safety.tiny_guard import write_text_guard, write_vision_guard
from tests.stack.conftest import ServerProcess

VERDICTS = [["BOMB", "unsafe\nS9"], ["GARBAGE", "maybe"], ["OUTPUTBAD[\\s\\S]*Agent: ", "unsafe\nS1,S10"],
            ["", "safe"]]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("safety-server")
    text, vision = write_text_guard(root / "text"), write_vision_guard(root / "vision")
    srv = ServerProcess(root / "run", {
        "providers": [{"provider_id": "corral", "provider_type": "inline::corral"},
                      {"provider_id": "llama-guard", "provider_type": "inline::llama-guard",
                       "config": {"excluded_categories": ["S13"]}}],
        "models": [{"model_id": "tiny-chat", "provider_id": "corral", "checkpoint": str(text), "kv_cache_mb": 64,
                    "max_tokens": 24},
                   {"model_id": "Llama-Guard-3-1B", "provider_id": "corral", "checkpoint": str(text),
                    "kv_cache_mb": 64},
                   {"model_id": "Llama-Guard-3-11B-Vision", "provider_id": "corral", "checkpoint": str(vision),
                    "dtype": "fp32", "kv_cache_mb": 64},
                   {"model_id": "broken-guard", "provider_id": "corral", "checkpoint": str(root / "missing")}],
        "shields": [{"shield_id": "llama-guard", "provider_id": "llama-guard",
                     "provider_shield_id": "Llama-Guard-3-1B"},
                    {"shield_id": "vision-guard", "provider_id": "llama-guard",
                     "provider_shield_id": "Llama-Guard-3-11B-Vision"},
                    {"shield_id": "broken", "provider_id": "llama-guard", "provider_shield_id": "broken-guard"}],
        "guardrails": {"shields": ["llama-guard"], "models": ["tiny-chat"], "stream": "sentence"},
    })
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(TEST_VERDICTS_ENV, json.dumps(VERDICTS))  # test only: known verdicts from a random guard
        srv.start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=120)


def post(server, path, body):
    return httpx.post(server.base_url + path, json=body, timeout=120)


def png_data_url(color="red") -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (40, 30), color).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_shields_and_the_safety_provider(server):
    data = httpx.get(server.base_url + "/shields").json()["data"]
    assert [s["identifier"] for s in data] == ["llama-guard", "vision-guard", "broken"]
    assert data[0] == {"identifier": "llama-guard", "provider_resource_id": "Llama-Guard-3-1B",
                       "provider_id": "llama-guard", "type": "shield", "params": {}}
    assert httpx.get(server.base_url + "/shields/vision-guard").json()["provider_resource_id"] == \
        "Llama-Guard-3-11B-Vision"
    r = httpx.get(server.base_url + "/shields/nope")
    assert r.status_code == 404 and r.json()["error"]["code"] == "shield_not_found"
    provider = httpx.get(server.base_url + "/providers/llama-guard").json()
    assert provider["api"] == "safety" and provider["provider_type"] == "inline::llama-guard"
    routes = {(r["route"], r["method"]): r["provider_types"]
              for r in httpx.get(server.base_url + "/inspect/routes").json()["data"]}
    assert {("/v1/shields", "GET"), ("/v1/safety/run-shield", "POST"), ("/v1/moderations", "POST")} <= set(routes)
    assert routes[("/v1/chat/completions", "POST")] == ["inline::corral"]


def test_run_shield(server):
    ok = post(server, "/safety/run-shield", {"shield_id": "llama-guard",
                                              "messages": [{"role": "user", "content": "Hello!"}]})
    assert ok.status_code == 200 and ok.json() == {"violation": None}
    bad = post(server, "/safety/run-shield", {"shield_id": "llama-guard", "messages": [
        {"role": "system", "content": "be brief"}, {"role": "user", "content": "how to make a BOMB"}]}).json()
    assert bad["violation"] == {"violation_level": "error", "user_message": REFUSAL,
                                "metadata": {"violation_type": "S9", "categories": ["Indiscriminate Weapons"]}}
    # an answer is judged as the Agent's
    agent = post(server, "/safety/run-shield", {"shield_id": "llama-guard", "messages": [
        {"role": "user", "content": "OUTPUTBAD please"}, {"role": "assistant", "content": "sure"}]}).json()
    assert agent["violation"]["metadata"]["violation_type"] == "S1,S10"

    r = post(server, "/safety/run-shield", {"shield_id": "nope", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"
    r = post(server, "/safety/run-shield", {"shield_id": "broken", "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 503 and "broken-guard" in r.json()["error"]["message"] \
        and "failed to load" in r.json()["error"]["message"]
    r = post(server, "/safety/run-shield", {"shield_id": "llama-guard", "messages": [{"role": "user",
                                                                                       "content": "GARBAGE"}]})
    assert r.status_code == 500 and r.json()["error"]["code"] == "guard_output_invalid"
    assert "maybe" not in r.text  # the guard's answer stays in the log
    r = post(server, "/safety/run-shield", {"shield_id": "llama-guard", "messages": []})
    assert r.status_code == 400
    r = post(server, "/safety/run-shield", {"shield_id": "llama-guard", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": png_data_url()}}]}]})
    assert r.status_code == 400 and "cannot check images" in r.json()["error"]["message"]


def test_moderations_string_and_list_through_the_openai_sdk(client, server):
    one = client.moderations.create(model="llama-guard", input="Tell me a joke")
    assert one.model == "llama-guard" and len(one.results) == 1
    result = one.results[0]
    assert result.flagged is False and result.categories.violence is False
    assert set(OPENAI_CATEGORIES) <= set(result.category_scores.model_dump(by_alias=True))
    assert 0.0 <= result.category_scores.violence <= 1.0

    many = client.moderations.create(model="llama-guard", input=["Tell me a joke", "how to build a BOMB"])
    first, second = many.results
    assert not first.flagged and second.flagged
    assert second.categories.illicit_violent and not second.categories.hate
    assert second.category_applied_input_types.violence == ["text"]
    extra = second.model_dump(by_alias=True)
    assert extra["categories"]["Indiscriminate Weapons"] is True and extra["metadata"]["violation_type"] == ["S9"]
    assert extra["user_message"] == REFUSAL
    # S13 is excluded by the provider config: not a category of the results
    assert "Elections" not in extra["categories"] and "Violent Crimes" in extra["categories"]

    raw = post(server, "/moderations", {"input": "hi"}).json()  # no model: the first shield
    assert raw["model"] == "llama-guard" and raw["id"].startswith("modr-")
    for body, status in (({"input": [], "model": "llama-guard"}, 400), ({"input": "x", "model": "nope"}, 404),
                         ({"input": "x", "model": "broken"}, 503), ({"input": [1, 2], "model": "llama-guard"}, 400)):
        assert post(server, "/moderations", body).status_code == status, body


def test_an_image_is_moderated_by_the_vision_guard(client):
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": png_data_url()}}]
    out = client.moderations.create(model="vision-guard", input=parts)
    assert len(out.results) == 1 and out.results[0].flagged is False
    assert out.results[0].category_applied_input_types.violence == ["text", "image"]
    assert out.results[0].category_applied_input_types.hate == ["text"]
    blue = client.moderations.create(model="vision-guard", input=[parts[0], {
        "type": "image_url", "image_url": {"url": png_data_url("blue")}}])
    # the image reaches the guard: its probabilities change with the picture
    assert blue.results[0].model_dump()["metadata"]["p_unsafe"] != out.results[0].model_dump()["metadata"]["p_unsafe"]
    with pytest.raises(openai.BadRequestError, match="cannot check images"):
        client.moderations.create(model="llama-guard", input=parts)


def test_guardrails_on_chat(client):
    safe = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "Say hi"}],
                                          max_tokens=12, temperature=0)
    assert safe.choices[0].finish_reason in ("stop", "length") and safe.choices[0].message.content != REFUSAL

    refused = client.chat.completions.create(model="tiny-chat", max_tokens=12, temperature=0,
                                             messages=[{"role": "user", "content": "how to build a BOMB"}])
    assert refused.choices[0].message.content == REFUSAL and refused.choices[0].finish_reason == "content_filter"
    assert refused.model_dump()["metadata"] == {
        "safety_phase": "input", "safety_violation_level": "error", "safety_user_message": REFUSAL,
        "safety_violation_type": "S9", "safety_categories": "Indiscriminate Weapons", "safety_shield_id": "llama-guard"}
    assert refused.usage.completion_tokens == 0

    out = client.chat.completions.create(model="tiny-chat", max_tokens=12, temperature=0,
                                         messages=[{"role": "user", "content": "OUTPUTBAD story"}])
    assert out.choices[0].message.content == REFUSAL and out.choices[0].finish_reason == "content_filter"
    assert out.model_dump()["metadata"]["safety_phase"] == "output"

    # the guard model itself is not guarded
    unguarded = client.chat.completions.create(model="Llama-Guard-3-1B", max_tokens=4, temperature=0,
                                               messages=[{"role": "user", "content": "how to build a BOMB"}])
    assert unguarded.choices[0].finish_reason != "content_filter"


def stream_text(client, content):
    chunks = list(client.chat.completions.create(model="tiny-chat", max_tokens=12, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": content}]))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish, chunks


def test_guardrails_on_streamed_chat(client, server):
    text, finish, _ = stream_text(client, "Say hi")
    whole = client.chat.completions.create(model="tiny-chat", max_tokens=12, temperature=0,
                                           messages=[{"role": "user", "content": "Say hi"}])
    assert text == whole.choices[0].message.content and finish == [whole.choices[0].finish_reason]

    text, finish, chunks = stream_text(client, "OUTPUTBAD story")
    assert text == REFUSAL and finish == ["content_filter"]  # none of the unsafe answer reached the client
    assert chunks[-1].model_dump()["metadata"]["safety_violation_type"] == "S1,S10"

    text, finish, _ = stream_text(client, "a BOMB")
    assert text == REFUSAL and finish == ["content_filter"]

    # raw SSE: the stream still ends with [DONE]
    with httpx.stream("POST", server.base_url + "/chat/completions", timeout=120, json={
            "model": "tiny-chat", "stream": True, "max_tokens": 8,
            "messages": [{"role": "user", "content": "OUTPUTBAD"}]}) as r:
        lines = [x for x in r.iter_lines() if x.startswith("data: ")]
    assert lines[-1] == "data: [DONE]" and REFUSAL in "".join(lines)
    r = post(server, "/chat/completions", {"model": "tiny-chat", "stream": True, "n": 2,
                                           "messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "n"


def test_guardrails_on_responses(client):
    """The agents' Responses run the same shields (Agents.guardrails = the run config's guardrails)."""
    refused = client.responses.create(model="tiny-chat", input="how to build a BOMB", max_output_tokens=8,
                                      temperature=0)
    texts = [c.text if c.type == "output_text" else c.refusal for item in refused.output if item.type == "message"
             for c in item.content]
    assert texts == [REFUSAL]
    out = client.responses.create(model="tiny-chat", input="OUTPUTBAD tale", max_output_tokens=8, temperature=0)
    texts = [c.text if c.type == "output_text" else c.refusal for item in out.output if item.type == "message"
             for c in item.content]
    assert texts == [REFUSAL]
    fine = client.responses.create(model="tiny-chat", input="Say hi", max_output_tokens=8, temperature=0)
    assert fine.status in ("completed", "incomplete") and REFUSAL not in fine.output_text
