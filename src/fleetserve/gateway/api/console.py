"""The web console: its static page at / and its files under /console/ (open without an API key; the page's own
API calls carry the key), and an empty /favicon.ico."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response
from fastapi.staticfiles import StaticFiles

CONSOLE_DIR = Path(__file__).resolve().parents[1] / "console"

router = APIRouter()


@router.get("/", include_in_schema=False)
async def console():
    """The web console: a static page that uses this API from the browser."""
    return FileResponse(CONSOLE_DIR / "index.html", media_type="text/html")


router.mount("/console", StaticFiles(directory=CONSOLE_DIR), name="console")


@router.get("/favicon.ico", include_in_schema=False)
async def favicon():
    return Response(status_code=204)
