"""Small HTTP helpers the route modules share."""

from __future__ import annotations

import asyncio

from fastapi import Request

from corral.stack.api import APIError


async def unless_disconnected(request: Request, work):
    """Await a provider call; if the client disconnects first, cancel it (its generation stops)."""
    task = asyncio.ensure_future(work)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.2)  # how soon a gone client's generation stops
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)  # nobody is listening for its outcome
            raise APIError(499, "client disconnected", code="client_disconnected")
