"""Local stand-ins for the outside services the hosted tools call, each speaking the real protocol.

- `FakeSearch`: Tavily's API (`POST /search`, `Authorization: Bearer <key>`, JSON body, `{"results": [...]}`)
  and Brave's (`GET /res/v1/web/search?q=&count=`, `X-Subscription-Token`, `{"web": {"results": [...]}}`),
  on one port; it records every query with the key it came with, and refuses a wrong key with 401.
- `McpTestServer`: the `mcp` package's own server (`MCPServer`) over streamable HTTP (or its older SSE
  transport), served by uvicorn on a thread, with two tools; it records the Authorization header of each
  HTTP request.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

from tests.stack.conftest import ThreadedServer

KEY = "search-key-123"


class FakeSearch:
    def __init__(self):
        self.queries: list[tuple[str, str, str]] = []  # (provider, query, key)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status: int, body: dict):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):  # Tavily
                if self.path != "/search":
                    return self._answer(404, {"detail": "not found"})
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                key = self.headers.get("Authorization", "").removeprefix("Bearer ")
                outer.queries.append(("tavily", body["query"], key))
                if key != KEY:
                    return self._answer(401, {"detail": {"error": "Unauthorized: missing or invalid API key."}})
                n = body.get("max_results", 5)
                self._answer(200, {"query": body["query"], "response_time": 0.1, "images": [], "results": [
                    {"title": f"Result {i} for {body['query']}", "url": f"https://example.com/{i}",
                     "content": f"Llamas are camelids (snippet {i}).", "score": 0.9 - i / 10, "raw_content": None}
                    for i in range(n)]})

            def do_GET(self):  # Brave
                url = urlparse(self.path)
                if url.path != "/res/v1/web/search":
                    return self._answer(404, {"error": "not found"})
                q = parse_qs(url.query)
                key = self.headers.get("X-Subscription-Token", "")
                outer.queries.append(("brave", q["q"][0], key))
                if key != KEY:
                    return self._answer(422, {"type": "ErrorResponse", "error": {"code": "SUBSCRIPTION_TOKEN_INVALID"}})
                n = int(q.get("count", ["5"])[0])
                self._answer(200, {"type": "search", "query": {"original": q["q"][0]}, "web": {"type": "search", "results": [
                    {"title": f"Brave {i}", "url": f"https://brave.example/{i}", "description": f"About llamas {i}."}
                    for i in range(n)]}})

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def start(self) -> FakeSearch:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class McpTestServer(ThreadedServer):
    def __init__(self, transport: str = "streamable-http"):
        from mcp.server.mcpserver import MCPServer

        mcp = MCPServer("corral-test")

        @mcp.tool()
        def add(a: int, b: int) -> int:
            """Add two integers."""
            return a + b

        @mcp.tool()
        def capital(country: str) -> str:
            """The capital city of a country."""
            return {"france": "Paris", "japan": "Tokyo"}.get(country.strip().lower(), "unknown")

        self.auth_headers: list[str | None] = []
        app = mcp.sse_app() if transport == "sse" else mcp.streamable_http_app()
        outer = self

        async def recording(scope, receive, send):
            if scope["type"] == "http":
                outer.auth_headers.append(dict(scope["headers"]).get(b"authorization", b"").decode() or None)
            await app(scope, receive, send)

        super().__init__(recording, lifespan="on")
        self.url = f"http://127.0.0.1:{self.port}/{'sse' if transport == 'sse' else 'mcp'}"
