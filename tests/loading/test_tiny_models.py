"""Tiny real-architecture models: build -> load back through the Auto classes -> run them.

Real models, no mocks. test_report loads each back through load_model, checks its LoadReport and
prints build / load seconds and on-disk size per kind.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from loading import ModelSpec, load_model
from loading.config import TINY_KINDS as SPEC_TINY_KINDS
from loading.placement import count_parameters
from loading.tiny import BUILDERS, TINY_KINDS, base_kind, build_tiny, ensure_tiny, is_complete, stage_in_hf_cache

from loading_testutil import FAIL_FAST_S, Timer

METRICS: dict[str, dict[str, float]] = {}


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())


def _record(kind: str, **kw) -> None:
    METRICS.setdefault(kind, {}).update(kw)


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="module")
def built(root) -> dict[str, Path]:
    """Build every kind once (bases before adapters), timing each build."""
    out: dict[str, Path] = {}
    for kind in TINY_KINDS:
        base = out.get(base_kind(kind)) if kind.endswith("-lora") else None
        t0 = time.perf_counter()
        out[kind] = build_tiny(kind, root / kind, base=base)
        _record(kind, build_s=time.perf_counter() - t0, size_kb=_size(out[kind]) / 1024)
    return out


def test_registry_and_unknown_kind(tmp_path):
    # one list of kinds (validated by ModelSpec without importing the builders), a builder for each
    assert TINY_KINDS is SPEC_TINY_KINDS
    assert TINY_KINDS == ("llm", "stt", "tts", "vlm", "llm-lora", "vlm-lora", "vlm-vision-lora")
    assert tuple(BUILDERS) == TINY_KINDS
    with pytest.raises(ValueError, match="llm.*vlm-lora.*vlm-vision-lora"):
        build_tiny("gpt5", tmp_path / "x")
    with pytest.raises(ValueError, match="base"):
        build_tiny("llm-lora", tmp_path / "x")


def test_all_small_and_complete(built):
    for kind, d in built.items():
        assert is_complete(d), kind
        assert _size(d) < 4 * 1024 * 1024, kind


def test_llm(built):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = built["llm"]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tok.padding_side == "left"
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert model.generation_config.eos_token_id == tok.eos_token_id
    assert model.generation_config.pad_token_id == tok.pad_token_id
    assert model.generation_config.do_sample is False

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello, how are you?"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello, how are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    # special tokens are single ids, never split
    ids = tok(prompt).input_ids
    assert ids.count(tok.convert_tokens_to_ids("<|im_start|>")) == 3
    # round trip of ordinary text
    assert tok.decode(tok("The quick brown fox, café!").input_ids) == "The quick brown fox, café!"

    enc = tok(prompt, return_tensors="pt")
    new = model.generate(**enc, max_new_tokens=8)[0, enc.input_ids.shape[1]:].tolist()
    assert len(new) == 8 and len(set(new)) >= 3, new  # varied, not one repeated token

    # batched, left padded: the short prompt's continuation equals its unbatched one
    short = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    batch = tok([short, prompt], return_tensors="pt", padding=True)
    assert batch.attention_mask[0, 0] == 0  # left padding
    out = model.generate(**batch, max_new_tokens=8)
    solo = tok(short, return_tensors="pt")
    solo_new = model.generate(**solo, max_new_tokens=8)[0, solo.input_ids.shape[1]:]
    assert out[0, batch.input_ids.shape[1]:].tolist() == solo_new.tolist()
    assert out[1, batch.input_ids.shape[1]:].tolist() == new


def test_llm_deterministic_per_seed(built, tmp_path):
    a = (built["llm"] / "model.safetensors").read_bytes()
    assert (build_tiny("llm", tmp_path / "same") / "model.safetensors").read_bytes() == a
    assert (build_tiny("llm", tmp_path / "other", seed=1) / "model.safetensors").read_bytes() != a
    assert (build_tiny("llm", tmp_path / "same") / "tokenizer.json").read_bytes() == (
        built["llm"] / "tokenizer.json"
    ).read_bytes()
    lora = built["llm-lora"] / "adapter_model.safetensors"
    again = build_tiny("llm-lora", tmp_path / "lora", base=built["llm"]) / "adapter_model.safetensors"
    assert again.read_bytes() == lora.read_bytes()


def test_stt(built):
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor, WhisperProcessor

    d = built["stt"]
    proc = AutoProcessor.from_pretrained(d)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(d)
    assert isinstance(proc, WhisperProcessor)
    assert type(model).__name__ == "WhisperForConditionalGeneration"
    tok = proc.tokenizer
    assert tok.pad_token_id is not None
    gc = model.generation_config
    assert gc.no_timestamps_token_id == tok.convert_tokens_to_ids("<|notimestamps|>")
    assert tok.convert_tokens_to_ids("<|0.00|>") == gc.no_timestamps_token_id + 1
    assert "<|en|>" in gc.lang_to_id and set(gc.task_to_id) == {"transcribe", "translate"}

    sr = proc.feature_extractor.sampling_rate
    assert sr == 16000
    t = np.arange(sr, dtype=np.float32) / sr
    noise = 0.1 * np.random.RandomState(0).randn(sr // 2)
    audio = [np.sin(2 * np.pi * 440 * t).astype(np.float32), noise.astype(np.float32)]
    feats = proc(audio, sampling_rate=sr, return_tensors="pt", return_attention_mask=True)
    assert feats.input_features.shape == (2, 80, 3000)
    for kwargs in ({}, {"language": "en", "task": "transcribe"}, {"language": "english", "task": "translate"}):
        out = model.generate(feats.input_features, attention_mask=feats.attention_mask, max_new_tokens=16, **kwargs)
        # bounded: timestamp tokens are suppressed, so the seek loop cannot run past max_new_tokens
        assert out.shape[0] == 2 and out.shape[1] <= 16 + 4, (kwargs, out.shape)
        ts_begin = gc.no_timestamps_token_id + 1
        assert not (out >= ts_begin).any()
        texts = proc.batch_decode(out, skip_special_tokens=True)
        assert len(texts) == 2 and all(isinstance(s, str) for s in texts)
        assert not any("<|" in s for s in texts)


def test_tts(built):
    from transformers import AutoModelForTextToWaveform, AutoTokenizer

    d = built["tts"]
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForTextToWaveform.from_pretrained(d)
    assert type(model).__name__ == "VitsModel" and type(tok).__name__ == "VitsTokenizer"
    assert model.config.sampling_rate == 16000

    inputs = tok("Hello world!", return_tensors="pt")
    with torch.no_grad():
        torch.manual_seed(0)
        w1 = model(**inputs).waveform
        torch.manual_seed(0)
        w2 = model(**inputs).waveform
    assert w1.ndim == 2 and w1.shape[0] == 1 and w1.shape[1] > 0
    assert w1.dtype == torch.float32 and torch.isfinite(w1).all() and w1.abs().max() > 0
    assert torch.equal(w1, w2)  # seeded -> reproducible (output length is stochastic otherwise)

    batch = tok(["hello world", "a longer sentence, with punctuation."], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch)
    assert out.waveform.shape[0] == 2 and out.sequence_lengths.shape == (2,)

    with pytest.raises(RuntimeError):  # documented: empty text is rejected by the model itself
        with torch.no_grad():
            model(**tok("", return_tensors="pt"))


def test_vlm(built):
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaProcessor

    d = built["vlm"]
    proc = AutoProcessor.from_pretrained(d)
    model = AutoModelForImageTextToText.from_pretrained(d)
    assert isinstance(proc, LlavaProcessor)
    assert type(model).__name__ == "LlavaForConditionalGeneration"

    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is in the picture?"}]}]
    prompt = proc.apply_chat_template(msgs, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\n<image>What is in the picture?<|im_end|>\n<|im_start|>assistant\n"

    rng = np.random.RandomState(0)
    img = Image.fromarray((rng.rand(48, 64, 3) * 255).astype("uint8"))  # non-square, resized + cropped
    inputs = proc(images=img, text=prompt, return_tensors="pt")
    assert inputs.pixel_values.shape == (1, 3, 32, 32)
    assert int((inputs.input_ids == model.config.image_token_index).sum()) == 16
    out = model.generate(**inputs, max_new_tokens=8)
    new = out[0, inputs.input_ids.shape[1]:]
    assert len(new) == 8 and len(set(new.tolist())) >= 3
    assert isinstance(proc.batch_decode(out[:, inputs.input_ids.shape[1]:], skip_special_tokens=True)[0], str)

    # the image actually conditions the output
    img2 = Image.fromarray((rng.rand(32, 32, 3) * 255).astype("uint8"))
    out2 = model.generate(**proc(images=img2, text=prompt, return_tensors="pt"), max_new_tokens=8)
    assert out2[0, inputs.input_ids.shape[1]:].tolist() != new.tolist()


def _adapter_checks(adapter: Path, base: Path):
    assert (adapter / "adapter_config.json").is_file()
    assert (adapter / "adapter_model.safetensors").is_file()
    assert not (adapter / "config.json").exists()
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(base)
    assert cfg["r"] == 4 and cfg["peft_type"] == "LORA"
    return cfg


def test_llm_lora(built):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _adapter_checks(built["llm-lora"], built["llm"])
    base = AutoModelForCausalLM.from_pretrained(built["llm"])
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = base(x).logits
    peft_model = PeftModel.from_pretrained(base, built["llm-lora"])
    with torch.no_grad():
        got = peft_model(x).logits
        assert (got - ref).abs().max() > 1e-2  # the adapter visibly changes outputs
        with peft_model.disable_adapter():
            assert torch.allclose(peft_model(x).logits, ref)


def test_vlm_lora(built):
    from peft import PeftModel
    from safetensors import safe_open
    from transformers import AutoModelForImageTextToText

    _adapter_checks(built["vlm-lora"], built["vlm"])
    with safe_open(built["vlm-lora"] / "adapter_model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and all("language_model" in k for k in keys)  # vision tower untouched
    assert any("q_proj" in k for k in keys) and any("v_proj" in k for k in keys)

    base = AutoModelForImageTextToText.from_pretrained(built["vlm"])
    x = torch.tensor([[5, 6, 7, 8, 9]])
    with torch.no_grad():
        ref = base(input_ids=x).logits
    peft_model = PeftModel.from_pretrained(base, built["vlm-lora"])
    with torch.no_grad():
        assert (peft_model(input_ids=x).logits - ref).abs().max() > 1e-2


def test_ensure_tiny_idempotent(built, tmp_path):
    dest = tmp_path / "llm"
    assert ensure_tiny("llm", dest) == dest
    weights = dest / "model.safetensors"
    mtime = weights.stat().st_mtime_ns
    time.sleep(0.01)
    assert ensure_tiny("llm", dest) == dest
    assert weights.stat().st_mtime_ns == mtime  # not rebuilt

    # an incomplete dir (e.g. a crashed copy) is replaced by a complete build
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    ensure_tiny("llm", broken)
    assert is_complete(broken)

    adapter = ensure_tiny("llm-lora", tmp_path / "lora", base=dest)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(dest)


def test_ensure_tiny_concurrent(tmp_path, monkeypatch):
    calls = []
    real = BUILDERS["tts"]

    def counting(dest, **kw):  # the real builder, counted
        calls.append(dest)
        time.sleep(0.2)  # widen the race window
        return real(dest, **kw)

    monkeypatch.setitem(BUILDERS, "tts", counting)
    dest = tmp_path / "tts"
    results, errors = [], []

    def worker():
        try:
            results.append(ensure_tiny("tts", dest))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and results == [dest, dest]
    assert len(calls) == 1  # built once
    assert is_complete(dest)
    assert [p.name for p in tmp_path.iterdir() if ".tmp-" in p.name] == []  # no temp leftovers


def test_stage_in_hf_cache(built, tmp_path, monkeypatch):
    import huggingface_hub.constants
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    # huggingface_hub reads HF_HUB_OFFLINE once at import; set the constant itself.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    cache = tmp_path / "hub"
    snap = stage_in_hf_cache(built["llm"], "tiny-org/tiny-llm", cache)
    repo = cache / "models--tiny-org--tiny-llm"
    assert snap.parent == repo / "snapshots" and len(snap.name) == 40
    assert (repo / "refs" / "main").read_text() == snap.name
    assert stage_in_hf_cache(built["llm"], "tiny-org/tiny-llm", cache) == snap  # deterministic hash
    assert stage_in_hf_cache(built["llm"], "tiny-org/tiny-llm", cache, revision_hash="a" * 40).name == "a" * 40

    with Timer() as t:
        cfg = AutoConfig.from_pretrained("tiny-org/tiny-llm", cache_dir=cache)
        tok = AutoTokenizer.from_pretrained("tiny-org/tiny-llm", cache_dir=cache)
        model = AutoModelForCausalLM.from_pretrained("tiny-org/tiny-llm", cache_dir=cache)
    assert cfg.model_type == "llama" and tok.eos_token == "<|im_end|>"
    assert type(model).__name__ == "LlamaForCausalLM"
    assert t.seconds < FAIL_FAST_S  # no network retries

    with Timer() as t, pytest.raises(OSError):
        AutoConfig.from_pretrained("tiny-org/not-staged", cache_dir=cache)
    assert t.seconds < FAIL_FAST_S


# The class each family's Auto class gives, and the processor class it is given.
EXPECTED = {
    "llm": ("LlamaForCausalLM", "AutoTokenizer"),
    "stt": ("WhisperForConditionalGeneration", "AutoProcessor"),
    "tts": ("VitsModel", "AutoTokenizer"),
    "vlm": ("LlavaForConditionalGeneration", "AutoProcessor"),
}


def test_report(built, isolated_env, capsys):
    """Every kind loads back through load_model, and its LoadReport says what happened: where from,
    which family, class, processor, device and strategy, how many parameters, the adapter and its base.
    Prints build / load seconds and size on disk per kind. Needs no other test to have run first."""
    rows = []
    for kind in TINY_KINDS:
        family, _, lora = kind.partition("-")
        t0 = time.perf_counter()
        loaded = load_model(ModelSpec(name=f"tiny-{kind}", source=str(built[kind])))
        load_s = time.perf_counter() - t0
        report = loaded.report
        model_class, processor_class = EXPECTED[family]
        assert (report.name, report.source, report.demo) == (f"tiny-{kind}", str(built[kind]), False)
        assert (report.family, report.model_class, report.processor_class) == (family, model_class, processor_class)
        assert (report.resolved_path, report.resolved_from) == (str(built[kind].resolve()), "local path")
        if lora:
            assert report.adapter_path == report.resolved_path and report.base_resolved_from == "local path"
            assert report.base_path == str(built[family].resolve())
            assert type(loaded.model.get_base_model()).__name__ == model_class and loaded.adapter_name == "default"
        else:
            assert report.adapter_path is None and report.base_path is None and report.base_resolved_from is None
            assert type(loaded.model).__name__ == model_class and loaded.adapter_name is None
            assert report.parameters == loaded.model.num_parameters()
        assert report.parameters == count_parameters(built[family]) > 0  # the base's, for an adapter
        assert (report.device, report.strategy, report.dtype) == ("cpu", "float32 on cpu", "float32")
        assert "no CUDA device visible" in report.device_reason or "device: cpu" in report.device_reason
        assert [(a.strategy, a.outcome, a.reason) for a in report.attempts] == [("float32 on cpu", "loaded", "")]
        assert 0 < report.attempts[0].seconds < load_s and 0 < report.load_seconds < load_s + 0.001  # ms rounding
        assert json.loads(json.dumps(report.to_dict()))["attempts"][0]["outcome"] == "loaded"
        metrics = METRICS[kind]  # recorded by the `built` fixture
        assert 0 < metrics["size_kb"] < 4 * 1024 and metrics["build_s"] > 0
        rows.append(f" {kind:9s} {metrics['build_s']:7.3f} {load_s:7.3f} {metrics['size_kb']:8.1f}")
    assert len(rows) == len(TINY_KINDS) == 7
    with capsys.disabled():
        print("\n kind       build_s  load_s  size_kB", *rows, sep="\n")
