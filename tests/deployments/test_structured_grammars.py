"""The grammar side alone (no model: random logits through the tiny tokenizer): whatever is sampled,
a constrained row ends in output that parses and validates within its budget; hostile schemas are
refused quickly; compiled grammars are cached."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest
import torch

from deployments import structured
from deployments.errors import InvalidRequestError
from loading.tiny.tokenizer import build_chatml_tokenizer

SCHEMAS = {
    "strings": {"type": "object", "required": ["a", "b"], "additionalProperties": False,
                "properties": {"a": {"type": "string"}, "b": {"type": "string", "maxLength": 5}}},
    "numbers": {"type": "object", "required": ["n", "x"], "additionalProperties": False,
                "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20},
                               "x": {"type": "number", "minimum": -1, "maximum": 1}}},
    "array": {"type": "array", "items": {"enum": ["red", "green"]}, "minItems": 2, "maxItems": 4},
    "nested": {"type": "object", "required": ["o"], "properties": {"o": {"type": "object", "required": ["p"],
                                                                         "properties": {"p": {"type": "boolean"}}}}},
    "pattern": {"type": "string", "pattern": "^[a-c]{3}-[0-9]{2}$"},
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_chatml_tokenizer()


def decode_row(tokenizer, schema: dict, budget: int, seed: int, temperature: float = 1.0) -> tuple[str, str, int]:
    """What the decode loop does for one row, with random logits: mask, sample, advance; close at the end."""
    end = {tokenizer.eos_token_id}
    row = structured.compile_row(structured.json_schema_constraint(schema, "rf"), tokenizer, len(tokenizer), end,
                                 budget)
    generator = torch.Generator().manual_seed(seed)
    tokens: list[int] = []
    while True:
        scores = row.mask(torch.randn(len(tokenizer), generator=generator) * 3)
        token = int(torch.multinomial(torch.softmax(scores / temperature, -1), 1, generator=generator))
        if token in end:
            return tokenizer.decode(tokens), "stop", len(tokens)
        forced = row.advance(token, budget - len(tokens) - 1)
        if forced is not None:
            tokens += forced
            return tokenizer.decode(tokens), "length", len(tokens)
        tokens.append(token)
        if row.stopped:
            return tokenizer.decode(tokens), "stop", len(tokens)
        if len(tokens) >= budget:
            tokens += row.close()
            return tokenizer.decode(tokens), "length", len(tokens)


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_whatever_is_sampled_the_output_validates_within_its_budget(tokenizer, name):
    schema = SCHEMAS[name]
    shortest = len(structured.compile_row(structured.json_schema_constraint(schema, "rf"), tokenizer, len(tokenizer),
                                          {tokenizer.eos_token_id}, 512).closing)
    for seed in range(12):
        budget = shortest + seed * 3  # from exactly the shortest output up
        text, finish, used = decode_row(tokenizer, schema, budget, seed)
        assert used <= budget, (budget, used, text)
        jsonschema.validate(json.loads(text), schema)
        assert finish in ("stop", "length")


def test_a_budget_below_the_shortest_output_is_a_400_on_max_tokens(tokenizer):
    with pytest.raises(InvalidRequestError) as caught:
        structured.compile_row(structured.json_schema_constraint(SCHEMAS["nested"], "rf", "the nested schema"),
                               tokenizer, len(tokenizer), {tokenizer.eos_token_id}, 4)
    assert caught.value.param == "max_tokens" and "max_tokens=4" in caught.value.message


@pytest.mark.parametrize("schema", [
    {"type": "string", "minLength": 10**9},
    {"type": "array", "items": {"type": "integer"}, "minItems": 10**8},
    {"type": "string", "pattern": "^(a|b){5000}$"},
])
def test_schemas_no_search_can_close_are_served_unguarded_within_the_search_bounds(tokenizer, schema):
    """The search gives up within its bounds, which proves nothing (a 400 needs a proof): the row runs
    on the mask alone and max_tokens cuts it, finish_reason length."""
    started = time.monotonic()
    row = structured.compile_row(structured.json_schema_constraint(schema, "rf"), tokenizer, len(tokenizer),
                                 {tokenizer.eos_token_id}, 64)
    assert not row.guarded and row.closing == []
    assert time.monotonic() - started < 20 * structured.MAX_CLOSING_S  # bounded (a loaded machine: margin)
    text, finish, used = decode_row(tokenizer, schema, 64, seed=0)
    assert (finish, used) == ("length", 64)


def test_compiled_grammars_and_their_closings_are_cached(tokenizer):
    constraint = structured.json_schema_constraint({"type": "object", "properties": {"q": {"type": "integer"}},
                                                    "required": ["q"]}, "rf")
    before = dict(structured.CACHE.stats)
    for _ in range(5):
        structured.compile_row(constraint, tokenizer, len(tokenizer), {tokenizer.eos_token_id}, 32)
    assert structured.CACHE.stats["compiled"] == before["compiled"] + 1
    assert structured.CACHE.stats["cache_hits"] == before["cache_hits"] + 4


def test_the_ingress_check_names_the_part_of_the_schema(tokenizer):
    with pytest.raises(InvalidRequestError) as caught:
        structured.check_grammar(structured.json_schema_constraint(
            {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, "rf.schema"))
    assert caught.value.param == "rf.schema.properties.tags.uniqueItems"


def accepts(row, tokenizer, text: str) -> bool:
    return row.matcher.consume_tokens(tokenizer.encode(text, add_special_tokens=False)) and row.matcher.is_accepting()


def test_tool_parameters_with_refs_keep_their_meaning_inside_the_call_grammar(tokenizer):
    """The parameters sit under `arguments` of the call object: "#/$defs/..." pointed at nothing (a 400
    for a pydantic model's schema) and "#" at the call object (the wrong schema, enforced silently)."""
    from deployments.tools import call_constraint

    point = {"$defs": {"Point": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"],
                                 "additionalProperties": False}},
             "type": "object", "properties": {"p": {"$ref": "#/$defs/Point"}}, "required": ["p"],
             "additionalProperties": False}
    tree = {"type": "object", "properties": {"child": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}},
            "required": ["child"], "additionalProperties": False}
    end = {tokenizer.eos_token_id}
    for tools, good, bad in [
        ([{"name": "f", "parameters": point}], '{"name":"f","arguments":{"p":{"x":1}}}', '{"name":"f","arguments":{"p":1}}'),
        ([{"name": "tree", "parameters": tree}], '{"name":"tree","arguments":{"child":{"child":null}}}',
         '{"name":"tree","arguments":{"child":{"name":"tree","arguments":{"child":null}}}}'),
    ]:
        constraint = call_constraint(tools, "required", True)
        structured.check_grammar(constraint)
        wrap = "<tool_call>\n{}\n</tool_call>\n"
        assert accepts(structured.compile_row(constraint, tokenizer, len(tokenizer), end, 200), tokenizer,
                       wrap.format(good))
        assert not accepts(structured.compile_row(constraint, tokenizer, len(tokenizer), end, 200), tokenizer,
                           wrap.format(bad))


def test_parameters_without_a_type_are_still_an_object():
    from deployments.tools import _arguments_schema

    schema, _ = _arguments_schema({"properties": {"city": {"type": "string"}}, "required": ["city"]})
    assert schema["type"] == "object"


@pytest.mark.parametrize("schema,shortest", [
    ({"type": "object", "properties": {"v": {"anyOf": [{"type": "string", "minLength": 12}, {"type": "integer"}]}},
      "required": ["v"], "additionalProperties": False}, '{"v":0}'),
    ({"type": "object", "properties": {"nick": {"type": ["string", "null"], "minLength": 10}}, "required": ["nick"],
      "additionalProperties": False}, '{"nick":null}'),
])
def test_the_closing_search_tries_every_branch_and_a_larger_budget_does_not_refuse_a_smaller(tokenizer, schema,
                                                                                             shortest):
    """Once a `"` was accepted the search dropped the other candidates (an integer, `null`), so a budget
    the output fits was a 400; a closing cached from a larger budget then refused smaller ones too."""
    end = {tokenizer.eos_token_id}
    tokens = len(tokenizer.encode(shortest, add_special_tokens=False))
    constraint = structured.json_schema_constraint(schema, "rf")
    structured.compile_row(constraint, tokenizer, len(tokenizer), end, 64)  # a long closing may be cached first
    row = structured.compile_row(constraint, tokenizer, len(tokenizer), end, tokens)
    assert len(row.closing) <= tokens


@pytest.mark.parametrize("schema,param", [
    ({"type": "object", "minProperties": 3}, "rf.schema.minProperties"),
    ({"type": "object", "properties": {"meta": {"type": "object", "additionalProperties": {"type": "integer"},
                                                "minProperties": 2}}, "required": ["meta"]},
     "rf.schema.properties.meta.minProperties"),
])
def test_min_properties_on_open_keys_is_refused_naming_it(schema, param):
    """The grammar counts keys as written and lets keys outside `properties` repeat; JSON keeps one of
    duplicate keys. The closing itself wrote `"":""` again and again: {"type": "object", "minProperties": 5}
    ended as '{"Hi":{},"":"","":"","":"","":""}' from SmolLM2 (2 properties), every such forced close
    failed the schema. A 400 naming the keyword, as uniqueItems is."""
    with pytest.raises(InvalidRequestError) as caught:
        structured.check_grammar(structured.json_schema_constraint(schema, "rf.schema", "the schema"))
    assert caught.value.param == param and "minProperties" in caught.value.message


@pytest.mark.parametrize("schema", [
    {"type": "object", "minProperties": 1},  # one key is one distinct key
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
     "minProperties": 3},  # a and b cannot repeat: the one key more makes three
    {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
     "additionalProperties": False, "minProperties": 2},
    {"type": "object", "properties": {"minProperties": {"type": "integer"}}},  # a property of that name
])
def test_min_properties_the_grammar_keeps_distinct_is_served(tokenizer, schema):
    structured.check_grammar(structured.json_schema_constraint(schema, "rf.schema"))
    for seed in range(4):
        text, _, _ = decode_row(tokenizer, schema, 64, seed)
        jsonschema.validate(json.loads(text), schema)


def test_a_long_min_length_closes_in_few_tokens_where_the_vocabulary_has_long_runs():
    """A string's minLength was met one character per token (the closing wrote '}}}}...'), so with SmolLM2
    (60 spaces are 3 tokens) {"summary": minLength 60} at max_tokens 64 found no closing and was served
    unguarded: max_tokens could cut its JSON. Runs of spaces are spelled whole now."""
    import string

    tokenizer = build_chatml_tokenizer()
    # as a large vocabulary has them: many short tokens (which the search tries first) and runs of spaces
    tokenizer.add_tokens([a + b for a in string.ascii_lowercase for b in string.ascii_lowercase] + [" " * 32, " " * 8])
    schema = {"type": "object", "properties": {"summary": {"type": "string", "minLength": 60, "maxLength": 70}},
              "required": ["summary"], "additionalProperties": False}
    end = {tokenizer.eos_token_id}
    row = structured.compile_row(structured.json_schema_constraint(schema, "rf"), tokenizer, len(tokenizer), end, 24)
    assert row.guarded and len(row.closing) <= 24
    for seed in range(6):
        text, _, used = decode_row(tokenizer, schema, 24, seed)
        assert used <= 24
        jsonschema.validate(json.loads(text), schema)


def test_a_min_length_no_budget_holds_is_searched_once(tokenizer):
    """The runs of spaces stop at MAX_RUN: runs of up to 8192 validated at every node made a search that
    cannot close (minLength 3000 in max_tokens 32) end at its time bound, so it was not remembered and
    every such request cost the search's whole 0.25 s again."""
    constraint = structured.json_schema_constraint({"type": "string", "minLength": 3000}, "rf")
    end = {tokenizer.eos_token_id}
    row = structured.compile_row(constraint, tokenizer, len(tokenizer), end, 32)
    assert not row.guarded and not row.timed_out
    key = structured.CACHE.matcher(row.vocab, constraint)[1]
    assert 32 in structured.CACHE.capped[key]  # the next request is served at once, unguarded
