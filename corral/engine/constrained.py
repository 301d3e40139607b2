"""Constrained decoding with llguidance: a grammar in, a LogitsProcessor out.

A grammar is compiled for one Corral tokenizer: llguidance gets the raw bytes of every token (from
`Tokenizer.token_bytes`), which special ids there are and which ids end a generation, so the mask it
computes is exact for the model's own vocabulary. What we compile:
  - `json_schema_grammar(schema)`: OpenAI `response_format: json_schema` (and `json_object` as
    `{"type": "object"}`);
  - `tool_call_grammar(tools, style)`: a call in the model's own tool syntax whose arguments match the
    function's JSON schema (`tool_choice: required` or a named function);
  - `lark_grammar(text)`: anything else.
A grammar llguidance cannot compile raises GrammarError with llguidance's reason: never fall back to
unconstrained text (llama.cpp#19051).

The processor is called once per step with the ids generated so far and the next-token logits
(vocab,) fp32; it feeds the new ids to the matcher and sets every disallowed logit to -inf. Once the
grammar is complete only the tokenizer's stop ids remain allowed, so generation ends by itself.
"""

from __future__ import annotations

import json
import re
import threading
import weakref
from typing import Any

import llguidance
import numpy as np
import torch

from corral.tokenizer.base import Tokenizer


class GrammarError(ValueError):
    """A schema or grammar that cannot be compiled (the message says why)."""


# Building an LLTokenizer walks the whole vocabulary (~1 s for 128K tokens): one per tokenizer object.
_LL_TOKENIZERS: "weakref.WeakKeyDictionary[Any, llguidance.LLTokenizer]" = weakref.WeakKeyDictionary()
_LL_LOCK = threading.Lock()


class _TokenizerAdapter:
    """What llguidance's TokenizerWrapper reads: tokens as bytes, eos/bos, special ids, and encode()."""

    def __init__(self, tokenizer: Tokenizer):
        self._tok = tokenizer
        self.eos_token_id = tokenizer.eos_id
        self.bos_token_id = tokenizer.bos_id
        special = set(tokenizer.special_tokens.values())
        self.special_token_ids = sorted(i for i in special if i < tokenizer.vocab_size)
        # llguidance's convention: a special token's bytes are 0xFF + its name, so no grammar text
        # can ever match it by accident.
        names = {i: s for s, i in tokenizer.special_tokens.items()}
        self.tokens = [b"\xff" + names[i].encode() if i in names else tokenizer.token_bytes(i)
                       for i in range(tokenizer.vocab_size)]

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tok.encode(text)


def ll_tokenizer(tokenizer: Tokenizer) -> llguidance.LLTokenizer:
    """The llguidance view of a Corral tokenizer (cached per tokenizer object)."""
    with _LL_LOCK:
        try:
            return _LL_TOKENIZERS[tokenizer]
        except (KeyError, TypeError):
            pass
        wrapper = llguidance.TokenizerWrapper(_TokenizerAdapter(tokenizer))
        eos = sorted(tokenizer.stop_ids) or [tokenizer.eos_id]
        ll = llguidance.LLTokenizer(wrapper, n_vocab=tokenizer.vocab_size, eos_token=eos)
        try:
            _LL_TOKENIZERS[tokenizer] = ll
        except TypeError:  # not weak-referenceable: just don't cache
            pass
        return ll


# ---------------------------------------------------------------------------------------------
# Grammars (llguidance grammar strings; checked by `compile_grammar`).


def json_schema_grammar(schema: dict | str | bool) -> str:
    """OpenAI strict json_schema output: compact JSON that validates against `schema`."""
    if isinstance(schema, bool):
        schema = {} if schema else {"not": {}}
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False})
    except (ValueError, TypeError) as e:
        raise GrammarError(f"the JSON schema is not a JSON object: {e}") from None


def json_object_grammar() -> str:
    """`response_format: json_object`: any JSON object."""
    return json_schema_grammar({"type": "object"})


def lark_grammar(text: str) -> str:
    return llguidance.LLMatcher.grammar_from_lark(text)


def _lark_literal(s: str) -> str:
    return json.dumps(s)  # a JSON string is a valid Lark string literal


def _compact(schema: dict) -> str:
    """A schema for Lark's `%json`, with llguidance told to emit compact JSON (no free whitespace)."""
    return json.dumps({**schema, "x-guidance": {"whitespace_flexible": False}})


def _python_value_rule(name: str, schema: dict) -> str:
    """A Lark rule for one Python literal argument of the 3.2 pythonic format.

    Python spells JSON's true/false/null as True/False/None; strings, numbers, lists and dicts of
    those are JSON-compatible, so everything else is delegated to llguidance's JSON support.
    """
    t = schema.get("type") if isinstance(schema, dict) else None
    if t == "boolean":
        return f'{name}: "True" | "False"'
    if t == "null":
        return f'{name}: "None"'
    return f"{name}: %json {_compact(schema)}"


def _python_arguments(k: int, params: dict, rules: list[str]) -> str:
    """Lark for the keyword arguments of tool k: `a=1, b="x"`, in schema order, optional ones omissible.

    A property is optional unless `required` lists it (JSON Schema's rule: no `required`, all optional).
    The arguments are a comma-separated subsequence of the properties that keeps every required one:
    one alternative per property that can come first (it and every later required one present, the
    optional ones between present or not), each later argument carrying its own leading ", ".
    Returns "" for a function without properties.
    """
    props = params.get("properties") or {}
    required = set(params.get("required") or []) & set(props)
    names = list(props)
    args = []
    for j, p in enumerate(names):
        rule = f"arg_{k}_{j}"
        rules.append(_python_value_rule(rule, props[p]))
        args.append(f"{_lark_literal(p + '=')} {rule}")
    if not args:
        return ""

    def after(j: int) -> str:  # the arguments after the j-th, each with its ", "
        later = [f'", " {args[i]}' if names[i] in required else f'(", " {args[i]})?' for i in range(j + 1, len(names))]
        return " ".join(later)

    firsts = []
    for j in range(len(names)):
        firsts.append(f"{args[j]} {after(j)}".strip())
        if names[j] in required:  # nothing after a required argument can come first
            break
    seq = " | ".join(f"({f})" for f in firsts)
    return f"({seq})" if required else f"({seq})?"


def tool_call_grammar(tools: list[dict], style: str, *, prefix: str = "", suffix: str = "",
                      optional: bool = False) -> str:
    """A grammar forcing exactly one call to one of `tools` in the model's own syntax.

    optional=True (tool_choice auto with strict tools): the reply is either such a call or free text
    that does not start the way a call starts (its first character differs from the call's).

    style:
      "python_list"  Llama 3.2 1B/3B: `[name(a=1, b="x")]` (schema order; optional ones may be left out)
      "json"         Llama 3.1: `{"name": "f", "parameters": {...}}`
      "generic"      Jinja models without native tools: `{"name": "f", "arguments": {...}}`
    prefix/suffix wrap the call (e.g. a template's `<tool_call>` ... `</tool_call>`).
    """
    if not tools:
        raise GrammarError("a tool call was required but no tools were given")
    alternatives, rules = [], []
    for k, tool in enumerate(tools):
        fn = tool.get("function", tool)
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise GrammarError(f"tools[{k}].function.name is missing")
        params = dict(fn.get("parameters") or {"type": "object", "properties": {}})
        params.setdefault("additionalProperties", False)  # as OpenAI's strict function calling
        if style == "python_list":
            args = _python_arguments(k, params, rules)
            alternatives.append(f'{_lark_literal(name + "(")} {args} ")"' if args else _lark_literal(name + "()"))
        elif style in ("json", "generic"):
            key = "parameters" if style == "json" else "arguments"
            schema = {"type": "object", "properties": {"name": {"const": name}, key: params},
                      "required": ["name", key], "additionalProperties": False}
            rules.append(f"call_{k}: %json {_compact(schema)}")
            alternatives.append(f"call_{k}")
        else:
            raise GrammarError(f"unknown tool-call style {style!r}")
    call = " | ".join(alternatives)
    if style == "python_list":
        call = f'"[" ({call}) "]"'
    else:
        call = f"({call})"
    head = f"{_lark_literal(prefix)} " if prefix else ""
    tail = f" {_lark_literal(suffix)}" if suffix else ""
    start = f"{head}{call}{tail}"
    if optional:
        # Free text must not be readable as a call by corral.tokenizer.tool_calls: it may not start
        # with whitespace or a call's opening character, contain a call tag anywhere, or be a bare
        # call `name(` to one of the tools.
        names = "|".join(re.escape(t.get("function", t)["name"]) for t in tools)
        first = re.escape("<[{" + (prefix[:1] if prefix else ""))
        start = f"({start}) | FREE"
        rules.append(f"FREE: /[^\\s{first}](?s:.*)/ & ~/(?s:.*(<tool_call>|<function=|<\\|python_tag\\|>).*)/"
                     f" & ~/(?s:({names})\\s*\\(.*)/")
    return lark_grammar("\n".join([f"start: {start}", *rules]))


# ---------------------------------------------------------------------------------------------
# The processor.


def compile_grammar(grammar: str, tokenizer: Tokenizer) -> llguidance.LLMatcher:
    """A fresh matcher for `grammar`; GrammarError with llguidance's message if it does not compile."""
    ll = ll_tokenizer(tokenizer)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, ll)
    if is_error:
        raise GrammarError(messages[0] if messages else "the grammar does not compile")
    matcher = llguidance.LLMatcher(ll, grammar, log_level=0)
    if matcher.is_error():
        raise GrammarError(matcher.get_error())
    return matcher


class GrammarLogitsProcessor:
    """LogitsProcessor: (ids generated so far, logits (vocab,) fp32) -> logits with the grammar's mask.

    One per generation (it holds the parser state). `done` is True once the grammar is complete.
    """

    def __init__(self, grammar: str, tokenizer: Tokenizer):
        self.matcher = compile_grammar(grammar, tokenizer)
        self.vocab_size = tokenizer.vocab_size
        self.n_consumed = 0
        self.bitmask = torch.full(((self.vocab_size + 31) // 32,), -1, dtype=torch.int32)

    @property
    def done(self) -> bool:
        return self.matcher.is_stopped() or self.matcher.is_accepting()

    def __call__(self, ids: list[int], logits: torch.Tensor) -> torch.Tensor:
        for t in ids[self.n_consumed:]:
            if not self.matcher.consume_token(t):
                raise RuntimeError(f"constrained decoding: token {t} was rejected: {self.matcher.get_error()}")
        self.n_consumed = len(ids)
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        # (n_words,) int32, bit j of word i = token 32*i + j  ->  (vocab,) bool
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), bitorder="little")[: self.vocab_size]
        allowed = torch.from_numpy(bits.astype(bool))
        n = min(self.vocab_size, logits.shape[-1])
        out = torch.full_like(logits, float("-inf"))
        out[..., :n] = logits[..., :n].masked_fill(~allowed[:n], float("-inf"))
        return out


def json_schema_processor(schema: dict, tokenizer: Tokenizer) -> GrammarLogitsProcessor:
    return GrammarLogitsProcessor(json_schema_grammar(schema), tokenizer)


def tool_call_processor(tools: list[dict], style: str, tokenizer: Tokenizer, **wrap) -> GrammarLogitsProcessor:
    return GrammarLogitsProcessor(tool_call_grammar(tools, style, **wrap), tokenizer)
