"""Status routes: /health and the model list."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from loading import ModelSpec

from ..ingress import Ingress
from ..protocol import ModelCard, ModelList
from .common import ERRORS, IngressDep, is_authorized

router = APIRouter(tags=["models"], responses=ERRORS)
CREATED = int(time.time())


@router.get("/health", summary="Every model's state; details only for callers with a key when keys are on")
# HEAD too: uptime monitors and load balancers probe with it (the server sends the GET's status, no body);
# a route of its own, left out of the schema, so that the two operations do not share one operationId
@router.head("/health", include_in_schema=False)
async def health(request: Request, ingress: IngressDep) -> dict:
    return await ingress.health.health(is_authorized(request))


def _card(spec: ModelSpec, info: dict, added: dict[str, int]) -> ModelCard:
    return ModelCard(id=spec.name, created=added.get(spec.name, CREATED),
                     family=spec.family.value if spec.family else None, state=info.get("state"),
                     device=info.get("device"), loading_strategy=info.get("loading_strategy"),
                     demo=spec.is_demo, aliases=spec.aliases, adapter_targets=info.get("adapter_targets"))


def _added(ingress: Ingress) -> dict[str, int]:
    """When each model or adapter added at run time was added: its `created` (a configured one's is the start)."""
    return {record.spec.name: int(record.added_at) for record in ingress.runtime.snapshot.records}


@router.get("/v1/models", summary="The served models")
async def list_models(ingress: IngressDep) -> ModelList:
    status = await ingress.health.model_status()
    # read together after the await: one snapshot of what is served (a listing names no model: no metric labels)
    added = _added(ingress)
    return ModelList(data=[_card(s, status.get(s.name, {}), added) for s in ingress.served_models()])


@router.get("/v1/models/{model:path}", summary="One served model, by name or alias")
async def get_model(model: str, ingress: IngressDep) -> ModelCard:
    # looked up before the await: a model unloaded meanwhile is answered as it was asked for, not a KeyError
    spec, added = ingress.spec(model), _added(ingress)
    return _card(spec, (await ingress.health.model_status()).get(spec.name, {}), added)
