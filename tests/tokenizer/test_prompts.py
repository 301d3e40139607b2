"""System prompts for tools, against the literal strings of the spec (§6.3-6.5) with a fixed date."""

import datetime

import pytest

from corral.tokenizer import prompts

DATE = datetime.date(2024, 9, 21)

TRENDING_SONGS = {"type": "function", "function": {
    "name": "trending_songs", "description": "Returns the trending songs on a Music site",
    "parameters": {"type": "object", "properties": {
        "n": {"type": "int", "description": "The number of songs to return"},
        "genre": {"type": "str", "description": "The genre of the songs to return"}}, "required": ["n"]}}}
GET_WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get weather info for places",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "description": "The name of the city to get the weather for"},
        "metric": {"type": "string", "description": "The metric for weather. Options are: celsius, fahrenheit",
                   "default": "celsius"}}, "required": ["city"]}}}
BUILTINS = [{"type": "function", "function": {"name": "code_interpreter"}}, {"type": "brave_search"},
            {"type": "function", "function": {"name": "wolfram_alpha"}}]

# Spec §6.5, verbatim.
PYTHON_LIST_SYSTEM = '''You are a helpful assistant. You have access to functions, but you should only use them if they are required.\nYou are an expert in composing functions. You are given a question and a set of possible functions.\nBased on the question, you may or may not need to make one function/tool call to achieve the purpose.\n\nIf you decide to invoke any of the function(s), you MUST put it in the format of [func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\nIf you decide to invoke a function, you SHOULD NOT include any other text in the response. besides the function call in the above format.\nFor a boolean parameter, be sure to use `True` or `False` (capitalized) for the value.\n\n\nHere is a list of functions in JSON format that you can invoke.\n\n[\n    {\n        "name": "get_weather",\n        "description": "Get weather info for places",\n        "parameters": {\n            "type": "dict",\n            "required": ["city"],\n            "properties": {\n                "city": {\n                    "type": "string",\n                    "description": "The name of the city to get the weather for"\n                },\n                "metric": {\n                    "type": "string",\n                    "description": "The metric for weather. Options are: celsius, fahrenheit",\n                    "default": "celsius"\n                }\n            }\n        }\n    }\n]\n\nYou can answer general questions or invoke tools when necessary.\nIn addition to tool calls, you should also augment your responses by using the tool outputs.'''

# Spec §6.4, verbatim up to the spec's "..." elision, and its end.
JSON_PROMPT_HEAD = '''Answer the user's question by making use of the following functions if needed.\nIf none of the function can be used, please say so.\nHere is a list of functions in JSON format:\n{\n    "type": "function",\n    "function": {\n        "name": "trending_songs",\n        "description": "Returns the trending songs on a Music site",\n        "parameters": {\n            "type": "object",\n            "properties": [\n                {\n                    "n": {\n                        "type": "object",\n                        "description": "The number of songs to return"\n                    }\n                },'''
JSON_PROMPT_TAIL = '''],\n            "required": ["n"]\n        }\n    }\n}\n\nReturn function calls in JSON format.'''


def test_python_list_system_prompt_is_the_spec_literal():
    messages = prompts.augment_messages_llama3_2([{"role": "user", "content": "weather?"}], [GET_WEATHER])
    assert messages == [{"role": "system", "content": PYTHON_LIST_SYSTEM}, {"role": "user", "content": "weather?"}]


def test_python_list_appends_the_callers_system_prompt_and_tool_choice():
    messages = prompts.augment_messages_llama3_2(
        [{"role": "system", "content": "Answer like a pirate."}, {"role": "user", "content": "hi"}],
        [GET_WEATHER, {"type": "brave_search"}], "required")
    assert messages[0]["content"] == ("Environment: ipython\nTools: brave_search\n" + PYTHON_LIST_SYSTEM +
                                      "\nAnswer like a pirate.\n" + prompts.REQUIRED_TOOL_PROMPT)
    assert messages[1:] == [{"role": "user", "content": "hi"}]


def test_json_custom_tool_prompt_is_the_spec_literal():
    text = prompts.json_custom_tools_prompt(prompts.normalize_tools([TRENDING_SONGS]))
    assert text.startswith(JSON_PROMPT_HEAD) and text.endswith(JSON_PROMPT_TAIL)
    genre = ('\n                {\n                    "genre": {\n                        "type": "object",\n'
             '                        "description": "The genre of the songs to return"\n                    }\n'
             '                }\n            ')
    assert text == JSON_PROMPT_HEAD + genre + JSON_PROMPT_TAIL


def test_builtin_system_prompts_are_the_spec_literals():
    """Spec §6.3 (llama-stack rendering, checked with jinja2 3.1.6)."""
    system = {"role": "system", "content": "You are a helpful assistant."}
    user = {"role": "user", "content": "Search the web for the latest price of 1oz gold?"}
    out = prompts.augment_messages_llama3_1([system, user], BUILTINS, today=DATE)
    assert out == [{"role": "system", "content": "Environment: ipython\nTools: brave_search, wolfram_alpha\n"
                    "Cutting Knowledge Date: December 2023\nToday Date: 21 September 2024\n"
                    "You are a helpful assistant."}, user]
    out = prompts.augment_messages_llama3_1([user], BUILTINS[:1], today=DATE)
    assert out[0]["content"] == ("Environment: ipython\n\nCutting Knowledge Date: December 2023\n"
                                 "Today Date: 21 September 2024")
    out = prompts.augment_messages_llama3_1([system, user], None, today=datetime.date(2024, 7, 5))
    assert out[0]["content"] == ("Cutting Knowledge Date: December 2023\nToday Date: 05 July 2024\n"
                                 "You are a helpful assistant.")


def test_json_custom_tools_go_in_a_user_message():
    user = {"role": "user", "content": "Top 10 songs?"}
    out = prompts.augment_messages_llama3_1([user], [TRENDING_SONGS], {"type": "function",
                                                                       "function": {"name": "trending_songs"}},
                                            today=DATE)
    assert out[0] == {"role": "system", "content": "Environment: ipython\n\nCutting Knowledge Date: December 2023\n"
                      "Today Date: 21 September 2024\nYou MUST use the tool `trending_songs` to answer the user query."}
    assert out[1]["role"] == "user" and out[1]["content"].startswith(JSON_PROMPT_HEAD)
    assert out[2:] == [user]


def test_function_tag_prompt():
    text = prompts.function_tag_custom_tools_prompt(prompts.normalize_tools([TRENDING_SONGS]))
    assert text.startswith(
        "You have access to the following functions:\n\nUse the function 'trending_songs' to 'Returns the trending "
        "songs on a Music site':\n{\"name\": \"trending_songs\", \"description\": \"Returns the trending songs on a "
        "Music site\", \"parameters\": {\"genre\": {\"description\": \"The genre of the songs to return\", \"type\": "
        "\"str\"}, \"n\": {\"description\": \"The number of songs to return\", \"type\": \"int\"}}}\n\n"
        "Think very carefully before calling functions.\nIf you choose to call a function ONLY reply in the following "
        "format with no prefix or suffix:\n\n<function=example_function_name>{\"example_name\": \"example_value\"}"
        "</function>\n\nReminder:\n- ")
    assert text.endswith("- Put the entire function call reply on one line")


def test_tool_choice_sentences_and_errors():
    specs = prompts.normalize_tools([GET_WEATHER])
    assert prompts.tool_choice_prompt("required", specs) == (
        "You MUST use one of the provided functions/tools to answer the user query.")
    assert prompts.tool_choice_prompt({"type": "function", "function": {"name": "get_weather"}}, specs) == (
        "You MUST use the tool `get_weather` to answer the user query.")
    assert prompts.tool_choice_prompt("auto", specs) == prompts.tool_choice_prompt("none", specs) == ""
    with pytest.raises(ValueError, match="not one of the tools"):
        prompts.tool_choice_prompt({"type": "function", "function": {"name": "nope"}}, specs)
    with pytest.raises(ValueError, match="tools\\[0\\]"):
        prompts.normalize_tools([{"type": "function", "function": {"description": "no name"}}])
    with pytest.raises(ValueError, match="only one system message"):
        prompts.augment_messages_llama3_2([{"role": "system", "content": "a"}, {"role": "system", "content": "b"}],
                                          [GET_WEATHER])
