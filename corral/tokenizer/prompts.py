"""System prompts that tell Llama 3.x models about tools (llama-stack's conventions, spec §6.3-6.5).

Two families:
- Llama 3.1 and 3.2-Vision (`tool_format` "json" or "function_tag"): `augment_messages_llama3_1` puts
  "Environment: ipython" / "Tools: brave_search, wolfram_alpha" and the date block in the system message
  and the custom-tool list in an extra *user* message after it.
- Llama 3.2 1B/3B and 3.3 (`tool_format` "python_list"): `augment_messages_llama3_2` puts the pythonic-list
  instructions and the tool list in the system message, then the caller's system prompt, no date.
The strings reproduce llama-stack's jinja templates character for character, rendered with plain
`jinja2.Template` (which drops a template's final newline). Those templates print descriptions with `{{ }}`
(so a missing description prints "None") and serialize with jinja's `tojson` (sorted keys, `<>&'` escaped as
\\u003c...); both quirks are kept so prompts match what the models were served with.
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass, field
from typing import Any

from corral.tokenizer.tool_calls import BUILTIN_TOOLS

REQUIRED_TOOL_PROMPT = "You MUST use one of the provided functions/tools to answer the user query."


@dataclass
class ToolSpec:
    name: str
    description: str | None = None
    parameters: dict = field(default_factory=dict)  # JSON schema: {"type": "object", "properties", "required"}

    @property
    def builtin(self) -> bool:
        return self.name in BUILTIN_TOOLS


def normalize_tools(tools: list[dict] | None) -> list[ToolSpec]:
    """OpenAI tools ({"type": "function", "function": {...}}) or builtins ({"type": "brave_search"}) -> ToolSpecs."""
    specs = []
    for i, tool in enumerate(tools or []):
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] must be an object, got {type(tool).__name__}")
        if tool.get("type") in BUILTIN_TOOLS and "function" not in tool:
            specs.append(ToolSpec(name=tool["type"]))
            continue
        fn = tool.get("function", tool if "name" in tool else None)
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] must look like {{'type': 'function', 'function': {{'name': ...}}}}, "
                             f"got keys {sorted(tool)}")
        params = fn.get("parameters") or {}
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        specs.append(ToolSpec(name=fn["name"], description=fn.get("description"), parameters=params))
    return specs


def _tojson(value: Any) -> str:
    """jinja2's built-in `tojson` filter: sorted keys, HTML-sensitive characters escaped."""
    return (json.dumps(value, sort_keys=True).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026").replace("'", "\\u0027"))


def _s(value: Any) -> str:
    """What `{{ value }}` prints in a plain jinja2 template."""
    return str(value)


def format_date(today: _dt.date) -> str:
    return today.strftime("%d %B %Y")  # "21 September 2024"


def system_default_prompt(today: _dt.date | None = None) -> str:
    """SystemDefaultGenerator."""
    return f"Cutting Knowledge Date: December 2023\nToday Date: {format_date(today or _dt.date.today())}"


def builtin_tools_prompt(tools: list[ToolSpec]) -> str:
    """BuiltinToolGenerator: "Environment: ipython" if any tool, "Tools: ..." for builtins but code_interpreter."""
    out = "Environment: ipython\n" if tools else ""
    builtins = [t.name for t in tools if t.builtin and t.name != "code_interpreter"]
    if builtins:
        out += "Tools: " + ", ".join(builtins).strip()
    return out


def json_custom_tools_prompt(tools: list[ToolSpec]) -> str:
    """JsonCustomToolGenerator (Llama 3.1 custom tools; sent as a user message)."""
    out = ("Answer the user's question by making use of the following functions if needed.\n"
           "If none of the function can be used, please say so.\n"
           "Here is a list of functions in JSON format:\n")
    for t in tools:
        props = t.parameters.get("properties", {})
        out += ('{\n    "type": "function",\n    "function": {\n'
                f'        "name": "{_s(t.name)}",\n        "description": "{_s(t.description)}",\n'
                '        "parameters": {\n            "type": "object",\n            "properties": [')
        for j, (name, param) in enumerate(props.items()):
            out += ('\n                {\n'
                    f'                    "{_s(name)}": {{\n'
                    '                        "type": "object",\n'
                    f'                        "description": "{_s(param.get("description", ""))}"\n'
                    '                    }\n                }')
            out += "," if j < len(props) - 1 else ""
        out += (f'\n            ],\n            "required": {_tojson(t.parameters.get("required", []))}\n'
                '        }\n    }\n}\n')
    return out + "\nReturn function calls in JSON format."


def function_tag_custom_tools_prompt(tools: list[ToolSpec]) -> str:
    """FunctionTagCustomToolGenerator (`<function=f>{...}</function>` answers; sent as a user message)."""
    out = "You have access to the following functions:\n\n"
    for t in tools:
        props = {k: {pk: pv for pk, pv in v.items() if pk != "default"}
                 for k, v in t.parameters.get("properties", {}).items()}
        out += (f"Use the function '{_s(t.name)}' to '{_s(t.description)}':\n"
                f'{{"name": "{_s(t.name)}", "description": "{_s(t.description)}", "parameters": {_tojson(props)}}}\n\n')
    return out + (
        "Think very carefully before calling functions.\n"
        "If you choose to call a function ONLY reply in the following format with no prefix or suffix:\n\n"
        '<function=example_function_name>{"example_name": "example_value"}</function>\n\n'
        "Reminder:\n"
        "- If looking for real time information use relevant functions before falling back to brave_search\n"
        "- Function calls MUST follow the specified format, start with <function= and end with </function>\n"
        "- Required parameters MUST be specified\n"
        "- Only call one function at a time\n"
        "- Put the entire function call reply on one line")


PYTHON_LIST_DEFAULT_PROMPT = (
    "You are a helpful assistant. You have access to functions, but you should only use them if they are required.\n"
    "You are an expert in composing functions. You are given a question and a set of possible functions.\n"
    "Based on the question, you may or may not need to make one function/tool call to achieve the purpose.\n\n"
    "If you decide to invoke any of the function(s), you MUST put it in the format of "
    "[func_name1(params_name1=params_value1, params_name2=params_value2...), func_name2(params)]\n"
    "If you decide to invoke a function, you SHOULD NOT include any other text in the response. "
    "besides the function call in the above format.\n"
    "For a boolean parameter, be sure to use `True` or `False` (capitalized) for the value.\n\n\n"
)


def python_list_function_description(tools: list[ToolSpec]) -> str:
    """PythonListCustomToolGenerator._gen_function_description."""
    out = "Here is a list of functions in JSON format that you can invoke.\n\n[\n    "
    for i, t in enumerate(tools):
        props = t.parameters.get("properties", {})
        out += ('{\n'
                f'        "name": "{_s(t.name)}",\n        "description": "{_s(t.description)}",\n'
                '        "parameters": {\n            "type": "dict",\n'
                f'            "required": {_tojson(t.parameters.get("required", []))},\n'
                '            "properties": {')
        for j, (name, param) in enumerate(props.items()):
            out += (f'\n                "{_s(name)}": {{\n'
                    f'                    "type": "{_s(param.get("type", "string"))}",\n'
                    f'                    "description": "{_s(param.get("description", ""))}"')
            if param.get("default"):
                out += f',\n                    "default": "{_s(param.get("default"))}"'
            out += "\n                }" + ("," if j < len(props) - 1 else "")
        out += "\n            }\n        }\n    }"
        out += ",\n    " if i < len(tools) - 1 else ""
    return out + ("\n]\n\nYou can answer general questions or invoke tools when necessary.\n"
                  "In addition to tool calls, you should also augment your responses by using the tool outputs.")


def python_list_custom_tools_prompt(tools: list[ToolSpec]) -> str:
    """PythonListCustomToolGenerator with its default preamble (Llama 3.2 1B/3B system prompt)."""
    return PYTHON_LIST_DEFAULT_PROMPT + python_list_function_description(tools)


def tool_choice_prompt(tool_choice: str | dict | None, tools: list[ToolSpec]) -> str:
    """"" for auto / none; a MUST sentence for "required" or a named function (which must be in `tools`)."""
    if tool_choice is None or tool_choice in ("auto", "none"):
        return ""
    if tool_choice == "required":
        if not tools:
            raise ValueError("tool_choice='required' needs at least one tool in 'tools'")
        return REQUIRED_TOOL_PROMPT
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else tool_choice.get("name", tool_choice.get("type"))
    else:
        name = tool_choice
    if not isinstance(name, str) or name not in {t.name for t in tools}:
        raise ValueError(f"tool_choice names {name!r}, which is not one of the tools "
                         f"({', '.join(t.name for t in tools) or 'none given'})")
    return f"You MUST use the tool `{name}` to answer the user query."


def _system_text(message: dict) -> str:
    content = message.get("content") or ""
    if isinstance(content, str):
        return content
    return "\n".join(c.get("text", "") if c.get("type") == "text" else "<media>" for c in content)


def _split_system(messages: list[dict]) -> tuple[dict | None, list[dict]]:
    messages = list(messages)
    system = messages.pop(0) if messages and messages[0].get("role") == "system" else None
    if messages and messages[0].get("role") == "system":
        raise ValueError("only one system message is supported (messages[0] and messages[1] are both 'system')")
    return system, messages


def augment_messages_llama3_1(messages: list[dict], tools: list[dict] | None, tool_choice: str | dict | None = None,
                              *, tool_format: str = "json", today: _dt.date | None = None) -> list[dict]:
    """llama-stack `augment_messages_for_tools_llama_3_1` (Llama 3.1, 3.2-Vision)."""
    specs = normalize_tools(tools)
    system, rest = _split_system(messages)
    sys_content = builtin_tools_prompt(specs) + "\n" if specs else ""
    sys_content += system_default_prompt(today)
    if system is not None:
        sys_content += "\n" + _system_text(system)
    if choice := tool_choice_prompt(tool_choice, specs):
        sys_content += "\n" + choice
    out = [{"role": "system", "content": sys_content}]
    custom = [t for t in specs if not t.builtin]
    if custom:
        if tool_format == "json":
            out.append({"role": "user", "content": json_custom_tools_prompt(custom)})
        elif tool_format == "function_tag":
            out.append({"role": "user", "content": function_tag_custom_tools_prompt(custom)})
        else:
            raise ValueError(f"tool_format {tool_format!r} is not a Llama 3.1 custom-tool format ('json', 'function_tag')")
    return out + rest


def augment_messages_llama3_2(messages: list[dict], tools: list[dict] | None, tool_choice: str | dict | None = None,
                              ) -> list[dict]:
    """llama-stack `augment_messages_for_tools_llama` with PythonListCustomToolGenerator (3.2 1B/3B, 3.3)."""
    specs = normalize_tools(tools)
    system, rest = _split_system(messages)
    builtins = [t for t in specs if t.builtin]
    custom = [t for t in specs if not t.builtin]
    sys_content = builtin_tools_prompt(builtins) + "\n" if builtins else ""
    if custom:
        sys_content += python_list_custom_tools_prompt(custom) + "\n"
    if system is not None:  # system_message_behavior "append" (llama-stack's default)
        sys_content += _system_text(system)
    if choice := tool_choice_prompt(tool_choice, specs):
        sys_content += "\n" + choice
    return [{"role": "system", "content": sys_content.strip("\n")}, *rest]
