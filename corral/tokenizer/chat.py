"""Chat formats: conversations (OpenAI-style message dicts) to prompt ids, and model replies back to messages.

- `Llama3ChatFormat`: Meta's `ChatFormat.encode_dialog_prompt`, token for token (spec §6.1): no implicit
  system turn, content not stripped, text items encoded one by one, `<|image|>` (128011) per image item,
  role `tool` written as `ipython`, `<|eom_id|>` closing an assistant message whose "stop_reason" is
  "end_of_message", assistant tool calls written with Meta's `encode_tool_call`. With `tools` the messages
  are first augmented with llama-stack's system prompts (`prompts.py`): python_list for 3.2 1B/3B, json /
  function_tag for 3.1 and 3.2-Vision.
- `JinjaChatFormat`: a Hugging Face chat template rendered like transformers' `apply_chat_template`
  (sandboxed jinja2, trim_blocks + lstrip_blocks, `raise_exception`, `strftime_now`, non-escaping `tojson`,
  `{% generation %}`), tokenized with special tokens recognised. A template that does not read `tools` gets
  the generic fallback `generic_tools_prompt` in its system message, and the model is asked to answer with
  `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.
- `chat_format_for(config, tokenizer)` picks one from the model config.
Both parse replies with `tool_calls.extract_tool_calls` (Meta's rules plus robustness).
"""

from __future__ import annotations

import datetime as _dt
import json
from typing import Any

import jinja2
import jinja2.ext
import jinja2.meta
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from corral.tokenizer.base import AssistantMessage, Tokenizer
from corral.tokenizer.prompts import (augment_messages_llama3_1, augment_messages_llama3_2, normalize_tools,
                                     tool_choice_prompt)
from corral.tokenizer.tool_calls import encode_tool_call, extract_tool_calls

TOOL_FORMATS = ("python_list", "json", "function_tag")
IMAGE_TYPES = ("image", "image_url")


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

    def parse_response(self, text: str, *, tools: list[dict] | None = None,
                       stop_reason: str | None = None) -> AssistantMessage:
        """Meta's `decode_assistant_message_from_content` rules (spec §6.6) plus `extract_tool_calls`.

        `stop_reason` ("end_of_turn" / "end_of_message") is what the engine saw when it stopped, for text
        without its end token; a trailing <|eot_id|> / <|eom_id|> in `text` decides otherwise. `tools=None`
        accepts any function name; a list (even empty) keeps only calls to its functions."""
        content = text.strip(" ")
        header = "<|start_header_id|>assistant<|end_header_id|>\n\n"
        if content.startswith(header):
            content = content[len(header):]
        python_tag = content.startswith("<|python_tag|>")
        if python_tag:
            content = content[len("<|python_tag|>"):]
        stop_reason = stop_reason or "end_of_turn"
        if content.endswith("<|eot_id|>"):
            content, stop_reason = content[:-len("<|eot_id|>")], "end_of_turn"
        elif content.endswith("<|eom_id|>"):
            content, stop_reason = content[:-len("<|eom_id|>")], "end_of_message"
        elif content.endswith("<|end_of_text|>"):
            content = content[:-len("<|end_of_text|>")]
        content, calls = extract_tool_calls(content, python_tag=python_tag, tools=tools)
        return AssistantMessage(content=content, tool_calls=calls, stop_reason=stop_reason)


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
        text = self.render(messages, tools=tools, add_generation_prompt=add_generation_prompt)
        return self.tokenizer.encode(text, allow_special=True)

    def parse_response(self, text: str, *, tools: list[dict] | None = None,
                       stop_reason: str | None = None) -> AssistantMessage:
        """The reply as a message: end token stripped, tool calls extracted (see Llama3ChatFormat.parse_response)."""
        content = text
        for end in (self.eos_token, "<|im_end|>", "<|eot_id|>", "<|endoftext|>", "</s>", "<|end|>"):
            if end and content.rstrip().endswith(end):
                content = content.rstrip()[:-len(end)]
                break
        python_tag = content.lstrip().startswith("<|python_tag|>")
        if python_tag:
            content = content.lstrip()[len("<|python_tag|>"):]
        stop_reason = stop_reason or "end_of_turn"
        if content.endswith("<|eom_id|>"):
            content, stop_reason = content[:-len("<|eom_id|>")], "end_of_message"
        content, calls = extract_tool_calls(content, python_tag=python_tag, tools=tools)
        return AssistantMessage(content=content, tool_calls=calls, stop_reason=stop_reason)


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
