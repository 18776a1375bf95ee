"""vLLM's tokenizer routes on the live chat app: /tokenize counts a chat exactly as the chat completion's
usage does (text LLM, an adapter, tools, a VLM with an image), a text round-trips through /detokenize,
ids outside the vocabulary and unknown models are refused by name, /tokenizer_info gives what
lm-evaluation-harness's remote tokenizer reads."""

from __future__ import annotations

import pytest

from serve_testutil import png_data_uri

ASK = [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "What colour is the sky?"}]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
IMAGE_ASK = [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                          {"type": "image_url", "image_url": {"url": png_data_uri()}}]}]


@pytest.fixture(scope="module")
def app(chat_app):
    return chat_app


def tokenize(app, **body):
    response = app.post("/tokenize", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize(("model", "messages", "extra"), [
    ("tiny-llm", ASK, {}),
    ("tiny-llm-lora", ASK, {"tools": TOOLS}),  # tools through the fallback prompt, on an adapter
    ("tiny-llava", IMAGE_ASK, {}),  # the processor's image tokens counted
], ids=["llm", "adapter-with-tools", "vlm-image"])
def test_a_chats_count_is_its_completions_prompt_tokens(app, model, messages, extra):
    reply = app.openai().chat.completions.create(model=model, messages=messages, max_tokens=1, **extra)
    counted = tokenize(app, model=model, messages=messages, **extra)
    assert counted["count"] == reply.usage.prompt_tokens == len(counted["tokens"]), (counted, reply.usage)
    assert counted["max_model_len"] >= counted["count"] and counted["token_strs"] is None


def test_a_prompt_round_trips_and_counts_as_a_completion_does(app):
    text = "Héllo wörld, 世界 🙂 <b>tags</b>\n  spaced"
    counted = tokenize(app, prompt=text, return_token_strs=True)  # no model: the first LLM, tiny-llm
    assert len(counted["token_strs"]) == counted["count"] == len(counted["tokens"]) > 0
    completion = app.openai().completions.create(model="tiny-llm", prompt=text, max_tokens=1)
    assert counted["count"] == completion.usage.prompt_tokens
    back = app.post("/detokenize", json={"tokens": counted["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}, back.text
    # a chat's tokens come back as the prompt its template wrote, special tokens included
    chat = tokenize(app, model="tiny-llm", messages=ASK)
    rendered = app.post("/detokenize", json={"model": "tiny-llm", "tokens": chat["tokens"]}).json()["prompt"]
    assert rendered.startswith("<|im_start|>system\nAnswer in one word.<|im_end|>") and "What colour" in rendered
    # a prefilled reply left open: its text ends the prompt, no end-of-turn after it
    open_reply = tokenize(app, model="tiny-llm", messages=[*ASK, {"role": "assistant", "content": "Blue"}],
                          continue_final_message=True)
    assert app.post("/detokenize", json={"model": "tiny-llm", "tokens": open_reply["tokens"]}).json()["prompt"] \
        .endswith("<|im_start|>assistant\nBlue")


def test_ids_outside_the_vocabulary_and_unknown_models_are_refused_by_name(app):
    refused = app.post("/detokenize", json={"model": "tiny-llm", "tokens": [5, 100000, 7]})
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["param"] == "tokens.1" and "100000" in error["message"] and "512 tokens" in error["message"], error
    negative = app.post("/detokenize", json={"model": "tiny-llm", "tokens": [-1]})
    assert negative.status_code == 400 and negative.json()["error"]["param"] == "tokens.0", negative.text
    too_many = app.post("/detokenize", json={"model": "tiny-llm", "tokens": [5] * 513})
    assert too_many.status_code == 400 and "at most 512" in too_many.json()["error"]["message"], too_many.text
    for method, path, body in (("post", "/tokenize", {"model": "nope", "prompt": "hi"}),
                               ("post", "/detokenize", {"model": "nope", "tokens": [1]}),
                               ("get", "/tokenizer_info?model=nope", None)):
        response = getattr(app, method)(path, **({"json": body} if body else {}))
        assert response.status_code == 404, (path, response.text)
        assert response.json()["error"]["code"] == "model_not_found" and "tiny-llm" in response.json()["error"]["message"]
    both = app.post("/tokenize", json={"prompt": "hi", "messages": ASK})
    assert both.status_code == 400 and "either 'prompt'" in both.json()["error"]["message"], both.text
    long = app.post("/tokenize", json={"model": "tiny-llm", "prompt": "hello " * 3000})
    assert long.status_code == 400 and long.json()["error"]["code"] == "context_length_exceeded", long.text


def test_tokenizer_info_is_what_the_remote_tokenizer_of_lm_eval_reads(app):
    info = app.get("/tokenizer_info").json()  # no model: the first LLM, tiny-llm
    assert (info["eos_token"], info["bos_token"], info["pad_token"]) == ("<|im_end|>", None, "<|endoftext|>"), info
    assert "<|im_start|>" in info["chat_template"] and info["tokenizer_class"]
    assert not any(key in info for key in ("name_or_path", "vocab_file")), sorted(info)  # no server paths
    # lm-eval's eos_token_id: the eos token's own id, through /tokenize without special tokens
    assert tokenize(app, prompt=info["eos_token"], add_special_tokens=False)["tokens"] == [2]
    vlm = app.get("/tokenizer_info?model=tiny-llava").json()
    assert vlm["chat_template"] and "<image>" in str(vlm.get("extra_special_tokens")), vlm
