"""remote::openai-compatible: any OpenAI-compatible server (vLLM, Ollama, llama.cpp's server, a hosted API).

The validated request is sent on as JSON with `model` replaced by the remote's id
(`provider_model_id`), and the answer comes back with our model id in it. Streams are relayed
chunk by chunk (Server-Sent Events parsed and re-framed by our server). The remote's errors keep
their status and message; a remote that cannot be reached is a 502.
"""

from __future__ import annotations

import json
from typing import AsyncIterator

import httpx

from corral.stack.api import APIError, ChatCompletionRequest, CompletionRequest, ModelInfo
from corral.stack.config import REMOTE, ModelEntry, RemoteConfig


class RemoteProvider:
    provider_type = REMOTE

    def __init__(self, provider_id: str, config: RemoteConfig, entries: list[ModelEntry]):
        self.provider_id = provider_id
        self.config = config
        self.base_url = config.base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
        self.client = httpx.AsyncClient(base_url=self.base_url, headers=headers,
                                        timeout=httpx.Timeout(config.timeout_s, connect=10.0))
        self._infos = [ModelInfo(id=e.model_id, provider_id=provider_id,
                                 provider_resource_id=e.provider_model_id or e.model_id) for e in entries]

    def models(self) -> list[ModelInfo]:
        return list(self._infos)

    async def start(self) -> None:
        pass  # the remote may come up after us; /v1/providers reports its health

    def _body(self, model: ModelInfo, req) -> dict:
        body = req.model_dump(exclude_none=True, by_alias=True)
        body["model"] = model.provider_resource_id
        return body

    async def _error(self, resp: httpx.Response) -> APIError:
        text = (await resp.aread()).decode("utf-8", errors="replace")
        try:
            err = json.loads(text).get("error", {})
            message = err.get("message") if isinstance(err, dict) else str(err)
            etype, param, code = (err.get("type"), err.get("param"), err.get("code")) if isinstance(err, dict) else (None,) * 3
        except (ValueError, AttributeError):
            message, etype, param, code = text[:500], None, None, None
        headers = {"Retry-After": resp.headers["retry-after"]} if "retry-after" in resp.headers else None
        return APIError(resp.status_code, f"remote provider {self.provider_id!r}: {message}",
                        type=etype or "api_error", param=param, code=code, headers=headers)

    def _unreachable(self, e: Exception) -> APIError:
        return APIError(502, f"remote provider {self.provider_id!r} at {self.base_url} failed: {e}",
                        type="api_error", code="remote_unavailable")

    async def _post(self, path: str, model: ModelInfo, req):
        body = self._body(model, req)
        if not req.stream:
            try:
                resp = await self.client.post(path, json=body)
            except httpx.HTTPError as e:
                raise self._unreachable(e) from None
            if resp.status_code >= 400:
                raise await self._error(resp)
            out = resp.json()
            out["model"] = model.id
            return out
        try:
            resp = await self.client.send(self.client.build_request("POST", path, json=body), stream=True)
        except httpx.HTTPError as e:
            raise self._unreachable(e) from None
        if resp.status_code >= 400:
            try:
                raise await self._error(resp)
            finally:
                await resp.aclose()
        return self._relay(resp, model)

    async def _relay(self, resp: httpx.Response, model: ModelInfo) -> AsyncIterator[dict]:
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk and "choices" not in chunk:
                    raise APIError(502, f"remote provider {self.provider_id!r}: {chunk['error']}", type="api_error")
                chunk["model"] = model.id
                yield chunk
        finally:
            await resp.aclose()

    async def chat_completion(self, model: ModelInfo, req: ChatCompletionRequest):
        return await self._post("/chat/completions", model, req)

    async def completion(self, model: ModelInfo, req: CompletionRequest):
        return await self._post("/completions", model, req)

    async def health(self) -> dict:
        try:
            resp = await self.client.get("/models", timeout=5.0)
        except httpx.HTTPError as e:
            return {"status": "Error", "message": f"{self.base_url}: {e}"}
        if resp.status_code >= 400:
            return {"status": "Error", "message": f"{self.base_url}/models answered {resp.status_code}"}
        return {"status": "OK"}

    async def close(self) -> None:
        await self.client.aclose()
