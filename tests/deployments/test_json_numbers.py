"""NaN, Infinity and numbers past a float's range in a JSON body are a 400 `invalid_number` naming the field.

Python's json reads `NaN`, `Infinity` and `1e999` (none of them JSON, RFC 8259), so they reached the routes'
validation: `"temperature": NaN` was refused as "Input should be less than or equal to 2", a bound it does
not pass (reproduced on a live `serve run`, chat and completions alike)."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient
from local_handles import LocalHandle

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.errors import InvalidRequestError
from deployments.guard import check_json
from deployments.ingress import Ingress
from deployments.limits import RequestLimits


@pytest.mark.parametrize("body, param, said", [
    ('{"temperature": NaN}', "temperature", "nan"),
    ('{"top_p": Infinity}', "top_p", "inf"),
    ('{"a": {"b": [1, -Infinity]}}', "a.b.1", "-inf"),
    ('{"presence_penalty": 1e999}', "presence_penalty", "inf"),
])
def test_a_number_json_cannot_carry_is_refused_naming_its_field(body, param, said):
    with pytest.raises(InvalidRequestError) as refused:
        check_json(body, RequestLimits())
    assert (refused.value.param, refused.value.code) == (param, "invalid_number")
    assert f"'{param}' is {said} " in refused.value.message and "finite number" in refused.value.message


def test_finite_numbers_pass():
    assert check_json('{"t": 0.5, "e": 1e308, "n": -2.5e-300}', RequestLimits()) == {"t": 0.5, "e": 1e308,
                                                                                      "n": -2.5e-300}


def test_a_chat_with_temperature_nan_is_told_so():
    config = AppConfig.model_validate({"models": [{"name": "llm", "source": "llm", "family": "llm"}],
                                       "local_models_dir": "/nonexistent"})
    client = TestClient(build_api(Ingress({"llm": LocalHandle(object())}, config)), raise_server_exceptions=False)
    response = client.post("/v1/chat/completions", headers={"content-type": "application/json"},
                           content='{"model": "llm", "messages": [{"role": "user", "content": "hi"}], "temperature": NaN}')
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"]) == ("temperature", "invalid_number"), error
