"""Tool calls as the models write them, and back.

Writing (assistant history): Meta's `ToolUtils.encode_tool_call` forms (spec §6.1):
    builtin      brave_search.call(query="...")    (also wolfram_alpha, photogen)
    code         <the code>                        (code_interpreter; the chat format adds <|python_tag|>)
    json         {"type": "function", "name": "f", "parameters": {...}}        (Llama 3.1 / 3.2-Vision)
    function_tag <function=f>{...}</function>
    python_list  [f(a="x", n=1)]                                               (Llama 3.2 1B/3B, 3.3)

Reading: `ToolCallScanner` reads a reply left to right and cuts it into text and calls. Each chat format
enables the syntaxes its models write (`SYNTAXES`); `extract_tool_calls` enables them all:
    tool_call     <tool_call>{"name": ..., "arguments": ...}</tool_call> anywhere (closing tag optional at the
                  end; Hermes / Qwen / our generic Jinja fallback)
    function_tag  <function=f>{json}</function> anywhere (closing tag optional)
    json          JSON at the start: one object, a list of objects, or several objects separated by ";" / ",";
                  each with "name" and "parameters" or "arguments" (OpenAI {"function": {...}} nesting accepted)
    python_list   a pythonic list at the start: [f(a=1), g(b="x")] (EVERY call, not only the first as in Meta),
                  several lists on separate lines
    builtin       x.call(query="...") anywhere: keyword arguments for the known builtins, Meta's exact
                  `name.call(query="...")` form for other names (so code like `api.call(x=1)` stays code)
    bare          f(a=1) at the start without the list brackets, only when f is one of the declared `tools`
    python_tag    <|python_tag|> opening the reply: the forms above, else code_interpreter {"code": text}
                  (the chat format strips the tag and calls `python_tag_calls`)
Every decision is local: a piece is a call or text whatever follows it, so a streamed reply can be cut as it
arrives (`tool_stream.ToolCallStreamer`) and gives what the whole text gives. Anything malformed (unclosed
list, bad JSON, positional arguments, prose that merely contains brackets) is text: parsing never raises.
With `tools` given, calls to functions not in `tools` are text too (a list keeps its declared calls).
Text around the calls is kept as the message content (Meta empties it).
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from corral.tokenizer.base import ToolCall

BUILTIN_TOOLS = ("brave_search", "wolfram_alpha", "photogen", "code_interpreter")

SYNTAXES = ("tool_call", "function_tag", "json", "python_list", "builtin", "bare", "python_tag")
ALL_SYNTAXES = frozenset(SYNTAXES)

_NAME_END = re.compile(r"[>}\s]")  # a <function=NAME> name runs to the first of these
_WORD = re.compile(r"\w+")
_IDENTIFIER = re.compile(r"[A-Za-z_]\w*")
_PAIRS = {"[": "]", "(": ")", "{": "}"}
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


# --- reading: the pieces --------------------------------------------------------------------------------

Calls = list[tuple[str, dict]]


class _Brackets:
    """The bracket closing text[start] ('[', '(' or '{'), string literals skipped, searched incrementally:
    each `close` resumes where the last one stopped, so a span that arrives piece by piece is read once."""

    def __init__(self, opener: str):
        self.stack = [_PAIRS[opener]]
        self.quote: str | None = None
        self.pos = 1  # next character to read, relative to the opener
        self.end: int | None = None  # once found: past the closing bracket (relative), or -1

    def close(self, text: str, start: int) -> int | None:
        """Index just past the closing bracket; None while `text` does not hold it yet; -1 on a mismatch."""
        if self.end is not None:
            return self.end if self.end < 0 else start + self.end
        i = start + self.pos
        while i < len(text):
            ch = text[i]
            if self.quote:
                if ch == "\\":
                    if i + 1 == len(text):
                        break  # read the escape with the character it escapes
                    i += 1
                elif ch == self.quote:
                    self.quote = None
            elif ch in "\"'":
                self.quote = ch
            elif ch in _PAIRS:
                self.stack.append(_PAIRS[ch])
            elif ch in ")]}":
                if ch != self.stack.pop():
                    self.end = -1
                    return -1
                if not self.stack:
                    self.end = i + 1 - start
                    return i + 1
            i += 1
        self.pos = i - start
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
        except (ValueError, RecursionError):
            return None
    if args is None:
        args = {}
    return (name, args) if isinstance(args, dict) else None


def _calls_from_json_value(value: Any) -> Calls | None:
    items = value if isinstance(value, list) else [value]
    calls = [_call_from_json(v) for v in items]
    return calls if calls and all(calls) else None


def _json_calls(text: str) -> Calls | None:
    try:
        return _calls_from_json_value(json.loads(text))
    except (ValueError, RecursionError):  # absurdly nested brackets are not a call either
        return None


def _python_list_calls(text: str) -> Calls | None:
    try:
        return parse_python_list(text)
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None


def _kwargs(text: str) -> dict | None:
    """The keyword arguments of `(a=1, b="x")` (text from the '(' to the ')'), None if it is not that."""
    try:
        node = ast.parse(f"f{text}", mode="eval").body
        if not isinstance(node, ast.Call) or node.args or any(k.arg is None for k in node.keywords):
            return None
        return {k.arg: _literal(k.value) for k in node.keywords}
    except (ValueError, SyntaxError, TypeError, RecursionError, MemoryError):
        return None


def _function_args(text: str) -> dict | None:
    """The {json} after <function=f>; Meta's fallback reads single quotes as JSON quotes."""
    for candidate in (text, text.replace("'", '"')):
        try:
            args = json.loads(candidate)
        except (ValueError, RecursionError):
            continue
        return args if isinstance(args, dict) else None
    return None


def _tool_call_body(body: str) -> Calls | None:
    body = body.strip()
    return _json_calls(body) or _python_list_calls(body)


def _list_head(text: str, json_on: bool, python_on: bool) -> bool | None:
    """Whether text (starting with '[' or '{') can still open a call: `{"`, `[{`, `[name(`. None: too short."""
    i = 1
    while i < len(text) and text[i].isspace():
        i += 1
    if i == len(text):
        return None
    ch = text[i]
    if text[0] == "{":
        return json_on and ch == '"'
    if ch == "{":
        return json_on
    if not python_on or not (ch == "_" or ch.isalpha()):
        return False
    m = _WORD.match(text, i)
    j = m.end()
    while j < len(text) and text[j].isspace():
        j += 1
    return None if j == len(text) else text[j] == "("


def normalize_builtin(name: str, args: dict) -> dict:
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


# --- reading: the scanner -------------------------------------------------------------------------------

class ToolCallScanner:
    """A reply read left to right, cut into ("text", str) and ("calls", [(name, args), ...]) pieces.

    `push(text)` returns the pieces decided so far; a piece is decided once no continuation can change it
    (an unclosed bracket, a partial `<function=` tag or a word that may go on into `.call(` wait for more).
    `finish()` decides the rest. The pieces do not depend on how the text was cut into pushes.
    """

    def __init__(self, syntaxes=ALL_SYNTAXES, tools: list[dict] | None = None):
        self.allowed = tool_names(tools)
        on = frozenset(syntaxes) if self.allowed != set() else frozenset()  # tools=[]: nothing is a call
        self.tool_call, self.function_tag = "tool_call" in on, "function_tag" in on
        self.json, self.python_list = "json" in on, "python_list" in on
        self.builtin, self.bare = "builtin" in on, "bare" in on and bool(self.allowed)
        # where, past the first character, a call could begin
        starts = (["<"] if self.tool_call or self.function_tag else []) + ([r"\b\w"] if self.builtin else [])
        self._candidate = re.compile("|".join(starts)) if starts else None
        self.buf = ""
        self.prev = ""  # the character before buf (builtin calls start at a word boundary)
        self.start = True  # nothing but whitespace and calls so far: JSON, lists and bare calls may come
        self.after_call = False  # a call at the start just ended: ';' and ',' before the next are dropped
        self._base = 0  # offset of buf in the whole text
        self._span: tuple[int, _Brackets] | None = None  # the bracket span being matched (offset, state)

    def push(self, text: str) -> list[tuple]:
        self.buf += text
        return self._run(final=False)

    def finish(self) -> list[tuple]:
        return self._run(final=True)

    # --- the loop: one decision at the head of buf at a time ----------------------------------------------

    def _run(self, final: bool) -> list[tuple]:
        out: list[tuple] = []
        while self.buf:
            step = self._step(final)
            if step is None:  # wait for more text (never when final)
                break
            n, piece = step
            if piece is not None:
                if piece[0] == "text" and out and out[-1][0] == "text":
                    out[-1] = ("text", out[-1][1] + piece[1])
                else:
                    out.append(piece)
            self.prev = self.buf[n - 1]
            self.buf = self.buf[n:]
            self._base += n
        return out

    def _step(self, final: bool):
        if self.start:
            step = self._at_start(final)
            if step is not False:
                return step
            self.start = False
        buf = self.buf
        if buf[0] == "<" and (self.tool_call or self.function_tag):
            step = self._tag(final)
            return (1, ("text", "<")) if step is False else step
        if self.builtin and _WORD.match(buf) and not _WORD.match(self.prev):
            step = self._builtin(final)
            if step is not False:
                return step
            word = _WORD.match(buf).group()
            return len(word), ("text", word)
        m = self._candidate.search(buf, 1) if self._candidate else None
        n = m.start() if m else len(buf)
        return n, ("text", buf[:n])

    def _close(self, at: int) -> int | None:
        """_Brackets.close for the span opening at buf[at], resumed across pushes."""
        if self._span is None or self._span[0] != self._base + at:
            self._span = (self._base + at, _Brackets(self.buf[at]))
        return self._span[1].close(self.buf, at)

    def _allowed(self, calls: Calls | None) -> Calls:
        if not calls:
            return []
        return calls if self.allowed is None else [c for c in calls if c[0] in self.allowed]

    # --- the syntaxes: each returns (consumed, piece), None (wait) or False (not here) -----------------------

    def _at_start(self, final: bool):
        buf = self.buf
        ch = buf[0]
        if ch.isspace():
            n = len(buf) - len(buf.lstrip())
            return n, ("text", buf[:n])
        if self.after_call and ch in ";,":
            return 1, None
        if ch in "[{" and (self.json or self.python_list):
            head = _list_head(buf, self.json, self.python_list)
            if head is None and not final:
                return None
            if head:
                end = self._close(0)
                if end is None and not final:
                    return None
                if end is not None and end > 0:
                    span = buf[:end]
                    calls = (_json_calls(span) if self.json else None) or \
                        (_python_list_calls(span) if self.python_list and ch == "[" else None)
                    if calls := self._allowed(calls):
                        self.after_call = True
                        return end, ("calls", calls)
        if self.bare and not self.after_call and (m := _IDENTIFIER.match(buf)):
            name = m.group()
            if m.end() == len(buf) and not final:
                return None if any(a.startswith(name) for a in self.allowed) else False
            if name in self.allowed and buf.startswith("(", m.end()):
                end = self._close(m.end())
                if end is None and not final:
                    return None
                if end is not None and end > 0 and (args := _kwargs(buf[m.end():end])) is not None:
                    self.after_call = True
                    return end, ("calls", [(name, args)])
        return False

    def _tag(self, final: bool):
        buf = self.buf
        if self.tool_call:
            if buf.startswith("<tool_call>"):
                close = buf.find("</tool_call>", len("<tool_call>"))
                if close < 0 and not final:
                    return None
                body_end, end = (close, close + len("</tool_call>")) if close >= 0 else (len(buf), len(buf))
                if calls := self._allowed(_tool_call_body(buf[len("<tool_call>"):body_end])):
                    return end, ("calls", calls)
                return len("<tool_call>"), ("text", "<tool_call>")  # not a call: read on inside it
            if not final and "<tool_call>".startswith(buf):
                return None
        if self.function_tag:
            if buf.startswith("<function="):
                m = _NAME_END.search(buf, len("<function="))
                if m is None:
                    return False if final else None
                if buf[m.start()] != ">" or m.start() == len("<function="):
                    return False
                name, after = buf[len("<function="):m.start()], m.end()
                brace = after
                while brace < len(buf) and buf[brace].isspace():
                    brace += 1
                if brace == len(buf) and not final:
                    return None
                if brace < len(buf) and buf[brace] == "{":
                    end = self._close(brace)
                    if end is None and not final:
                        return None
                    if end is not None and end > 0 and (args := _function_args(buf[brace:end])) is not None:
                        rest = buf[end:len(buf)]
                        if not final and len(rest) < len("</function>") and "</function>".startswith(rest):
                            return None
                        if rest.startswith("</function>"):
                            end += len("</function>")
                        if calls := self._allowed([(name, args)]):
                            return end, ("calls", calls)
                return after, ("text", buf[:after])  # the tag is text; read on after it
            if not final and "<function=".startswith(buf):
                return None
        return False

    def _builtin(self, final: bool):
        buf = self.buf
        name = _WORD.match(buf).group()
        if len(name) == len(buf) and not final:  # the word may go on
            return None if self.allowed is None or any(a.startswith(name) for a in self.allowed) else False
        if self.allowed is not None and name not in self.allowed:
            return False
        open_at = len(name) + len(".call")
        if not buf.startswith(".call(", len(name)):
            return None if not final and ".call(".startswith(buf[len(name):]) else False
        if name in BUILTIN_TOOLS:  # any keyword arguments
            end = self._close(open_at)
            if end is None and not final:
                return None
            if end is not None and end > 0 and (args := _kwargs(buf[open_at:end])) is not None:
                return end, ("calls", [(name, args)])
            return False
        # other names: Meta's exact name.call(query="...")
        q = open_at + 1 + len('query="')
        if not buf.startswith('query="', open_at + 1):
            return None if not final and 'query="'.startswith(buf[open_at + 1:]) else False
        close = buf.find('"', q)
        if close < 0 or close + 1 == len(buf):
            return False if final else None
        if buf[close + 1] != ")":
            return False
        return close + 2, ("calls", [(name, {"query": buf[q:close]})])


def scan_tool_calls(text: str, syntaxes=ALL_SYNTAXES, tools: list[dict] | None = None) -> list[tuple]:
    """All the pieces of a whole reply."""
    scanner = ToolCallScanner(syntaxes, tools)
    return scanner.push(text) + scanner.finish()


def python_tag_calls(text: str, syntaxes=ALL_SYNTAXES, tools: list[dict] | None = None) -> list[tuple]:
    """The pieces of what follows <|python_tag|>: the calls it holds, else code for code_interpreter."""
    pieces = scan_tool_calls(text, syntaxes, tools)
    if any(kind == "calls" for kind, _ in pieces):
        return pieces
    allowed = tool_names(tools)
    if text.strip() and (allowed is None or "code_interpreter" in allowed):
        return [("calls", [("code_interpreter", {"code": text})])]
    return [("text", text)] if text else []


def extract_tool_calls(content: str, *, python_tag: bool = False,
                       tools: list[dict] | None = None) -> tuple[str, list[ToolCall]]:
    """(remaining text, tool calls) found in a model's reply (header and end tokens already removed), every
    syntax enabled. Without calls the text comes back unchanged; with calls, stripped of outer whitespace."""
    pieces = (python_tag_calls if python_tag else scan_tool_calls)(content, ALL_SYNTAXES, tools)
    calls = [ToolCall(name=name, arguments=normalize_builtin(name, args))
             for kind, value in pieces if kind == "calls" for name, args in value]
    if not calls:
        return content, []
    return "".join(value for kind, value in pieces if kind == "text").strip(), calls
