"""/v1/completions' `echo` with `logprobs` scores the prompt's own tokens, as evaluation harnesses read it
(lm-evaluation-harness's `local-completions`: echo, logprobs 1, max_tokens 1, then token_logprobs and
top_logprobs over the prompt). Before, every echoed token's logprob was null and its top_logprobs null:
the harness's sum raised TypeError. Through the real HTTP app over an in-process LLM replica on the tiny
Llama (no Ray); the figures are checked against one plain forward of the same model."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fastapi.testclient import TestClient
from local_handles import LocalHandle
from transformers import AutoModelForCausalLM, AutoTokenizer

from deployments.api import build_api
from deployments.app_config import AppConfig
from deployments.ingress import Ingress
from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.prompt_logprobs import CHUNK_TOKENS
from loading import ModelSpec


def with_start_token(source, where):
    """A copy of the tiny Llama whose tokenizer adds a start token, as Llama's tokenizers add <s>."""
    shutil.copytree(source, where)
    spec = json.loads((where / "tokenizer.json").read_text())
    start = {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}
    spec["post_processor"] = {"type": "TemplateProcessing", "single": [start, {"Sequence": {"id": "A", "type_id": 0}}],
                              "pair": [start, {"Sequence": {"id": "A", "type_id": 0}},
                                       {"Sequence": {"id": "B", "type_id": 1}}],
                              "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [0],
                                                                   "tokens": ["<|endoftext|>"]}}}
    (where / "tokenizer.json").write_text(json.dumps(spec))
    return where


@pytest.fixture(scope="module")
def dirs(tiny_llm_dirs, tmp_path_factory):
    return {"tiny": tiny_llm_dirs[0], "bos": with_start_token(tiny_llm_dirs[0], tmp_path_factory.mktemp("m") / "bos")}


@pytest.fixture(scope="module")
def client(dirs, tmp_path_factory):
    models = [{"name": name, "source": str(source), "family": "llm"} for name, source in dirs.items()]
    server = LLMServer([ModelSpec(**m) for m in models], ChatOptions())
    config = AppConfig.model_validate({"models": models, "local_models_dir": str(tmp_path_factory.mktemp("models"))})
    app = build_api(Ingress({"llm": LocalHandle(server)}, config))
    with TestClient(app, raise_server_exceptions=False, headers={"x-wait-for-model": "60"}) as client:
        yield client


def reference(source, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's scores over the whole prompt in one forward: row i scores token i + 1."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), dim=-1)


def complete(client, **body) -> dict:
    response = client.post("/v1/completions", json={"temperature": 0, "echo": True, **body})
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


def test_echoed_prompt_tokens_carry_the_models_logprobs_as_lm_eval_reads_them(client, dirs):
    ids = list(range(40, 80))
    choice = complete(client, model="tiny", prompt=ids, max_tokens=1, logprobs=1)  # lm-eval's loglikelihood request
    logprobs, expected = choice["logprobs"], reference(dirs["tiny"], ids)
    scored = logprobs["token_logprobs"][: len(ids)]
    assert scored[0] is None and logprobs["top_logprobs"][0] is None  # nothing before the first token
    for i, token in enumerate(ids[1:], start=1):
        assert scored[i] == pytest.approx(expected[i - 1, token].item(), abs=1e-4)
        (best,) = logprobs["top_logprobs"][i].values()  # logprobs=1: the most likely token's
        assert best == pytest.approx(expected[i - 1].max().item(), abs=1e-4)
    # the harness's own arithmetic over a continuation (ctxlen 30): a sum and an is-greedy check
    assert sum(logprobs["token_logprobs"][30:-1]) == pytest.approx(
        sum(expected[i - 1, ids[i]].item() for i in range(30, len(ids))), abs=1e-3)
    assert all(lp <= max(top.values()) + 1e-6 for lp, top in
               zip(logprobs["token_logprobs"][30:-1], logprobs["top_logprobs"][30:-1], strict=True))


def test_a_prompt_longer_than_a_chunk_is_scored_as_one_forward_scores_it(client, dirs):
    ids = [5 + (i * 7) % 200 for i in range(CHUNK_TOKENS + 40)]  # crosses a chunk boundary
    choice = complete(client, model="tiny", prompt=ids, max_tokens=1, logprobs=0)
    expected = reference(dirs["tiny"], ids)
    scored = choice["logprobs"]["token_logprobs"][: len(ids)]
    assert scored[0] is None
    assert scored[1:] == pytest.approx([expected[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)


def test_a_streamed_echo_carries_the_same_figures(client):
    plain = complete(client, model="tiny", prompt="Once upon a time", max_tokens=3, logprobs=2)
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 3,
                                                    "temperature": 0, "echo": True, "logprobs": 2, "stream": True})
    first = json.loads(next(line for line in response.text.splitlines() if line.startswith("data: {"))[6:])
    echoed = first["choices"][0]
    assert echoed["text"] == "Once upon a time"
    count = len(echoed["logprobs"]["tokens"])
    assert echoed["logprobs"]["token_logprobs"] == plain["logprobs"]["token_logprobs"][:count]
    assert echoed["logprobs"]["top_logprobs"] == plain["logprobs"]["top_logprobs"][:count]


def test_echo_leaves_out_the_start_token_the_client_did_not_send_and_keeps_what_it_conditioned(client, dirs):
    """Llama's tokenizers add a start token (<|begin_of_text|>, <s>) that is not in the echoed prompt: its
    entry moved every text_offset after the prompt by its length (13 here, past the text's end). The
    tokens after it are scored given it, as the model read them."""
    choice = complete(client, model="bos", prompt="Hello there", max_tokens=1, logprobs=1)
    logprobs = choice["logprobs"]
    tokenizer = AutoTokenizer.from_pretrained(dirs["bos"])
    ids = tokenizer("Hello there")["input_ids"]
    assert ids[0] == 0  # the start token is in the prompt the model reads
    shown = len(ids) - 1
    assert "".join(logprobs["tokens"][:shown]) == "Hello there"
    assert logprobs["text_offset"][:shown + 1] == [0, *logprobs["text_offset"][1:shown + 1]]
    assert logprobs["text_offset"][shown] == len("Hello there")  # the completion's first token starts after it
    expected = reference(dirs["bos"], ids)
    assert logprobs["token_logprobs"][0] == pytest.approx(expected[0, ids[1]].item(), abs=1e-4)


def test_max_tokens_zero_with_echo_returns_the_prompt_alone_scored(client, dirs):
    """OpenAI's legacy models (and vLLM) serve max_tokens 0 with echo: the prompt scored, nothing generated,
    which evaluation tools send to score a text. It was a 422-style 400 on max_tokens (ge=1)."""
    ids = list(range(40, 60))
    for stream in (False, True):
        response = client.post("/v1/completions", json={"model": "tiny", "prompt": ids, "max_tokens": 0, "echo": True,
                                                        "logprobs": 1, "stream": stream,
                                                        **({"stream_options": {"include_usage": True}} if stream else {})})
        assert response.status_code == 200, response.text
        if stream:
            chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
            choices = [c["choices"][0] for c in chunks if c["choices"]]
            logprobs = [lp for choice in choices if choice.get("logprobs") for lp in choice["logprobs"]["token_logprobs"]]
            finish, usage = choices[-1]["finish_reason"], chunks[-1]["usage"]
        else:
            choice = response.json()["choices"][0]
            logprobs, finish, usage = choice["logprobs"]["token_logprobs"], choice["finish_reason"], response.json()["usage"]
        assert len(logprobs) == len(ids) and logprobs[0] is None  # the prompt's tokens, no more
        expected = reference(dirs["tiny"], ids)
        assert logprobs[1:] == pytest.approx([expected[i - 1, ids[i]].item() for i in range(1, len(ids))], abs=1e-4)
        assert finish == "length" and (usage["prompt_tokens"], usage["completion_tokens"]) == (len(ids), 0)
    refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "Hi", "max_tokens": 0})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "max_tokens"
    assert "echo" in refused.json()["error"]["message"]
