"""A response's tools: what the model is offered, and how each server-side call runs.

`ToolSet(request.tools, ctx)` checks every tool spec (a bad one is a 400 naming it) and splits them:
  - `function` tools are the client's: a call ends the response with a `function_call` item;
  - hosted tools run here, each offered to the model as a function under the name its model knows:
      code_interpreter -> `code_interpreter` (Llama 3's builtin: `<|python_tag|>` code, `ipython` results)
      web_search       -> `brave_search` (Llama 3's builtin search; `query`)
      file_search      -> `file_search` (`query`)
      mcp              -> each tool the server lists, under its own name.
A hosted call is one output item (`code_interpreter_call`, `web_search_call`, `file_search_call`,
`mcp_call`) with its own progress events; `start` gives the item and the events before the run, `run`
the finished item, the text the model reads back, and the events after.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

from corral.stack.api import APIError
from corral.stack.agents.items import new_id
from corral.stack.agents.tools import sandbox, web_search
from corral.stack.agents.tools.mcp import McpServer, chat_tool as mcp_chat_tool

log = logging.getLogger("corral.agents")

Events = list[tuple[str, dict]]


@dataclass
class ToolContext:
    """What hosted tools need from the server and the request."""

    code_interpreter: sandbox.SandboxConfig
    web_search: web_search.WebSearchConfig | None
    provider_data: dict
    include: set[str]
    vector_search: Any = None  # async (store_id, query, max_num_results, filters, ranking_options) -> list[hit]


def _fn(name: str, description: str, params: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": params}}


def _query_params() -> dict:
    # No description on `query`: small models copy a parameter's description into the call.
    return {"type": "object", "properties": {"query": {"type": "string", "maxLength": 100}}, "required": ["query"]}


def _unsupported(where: str, spec: dict, known: set[str]) -> None:
    extra = sorted(set(spec) - known - {"type"})
    if extra:
        raise APIError(400, f"{where}.{extra[0]}: not supported for {spec['type']} tools",
                       param=f"{where}.{extra[0]}", code="unsupported_parameter")


# ---------------------------------------------------------------------------------------------
# Hosted tools


class CodeInterpreter:
    item_type, name = "code_interpreter_call", "code_interpreter"

    def __init__(self, ctx: ToolContext, spec: dict, where: str):
        _unsupported(where, spec, {"container"})
        container = spec.get("container", "auto")
        if container not in ("auto", None) and not (isinstance(container, dict) and container.get("type") == "auto"
                                                    and not container.get("file_ids")):
            raise APIError(400, f"{where}.container: only 'auto' containers (a fresh sandbox, no files) are supported",
                           param=f"{where}.container", code="unsupported_parameter")
        if why := sandbox.available():
            raise APIError(400, f"{where}: {why}, which this server lacks", param=where, code="tool_unavailable")
        self.cfg, self.include = ctx.code_interpreter, ctx.include

    def chat_tool(self) -> dict:
        return _fn(self.name, "Run Python code in a sandbox and see its output (no network, no files).",
                   {"type": "object", "properties": {"code": {"type": "string", "description": "Python code"}},
                    "required": ["code"]})

    def start(self, args: dict) -> tuple[dict, Events]:
        code = str(args.get("code", ""))
        item = {"id": new_id("ci"), "type": self.item_type, "code": code, "container_id": "sandbox",
                "outputs": None, "status": "in_progress"}
        return item, [("response.code_interpreter_call.in_progress", {}),
                      ("response.code_interpreter_call_code.delta", {"delta": code}),
                      ("response.code_interpreter_call_code.done", {"code": code}),
                      ("response.code_interpreter_call.interpreting", {})]

    async def run(self, item: dict, args: dict) -> tuple[dict, str, Events]:
        result = await sandbox.run_python(item["code"], self.cfg)
        text = result.for_model()
        outputs = [{"type": "logs", "logs": text}] if "code_interpreter_call.outputs" in self.include else None
        return {**item, "outputs": outputs, "status": "completed"}, text, [
            ("response.code_interpreter_call.completed", {})]


class WebSearch:
    item_type, name = "web_search_call", "brave_search"
    CONTEXT_SIZE = {"low": 3, "medium": 5, "high": 8}

    def __init__(self, ctx: ToolContext, spec: dict, where: str):
        _unsupported(where, spec, {"search_context_size"})
        cfg = ctx.web_search
        if cfg is None:
            raise APIError(400, f"{where}: web_search needs a search provider, and none is configured (run config "
                                "`web_search: {provider: tavily|brave, api_key: ...}`)", param=where,
                           code="tool_unavailable")
        self.key = web_search.api_key(cfg, ctx.provider_data)
        if not self.key:
            raise APIError(400, f"{where}: no API key for the {cfg.provider} search provider: set `web_search.api_key` "
                                f"in the run config or send X-LlamaStack-Provider-Data: "
                                f'{{"{web_search.KEY_NAMES[cfg.provider]}": "..."}}', param=where,
                           code="tool_unavailable")
        self.cfg, self.include = cfg, ctx.include
        self.n = self.CONTEXT_SIZE.get(spec.get("search_context_size") or "", None)

    def chat_tool(self) -> dict:
        return _fn(self.name, "Search the web for current information.", _query_params())

    def start(self, args: dict) -> tuple[dict, Events]:
        item = {"id": new_id("ws"), "type": self.item_type, "status": "in_progress",
                "action": {"type": "search", "query": str(args.get("query", ""))}}
        return item, [("response.web_search_call.in_progress", {}), ("response.web_search_call.searching", {})]

    async def run(self, item: dict, args: dict) -> tuple[dict, str, Events]:
        query = item["action"]["query"]
        try:
            hits = await web_search.search(self.cfg, self.key, query, self.n)
        except web_search.SearchError as e:
            return {**item, "status": "failed"}, f"The search failed: {e}", [("response.web_search_call.completed", {})]
        action = dict(item["action"])
        if self.include & {"web_search_call.action.sources", "web_search_call.results"}:
            action["sources"] = [{"type": "url", "url": h["url"]} for h in hits]
        return ({**item, "action": action, "status": "completed"}, web_search.format_results(query, hits),
                [("response.web_search_call.completed", {})])


class FileSearch:
    item_type, name = "file_search_call", "file_search"

    def __init__(self, ctx: ToolContext, spec: dict, where: str):
        _unsupported(where, spec, {"vector_store_ids", "max_num_results", "filters", "ranking_options"})
        ids = spec.get("vector_store_ids")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, str) for i in ids):
            raise APIError(400, f"{where}.vector_store_ids: a non-empty list of vector store ids is required",
                           param=f"{where}.vector_store_ids")
        n = spec.get("max_num_results", 10)
        if not isinstance(n, int) or not 1 <= n <= 50:
            raise APIError(400, f"{where}.max_num_results must be between 1 and 50", param=f"{where}.max_num_results")
        if ctx.vector_search is None:
            raise APIError(400, f"{where}: file_search needs vector stores, which this server does not serve",
                           param=where, code="tool_unavailable")
        _check_search(spec, where)
        self.search, self.include = ctx.vector_search, ctx.include
        self.ids, self.n = ids, n
        self.filters, self.ranking = spec.get("filters"), spec.get("ranking_options")
        self.cited: dict[str, str] = {}  # file_id -> filename, in the order they were found

    def chat_tool(self) -> dict:
        return _fn(self.name, "Search the uploaded documents for passages relevant to a query.",
                   _query_params())

    def start(self, args: dict) -> tuple[dict, Events]:
        item = {"id": new_id("fs"), "type": self.item_type, "queries": [str(args.get("query", ""))],
                "status": "in_progress", "results": None}
        return item, [("response.file_search_call.in_progress", {}), ("response.file_search_call.searching", {})]

    async def run(self, item: dict, args: dict) -> tuple[dict, str, Events]:
        query = item["queries"][0]
        hits = []
        for store_id in self.ids:
            hits += await self.search(store_id, query, self.n, self.filters, self.ranking)
        hits = sorted(hits, key=lambda h: -h["score"])[:self.n]
        for h in hits:
            self.cited.setdefault(h["file_id"], h["filename"])
        results = [{"file_id": h["file_id"], "filename": h["filename"], "score": h["score"], "text": h["text"],
                    "attributes": h.get("attributes") or {}} for h in hits]
        text = "\n\n".join(f"[{i}] {h['filename']} (file {h['file_id']}):\n{h['text']}" for i, h in enumerate(hits, 1))
        done = {**item, "status": "completed",
                "results": results if "file_search_call.results" in self.include else None}
        return done, text or f"No passages found for {query!r}.", [("response.file_search_call.completed", {})]

    def annotations(self, text: str) -> list[dict]:
        """`file_citation`s for the files the answer drew on, at its end (as OpenAI places them)."""
        return [{"type": "file_citation", "file_id": fid, "filename": name, "index": len(text)}
                for fid, name in self.cited.items()]


def _check_search(spec: dict, where: str) -> None:
    """filters and ranking_options as the vector-store search takes them (a 400 here, not a failure mid-run)."""
    from pydantic import ValidationError

    from corral.stack.rag.api import SearchRequest

    body = {"query": "-", "filters": spec.get("filters"), "ranking_options": spec.get("ranking_options")}
    try:
        SearchRequest.model_validate({k: v for k, v in body.items() if v is not None})
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{where}.{loc}: {err['msg'].removeprefix('Value error, ')}", param=f"{where}.{loc}") from None


class McpTool:
    item_type = "mcp_call"

    def __init__(self, server: McpServer, tool: dict):
        self.server, self.tool, self.name = server, tool, tool["name"]

    def chat_tool(self) -> dict:
        return mcp_chat_tool(self.tool)

    def start(self, args: dict, approval_request_id: str | None = None) -> tuple[dict, Events]:
        arguments = json.dumps(args)
        item = {"id": new_id("mcp"), "type": self.item_type, "name": self.name, "arguments": arguments,
                "server_label": self.server.label, "status": "in_progress", "output": None, "error": None,
                "approval_request_id": approval_request_id}
        return item, [("response.mcp_call_arguments.delta", {"delta": arguments}),
                      ("response.mcp_call_arguments.done", {"arguments": arguments}),
                      ("response.mcp_call.in_progress", {})]

    async def run(self, item: dict, args: dict) -> tuple[dict, str, Events]:
        try:
            output, is_error = await self.server.call(self.name, args)
        except Exception as e:  # noqa: BLE001 - the server's failure is the call's result, not ours
            log.warning("mcp call %s on %s failed: %r", self.name, self.server.label, e)
            output, is_error = f"the MCP server could not run the tool ({type(e).__name__})", True
        if is_error:
            return ({**item, "status": "failed", "error": output}, f"Error: {output}",
                    [("response.mcp_call.failed", {})])
        return {**item, "status": "completed", "output": output}, output, [("response.mcp_call.completed", {})]


HOSTED = {"code_interpreter": CodeInterpreter, "web_search": WebSearch, "web_search_preview": WebSearch,
          "web_search_2025_08_26": WebSearch, "file_search": FileSearch}


# ---------------------------------------------------------------------------------------------
# The set


@dataclass
class ToolSet:
    functions: dict[str, dict] = field(default_factory=dict)  # client-side: name -> chat tool
    hosted: dict[str, Any] = field(default_factory=dict)  # model-facing name -> hosted tool
    mcp_servers: list[McpServer] = field(default_factory=list)

    @classmethod
    def from_request(cls, specs: list[dict] | None, ctx: ToolContext) -> ToolSet:
        out = cls()
        for i, spec in enumerate(specs or []):
            where = f"tools[{i}]"
            kind = spec.get("type") if isinstance(spec, dict) else None
            if kind == "function":
                out._add_function(spec, where)
            elif kind == "mcp":
                server = McpServer.from_spec(spec, where)
                if any(s.label == server.label for s in out.mcp_servers):
                    raise APIError(400, f"{where}.server_label: {server.label!r} appears twice", param=where)
                out.mcp_servers.append(server)
            elif kind in HOSTED:
                tool = HOSTED[kind](ctx, spec, where)
                out._add(tool.name, tool, where)
            else:
                raise APIError(400, f"{where}.type: unknown tool type {kind!r} (Corral runs function, "
                                    f"code_interpreter, web_search, file_search and mcp tools)",
                               param=f"{where}.type", code="unsupported_tool")
        return out

    def _add_function(self, spec: dict, where: str) -> None:
        _unsupported(where, spec, {"name", "description", "parameters", "strict"})
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"{where}.name is required", param=f"{where}.name")
        fn = {"name": name, "description": spec.get("description"), "parameters": spec.get("parameters"),
              "strict": spec.get("strict")}
        self._add(name, {"type": "function", "function": {k: v for k, v in fn.items() if v is not None}}, where)

    def _add(self, name: str, tool: Any, where: str) -> None:
        if name in self.functions or name in self.hosted:
            raise APIError(400, f"{where}: a tool named {name!r} is already in `tools`", param=where,
                           code="duplicate_tool")
        if isinstance(tool, dict):
            self.functions[name] = tool
        else:
            self.hosted[name] = tool

    def add_mcp_tools(self, server: McpServer) -> None:
        for t in server.tools:
            if t["name"] in self.functions or t["name"] in self.hosted:
                log.warning("mcp server %s: tool %r shadows another tool; skipped", server.label, t["name"])
                continue
            self.hosted[t["name"]] = McpTool(server, t)

    def chat_tools(self) -> list[dict]:
        return list(self.functions.values()) + [t.chat_tool() for t in self.hosted.values()]

    def file_search(self) -> FileSearch | None:
        return next((t for t in self.hosted.values() if isinstance(t, FileSearch)), None)

    def chat_tool_choice(self, choice: str | dict | None) -> str | dict | None:
        """The request's tool_choice in the chat API's terms (a 400 if it names no tool of `tools`)."""
        if choice is None or choice in ("auto", "none", "required"):
            return choice
        if isinstance(choice, dict):
            kind = choice.get("type")
            name = None
            if kind == "function":
                name = choice.get("name")
                if name not in self.functions:
                    raise APIError(400, f"tool_choice names function {name!r}, which is not in `tools`",
                                   param="tool_choice")
            elif kind in HOSTED:
                name = HOSTED[kind].name
            elif kind == "mcp":
                name = choice.get("name")
                if name is None:
                    return "required"
            if name is not None and (name in self.functions or name in self.hosted):
                return {"type": "function", "function": {"name": name}}
            if name is not None and kind == "mcp":
                return {"type": "function", "function": {"name": name}}  # checked once the servers are listed
            raise APIError(400, f"tool_choice {choice!r} names no tool of `tools`", param="tool_choice")
        raise APIError(400, f"tool_choice must be 'auto', 'none', 'required' or an object, got {choice!r}",
                       param="tool_choice")
