"""The one home for API errors: exception classes, and `to_error`, which maps any exception
to an HTTP status and OpenAI's `{"error": {message, type, param, code}}` body.

Mapping is by exception type, never by message text. Errors raised inside another
deployment arrive wrapped in `RayTaskError`; `to_error` unwraps them first.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import uuid
from collections.abc import Callable
from typing import Any
from urllib.parse import unquote_plus

import grpc  # type: ignore[import-untyped]  # no stubs; Ray installs grpcio
import pydantic
import ray.exceptions as ray_errors
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from starlette.exceptions import HTTPException
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.responses import JSONResponse

import loading
from loading.errors import PicklableError

from .audio import AudioDecodeError, AudioTooLongError, UnsupportedAudioFormat
from .chat_encoding import PromptRefused
from .protocol import FORM_ALIASES, ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)


class APIError(PicklableError):
    """An error with a known HTTP status; raise a subclass from routes and deployments
    (raised in a replica, it reaches the ingress through Ray's pickling intact)."""

    status: int = 500
    type: str = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        status: int | None = None,
        type: str | None = None,
    ):
        super().__init__(message)
        # Subclasses fix status and type; a bare APIError may set them (e.g. mirroring an HTTPException).
        if status is not None:
            self.status = status
        if type is not None:
            self.type = type
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


class InvalidRequestError(APIError):
    """The request is malformed or names something invalid."""

    status = 400
    type = "invalid_request_error"


class UnknownModelError(APIError):
    """The `model` in the request is not served here. (Weights missing on disk are
    `loading.ModelNotFoundError`, a 503: the model is configured but cannot load.)"""

    status = 404
    type = "invalid_request_error"

    def __init__(self, name: str, available: list[str], param: str = "model", family: str | None = None):
        """`family`: the family of a served model that this route does not take (an STT model sent to chat)."""
        self.name = name
        self.available = list(available)
        choices = ", ".join(sorted(self.available)) or "none"
        said = (f"The model {name!r} is of the {family} family, which this route does not serve. Models it serves: "
                if family else f"The model {name!r} does not exist. Available models: ")
        super().__init__(f"{said}{choices}.", param=param, code="model_not_found")


class ServiceUnavailableError(APIError):
    """Temporarily unable to serve; `retry_after_s` becomes a `Retry-After` header."""

    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after_s: float | None = None, code: str | None = None,
                 param: str | None = None):
        headers = {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if retry_after_s is not None else {}
        super().__init__(message, param=param, code=code, headers=headers)
        self.retry_after_s = retry_after_s


class OverloadedError(ServiceUnavailableError):
    """More requests than a configured bound allows right now."""

    def __init__(self, message: str, *, retry_after_s: float = 1):
        super().__init__(message, retry_after_s=retry_after_s, code="overloaded")


class UnauthorizedError(APIError):
    """No API key, or not one of the configured keys."""

    status = 401
    type = "invalid_request_error"

    def __init__(self, message: str):
        super().__init__(message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


class BodyTooLargeError(HTTPException):
    """A request body past its limit. An HTTPException so that FastAPI's body reading lets it
    through untouched (it wraps other exceptions raised while reading into a vague 400)."""

    def __init__(self, limit_name: str, limit: int, size: int | None = None):
        self.limit_name, self.limit, self.size = limit_name, limit, size
        got = f" (it declares {size:,} bytes)" if size is not None else ""
        super().__init__(413, f"the request body is larger than {limit_name}={limit:,} bytes{got}")

    def __reduce__(self):  # survives Ray's pickling like PicklableError
        return (type(self), (self.limit_name, self.limit, self.size))


class BodyTimeoutError(HTTPException):
    """A request body that stopped arriving (limits.body_timeout_s, body_min_bytes_per_s): its request held
    one of the ingress's max_concurrent_requests places while it waited. An HTTPException, as BodyTooLargeError."""

    def __init__(self, received: int, waited_s: float, timeout_s: float, min_rate: int):
        self.received, self.waited_s, self.timeout_s, self.min_rate = received, waited_s, timeout_s, min_rate
        super().__init__(408, f"the request body stopped arriving: {received:,} bytes came in {waited_s:.1f} s, and "
                              f"the server waits body_timeout_s={timeout_s:g} s plus 1 s per body_min_bytes_per_s="
                              f"{min_rate:,} bytes received; send the whole body without pausing")

    def __reduce__(self):
        return (type(self), (self.received, self.waited_s, self.timeout_s, self.min_rate))


class RequestTooLargeError(APIError):
    """A request whose content (pixels, samples, tokens, memory) passes a configured limit."""

    status = 413
    type = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None, code: str = "request_too_large"):
        super().__init__(message, param=param, code=code)


def context_length_exceeded(limit_name: str, limit: int, prompt_tokens: int, new_tokens: int = 0,
                            *, at_least: bool = False, param: str = "messages") -> InvalidRequestError:
    """OpenAI's answer when a prompt (plus its completion) cannot fit: 400 `context_length_exceeded`
    on `param` (a chat's `messages`, /v1/completions' `prompt`). `at_least`: the prompt was refused
    from its length before being tokenized."""
    prompt = f"at least {prompt_tokens}" if at_least else str(prompt_tokens)
    asked = f"{prompt} tokens in the {param}" + (f" and {new_tokens} in the completion" if new_tokens else "")
    return InvalidRequestError(
        f"This model's {limit_name} is {limit} tokens, but you requested {asked}. "
        f"Please reduce the length of the {param}" + (" or the completion." if new_tokens else "."),
        param=param, code="context_length_exceeded",
    )


# --- mapping ----------------------------------------------------------------------------

# Parts of a pydantic error location that name where the value came from, not a field.
_SOURCES = {"body", "query", "form", "path", "header", "cookie"}
# pydantic puts union-member labels in `loc`; they are not fields. Our own discriminator tags
# are CamelCase class names or "str"/"list"; generated labels look like "list[...]".
_TYPE_LABELS = {"str", "list", "int", "float", "bool", "bytes", "dict", "none"}


def _is_label(part: Any) -> bool:
    if part in FORM_ALIASES:  # a multipart field such as chunking_strategy[threshold]
        return False
    return isinstance(part, str) and (part in _TYPE_LABELS or not part.isidentifier() or not part.islower())


def _validation_error(errors: list[dict[str, Any]], *, fastapi_locations: bool = False) -> APIError:
    """`fastapi_locations`: FastAPI prefixes `loc` with where the value came from ("body", ...);
    a model validated by our own code has no such prefix (and may have a field named "query")."""
    if not errors:
        return InvalidRequestError("The request is invalid.")
    first = errors[0]
    loc = list(first.get("loc", ()))
    source = loc.pop(0) if fastapi_locations and loc and loc[0] in _SOURCES else None
    keep = [part for part in loc if not _is_label(part)]
    if first.get("type") == "extra_forbidden" and loc and _is_label(loc[-1]):
        keep.append(loc[-1])  # an unknown field's name is the client's, whatever it looks like (`include[]`)
    param = ".".join(str(part) for part in keep) or None
    ctx = first.get("ctx") or {}
    # A ValueError raised by our validators: show its text without pydantic's prefix.
    reason = str(ctx["error"]) if first.get("type") == "value_error" and "error" in ctx else first.get("msg", "invalid")
    if first.get("type") == "json_invalid":
        return InvalidRequestError(f"The request body is not valid JSON: {ctx.get('error', reason)}.")
    where = f"'{param}'" if param else f"the request {source or 'body'}"
    more = f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    return InvalidRequestError(f"Invalid value for {where}: {reason}{more}", param=param)


def _loading_in_progress(exc: loading.ModelLoadingInProgress) -> APIError:
    pct = f" ({exc.progress:.0%})" if exc.progress is not None else ""
    return ServiceUnavailableError(
        f"Model {exc.name!r} is still loading ({exc.phase}{pct}); retry in {exc.retry_after_s:.0f} s.",
        retry_after_s=exc.retry_after_s,
        code="model_loading",
    )


def _http_exception(exc: HTTPException) -> APIError:
    return APIError(
        str(exc.detail),
        code={404: "unknown_route", 405: "method_not_allowed"}.get(exc.status_code),
        headers=dict(exc.headers or {}),
        status=exc.status_code,
        type="invalid_request_error" if exc.status_code < 500 else "internal_error",
    )


def _timeout(exc: BaseException) -> APIError:
    return ServiceUnavailableError(
        "The model deployment did not answer in time; it may be pending for resources (e.g. a GPU) "
        "or overloaded. Retry later.",
        code="timeout",
    )


def _backpressure(exc: BackPressureError) -> APIError:
    error = ServiceUnavailableError(
        f"{exc.message} The server is overloaded; retry shortly.", retry_after_s=exc.retry_after_s or 1,
        code="overloaded",
    )
    error.status = exc.status_code  # Serve's backpressure_config may choose 429 instead of 503
    return error


GRPC_LIMIT = "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH"


def _grpc_error(exc: grpc.aio.AioRpcError) -> APIError:
    """A call between the ingress and a family replica that gRPC refused (Ray Serve's throughput-optimized
    mode carries them over gRPC). RESOURCE_EXHAUSTED is a message over Ray's bound, 4 MiB unless serve.env
    raises it: before serve.env did, a 90 s transcription or a 5 MB image was a 500."""
    if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED:
        sizes = re.search(r"\((\d+) vs\. (\d+)\)", exc.details() or "")
        size, bound = sizes.groups() if sizes else ("more", "its value")
        return RequestTooLargeError(
            f"This request's call to its model replica carried {size} bytes, above {GRPC_LIMIT}={bound} (the "
            f"bound on one message between Ray Serve replicas, set in serve.env): send less (shorter audio, fewer or "
            f"smaller images or text), or raise {GRPC_LIMIT} in the environment that starts Ray.",
            code="request_too_large")
    if exc.code() == grpc.StatusCode.UNAVAILABLE:
        return ServiceUnavailableError(f"The model replica could not be reached ({exc.details()}); retry shortly.",
                                       retry_after_s=1, code="replica_unreachable")
    return APIError(f"The call to the model replica failed: gRPC {exc.code().name}: {exc.details()}",
                    code="internal_error")


# First match wins, so subclasses come before their bases.
_MAPPERS: list[tuple[type[BaseException] | tuple[type[BaseException], ...], Callable[[Any], APIError]]] = [
    (APIError, lambda exc: exc),
    (pydantic.ValidationError, lambda exc: _validation_error(exc.errors())),
    (RequestValidationError, lambda exc: _validation_error(list(exc.errors()), fastapi_locations=True)),
    (AudioTooLongError, lambda exc: RequestTooLargeError(str(exc), param="file", code="audio_too_long")),
    (AudioDecodeError, lambda exc: InvalidRequestError(str(exc), param="file", code="invalid_audio")),
    (UnsupportedAudioFormat, lambda exc: InvalidRequestError(str(exc), param="response_format")),
    (PromptRefused, lambda exc: InvalidRequestError(str(exc), param=exc.param)),
    (BodyTooLargeError, lambda exc: RequestTooLargeError(str(exc.detail), code="request_too_large")),
    (BodyTimeoutError, lambda exc: InvalidRequestError(str(exc.detail), code="body_timeout", status=408)),
    (HTTPException, _http_exception),
    (loading.ModelLoadingInProgress, _loading_in_progress),
    (loading.ModelLoadFailed, lambda exc: ServiceUnavailableError(str(exc), code="model_load_failed")),
    (loading.LoadingError, lambda exc: ServiceUnavailableError(str(exc), code="model_unavailable")),
    (ray_errors.RayActorError, lambda exc: ServiceUnavailableError(
        "The model replica died while handling the request; it is being restarted. Retry shortly.",
        retry_after_s=1, code="replica_died")),
    (ray_errors.OutOfMemoryError, lambda exc: ServiceUnavailableError(
        "The model replica ran out of memory while handling the request.", code="out_of_memory")),
    (BackPressureError, _backpressure),
    (DeploymentUnavailableError, lambda exc: ServiceUnavailableError(
        f"The model deployment is unavailable: {exc}", retry_after_s=1, code="deployment_unavailable")),
    ((ray_errors.GetTimeoutError, asyncio.TimeoutError, TimeoutError), _timeout),
    (grpc.aio.AioRpcError, _grpc_error),
]


def _unwrap(exc: BaseException) -> BaseException:
    # A RayTaskError (also in its `as_instanceof_cause()` dual-class form) carries the remote
    # exception as `.cause`; possibly nested when deployments call deployments.
    while isinstance(exc, ray_errors.RayTaskError) and isinstance(getattr(exc, "cause", None), BaseException):
        exc = exc.cause
    return exc


# Serve installs its own handlers for these on the ingress's app (plain-text 503, no Retry-After):
# the ingress turns them into APIErrors before they can reach a route.
SERVE_UNAVAILABLE = (BackPressureError, DeploymentUnavailableError)


def as_api_error(exc: BaseException) -> APIError:
    """The APIError that `to_error` would render for `exc`, to raise in its place."""
    return _api_error(exc, uuid.uuid4().hex)


def _api_error(exc: BaseException, request_id: str) -> APIError:
    cause = _unwrap(exc)
    for types, mapper in _MAPPERS:
        if isinstance(cause, types):
            return mapper(cause)
    logger.error("Unhandled error (request id %s)", request_id, exc_info=exc)
    return APIError(f"Internal error (request id {request_id}).", code="internal_error")


def to_error(exc: BaseException, request_id: str | None = None) -> tuple[int, ErrorResponse, dict[str, str]]:
    """Map any exception to (HTTP status, OpenAI error body, extra headers)."""
    error = _api_error(exc, request_id or uuid.uuid4().hex)
    body = ErrorResponse(error=ErrorInfo(message=error.message, type=error.type, param=error.param, code=error.code))
    return error.status, body, dict(error.headers)


def error_json_response(exc: BaseException, request_id: str | None = None) -> JSONResponse:
    """`to_error` as a JSON response."""
    status, body, headers = to_error(exc, request_id)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def error_sse_event(exc: BaseException, request_id: str | None = None) -> str:
    """`to_error` as a server-sent event, for a stream that fails after its 200 was sent."""
    _, body, _ = to_error(exc, request_id)
    return f"data: {json.dumps(body.model_dump())}\n\n"


def multipart_refusal(exc: HTTPException, max_form_field_chars: int | None = None) -> APIError | None:
    """Starlette's refusal of a form (a 400 HTTPException raised from its MultiPartException: "Part
    exceeded maximum size of 1024KB.", "Too many fields...") in our shape, naming the limit and the
    part. Which bound it was and which part are read from the parser where it raised, not from the text."""
    cause = exc.__context__
    if exc.status_code != 400 or not isinstance(cause, MultiPartException):
        return None
    parser: MultiPartParser | FormParser | None = None
    where = ""
    tb = cause.__traceback__
    while tb is not None:  # the innermost of the parser's own frames is where it refused
        if isinstance(owner := tb.tb_frame.f_locals.get("self"), (MultiPartParser, FormParser)):
            parser, where = owner, tb.tb_frame.f_code.co_name
        tb = tb.tb_next
    if parser is None:
        return InvalidRequestError(f"the form cannot be read: {cause.message}", code="invalid_multipart")
    if isinstance(parser, MultiPartParser):
        name = parser._current_part.field_name
        too_big, too_many_files = where == "on_part_data", where == "on_headers_finished" and (
            parser._current_files > parser.max_files)
        too_many_fields = where == "on_headers_finished" and parser._current_fields > parser.max_fields
    else:  # application/x-www-form-urlencoded
        name = unquote_plus(bytes(parser._field_name).decode("latin-1")) if where == "on_field_data" else ""
        too_big, too_many_files, too_many_fields = where in ("on_field_name", "on_field_data"), False, (
            where == "on_field_end")
    # the name as Starlette decoded it: escape what UTF-8 cannot carry, or the error cannot be sent
    name = name.encode("utf-8", "backslashreplace").decode("utf-8")
    param = name or None
    if too_big:
        chars = max_form_field_chars if max_form_field_chars is not None else parser.max_part_size // 4
        return InvalidRequestError(
            f"'{name or 'a form field'}' is larger than {parser.max_part_size:,} bytes; a text field may have at "
            f"most max_form_field_chars={chars:,} characters", param=param, code="string_above_max_length")
    if too_many_files and isinstance(parser, MultiPartParser):
        files = parser.max_files
        return InvalidRequestError(
            f"the form has more than {files} file part{'s' if files != 1 else ''} ('{name}' is one too many): "
            "send one audio file", param=param, code="too_many_files")
    if too_many_fields:
        which = f" ('{name}' is one too many)" if name else ""
        return InvalidRequestError(f"the form has more than {parser.max_fields} text fields{which}", param=param,
                                   code="too_many_fields")
    return InvalidRequestError(f"the form cannot be read: {cause.message}", param=param, code="invalid_multipart")


def _not_json(exc: RequestValidationError, request: Request) -> APIError | None:
    """A JSON route's body that FastAPI did not read as JSON, because its Content-Type is not JSON."""
    errors = list(exc.errors())
    if not errors or tuple(errors[0].get("loc", ())) != ("body",):
        return None
    content_type = request.headers.get("content-type", "")
    media = content_type.partition(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json") or media.startswith("multipart/"):
        return None
    came = f"Content-Type {content_type[:60]!r}" if content_type else "no Content-Type"
    return InvalidRequestError(f"the request body must be a JSON object sent with 'Content-Type: application/json' "
                               f"(this one came with {came})", code="invalid_content_type")


def _request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None) or request.headers.get("x-request-id")


def install_error_handlers(app: FastAPI) -> None:
    """Make every error the app returns an OpenAI-shaped JSON body."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, HTTPException) and exc.status_code in (404, 405):
            # Name the route: clients often miss the /v1 prefix.
            exc = HTTPException(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}", exc.headers)
        elif isinstance(exc, HTTPException):
            limits = getattr(getattr(request.app.state, "ingress", None), "limits", None)
            exc = multipart_refusal(exc, getattr(limits, "max_form_field_chars", None)) or exc
        elif isinstance(exc, RequestValidationError):
            exc = _not_json(exc, request) or exc
        return error_json_response(exc, _request_id(request))

    for exc_type in (APIError, RequestValidationError, HTTPException, Exception):
        app.add_exception_handler(exc_type, handle)
