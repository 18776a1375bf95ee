"""The playground: a static page (deployments/ui/) at /ui that talks to the public API from the browser.

Only the files named in PLAYGROUND are served (nothing is looked up by a path from the request, so no
path reaches outside the folder). The page holds no secret: the guard lets /ui through without a key,
and the page sends the key that its user types (kept in the browser's localStorage) with each API call.
Responses say `Cache-Control: no-cache` with an ETag (the browser revalidates and gets a 304 while the
files are unchanged; a new release shows at once), and the page's Content-Security-Policy lets it load
and call only this server: nothing is fetched from anywhere else at run time.
"""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, Response

UI_DIR = Path(__file__).resolve().parent.parent / "ui"
INDEX = "index.html"
PLAYGROUND = {
    INDEX: "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
       "img-src 'self' data: blob:; media-src 'self' data: blob:; base-uri 'none'; form-action 'none'; "
       "frame-ancestors 'none'")

router = APIRouter(include_in_schema=False)


@cache
def _read(name: str) -> tuple[bytes, str]:
    """A playground file's bytes and ETag (read once per process; the files change only with a release)."""
    try:
        body = (UI_DIR / name).read_bytes()
    except OSError as exc:
        raise HTTPException(404, f"the playground file {name} is not installed ({exc.strerror})") from None
    return body, '"' + hashlib.sha256(body).hexdigest()[:16] + '"'


def _serve(name: str, request: Request) -> Response:
    body, etag = _read(name)
    headers = {"Cache-Control": "no-cache", "ETag": etag, "X-Content-Type-Options": "nosniff"}
    if name == INDEX:
        headers["Content-Security-Policy"] = CSP
    if etag in {tag.strip() for tag in request.headers.get("if-none-match", "").split(",")}:
        return Response(status_code=304, headers=headers)
    return Response(body, media_type=PLAYGROUND[name], headers=headers)


# HEAD too, as a static file server answers it (link checkers, `curl -I`); the server sends no body for it.
@router.api_route("/ui", methods=["GET", "HEAD"])
async def playground(request: Request) -> Response:
    """The playground page (its assets are linked as ui/<file>, relative to this path)."""
    return _serve(INDEX, request)


@router.api_route("/ui/{asset}", methods=["GET", "HEAD"])
async def playground_asset(asset: str, request: Request) -> Response:
    if asset not in PLAYGROUND or asset == INDEX:
        raise HTTPException(404, f"the playground has no file {asset[:60]!r} (it is /ui, /ui/app.js, /ui/style.css)")
    return _serve(asset, request)
