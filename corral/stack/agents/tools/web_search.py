"""web_search through a configured search provider: Tavily's or Brave's API.

Run config:
    web_search:
      provider: tavily            # or brave
      api_key: tvly-...           # optional: else each request sends it in X-LlamaStack-Provider-Data
      base_url: null              # default: the provider's own (https://api.tavily.com, https://api.search.brave.com)
      max_results: 5
The key may also come per request, as Llama Stack clients send it:
`X-LlamaStack-Provider-Data: {"tavily_search_api_key": "..."}` (or `brave_search_api_key`).

Both APIs are called exactly as their documentation says (Tavily: `POST /search` with a Bearer key and
a JSON body; Brave: `GET /res/v1/web/search?q=...&count=N` with `X-Subscription-Token`), and their
results come back as [{title, url, content}].
"""

from __future__ import annotations

from typing import Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field

DEFAULT_URLS = {"tavily": "https://api.tavily.com", "brave": "https://api.search.brave.com"}
KEY_NAMES = {"tavily": "tavily_search_api_key", "brave": "brave_search_api_key"}


class WebSearchConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    provider: Literal["tavily", "brave"]
    api_key: str | None = None
    base_url: str | None = Field(None, pattern=r"^https?://")
    max_results: int = Field(5, ge=1, le=20)
    timeout_s: float = Field(15.0, gt=0)


class SearchError(RuntimeError):
    """The provider could not answer (its status and message, never the key)."""


def api_key(cfg: WebSearchConfig, provider_data: dict) -> str | None:
    return provider_data.get(KEY_NAMES[cfg.provider]) or cfg.api_key


async def search(cfg: WebSearchConfig, key: str, query: str, max_results: int | None = None) -> list[dict]:
    n = max_results or cfg.max_results
    base = (cfg.base_url or DEFAULT_URLS[cfg.provider]).rstrip("/")
    async with httpx.AsyncClient(timeout=cfg.timeout_s) as http:
        try:
            if cfg.provider == "tavily":
                r = await http.post(f"{base}/search", headers={"Authorization": f"Bearer {key}"},
                                    json={"query": query, "max_results": n, "search_depth": "basic"})
            else:
                r = await http.get(f"{base}/res/v1/web/search", params={"q": query, "count": n},
                                   headers={"X-Subscription-Token": key, "Accept": "application/json"})
        except httpx.HTTPError as e:
            raise SearchError(f"{cfg.provider} search failed: {type(e).__name__}") from None
    if r.status_code != 200:
        raise SearchError(f"{cfg.provider} search answered HTTP {r.status_code}")
    try:
        body = r.json()
        if cfg.provider == "tavily":
            hits = [{"title": h.get("title", ""), "url": h["url"], "content": h.get("content", "")}
                    for h in body.get("results", [])]
        else:
            hits = [{"title": h.get("title", ""), "url": h["url"], "content": h.get("description", "")}
                    for h in (body.get("web") or {}).get("results", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        raise SearchError(f"{cfg.provider} search answered something that is not its API's JSON") from None
    return hits[:n]


def format_results(query: str, hits: list[dict]) -> str:
    """What the model reads: numbered results, as Llama Stack's search tool gives them."""
    if not hits:
        return f"No results for {query!r}."
    return "\n\n".join(f"[{i}] {h['title']}\n{h['url']}\n{h['content']}" for i, h in enumerate(hits, 1))
