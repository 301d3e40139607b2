"""The request models: unknown fields and unhonourable values are refused, with the field named."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from corral import limits
from corral.engine.sampling import SamplingParams
from corral.stack.api import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from corral.stack.server import _validation_message

HI = [{"role": "user", "content": "hi"}]


def message_for(request_model, /, **body) -> tuple[str, str | None, str]:
    with pytest.raises(ValidationError) as e:
        request_model.model_validate(body)
    return _validation_message([{**err, "loc": ("body", *err["loc"])} for err in e.value.errors()])


def test_api_layer_has_no_torch():
    import subprocess
    import sys

    code = "import sys, corral.stack.api, corral.stack.config, corral.stack.store; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": HI, "mirostat": 1}, "mirostat"),
    ({"model": "m", "messages": [{"role": "user", "content": "hi", "weight": 2}]}, "messages[0].weight"),
    ({"model": "m", "messages": HI, "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "x": 1}}},
     "response_format.json_schema.x"),
    ({"model": "m", "messages": HI, "tools": [{"type": "function", "function": {"name": "f", "returns": {}}}]},
     "tools[0].function.returns"),
])
def test_unknown_fields_are_named(body, param):
    message, got, code = message_for(ChatCompletionRequest, **body)
    assert got == param and code == "unknown_field" and repr(param) in message


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": HI, "n": 0}, "n"),
    ({"model": "m", "messages": HI, "top_logprobs": 50}, "top_logprobs"),
    ({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"model": "m", "messages": HI, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"model": "m", "messages": HI, "response_format": {"type": "json_schema"}}, "response_format"),
    ({"model": "m", "messages": HI, "tool_choice": "sometimes"}, "tool_choice"),
])
def test_bad_values_name_the_field(body, param):
    message, got, code = message_for(ChatCompletionRequest, **body)
    assert got == param and message.startswith(param)


def test_values_we_cannot_honour():
    def problems(request_model, /, **body):
        return [f for f, _ in request_model.model_validate(body).unsupported()]

    assert problems(ChatCompletionRequest, model="m", messages=HI, logit_bias={"1": 2.0}) == ["logit_bias"]
    assert problems(ChatCompletionRequest, model="m", messages=HI, top_logprobs=2) == ["top_logprobs"]
    assert problems(ChatCompletionRequest, model="m", messages=HI, tool_choice="required") == ["tool_choice"]
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert problems(ChatCompletionRequest, model="m", messages=HI, tools=tools,
                    tool_choice={"type": "function", "function": {"name": "g"}}) == ["tool_choice"]
    assert problems(ChatCompletionRequest, model="m", messages=HI, tools=tools,
                    response_format={"type": "json_object"}) == ["response_format"]
    assert problems(CompletionRequest, model="m", prompt="x", suffix="y") == ["suffix"]
    assert problems(CompletionRequest, model="m", prompt="x", best_of=3) == ["best_of"]
    assert problems(CompletionRequest, model="m", prompt="x", echo=True, stream=True) == ["echo"]
    assert problems(ChatCompletionRequest, model="m", messages=HI, max_completion_tokens=5, tools=tools) == []


def test_embedding_request():
    assert EmbeddingRequest.model_validate({"model": "e", "input": ["a", "b"]}).encoding_format == "float"
    message, param, _ = message_for(EmbeddingRequest, model="e", input="a", encoding_format="int8")
    assert param == "encoding_format"


# request field -> (SamplingParams field, values on both sides of its bounds)
SAMPLING_FIELDS = {
    "temperature": ("temperature", [-0.01, 0, 2, 2.01, float("inf")]),
    "top_p": ("top_p", [0, 1e-6, 1, 1.01]),
    "top_k": ("top_k", [-1, 0, 50]),
    "min_p": ("min_p", [-0.1, 0, 1, 1.1]),
    "repetition_penalty": ("repetition_penalty", [0, 0.5, 3]),
    "frequency_penalty": ("frequency_penalty", [-2.01, -2, 2, 2.01]),
    "presence_penalty": ("presence_penalty", [-2.01, -2, 2, 2.01]),
    "seed": ("seed", [-(2**63) - 1, -(2**63), 2**64 - 1, 2**64]),
    "top_logprobs": ("logprobs", [-1, 0, 20, 21]),
}


@pytest.mark.parametrize("field", sorted(SAMPLING_FIELDS))
def test_request_bounds_are_the_engines(field):
    """The request models and SamplingParams.validate take the same values (both read corral.limits)."""
    engine_field, values = SAMPLING_FIELDS[field]
    for value in values:
        body = {"model": "m", "messages": HI, field: value, **({"logprobs": True} if field == "top_logprobs" else {})}
        try:
            ChatCompletionRequest.model_validate(body)
            api_ok = True
        except ValidationError:
            api_ok = False
        try:
            SamplingParams(**{engine_field: value}).validate()
            engine_ok = True
        except ValueError:
            engine_ok = False
        assert api_ok == engine_ok, (field, value, api_ok, engine_ok)
    # text completions' integer logprobs: the engine's range too (not OpenAI's old 0..5)
    top = CompletionRequest.model_validate({"model": "m", "prompt": "x", "logprobs": limits.LOGPROBS.hi})
    assert top.logprobs == 20
    message, param, _ = message_for(CompletionRequest, model="m", prompt="x", logprobs=limits.LOGPROBS.hi + 1)
    assert param == "logprobs"


def test_request_limits_and_stop_count():
    message, param, _ = message_for(ChatCompletionRequest, model="m", messages=HI, n=limits.N.hi + 1)
    assert param == "n" and str(limits.N.hi) in message
    message, param, _ = message_for(ChatCompletionRequest, model="m", messages=HI, max_tokens=0)
    assert param == "max_tokens"
    message, param, _ = message_for(ChatCompletionRequest, model="m", messages=HI, stop=["s"] * (limits.MAX_STOP + 1))
    assert param == "stop" and f"at most {limits.MAX_STOP}" in message
