"""Structured output through the official openai client: `response_format` json_object and
json_schema enforced token by token, so even the random-weight tiny models answer JSON that parses
and validates, plain and streamed, on the LLM and the VLM (and a LoRA adapter); bad schemas are 400s
naming the part at fault; a budget too small to finish the JSON still ends in valid JSON."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from serve_testutil import png_data_uri


@pytest.fixture(scope="module")
def app(chat_app):
    return chat_app


def strict(name: str, schema: dict) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}


# Each fits the tiny LLM's 64 tokens when closed at once (the tiny BPE spells most JSON byte by byte).
SCHEMAS = {
    "nested": {"type": "object", "additionalProperties": False, "required": ["user", "ok"], "properties": {
        "user": {"type": "object", "additionalProperties": False, "required": ["id", "name"],
                 "properties": {"id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12}}},
        "ok": {"type": "boolean"}}},
    "array_of_enums": {"type": "object", "additionalProperties": False, "required": ["colors"], "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 4}}},
    "bounded_numbers": {"type": "object", "additionalProperties": False, "required": ["age", "score"],
                        "properties": {"age": {"type": "integer", "minimum": 18, "maximum": 99},
                                       "score": {"type": "number", "minimum": -1.5, "maximum": 2.5}}},
    "optional_and_required": {"type": "object", "required": ["kind"], "additionalProperties": False, "properties": {
        "kind": {"type": "string", "enum": ["cat", "dog"]}, "note": {"type": "string"},
        "legs": {"type": "integer", "minimum": 0, "maximum": 8}}},
    "top_level_array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "maxItems": 5},
}


def ask(app, model: str, response_format: dict, content="Describe something.", **kw):
    return app.openai().chat.completions.create(
        model=model, messages=[{"role": "user", "content": content}], response_format=response_format, **kw)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_the_tiny_llm_answers_json_that_validates_plain_and_streamed(app, name):
    schema = SCHEMAS[name]
    for temperature in (0, 1.0):
        reply = ask(app, "tiny-llm", strict(name, schema), temperature=temperature, seed=3)
        choice = reply.choices[0]
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason in ("stop", "length") and reply.usage.completion_tokens <= 64
    chunks = list(ask(app, "tiny-llm", strict(name, schema), temperature=1.0, seed=5, stream=True,
                      stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    jsonschema.validate(json.loads(text), schema)
    plain = ask(app, "tiny-llm", strict(name, schema), temperature=1.0, seed=5)
    assert text == plain.choices[0].message.content  # the same seeded row, streamed or not
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_json_object_is_an_object_from_the_llm_its_adapter_and_the_vlm(app):
    for model in ("tiny-llm", "tiny-llm-lora"):
        reply = ask(app, model, {"type": "json_object"}, temperature=0.8, seed=1)
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    reply = app.openai().chat.completions.create(
        model="tiny-llava", response_format={"type": "json_object"}, temperature=0.8, seed=2, messages=[
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri()}},
                                         {"type": "text", "text": "What is it? JSON."}]}])
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


VLM_SCHEMA = {"type": "object", "additionalProperties": False, "required": ["color", "count"], "properties": {
    "color": {"enum": ["red", "blue"]}, "count": {"type": "integer", "minimum": 0, "maximum": 9}}}


@pytest.mark.parametrize("model", ["tiny-llava", "tiny-llava-lora"])
def test_the_vlm_extracts_json_from_an_image_plain_and_streamed(app, model):
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": png_data_uri((0, 0, 250))}},
                                             {"type": "text", "text": "Color and count?"}]}]
    client = app.openai()
    reply = client.chat.completions.create(model=model, messages=messages, response_format=strict("scene", VLM_SCHEMA),
                                           temperature=1.0, seed=4)
    jsonschema.validate(json.loads(reply.choices[0].message.content), VLM_SCHEMA)
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, temperature=1.0, seed=4,
                                                 response_format=strict("scene", VLM_SCHEMA)))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == reply.choices[0].message.content


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    legs: int = Field(ge=0, le=8)
    name: str = Field(max_length=6)
    vaccinated: bool


def test_the_clients_parse_helper_returns_the_pydantic_model(app):
    completion = app.openai().chat.completions.parse(
        model="tiny-llm", messages=[{"role": "user", "content": "A pet, please."}], response_format=Pet,
        temperature=0.7, seed=11)
    pet = completion.choices[0].message.parsed
    assert isinstance(pet, Pet) and 0 <= pet.legs <= 8 and len(pet.name) <= 6


def test_a_budget_too_small_for_the_model_still_ends_in_valid_json(app):
    """Random weights never close a free string by themselves: the row is closed by the grammar's
    shortest completion when max_tokens would cut it; finish_reason says `length`, the JSON is whole."""
    schema = {"type": "object", "required": ["story"], "additionalProperties": False,
              "properties": {"story": {"type": "string"}}}
    for max_tokens in (12, 20, 40):
        reply = ask(app, "tiny-llm", strict("story", schema), max_tokens=max_tokens, temperature=1.0, seed=max_tokens)
        choice = reply.choices[0]
        assert reply.usage.completion_tokens <= max_tokens
        jsonschema.validate(json.loads(choice.message.content), schema)
        assert choice.finish_reason == "length", choice
    with pytest.raises(openai.BadRequestError) as caught:  # cannot even be closed: refused up front
        ask(app, "tiny-llm", strict("story", schema), max_tokens=3)
    assert caught.value.body["param"] == "max_tokens" and "max_tokens=3" in caught.value.body["message"]


def test_constrained_and_free_requests_share_decode_steps(app):
    def stats():
        return app.get("/health").json()["models"]["tiny-llm"]["replica"]["batching"]

    client = app.openai()

    def one(i):
        kwargs = {"response_format": strict("nested", SCHEMAS["nested"])} if i % 2 else {}
        return client.chat.completions.create(model="tiny-llm", max_tokens=40, temperature=0, seed=i,
                                              messages=[{"role": "user", "content": f"item {i}"}], **kwargs)

    before = stats()
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(one, range(16)))
    after = stats()
    for i, reply in enumerate(replies):
        if i % 2:
            jsonschema.validate(json.loads(reply.choices[0].message.content), SCHEMAS["nested"])
    tokens = sum(r.usage.completion_tokens for r in replies)
    assert after["model_calls"] - before["model_calls"] < tokens / 3, (tokens, before, after)
    assert after["largest_batch"] >= 4
    assert after.get("grammars_compiled", 0) >= 1 and after.get("grammar_cache_hits", 0) >= 7  # one schema, cached


@pytest.mark.parametrize("schema,param,words", [
    ({"type": "objekt"}, "response_format.json_schema.schema.type", "Invalid type"),
    ({"type": "object", "properties": {"a": {"type": "string", "pattern": "(?<=x)y"}}},
     "response_format.json_schema.schema.properties.a.pattern", "look-around"),
    ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}},
     "response_format.json_schema.schema.properties.a.not", "Unimplemented"),
    ({"$ref": "#/$defs/missing"}, "response_format.json_schema.schema.$ref", "does not exist"),
    ({"type": "integer", "minimum": 5, "maximum": 2}, "response_format.json_schema.schema", "minimum"),
])
def test_a_schema_that_cannot_be_enforced_is_a_400_naming_its_part(app, schema, param, words):
    response = app.post("/v1/chat/completions", json={
        "model": "tiny-llm", "messages": [{"role": "user", "content": "x"}], "response_format": strict("bad", schema)})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def nested_objects(levels: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


@pytest.mark.parametrize("body,param,words", [
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ({"response_format": {"type": "json_object"}, "stop": ["}"]}, "stop", "stop"),
    ({"response_format": strict("deep", nested_objects(9))}, "response_format.json_schema.schema", "max_schema_depth"),
    ({"response_format": strict("big", {"type": "object", "properties": {
        f"p{i}": {"type": "string", "description": "x" * 500} for i in range(140)}})},
     "response_format.json_schema.schema", "max_schema_chars"),
])
def test_bounds_and_conflicts_are_400s_naming_the_field(app, body, param, words):
    response = app.post("/v1/chat/completions", json={
        "model": "tiny-llm", "messages": [{"role": "user", "content": "x"}], **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error
