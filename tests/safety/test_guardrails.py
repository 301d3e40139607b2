"""guard_chat's rules with a keyword guardrail (no model): what is checked, when chunks are released, and what
a refusal looks like, for plain and streamed answers."""

from __future__ import annotations

import asyncio

from corral.safety.guardrails import SafetyViolation, check_all, guard_chat
from corral.safety.moderation import REFUSAL
from corral.safety.prompt import conversation


class Keyword:
    """Flags the judged message (the last user/assistant turn) when it contains `word`; records each check."""

    def __init__(self, word: str):
        self.word, self.seen = word, []

    async def check(self, messages, phase):
        judged = conversation(messages)[-1][1]
        self.seen.append((phase, judged))
        return SafetyViolation(metadata={"violation_type": "S1"}) if self.word in judged else None


def chunk(text=None, finish=None, calls=None):
    delta = {}
    if text is not None:
        delta["content"] = text
    if calls is not None:
        delta["tool_calls"] = calls
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}


async def collect(stream):
    return [c async for c in stream]


def run_stream(guard, pieces, buffer="sentence", log=None):
    async def provider():
        for piece in pieces:
            if log is not None:
                log.append(("produced", piece))
            yield chunk(piece)
        yield chunk(finish="stop")

    async def call():
        return provider()

    async def main():
        out = []
        stream = await guard_chat([guard], [{"role": "user", "content": "hi"}], call, model="m", stream=True,
                                  buffer=buffer)
        async for c in stream:
            if log is not None:
                log.append(("sent", c["choices"][0]["delta"].get("content")))
            out.append(c)
        return out

    return asyncio.run(main())


def texts(chunks):
    return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)


def test_sentences_are_released_only_after_their_check():
    guard, log = Keyword("BAD"), []
    out = run_stream(guard, ["Hello", " there.", " How", " are you?", " Fine"], log=log)
    assert texts(out) == "Hello there. How are you? Fine" and out[-1]["choices"][0]["finish_reason"] == "stop"
    # A sentence ends at ". " (the space shows it is not "3.14"): the answer so far is checked when a chunk
    # completes a sentence end, then at the end if anything came after the last check.
    assert guard.seen == [("input", "hi"), ("output", "Hello there. How"), ("output", "Hello there. How are you? Fine")]
    # nothing was sent before the check that covers it
    assert log.index(("sent", "Hello")) > log.index(("produced", " How"))
    assert log.index(("sent", " are you?")) > log.index(("produced", " Fine"))


def test_a_violation_mid_stream_stops_it_with_the_refusal():
    guard = Keyword("BAD")
    out = run_stream(guard, ["Fine. ", "Then BAD", " things.", " More."])
    assert texts(out) == "Fine. \n\n" + REFUSAL  # the checked first sentence went out, nothing after it
    assert out[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert out[-1]["metadata"]["safety_phase"] == "output" and out[-1]["metadata"]["safety_violation_type"] == "S1"


def test_end_buffering_sends_all_or_only_the_refusal():
    assert texts(run_stream(Keyword("BAD"), ["One.", " Two."], buffer="end")) == "One. Two."
    assert texts(run_stream(Keyword("BAD"), ["One.", " BAD."], buffer="end")) == REFUSAL


def test_input_violation_and_plain_answers():
    async def call():
        raise AssertionError("the model must not run on a refused input")

    async def main():
        guard = Keyword("BAD")
        refused = await guard_chat([guard], [{"role": "user", "content": "BAD idea"}], call, model="m", stream=False)
        assert refused["choices"][0] == {"index": 0, "message": {"role": "assistant", "content": REFUSAL},
                                         "finish_reason": "content_filter", "logprobs": None}
        assert refused["metadata"]["safety_phase"] == "input"
        streamed = await collect(await guard_chat([guard], [{"role": "user", "content": "BAD"}], call, model="m",
                                                  stream=True))
        assert texts(streamed) == REFUSAL

        async def answer():  # a tool call is judged too
            return {"id": "x", "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
                "role": "assistant", "content": None,
                "tool_calls": [{"id": "1", "type": "function",
                                "function": {"name": "f", "arguments": '{"a": "BAD"}'}}]}}]}

        out = await guard_chat([guard], [{"role": "user", "content": "ok"}], answer, model="m", stream=False)
        assert out["choices"][0]["message"] == {"role": "assistant", "content": REFUSAL}
        assert guard.seen[-1] == ("output", 'f({"a": "BAD"})')
        # input-only guardrails leave the answer alone
        out = await guard_chat([guard], [{"role": "user", "content": "ok"}], answer, model="m", stream=False,
                               phases=("input",))
        assert out["choices"][0]["finish_reason"] == "tool_calls"
        assert await check_all([Keyword("x"), guard], [{"role": "user", "content": "BAD"}], "input") is not None

    asyncio.run(main())
