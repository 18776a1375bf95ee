"""Tool calling through the official openai client: `required` and named choices are grammar-
constrained, so the random-weight tiny LLM calls tools whose arguments validate; streamed calls
arrive as OpenAI's tool_calls deltas; an agent loop (call -> tool result -> answer) runs through the
fallback tool format of a template that knows no tools."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest


@pytest.fixture(scope="module")
def app(chat_app):
    return chat_app


# Small: the tiny Llama's context is 512 tokens and its tokenizer spells JSON nearly byte by byte.
WEATHER = {"type": "object", "required": ["city", "days"], "properties": {
    "city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}}}
TIME = {"type": "object", "required": ["tz"], "properties": {"tz": {"enum": ["UTC", "CET"]}}}
TOOLS = [{"type": "function", "function": {"name": "weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "time", "parameters": TIME}}]
PARAMETERS = {"weather": WEATHER, "time": TIME}
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def check_calls(calls) -> None:
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def test_required_calls_tools_whose_arguments_validate(app):
    reply = app.openai().chat.completions.create(model="tiny-llm", messages=ASK, tools=TOOLS, tool_choice="required",
                                                 temperature=1.0, seed=2)
    choice = reply.choices[0]
    # `length` when the random model kept calling until max_tokens ended the row (the server closed it)
    assert choice.finish_reason in ("tool_calls", "length") and choice.message.content is None
    check_calls(choice.message.tool_calls)


def test_a_named_function_is_the_one_called_and_parallel_false_gives_one_call(app):
    client = app.openai()
    for name in ("time", "weather"):
        reply = client.chat.completions.create(model="tiny-llm", messages=ASK, tools=TOOLS, temperature=1.0, seed=7,
                                               tool_choice={"type": "function", "function": {"name": name}})
        calls = reply.choices[0].message.tool_calls
        check_calls(calls)
        assert [c.function.name for c in calls] == [name]
    reply = client.chat.completions.create(model="tiny-llm", messages=ASK, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, temperature=1.0, seed=3)
    assert len(reply.choices[0].message.tool_calls) == 1


def test_streamed_tool_calls_arrive_as_deltas_and_match_the_plain_reply(app):
    client = app.openai()
    kwargs = dict(model="tiny-llm", messages=ASK, tools=TOOLS, tool_choice="required", temperature=1.0, seed=5)
    plain_choice = client.chat.completions.create(**kwargs).choices[0]
    plain = plain_choice.message.tool_calls
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    calls: dict[int, dict] = {}
    for chunk in chunks:
        for delta in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            call = calls.setdefault(delta.index, {"id": None, "name": "", "arguments": ""})
            call["id"] = call["id"] or delta.id
            call["name"] += delta.function.name or ""
            call["arguments"] += delta.function.arguments or ""
    assert [c["name"] for c in calls.values()] == [c.function.name for c in plain]
    assert [json.loads(c["arguments"]) for c in calls.values()] == [json.loads(c.function.arguments) for c in plain]
    assert all(c["id"].startswith("call_") for c in calls.values())
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [plain_choice.finish_reason]
    # each call comes whole once its block closes, so it is exactly the plain reply's (same parser)
    assert [c["arguments"] for c in calls.values()] == [c.function.arguments for c in plain]


def test_an_agent_loop_calls_a_tool_reads_its_result_and_answers(app):
    client = app.openai()
    messages = [{"role": "system", "content": "You are an agent."}, *ASK]
    tools = TOOLS[:1]
    first = client.chat.completions.create(model="tiny-llm", messages=messages, tools=tools,
                                           tool_choice={"type": "function", "function": {"name": "weather"}},
                                           temperature=0.5, seed=1)
    call = first.choices[0].message.tool_calls[0]
    arguments = json.loads(call.function.arguments)
    messages.append(first.choices[0].message.model_dump(exclude_none=True))
    messages.append({"role": "tool", "tool_call_id": call.id,
                     "content": json.dumps({"city": arguments["city"], "forecast": "sunny"})})
    answer = client.chat.completions.create(model="tiny-llm", messages=messages, tools=tools, tool_choice="none",
                                            max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    # tool_choice none renders no tools; the history with the call and the tool's answer is still there
    assert answer.usage.prompt_tokens > 40
    # the same loop with auto: the model may answer or call again; either way the reply is well formed
    again = client.chat.completions.create(model="tiny-llm", messages=messages, tools=tools, tool_choice="auto",
                                           max_tokens=20, temperature=0)
    message = again.choices[0].message
    if message.tool_calls:
        check_calls(message.tool_calls)
        assert again.choices[0].finish_reason == "tool_calls"
    else:
        assert isinstance(message.content, str)


def test_auto_and_none_with_a_random_model_are_plain_text_replies(app):
    client = app.openai()
    for choice in ("auto", "none"):
        reply = client.chat.completions.create(model="tiny-llm", messages=ASK, tools=TOOLS, tool_choice=choice,
                                               max_tokens=10, temperature=0)
        assert reply.choices[0].message.tool_calls is None and reply.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("body,param,words", [
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name", "not in tools"),
    ({"tools": [{"type": "function", "function": {"name": "bad", "parameters": {"type": "objekt"}}}],
      "tool_choice": "required"}, "tools.0.function.parameters.type", "Invalid type"),
    ({"tools": [{"type": "custom", "custom": {"name": "x"}}]}, "tools.0.type", "function"),
    ({"tools": TOOLS * 2}, "tools", "same function name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "response_format",
     "tool calls"),
    ({"tools": [{"type": "function", "function": {"name": f"f{i}"}} for i in range(129)]}, "tools", "max_tools"),
    ({"functions": [{"name": "f"}]}, "functions", "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "stop": ["x"]}, "stop", "stop"),
])
def test_bad_tool_requests_are_400s_naming_the_field(app, body, param, words):
    response = app.post("/v1/chat/completions", json={"model": "tiny-llm", "messages": ASK, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"], error


def test_a_tool_call_too_long_for_the_vlms_budget_is_a_400_on_max_tokens(app):
    """The tiny LLaVA allows 32 new tokens; the shortest call of `weather` takes more."""
    with pytest.raises(openai.BadRequestError) as caught:
        app.openai().chat.completions.create(model="tiny-llava", messages=ASK, tools=TOOLS, tool_choice="required")
    assert caught.value.body["param"] == "max_tokens" and "max_tokens=32" in caught.value.body["message"]


def test_a_call_max_tokens_cut_and_the_server_closed_says_length(app):
    """The budget guard writes the call's closing when max_tokens ends it: its arguments are whatever fit
    (here an unfinished `text`), so finish_reason is `length`, plain and streamed, not `tool_calls`."""
    send = [{"type": "function", "function": {"name": "send", "parameters": {
        "type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"],
        "additionalProperties": False}}}]
    client = app.openai()
    kwargs = dict(model="tiny-llm", messages=ASK, tools=send, tool_choice="required", temperature=1.0, seed=1,
                  max_tokens=64)
    reply = client.chat.completions.create(**kwargs)
    assert reply.usage.completion_tokens == 64  # the random model never ends its text: the budget did
    assert reply.choices[0].finish_reason == "length"
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments).keys() == {"text"}
    chunks = list(client.chat.completions.create(stream=True, **kwargs))
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
