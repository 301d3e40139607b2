"""Streamed tool-call parsing (`chat_format.tool_call_streamer`): the events of a reply cut any way equal
`parse_response` of the whole text, in every chat format; content comes out as soon as it cannot be a call."""

import json
import random

import pytest

from corral.tokenizer.chat import JinjaChatFormat, Llama3ChatFormat, template_tool_syntaxes
from corral.tokenizer.tool_stream import ToolStreamEvent

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}
SEARCH = {"type": "function", "function": {"name": "brave_search", "parameters": {"type": "object"}}}

# Templates that render `tools` and name their syntax (cut down from Hermes-style and Llama 3.1's HF templates).
HERMES_TEMPLATE = ("{% if tools %}<|im_start|>system\nCall tools as <tool_call>{\"name\": ..., \"arguments\": ...}"
                   "</tool_call><|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n"
                   "{{ m.content }}<|im_end|>\n{% endfor %}<|im_start|>assistant\n")
LLAMA31_TEMPLATE = ("{{ bos_token }}{% if tools %}Respond in the format {\"name\": function name, \"parameters\": "
                    "dictionary of argument name and its value}, or <|python_tag|> for builtins.{% endif %}"
                    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}"
                    "<|eot_id|>{% endfor %}<|start_header_id|>assistant<|end_header_id|>\n\n")

REPLIES = [
    # Llama 3.2 pythonic lists
    '[get_weather(city="SF", metric="celsius")]',
    '[get_weather(city="SF"), get_time(tz="PST")]<|eot_id|>',
    '  [get_weather(city="SF")]\n[get_time(tz="PST")] Anything else?',
    "[get_weather(city='it\\'s', n=[1, {'k': true}])]",
    # Llama 3.1 JSON
    '{"name": "get_weather", "parameters": {"city": "SF"}}',
    '{"type": "function", "name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", '
    '"parameters": {}}\nDone.',
    '[{"name": "get_weather", "arguments": {"city": "SF"}}, {"name": "get_time", "arguments": "{}"}]',
    # <|python_tag|> builtins and code
    '<|python_tag|>brave_search.call(query="latest price of 1oz gold")<|eom_id|>',
    "<|python_tag|>import math\nprint(math.pi)<|eom_id|>",
    '<|python_tag|>[get_weather(city="SF")]<|eot_id|>',
    '<|python_tag|>{"type": "function", "name": "get_time", "parameters": {"tz": "UTC"}}<|eom_id|>',
    '<|start_header_id|>assistant<|end_header_id|>\n\n<|python_tag|>wolfram_alpha.call(query="2+2")<|eom_id|>',
    # tags, anywhere
    'Let me check. <function=get_weather>{"city": "SF"}</function> One moment.',
    "<function=get_weather>{'city': 'SF'}",
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
    'Sure! <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>\n<tool_call>{"name": '
    '"get_time", "arguments": {}}</tool_call><|im_end|>',
    '<tool_call>{"name": "get_time", "arguments": {}}',
    "<tool_call>[get_weather(city='Rome')]</tool_call>",
    'Sure, let me look. brave_search.call(query="weather in Paris")',
    'brave_search.call(query="x") and api.call(url="y") then news.call(query="z").',
    'get_weather(city="SF")',
    'get_weather(city="SF") is how I would call it.',
    # content before a call that only counts at the start; text that looks like a call but is not one
    'Checking.\n\n[get_weather(city="SF")]',
    "[1, 2, 3] are numbers.",
    '{"answer": 42, "name": "Bob"}',
    "[Note] this list isn't a call.",
    "{curly} text",
    "Use [brackets] like <this>, <function=oops> and <tool_call> here.",
    "<tool_call>{bad json}</tool_call> after <function=get_time>{}</function>",
    '[get_weather(city="SF"',
    '{"name": "get_weather", "parameters": {"city": "SF"}',
    "<function=get_weather>not json</function>",
    '<function=launch_missiles>{"target": "moon"}</function>',
    '[launch_missiles(target="moon"), get_weather(city="SF")]',
    # plain replies, end tokens, whitespace
    "The answer is 4.<|eot_id|>",
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello there<|eot_id|>",
    "It is sunny. 🌞 天气晴朗 <|im_end|>",
    "   spaced out   \n",
    "",
    "text <|eot_id|> middle<|eot_id|>  ",
    "<|eom_id|>",
    "a < b and c <| d",
]


@pytest.fixture(scope="module")
def formats(llama3_tokenizer, smollm2_tokenizer):
    return {
        "llama3.2": Llama3ChatFormat(llama3_tokenizer, "python_list"),
        "llama3.1": Llama3ChatFormat(llama3_tokenizer, "json"),
        "smollm2": JinjaChatFormat(smollm2_tokenizer, smollm2_tokenizer.chat_template),  # generic <tool_call>
        "hermes": JinjaChatFormat(smollm2_tokenizer, HERMES_TEMPLATE),
        "llama3.1-jinja": JinjaChatFormat(llama3_tokenizer, LLAMA31_TEMPLATE),
    }


def stream(cf, pieces, tools=None):
    streamer = cf.tool_call_streamer(tools)
    events = [e for p in pieces for e in streamer.push(p)] + streamer.finish()
    return events, streamer.message


def check_events(events: list[ToolStreamEvent], message, expected, where):
    content = "".join(e.text for e in events if e.kind == "content")
    calls = [e for e in events if e.kind == "tool_call"]
    assert content == (expected.content or ""), where
    expected_calls = [(c.name, c.arguments) for c in expected.tool_calls]
    assert [(e.name, json.loads(e.arguments)) for e in calls] == expected_calls, where
    assert [e.index for e in calls] == list(range(len(calls))), where
    assert all(e.id.startswith("call_") for e in calls) and len({e.id for e in calls}) == len(calls), where
    # the streamer's own message is what parse_response gives, with the events' ids
    assert message.content == expected.content and message.stop_reason == expected.stop_reason, where
    assert [(c.id, c.name, c.arguments) for c in message.tool_calls] == \
        [(e.id, e.name, json.loads(e.arguments)) for e in calls], where


def cuts(text: str, seed: int):
    """The ways a reply is cut into deltas: whole, one character at a time, every cut in two, random cuts."""
    yield [text]
    yield list(text)
    for i in range(1, len(text)):
        yield [text[:i], text[i:]]
    rng = random.Random(seed)
    for _ in range(10):
        points = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6)))) if len(text) > 1 else []
        bounds = [0, *points, len(text)]
        yield [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("tools", [None, [WEATHER, TIME, SEARCH], [WEATHER], []], ids=["any", "3", "1", "none"])
@pytest.mark.parametrize("name", ["llama3.2", "llama3.1", "smollm2", "hermes", "llama3.1-jinja"])
def test_streamed_equals_whole(formats, name, tools):
    cf = formats[name]
    for k, text in enumerate(REPLIES):
        expected = cf.parse_response(text, tools=tools)
        for pieces in cuts(text, seed=k):
            events, message = stream(cf, pieces, tools)
            check_events(events, message, expected, f"{name} {text!r} cut as {pieces!r}")


def test_token_by_token(formats, llama3_tokenizer):
    """Deltas as the engine sends them: the decoded text of each token."""
    for name in ("llama3.2", "llama3.1-jinja"):
        cf = formats[name]
        for text in REPLIES:
            ids = llama3_tokenizer.encode(text, allow_special=True)
            pieces = [llama3_tokenizer.token_bytes(i).decode("utf-8", errors="ignore") for i in ids]
            if "".join(pieces) != text:  # a character split across tokens: covered by the cuts above
                continue
            events, message = stream(cf, pieces, [WEATHER, TIME])
            check_events(events, message, cf.parse_response(text, tools=[WEATHER, TIME]), f"{name} {text!r}")


def released(cf, pieces, tools=None) -> list[str]:
    """The content released after each push (before finish)."""
    streamer = cf.tool_call_streamer(tools)
    return ["".join(e.text for e in streamer.push(p) if e.kind == "content") for p in pieces]


def test_content_released_early(formats):
    llama, generic, hermes = formats["llama3.2"], formats["smollm2"], formats["hermes"]
    # a format that never writes [ or { releases them at once; Llama 3 waits until they cannot open a call
    assert released(generic, ["[", "get_weather(", 'city="SF")]']) == ["[", "get_weather(", 'city="SF")]']
    assert released(generic, ["{", '"name": "f"', "}"]) == ["{", '"name": "f"', "}"]
    assert released(hermes, ["{", '"a"']) == ["{", '"a"']
    assert released(llama, ["[", "1, 2] x"], tools=[WEATHER]) == ["", "[1, 2] x"]
    assert released(llama, ["[", "Note"]) == ["", ""] and released(llama, ["[", "Note]"]) == ["", "[Note]"]
    assert released(llama, ["{", "x}"]) == ["", "{x}"]
    assert released(llama, ['{"name": "f", "parameters": {}', "} trailing"]) == ["", ""]
    # text before a call comes out before the call is complete
    assert released(llama, ["Let me check. <func", 'tion=get_weather>{"city": ']) == ["Let me check.", ""]
    assert released(generic, ["Sure! <tool", "_call>{"]) == ["Sure!", ""]
    assert released(generic, ["a < b", " and c"]) == ["a < b", " and c"]
    # Llama 3 holds a word only while it may become a builtin `name.call(`; with tools, only their names
    assert released(llama, ["Hello wor", "ld, "]) == ["Hello", " world,"]
    assert released(llama, ["Hello wor", "ld. "]) == ["Hello", ""]  # "world." may go on into "world.call("
    assert released(llama, ["Hello wor", "ld. "], tools=[WEATHER]) == ["Hello wor", "ld."]
    assert released(llama, ["Ask brave_se"], tools=[SEARCH]) == ["Ask"]
    # <|python_tag|> opens code or a builtin call: nothing until the end
    assert released(llama, ["<|python_tag|>", "print(1)"]) == ["", ""]
    # only what may be an end token or trailing whitespace is held at the end
    assert released(generic, ["Done.  ", "<|im_", "end|>"]) == ["Done.", "", ""]
    assert released(generic, ["x <|im_", "start|>"]) == ["x", " <|im_start|>"]
    # with no callable tool nothing can be a call
    assert released(llama, ["[", "{", "get"], tools=[]) == ["[", "{", "get"]


def test_tool_call_event_fields(formats):
    events, message = stream(formats["llama3.2"], ['I will look. [get_weather(city="S', 'F"), get_time()]'])
    # a list after text is not a Llama 3 call: it stays text
    assert [e.kind for e in events] == ["content", "content"] and message.tool_calls == []
    events, message = stream(formats["llama3.2"], ['[get_weather(city="S', 'F"), get_time()]', " Done."])
    calls = [e for e in events if e.kind == "tool_call"]
    assert [(e.index, e.name, e.arguments) for e in calls] == [(0, "get_weather", '{"city": "SF"}'),
                                                               (1, "get_time", "{}")]
    assert [c.id for c in message.tool_calls] == [e.id for e in calls]
    assert message.content == "Done." and events[-1] == ToolStreamEvent("content", text="Done.")
    with pytest.raises(RuntimeError):
        formats["llama3.2"].tool_call_streamer().message


def test_parse_response_rules(formats):
    llama, generic, hermes = formats["llama3.2"], formats["smollm2"], formats["hermes"]

    def parsed(cf, text, tools=None):
        m = cf.parse_response(text, tools=tools)
        return m.content, [(c.name, c.arguments) for c in m.tool_calls]

    # a call after some text is a call (streamed or not)
    assert parsed(llama, 'Let me check. <function=get_weather>{"city": "SF"}</function>') == (
        "Let me check.", [("get_weather", {"city": "SF"})])
    assert parsed(generic, 'Sure! <tool_call>{"name": "get_time", "arguments": {}}</tool_call>') == (
        "Sure!", [("get_time", {})])
    # each format reads its own syntax: lists and JSON are text for the generic <tool_call> format
    assert parsed(generic, '[get_weather(city="SF")]') == ('[get_weather(city="SF")]', [])
    assert parsed(generic, '{"name": "get_time", "arguments": {}}')[1] == []
    assert parsed(hermes, '{"name": "get_time", "arguments": {}}')[1] == []
    assert parsed(formats["llama3.1-jinja"], '{"name": "get_time", "parameters": {}}')[1] == [("get_time", {})]
    # a call to an undeclared function is text, its markup kept; a list keeps its declared calls
    tag = '<function=launch_missiles>{"target": "moon"}</function>'
    assert parsed(llama, tag, tools=[WEATHER]) == (tag, [])
    assert parsed(llama, '[launch_missiles(target="moon"), get_weather(city="SF")]', tools=[WEATHER]) == (
        "", [("get_weather", {"city": "SF"})])
    # a malformed block is text and does not hide the calls after it
    assert parsed(generic, "<tool_call>{bad}</tool_call> <function=get_time>{}</function>") == (
        "<tool_call>{bad}</tool_call>", [("get_time", {})])
    # content is stripped of outer whitespace, calls or not
    assert parsed(llama, "\n\n Hello \n") == ("Hello", [])
    assert parsed(generic, "  Hello\n<|im_end|>\n") == ("Hello", [])
    # stop reasons
    assert llama.parse_response("x<|eom_id|>").stop_reason == "end_of_message"
    assert generic.parse_response("x<|eom_id|><|im_end|>").stop_reason == "end_of_message"
    assert generic.parse_response("x<|im_end|>", stop_reason="end_of_message").stop_reason == "end_of_message"


def test_template_tool_syntaxes(smollm2_tokenizer):
    assert template_tool_syntaxes(smollm2_tokenizer.chat_template, False) == {"tool_call", "function_tag"}
    assert template_tool_syntaxes(HERMES_TEMPLATE, True) == {"tool_call"}
    assert template_tool_syntaxes(LLAMA31_TEMPLATE, True) == {"json", "python_tag", "builtin"}
    assert template_tool_syntaxes("[func_name1(params_name1=params_value1)] {{ tools }}", True) == {
        "python_list", "bare"}
    assert "json" in template_tool_syntaxes("{{ tools }}", True)  # names no syntax: all of them
    assert template_tool_syntaxes("<function=...> {{ tools }}", True) == {"function_tag", "tool_call"}


def test_constrained_style_parses_back(formats):
    """The style the server forces a call in (`tool_call_syntax`) is one the format reads."""
    from corral.tokenizer.tool_calls import encode_tool_call

    for name in ("smollm2", "hermes", "llama3.1-jinja"):
        cf = formats[name]
        style, prefix, suffix = cf.tool_call_syntax()
        body = (json.dumps({"name": "get_weather", "arguments": {"city": "SF"}}) if style == "generic"
                else encode_tool_call("get_weather", {"city": "SF"}, style))
        msg = cf.parse_response(prefix + body + suffix, tools=[WEATHER])
        assert [(c.name, c.arguments) for c in msg.tool_calls] == [("get_weather", {"city": "SF"})], name


FRAGMENTS = ["[", "]", "{", "}", "(", ")", '"', "'", "\\", " ", "\n", ",", ";", ".", "<", ">", "=", ":", "x", "1",
             "get_weather", "brave_search", "api", ".call(", 'query="q"', 'city="SF"', "<function=", "</function>",
             "<tool_call>", "</tool_call>", "<|python_tag|>", "<|eot_id|>", "<|eom_id|>", "<|im_end|>", '"name"',
             '"parameters"', '"arguments"', "{}", "true", "Hello", " world", "<|", "|>",
             "<|start_header_id|>assistant<|end_header_id|>\n\n"]
CALLS = ['[get_weather(city="SF")]', '{"name": "get_weather", "parameters": {}}', '<function=get_weather>{}</function>',
         '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>', 'brave_search.call(query="q")']


@pytest.mark.parametrize("name", ["llama3.2", "smollm2", "llama3.1-jinja"])
def test_streamed_equals_whole_fuzz(formats, name):
    """Random replies made of the pieces calls are made of, cut at random."""
    cf, rng = formats[name], random.Random(name)
    for _ in range(300):
        text = "".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12)))
        if rng.random() < 0.4:
            text = rng.choice(CALLS) + text if rng.random() < 0.5 else text + rng.choice(CALLS)
        tools = rng.choice([None, [WEATHER, {"type": "brave_search"}], []])
        expected = cf.parse_response(text, tools=tools)
        for pieces in list(cuts(text, seed=rng.random()))[-4:]:
            events, message = stream(cf, pieces, tools)
            check_events(events, message, expected, f"{name} {text!r} cut as {pieces!r}")
