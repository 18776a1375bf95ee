"""The ingress's HTTP app: the routers, the request guard in front, one error mapping behind.

Routes live in routes/ (one APIRouter per area, typed bodies, declared errors, so /openapi.json and
/docs document every request and error); every error leaves through errors.install_error_handlers
in OpenAI's shape; guard.RequestGuard bounds every request before a route runs.
"""

from __future__ import annotations

from fastapi import FastAPI

from .errors import install_error_handlers
from .guard import RequestGuard
from .http_metrics import HTTPMetrics
from .ingress import Ingress
from .routes import ROUTERS, admin, ui


def build_api(ingress: Ingress) -> FastAPI:
    app = FastAPI(title="modelfleet", version="0.1.0",
                  description="OpenAI-compatible LLM, STT, TTS and VLM serving on Ray Serve")
    app.state.ingress = ingress
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(ui.router)  # the playground page at /ui (deployments/ui/), not in the OpenAPI schema
    app.include_router(admin.router)  # adapters and models loaded at run time (admin key only)
    install_error_handlers(app)
    app.add_middleware(RequestGuard, limits=ingress.limits, keys=ingress.keys)
    app.add_middleware(HTTPMetrics)  # added last: outermost, so the guard's refusals are counted too
    return app
