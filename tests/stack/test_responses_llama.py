"""Responses on a tiny Llama-3.2-shaped checkpoint (random weights, the real Llama 3 tokenizer): the formats that
only Llama models have. Its tool calls use Llama 3.2's pythonic list (`[get_weather(city="...")]`), its
code_interpreter is the `<|python_tag|>` builtin and tool results go back as `ipython` turns.

The reference is the Python API on the same checkpoint: the prompt a response was made from must be, token for
token, what `LLM.encode_chat` gives for the same conversation (so the lengths in `usage` must match).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import openai
import pytest

from tests.checkpoints import tiny
from tests.stack.agents.sdk import validated
from tests.stack.conftest import ServerProcess

LLAMA3_VOCAB = 128256
WEATHER = {"type": "function", "name": "get_weather", "description": "Get the weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
                          "required": ["city"]}}


def chat_tool(tool: dict) -> dict:
    return {"type": "function", "function": {k: tool[k] for k in ("name", "description", "parameters")}}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    config = tiny.hf_config(factor=32.0)
    config.vocab_size, config.bos_token_id, config.eos_token_id = LLAMA3_VOCAB, 128000, [128001, 128008, 128009]
    directory = tmp_path_factory.mktemp("llama32") / "meta"
    tiny.save_meta_shards(tiny.meta_state_dict(tiny.hf_model(config=config, seed=3)), directory)
    (directory / "params.json").write_text(json.dumps({**tiny.params_json(), "vocab_size": LLAMA3_VOCAB}))
    spec = importlib.util.find_spec("llama_models")
    shutil.copy(Path(spec.origin).parent / "llama3" / "tokenizer.model", directory / "tokenizer.model")
    return directory


@pytest.fixture(scope="module")
def llm(checkpoint):
    from corral.api import LLM

    return LLM.load(checkpoint, kv_cache_mb=64)


@pytest.fixture(scope="module")
def llama_client(checkpoint, tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("llama32-server"), {
        "providers": [{"provider_id": "corral", "provider_type": "inline::corral"}],
        "models": [{"model_id": "tiny-llama", "provider_id": "corral", "checkpoint": str(checkpoint),
                    "kv_cache_mb": 64, "context_length": 2048}]})
    server.start()
    yield openai.OpenAI(base_url=server.base_url, api_key="none", max_retries=0, timeout=300)
    server.stop()


def test_a_function_call_in_the_pythonic_format(llama_client, llm):
    assert llm.config.chat_format == "llama3" and llm.config.tool_format == "python_list"
    question = [{"role": "user", "content": "What is the weather in Paris?"}]
    r = validated(llama_client.responses.create(model="tiny-llama", input=question[0]["content"], tools=[WEATHER],
                                                tool_choice={"type": "function", "name": "get_weather"},
                                                max_output_tokens=40, temperature=0))
    assert [o.type for o in r.output] == ["function_call"]
    args = json.loads(r.output[0].arguments)
    assert set(args) == {"city"} and len(args["city"]) <= 12
    prompt = llm.encode_chat(question, tools=[chat_tool(WEATHER)],
                             tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert r.usage.input_tokens == len(prompt)  # the Llama 3.2 pythonic tool prompt, token for token
    assert "[func_name1(params_name1=params_value1" in llm.tokenizer.decode(prompt)

    # The call and its result go back as Llama 3.2 renders them: the pythonic call, then an ipython turn.
    out = '{"sky": "sunny"}'
    answer = validated(llama_client.responses.create(
        model="tiny-llama", previous_response_id=r.id, tools=[WEATHER], tool_choice="none", max_output_tokens=3,
        temperature=0, input=[{"type": "function_call_output", "call_id": r.output[0].call_id, "output": out}]))
    history = question + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": r.output[0].call_id, "type": "function",
         "function": {"name": "get_weather", "arguments": r.output[0].arguments}}]},
        {"role": "tool", "tool_call_id": r.output[0].call_id, "content": out}]
    expected = llm.encode_chat(history)
    assert answer.usage.input_tokens == len(expected)
    text = llm.tokenizer.decode(expected)
    assert f'[get_weather(city="{args["city"]}")]' in text and "<|start_header_id|>ipython<|end_header_id|>" in text


def test_code_interpreter_history_uses_the_python_tag_builtin(llama_client, llm):
    given = [{"role": "user", "content": "Compute 6*7"},
             {"type": "code_interpreter_call", "id": "ci_1", "code": "print(6*7)", "container_id": "sandbox",
              "status": "completed", "outputs": [{"type": "logs", "logs": "42\n"}]}]
    r = validated(llama_client.responses.create(model="tiny-llama", input=given, max_output_tokens=2, temperature=0))
    expected = llm.encode_chat([
        {"role": "user", "content": "Compute 6*7"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "ci_1", "type": "function", "function": {"name": "code_interpreter", "arguments": '{"code": "print(6*7)"}'}}]},
        {"role": "tool", "tool_call_id": "ci_1", "content": "42\n"}])
    assert r.usage.input_tokens == len(expected)
    text = llm.tokenizer.decode(expected)
    assert "<|python_tag|>print(6*7)<|eom_id|>" in text or "<|python_tag|>print(6*7)<|eot_id|>" in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n42\n<|eot_id|>" in text
