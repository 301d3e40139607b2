"""Tool-call writing and parsing: Meta's test_tool_utils cases, parity with Meta's decoder, and robustness."""

import json

import pytest
from llama_models.datatypes import StopReason, ToolCall as MetaToolCall, ToolPromptFormat
from llama_models.llama3.tool_utils import ToolUtils, is_valid_python_list as meta_is_valid_python_list
from llama_models.llama3.tool_utils import parse_python_list_for_function_calls

from corral.tokenizer.chat import Llama3ChatFormat
from corral.tokenizer.tool_calls import encode_tool_call, extract_tool_calls, is_valid_python_list, parse_python_list
from tests.tokenizer.corpus import corpus

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}

# Meta's TestPythonListCheck / TestParsePythonList inputs (spec §8.1)
PYTHON_LISTS = [
    '[get_boiling_point(liquid_name="water", celcius=True)]',
    '[get_boiling_point(liquid_name="water", celcius=True), get_melting_point(substance="ice", kelvin=False)]',
    "[]",
    '[get_boiling_point(liquid_name="water"), 42]',
    '[get_boiling_point("water", True)]',
    '[[get_boiling_point(liquid_name="water")]]',
    '{"func": get_boiling_point(liquid_name="water")}',
    '[get_boiling_point(liquid_name="water", celcius=True',
    '[get_boiling_point(liquid_name="water", celcius=True, precise=False)]',
    "[calculate_volume(radius=5.2, height=10)]",
    'get_boiling_point(liquid_name="water")',
    '[(get_boiling_point(liquid_name="water"),)]',
    '[process_data(name="sample", value=42, active=True, ratio=3.14)]',
    "[initialize()]",
    '[analyze_text(content="Hello, world!", language="en")]',
    '[get_boiling_point(liquid={"name":"water", "color":"translucent"}), '
    'convert_temperature(value=[100, 101], from_unit="C", to_unit="F")]',
    "[f(**kwargs)]", "[a.b(c=1)]", "x = [f(a=1)]", "[f(a=1)]; [g(b=2)]",
]

# Model outputs on which Meta's decode_assistant_message_from_content finds a call or plain text (spec §8.2 item 3).
META_OUTPUTS = [
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    '[get_weather(city="SF", metric="celsius")]<|eot_id|>',
    '{"type": "function", "name": "f", "parameters": {"a": 1}}',
    "<|python_tag|>print(1)<|eom_id|>",
    "The weather is nice today.",
    "The weather is nice today.<|eot_id|>",
    '<function=getWeather>{"location":"New York","date":"2023-08-05"}',
    '<|python_tag|>{"type": "function", "name": "trending_songs", "parameters": {"n": "10", "genre": "all"}}<|eom_id|>',
    '<function=trending_songs>{"n": 10}</function><|eot_id|>',
    '<|python_tag|>wolfram_alpha.call(query="solve x^2 = 4")<|eom_id|>',
    '[get_boiling_point(liquid_name="water", celcius=True), get_melting_point(substance="ice", kelvin=False)]',
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello there<|eot_id|>",
    '{"name": "brave_search", "parameters": {"q": "llama"}}',
    "  [initialize()]  ",
    "<|python_tag|>import math\nprint(math.pi)<|eom_id|>",
    'Sure, let me look. brave_search.call(query="weather in Paris")',
    "Use [brackets] like this.",
    '[get_boiling_point("water", True)]',
    '{"a": 1}',
]


def _meta(meta_chat_format, text):
    msg = meta_chat_format.decode_assistant_message_from_content(text, StopReason.end_of_turn)
    calls = [(c.tool_name.value if hasattr(c.tool_name, "value") else c.tool_name, c.arguments) for c in msg.tool_calls]
    return msg.content, calls, msg.stop_reason.value


@pytest.mark.parametrize("text", PYTHON_LISTS)
def test_python_list_rules_match_meta(text):
    try:
        meta = parse_python_list_for_function_calls(text) if meta_is_valid_python_list(text) else None
    except ValueError:  # Meta calls `[f(**kwargs)]` valid, then fails to parse it: we call it invalid
        meta = None
    assert is_valid_python_list(text) == (meta is not None)
    if meta is not None:
        assert parse_python_list(text) == meta
    else:
        with pytest.raises(ValueError):
            parse_python_list(text)


def test_meta_test_tool_utils_custom_call():
    text = '<function=getWeather>{"location":"New York","date":"2023-08-05"}'
    assert ToolUtils.maybe_extract_custom_tool_call(text) == ("getWeather", {"location": "New York", "date": "2023-08-05"})
    content, calls = extract_tool_calls(text)
    assert content == "" and [(c.name, c.arguments) for c in calls] == [
        ("getWeather", {"location": "New York", "date": "2023-08-05"})]


@pytest.mark.parametrize("text", META_OUTPUTS)
def test_decoding_matches_meta(text, meta_chat_format, llama3_tokenizer):
    """Same first tool call (name, arguments) and stop reason as Meta; same content when Meta finds no call."""
    meta_content, meta_calls, meta_stop = _meta(meta_chat_format, text)
    msg = Llama3ChatFormat(llama3_tokenizer).parse_response(text)
    ours = [(c.name, c.arguments) for c in msg.tool_calls]
    assert msg.stop_reason == meta_stop
    if meta_calls:
        assert ours[:1] == meta_calls
    else:
        assert ours == [] and msg.content == meta_content


def test_spec_8_2_item_3(llama3_tokenizer):
    cf = Llama3ChatFormat(llama3_tokenizer)
    m = cf.parse_response('<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>')
    assert [(c.name, c.arguments) for c in m.tool_calls] == [("brave_search", {"query": "latest price of 1oz gold"})]
    assert m.stop_reason == "end_of_message" and m.content == ""
    m = cf.parse_response('<|python_tag|>print(1)<|eom_id|>')
    assert [(c.name, c.arguments) for c in m.tool_calls] == [("code_interpreter", {"code": "print(1)"})]
    m = cf.parse_response("Just text, no tools.")
    assert m.tool_calls == [] and m.content == "Just text, no tools." and m.stop_reason == "end_of_turn"


def _calls(text, **kw):
    content, calls = extract_tool_calls(text, **kw)
    return content, [(c.name, c.arguments) for c in calls]


def test_all_calls_of_a_python_list():
    assert _calls('[get_weather(city="SF"), get_time(tz="PST"), get_weather(city="NYC", metric=\'f\')]') == (
        "", [("get_weather", {"city": "SF"}), ("get_time", {"tz": "PST"}),
             ("get_weather", {"city": "NYC", "metric": "f"})])


def test_mixed_and_robust_forms(llama3_tokenizer):
    cf = Llama3ChatFormat(llama3_tokenizer)
    # pythonic list after <|python_tag|> is a custom call, not code
    m = cf.parse_response('<|python_tag|>[get_weather(city="San Francisco", metric="celsius")]<|eot_id|>')
    assert [(c.name, c.arguments) for c in m.tool_calls] == [("get_weather", {"city": "San Francisco",
                                                                               "metric": "celsius"})]
    # JSON list with "arguments" (object or JSON string), OpenAI nesting, ';'-separated objects
    assert _calls('[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": "{\\"y\\": [1, 2]}"}]')[1] == [
        ("a", {"x": 1}), ("b", {"y": [1, 2]})]
    assert _calls('{"type": "function", "function": {"name": "f", "arguments": "{}"}}')[1] == [("f", {})]
    assert _calls('{"name": "a", "parameters": {}}; {"name": "b", "parameters": {"k": null}}')[1] == [
        ("a", {}), ("b", {"k": None})]
    # several lists, one per line
    assert _calls('[get_weather(city="SF")]\n[get_time(tz="PST")]')[1] == [("get_weather", {"city": "SF"}),
                                                                          ("get_time", {"tz": "PST"})]
    # trailing text is kept as content
    assert _calls('[get_weather(city="SF")] Let me know if you need more.') == (
        "Let me know if you need more.", [("get_weather", {"city": "SF"})])
    assert _calls('{"name": "f", "parameters": {"a": 1}}\nDone.') == ("Done.", [("f", {"a": 1})])
    # JSON literals inside a pythonic list, nested function tags, several function tags
    assert _calls("[f(a=true, b=null, c=[1, {'k': false}])]")[1] == [("f", {"a": True, "b": None,
                                                                          "c": [1, {"k": False}]})]
    assert _calls('<function=f>{"a": {"b": [1, 2]}}</function><function=g>{"c": "}"}</function>')[1] == [
        ("f", {"a": {"b": [1, 2]}}), ("g", {"c": "}"})]
    # <tool_call> blocks (closing tag optional at the end)
    assert _calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n<tool_call>{"name": "g", '
                  '"arguments": {}}') == ("", [("f", {"a": 1}), ("g", {})])
    # builtin with single quotes, and a builtin named in JSON form
    assert _calls("brave_search.call(query='llama 3.2')")[1] == [("brave_search", {"query": "llama 3.2"})]
    assert _calls('{"name": "wolfram_alpha", "parameters": {"input": "2+2"}}')[1] == [("wolfram_alpha",
                                                                                        {"query": "2+2"})]
    # code that merely uses some .call(...) stays code
    code = 'resp = api.call(url="x")\nprint(resp)'
    assert _calls(code, python_tag=True)[1] == [("code_interpreter", {"code": code})]


@pytest.mark.parametrize("text", [
    '[get_weather(city="SF"',                       # unclosed list
    '[get_weather(city="SF")',                      # unclosed list, closed call
    '{"name": "f", "parameters": {"a": 1}',         # bad JSON
    '{"name": "Bob", "age": 3}',                    # data, not a call
    "Use [brackets] like this.", "[1, 2, 3]", "[]", "[f(1, 2)]", "[f(a=x)]", "[f(a=1)", "f(a=1)",
    "<function=f>not json</function>", "<function=f>{'a': }</function>", "<tool_call>{bad}</tool_call>",
    "brave_search.call(query=", "[" * 5000 + "]" * 5000, "{" * 5000, "([{" * 3000,
    "The answer is [x] or {y} or (z).",
])
def test_malformed_output_is_plain_text(text):
    content, calls = _calls(text)
    assert calls == [] and content == text


def test_tools_filter():
    text = '[get_weather(city="SF"), launch_missiles(target="moon")]'
    assert _calls(text, tools=[WEATHER]) == ("", [("get_weather", {"city": "SF"})])
    assert _calls('[launch_missiles(target="moon")]', tools=[WEATHER, TIME]) == (
        '[launch_missiles(target="moon")]', [])
    assert _calls('<|python_tag|>print(1)', tools=[WEATHER]) == ("<|python_tag|>print(1)", [])  # tag kept as text
    assert _calls("print(1)", python_tag=True, tools=[{"type": "code_interpreter"}])[1] == [
        ("code_interpreter", {"code": "print(1)"})]
    # a bare call without list brackets counts only for a declared tool
    assert _calls('get_weather(city="SF")', tools=[WEATHER]) == ("", [("get_weather", {"city": "SF"})])
    assert _calls('get_weather(city="SF")') == ('get_weather(city="SF")', [])
    assert _calls('print(x="SF")', tools=[WEATHER]) == ('print(x="SF")', [])


def test_parsing_never_raises():
    for s in corpus(600, seed=5):
        for text in (s, "[" + s, "<|python_tag|>" + s, "<function=f>" + s, "{" + s, "<tool_call>" + s):
            content, calls = extract_tool_calls(text)
            assert isinstance(content, str)


def test_openai_shape():
    _, calls = extract_tool_calls('[get_weather(city="Zürich")]')
    d = calls[0].to_openai()
    assert d["type"] == "function" and d["function"]["name"] == "get_weather"
    assert json.loads(d["function"]["arguments"]) == {"city": "Zürich"} and d["id"].startswith("call_")


@pytest.mark.parametrize("fmt", ["json", "function_tag", "python_list"])
@pytest.mark.parametrize("name,args", [
    ("get_weather", {"city": "San Francisco", "metric": "celsius"}),
    ("f", {"n": 1, "x": 2.5, "b": True, "none": None, "l": [1, "a", False], "d": {"k": "v"}}),
    ("brave_search", {"query": "latest news"}), ("wolfram_alpha", {"query": "2+2"}), ("photogen", {"query": "cat"}),
    ("code_interpreter", {"code": "import os\nprint(os.getcwd())"}),
])
def test_encode_tool_call_matches_meta(fmt, name, args):
    meta = ToolUtils.encode_tool_call(MetaToolCall(call_id="1", tool_name=name, arguments=args), ToolPromptFormat(fmt))
    assert encode_tool_call(name, args, fmt) == meta


def test_encoded_calls_parse_back():
    args = {"city": "San Francisco", "n": 3, "ok": True, "tags": ["a", "b"]}
    for fmt in ("json", "function_tag", "python_list"):
        _, calls = _calls(encode_tool_call("get_weather", args, fmt))
        assert calls == [("get_weather", args)], fmt
