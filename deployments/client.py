"""A small client for a running modelfleet server (stdlib + `requests`, no openai package).

The base URL comes from the `base_url` argument or `MODELFLEET_URL`
(default http://127.0.0.1:8000); the API key, for a server with keys on, from the `api_key` argument or
`MODELFLEET_API_KEY` (as `modelfleet check`'s).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import requests

DEFAULT_URL = "http://127.0.0.1:8000"


class ModelServerError(RuntimeError):
    """The server could not be reached or answered with an error."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.status = status
        self.message = message


def _base_url(base_url: str | None) -> str:
    return (base_url or os.environ.get("MODELFLEET_URL") or DEFAULT_URL).rstrip("/")


def _request(method: str, path: str, *, base_url: str | None, timeout: float, api_key: str | None = None,
             **kwargs: Any) -> requests.Response:
    url = _base_url(base_url)
    key = api_key or os.environ.get("MODELFLEET_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        response = requests.request(method, f"{url}{path}", timeout=timeout, headers=headers, **kwargs)
    except requests.ConnectionError as exc:
        raise ModelServerError(
            f"The modelfleet server at {url} is not reachable ({exc.__class__.__name__}). "
            "Start it with `serve run serve_config.yaml`, or set MODELFLEET_URL."
        ) from exc
    except requests.Timeout as exc:
        raise ModelServerError(f"The modelfleet server at {url} did not answer {path} within {timeout} s.") from exc
    except requests.RequestException as exc:  # a URL without a scheme, an invalid one: the caller's mistake, named
        raise ModelServerError(f"Cannot send a request to {url!r} ({exc.__class__.__name__}: {exc}); set "
                               "MODELFLEET_URL (or base_url) to the server's URL, e.g. http://127.0.0.1:8000.") from exc
    if response.status_code >= 400:
        raise ModelServerError(_error_message(response), status=response.status_code)
    return response


def _error_message(response: requests.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip() or response.reason


def is_server_available(timeout: float = 2.0, *, base_url: str | None = None) -> bool:
    """Whether GET /health answers 200; never raises."""
    try:
        return requests.get(f"{_base_url(base_url)}/health", timeout=timeout).status_code == 200
    except Exception:  # any failure means "not available"
        return False


def _default_model(family: str, *, base_url: str | None, timeout: float, api_key: str | None) -> str:
    models = _request("GET", "/v1/models", base_url=base_url, timeout=timeout, api_key=api_key).json().get("data", [])
    for card in models:
        if card.get("family") == family:
            return card["id"]
    raise ModelServerError(f"The server at {_base_url(base_url)} serves no {family!r} model.")


def generate_remote_reply(
    query: str,
    system_prompt: str | None = None,
    *,
    model: str | None = None,
    timeout: float = 60,
    base_url: str | None = None,
    api_key: str | None = None,
) -> str:
    """Ask a chat model; `model=None` picks the first `llm` model the server lists."""
    model = model or _default_model("llm", base_url=base_url, timeout=timeout, api_key=api_key)
    messages = ([{"role": "system", "content": system_prompt}] if system_prompt else []) + [
        {"role": "user", "content": query}
    ]
    body = {"model": model, "messages": messages}
    reply = _request("POST", "/v1/chat/completions", json=body, base_url=base_url, timeout=timeout,
                     api_key=api_key).json()
    return reply["choices"][0]["message"]["content"] or ""


def transcribe(
    path: str | os.PathLike[str],
    *,
    model: str | None = None,
    language: str | None = None,
    timeout: float = 60,
    base_url: str | None = None,
    api_key: str | None = None,
) -> str:
    """Transcribe an audio file; `model=None` picks the first `stt` model the server lists."""
    model = model or _default_model("stt", base_url=base_url, timeout=timeout, api_key=api_key)
    form = {"model": model, "response_format": "json", **({"language": language} if language else {})}
    file = Path(path)
    with file.open("rb") as audio:
        response = _request(
            "POST", "/v1/audio/transcriptions", data=form, files={"file": (file.name, audio)},
            base_url=base_url, timeout=timeout, api_key=api_key,
        )
    return response.json()["text"]


def synthesize(
    text: str,
    output_path: str | os.PathLike[str],
    *,
    model: str | None = None,
    response_format: str = "wav",
    timeout: float = 60,
    base_url: str | None = None,
    api_key: str | None = None,
) -> str:
    """Speak `text` into `output_path`; `model=None` picks the first `tts` model. Returns the path."""
    model = model or _default_model("tts", base_url=base_url, timeout=timeout, api_key=api_key)
    body = {"model": model, "input": text, "response_format": response_format}
    response = _request("POST", "/v1/audio/speech", json=body, base_url=base_url, timeout=timeout, api_key=api_key)
    Path(output_path).write_bytes(response.content)
    return str(output_path)
