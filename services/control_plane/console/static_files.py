"""The console's scripts and style sheet, served from the package with the headers they need: never
sniffed as another type, and checked again (cheaply, by ETag) on each load so that an upgrade shows at
once."""

from __future__ import annotations

from pathlib import Path

from starlette.responses import Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

STATIC_FOLDER = Path(__file__).with_name("static")
STATIC_PREFIX = "/console/static"
MEDIA_TYPES = {".js": "text/javascript; charset=utf-8", ".css": "text/css; charset=utf-8"}


class ConsoleStaticFiles(StaticFiles):
    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        if media_type := MEDIA_TYPES.get(Path(path).suffix):
            response.headers["Content-Type"] = media_type
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Cache-Control"] = "no-cache"
        return response


def console_static_files() -> ConsoleStaticFiles:
    return ConsoleStaticFiles(directory=STATIC_FOLDER)
