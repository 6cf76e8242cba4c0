"""The built-in web page at `/` of `dyvte-rt serve`: ask about an image and see where it left the
model. Static files shipped with the package (`web/`), read once; the page's Content-Security-Policy
lets it reach this server alone, so it works offline and sends nothing elsewhere. The page itself
needs no API key (it holds no data); it asks for one when the API answers 401."""

from __future__ import annotations

from importlib.resources import files

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
}
_FILES = {
    item.name: item.read_bytes() for item in (files("dyvte_rt.serving") / "web").iterdir() if item.is_file()
}


def _send(name: str) -> Response:
    body = _FILES.get(name)
    if body is None or "." not in name:
        raise HTTPException(404)
    headers = {
        "Content-Security-Policy": CONTENT_SECURITY_POLICY,
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return Response(
        body, media_type=_TYPES.get(name[name.rindex(".") :], "application/octet-stream"), headers=headers
    )


async def _page(request: Request) -> Response:
    return _send("index.html")


async def _asset(request: Request) -> Response:
    return _send(request.path_params["name"])


def web_routes() -> list[Route]:
    return [Route("/", _page, methods=["GET"]), Route("/web/{name}", _asset, methods=["GET"])]
