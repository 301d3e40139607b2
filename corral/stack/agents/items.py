"""Items: the Responses / Conversations API's unit of history, and their chat-message form.

Three jobs, one place:
- `normalize_items`: what a client sends as `input` (a string, or items: messages with text and image
  parts, `function_call`, `function_call_output`, `mcp_approval_response`, and output items given
  back) checked and written the way they are stored and listed: every item gets an id and a status,
  every message a list of content parts. A bad item is a 400 naming it (`input[2].content[0].type`).
- `items_to_messages`: items as chat messages for the model: a `function_call` becomes an assistant
  tool call, its output a `tool` message, server-side tool calls (`mcp_call`, `code_interpreter_call`)
  the call and its result. The chat formats render those in the model's own syntax.
- ids: OpenAI's prefixes (`resp_`, `msg_`, `fc_`, `conv_`, ...).
"""

from __future__ import annotations

import json
import secrets
from typing import Any

from pydantic import ValidationError

from corral.stack.api import APIError, ImageURL

ROLES = ("user", "assistant", "system", "developer")


def new_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(24)}"


def bad(message: str, param: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code=code)


def text_message(role: str, text: str) -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    part = {"type": kind, "text": text, **({"annotations": [], "logprobs": []} if role == "assistant" else {})}
    return {"id": new_id("msg"), "type": "message", "role": role, "status": "completed", "content": [part]}


# ---------------------------------------------------------------------------------------------
# Input -> stored items


def normalize_items(value: Any, param: str = "input") -> list[dict]:
    if isinstance(value, str):
        return [text_message("user", value)]
    if not isinstance(value, list):
        raise bad("must be a string or a list of items", param)
    return [_item(it, f"{param}[{i}]") for i, it in enumerate(value)]


def _item(item: Any, where: str) -> dict:
    if not isinstance(item, dict):
        raise bad("an item must be an object", where)
    kind = item.get("type", "message")
    if kind == "message":
        return _message(item, where)
    if kind == "function_call":
        _need(item, where, call_id=str, name=str, arguments=str)
        return {"id": item.get("id") or new_id("fc"), "type": "function_call", "call_id": item["call_id"],
                "name": item["name"], "arguments": item["arguments"], "status": "completed"}
    if kind == "function_call_output":
        _need(item, where, call_id=str)
        output = item.get("output")
        if isinstance(output, list):  # content parts: their text
            output = "".join(p.get("text", "") for p in output if isinstance(p, dict))
        if not isinstance(output, str):
            raise bad("`output` must be a string", f"{where}.output")
        return {"id": item.get("id") or new_id("fco"), "type": "function_call_output", "call_id": item["call_id"],
                "output": output, "status": "completed"}
    if kind == "mcp_approval_response":
        _need(item, where, approval_request_id=str, approve=bool)
        return {"id": item.get("id") or new_id("mcpa"), "type": "mcp_approval_response",
                "approval_request_id": item["approval_request_id"], "approve": item["approve"],
                "reason": item.get("reason")}
    if kind in ("mcp_call", "mcp_list_tools", "mcp_approval_request", "code_interpreter_call", "web_search_call",
                "file_search_call"):
        if not item.get("id"):
            raise bad(f"a {kind} item given back needs its `id`", f"{where}.id")
        return dict(item)  # an output item of an earlier response, as it was returned
    raise bad(f"unsupported item type {kind!r} (Corral takes message, function_call, function_call_output, "
              "mcp_approval_response and its own output items)", f"{where}.type", code="unsupported_value")


def _need(item: dict, where: str, **fields: type) -> None:
    for name, kind in fields.items():
        if not isinstance(item.get(name), kind):
            raise bad(f"`{name}` is required ({kind.__name__})", f"{where}.{name}")


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in ROLES:
        raise bad(f"role must be one of {list(ROLES)}, got {role!r}", f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        parts = text_message(role, content)["content"]
    elif isinstance(content, list) and content:
        parts = [_part(p, role, f"{where}.content[{j}]") for j, p in enumerate(content)]
    else:
        raise bad("`content` must be a string or a non-empty list of parts", f"{where}.content")
    return {"id": item.get("id") or new_id("msg"), "type": "message", "role": role,
            "status": item.get("status") or "completed", "content": parts}


def _part(part: Any, role: str, where: str) -> dict:
    if not isinstance(part, dict):
        raise bad("a content part must be an object", where)
    kind = part.get("type")
    if kind in ("input_text", "output_text", "text"):
        if not isinstance(part.get("text"), str):
            raise bad("`text` is required", f"{where}.text")
        if role == "assistant":
            return {"type": "output_text", "text": part["text"], "annotations": part.get("annotations") or [],
                    "logprobs": part.get("logprobs") or []}
        return {"type": "input_text", "text": part["text"]}
    if kind == "refusal" and role == "assistant":
        return {"type": "refusal", "refusal": str(part.get("refusal", ""))}
    if kind == "input_image":
        if part.get("file_id"):
            raise bad("images by file_id are not supported: send `image_url` as a data: URL", f"{where}.file_id",
                      code="unsupported_value")
        try:  # data: URLs only; the server fetches nothing and reads no path of its own
            ImageURL(url=part.get("image_url") or "")
        except ValidationError as e:
            raise bad(e.errors()[0]["msg"].removeprefix("Value error, "), f"{where}.image_url") from None
        return {"type": "input_image", "image_url": part["image_url"], "detail": part.get("detail") or "auto"}
    raise bad(f"unsupported content part type {kind!r} (input_text, input_image, output_text)", f"{where}.type",
              code="unsupported_value")


# ---------------------------------------------------------------------------------------------
# Items -> chat messages


def _content(parts: list[dict]) -> str | list[dict]:
    """Text parts alone: one string; with images: chat content parts (text and image_url)."""
    if all(p["type"] in ("input_text", "output_text") for p in parts):
        return "".join(p["text"] for p in parts)
    out = []
    for p in parts:
        if p["type"] == "input_image":
            out.append({"type": "image_url", "image_url": {"url": p["image_url"]}})
        elif p["type"] in ("input_text", "output_text"):
            out.append({"type": "text", "text": p["text"]})
    return out


def tool_call(call_id: str, name: str, arguments: str) -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def items_to_messages(items: list[dict]) -> list[dict]:
    """Chat messages for the model; consecutive tool calls share one assistant message."""
    out: list[dict] = []

    def call(c: dict) -> None:
        last = out[-1] if out else None
        if last and last["role"] == "assistant" and last.get("tool_calls") and last.get("_open"):
            last["tool_calls"].append(c)
        else:
            out.append({"role": "assistant", "content": None, "tool_calls": [c], "_open": True})

    for it in items:
        kind = it["type"]
        if kind == "message":
            if it["role"] == "assistant" and any(p["type"] == "refusal" for p in it["content"]):
                text = "".join(p.get("refusal") or p.get("text", "") for p in it["content"])
                out.append({"role": "assistant", "content": text})
            else:
                out.append({"role": it["role"], "content": _content(it["content"])})
        elif kind == "function_call":
            call(tool_call(it["call_id"], it["name"], it["arguments"]))
        elif kind == "function_call_output":
            out.append({"role": "tool", "tool_call_id": it["call_id"], "content": it["output"]})
        elif kind == "mcp_call":
            call(tool_call(it["id"], it["name"], it["arguments"]))
            out.append({"role": "tool", "tool_call_id": it["id"], "content": it.get("output") or it.get("error") or ""})
        elif kind == "code_interpreter_call":
            call(tool_call(it["id"], "code_interpreter", json.dumps({"code": it.get("code") or ""})))
            logs = "".join(o.get("logs", "") for o in it.get("outputs") or [])
            out.append({"role": "tool", "tool_call_id": it["id"], "content": logs})
        # mcp_list_tools, approval items and search calls without results carry nothing for the model
    for m in out:
        m.pop("_open", None)
    return out


def merge_system(messages: list[dict]) -> list[dict]:
    """One system message at the front (instructions, then system/developer input): the chat formats take one."""
    system = [m for m in messages if m["role"] in ("system", "developer")]
    if not system:
        return messages
    text = "\n\n".join(m["content"] if isinstance(m["content"], str)
                       else "".join(p.get("text", "") for p in m["content"]) for m in system)
    return [{"role": "system", "content": text}] + [m for m in messages if m["role"] not in ("system", "developer")]
