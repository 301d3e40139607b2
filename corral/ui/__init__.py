"""The chat page `corral serve` shows at `/`: static files shipped in the package, no build step.

`static/index.html` loads `static/app.js` (an ES module: the chat, the Markdown renderer, the calls to
the public API) and `static/app.css`, all served from `/ui/`. The page itself is public, like
/v1/health: it holds no data, and it sends the API key the user enters (kept in localStorage) as
`Authorization: Bearer` on every API call it makes.
"""

from __future__ import annotations

from pathlib import Path

STATIC = Path(__file__).parent / "static"
UI_PREFIX = "/ui"


def is_public(path: str) -> bool:
    """Paths the API-key guard lets through: the page and its static files."""
    return path in ("/", "/favicon.ico") or path.startswith(UI_PREFIX + "/")


def add_ui_routes(app) -> None:
    from fastapi.responses import FileResponse, RedirectResponse
    from starlette.staticfiles import StaticFiles

    app.mount(UI_PREFIX, StaticFiles(directory=STATIC), name="ui")

    @app.get("/", include_in_schema=False)
    async def index():
        # no-cache: a restarted (upgraded) server's page is picked up at the next load
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon():
        return RedirectResponse(UI_PREFIX + "/favicon.svg")
