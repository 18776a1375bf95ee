"""The HTTP surface, one APIRouter per area; `deployments.api.build_api` mounts them all."""

from . import audio, chat, completions, legacy, models, realtime, tokenize

ROUTERS = (models.router, chat.router, completions.router, tokenize.router, audio.router, realtime.router,
           legacy.router)
