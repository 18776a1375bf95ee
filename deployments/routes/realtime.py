"""WebSocket /v1/realtime: OpenAI's Realtime protocol (the subset in README, "Realtime"), one session
per connection (deployments/realtime.py). The guard has checked the API key before this runs."""

from __future__ import annotations

from fastapi import APIRouter, WebSocket

from ..errors import APIError, OverloadedError
from ..guard import realtime_subprotocol
from ..realtime import RealtimeSession, refuse

router = APIRouter(tags=["realtime"])


@router.websocket("/v1/realtime")
async def realtime(websocket: WebSocket, model: str | None = None, intent: str | None = None) -> None:
    """`model`: the LLM that answers (a served LLM or VLM; another name, such as an OpenAI model's, gets an
    `error` event and the default LLM). `intent=transcription`: a transcription session (each turn
    transcribed, none answered). Audio in and out is pcm16, 24 kHz, mono."""
    state, ingress = websocket.app.state, websocket.app.state.ingress
    limit = ingress.limits.max_realtime_sessions
    active = getattr(state, "realtime_sessions", 0)
    if active >= limit:
        await refuse(websocket, OverloadedError(
            f"the server holds max_realtime_sessions={limit} Realtime sessions already; retry shortly"), 1013)
        return
    state.realtime_sessions = active + 1
    try:
        await websocket.accept(subprotocol=realtime_subprotocol(websocket.headers))
        await RealtimeSession(websocket, ingress, model, intent).run()
    finally:
        state.realtime_sessions -= 1


@router.get("/v1/realtime", include_in_schema=False)
async def realtime_over_http() -> None:
    """The Realtime endpoint asked for over plain HTTP: say what it needs, not 404 'unknown route'."""
    raise APIError("/v1/realtime is a WebSocket endpoint: connect with ws:// or wss:// (the openai client's "
                   "`client.beta.realtime.connect(model=...)`)", status=426, type="invalid_request_error",
                   code="websocket_required", headers={"Upgrade": "websocket", "Connection": "Upgrade"})
