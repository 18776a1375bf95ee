"""Review fixes to structured output and tool calls (the grammar side with the tiny tokenizer; the
reply side through tools.py and the finish_reason rule)."""

from __future__ import annotations

import json
import time

import jsonschema
import pytest

from deployments import structured
from loading.tiny.tokenizer import build_chatml_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_chatml_tokenizer()


def compile_row(tokenizer, schema, budget):
    return structured.compile_row(structured.json_schema_constraint(schema, "rf"), tokenizer, len(tokenizer),
                                  {tokenizer.eos_token_id}, budget)


# Satisfiable schemas the closing search used to refuse whatever max_tokens was: a required character no
# closer spells (unanchored pattern, formats), or a closing of hundreds of tokens.
SATISFIABLE = {
    "pattern ab (unanchored)": {"type": "string", "pattern": "ab"},
    "phone pattern": {"type": "object", "properties": {"n": {"type": "string", "pattern": r"\d{3}-\d{4}"}},
                      "required": ["n"]},
    "email": {"type": "string", "format": "email"},
    "uri (pydantic AnyUrl)": {"type": "object", "properties": {"homepage": {"type": "string", "format": "uri",
                                                                            "minLength": 1}},
                              "required": ["homepage"]},
    "string minLength 200": {"type": "object", "properties": {"s": {"type": "string", "minLength": 200}},
                             "required": ["s"]},
    "20 required people": {"type": "object", "required": ["people"], "properties": {"people": {
        "type": "array", "minItems": 20, "items": {"type": "object", "required": ["name", "age"], "properties": {
            "name": {"type": "string"}, "age": {"type": "integer"}}}}}},
    "60 required fields": {"type": "object", "properties": {f"field_{i}": {"type": "integer"} for i in range(60)},
                           "required": [f"field_{i}" for i in range(60)]},
}


@pytest.mark.parametrize("name", list(SATISFIABLE))
def test_satisfiable_schemas_get_a_closing(tokenizer, name):
    schema = SATISFIABLE[name]
    row = compile_row(tokenizer, schema, 3000)
    assert row.guarded and row.closing
    text = tokenizer.decode(row.closing)
    value = json.loads(text)
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())
    assert row.matcher.deep_copy().consume_tokens(row.closing)


def test_a_search_cut_by_its_time_bound_is_served_and_not_remembered(tokenizer, monkeypatch):
    """A search may stop at its time backstop: that proves nothing, so the request is served (unguarded)
    and the next one searches again and finds the closing."""
    schema = {"type": "object", "properties": {f"f{i}": {"type": "integer"} for i in range(100)},
              "required": [f"f{i}" for i in range(100)], "additionalProperties": False}
    failures = dict(structured.CACHE.failures)
    clock = iter(range(0, 10**9, 10))  # 10 s of the search's CPU between two looks at the clock
    monkeypatch.setattr(structured, "search_clock", lambda: float(next(clock)))
    monkeypatch.setattr(structured, "MAX_PROOF_NODES", 10)  # nor does the exhaustive search conclude
    row = compile_row(tokenizer, schema, 1000)
    monkeypatch.undo()
    assert not row.guarded
    assert structured.CACHE.failures == failures
    row = compile_row(tokenizer, schema, 1000)
    assert row.guarded and json.loads(tokenizer.decode(row.closing)).keys() == schema["properties"].keys()


def test_a_search_the_clock_cuts_twice_is_not_searched_again(tokenizer, monkeypatch):
    """A search cut by its time bound was never remembered, so a schema and max_tokens whose search always
    reaches it cost 0.25 s of search and 0.25 s of proof on every request: on a live serve run, 4 clients
    repeating {"pattern": "^[a-z]{3000}$"} at max_tokens 8 made plain SmolLM2 chats 4.7x slower (0.89 s ->
    4.13 s median). The bound is the searching thread's CPU time, so a second cut is the same work cut the
    same way: after it, that budget is served unguarded without a search."""
    schema = {"type": "object", "properties": {f"h{i}": {"type": "integer"} for i in range(100)},
              "required": [f"h{i}" for i in range(100)], "additionalProperties": False}
    looks: list[int] = []

    def clock() -> float:  # 10 s of the search's CPU between two looks: every search is cut
        looks.append(1)
        return 10.0 * len(looks)

    monkeypatch.setattr(structured, "search_clock", clock)
    monkeypatch.setattr(structured, "MAX_PROOF_NODES", 10)
    searched = []
    for _ in range(3):
        before = len(looks)
        row = compile_row(tokenizer, schema, 1000)
        assert not row.guarded
        searched.append(len(looks) > before)
    assert searched == [True, True, False]


def test_a_search_is_bounded_by_its_own_cpu_not_by_time_it_waits(tokenizer, monkeypatch):
    """The backstop counted wall time: on a loaded machine (or with the replica's event loop holding the
    GIL) a search was cut after a third of its work, and a tool call an idle server guards was served
    unguarded, max_tokens cutting it into raw `<tool_call>` text. Here every candidate look waits 10 ms
    without computing, as a thread waiting for a core or the GIL does: the search still finds its closing
    (~4 s; with the wall-time bound it stopped at 253 of its 400 looks and served the row unguarded)."""
    schema = {"type": "object", "properties": {f"g{i}": {"type": "integer"} for i in range(100)},
              "required": [f"g{i}" for i in range(100)], "additionalProperties": False}
    candidates = structured.RowGrammar._candidates

    def waiting(self, *args, **kwargs):
        time.sleep(0.01)
        return candidates(self, *args, **kwargs)

    monkeypatch.setattr(structured.RowGrammar, "_candidates", waiting)
    started = time.monotonic()
    row = compile_row(tokenizer, schema, 1000)
    assert time.monotonic() - started > structured.MAX_CLOSING_S  # it did wait past the bound
    assert row.guarded and json.loads(tokenizer.decode(row.closing)).keys() == schema["properties"].keys()


def test_only_a_proof_is_a_400_and_remembered(tokenizer):
    from deployments.errors import InvalidRequestError

    schema = {"type": "object", "properties": {"word": {"enum": ["aaaaaaaaaaaaaaaaaaaa"]}}, "required": ["word"]}
    with pytest.raises(InvalidRequestError) as caught:
        compile_row(tokenizer, schema, 3)
    assert caught.value.param == "max_tokens" and "max_tokens=3" in caught.value.message
    assert 3 in structured.CACHE.failures.values()  # not searched again


def test_a_budget_the_forced_text_alone_overflows_is_proven_short(tokenizer):
    """The call's forced opening (`<tool_call>\\n{"name":"send","arguments":{"text":"`) takes more tokens
    than a budget of 30 holds, however it is spelled: a proof, so a 400, however many tokens follow."""
    from deployments import tools

    send = [{"name": "send", "parameters": {"type": "object", "properties": {"text": {"type": "string"}},
                                            "required": ["text"], "additionalProperties": False}}]
    row = compile_row(tokenizer, {}, 8)
    row = structured.RowGrammar(row.vocab, structured.CACHE.matcher(row.vocab, tools.call_constraint(
        send, "required", True))[0], tools.call_constraint(send, "required", True))
    assert row.vocab.min_tokens(row.matcher.compute_ff_bytes()) > 30
    assert row.prove(30) == (None, True)


# Found by the review of the fixes above.

def unstarted(tokenizer, schema) -> structured.RowGrammar:
    """A row's grammar before its closing search (to run prove() alone)."""
    vocab = structured.vocabulary(tokenizer, len(tokenizer), {tokenizer.eos_token_id})
    constraint = structured.json_schema_constraint(schema, "rf")
    return structured.RowGrammar(vocab, structured.CACHE.matcher(vocab, constraint)[0], constraint)


def test_a_proof_never_returns_a_closing_past_the_budget(tokenizer):
    """prove() expanded nodes at depth == budget, so an accepting child one token deeper came back as the
    row's closing: '[9]' (3 tokens) served at max_tokens=2, where a 400 was due."""
    from deployments.errors import InvalidRequestError

    for schema in ({"type": "array", "minItems": 1, "items": {"type": "integer"}},
                   {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}):
        for budget in range(1, 9):
            try:
                row = compile_row(tokenizer, schema, budget)
            except InvalidRequestError:
                continue
            assert not row.guarded or len(row.closing) <= budget, (schema, budget, tokenizer.decode(row.closing))
        shortest = len(compile_row(tokenizer, schema, 20).closing)
        for budget in (shortest, shortest - 1):  # a proof's closing fits its budget, or it says none does
            closing, proven = unstarted(tokenizer, schema).prove(budget)
            assert proven and (closing is None or len(closing) <= budget), (budget, closing)


def test_the_proof_stops_at_the_time_backstop_and_proves_nothing(tokenizer, monkeypatch):
    """The exhaustive search had no time bound: a 200 KB enum of long strings spent 3.6 s of replica CPU per
    request in it, for each new max_tokens."""
    row = unstarted(tokenizer, {"enum": [f"{i:04d}" + "x" * 2000 for i in range(100)]})
    clock = iter(range(0, 10**9, 10))  # 10 s between two looks at the clock
    monkeypatch.setattr(structured, "search_clock", lambda: float(next(clock)))
    assert row.prove(12, max_nodes=10**9) == (None, False) and row.timed_out


def test_pattern_hints_are_not_built_past_their_bound():
    """A pattern in a schema's data ('default', 'examples') was spelled in full before the 8 KB cap:
    'a{1000000000}' was a gigabyte per request (+955 MB peak RSS from a 101-byte schema)."""
    import tracemalloc

    tracemalloc.start()
    try:
        found = structured.hints('{"default": {"pattern": "a{1000000000}"}, '
                                 '"examples": [{"pattern": "(a{40000}){25000}"}], "x": {"pattern": "(b|a{99999})c"}}')
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert found == (b"bc",) and peak < 5 * 2**20, (found, peak)


def test_complete_calls_that_cannot_be_followed_end_as_stop():
    """With parallel calls allowed, a model starting one more call that cannot close in the tokens left was
    rolled back with nothing to close, yet reported 'length' (so 'tool_calls' became 'length' and openai's
    .parse() raised LengthFinishReasonError on valid calls). Nothing was cut: 'stop'."""
    from types import SimpleNamespace

    from deployments.decode_loop import _advance_constrained

    def row(forced):
        taken: list[int] = []
        grammar = SimpleNamespace(advance=lambda token, room: forced, stopped=False, close=lambda: [])
        return SimpleNamespace(grammar=grammar, limit=40, tokens=[1] * 31, take=lambda t, sampled=True: taken.append(t),
                               started=0.0, spec=SimpleNamespace(generation_timeout_s=60)), taken

    complete, taken = row([])
    assert _advance_constrained(complete, 7, 1.0) == "stop" and taken == []
    cut, taken = row([5, 6])
    assert _advance_constrained(cut, 7, 1.0) == "length" and taken == [5, 6]


def test_a_tokenizer_gone_with_its_model_takes_its_vocabulary_along():
    """_VOCABS kept every tokenizer that ever served a constrained request, with its vocabulary (tens of MB
    for a large one), for the replica's life: a model loaded and unloaded at run time leaked both each time.
    Now they go with the model; the grammar cache is keyed by a serial no later vocabulary takes (by id(), a
    new vocabulary at the old one's address would have been handed the old tokenizer's compiled grammars)."""
    import gc
    import weakref

    tokenizer = build_chatml_tokenizer()
    row = compile_row(tokenizer, {"type": "integer"}, 8)
    serial, gone = row.vocab.serial, (weakref.ref(tokenizer), weakref.ref(row.vocab))
    del row, tokenizer
    gc.collect()
    assert [ref() for ref in gone] == [None, None]
    later = compile_row(build_chatml_tokenizer(), {"type": "integer"}, 8)
    assert later.vocab.serial != serial and later.guarded
