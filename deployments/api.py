"""The ingress's HTTP app: the routers, the request guard in front, one error mapping behind.

Routes live in routes/ (one APIRouter per area, typed bodies, declared errors, so /openapi.json and
/docs document every request and error); every error leaves through errors.install_error_handlers
in OpenAI's shape; guard.RequestGuard bounds every request before a route runs.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, params
from fastapi.routing import APIRoute, iter_route_contexts

from .errors import install_error_handlers
from .guard import RequestGuard
from .http_metrics import HTTPMetrics
from .ingress import Ingress
from .routes import ROUTERS, admin, ui
from .routes.common import app_form_limits


def build_api(ingress: Ingress) -> FastAPI:
    app = FastAPI(title="modelfleet", version="0.1.0",
                  description="OpenAI-compatible LLM, STT, TTS and VLM serving on Ray Serve",
                  form_limits=app_form_limits(ingress.limits))
    app.state.ingress = ingress
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(ui.router)  # the playground page at /ui (deployments/ui/), not in the OpenAPI schema
    app.include_router(admin.router)  # adapters and models loaded at run time (admin key only)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, limits=ingress.limits, keys=ingress.keys, form_paths=form_paths(app))
    app.add_middleware(HTTPMetrics)  # added last: outermost, so the guard's refusals are counted too
    _document_real_errors(app)
    return app


def form_paths(app: FastAPI) -> frozenset[str]:
    """The routes whose body is a multipart form: the guard reads their bodies under max_upload_bytes,
    every other route's under max_json_body_bytes."""
    paths = set()
    for context in iter_route_contexts(app.routes):  # included routers' routes too, with their prefixes
        route = context.original_route
        if (isinstance(route, APIRoute) and context.path and route.body_field is not None
                and isinstance(route.body_field.field_info, params.Form)):
            paths.add(context.path)
    return frozenset(paths)


def _document_real_errors(app: FastAPI) -> None:
    """/openapi.json without FastAPI's `422 HTTPValidationError`: a request that fails validation is a
    400 in OpenAI's error shape (errors.py), which every route declares (routes/common.ERRORS)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        schema = generate()  # FastAPI's, cached until the routes change; what is dropped stays dropped
        for operations in schema.get("paths", {}).values():
            for operation in operations.values():
                operation.get("responses", {}).pop("422", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for name in ("HTTPValidationError", "ValidationError"):
            schemas.pop(name, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
