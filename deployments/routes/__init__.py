"""The HTTP surface, one APIRouter per area; `deployments.api.build_api` mounts them all."""

from . import audio, chat, legacy, models, realtime

ROUTERS = (models.router, chat.router, audio.router, realtime.router, legacy.router)
