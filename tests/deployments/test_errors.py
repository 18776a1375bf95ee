"""to_error maps each exception type to status, OpenAI error shape and headers."""

import asyncio
import logging

import pytest
import ray.exceptions as ray_errors
from fastapi import FastAPI
from fastapi.testclient import TestClient
from ray.serve.exceptions import BackPressureError

import loading
from deployments.audio import AudioDecodeError, decode_audio
from deployments.errors import (
    InvalidRequestError,
    RequestTooLargeError,
    ServiceUnavailableError,
    UnauthorizedError,
    UnknownModelError,
    error_json_response,
    error_sse_event,
    install_error_handlers,
    to_error,
)
from deployments.protocol import ChatCompletionRequest


def mapped(exc, request_id=None):
    status, body, headers = to_error(exc, request_id)
    return status, body.error.model_dump(), headers


def validation_error(body):
    try:
        ChatCompletionRequest.model_validate(body)
    except Exception as exc:  # noqa: BLE001 - we want the real pydantic exception
        return exc
    raise AssertionError("expected a validation error")


def remote(exc):
    """An exception as it arrives from another deployment: wrapped in RayTaskError."""
    return ray_errors.RayTaskError("handle_request", "Traceback (most recent call last): ...", exc)


def test_api_error_subclasses():
    assert mapped(InvalidRequestError("bad", param="x")) == (
        400, {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}, {})
    assert mapped(RequestTooLargeError("too many pixels", param="messages"))[:2] == (
        413, {"message": "too many pixels", "type": "invalid_request_error", "param": "messages",
              "code": "request_too_large"})
    assert mapped(UnauthorizedError("no key")) == (
        401, {"message": "no key", "type": "invalid_request_error", "param": None, "code": "invalid_api_key"},
        {"WWW-Authenticate": "Bearer"})
    assert mapped(ServiceUnavailableError("later", retry_after_s=2.2)) == (
        503, {"message": "later", "type": "service_unavailable", "param": None, "code": None}, {"Retry-After": "3"})


def test_model_not_found_lists_models():
    status, error, _ = mapped(UnknownModelError("gpt-4", ["tiny-llm", "tiny-tts"]))
    assert status == 404
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "'gpt-4'" in error["message"] and "tiny-llm, tiny-tts" in error["message"]


@pytest.mark.parametrize(
    ("body", "param", "words"),
    [
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature", "less than or equal to 2"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 0}, "n", "greater than or equal to 1"),
        ({"model": "m", "messages": []}, "messages", "at least 1"),
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "Field required"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "text"}]}]}, "messages.0.content.0.text", "Field required"),
        ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages.0.content.0.image_url.url", "Field required"),
        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": 5}, "stop",
         "a string or a list of strings"),  # how many is limits.max_stop_sequences' to say (test_http_surface.py)
    ],
)
def test_pydantic_validation_error_names_the_field(body, param, words):
    status, error, headers = mapped(validation_error(body))
    assert (status, error["type"], error["param"], headers) == (400, "invalid_request_error", param, {})
    assert f"'{param}'" in error["message"] and words in error["message"], error["message"]
    assert "Value error," not in error["message"]


def test_more_errors_are_counted():
    _, error, _ = mapped(validation_error({"model": "m", "messages": [], "temperature": 9, "top_p": -1}))
    assert error["param"] == "messages" and "(and 2 more errors)" in error["message"]


def test_audio_decode_error_is_a_400_on_file():
    with pytest.raises(AudioDecodeError) as exc_info:
        decode_audio(b"not audio")
    status, error, _ = mapped(exc_info.value)
    assert (status, error["param"], error["type"]) == (400, "file", "invalid_request_error")


def test_loading_in_progress_is_503_with_retry_after_and_phase():
    exc = loading.ModelLoadingInProgress("tiny-llm", "downloading", 0.25, retry_after_s=4.5)
    status, error, headers = mapped(exc)
    assert (status, error["type"], error["code"], headers) == (503, "service_unavailable", "model_loading", {"Retry-After": "5"})
    assert "downloading" in error["message"] and "25%" in error["message"]


def test_load_failures_are_503_without_retry_after():
    assert mapped(loading.ModelLoadFailed("m", "out of memory"))[0::2] == (503, {})
    assert mapped(loading.ModelLoadFailed("m", "oom"))[1]["code"] == "model_load_failed"
    status, error, headers = mapped(loading.NoDeviceError("device cuda requested but no GPU"))
    assert (status, error["code"], headers) == (503, "model_unavailable", {})


def test_ray_failures():
    assert mapped(ray_errors.RayActorError()) [0::2] == (503, {"Retry-After": "1"})
    assert mapped(ray_errors.ActorDiedError())[1]["code"] == "replica_died"
    for timeout in (ray_errors.GetTimeoutError("slow"), asyncio.TimeoutError(), TimeoutError()):
        status, error, headers = mapped(timeout)
        assert (status, error["code"], headers) == (503, "timeout", {})
        assert "did not answer in time" in error["message"]
    status, error, headers = mapped(BackPressureError(num_queued_requests=10, max_queued_requests=10))
    assert (status, error["code"], headers) == (503, "overloaded", {"Retry-After": "1"})
    assert mapped(BackPressureError(10, 10, status_code=429, retry_after_s=7))[0::2] == (429, {"Retry-After": "7"})


def test_remote_errors_are_unwrapped():
    inner = loading.ModelLoadingInProgress("m", "loading weights", None, retry_after_s=2)
    assert mapped(remote(inner))[0::2] == (503, {"Retry-After": "2"})
    assert mapped(remote(inner).as_instanceof_cause())[1]["code"] == "model_loading"
    assert mapped(remote(remote(UnknownModelError("x", ["y"]))))[0] == 404
    assert mapped(remote(TimeoutError()))[1]["code"] == "timeout"


def test_unknown_errors_are_500_without_details(caplog):
    with caplog.at_level(logging.ERROR, logger="deployments.errors"):
        status, error, headers = mapped(remote(KeyError("secret internals")), request_id="req-42")
    assert (status, error, headers) == (
        500, {"message": "Internal error (request id req-42).", "type": "internal_error", "param": None, "code": "internal_error"}, {})
    assert "req-42" in caplog.text and caplog.records[0].exc_info is not None


def test_json_response_and_sse_event():
    response = error_json_response(ServiceUnavailableError("busy", retry_after_s=1))
    assert response.status_code == 503 and response.headers["retry-after"] == "1"
    assert b'"error":{"message":"busy"' in response.body
    assert error_sse_event(InvalidRequestError("bad")).startswith('data: {"error": {"message": "bad"')


@pytest.fixture(scope="module")
def client():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/v1/chat/completions")
    async def chat(request: ChatCompletionRequest):
        raise UnknownModelError(request.model, ["tiny-llm"])

    @app.get("/boom")
    async def boom():
        raise RuntimeError("do not leak this")

    return TestClient(app, raise_server_exceptions=False)


def assert_openai_error(response, status, type_):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == type_
    return error


def test_app_errors_are_openai_shaped(client):
    error = assert_openai_error(
        client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user", "content": "x"}]}),
        404, "invalid_request_error")
    assert error["code"] == "model_not_found"

    error = assert_openai_error(
        client.post("/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 2}),
        400, "invalid_request_error")
    assert error["param"] == "top_p"

    error = assert_openai_error(
        client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
        400, "invalid_request_error")
    assert "not valid JSON" in error["message"]

    error = assert_openai_error(client.get("/chat/completions"), 404, "invalid_request_error")
    assert "/chat/completions" in error["message"] and error["code"] == "unknown_route"

    response = client.get("/v1/chat/completions")
    assert_openai_error(response, 405, "invalid_request_error")
    assert response.headers["allow"] == "POST"

    error = assert_openai_error(client.get("/boom", headers={"x-request-id": "abc"}), 500, "internal_error")
    assert error["message"] == "Internal error (request id abc)."


def test_errors_survive_pickling_as_ray_sends_them_from_replica_to_ingress():
    import pickle

    import loading
    from deployments.errors import UnknownModelError as UnknownModel

    raised_in_replicas = [
        InvalidRequestError("bad max_tokens", param="max_tokens"),
        UnknownModel("gpt-9", ["tiny-llm"]),
        ServiceUnavailableError("busy", retry_after_s=3),
        loading.ModelLoadingInProgress("m", "loading weights", 0.5, 4.0),
        loading.ModelLoadFailed("m", "missing"),
        loading.AdapterBaseNotFoundError("adapter", "Org/Base", ["here"], "fetch it"),
    ]
    for exc in raised_in_replicas:
        copy = pickle.loads(pickle.dumps(exc))
        assert type(copy) is type(exc) and str(copy) == str(exc)
        assert to_error(copy)[:1] == to_error(exc)[:1]
        assert to_error(copy)[2] == to_error(exc)[2]
