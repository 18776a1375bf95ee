"""PEFT adapter-only directories and their base model.

Issue: an adapter whose base_model_name_or_path names a Hub id that is not local started a silent
multi-GB download (or hung ~47 s offline, then failed); a base path from the training machine
gave PEFT's confusing "Repo id must be in the form" error; a fine-tune saved as
models/X/final_model/ next to its base in models/X/ was not found.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM

from loading import AdapterBaseNotFoundError, ModelSpec, load_model
from loading.tiny import stage_in_hf_cache

from loading_testutil import (
    CLOSED_LOCAL_ENDPOINT,
    FAIL_FAST_S,
    Timer,
    copy_model,
    record,
    set_adapter_base,
    unanswering_endpoint,
)

TOKENS = torch.tensor([[5, 6, 7, 8, 9]])


def _logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


def _adapter_with_base(tiny, dest, base: str):
    adapter = copy_model(tiny["llm-lora"], dest)
    set_adapter_base(adapter, base)
    return adapter


# -- 6. base missing: fail fast, naming the base ----------------------------------------------------
def test_adapter_whose_hub_base_is_not_cached_fails_fast_offline(isolated_env, tiny, tmp_path, monkeypatch):
    adapter = _adapter_with_base(tiny, tmp_path / "adapters" / "my-lora", "Org/Missing-Base-7B")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Timer() as t, pytest.raises(AdapterBaseNotFoundError) as info:
        load_model(ModelSpec(name="my-lora", source=str(adapter)))
    record("fail fast: adapter base Hub id not cached, offline (case 6)", t.seconds)
    assert t.seconds < FAIL_FAST_S
    message = str(info.value)
    assert info.value.base == "Org/Missing-Base-7B" and "'Org/Missing-Base-7B'" in message
    assert str(adapter) in message and "HF_HUB_OFFLINE=1" in message
    assert str(isolated_env["models"] / "Missing-Base-7B") in message and "base_model:" in message


@pytest.mark.parametrize("hub", ["refuses", "does not answer"])
def test_adapter_whose_hub_base_is_not_cached_fails_fast_when_hub_unreachable(isolated_env, tiny, tmp_path,
                                                                              monkeypatch, hub):
    adapter = _adapter_with_base(tiny, tmp_path / "my-lora", "Org/Missing-Base-7B")
    with contextlib.ExitStack() as stack:
        endpoint = CLOSED_LOCAL_ENDPOINT if hub == "refuses" else stack.enter_context(unanswering_endpoint())
        monkeypatch.setenv("HF_ENDPOINT", endpoint)
        with Timer() as t, pytest.raises(AdapterBaseNotFoundError, match="unreachable") as info:
            load_model(ModelSpec(name="my-lora", source=str(adapter)))
    record(f"fail fast: adapter base not cached, Hub {hub} (case 6)", t.seconds)
    assert t.seconds < FAIL_FAST_S
    assert ("ConnectionRefusedError" if hub == "refuses" else "TimeoutError") in str(info.value)


def test_a_local_adapter_loads_offline_although_the_hub_does_not_answer(isolated_env, tiny):
    """Importing peft imports bitsandbytes, whose CPU backend (AVX512-BF16 CPUs) fetches a kernel from the Hub:
    ~140 s of retries where the Hub does not answer, although offline was declared (HF_OFFLINE=1 is not
    huggingface_hub's own variable) (found by review). A fresh interpreter: peft not imported yet."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import loading

    script = "import sys; from loading import ModelSpec, load_model; load_model(ModelSpec(name='a', source=sys.argv[1]))"
    with unanswering_endpoint() as endpoint:
        subprocess.run([sys.executable, "-c", script, str(tiny["llm-lora"])], check=True, timeout=60,
                       cwd=Path(loading.__file__).parents[1], env={**os.environ, "HF_ENDPOINT": endpoint, "HF_OFFLINE": "1"})


def test_adapter_whose_absolute_base_path_is_gone(isolated_env, tiny, tmp_path):
    gone = tmp_path / "training-machine" / "checkpoints" / "base"
    adapter = _adapter_with_base(tiny, tmp_path / "my-lora", str(gone))

    # PEFT on its own: a confusing Hub-id validation error about a path.
    from peft import AutoPeftModelForCausalLM

    with pytest.raises(OSError, match="Repo id must be in the form"):
        AutoPeftModelForCausalLM.from_pretrained(str(adapter))

    with Timer() as t, pytest.raises(AdapterBaseNotFoundError) as info:
        load_model(ModelSpec(name="my-lora", source=str(adapter)))
    record("fail fast: adapter base absolute path gone (case 6)", t.seconds)
    assert t.seconds < FAIL_FAST_S
    assert info.value.base == str(gone)
    assert f"{gone} (does not exist)" in str(info.value)


def test_an_adapter_naming_its_base_under_an_unknown_users_home_is_a_base_not_found(isolated_env, tiny, tmp_path):
    """"~nosuchuser/base" as the adapter's base: Path.expanduser raised RuntimeError from deep inside the load."""
    adapter = _adapter_with_base(tiny, tmp_path / "my-lora", "~nosuchuser-modelfleet/base")
    with pytest.raises(AdapterBaseNotFoundError) as info:
        load_model(ModelSpec(name="my-lora", source=str(adapter)))
    assert info.value.base == "~nosuchuser-modelfleet/base"


def test_adapter_base_found_in_local_models_dir_by_last_component(isolated_env, tiny, tmp_path, monkeypatch):
    adapter = _adapter_with_base(tiny, tmp_path / "my-lora", "Org/Base-7B")
    copy_model(tiny["llm"], isolated_env["models"] / "Base-7B")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load_model(ModelSpec(name="my-lora", source=str(adapter)))
    report = loaded.report
    assert report.base_resolved_from == "LOCAL_MODELS_DIR"
    assert report.base_path == str((isolated_env["models"] / "Base-7B").resolve())
    assert report.adapter_path == str(adapter.resolve())


# -- 7. base in the adapter's parent directory ------------------------------------------------------
def test_adapter_in_final_model_subdir_uses_parent_as_base(isolated_env, tiny, monkeypatch):
    base_dir = copy_model(tiny["llm"], isolated_env["models"] / "X")
    adapter = _adapter_with_base(tiny, base_dir / "final_model", "Org/Base-7B")  # that id exists nowhere
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Timer() as t:
        loaded = load_model(ModelSpec(name="x-ft", source="X/final_model"))
    record("load_model tiny llm + LoRA, base in parent dir (case 7)", t.seconds)
    report = loaded.report
    assert report.base_resolved_from == "adapter's parent directory"
    assert report.base_path == str(base_dir.resolve()) and report.adapter_path == str(adapter.resolve())
    assert type(loaded.model).__name__ == "PeftModelForCausalLM"

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    adapted = _logits(loaded.model)
    assert (adapted - _logits(base)).abs().max() > 1e-2  # the adapter changes the output
    with loaded.model.disable_adapter():
        assert torch.allclose(_logits(loaded.model), _logits(base), atol=1e-5)


def test_the_base_an_adapter_names_wins_over_its_parent_directory(isolated_env, tiny, monkeypatch):
    """An adapter in models/X/final_model naming Org/Base got models/X (another model) as its base although
    Org/Base was under LOCAL_MODELS_DIR or in the HF cache (found by review)."""
    from loading import Settings
    from loading.model_source import resolve_model

    parent = copy_model(tiny["llm-seed1"], isolated_env["models"] / "X")
    named = copy_model(tiny["llm"], isolated_env["models"] / "Org" / "Base")
    cached = stage_in_hf_cache(tiny["llm"], "Org/Cached", isolated_env["hub_cache"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for base, where in (("Org/Base", named.resolve()), ("Org/Cached", cached)):
        _adapter_with_base(tiny, parent / base.replace("/", "-"), base)
        found = resolve_model(ModelSpec(name="ft", source=f"X/{base.replace('/', '-')}"), Settings.from_env())
        assert found.base is not None and found.base.path == where, found.base


def test_an_adapter_gets_its_base_at_the_revision_it_records(isolated_env, tiny, tmp_path, monkeypatch):
    """PEFT records the base's `revision` in adapter_config.json (AutoPeftModel honours it); the base was
    resolved at main (found by review). `base_model:` in the config names a base of its own: main."""
    import json

    from loading import Settings
    from loading.model_source import resolve_model

    cache = isolated_env["hub_cache"]
    main_snapshot = stage_in_hf_cache(tiny["llm"], "Org/Base", cache, revision_hash="a" * 40)
    v1_snapshot = stage_in_hf_cache(tiny["llm-seed1"], "Org/Base", cache, revision_hash="b" * 40)
    (cache / "models--Org--Base" / "refs" / "main").write_text("a" * 40)
    (cache / "models--Org--Base" / "refs" / "v1").write_text("b" * 40)
    adapter = _adapter_with_base(tiny, tmp_path / "lora", "Org/Base")
    config = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps({**config, "revision": "v1"}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for override, snapshot in ((None, v1_snapshot), ("Org/Base", main_snapshot)):
        found = resolve_model(ModelSpec(name="ft", source=str(adapter), base_model=override), Settings.from_env())
        assert found.base is not None and found.base.path == snapshot, (override, found.base)


def test_explicit_base_model_override_wins(isolated_env, tiny, monkeypatch):
    base_dir = copy_model(tiny["llm"], isolated_env["models"] / "X")
    adapter = _adapter_with_base(tiny, base_dir / "final_model", "Org/Base-7B")
    other = copy_model(tiny["llm-seed1"], isolated_env["models"] / "other-base")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # by name under LOCAL_MODELS_DIR: wins over the parent directory
    loaded = load_model(ModelSpec(name="x-ft", source=str(adapter), base_model="other-base"))
    assert loaded.report.base_path == str(other.resolve())
    assert loaded.report.base_resolved_from == "LOCAL_MODELS_DIR"
    with loaded.model.disable_adapter():
        assert torch.allclose(_logits(loaded.model), _logits(AutoModelForCausalLM.from_pretrained(other)))

    # as an absolute path
    loaded = load_model(ModelSpec(name="x-ft", source=str(adapter), base_model=str(other)))
    assert loaded.report.base_path == str(other.resolve()) and loaded.report.base_resolved_from == "local path"

    # an override that does not exist fails, naming it (it never silently falls back to the parent)
    with pytest.raises(AdapterBaseNotFoundError, match="no-such-base"):
        load_model(ModelSpec(name="x-ft", source=str(adapter), base_model="no-such-base"))


def test_an_adapter_saved_with_its_bases_config_beside_it_is_still_an_adapter(isolated_env, tiny, tmp_path):
    """Some trainers save the base's config.json next to the adapter: the directory was then taken for a
    whole model and failed with "no file named model.safetensors", never naming the adapter."""
    import shutil

    adapter = tmp_path / "adapter-with-config"
    shutil.copytree(tiny["llm-lora"], adapter)
    shutil.copy(tiny["llm"] / "config.json", adapter / "config.json")
    loaded = load_model(ModelSpec(name="a", source=str(adapter)))
    assert type(loaded.model).__name__.startswith("PeftModel")
    assert loaded.report.adapter_path == str(adapter.resolve()) or loaded.report.adapter_path == str(adapter)


def _misfit_adapter(tiny, dest):
    """The tiny LoRA with one weight of the wrong shape (its first v_proj.lora_B: twice the rows); its key."""
    from safetensors.torch import load_file, save_file

    misfit = copy_model(tiny["llm-lora"], dest)
    weights = load_file(str(misfit / "adapter_model.safetensors"))
    name = next(key for key in sorted(weights) if key.endswith("v_proj.lora_B.weight"))
    weights[name] = torch.ones(weights[name].shape[0] * 2, weights[name].shape[1])
    save_file(weights, str(misfit / "adapter_model.safetensors"))
    return misfit, name


def test_a_first_adapter_that_fails_half_way_leaves_its_base_as_it_was(isolated_env, tiny, tmp_path):
    """PEFT injects its layers before it loads the weights: an adapter with one weight of the wrong
    shape left the base carrying half an adapter and a PEFT config, and every base call failed."""
    from loading import AdapterMismatchError, attach_adapter

    misfit, name = _misfit_adapter(tiny, tmp_path / "misfit")
    base = load_model(ModelSpec(name="tiny", source=str(tiny["llm"])))
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        before = base.model(input_ids=ids).logits
    with pytest.raises(AdapterMismatchError, match=f"to its base model 'tiny .*{name} has shape"):
        attach_adapter(ModelSpec(name="misfit", source=str(misfit), base_model="tiny"), base)
    assert type(base.model).__name__ == "LlamaForCausalLM" and not hasattr(base.model, "peft_config")
    assert not [n for n, m in base.model.named_modules() if hasattr(m, "lora_B")]
    with torch.no_grad():
        torch.testing.assert_close(base.model(input_ids=ids).logits, before)


def test_an_adapter_that_does_not_fit_its_base_is_one_error_not_a_strategy_failure(isolated_env, tiny, tmp_path):
    """It was tried under every strategy (the base loaded once per strategy) and reported as 'Could not load
    with any strategy', each line only PEFT's header 'Error(s) in loading state_dict for PeftModelForCausalLM:'."""
    from loading import AdapterMismatchError

    misfit, name = _misfit_adapter(tiny, tmp_path / "misfit")
    with pytest.raises(AdapterMismatchError) as info:
        load_model(ModelSpec(name="a", source=str(misfit), quantization="8bit"))
    assert f"Adapter '{misfit}' cannot be applied to its base model '{tiny['llm']}'" in str(info.value)
    assert f"{name} has shape [64, 4], but the base's " in str(info.value) and "out_features=32" in str(info.value)


def test_a_cut_short_or_rank_inconsistent_adapter_is_not_called_one_for_another_model(isolated_env, tiny, tmp_path):
    """Both were 'It was made for another model (or another size of it): check base_model_name_or_path', a fix
    that does not apply: a weights file missing its last bytes (an interrupted copy; PEFT: 'incomplete
    metadata, file not fully covered') is to be fetched again, and an adapter_config.json whose `r` is not
    its weights' rank does not belong with them."""
    import json

    from loading import AdapterMismatchError, UnreadableModelError, attach_adapter

    base = load_model(ModelSpec(name="tiny", source=str(tiny["llm"])))
    cut = copy_model(tiny["llm-lora"], tmp_path / "cut")
    weights = cut / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(UnreadableModelError, match="not a complete safetensors file.*download it again") as info:
        attach_adapter(ModelSpec(name="cut", source=str(cut), base_model="tiny"), base)
    assert "another model" not in str(info.value)

    ranked = copy_model(tiny["llm-lora"], tmp_path / "ranked")
    config = json.loads((ranked / "adapter_config.json").read_text())
    (ranked / "adapter_config.json").write_text(json.dumps({**config, "r": config["r"] * 4}))
    with pytest.raises(AdapterMismatchError) as info:
        attach_adapter(ModelSpec(name="ranked", source=str(ranked), base_model="tiny"), base)
    message = str(info.value)
    assert f"has rank {config['r']} " in message and f"adapter_config.json has r={config['r'] * 4}" in message
    assert "another model" not in message and "save the adapter again" in message
    assert not hasattr(base.model, "peft_config")  # the base goes on as it was


def test_a_failed_strategy_keeps_the_first_detail_line():
    from loading.errors import short_error as _short

    error = RuntimeError("Error(s) in loading state_dict for M:\n\n\tsize mismatch for w: shape [2] vs [4].\n\tmore")
    assert _short(error) == "RuntimeError: Error(s) in loading state_dict for M: size mismatch for w: shape [2] vs [4]."
