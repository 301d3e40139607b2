"""Constrained decoding: whatever the logits say, the output parses and validates.

Random logits are the adversary (a real model would mostly follow the format anyway): every step
picks the argmax of seeded noise under the grammar's mask, on the real Llama 3 tokenizer (128K
tokens) and the real SmolLM2 tokenizer (from its GGUF). Results are checked with independent parsers:
`json` + pydantic for schemas, corral.tokenizer.tool_calls for tool calls.
"""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import BaseModel, Field

from corral.engine.constrained import (GrammarError, GrammarLogitsProcessor, json_object_grammar, json_schema_grammar,
                                       tool_call_grammar)
from corral.tokenizer.llama3 import Llama3Tokenizer
from corral.tokenizer.tool_calls import extract_tool_calls


@pytest.fixture(scope="module")
def llama3_tok(llama3_tokenizer_model):
    return Llama3Tokenizer(llama3_tokenizer_model)


@pytest.fixture(scope="module")
def smol_tok(smollm2_gguf):
    from corral.tokenizer.gguf import read_gguf_metadata, tokenizer_from_gguf

    return tokenizer_from_gguf(read_gguf_metadata(smollm2_gguf))


def run(processor: GrammarLogitsProcessor, tokenizer, seed: int, max_steps: int = 120) -> tuple[str, bool]:
    """Decode argmax(noise) under the mask; (text, ended on a stop token)."""
    gen = torch.Generator().manual_seed(seed)
    ids: list[int] = []
    for _ in range(max_steps):
        logits = processor(ids, torch.randn(tokenizer.vocab_size, generator=gen))
        token = int(torch.argmax(logits))
        assert torch.isfinite(logits[token]), "the mask allowed nothing"
        if token in tokenizer.stop_ids:
            return tokenizer.decode(ids), True
        ids.append(token)
    return tokenizer.decode(ids), False


class Order(BaseModel):
    item: str = Field(max_length=12)
    quantity: int = Field(ge=1, le=99)
    express: bool
    size: str = Field(json_schema_extra={"enum": ["S", "M", "L"]})
    tags: list[str] = Field(max_length=2, json_schema_extra={"items": {"type": "string", "maxLength": 5}})


@pytest.mark.parametrize("tok_name", ["llama3_tok", "smol_tok"])
def test_json_schema_output_always_validates(tok_name, request):
    tokenizer = request.getfixturevalue(tok_name)
    schema = {**Order.model_json_schema(), "additionalProperties": False}
    for seed in range(2):
        text, stopped = run(GrammarLogitsProcessor(json_schema_grammar(schema), tokenizer), tokenizer, seed)
        assert stopped, f"the grammar never completed: {text!r}"
        order = Order.model_validate_json(text)
        assert set(json.loads(text)) == set(Order.model_fields) and order.size in ("S", "M", "L")


def test_json_object(llama3_tok):
    grammar = json_object_grammar()
    for seed in range(2):
        text, stopped = run(GrammarLogitsProcessor(grammar, llama3_tok), llama3_tok, seed, max_steps=60)
        assert text.startswith("{")
        if stopped:
            assert isinstance(json.loads(text), dict)


WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 8}, "metric": {"type": "boolean"},
                                     "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "metric", "days"]}}}
NOARGS = {"type": "function", "function": {"name": "now"}}


@pytest.mark.parametrize("style, prefix, suffix", [("python_list", "", ""), ("json", "", ""),
                                                   ("generic", "<tool_call>", "</tool_call>")])
def test_tool_call_grammar_parses_in_the_model_format(llama3_tok, style, prefix, suffix):
    seen = set()
    for seed in range(4):
        grammar = tool_call_grammar([WEATHER, NOARGS], style, prefix=prefix, suffix=suffix)
        text, stopped = run(GrammarLogitsProcessor(grammar, llama3_tok), llama3_tok, seed)
        assert stopped and text.startswith(prefix or ("[" if style == "python_list" else "{")), text
        rest, calls = extract_tool_calls(text, tools=[WEATHER, NOARGS])
        assert len(calls) == 1 and rest == "", text
        call = calls[0]
        seen.add(call.name)
        if call.name == "get_weather":
            assert set(call.arguments) == {"city", "metric", "days"}, text
            assert isinstance(call.arguments["metric"], bool) and 1 <= call.arguments["days"] <= 7
            assert isinstance(call.arguments["city"], str) and len(call.arguments["city"]) <= 8
        else:
            assert call.name == "now" and call.arguments == {}
    assert seen  # at least one call parsed


SEARCH = {"type": "function", "function": {"name": "search", "parameters": {
    "type": "object", "properties": {"query": {"type": "string", "maxLength": 8},
                                     "limit": {"type": "integer", "minimum": 1, "maximum": 50},
                                     "exact": {"type": "boolean"}},
    "required": ["query"]}}}
ALL_OPTIONAL = {"type": "function", "function": {"name": "ping", "parameters": {  # no `required`: all optional
    "type": "object", "properties": {"host": {"type": "string", "maxLength": 8},
                                     "count": {"type": "integer", "minimum": 1, "maximum": 9}}}}}


def accepts(grammar: str, tokenizer, text: str) -> bool:
    """Whether `text` is a complete sentence of the grammar (fed as the tokenizer's own tokens)."""
    from corral.engine.constrained import compile_grammar

    matcher = compile_grammar(grammar, tokenizer)
    return bool(matcher.consume_tokens(tokenizer.encode(text))) and matcher.is_accepting()


@pytest.mark.parametrize("style, prefix, suffix, calls", [
    ("python_list", "", "", {
        '[search(query="a")]': True, '[search(query="a", limit=3)]': True, '[search(query="a", exact=False)]': True,
        '[search(query="a", limit=3, exact=True)]': True, '[search(limit=3)]': False, '[search()]': False,
        '[search(query="a", limit=3, query="b")]': False, '[search(query="a", colour=1)]': False,
        '[ping()]': True, '[ping(count=2)]': True, '[ping(host="h", count=2)]': True, '[ping(host="h")]': True}),
    ("json", "", "", {
        '{"name":"search","parameters":{"query":"a"}}': True,
        '{"name":"search","parameters":{"query":"a","limit":3}}': True,
        '{"name":"search","parameters":{"query":"a","limit":3,"exact":true}}': True,
        '{"name":"search","parameters":{"limit":3}}': False,
        '{"name":"ping","parameters":{}}': True, '{"name":"ping","parameters":{"count":2}}': True}),
    ("generic", "<tool_call>", "</tool_call>", {
        '<tool_call>{"name":"search","arguments":{"query":"a"}}</tool_call>': True,
        '<tool_call>{"name":"search","arguments":{"query":"a","exact":false}}</tool_call>': True,
        '<tool_call>{"name":"search","arguments":{}}</tool_call>': False,
        '<tool_call>{"name":"ping","arguments":{}}</tool_call>': True,
        '<tool_call>{"name":"ping","arguments":{"host":"h","count":2}}</tool_call>': True}),
])
def test_optional_arguments_may_be_given_or_left_out(llama3_tok, style, prefix, suffix, calls):
    """Properties not in `required` (all of them when there is no `required`) are optional, in every style."""
    grammar = tool_call_grammar([SEARCH, ALL_OPTIONAL], style, prefix=prefix, suffix=suffix)
    assert {text: accepts(grammar, llama3_tok, text) for text in calls} == calls
    for seed in range(4):  # whatever is generated is one call with the required arguments and known ones only
        text, stopped = run(GrammarLogitsProcessor(grammar, llama3_tok), llama3_tok, seed)
        rest, parsed = extract_tool_calls(text, tools=[SEARCH, ALL_OPTIONAL])
        assert stopped and rest == "" and len(parsed) == 1, text
        props = (SEARCH if parsed[0].name == "search" else ALL_OPTIONAL)["function"]["parameters"]["properties"]
        assert set(parsed[0].arguments) <= set(props), text
        assert parsed[0].name == "ping" or "query" in parsed[0].arguments, text


def test_optional_call_allows_text_that_cannot_be_read_as_a_call(llama3_tok):
    """tool_choice auto with strict tools: free text, or a call that follows the schema."""
    grammar = tool_call_grammar([WEATHER, NOARGS], "generic", prefix="<tool_call>", suffix="</tool_call>",
                                optional=True)

    def allowed(text: str, nxt: str) -> bool:
        proc = GrammarLogitsProcessor(grammar, llama3_tok)
        return bool(torch.isfinite(proc(llama3_tok.encode(text), torch.zeros(llama3_tok.vocab_size))
                                   [llama3_tok.encode(nxt)[0]]))

    assert allowed("", "Sure") and allowed("Sure, the", " weather")
    assert not allowed("Hello <tool_call", ">")  # no call smuggled into the text
    assert not allowed("get_weather", "(") and not allowed("", " ")  # nor a bare call, nor leading space
    assert allowed("<tool_call>", '{"') and not allowed('<tool_call>{"name":"get_weather","arguments":{"', "x")
    for seed in range(3):  # whatever is generated parses as text or as one valid call
        text, stopped = run(GrammarLogitsProcessor(grammar, llama3_tok), llama3_tok, seed, max_steps=40)
        rest, calls = extract_tool_calls(text, tools=[WEATHER, NOARGS])
        assert calls == [] and rest == text or len(calls) == 1


def test_special_tokens_only_when_done(llama3_tok):
    proc = GrammarLogitsProcessor(json_schema_grammar({"type": "object", "properties": {"a": {"const": 1}},
                                                        "required": ["a"], "additionalProperties": False}), llama3_tok)
    ids = llama3_tok.encode('{"a":1')
    allowed = torch.isfinite(proc(ids, torch.zeros(llama3_tok.vocab_size)))
    assert not allowed[sorted(llama3_tok.stop_ids)].any() and allowed[llama3_tok.encode("}")[0]]
    ids += llama3_tok.encode("}")
    allowed = torch.isfinite(proc(ids, torch.zeros(llama3_tok.vocab_size)))
    assert set(allowed.nonzero().flatten().tolist()) == set(llama3_tok.stop_ids)  # complete: only stop
    assert proc.done


def test_a_rejected_token_is_an_error(llama3_tok):
    proc = GrammarLogitsProcessor(json_object_grammar(), llama3_tok)
    with pytest.raises(RuntimeError, match="rejected"):
        proc(llama3_tok.encode("hello"), torch.zeros(llama3_tok.vocab_size))


@pytest.mark.parametrize("schema, why", [
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, "missing"),
    ({"type": "strnig"}, "strnig"),
    ({"type": "string", "pattern": "(unclosed"}, "unclosed"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),  # a keyword it cannot enforce: refused, not ignored
])
def test_uncompilable_schema_is_an_error(llama3_tok, schema, why):
    with pytest.raises(GrammarError, match=why):
        GrammarLogitsProcessor(json_schema_grammar(schema), llama3_tok)


def test_bad_tool_definitions(llama3_tok):
    with pytest.raises(GrammarError, match="no tools"):
        tool_call_grammar([], "json")
    with pytest.raises(GrammarError, match="style"):
        tool_call_grammar([NOARGS], "xml")
