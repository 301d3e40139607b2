"""Chat formats: conversations (OpenAI-style message dicts) to prompt ids, and model replies back to messages.

- `Llama3ChatFormat`: Meta's `ChatFormat.encode_dialog_prompt`, token for token (spec §6.1): no implicit
  system turn, content not stripped, text items encoded one by one, `<|image|>` (128011) per image item,
  role `tool` written as `ipython`, `<|eom_id|>` closing an assistant message whose "stop_reason" is
  "end_of_message", assistant tool calls written with Meta's `encode_tool_call`. With `tools` the messages
  are first augmented with llama-stack's system prompts (`prompts.py`): python_list for 3.2 1B/3B, json /
  function_tag for 3.1 and 3.2-Vision.
- `JinjaChatFormat`: a Hugging Face chat template rendered like transformers' `apply_chat_template`
  (sandboxed jinja2, trim_blocks + lstrip_blocks, `raise_exception`, `strftime_now`, non-escaping `tojson`,
  `{% generation %}`), tokenized with the template's special tokens recognised and none from the messages:
  `<|im_start|>` typed in a message is text (`SpecialText`; transformers would make it a control token).
  A template that does not read `tools` gets the generic fallback `generic_tools_prompt` in its system
  message, and the model is asked to answer with `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `chat_format_for(config, tokenizer)` picks one from the model config.
Both read replies through a `tool_stream.ToolCallStreamer` set up for their syntax (`tool_call_streamer(tools)`);
`parse_response` is that streamer fed the whole reply, so streamed and whole replies parse the same.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from corral.tokenizer.base import AssistantMessage, Tokenizer
from corral.tokenizer.prompts import (augment_messages_llama3_1, augment_messages_llama3_2, normalize_tools,
                                     tool_choice_prompt)
from corral.tokenizer.tool_calls import ALL_SYNTAXES, encode_tool_call
from corral.tokenizer.tool_stream import ToolCallStreamer

TOOL_FORMATS = ("python_list", "json", "function_tag")
IMAGE_TYPES = ("image", "image_url")

# How Llama 3 replies read (Meta's decoder): every form it knows, whatever the prompt asked for.
LLAMA3_SYNTAXES = frozenset({"python_list", "json", "function_tag", "builtin", "bare", "python_tag"})
LLAMA3_ASSISTANT_HEADER = "<|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_ENDS = {"<|eot_id|>": "end_of_turn", "<|eom_id|>": "end_of_message", "<|end_of_text|>": None}
JINJA_END_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end|>")


def _tool_call_parts(call: Any, where: str) -> tuple[str, dict]:
    """An OpenAI tool call dict ({"function": {"name", "arguments": json str}}) or a ToolCall -> (name, args)."""
    if hasattr(call, "name") and hasattr(call, "arguments"):
        return call.name, dict(call.arguments)
    if not isinstance(call, dict):
        raise ValueError(f"{where} must be an object, got {type(call).__name__}")
    fn = call.get("function", call)
    name, args = fn.get("name"), fn.get("arguments", fn.get("parameters", {}))
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where}.function.name is missing")
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}.function.arguments is not valid JSON ({e})") from e
    if not isinstance(args, dict):
        raise ValueError(f"{where}.function.arguments must be a JSON object, got {type(args).__name__}")
    return name, args


def dialog_images(messages: list[dict]) -> list[Any]:
    """The image references of a conversation in prompt order (one per `<|image|>` the chat format emits)."""
    images = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, list):
            for item in content:
                if isinstance(item, dict) and item.get("type") == "image":
                    images.append(item.get("image"))
                elif isinstance(item, dict) and item.get("type") == "image_url":
                    url = item.get("image_url")
                    images.append(url.get("url") if isinstance(url, dict) else url)
    return images


class Llama3ChatFormat:
    """Meta's Llama 3 chat format (3.1, 3.2 text and vision, 3.3)."""

    def __init__(self, tokenizer: Tokenizer, tool_format: str = "python_list", *, today: _dt.date | None = None):
        if tool_format not in TOOL_FORMATS:
            raise ValueError(f"tool_format must be one of {TOOL_FORMATS}, got {tool_format!r}")
        self.tokenizer = tokenizer
        self.tool_format = tool_format
        self.today = today  # None: the real date, in the Llama 3.1 "Today Date:" line
        sp = tokenizer.special_tokens
        needed = ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"]
        if missing := [t for t in needed if t not in sp]:
            raise ValueError(f"the Llama 3 chat format needs the special tokens {missing}, which this tokenizer lacks")
        self.start_header, self.end_header = sp["<|start_header_id|>"], sp["<|end_header_id|>"]
        self.eot, self.eom, self.python_tag = sp["<|eot_id|>"], sp["<|eom_id|>"], sp["<|python_tag|>"]
        self.image = sp.get("<|image|>")  # HF's Llama 3.2 text tokenizer names 128011 <|reserved_special_token_3|>

    # --- encoding ------------------------------------------------------------------------------------------

    def encode_header(self, role: str) -> list[int]:
        role = "ipython" if role == "tool" else role
        return [self.start_header, *self.tokenizer.encode(role), self.end_header, *self.tokenizer.encode("\n\n")]

    def encode_content(self, content: Any, where: str) -> list[int]:
        if content is None:
            return []
        if isinstance(content, str):
            return self.tokenizer.encode(content)
        if not isinstance(content, list):
            raise ValueError(f"{where}.content must be a string or a list of content items")
        ids: list[int] = []
        for j, item in enumerate(content):
            kind = item.get("type") if isinstance(item, dict) else None
            if kind == "text":
                ids += self.tokenizer.encode(item.get("text", ""))
            elif kind in IMAGE_TYPES:
                if self.image is None:
                    raise ValueError(f"{where}.content[{j}] is an image, but this tokenizer has no <|image|> token")
                ids.append(self.image)
            else:
                raise ValueError(f"{where}.content[{j}] has unsupported type {kind!r} (expected 'text', 'image', "
                                 "'image_url')")
        return ids

    def encode_message(self, message: dict, where: str = "message") -> list[int]:
        role = message.get("role")
        if role not in ("system", "user", "assistant", "tool", "ipython"):
            raise ValueError(f"{where}.role must be system, user, assistant, tool or ipython, got {role!r}")
        ids = self.encode_header(role)
        calls = [_tool_call_parts(c, f"{where}.tool_calls[{j}]")
                 for j, c in enumerate(message.get("tool_calls") or [])] if role == "assistant" else []
        if calls and calls[0][0] == "code_interpreter":
            ids.append(self.python_tag)
        ids += self.encode_content(message.get("content"), where)
        if role == "user" and message.get("context") is not None:  # RAG context, inside the user turn
            ids += self.tokenizer.encode("\n\n") + self.encode_content(message["context"], f"{where}.context")
        for name, args in calls:
            ids += self.tokenizer.encode(encode_tool_call(name, args, self.tool_format))
        eom = role == "assistant" and message.get("stop_reason") == "end_of_message"
        ids.append(self.eom if eom else self.eot)
        return ids

    def augment_messages(self, messages: list[dict], tools: list[dict] | None,
                         tool_choice: str | dict | None) -> list[dict]:
        """The conversation with llama-stack's tool system prompts added (unchanged without tools)."""
        if tool_choice == "none" or (not tools and tool_choice in (None, "auto")):
            return list(messages)
        if self.tool_format == "python_list":
            return augment_messages_llama3_2(messages, tools, tool_choice)
        return augment_messages_llama3_1(messages, tools, tool_choice, tool_format=self.tool_format, today=self.today)

    def encode_dialog(self, messages: list[dict], *, tools: list[dict] | None = None,
                      tool_choice: str | dict | None = None, add_generation_prompt: bool = True) -> list[int]:
        messages = self.augment_messages(messages, tools, tool_choice)
        ids = [self.tokenizer.bos_id]
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ValueError(f"messages[{i}] must be an object, got {type(message).__name__}")
            ids += self.encode_message(message, f"messages[{i}]")
        if add_generation_prompt:
            ids += self.encode_header("assistant")
        return ids

    def encode_completion(self, content: Any) -> list[int]:
        """A plain (base-model) prompt, Meta's `encode_content`: <|begin_of_text|> then the text / image items,
        no header and no end token; a prompt starting with an image gives <|begin_of_text|><|image|>... (spec §9.5)."""
        return [self.tokenizer.bos_id, *self.encode_content(content, "prompt")]

    # --- decoding ------------------------------------------------------------------------------------------

    def tool_call_streamer(self, tools: list[dict] | None = None, *,
                           stop_reason: str | None = None) -> ToolCallStreamer:
        """A streaming reader of this format's replies: Meta's `decode_assistant_message_from_content` rules
        (spec §6.6): spaces stripped, the assistant header dropped, <|python_tag|> opening code or a builtin
        call, <|eot_id|> / <|eom_id|> closing the turn; calls in every form Meta's decoder reads (pythonic list,
        JSON, <function=...>, builtins), whatever the tool_format the prompt asked for."""
        return ToolCallStreamer(LLAMA3_SYNTAXES, tools, lead=" ", header=LLAMA3_ASSISTANT_HEADER,
                                ends=LLAMA3_ENDS, stop_reason=stop_reason)

    def parse_response(self, text: str, *, tools: list[dict] | None = None,
                       stop_reason: str | None = None) -> AssistantMessage:
        """The reply as a message: exactly what `tool_call_streamer` gives when fed the whole text.

        `stop_reason` ("end_of_turn" / "end_of_message") is what the engine saw when it stopped, for text
        without its end token; a trailing <|eot_id|> / <|eom_id|> in `text` decides otherwise. `tools=None`
        accepts any function name; a list (even empty) keeps only calls to its functions."""
        return _parse_whole(self.tool_call_streamer(tools, stop_reason=stop_reason), text)


# --- Hugging Face chat templates ------------------------------------------------------------------------

class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (transformers' assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return _dt.datetime.now().strftime(fmt)


class SpecialText:
    """Special-token strings inside conversation data (`<|im_start|>` typed by a user), kept as plain text.

    `protect(data)` swaps each one in every string (and key) of the data for a placeholder, a private-use
    character around its number, picked so that the data does not contain it. `encode(rendered)` then tokenizes
    the rendered prompt with the special tokens left in it (the template's scaffolding) as special ids, and
    everything between them, placeholders back to their text, with special tokens off. Tokenizers cut text at
    special tokens before anything else, so a prompt without such strings encodes exactly as a whole; an
    added token that strips the whitespace beside it (`lstrip` / `rstrip`, e.g. Phi-3's) strips it here too.
    """

    def __init__(self, tokenizer: Tokenizer, data: Any):
        self.tokenizer = tokenizer
        self.specials = dict(tokenizer.special_tokens)
        self.strip = dict(getattr(tokenizer, "special_strip", None) or {})  # token -> (lstrip, rstrip)
        names = "|".join(re.escape(t) for t in sorted(self.specials, key=len, reverse=True))
        self._special = re.compile(names) if names else None
        used = set().union(*(set(s) for s in _strings(data))) if self._special else set()
        self.mark = next(chr(c) for c in range(0xF8FF, 0xE000, -1) if chr(c) not in used)
        mark = f"(?:{re.escape(self.mark)}|\\\\u{ord(self.mark):04x})"  # also as tojson(ensure_ascii=True) writes it
        self._piece = re.compile(f"{mark}(\\d+){mark}" + (f"|{names}" if names else ""))
        self.found: list[str] = []

    def protect(self, data: Any) -> Any:
        if self._special is None:
            return data
        if isinstance(data, str):
            return self._special.sub(self._swap, data)
        if isinstance(data, dict):
            return {self.protect(k): self.protect(v) for k, v in data.items()}
        if isinstance(data, (list, tuple)):
            return [self.protect(v) for v in data]
        return data

    def _swap(self, m: re.Match) -> str:
        self.found.append(m.group())
        return f"{self.mark}{len(self.found) - 1}{self.mark}"

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pending: list[str] = []  # text since the last special token
        pos, strip_next = 0, False
        for m in self._piece.finditer(text):
            pending.append(text[pos:m.start()])
            pos = m.end()
            if m.group(1) is not None:  # a placeholder: its text
                pending.append(self.found[int(m.group(1))])
                continue
            lstrip, rstrip = self.strip.get(m.group(), (False, False))
            ids += self._text(pending, strip_next, lstrip)
            ids.append(self.specials[m.group()])
            pending, strip_next = [], rstrip
        pending.append(text[pos:])
        return ids + self._text(pending, strip_next, False)

    def _text(self, pending: list[str], lstrip: bool, rstrip: bool) -> list[int]:
        text = "".join(pending)
        text = text.lstrip() if lstrip else text
        text = text.rstrip() if rstrip else text
        return self.tokenizer.encode(text) if text else []


def _strings(data: Any):
    """Every string in nested dicts / lists (keys included)."""
    if isinstance(data, str):
        yield data
    elif isinstance(data, dict):
        for k, v in data.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(data, (list, tuple)):
        for v in data:
            yield from _strings(v)


def compile_chat_template(template: str) -> jinja2.Template:
    """A template compiled in the environment transformers' `apply_chat_template` uses."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template does not compile: {e} (line {e.lineno})") from e


def generic_tools_prompt(tools: list[dict]) -> str:
    """Fallback tool instructions for templates that do not render `tools` themselves."""
    specs = [{"name": t.name, "description": t.description, "parameters": t.parameters}
             for t in normalize_tools(tools)]
    return ("You can call the following tools. To call a tool, reply with only a JSON object inside "
            "<tool_call></tool_call> tags:\n"
            '<tool_call>{"name": <tool name>, "arguments": <arguments as a JSON object>}</tool_call>\n'
            "Use one <tool_call> block per call. Tools:\n" + json.dumps(specs, ensure_ascii=False, indent=2))


class JinjaChatFormat:
    """A Hugging Face chat template (SmolLM2 and any checkpoint that ships one)."""

    def __init__(self, tokenizer: Tokenizer, template: str, *, bos_token: str | None = None,
                 eos_token: str | None = None, extra_context: dict | None = None):
        if not isinstance(template, str) or not template.strip():
            raise ValueError("a Jinja chat format needs a non-empty chat template")
        self.tokenizer = tokenizer
        self.template_source = template
        self.template = compile_chat_template(template)
        self.bos_token = bos_token if bos_token is not None else getattr(tokenizer, "bos_token", None)
        self.eos_token = eos_token if eos_token is not None else getattr(tokenizer, "eos_token", None)
        self.extra_context = dict(extra_context or {})
        ast = self.template.environment.parse(template)
        self.template_reads_tools = "tools" in jinja2.meta.find_undeclared_variables(ast)
        self.tool_syntaxes = template_tool_syntaxes(template, self.template_reads_tools)

    def _fallback_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """Rewrite tools and tool calls into plain text for a template that cannot render them."""
        out = []
        for m in messages:
            m = dict(m)
            if m.get("role") == "assistant" and m.get("tool_calls"):
                calls = [_tool_call_parts(c, "tool_calls[]") for c in m.pop("tool_calls")]
                text = "".join(f'<tool_call>{json.dumps({"name": n, "arguments": a}, ensure_ascii=False)}</tool_call>'
                               for n, a in calls)
                m["content"] = (m.get("content") or "") + text
            out.append(m)
        if tools:
            prompt = generic_tools_prompt(tools)
            if out and out[0].get("role") == "system":
                out[0] = {**out[0], "content": f"{out[0].get('content') or ''}\n\n{prompt}".lstrip("\n")}
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               add_generation_prompt: bool = True, **kwargs) -> str:
        """The prompt text, as transformers' `apply_chat_template(tokenize=False)` renders it."""
        messages = [self._simple_content(m) for m in messages]
        if self.template_reads_tools:
            tool_arg = tools or None
        else:
            has_calls = any(m.get("role") == "assistant" and m.get("tool_calls") for m in messages)
            if tools or has_calls:
                messages = self._fallback_messages(messages, tools)
            tool_arg = None
        context = {"bos_token": self.bos_token, "eos_token": self.eos_token, **self.extra_context, **kwargs}
        try:
            return self.template.render(messages=messages, tools=tool_arg, documents=None,
                                        add_generation_prompt=add_generation_prompt, **context)
        except (jinja2.TemplateError, TypeError) as e:  # TypeError: e.g. a template adding str and list content
            raise ValueError(f"chat template error: {e}") from e

    @staticmethod
    def _simple_content(message: dict) -> dict:
        """Text-only content lists become one string (templates written for strings then work)."""
        content = message.get("content")
        if isinstance(content, list) and all(isinstance(c, dict) and c.get("type") == "text" for c in content):
            return {**message, "content": "".join(c.get("text", "") for c in content)}
        return message

    def encode_dialog(self, messages: list[dict], *, tools: list[dict] | None = None,
                      tool_choice: str | dict | None = None, add_generation_prompt: bool = True) -> list[int]:
        if tool_choice == "none":
            tools = None
        elif tool_choice not in (None, "auto"):
            # "required" / a named function: llama-stack's sentence, appended to the last user message.
            sentence = tool_choice_prompt(tool_choice, normalize_tools(tools))
            messages = list(messages)
            for i in range(len(messages) - 1, -1, -1):
                if messages[i].get("role") == "user" and isinstance(messages[i].get("content"), str):
                    messages[i] = {**messages[i], "content": f"{messages[i]['content']}\n\n{sentence}"}
                    break
            else:
                raise ValueError(f"tool_choice={tool_choice!r} needs a user message with text content")
        # Message text is text: special-token strings in it are swapped for placeholders while the template
        # renders, so that only the template's own scaffolding reaches the tokenizer as special tokens.
        guard = SpecialText(self.tokenizer, (messages, tools, self.template_source))
        text = self.render(guard.protect(messages), tools=guard.protect(tools),
                           add_generation_prompt=add_generation_prompt)
        return guard.encode(text)

    def tool_call_syntax(self) -> tuple[str, str, str]:
        """(style, prefix, suffix) for a constrained tool call (`engine.constrained.tool_call_grammar`), in a
        syntax this format reads back."""
        if "tool_call" in self.tool_syntaxes:
            return "generic", "<tool_call>", "</tool_call>"
        return ("json" if "json" in self.tool_syntaxes else "python_list"), "", ""

    def tool_call_streamer(self, tools: list[dict] | None = None, *,
                           stop_reason: str | None = None) -> ToolCallStreamer:
        """A streaming reader of this template's replies: the end token stripped, tool calls in the syntaxes
        the template asks for (`template_tool_syntaxes`)."""
        ends = {e: None for e in (self.eos_token, *JINJA_END_TOKENS) if e}
        ends.update({f"<|eom_id|>{e}": "end_of_message" for e in ends})
        ends["<|eom_id|>"] = "end_of_message"
        return ToolCallStreamer(self.tool_syntaxes, tools, lead=None, ends=ends, stop_reason=stop_reason)

    def parse_response(self, text: str, *, tools: list[dict] | None = None,
                       stop_reason: str | None = None) -> AssistantMessage:
        """The reply as a message: exactly what `tool_call_streamer` gives when fed the whole text."""
        return _parse_whole(self.tool_call_streamer(tools, stop_reason=stop_reason), text)


def template_tool_syntaxes(template: str, reads_tools: bool) -> frozenset[str]:
    """The tool-call syntaxes a chat template's model answers in, read from the template's own words.

    A template that does not render `tools` gets our generic prompt, which asks for <tool_call> blocks
    (<function=...> tags are read too: both are tags, cheap to wait for). One that renders them names its
    syntax: <tool_call> (Hermes, Qwen), <function= (Llama 3.1 custom tools), "parameters" / {"name" (Llama
    3.1 / 3.2 JSON), a pythonic [func_name(...)] list (Llama 3.2 / 3.3 / 4), <|python_tag|> (builtins).
    A template that names none of them: every syntax. Each set holds one that a constrained call can be
    written in (tool_call, json or python_list: `JinjaChatFormat.tool_call_syntax`)."""
    if not reads_tools:
        return frozenset({"tool_call", "function_tag"})
    found = set()
    if "<tool_call>" in template:
        found.add("tool_call")
    if "<function=" in template:
        found.add("function_tag")
    if "<tool_call>" not in template and ('"parameters"' in template or '{"name"' in template):
        found.add("json")
    if re.search(r"\[func_name\d*\(|\[function_name\d*\(", template):
        found.update({"python_list", "bare"})
    if "<|python_tag|>" in template:
        found.update({"python_tag", "builtin"})
    if not found:
        return ALL_SYNTAXES
    if not found & {"tool_call", "json", "python_list"}:
        found.add("tool_call")
    return frozenset(found)


def _parse_whole(streamer: ToolCallStreamer, text: str) -> AssistantMessage:
    streamer.push(text)
    streamer.finish()
    return streamer.message


def chat_format_for(config, tokenizer: Tokenizer, chat_template: str | None = None):
    """The chat format a model config asks for: "llama3" (Meta's) or "jinja" (the checkpoint's template)."""
    kind = getattr(config, "chat_format", "llama3")
    if kind == "llama3":
        return Llama3ChatFormat(tokenizer, tool_format=getattr(config, "tool_format", "python_list"))
    if kind == "jinja":
        template = chat_template or getattr(tokenizer, "chat_template", None)
        if not template:
            raise ValueError(f"model {getattr(config, 'name', '?')!r} uses a Jinja chat format but neither the "
                             "checkpoint nor the caller provides a chat template")
        return JinjaChatFormat(tokenizer, template)
    raise ValueError(f"unknown chat_format {kind!r} in the config of {getattr(config, 'name', '?')!r} "
                     "(expected 'llama3' or 'jinja')")
