"""What every route module shares: the ingress as a dependency, the wait header, error docs."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Depends, Form, Header, Request

from ..errors import InvalidRequestError
from ..guard import AUTHORIZED
from ..ingress import Ingress
from ..protocol import ErrorResponse

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
        raise InvalidRequestError(f"header x-wait-for-model={x_wait_for_model[:40]!r} must be a number of seconds",
                                  param="x-wait-for-model") from None
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
# one file and a handful of fields per multipart form (Any: FastAPI's _FormLimits TypedDict is private)
UPLOAD_LIMITS: Any = {"max_files": 1, "max_fields": 16}
