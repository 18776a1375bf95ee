"""Wire models: what they accept, what they reject (naming the field), and their helpers."""

import io

import pytest
from fastapi import UploadFile
from pydantic import ValidationError

from deployments.protocol import (
    ChatCompletionChoice,
    ChatCompletionChunk,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    GenerateRequest,
    ModelCard,
    ModelList,
    SpeechRequest,
    TranscriptionForm,
    TtsRequest,
    UsageInfo,
    new_completion_id,
)

USER = {"role": "user", "content": "hi"}


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [USER], **fields})


def error_locs(exc_info) -> list[tuple]:
    return [e["loc"] for e in exc_info.value.errors()]


def test_unknown_fields_are_ignored_and_defaults_apply():
    req = chat(some_vendor_field=0.5, top_k=3)
    assert not hasattr(req, "some_vendor_field") and not hasattr(req, "top_k")
    assert (req.stream, req.n, req.stop_list(), req.requested_max_tokens()) == (False, 1, [], None)


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"temperature": 2.5}, ("temperature",)),
        ({"temperature": -0.1}, ("temperature",)),
        ({"top_p": -0.1}, ("top_p",)),
        ({"top_p": 1.5}, ("top_p",)),
        ({"max_tokens": 0}, ("max_tokens",)),
        ({"max_completion_tokens": -3}, ("max_completion_tokens",)),
        ({"n": 0}, ("n",)),
        ({"audio": {"voice": "alloy"}}, ("audio",)),
        ({"top_logprobs": 3}, ("top_logprobs",)),
        ({"logit_bias": {"x": 1}}, ("logit_bias",)),
        ({"stop": 5}, ("stop",)),  # how many stops is limits.max_stop_sequences' to say, not the schema's
        ({"stop": [""]}, ("stop", "list", 0)),
        ({"stop": ""}, ("stop", "str")),
        ({"messages": []}, ("messages",)),
        ({"messages": [{"role": "robot", "content": "x"}]}, ("messages", 0, "role")),
        ({"messages": [{"role": "user", "content": 5}]}, ("messages", 0, "content")),
        ({"messages": [{"role": "user", "content": [{"type": "audio"}]}]}, ("messages", 0, "content", "list", 0)),
    ],
)
def test_bad_chat_fields_fail_naming_the_field(fields, loc):
    with pytest.raises(ValidationError) as exc_info:
        chat(**fields)
    assert error_locs(exc_info) == [loc]


def test_refused_openai_fields_say_why():
    with pytest.raises(ValidationError, match="deprecated by OpenAI; send 'tools'"):
        chat(functions=[{"name": "f"}])
    with pytest.raises(ValidationError, match="not served"):
        chat(prediction={"type": "content", "content": "x"})


def test_max_completion_tokens_wins_over_max_tokens():
    assert chat(max_tokens=10, max_completion_tokens=20).requested_max_tokens() == 20
    assert chat(max_tokens=10).requested_max_tokens() == 10


def test_stop_list_accepts_a_string_or_a_list():
    assert chat(stop="END").stop_list() == ["END"]
    assert chat(stop=["a", "b"]).stop_list() == ["a", "b"]


def test_to_messages_gives_hf_template_dicts_and_keeps_image_urls():
    req = chat(
        messages=[
            {"role": "developer", "content": "Be brief."},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {"type": "image_url", "image_url": {"url": "https://example.com/cat.png", "detail": "low"}},
                ],
            },
            {"role": "assistant", "content": None},
        ]
    )
    assert req.has_images()
    assert req.to_messages() == [
        {"role": "system", "content": "Be brief."},
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image", "url": "https://example.com/cat.png"},
            ],
        },
        {"role": "assistant", "content": ""},
    ]
    assert not chat().has_images()


def test_response_models_serialize_in_openai_shape():
    cid = new_completion_id()
    assert cid.startswith("chatcmpl-") and len(cid) == len("chatcmpl-") + 32
    resp = ChatCompletionResponse(
        id=cid, model="m",
        choices=[ChatCompletionChoice(message=ChatCompletionMessage(content="hello"), finish_reason="stop")],
        usage=UsageInfo(prompt_tokens=3, completion_tokens=1, total_tokens=4),
    ).model_dump()
    assert resp["object"] == "chat.completion" and isinstance(resp["created"], int)
    assert resp["choices"][0] == {"index": 0, "finish_reason": "stop", "logprobs": None, "message": {
        "role": "assistant", "content": "hello", "refusal": None, "tool_calls": None}}  # OpenAI's nulls
    chunk = ChatCompletionChunk(id=cid, model="m", choices=[]).model_dump()
    assert (chunk["object"], chunk["usage"]) == ("chat.completion.chunk", None)


def test_model_list_carries_vendor_fields():
    data = ModelList(data=[ModelCard(id="tiny", family="llm", aliases=["default"])]).model_dump()
    card = data["data"][0]
    assert data["object"] == "list"
    assert (card["object"], card["owned_by"], card["family"], card["aliases"], card["demo"]) == (
        "model", "modelfleet", "llm", ["default"], False)


def test_transcription_form_defaults_and_checks():
    upload = UploadFile(io.BytesIO(b"RIFF"), filename="a.wav")
    form = TranscriptionForm(file=upload, model="w", language="EN")
    assert (form.language, form.response_format, form.temperature, form.timestamp_granularities) == (
        "en", "json", 0.0, ["segment"])
    for fields, loc in [
        ({"language": "english"}, ("language",)),
        ({"response_format": "xml"}, ("response_format",)),
        ({"temperature": 1.5}, ("temperature",)),
        ({"timestamp_granularities[]": ["char"]}, ("timestamp_granularities[]", 0)),
    ]:
        with pytest.raises(ValidationError) as exc_info:
            TranscriptionForm.model_validate({"file": upload, "model": "w", **fields})
        assert error_locs(exc_info) == [loc], fields


@pytest.mark.parametrize(
    ("fields", "loc"),
    [
        ({"input": ""}, ("input",)),
        ({"input": "  \n\t"}, ("input",)),
        ({"speed": 0.1}, ("speed",)),
        ({"speed": 4.5}, ("speed",)),
        ({"response_format": "wma"}, ("response_format",)),
    ],
)
def test_bad_speech_requests_fail_naming_the_field(fields, loc):
    with pytest.raises(ValidationError) as exc_info:
        SpeechRequest.model_validate({"model": "t", "input": "hello", **fields})
    assert error_locs(exc_info) == [loc]


def test_speech_request_defaults():
    req = SpeechRequest(model="t", input="x" * 4096)
    assert (req.response_format, req.speed, req.voice) == (None, 1.0, None)  # None: mp3 where it can be written


def test_legacy_requests_reject_empty_text():
    with pytest.raises(ValidationError) as exc_info:
        GenerateRequest(query="")
    assert error_locs(exc_info) == [("query",)]
    with pytest.raises(ValidationError) as exc_info:
        GenerateRequest(query="hi", max_new_tokens=0)
    assert error_locs(exc_info) == [("max_new_tokens",)]
    with pytest.raises(ValidationError) as exc_info:
        TtsRequest(text="   ")
    assert error_locs(exc_info) == [("text",)]


@pytest.mark.parametrize(("body", "kind"), [
    ({"prompt": "hi", "messages": None}, "TokenizeCompletionRequest"),
    ({"messages": [USER], "prompt": None}, "TokenizeChatRequest"),
    ({"prompt": "hi", "return_token_strs": None}, "TokenizeCompletionRequest"),
    ({"messages": [USER], "return_token_strs": None}, "TokenizeChatRequest"),
])
def test_a_tokenize_body_with_its_unused_fields_sent_as_null_is_served_as_vllms(body, kind):
    """vLLM's /tokenize takes a body whose other kind's field is null ({"prompt": "hi", "messages": null}: a
    client that serializes every field) and types return_token_strs `bool | None`; both were 400s here
    ("has either 'prompt' ... or 'messages'", "Input should be a valid boolean")."""
    from pydantic import TypeAdapter

    from deployments.tokenize_protocol import TokenizeRequest

    parsed = TypeAdapter(TokenizeRequest).validate_python(body)
    assert type(parsed).__name__ == kind and parsed.return_token_strs is False
    for neither in ({}, {"prompt": None, "messages": None}, {"prompt": "hi", "messages": [USER]}):
        with pytest.raises(ValidationError, match="either 'prompt'"):
            TypeAdapter(TokenizeRequest).validate_python(neither)
