"""Status routes: /health and the model list."""

from __future__ import annotations

import time

from fastapi import APIRouter, Request

from ..ingress import Ingress
from ..protocol import ModelCard, ModelList
from .common import ERRORS, IngressDep, is_authorized

router = APIRouter(tags=["models"], responses=ERRORS)
CREATED = int(time.time())


@router.get("/health", summary="Every model's state; details only for callers with a key when keys are on")
async def health(request: Request, ingress: IngressDep) -> dict:
    return await ingress.health.health(is_authorized(request))


def _card(ingress: Ingress, name: str, info: dict) -> ModelCard:
    spec = ingress.catalog[name]  # a lookup only: a listing names no model, so its metric labels stay empty
    return ModelCard(id=spec.name, created=CREATED, family=spec.family.value if spec.family else None,
                     state=info.get("state"),
                     device=info.get("device"), loading_strategy=info.get("loading_strategy"),
                     demo=spec.is_demo, aliases=spec.aliases, adapter_targets=info.get("adapter_targets"))


@router.get("/v1/models", summary="The served models")
async def list_models(ingress: IngressDep) -> ModelList:
    status = await ingress.health.model_status()
    return ModelList(data=[_card(ingress, s.name, status.get(s.name, {})) for s in ingress.served_models()])


@router.get("/v1/models/{model:path}", summary="One served model, by name or alias")
async def get_model(model: str, ingress: IngressDep) -> ModelCard:
    spec = ingress.spec(model)
    return _card(ingress, spec.name, (await ingress.health.model_status()).get(spec.name, {}))
