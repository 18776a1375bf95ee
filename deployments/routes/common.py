"""What every route module shares: the ingress as a dependency, the wait header, error docs."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Awaitable, Iterable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, Form, Header, Request
from pydantic import BaseModel

from ..errors import InvalidRequestError
from ..guard import AUTHORIZED, check_text
from ..ingress import Ingress
from ..limits import RequestLimits, check_form_fields
from ..protocol import ErrorResponse

T = TypeVar("T")

MAX_WAIT_S = 600.0


def ingress_of(request: Request) -> Ingress:
    return request.app.state.ingress


# Dependencies are `async def`: FastAPI runs a plain `def` one in its thread pool, a hop per request
# that cost 14 ms p50 under 16 streams (tests/deployments/test_request_path.py).
async def get_ingress(request: Request) -> Ingress:
    return ingress_of(request)


async def wait_for_model(
    x_wait_for_model: Annotated[str | None, Header(
        description="Seconds a request may wait for a model that is still loading (default 0: 503 + Retry-After)."
    )] = None,
) -> float:
    if x_wait_for_model is None:
        return 0.0
    try:
        value = float(x_wait_for_model)
    except ValueError:
        value = math.nan
    if math.isnan(value):  # 'nan' parses as a float, and a replica waited on it with no end while the model loaded
        raise InvalidRequestError(f"header x-wait-for-model={x_wait_for_model[:40]!r} must be a number of seconds "
                                  f"(0 to {MAX_WAIT_S:g})", param="x-wait-for-model")
    return min(max(value, 0.0), MAX_WAIT_S)


def is_authorized(request: Request) -> bool:
    """Whether the caller presented a valid key (always true when no keys are configured)."""
    return bool(request.scope.get("state", {}).get(AUTHORIZED, False))


IngressDep = Annotated[Ingress, Depends(get_ingress)]
WaitDep = Annotated[float, Depends(wait_for_model)]


def _error(description: str) -> dict:
    return {"model": ErrorResponse, "description": description}


# Declared on every route so /openapi.json documents the error shape and when it comes.
ERRORS: dict[int | str, dict] = {
    400: _error("Invalid request: the message names the field (`param`) and the limit or value at fault."),
    401: _error("Missing or wrong API key (only when keys are configured)."),
    404: _error("Unknown model (the message lists the served ones) or route."),
    413: _error("Request body, upload, image, audio or working memory past a configured limit."),
    503: _error("Model loading (with Retry-After), failed, overloaded, or its deployment did not answer in time."),
}
MULTIPART = Form(media_type="multipart/form-data")  # a Form model with a file: documented as multipart
# one file and a handful of fields per multipart form (Any: FastAPI's _FormLimits TypedDict is private);
# the size of a text field follows limits.max_form_field_chars: app_form_limits, given to the app as a whole
UPLOAD_LIMITS: Any = {"max_files": 1, "max_fields": 16}
UTF8_MAX_BYTES = 4  # bytes of one character in UTF-8, at most


def app_form_limits(limits: RequestLimits) -> Any:
    """FastAPI's form limits for the whole app: a multipart text field may take max_form_field_chars
    characters of up to 4 UTF-8 bytes each (Starlette's own bound is 1 MiB whatever the limit says);
    one past it is refused as it streams in (errors.py names the limit and the field)."""
    return {"max_part_size": UTF8_MAX_BYTES * limits.max_form_field_chars}


def check_form(form: BaseModel, limits: RequestLimits, *bounded: str) -> None:
    """A multipart form's text: every text field valid Unicode (no lone surrogate: the JSON bodies' check),
    and the `bounded` fields within max_form_field_chars. The guard refuses a charset that could produce a
    surrogate; this catches whatever else would, before any replica sees it."""
    for name, info in type(form).model_fields.items():
        value = getattr(form, name, None)
        for text in value if isinstance(value, list) else [value]:
            if isinstance(text, str):
                check_text(text, (info.alias or name,))
    check_form_fields({name: getattr(form, name) for name in bounded}, limits)


async def all_or_cancelled(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Every result in order; on the first failure the others are cancelled (and awaited) before it is raised.
    asyncio.gather alone left them running: a /v1/completions request with one refused prompt among several
    got its 400 while the other prompts x n generated to max_tokens for nobody, outside max_concurrent_requests."""
    tasks = [asyncio.ensure_future(awaitable) for awaitable in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


async def first_items(streams: list[AsyncIterator[T]]) -> list[T]:
    """The first item of each stream (errors before any chunk stay HTTP errors); on a failure every stream is
    closed, which stops its family's work."""
    try:
        return await all_or_cancelled(stream.__anext__() for stream in streams)
    except BaseException:
        for stream in streams:
            await stream.aclose()  # type: ignore[attr-defined]
        raise
