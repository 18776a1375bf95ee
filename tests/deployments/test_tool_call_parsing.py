"""Tool calls out of a reply (auto mode parses what the model wrote) and into a prompt (the fallback
format for templates without tools); streamed calls as OpenAI's deltas, in any piece sizes."""

from __future__ import annotations

import json

import pytest

from deployments.tools import CallStream, fallback_messages, parse_calls, template_takes_tools

TOOLS = [{"name": "weather", "parameters": {"type": "object"}}, {"name": "time"}]


@pytest.mark.parametrize("text,content,calls", [
    ('<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call>', None,
     [("weather", {"city": "Paris"})]),
    ('Let me check.\n<tool_call>{"name":"weather","arguments":{}}</tool_call>\n<tool_call>{"name":"time",'
     '"arguments":{"tz":"UTC"}}</tool_call>', "Let me check.", [("weather", {}), ("time", {"tz": "UTC"})]),
    ('{"name": "time", "parameters": {"tz": "CET"}}', None, [("time", {"tz": "CET"})]),  # Llama 3's bare object
    ('<tool_call>{"name":"weather","arguments":"{\\"city\\": \\"Oslo\\"}"}', None, [("weather", {"city": "Oslo"})]),
    ('<tool_call>{"name":"unknown","arguments":{}}</tool_call>', None, []),
    ("just words", None, []),
    ('<tool_call>{"name":"weather","arguments":{"city":', None, []),  # cut short: text, not a call
])
def test_calls_are_parsed_out_of_the_reply(text, content, calls):
    got_content, got = parse_calls(text, TOOLS)
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    if calls:
        assert got_content == content and all(c["id"].startswith("call_") for c in got)
    else:
        assert got_content == text


def test_parallel_false_keeps_the_first_call():
    text = ('<tool_call>{"name":"weather","arguments":{}}</tool_call>'
            '<tool_call>{"name":"time","arguments":{}}</tool_call>')
    assert [c["function"]["name"] for c in parse_calls(text, TOOLS, parallel=False)[1]] == ["weather"]


@pytest.mark.parametrize("size", [1, 3, 7, 100])
def test_a_streamed_reply_becomes_content_and_call_deltas_in_any_piece_size(size):
    text = ('Sure. <tool_call>\n{"name":"weather","arguments":{"city":"Par}is","n":[1,2]}}\n</tool_call>\n'
            '<tool_call>\n{"arguments": {"tz": "UTC"}, "name": "time"}\n</tool_call>\n')
    stream = CallStream(TOOLS)
    items = []
    for i in range(0, len(text), size):
        items += stream.feed(text[i:i + size])
    items += stream.finish()
    content = "".join(item.get("content", "") for item in items)
    calls: dict[int, dict] = {}
    for item in items:
        if "tool_call" in item:
            delta = item["tool_call"]
            call = calls.setdefault(delta["index"], {"name": "", "arguments": ""})
            call["name"] += delta["function"].get("name") or ""
            call["arguments"] += delta["function"].get("arguments") or ""
    assert content.strip() == "Sure."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("weather", {"city": "Par}is", "n": [1, 2]}), ("time", {"tz": "UTC"})]


def test_text_that_only_looks_like_a_tag_start_is_sent_as_content():
    stream = CallStream(TOOLS)
    items = stream.feed("a <tool") + stream.feed("box> b") + stream.finish()
    assert "".join(i["content"] for i in items) == "a <toolbox> b"


def test_fallback_format_for_templates_without_tools():
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "weather", "arguments": {"city": "Oslo"}}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    out = fallback_messages(messages, TOOLS)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.") and "<tools>" in out[0]["content"]
    assert out[2] == {"role": "assistant", "content": '<tool_call>\n{"name": "weather", "arguments": {"city": '
                      '"Oslo"}}\n</tool_call>'}
    assert out[3] == {"role": "user", "content": "<tool_response>\nsunny\n</tool_response>"}
    assert not fallback_messages([{"role": "user", "content": "x"}], None)[0].get("tool_calls")


def test_a_template_takes_tools_when_it_uses_the_variable():
    assert template_takes_tools("{% if tools %}{{ tools | tojson }}{% endif %}{{ messages }}")
    assert not template_takes_tools("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert not template_takes_tools(None)


def streamed(text: str, size: int, parallel: bool = True) -> tuple[str, list[tuple[str, str]]]:
    stream, items = CallStream(TOOLS, parallel), []
    for i in range(0, len(text), size):
        items += stream.feed(text[i:i + size])
    items += stream.finish()
    calls = [(i["tool_call"]["function"]["name"], i["tool_call"]["function"]["arguments"]) for i in items
             if "tool_call" in i]
    return "".join(i.get("content", "") for i in items), calls


def plain(text: str, parallel: bool = True) -> tuple[str, list[tuple[str, str]]]:
    content, calls = parse_calls(text, TOOLS, parallel)
    if not calls:  # chat_server's plain reply is then the text as written
        content = text
    return content or "", [(c["function"]["name"], c["function"]["arguments"]) for c in calls]


def test_a_close_tag_inside_a_string_argument_belongs_to_the_argument():
    text = '<tool_call>\n{"name": "weather", "arguments": {"note": "end with </tool_call> then"}}\n</tool_call>'
    assert plain(text) == ("", [("weather", '{"note": "end with </tool_call> then"}')])
    assert all(streamed(text, size) == plain(text) for size in (1, 4, 9, 200))


@pytest.mark.parametrize("text", [
    '{"name": "time", "parameters": {"tz": "CET"}}',  # a bare call object (Llama 3)
    '<tool_call>{"name":"weather","arguments":"{\\"city\\": \\"Oslo\\"}"}</tool_call>',  # arguments as a string
    '<tool_call>{"name":"weather","arguments":5}</tool_call>',  # not a call: stays text
    '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}\n</tool_call>',  # unclosed object: text
    'I use the <tool_call> tag. <tool_call>{"name":"time","arguments":{}}</tool_call>',
    'Sure.\n<tool_call>{"name":"time","arguments":{}}</tool_call>\n\nDone.  ',
    "\n  Apples\nPears\n",  # no call: the stream keeps the reply's whitespace, as the plain reply
    '<tool_call>{"name":"weather","arguments":{"gain": 1e400}}</tool_call>',  # a double overflows
    '<tool_call>{"name":"weather","arguments":{"gain": NaN}}</tool_call>',  # not JSON: text
    '  Sure.  <tool_call>{"name":"time","arguments":{}}</tool_call>  ',  # a call's neighbouring whitespace: out
    '<tool_call>{"name":"weather","arguments":{}}</tool_call><tool_call>{"name":"time","arguments":{}}</tool_call>',
])
def test_streamed_calls_and_content_are_exactly_the_plain_replys(text):
    """The stream had its own parser: a bare call came as content, string arguments as the string, an
    invalid block as an invented call, and arguments and whitespace differed from the plain reply's."""
    for parallel in (True, False):
        for size in (1, 3, 11, 500):
            assert streamed(text, size, parallel) == plain(text, parallel), (size, parallel)


def test_streamed_and_plain_agree_on_random_replies():
    import random

    rng = random.Random(0)
    parts = ["Sure. ", "\n", "  ", "the <tool_call> tag", '<tool_call>\n{"name": "weather", "arguments": {"a": '
             '"x</tool_call>y"}}\n</tool_call>', '<tool_call>{"name":"time","arguments":"{\\"b\\": 1}"}</tool_call>',
             '<tool_call>{"name":"nope","arguments":{}}</tool_call>', '{"name": "time", "arguments": {}}', "Done.",
             "<tool", "{", "}", "</tool_call>", "<tool_call>"]
    for _ in range(2000):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(1, 6)))
        parallel = rng.random() < 0.5
        assert streamed(text, rng.choice([1, 2, 7, 100]), parallel) == plain(text, parallel), text


def strict_json(text: str) -> object:
    def refuse(name):
        raise ValueError(name)
    return json.loads(text, parse_constant=refuse)


def test_arguments_are_json_text():
    """json.dumps wrote a number no double holds (1e400, which the required grammar allows) as
    `Infinity`, and passed a written `NaN` through: neither is JSON. The first keeps the model's own
    text; a block with NaN / Infinity is not JSON, so it is text, not a call."""
    for text, arguments in [
        ('<tool_call>{"name": "weather", "arguments": {"gain": 1e400, "n": [1, 2]}}</tool_call>',
         '{"gain": 1e400, "n": [1, 2]}'),
        ('{"name": "weather", "parameters": {"gain": -1e999}}', '{"gain": -1e999}'),  # a bare call
        ('<tool_call>{"name":"weather","arguments":"{\\"gain\\": 1e400}"}</tool_call>', '{"gain": 1e400}'),
        ('<tool_call>{"name":"weather","arguments":{"gain": 1.5}}</tool_call>', '{"gain": 1.5}'),
    ]:
        content, calls = parse_calls(text, TOOLS)
        assert calls[0]["function"]["arguments"] == arguments
        strict_json(arguments)
    for constant in ("NaN", "Infinity", "-Infinity"):
        text = f'<tool_call>{{"name":"weather","arguments":{{"gain": {constant}}}}}</tool_call>'
        assert parse_calls(text, TOOLS) == (text, [])
