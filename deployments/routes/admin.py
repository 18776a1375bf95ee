"""Admin routes: LoRA adapters (vLLM's bodies) and whole models (the seed LocalLab server's) loaded and
unloaded at run time. Each needs an admin key (`auth.admin_keys_env` / `auth.admin_keys_file`); with none
configured they are off (403), whether or not API keys are. The work is in runtime_admin.py."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from ..admin_protocol import (
    LoadLoraAdapterRequest,
    LoadModelRequest,
    RuntimeModelResponse,
    UnloadLoraAdapterRequest,
    UnloadModelRequest,
)
from ..errors import APIError, UnauthorizedError
from ..runtime_admin import RuntimeAdmin
from .common import ERRORS, ingress_of, is_authorized

NO_ADMIN_KEY = (
    "the admin routes are off: no admin key is configured. Set auth.admin_keys_env (the environment variable "
    "it names, default MODELFLEET_ADMIN_KEYS, read by the ingress when it starts) or auth.admin_keys_file in "
    "serve_config.yaml"
)


async def require_admin(request: Request) -> RuntimeAdmin:
    """The admin key check (403 when the routes are off, 401 without an admin key), then the RuntimeAdmin."""
    ingress = ingress_of(request)
    if not ingress.admin_keys.enabled:
        raise APIError(NO_ADMIN_KEY, status=403, type="permission_error", param="auth.admin_keys_env",
                       code="admin_disabled")
    if not ingress.admin_keys.allows(request.headers.get("authorization")):
        if ingress.keys.enabled and is_authorized(request):
            raise APIError("this route needs an admin key (auth.admin_keys_env); an API key is not one",
                           status=403, type="permission_error", code="admin_key_required")
        raise UnauthorizedError("this route needs an admin key: send 'Authorization: Bearer <admin key>' "
                                "(one of auth.admin_keys_env / auth.admin_keys_file)")
    admin = getattr(request.app.state, "runtime_admin", None)
    if admin is None:
        admin = request.app.state.runtime_admin = RuntimeAdmin(ingress)
    return admin


AdminDep = Annotated[RuntimeAdmin, Depends(require_admin)]
router = APIRouter(tags=["admin"], responses={**ERRORS, 403: {**ERRORS[401], "description": (
    "The admin routes are off (no admin key configured), or the key is an API key, not an admin key.")}})


@router.post("/v1/load_lora_adapter", summary="Serve a LoRA adapter on a served base model from now on (vLLM's body)")
async def load_lora_adapter(body: LoadLoraAdapterRequest, admin: AdminDep) -> RuntimeModelResponse:
    return await admin.load_adapter(body)


@router.post("/v1/unload_lora_adapter", summary="Stop serving an adapter loaded at run time; its requests finish")
async def unload_lora_adapter(body: UnloadLoraAdapterRequest, admin: AdminDep) -> RuntimeModelResponse:
    return await admin.unload_adapter(body)


@router.post("/models/load", summary="Serve a whole model from now on; it loads in the background (see /health)")
async def load_model(body: LoadModelRequest, admin: AdminDep) -> RuntimeModelResponse:
    return await admin.load_model(body)


@router.post("/models/unload", summary="Stop serving a model or adapter loaded at run time; its requests finish")
async def unload_model(body: UnloadModelRequest, admin: AdminDep) -> RuntimeModelResponse:
    return await admin.unload_model(body)
