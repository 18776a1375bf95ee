"""Models whose files are there but broken, misread, or behind a Hub that never answers: each is a
LoadingError that names the file and the fix, never a raw error from deep inside (a MemoryError from a
git-lfs pointer's "header length", a struct.error from a truncated GGUF) and never a hang."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
from transformers import BartConfig, BartForConditionalGeneration

from loading import (
    Family,
    ModelHandle,
    ModelLoadFailed,
    ModelNotFoundError,
    ModelSpec,
    State,
    UnreadableModelError,
    UnsupportedModelError,
    load_model,
)
from loading.tiny import stage_in_hf_cache

LFS_POINTER = (b"version https://git-lfs.github.com/spec/v1\n"
               b"oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\nsize 1065776\n")


def copy(model_dir: Path, dest: Path) -> Path:
    shutil.copytree(model_dir, dest)
    return dest


def test_a_git_lfs_pointer_where_the_weights_should_be_says_so(isolated_env, tiny):
    cloned = copy(tiny["llm"], isolated_env["models"] / "cloned")
    (cloned / "model.safetensors").write_bytes(LFS_POINTER)
    with pytest.raises(UnreadableModelError, match="git-lfs pointer.*git lfs pull"):
        load_model(ModelSpec(name="m", source=str(cloned)))


def test_a_truncated_safetensors_file_says_so(isolated_env, tiny):
    broken = copy(tiny["llm"], isolated_env["models"] / "broken")
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[:200])
    with pytest.raises(UnreadableModelError, match="download it again"):
        load_model(ModelSpec(name="m", source=str(broken)))


def test_configs_transformers_cannot_read_are_explained(isolated_env, tiny):
    bad_json = copy(tiny["llm"], isolated_env["models"] / "bad-json")
    (bad_json / "config.json").write_text("{'model_type': 'llama'}")
    with pytest.raises(UnreadableModelError, match="config.json cannot be read"):
        load_model(ModelSpec(name="m", source=str(bad_json)))

    custom = copy(tiny["llm"], isolated_env["models"] / "custom")
    config = json.loads((custom / "config.json").read_text())
    (custom / "config.json").write_text(json.dumps({**config, "model_type": "my_custom_llm", "auto_map": {}}))
    with pytest.raises(UnsupportedModelError, match="model_type 'my_custom_llm', which transformers"):
        load_model(ModelSpec(name="m", source=str(custom)))


def test_missing_tokenizer_files_are_a_loading_error(isolated_env, tiny):
    bare = copy(tiny["llm"], isolated_env["models"] / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    with pytest.raises(UnreadableModelError, match="AutoTokenizer of .* cannot be loaded"):
        load_model(ModelSpec(name="m", source=str(bare)))


@pytest.mark.parametrize("content", [b"", b"GGUF\x03\x00\x00\x00" + b"\xff" * 40, b"GGUF\x03\x00\x00\x00\x01"])
def test_an_empty_or_truncated_gguf_file_is_unreadable_not_a_struct_error(isolated_env, content):
    path = isolated_env["models"] / "broken.gguf"
    path.write_bytes(content)
    with pytest.raises(UnreadableModelError, match="not a readable GGUF file"):
        load_model(ModelSpec(name="m", source=str(path)))


def test_an_encoder_decoder_checkpoint_is_never_loaded_as_an_llm(isolated_env, tiny, tmp_path):
    """transformers maps BART (and Marian, Pegasus, Whisper...) to a ...ForCausalLM too: the decoder
    alone. Loading the checkpoint with it dropped the encoder without a word."""
    config = BartConfig(vocab_size=64, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64)
    BartForConditionalGeneration(config).save_pretrained(tmp_path / "tiny-bart")
    with pytest.raises(UnsupportedModelError, match="encoder-decoder text model.*lose its encoder"):
        load_model(ModelSpec(name="bart", source=str(tmp_path / "tiny-bart")))
    with pytest.raises(UnsupportedModelError, match="configured as family 'llm' but its config is a STT"):
        load_model(ModelSpec(name="whisper", source=str(tiny["stt"]), family=Family.LLM))


def test_an_hf_cache_snapshot_missing_a_weight_file_is_not_taken_for_a_model(isolated_env, tiny, monkeypatch):
    """An interrupted download leaves a symlink to a blob that never came: it was resolved as "HF cache"
    (so never completed from the Hub) and failed later with a raw FileNotFoundError."""
    snapshot = stage_in_hf_cache(tiny["llm"], "Org/Broken", isolated_env["hub_cache"])
    weights = snapshot / "model.safetensors"
    weights.unlink()
    weights.symlink_to(snapshot.parents[1] / "blobs" / "never-downloaded")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="no complete snapshot of Org/Broken"):
        load_model(ModelSpec(name="m", source="Org/Broken"))


def test_a_hub_that_takes_the_connection_and_never_answers_does_not_hang_the_load(isolated_env, monkeypatch):
    """The reachability probe (a TCP connect) passes; huggingface_hub's client then waited for an answer
    forever (timeout=None), holding the download lock. MODELFLEET_HUB_READ_TIMEOUT_S bounds each call."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    held: list[socket.socket] = []
    threading.Thread(target=lambda: [held.append(listener.accept()[0]) for _ in range(64)], daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{listener.getsockname()[1]}")
    monkeypatch.setenv("MODELFLEET_HUB_READ_TIMEOUT_S", "1")
    started = time.monotonic()
    try:
        with pytest.raises(ModelNotFoundError, match="MODELFLEET_HUB_READ_TIMEOUT_S=1"):
            load_model(ModelSpec(name="m", source="Org/Silent"))
    finally:
        listener.close()
    assert time.monotonic() - started < 30


def test_a_base_exception_from_the_loader_fails_the_handle_instead_of_leaving_it_loading():
    class Panic(BaseException):  # what tokenizers' Rust panics are
        pass

    def load(progress):
        raise Panic("rust panic")

    handle = ModelHandle("p", load)
    with pytest.raises(ModelLoadFailed, match="Panic: rust panic"):
        handle.get(timeout=5)
    assert handle.state is State.FAILED


def test_get_never_trips_over_a_concurrent_reload():
    """get() read the state and the model at different moments: a reload() in between made it assert."""
    handle = ModelHandle("r", lambda progress: time.sleep(0.001) or object())  # type: ignore[arg-type, return-value]
    errors: list[BaseException] = []
    stop = threading.Event()

    def caller():
        while not stop.is_set():
            try:
                assert handle.get(timeout=1) is not None
            except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                errors.append(exc)

    def operator():
        while not stop.is_set():
            handle.reload()
            handle.start()

    threads = [threading.Thread(target=caller) for _ in range(4)] + [threading.Thread(target=operator)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    stop.set()
    for thread in threads:
        thread.join(10)
    assert [e for e in errors if not isinstance(e, ModelLoadFailed)] == []
