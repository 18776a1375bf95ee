"""A compressed request body (Content-Encoding gzip, deflate, br...) is a 415 naming the encoding and the fix:
nothing in the ingress decompresses, and read as is a gzip chat was refused as "not valid UTF-8 (invalid start
byte at byte 1)" (reproduced on a live `serve run`, 200 kB of gzip that inflates to 200 MB, and a valid chat
gzipped). The real ingress app (build_api) over stand-in family handles."""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from fastapi.testclient import TestClient
from local_handles import LocalHandle

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.ingress import Ingress
from deployments.params import ChatResult

CHAT = {"model": "llm", "messages": [{"role": "user", "content": "hi"}]}


class LLM:
    async def chat(self, params):
        return ChatResult(text="hi", finish_reason="stop", prompt_tokens=3, completion_tokens=1)


@pytest.fixture(scope="module")
def client():
    config = AppConfig.model_validate({"models": [{"name": "llm", "source": "llm", "family": "llm"},
                                                  {"name": "stt", "source": "stt", "family": "stt"}],
                                       "local_models_dir": "/nonexistent"})
    return TestClient(build_api(Ingress({"llm": LocalHandle(LLM()), "stt": LocalHandle(object())}, config)),
                      raise_server_exceptions=False)


@pytest.mark.parametrize("encoding, body", [
    ("gzip", gzip.compress(json.dumps(CHAT).encode())),
    ("gzip", gzip.compress(b" " * (64 << 20))),  # a bomb: 64 MiB in ~65 kB
    ("deflate", zlib.compress(json.dumps(CHAT).encode())),
    ("br", b"\x0b\x02\x80{}\x03"),
    ("GZIP, identity", b"{}"),
])
def test_a_compressed_json_body_is_a_415_naming_the_encoding(client, encoding, body):
    response = client.post("/v1/chat/completions", content=body,
                           headers={"content-type": "application/json", "content-encoding": encoding})
    assert response.status_code == 415, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error", "content-encoding", "unsupported_content_encoding"), error
    assert repr(encoding) in error["message"] and "uncompressed" in error["message"], error


def test_a_compressed_form_is_a_415_too(client):
    response = client.post("/v1/audio/transcriptions", content=gzip.compress(b"--x\r\n"),
                           headers={"content-type": "multipart/form-data; boundary=x", "content-encoding": "gzip"})
    assert response.status_code == 415, response.text
    assert response.json()["error"]["code"] == "unsupported_content_encoding"


@pytest.mark.parametrize("encoding", ["identity", "Identity", ""])
def test_an_identity_body_is_served(client, encoding):
    response = client.post("/v1/chat/completions", json=CHAT, headers={"content-encoding": encoding})
    assert response.status_code == 200, response.text
