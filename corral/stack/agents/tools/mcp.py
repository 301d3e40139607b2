"""MCP tools: any Model Context Protocol server, through the official `mcp` package.

A request's `{"type": "mcp", "server_label", "server_url", "headers", "authorization", "allowed_tools",
"require_approval"}` names one server. Its tool list is fetched once per response (the `mcp_list_tools`
item) and each call opens its own short session: the `mcp` client's task groups stay inside one await,
so nothing of it lives across the agent loop's yields. Streamable HTTP is the transport; a URL whose
path ends in `/sse` uses the older SSE transport.

`require_approval`: "always" (OpenAI's default), "never", or `{"always": {"tool_names": [...]},
"never": {"tool_names": [...]}}`. A call that needs approval ends the response with an
`mcp_approval_request` item; the client answers with an `mcp_approval_response` input item in the next
request (with `previous_response_id` or the same `conversation`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from corral.stack.api import APIError

TIMEOUT_S = 60.0


@dataclass
class McpServer:
    label: str
    url: str
    headers: dict[str, str] = field(default_factory=dict)
    allowed: set[str] | None = None
    approval_always: bool = True
    approval_tools: dict[str, bool] = field(default_factory=dict)  # name -> needs approval
    tools: list[dict] = field(default_factory=list)  # [{name, description, input_schema, annotations}]

    @classmethod
    def from_spec(cls, spec: dict, where: str) -> McpServer:
        allowed_keys = {"type", "server_label", "server_url", "headers", "authorization", "allowed_tools",
                        "require_approval", "server_description"}
        extra = sorted(set(spec) - allowed_keys)
        if extra:
            raise APIError(400, f"{where}.{extra[0]}: not supported for mcp tools (connector_id and other "
                                "hosted connectors are OpenAI's)", param=f"{where}.{extra[0]}", code="unsupported_parameter")
        for key in ("server_label", "server_url"):
            if not isinstance(spec.get(key), str) or not spec[key]:
                raise APIError(400, f"{where}.{key} is required", param=f"{where}.{key}")
        if not spec["server_url"].startswith(("http://", "https://")):
            raise APIError(400, f"{where}.server_url must be an http(s) URL", param=f"{where}.server_url")
        headers = dict(spec.get("headers") or {})
        if spec.get("authorization"):
            headers["Authorization"] = f"Bearer {spec['authorization']}"
        allowed = spec.get("allowed_tools")
        if isinstance(allowed, dict):
            allowed = allowed.get("tool_names")
        server = cls(spec["server_label"], spec["server_url"], headers,
                     set(allowed) if allowed is not None else None)
        approval = spec.get("require_approval", "always")
        if approval in ("always", "never"):
            server.approval_always = approval == "always"
        elif isinstance(approval, dict):
            server.approval_always = False
            for key, needs in (("always", True), ("never", False)):
                for name in (approval.get(key) or {}).get("tool_names", []):
                    server.approval_tools[name] = needs
        else:
            raise APIError(400, f"{where}.require_approval must be 'always', 'never' or an object",
                           param=f"{where}.require_approval")
        return server

    def needs_approval(self, tool: str) -> bool:
        return self.approval_tools.get(tool, self.approval_always)

    def _transport(self):
        import httpx2

        if self.url.rstrip("/").endswith("/sse"):
            from mcp.client.sse import sse_client

            return sse_client(self.url, headers=self.headers, timeout=TIMEOUT_S)
        from mcp.client.streamable_http import streamable_http_client

        http = httpx2.AsyncClient(headers=self.headers, timeout=httpx2.Timeout(TIMEOUT_S))
        return streamable_http_client(self.url, http_client=http)

    async def list_tools(self) -> list[dict]:
        """The server's tools (those `allowed_tools` lets through); raises on any failure."""
        from mcp import Client

        async with Client(self._transport(), cache=None) as client:
            listed = (await client.list_tools()).tools
        self.tools = [{"name": t.name, "description": t.description, "input_schema": t.input_schema or {},
                       "annotations": None}
                      for t in listed if self.allowed is None or t.name in self.allowed]
        return self.tools

    async def call(self, name: str, arguments: dict) -> tuple[str, bool]:
        """(the tool's text output, is_error)."""
        from mcp import Client

        async with Client(self._transport(), cache=None) as client:
            result = await client.call_tool(name, arguments)
        parts = []
        for block in result.content:
            text = getattr(block, "text", None)
            parts.append(text if text is not None else json.dumps(block.model_dump(mode="json")))
        if not parts and result.structured_content is not None:
            parts.append(json.dumps(result.structured_content))
        return "\n".join(parts), bool(result.is_error)


def chat_tool(tool: dict) -> dict:
    """An MCP tool as the chat API's function tool."""
    schema: dict[str, Any] = dict(tool["input_schema"] or {"type": "object", "properties": {}})
    return {"type": "function", "function": {"name": tool["name"], "description": tool.get("description") or "",
                                             "parameters": schema}}
