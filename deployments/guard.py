"""The ingress's door: what every HTTP request passes before any route runs (a WebSocket passes the
API key check only: see `_websocket`).

In order: a bound on requests in flight (503 + Retry-After past it), the API key (401), the
body's encoding (415 for a compressed one: nothing here decompresses), its size (413, from
Content-Length before a byte is read, else counted while reading) and the time it takes to arrive
(408, limits.body_timeout_s), and for JSON bodies a structural check (400): nesting depth, huge
integers, NaN and infinities, lone surrogates. A client that hangs up before its body ends is
neither served nor answered. The body the routes see is the one checked here, replayed; nothing is
read twice from the client.

Which size limit a body gets is the route's to say, never the client's Content-Type: the multipart
routes (`form_paths`: transcriptions, translations, the voice round trip, /stt) take
`max_upload_bytes`, every other route `max_json_body_bytes`, whatever the body is labelled. A
multipart body must be UTF-8 (or ASCII): Starlette decodes its text parts with whatever `charset`
the Content-Type names, and codecs such as unicode_escape or utf-7 turn `\ud800` into a lone
surrogate that no check after it expects.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import math
import uuid
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .auth import KeyChecker
from .errors import (
    BodyTimeoutError,
    BodyTooLargeError,
    InvalidRequestError,
    OverloadedError,
    UnauthorizedError,
    error_json_response,
    to_error,
)
from .limits import RequestLimits

# Paths that answer without a key: /health (with details only for a caller that has one) and the playground's
# static page, /ui and /ui/<file> (it holds no secret; its API calls carry the key its user types).
PUBLIC_PATHS = frozenset({"/health", "/ui"})
PUBLIC_PREFIXES = ("/ui/",)
INSECURE_KEY_PROTOCOL = "openai-insecure-api-key."  # a browser's WebSocket cannot set Authorization
AUTHORIZED = "modelfleet_authorized"  # scope["state"] key the routes read
# A JSON body this small is checked on the event loop (0.03 ms for 64 KiB of chat); larger ones, up to
# max_json_body_bytes, in a thread, so that this check holds up no other request. FastAPI then parses the
# replayed body again, on the event loop, for the route: json.loads takes ~2 ms per MiB of one long string
# (an image's base64) and ~18 ms per MiB of small values (a 14 MiB array of zeros: 253 ms), so a large body
# still pauses the loop once for that long; max_json_body_bytes bounds the pause.
INLINE_JSON_BYTES = 64 * 1024
# the charsets a multipart body may name (as codecs.lookup names them); naming none means UTF-8
FORM_CHARSETS = frozenset({"utf-8", "ascii"})


def offered_subprotocols(headers: Headers) -> list[str]:
    """The subprotocols a WebSocket client offered (Sec-WebSocket-Protocol)."""
    return [p.strip() for p in headers.get("sec-websocket-protocol", "").split(",")]


def realtime_subprotocol(headers: Headers) -> str | None:
    """The subprotocol a Realtime socket is accepted with, refused or not: "realtime" where the client offered
    it (a browser fails a handshake that chooses none of those it offered), never the key's, else none."""
    return "realtime" if "realtime" in offered_subprotocols(headers) else None


class RequestGuard:
    def __init__(self, app: ASGIApp, limits: RequestLimits, keys: KeyChecker,
                 form_paths: frozenset[str] = frozenset()):
        self.app = app
        self.limits = limits
        self.keys = keys
        self.form_paths = form_paths  # routes whose body is a multipart form (api.form_paths)
        self.in_flight = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await self._websocket(scope, receive, send)
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.limits.max_concurrent_requests:
            await self._refuse(scope, receive, send, OverloadedError(
                f"the server is working on max_concurrent_requests={self.limits.max_concurrent_requests} "
                "requests already; retry shortly", retry_after_s=1))
            return
        self.in_flight += 1
        try:
            await self._guarded(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def _guarded(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = Headers(scope=scope)
        authorized = self.keys.allows(headers.get("authorization"))
        scope.setdefault("state", {})[AUTHORIZED] = authorized
        path = _route_path(scope)
        if not authorized and path not in PUBLIC_PATHS and not path.startswith(PUBLIC_PREFIXES):
            await self._refuse(scope, receive, send, UnauthorizedError(
                "a valid API key is required: send 'Authorization: Bearer <key>' (the openai client's api_key)"))
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        encoding = headers.get("content-encoding", "").strip()
        if encoding.lower() not in ("", "identity"):  # read as is, a gzip body was "not valid UTF-8 at byte 1"
            await self._refuse(scope, receive, send, InvalidRequestError(
                f"Content-Encoding {encoding[:40]!r} is not accepted: send the request body uncompressed (no "
                "Content-Encoding header)", param="content-encoding", code="unsupported_content_encoding",
                status=415))
            return
        content_type = headers.get("content-type", "").lower()  # media types are case-insensitive (RFC 9110)
        # the route, not the client's Content-Type, says which limit applies
        is_form = path in self.form_paths
        limit = self.limits.max_upload_bytes if is_form else self.limits.max_json_body_bytes
        limit_name = "max_upload_bytes" if is_form else "max_json_body_bytes"
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await self._refuse(scope, receive, send, BodyTooLargeError(limit_name, limit, int(declared)))
            return
        counted = _CountingReceive(receive, limit, limit_name, self.limits)
        if is_form:  # parsed as it streams in (files spool to disk); the count stops it at the limit
            try:
                _check_form_charset(headers.get("content-type", ""))
            except InvalidRequestError as exc:
                await self._refuse(scope, receive, send, exc)
                return
            await self.app(scope, counted, send)
            return
        try:
            body = await counted.read_all()
            if body is None:  # the client hung up before its body ended: nothing to run, no one to answer
                return
            if body and "json" in content_type or (body and not content_type):
                if len(body) <= INLINE_JSON_BYTES:  # parsed here: a thread hop would cost more
                    check_json(body, self.limits)
                else:
                    await asyncio.to_thread(check_json, body, self.limits)
        except (BodyTooLargeError, BodyTimeoutError, InvalidRequestError) as exc:
            await self._refuse(scope, receive, send, exc)
            return
        await self.app(scope, _replay(body, receive), send)

    @staticmethod
    async def _refuse(scope: Scope, receive: Receive, send: Send, exc: Exception) -> None:
        await error_json_response(exc)(scope, receive, send)

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The API key of a WebSocket (the Realtime endpoint): `Authorization: Bearer <key>` as the openai
        client sends it, or the `openai-insecure-api-key.<key>` subprotocol browsers use. Without a valid
        one the socket is accepted, told why in an `error` event (401's body, OpenAI's Realtime shape),
        and closed with 1008 (policy violation): a client sees the reason, not a failed handshake."""
        headers = Headers(scope=scope)
        keys = [headers.get("authorization")] + [f"Bearer {p[len(INSECURE_KEY_PROTOCOL):]}"
                                                 for p in offered_subprotocols(headers)
                                                 if p.startswith(INSECURE_KEY_PROTOCOL)]
        authorized = any(self.keys.allows(key) for key in keys) or not self.keys.enabled
        scope.setdefault("state", {})[AUTHORIZED] = authorized
        if authorized:
            await self.app(scope, receive, send)
            return
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        _, body, _ = to_error(UnauthorizedError(
            "a valid API key is required: send 'Authorization: Bearer <key>' (the openai client's api_key)"))
        # every server event has an id (OpenAI's ErrorEvent requires one; realtime.py's are made the same way)
        event = {"type": "error", "event_id": f"event_{uuid.uuid4().hex[:20]}", "error": body.error.model_dump()}
        await send({"type": "websocket.accept", "subprotocol": realtime_subprotocol(headers)})
        await send({"type": "websocket.send", "text": json.dumps(event)})
        await send({"type": "websocket.close", "code": 1008, "reason": "invalid_api_key"})


def _check_form_charset(content_type: str) -> None:
    """Refuse a multipart form whose Content-Type names a charset other than UTF-8 or ASCII (see the
    module's doc), read as Starlette reads it."""
    media, params = parse_options_header(content_type)
    if media != b"multipart/form-data" or b"charset" not in params:
        return
    charset = params[b"charset"].decode("latin-1")
    try:
        known = codecs.lookup(charset).name
    except LookupError:
        known = None
    if known not in FORM_CHARSETS:
        raise InvalidRequestError(
            f"the form's charset {charset[:40]!r} is not accepted: send its text fields as UTF-8 (charset=utf-8, "
            "or no charset)", param="content-type", code="unsupported_charset")


def _route_path(scope: Scope) -> str:
    """The path below the app's route prefix (Serve puts the prefix in root_path and in path)."""
    path, root = scope["path"], scope.get("root_path", "")
    return path[len(root):] or "/" if root and path.startswith(root) else path


class _CountingReceive:
    """Passes the client's body through, raising BodyTooLargeError once it passes the limit, and
    BodyTimeoutError where it stops coming (limits.body_timeout_s, body_min_bytes_per_s); once the body is
    in, a wait for the client's disconnect (a streamed answer's) is not bounded."""

    def __init__(self, receive: Receive, limit: int, limit_name: str, limits: RequestLimits):
        self.receive, self.limit, self.limit_name = receive, limit, limit_name
        self.timeout_s, self.min_rate = limits.body_timeout_s, limits.body_min_bytes_per_s
        self.total = 0
        self.started = asyncio.get_running_loop().time()
        self.complete = False

    async def __call__(self) -> Message:
        if self.complete:
            return await self.receive()
        loop = asyncio.get_running_loop()
        deadline = self.started + self.timeout_s + self.total / self.min_rate
        try:
            message = await asyncio.wait_for(self.receive(), max(deadline - loop.time(), 0))
        except asyncio.TimeoutError:
            raise BodyTimeoutError(self.total, loop.time() - self.started, self.timeout_s, self.min_rate) from None
        if message["type"] == "http.request":
            self.total += len(message.get("body", b""))
            if self.total > self.limit:
                raise BodyTooLargeError(self.limit_name, self.limit)
            self.complete = not message.get("more_body", False)
        else:
            self.complete = True
        return message

    async def read_all(self) -> bytes | None:
        """The whole body, or None where the client hung up before its end. (Run on what came, a body whose
        Content-Length promised more was served to no one: the disconnect was taken here, so no one upstream
        saw it and cancelled the work; a generation ran to its last token.)"""
        parts = []
        while True:
            message = await self()
            if message["type"] == "http.disconnect":
                return None
            parts.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        return b"".join(parts)


def _replay(body: bytes, receive: Receive) -> Receive:
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()  # after the body: wait for the client's disconnect, as Starlette expects

    return replay


# --- JSON structure ------------------------------------------------------------------------------


def check_json(body: bytes | str, limits: RequestLimits) -> Any:
    """Parse a JSON body (or a Realtime event) and check its structure; InvalidRequestError names where it is
    wrong."""
    try:
        value = json.loads(body)
    except RecursionError:
        raise InvalidRequestError(
            f"the JSON body is nested deeper than max_json_depth={limits.max_json_depth}", code="json_too_deep",
        ) from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid UTF-8 ({exc.reason} at byte {exc.start})",
                                  code="invalid_json") from None
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc.msg} (line {exc.lineno}, column "
                                  f"{exc.colno})", code="invalid_json") from None
    except ValueError as exc:  # e.g. an integer literal past Python's 4300-digit conversion limit
        raise InvalidRequestError(f"the JSON body holds a value that cannot be read: {exc}",
                                  code="invalid_json") from None
    _check_tree(value, limits)
    return value


def _check_tree(root: Any, limits: RequestLimits) -> None:
    stack: list[tuple[Any, tuple, int]] = [(root, (), 1)]  # iterative: depth is what we are bounding
    while stack:
        value, path, depth = stack.pop()
        if isinstance(value, (dict, list)):
            if depth > limits.max_json_depth:
                raise InvalidRequestError(
                    f"'{_dotted(path)}' is nested deeper than max_json_depth={limits.max_json_depth}",
                    param=_dotted(path) or None, code="json_too_deep")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    check_text(key, path + (key,))
                stack.append((item, path + (key,), depth + 1))
        elif isinstance(value, str):
            check_text(value, path)
        elif isinstance(value, float) and not math.isfinite(value):  # Python's json reads NaN, Infinity and 1e999
            raise InvalidRequestError(
                f"'{_dotted(path)}' is {value} (NaN and Infinity are not JSON, and a number past 1.8e308 reads as "
                "infinity): send a finite number", param=_dotted(path) or None, code="invalid_number")
        elif (isinstance(value, int) and not isinstance(value, bool)
              and not -limits.max_json_integer - 1 <= value <= limits.max_json_integer):  # int64's range
            raise InvalidRequestError(
                f"'{_dotted(path)}' is an integer beyond max_json_integer={limits.max_json_integer}",
                param=_dotted(path) or None, code="integer_out_of_range")


def check_text(text: str, path: tuple) -> None:
    """400 `invalid_unicode` naming `path` for text UTF-8 cannot carry (a lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(
            f"'{_dotted(path)}' holds invalid unicode (a lone surrogate at character {exc.start}); send valid UTF-16 "
            "surrogate pairs or plain UTF-8", param=_dotted(path) or None, code="invalid_unicode") from None


def _dotted(path: tuple) -> str:
    # a key may itself be the invalid text: escape what UTF-8 cannot carry, or the error cannot be sent
    return ".".join(str(part) for part in path).encode("utf-8", "backslashreplace").decode("utf-8")
