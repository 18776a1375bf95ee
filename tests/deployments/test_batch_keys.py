"""Which rows may share a batch (found by review): lengths within batch_length_ratio (left padding made every
row of a batch as long as its longest), DoRA adapters apart (PEFT refuses them per row), longrope models'
rows on either side of their original window apart, seeded sampled requests alone on the generate() path;
a row waiting for a place lets go when its caller leaves; one prefix store per base across an attach."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Phi3Config, Phi3ForCausalLM

from deployments.decode_loop import DecodeLoop, Group, rope_window
from deployments.generation import generate_batch
from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.params import ChatParams
from loading import ModelSpec, attach_adapter, load_model


def stats() -> dict:
    return {"model_calls": 0, "requests": 0, "largest_batch": 0}


def chat(prompt: str | list[int], max_new_tokens: int, **kw) -> ChatParams:
    kw.setdefault("temperature", 0)
    if isinstance(prompt, list):
        return ChatParams(model="m", messages=[], prompt=prompt, max_new_tokens=max_new_tokens, **kw)
    return ChatParams(model="m", messages=[{"role": "user", "content": prompt}], max_new_tokens=max_new_tokens, **kw)


def alone(spec: ModelSpec, loaded, params: ChatParams) -> str:
    params.inputs = LLMServer.encode(None, loaded, params)
    return generate_batch(spec, loaded, [params])[0].text


def run(loop: DecodeLoop, jobs: list[tuple[ModelSpec, object, ChatParams]], watch=None) -> list:
    out: dict[int, object] = {}
    for i, (spec, loaded, params) in enumerate(jobs):
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params, lambda result, i=i: out.__setitem__(i, result))
    if watch is not None:
        step = loop._step

        def watched(group: Group) -> None:
            step(group)
            watch(group)

        loop._step = watched
    loop.run()
    return [out[i] for i in range(len(jobs))]


def test_rows_share_a_padded_cache_only_within_the_length_ratio(tiny_llm_models):
    """16 SmolLM2 rows beside one 2,230-token prompt held 1,578 MiB of cache where the memory gate had let in
    373 MiB: each short row was padded to the long one. A batch now holds rows within 2x of each other's
    prompt + max_tokens, so its cache is at most 2x its rows' own lengths (what the estimate now counts)."""
    spec, loaded = tiny_llm_models(8)["tiny"]
    long_prompt = [(7 * i) % 400 + 3 for i in range(300)]
    jobs = [(spec, loaded, chat(long_prompt, 8))] + [(spec, loaded, chat(f"Say hi number {i}", 8)) for i in range(6)]
    expected = [alone(spec, loaded, chat(p.prompt or p.messages[0]["content"], 8)) for _, _, p in jobs]
    worst = {"ratio": 0.0}

    def watch(group: Group) -> None:
        own = sum(int(r.params.inputs["input_ids"].shape[-1]) + r.limit for r in group.rows)
        worst["ratio"] = max(worst["ratio"], len(group.rows) * group.mask.shape[1] / own)

    results = run(DecodeLoop(max_rows=8, stats=stats(), length_ratio=2.0), jobs, watch)
    assert [getattr(r, "text", r) for r in results] == expected
    assert 0 < worst["ratio"] <= 2.0, worst  # one batch of all seven: 7 x 301+ columns for ~650 own tokens


@pytest.fixture(scope="module")
def dora(tiny_llm_dirs, tmp_path_factory):
    base_dir, _ = tiny_llm_dirs
    target = tmp_path_factory.mktemp("dora") / "tiny-llm-dora"
    torch.manual_seed(3)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(target)
    spec = ModelSpec(name="tiny", source=str(base_dir), max_new_tokens=12)
    base = load_model(spec)
    dora_spec = ModelSpec(name="dora", source=str(target), base_model="tiny", max_new_tokens=12)
    return (spec, base), (dora_spec, attach_adapter(dora_spec, base))


def test_a_dora_adapter_runs_beside_base_rows_in_a_batch_of_its_own(dora):
    """PEFT refuses per-row adapters for DoRA ('Cannot pass `adapter_names` when DoRA is enabled'): the first
    shared step failed the base row and the DoRA row alike."""
    (spec, base), (dora_spec, adapted) = dora
    expected = [alone(spec, base, chat("The weather today is", 12)), alone(dora_spec, adapted, chat("Tell me", 12))]
    assert expected[0] != alone(spec, base, chat("Tell me", 12))  # the adapter changes the answer
    results = run(DecodeLoop(max_rows=8, stats=stats()),
                  [(spec, base, chat("The weather today is", 12)), (dora_spec, adapted, chat("Tell me", 12))])
    assert [getattr(r, "text", r) for r in results] == expected


@pytest.fixture(scope="module")
def longrope(tmp_path_factory, tiny_llm_dirs):
    """A tiny random Phi-3 with longrope factors and a 32-token original window."""
    base_dir, _ = tiny_llm_dirs
    where = tmp_path_factory.mktemp("phi")
    half = 8  # head_dim 16
    config = Phi3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, pad_token_id=0,
                        eos_token_id=2, bos_token_id=1, original_max_position_embeddings=32,  # Phi3Config's own
                        # field: it overwrites the one in rope_parameters (4096 by default)
                        rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * half,
                                         "long_factor": [float(4 + 3 * i) for i in range(half)],
                                         "original_max_position_embeddings": 32})
    torch.manual_seed(0)
    model = Phi3ForCausalLM(config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.3)
    model.save_pretrained(where)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(where)
    spec = ModelSpec(name="phi", source=str(where), max_new_tokens=20)
    loaded = load_model(spec)
    assert rope_window(loaded.config) == 32
    return spec, loaded


def test_a_longrope_models_short_rows_never_share_a_forward_with_long_ones(longrope):
    """transformers picks longrope's short or long factors from the longest position in the forward
    (Phi-3-128k, Phi-4-mini): a short request beside a long one was rotated with the long factors and its
    greedy answer changed."""
    spec, loaded = longrope
    short = [5, 6, 7, 8, 9]
    expected = alone(spec, loaded, chat(short, 8))
    long = [10 + i % 300 for i in range(80)]
    results = run(DecodeLoop(max_rows=8, stats=stats(), length_ratio=float("inf")),  # lengths alone would batch
                  [(spec, loaded, chat(long, 12)), (spec, loaded, chat(short, 8))])
    assert results[1].text == expected


def test_a_longrope_models_prefix_cache_keeps_no_keys_of_long_forwards(longrope):
    """The prefix store served a short request the leading blocks a 40-token prompt had stored, rotated with
    the long factors: its answer differed from the one it gets alone (review of 82d224d)."""
    spec, loaded = longrope
    shared = [10 + (7 * i) % 300 for i in range(24)]  # 3 blocks of 8: the common start
    short, long = shared + [5, 6, 7], shared + [20 + i for i in range(16)]  # 27 and 40 tokens; window 32
    expected = run(DecodeLoop(max_rows=8, stats=stats(), prefix_cache_bytes=1 << 20),
                   [(spec, loaded, chat(short, 4))])[0]
    loop = DecodeLoop(max_rows=8, stats=stats(), prefix_cache_bytes=1 << 20)
    run(loop, [(spec, loaded, chat(long, 4))])
    after_long = run(loop, [(spec, loaded, chat(short, 4))])[0]
    assert (after_long.text, after_long.cached_tokens) == (expected.text, 0)
    again = run(loop, [(spec, loaded, chat(short, 4))])[0]  # forwards within the window still share
    assert (again.text, again.cached_tokens) == (expected.text, 24)


def test_seeded_sampled_requests_do_not_share_a_generate_batch():
    """generate() draws every row from torch's one global generator: a seeded request batched with another
    gave other text than alone. Greedy and unseeded requests still batch."""
    def params(seed: int | None, temperature: float | None = 1.0) -> ChatParams:
        request = chat("hi", 8, temperature=temperature, seed=seed)
        request.inputs = {"input_ids": torch.ones(1, 4, dtype=torch.long)}
        return request

    assert params(1234).sampling_key() != params(1234).sampling_key()
    assert params(None).sampling_key() == params(None).sampling_key()
    assert params(1234, 0).sampling_key() == params(1234, 0).sampling_key()  # greedy: the seed draws nothing


def test_a_request_waiting_for_a_place_lets_go_when_its_caller_leaves(tiny_llm_dirs):
    """With the batch full, the loop did not look at waiting rows: one whose client left kept its memory hold
    (and its slot) until a running row ended, 3.8 s later in the review's run."""
    base_dir, _ = tiny_llm_dirs
    spec = ModelSpec(name="t", source=str(base_dir), max_new_tokens=400, debug_step_delay_s=0.01)
    server = LLMServer([spec], ChatOptions(max_batch_size=1, prefix_cache_mb=0))

    def request(tokens: int) -> ChatParams:
        return ChatParams(model="t", messages=[], prompt=[5, 6, 7], max_new_tokens=tokens, temperature=0, wait_s=60,
                          logit_bias={2: -100, 0: -100})  # no end token: it runs its max_tokens

    async def scenario() -> tuple[int, int, float]:
        await server.chat(request(2))  # loaded
        running = asyncio.ensure_future(server.chat(request(300)))  # ~3 s of steps
        await asyncio.sleep(0.3)
        before = server.memory.in_use
        waiting = asyncio.ensure_future(server.chat(request(290)))  # no place in its band's batch: it waits
        while server.batch_stats.get("waiting_for_place", 0) < 1:
            await asyncio.sleep(0.01)
        held = server.memory.in_use
        started = time.monotonic()
        waiting.cancel()
        while server.memory.in_use > before and time.monotonic() - started < 10:
            await asyncio.sleep(0.01)
        released = time.monotonic() - started
        assert not running.done()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        return before, held, released

    before, held, released = asyncio.run(scenario())
    assert held > before  # the waiting request held memory
    assert released < 1.0, released


def test_one_prefix_store_per_base_across_an_adapter_attach(tiny_llm_dirs):
    """The store was keyed by the model object; the first adapter's attach wraps it in a PeftModel, and the
    store before it stayed alive beside a new one: up to twice prefix_cache_mb for one base."""
    base_dir, lora_dir = tiny_llm_dirs
    spec = ModelSpec(name="tiny", source=str(base_dir), max_new_tokens=4)
    base = load_model(spec)
    loop = DecodeLoop(max_rows=8, stats=stats(), prefix_cache_bytes=64 * 1024)
    prompts = [[(7 * i + j + 3) % 500 for j in range(120)] for i in range(6)]
    run(loop, [(spec, base, chat(p, 2)) for p in prompts])
    stored = loop._prefix_cache(base).bytes
    assert stored > 0
    attach_adapter(ModelSpec(name="lora", source=str(lora_dir), base_model="tiny", max_new_tokens=4), base)
    run(loop, [(spec, base, chat(p, 2)) for p in prompts])
    assert len(loop.prefixes) == 1 and loop.stats.get("prefix_cache_hits", 0) > 0  # the base's entries served on


def test_a_held_row_starts_its_own_batch_when_the_batch_it_waited_for_ends(tiny_llm_dirs):
    """A row held because the one batch its length fits was full waited, after that batch's rows all ended
    in one step, for a batch of other lengths it can never join to free a place (~300 steps here, not ~5):
    the loop walked held rows only when a batch of their kind had a place (review of a77bc40)."""
    base_dir, _ = tiny_llm_dirs
    spec = ModelSpec(name="t", source=str(base_dir), max_new_tokens=400)
    loaded = load_model(spec)
    loop = DecodeLoop(max_rows=2, stats=stats(), length_ratio=2.0)
    ended_at: dict[int, tuple[int, object]] = {}  # request -> (decode steps run when it ended, result)
    lengths = (300, 300, 5, 5, 5)
    for i, n in enumerate(lengths):
        params = chat([5, 6, 7], n, logit_bias={0: -100, 1: -100, 2: -100})  # no end token: it runs n
        params.inputs = LLMServer.encode(None, loaded, params)
        loop.submit(spec, loaded, params,
                    lambda result, i=i: ended_at.__setitem__(i, (loop.stats.get("decode_steps", 0), result)))
    loop.run()
    assert [ended_at[i][1].completion_tokens for i in range(5)] == list(lengths)
    short_batch_ended = max(ended_at[2][0], ended_at[3][0])
    # its own 4 steps, each beside one of the long batch's
    assert ended_at[4][0] <= short_batch_ended + 2 * 4 + 2, (short_batch_ended, ended_at[4][0])


def test_near_lengths_share_a_batch_whatever_the_boundary(tiny_llm_models):
    """Bands at powers of the ratio split lengths a token apart (63 and 65: two batches, two forwards a
    step); a row now joins a batch whose lengths stay within the ratio with it, and starts its own only
    when none does."""
    spec, loaded = tiny_llm_models(8)["tiny"]
    jobs = [(spec, loaded, chat([(5 * i) % 300 + 3 for i in range(n)], 4)) for n in (59, 61, 300)]  # 63, 65, 304
    loop = DecodeLoop(max_rows=8, stats=stats(), length_ratio=2.0)
    sizes: list[list[int]] = []
    results = run(loop, jobs, lambda group: sizes.append(sorted(len(g.rows) for g in loop.groups.values())))
    assert all(getattr(r, "finish_reason", None) in ("stop", "length") for r in results)
    assert [1, 2] in sizes and loop.stats["largest_batch"] == 2  # 63 with 65; 304 apart
