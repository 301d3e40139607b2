"""Tool calls as the models write them, and back.

Writing (assistant history): Meta's `ToolUtils.encode_tool_call` forms (spec §6.1):
    builtin      brave_search.call(query="...")    (also wolfram_alpha, photogen)
    code         <the code>                        (code_interpreter; the chat format adds <|python_tag|>)
    json         {"type": "function", "name": "f", "parameters": {...}}        (Llama 3.1 / 3.2-Vision)
    function_tag <function=f>{...}</function>
    python_list  [f(a="x", n=1)]                                               (Llama 3.2 1B/3B, 3.3)

Reading (`extract_tool_calls`): Meta's `decode_assistant_message_from_content` (spec §6.6) made robust. The
forms tried, first match wins:
    1. <tool_call>{"name": ..., "arguments": ...}</tool_call>   (Hermes / Qwen / our generic Jinja fallback)
    2. <function=f>{json}</function>                            (anywhere in the text, every occurrence)
    3. JSON at the start: one object, a list of objects, or several objects separated by ";" / ","; each
       with "name" and "parameters" or "arguments" (OpenAI {"function": {...}} nesting accepted)
    4. a pythonic list at the start: [f(a=1), g(b="x")]        (EVERY call, not only the first as in Meta)
    5. builtin x.call(query="...") anywhere
    6. <|python_tag|> with none of the above: code_interpreter {"code": text}
    7. a bare call f(a=1) without the list brackets, only when f is one of the declared `tools`
Text around a recognised call is kept as the message content (Meta empties it). Anything malformed (unclosed
list, bad JSON, positional arguments, prose that merely contains brackets) is plain content: parsing never
raises. With `tools` given, calls to functions not in `tools` are dropped, and if none is left the whole
text is the content.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from corral.tokenizer.base import ToolCall

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")

_FUNCTION_TAG = re.compile(r"<function=(?P<name>[^>}\s]+)>")
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>(?P<body>.*?)(?:</tool_call>|$)", re.DOTALL)
_BUILTIN_CALL = re.compile(r"\b(?P<name>\w+)\.call\(")
_META_BUILTIN_CALL = re.compile(r'\b(?P<name>\w+)\.call\(query="(?P<query>[^"]*)"\)')
_BARE_CALL = re.compile(r"(?P<name>[A-Za-z_]\w*)\(")
_JSON_NAMES = {"true": True, "false": False, "null": None}


# --- writing --------------------------------------------------------------------------------------------

def _python_value(value: Any) -> str:
    """Meta's python_list `format_value` (note: dicts print as {k=v}, exactly as Meta does)."""
    if isinstance(value, str):
        return f'"{value}"'
    if isinstance(value, (int, float, bool)) or value is None:
        return str(value)
    if isinstance(value, list):
        return f"[{', '.join(_python_value(v) for v in value)}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}={_python_value(v)}" for k, v in value.items()) + "}"
    raise ValueError(f"cannot write a {type(value).__name__} argument in the python_list tool format")


def encode_tool_call(name: str, arguments: dict, tool_format: str) -> str:
    """One tool call as the model writes it (Meta `ToolUtils.encode_tool_call`)."""
    if name in ("brave_search", "wolfram_alpha", "photogen"):
        if "query" not in arguments:
            raise ValueError(f"builtin tool call {name} needs a 'query' argument, got {sorted(arguments)}")
        return f'{name}.call(query="{arguments["query"]}")'
    if name == "code_interpreter":
        if "code" not in arguments:
            raise ValueError(f"code_interpreter call needs a 'code' argument, got {sorted(arguments)}")
        return arguments["code"]
    if tool_format == "json":
        return json.dumps({"type": "function", "name": name, "parameters": arguments})
    if tool_format == "function_tag":
        return f"<function={name}>{json.dumps(arguments)}</function>"
    if tool_format == "python_list":
        args = ", ".join(f"{k}={_python_value(v)}" for k, v in arguments.items())
        return f"[{name}({args})]"
    raise ValueError(f"unknown tool format {tool_format!r} (expected 'json', 'function_tag' or 'python_list')")


# --- Meta's pythonic-list rules -------------------------------------------------------------------------

def is_valid_python_list(text: str) -> bool:
    """Meta's check: one expression, a non-empty list of `name(kw=...)` calls with keyword arguments only."""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return False
    if len(tree.body) != 1 or not isinstance(tree.body[0], ast.Expr):
        return False
    node = tree.body[0].value
    if not isinstance(node, ast.List) or not node.elts:
        return False
    return all(isinstance(c, ast.Call) and isinstance(c.func, ast.Name) and not c.args
               and all(k.arg is not None for k in c.keywords) for c in node.elts)


def _literal(node: ast.AST) -> Any:
    """ast.literal_eval, also accepting JSON's true / false / null (models mix the two)."""
    if isinstance(node, ast.Name) and node.id in _JSON_NAMES:
        return _JSON_NAMES[node.id]
    if isinstance(node, ast.List):
        return [_literal(e) for e in node.elts]
    if isinstance(node, ast.Dict):
        return {_literal(k): _literal(v) for k, v in zip(node.keys, node.values)}
    return ast.literal_eval(node)


def parse_python_list(text: str) -> list[tuple[str, dict]]:
    """Every call of a valid pythonic list as (name, kwargs). ValueError if `text` is not one."""
    if not is_valid_python_list(text):
        raise ValueError(f"not a list of keyword-argument function calls: {text[:80]!r}")
    calls = []
    for call in ast.parse(text).body[0].value.elts:
        calls.append((call.func.id, {k.arg: _literal(k.value) for k in call.keywords}))
    return calls


# --- reading --------------------------------------------------------------------------------------------

def _matching_close(text: str, start: int) -> int | None:
    """Index just past the bracket closing text[start] ('[', '(' or '{'), skipping string literals."""
    pairs = {"[": "]", "(": ")", "{": "}"}
    stack = [pairs[text[start]]]
    i, quote = start + 1, None
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch in pairs:
            stack.append(pairs[ch])
        elif ch in ")]}":
            if ch != stack.pop():
                return None
            if not stack:
                return i + 1
        i += 1
    return None


def _call_from_json(obj: Any) -> tuple[str, dict] | None:
    """A {"name", "parameters" | "arguments"} object (or OpenAI's {"function": {...}}) as (name, args)."""
    if not isinstance(obj, dict):
        return None
    if isinstance(obj.get("function"), dict) and "name" in obj["function"]:
        obj = obj["function"]
    name = obj.get("name")
    if not isinstance(name, str) or not name:
        return None
    if "parameters" in obj:
        args = obj["parameters"]
    elif "arguments" in obj:
        args = obj["arguments"]
    elif obj.get("type") == "function":
        args = {}
    else:
        return None  # {"name": "Bob", "age": 3} is data, not a call
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            return None
    if args is None:
        args = {}
    return (name, args) if isinstance(args, dict) else None


def _calls_from_json_value(value: Any) -> list[tuple[str, dict]] | None:
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_json(v) for v in items]
    return calls if calls and all(calls) else None


def _json_prefix_calls(text: str) -> tuple[list[tuple[str, dict]], str] | None:
    """JSON call objects at the start of `text` (separated by whitespace, ';' or ','), and the rest."""
    decoder = json.JSONDecoder()
    calls: list[tuple[str, dict]] = []
    pos = 0
    while True:
        while pos < len(text) and (text[pos].isspace() or (calls and text[pos] in ";,")):
            pos += 1
        if pos >= len(text) or text[pos] not in "{[":
            break
        try:
            value, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            break
        found = _calls_from_json_value(value)
        if found is None:
            break
        calls.extend(found)
        pos = end
    return (calls, text[pos:]) if calls else None


def _python_list_prefix_calls(text: str) -> tuple[list[tuple[str, dict]], str] | None:
    """Pythonic call lists at the start of `text` (one, or several on separate lines), and the rest."""
    calls: list[tuple[str, dict]] = []
    rest = text
    while rest.startswith("["):
        end = _matching_close(rest, 0)
        if end is None:
            break
        try:
            calls += parse_python_list(rest[:end])
        except (ValueError, SyntaxError, TypeError):
            break
        rest = rest[end:].lstrip()
    return (calls, rest) if calls else None


def _kwargs_call(text: str, open_paren: int) -> tuple[dict, int] | None:
    """Keyword arguments of the call whose '(' is at text[open_paren], and the index after ')'."""
    end = _matching_close(text, open_paren)
    if end is None:
        return None
    try:
        node = ast.parse(f"f{text[open_paren:end]}", mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None
        return {k.arg: _literal(k.value) for k in node.keywords}, end
    except (ValueError, SyntaxError, TypeError):
        return None


def _normalize_builtin(name: str, args: dict) -> dict:
    """Meta maps a builtin called in a custom format to {"query": first value}; code_interpreter to {"code"}."""
    if name in ("brave_search", "wolfram_alpha", "photogen") and "query" not in args and args:
        return {"query": next(iter(args.values()))}
    if name == "code_interpreter" and "code" not in args and args:
        return {"code": next(iter(args.values()))}
    return args


def tool_names(tools: list[dict] | None) -> set[str] | None:
    """Names callable under `tools` (OpenAI function tools, or builtins given as {"type": "brave_search"})."""
    if tools is None:
        return None
    names = set()
    for tool in tools:
        if isinstance(tool.get("function"), dict):
            names.add(tool["function"].get("name"))
        elif tool.get("type") in BUILTIN_TOOLS:
            names.add(tool["type"])
        elif "name" in tool:
            names.add(tool["name"])
    return names


def _find_calls(content: str, python_tag: bool) -> tuple[list[tuple[str, dict]], str]:
    stripped = content.strip()

    # 1. <tool_call>...</tool_call> blocks (closing tag optional on the last one)
    blocks = list(_TOOL_CALL_BLOCK.finditer(content))
    if blocks:
        calls = []
        for m in blocks:
            body = m.group("body").strip()
            try:
                found = _calls_from_json_value(json.loads(body))
            except json.JSONDecodeError:
                found = None
            if found is None:
                pl = _python_list_prefix_calls(body)
                found = pl[0] if pl and not pl[1].strip() else None
            if found is None:
                break
            calls.extend(found)
        else:
            return calls, _TOOL_CALL_BLOCK.sub("", content)

    # 2. <function=name>{json}</function>, every occurrence
    calls, rest, pos = [], [], 0
    for m in _FUNCTION_TAG.finditer(content):
        if m.start() < pos:
            continue
        brace = m.end()
        while brace < len(content) and content[brace].isspace():
            brace += 1
        args = None
        if brace < len(content) and content[brace] == "{":
            try:
                args, end = json.JSONDecoder().raw_decode(content, brace)
            except json.JSONDecodeError:
                close = _matching_close(content, brace)  # Meta's fallback: single quotes as JSON quotes
                if close is not None:
                    try:
                        args, end = json.loads(content[brace:close].replace("'", '"')), close
                    except json.JSONDecodeError:
                        args = None
        if not isinstance(args, dict):
            continue
        if content.startswith("</function>", end):
            end += len("</function>")
        calls.append((m.group("name"), args))
        rest.append(content[pos:m.start()])
        pos = end
    if calls:
        rest.append(content[pos:])
        return calls, "".join(rest)

    # 3. JSON objects at the start, 4. a pythonic list at the start
    for parse in (_json_prefix_calls, _python_list_prefix_calls):
        found = parse(stripped)
        if found:
            return found

    # 5. builtin x.call(query="...") anywhere: any keyword arguments for the known builtins, Meta's exact
    #    `name.call(query="...")` form for other names (so code like `api.call(x=1)` stays code)
    for m in _BUILTIN_CALL.finditer(content):
        if m.group("name") not in BUILTIN_TOOLS:
            continue
        parsed = _kwargs_call(content, m.end() - 1)
        if parsed is not None:
            args, end = parsed
            return [(m.group("name"), args)], content[:m.start()] + content[end:]
    m = _META_BUILTIN_CALL.search(content)
    if m:
        return [(m.group("name"), {"query": m.group("query")})], content[:m.start()] + content[m.end():]

    # 6. <|python_tag|> + code
    if python_tag and stripped:
        return [("code_interpreter", {"code": content})], ""
    return [], content


def extract_tool_calls(content: str, *, python_tag: bool = False,
                       tools: list[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """(remaining text, tool calls) found in a model's reply (header and end tokens already removed)."""
    try:
        found, rest = _find_calls(content, python_tag)
    except RecursionError:  # absurdly nested brackets: not a tool call
        found, rest = [], content
    allowed = tool_names(tools)
    if allowed is not None:
        found = [c for c in found if c[0] in allowed]
    if not found:
        bare = _bare_call(content, allowed)
        if bare is None:
            return content, []
        found, rest = bare
    return rest.strip(), [ToolCall(name=name, arguments=_normalize_builtin(name, args)) for name, args in found]


def _bare_call(content: str, allowed: set[str] | None) -> tuple[list[tuple[str, dict]], str] | None:
    """`f(a=1)` without list brackets, accepted only when `f` is a declared tool (models sometimes drop the [])."""
    stripped = content.strip()
    m = _BARE_CALL.match(stripped)
    if not allowed or not m or m.group("name") not in allowed:
        return None
    parsed = _kwargs_call(stripped, m.end() - 1)
    if parsed is None:
        return None
    args, end = parsed
    return [(m.group("name"), args)], stripped[end:]
