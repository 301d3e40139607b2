"""The server's own logic through the `openai` SDK, over a FakeProvider instead of a model.

What is checked here does not depend on what a model says: unexpected exceptions stay in the log,
the history fields OpenAI's SDK sends back are accepted, image URLs are data: URLs only, list pages
take Llama Stack's sizes, and a completion id that repeats never replaces a stored completion.
Every test starts its own in-process server (a fraction of a second; no model is loaded).
"""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

from tests.stack.conftest import FakeProvider

MODEL = "fake-llm"


def _error(e) -> dict:
    return e.value.response.json()["error"]


# --- internal errors: logged, never sent ----------------------------------------------------------


def test_an_exception_in_a_route_is_a_generic_500(fake_client, fake_server, caplog):
    caplog.set_level(logging.ERROR, logger="corral.server")
    with pytest.raises(openai.InternalServerError) as e:
        fake_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "fail"}])
    body = e.value.response.json()
    assert body["error"]["message"] == "internal server error" and body["error"]["type"] == "server_error"
    assert FakeProvider.SECRET not in e.value.response.text and "RuntimeError" not in e.value.response.text
    # the log has the whole story, once
    failures = [r for r in caplog.records if r.exc_info and FakeProvider.SECRET in str(r.exc_info[1])]
    assert len(failures) == 1 and "Traceback" in caplog.text


def test_an_exception_in_a_started_stream_is_a_generic_error_event(fake_server, caplog):
    caplog.set_level(logging.ERROR, logger="corral.server")
    with httpx.stream("POST", fake_server.base_url + "/chat/completions", timeout=30, json={
            "model": MODEL, "stream": True, "messages": [{"role": "user", "content": "fail midway"}]}) as r:
        assert r.status_code == 200
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert '"fail midway"' in events[0]  # the first chunk went out before the failure
    assert events[-1] == 'data: {"error": {"message": "internal server error", "type": "server_error", ' \
                         '"param": null, "code": "internal_error"}}'
    assert not any(FakeProvider.SECRET in e or "RuntimeError" in e for e in events)
    assert FakeProvider.SECRET in caplog.text and "Traceback" in caplog.text


def test_the_sdk_sees_the_generic_stream_error(fake_client):
    stream = fake_client.chat.completions.create(model=MODEL, stream=True,
                                                 messages=[{"role": "user", "content": "fail midway"}])
    with pytest.raises(openai.APIError) as e:
        list(stream)
    assert e.value.message == "internal server error" and FakeProvider.SECRET not in str(e.value)


def test_api_errors_keep_their_message(fake_client):
    with pytest.raises(openai.NotFoundError, match="no-such-model"):
        fake_client.chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "hi"}])


# --- message history as OpenAI's SDK sends it back ---------------------------------------------------


def test_history_fields_from_openai_messages_are_accepted(fake_client, fake_server):
    first = fake_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    sent_back = first.choices[0].message.model_dump()  # refusal, annotations, audio, function_call: None
    assert {"refusal", "audio", "function_call"} <= set(sent_back)
    history = [
        {"role": "system", "content": "Be brief.", "name": "setup"},
        {"role": "user", "content": "hello", "name": "ana"},
        sent_back,
        {"role": "assistant", "content": "Earlier.", "name": "bot", "refusal": None, "reasoning_content": None,
         "annotations": [{"type": "url_citation", "url_citation": {"url": "https://example.com", "title": "x",
                                                                   "start_index": 0, "end_index": 1}}],
         "audio": None, "function_call": None},
        {"role": "user", "content": "again"}]
    r = fake_client.chat.completions.create(model=MODEL, messages=history)
    assert r.choices[0].message.content == "again"
    got = fake_server.fake.requests[-1].messages
    assert got[1].name == "ana" and got[3].name == "bot" and got[3].annotations[0]["type"] == "url_citation"
    stored = fake_client.chat.completions.retrieve(r.id).model_extra["input_messages"]
    assert stored[1] == {"role": "user", "content": "hello", "name": "ana"}


@pytest.mark.parametrize("message, param, words", [
    ({"role": "assistant", "content": "x", "moods": ["happy"]}, "messages[0].moods", "unrecognized request field"),
    ({"role": "assistant", "content": "x", "refusal": "I won't."}, "messages[0]", "`refusal`"),
    ({"role": "user", "content": "x", "audio": {"id": "a1"}}, "messages[0]", "`audio`"),
    ({"role": "tool", "content": "x", "tool_call_id": "c", "name": "f"}, "messages[0]", "`name`"),
])
def test_bogus_history_fields_are_still_400s(fake_client, message, param, words):
    with pytest.raises(openai.BadRequestError) as e:
        fake_client.chat.completions.create(model=MODEL, messages=[message])
    assert _error(e)["param"] == param and words in _error(e)["message"]


# --- images: data: URLs only ---------------------------------------------------------------------


@pytest.mark.parametrize("url", ["/etc/passwd", "file:///etc/passwd", "~/.ssh/id_rsa", "https://example.com/cat.png",
                                 "http://169.254.169.254/latest/meta-data", "data:text/plain;base64,aGk=",
                                 "data:image/png,rawbytes"])
def test_image_urls_other_than_data_urls_are_refused(fake_client, fake_server, url):
    parts = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError) as e:
        fake_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    assert "only data: URLs are accepted" in _error(e)["message"]
    assert _error(e)["param"] == "messages[0].content[1].image_url.url"
    assert fake_server.fake.requests == []  # refused at the edge: no provider saw it


def test_a_data_url_image_reaches_the_provider(fake_client, fake_server):
    parts = [{"type": "text", "text": "what is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]
    fake_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": parts}])
    with pytest.raises(openai.BadRequestError, match="not valid base64"):
        fake_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,***"}}]}])
    assert len(fake_server.fake.requests) == 1


# --- list pages ----------------------------------------------------------------------------------


def test_list_routes_take_llama_stack_page_sizes(fake_client, fake_server):
    ids = []
    for k in range(3):
        fake_server.fake.completion_id = f"chatcmpl-{k}"
        ids.append(fake_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": str(k)}]).id)
    page = fake_client.chat.completions.list(limit=1000)
    assert [c.id for c in page.data] == ids[::-1] and not page.has_more
    assert [c.id for c in fake_client.chat.completions.list(limit=2, order="asc").data] == ids[:2]
    for bad in (0, 1001):
        with pytest.raises(openai.BadRequestError) as e:
            fake_client.chat.completions.list(limit=bad)
        assert _error(e)["param"] == "limit" and "1000" in _error(e)["message"]


# --- the store: a repeated id never replaces a row -------------------------------------------------


def test_repeated_provider_ids_never_replace_a_stored_completion(fake_client, fake_server):
    answers = {}
    for text in ("first", "second"):  # the fake answers both with id chatcmpl-fixed
        r = fake_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}])
        answers[r.id] = text
    stream = fake_client.chat.completions.create(model=MODEL, stream=True,
                                                 messages=[{"role": "user", "content": "third"}])
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1  # one id across the stream, even when it was rewritten
    answers[chunks[0].id] = "third"
    assert len(answers) == 3 and "chatcmpl-fixed" in answers  # the first keeps the provider's id
    for cid, text in answers.items():
        assert fake_client.chat.completions.retrieve(cid).choices[0].message.content == text
    assert len(fake_client.chat.completions.list(limit=10).data) == 3


def test_store_false_is_not_stored(fake_client):
    r = fake_client.chat.completions.create(model=MODEL, store=False, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        fake_client.chat.completions.retrieve(r.id)
