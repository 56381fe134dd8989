"""The web dashboard: `/` serves its page and `/static/` its scripts, styles and vendored libraries
(api/static). The page holds no data: its scripts call /v1 with the key the user pasted, which stays in
the tab's sessionStorage and is sent only in the Authorization header, never in a URL."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from starlette.staticfiles import StaticFiles

STATIC = Path(__file__).resolve().parents[1] / "static"

# Scripts and styles only from this origin, no inline script or style element, no frames, no plugins;
# the page talks to its own API only. blob: images are the checkpoint downloads' object URLs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
       "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def dashboard() -> FileResponse:
    """The dashboard's page; it is never stored by the browser or a proxy."""
    return FileResponse(STATIC / "index.html", headers={**SECURITY_HEADERS, "Cache-Control": "no-store"})


class DashboardFiles(StaticFiles):
    """api/static with the page's security headers; a browser revalidates each file (ETag) before using
    a copy, so an upgraded service is never shown with the scripts of the last one."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers.update({**SECURITY_HEADERS, "Cache-Control": "no-cache"})
        return response


def install(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/static", DashboardFiles(directory=STATIC), name="static")
