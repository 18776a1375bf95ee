"""`resolve_model`: the one resolve -> adapter -> base -> config -> family sequence, shared by
`load_model`, `attach_adapter`, `modelfleet doctor` (`inspect_model`, `detect_family`) and `modelfleet fetch`.

Issue: the sequence was written four times, and the copies had drifted: `doctor` and `detect_family`
resolved the model without downloading, but an adapter's base with downloads allowed, so a doctor run
on a machine with Hub access could start a multi-GB download of a base it only meant to report on.
"""

from __future__ import annotations

import pytest

import loading.resolve
from loading import Family, ModelSpec, Settings, UnsupportedModelError, detect_family
from loading.inspect_model import inspect_model
from loading.model_source import resolve_model
from loading.offline import HubStatus

from loading_testutil import copy_model, set_adapter_base


def test_plain_model(isolated_env, tiny):
    found = resolve_model(ModelSpec(name="m", source=str(tiny["llm"])), Settings.from_env())
    assert found.resolved.origin == "local path" and found.path == tiny["llm"].resolve()
    assert found.adapter is None and found.base is None
    assert found.model_dir == found.path and found.has_own_processor
    assert found.config.model_type == "llama" and found.family.family is Family.LLM


def test_adapter_and_its_base(isolated_env, tiny):
    spec = ModelSpec(name="lora", source=str(tiny["llm-lora"]))
    found = resolve_model(spec, Settings.from_env())
    assert found.adapter is not None and found.adapter.path == tiny["llm-lora"].resolve()
    assert found.base is not None and found.base.path == tiny["llm"].resolve() and found.base.origin == "local path"
    assert found.model_dir == found.base.path  # the weights loaded are the base's
    assert not found.has_own_processor  # the adapter dir has no tokenizer: the base's is used
    assert found.config.model_type == "llama" and found.family.family is Family.LLM

    # an adapter attached to a base that is already loaded: its own base is never looked up
    files_only = resolve_model(spec, Settings.from_env(), with_base=False, with_config=False)
    assert files_only.adapter is not None and files_only.base is None and files_only.config is None
    with pytest.raises(ValueError, match="with_config=True needs with_base=True"):
        resolve_model(spec, Settings.from_env(), with_base=False)


def test_configured_family_is_checked_against_the_config(isolated_env, tiny):
    with pytest.raises(UnsupportedModelError, match="family: llm"):
        resolve_model(ModelSpec(name="m", source=str(tiny["llm"]), family="vlm"), Settings.from_env())


def test_progress_phases(isolated_env, tiny):
    phases: list[str] = []
    resolve_model(ModelSpec(name="lora", source=str(tiny["llm-lora"])), Settings.from_env(),
                  progress=lambda phase, fraction=None: phases.append(phase))
    assert phases == ["resolving", "resolving adapter base", "reading config"]


@pytest.fixture
def adapter_with_uncached_hub_base(isolated_env, tiny, tmp_path, monkeypatch):
    """An adapter whose base is a Hub id cached nowhere, a Hub that answers, and `download` booby-trapped."""
    adapter = copy_model(tiny["llm-lora"], tmp_path / "adapters" / "my-lora")
    set_adapter_base(adapter, "Org/Missing-Base-7B")
    started = []
    monkeypatch.setattr(loading.resolve, "download", lambda *args, **kwargs: started.append(args) or 1 / 0)
    monkeypatch.setattr(loading.resolve, "hub_status", lambda settings: HubStatus(True, "fake Hub reachable"))
    yield adapter
    assert started == [], "a download was started"


def test_doctor_never_downloads_an_adapter_base(adapter_with_uncached_hub_base):
    spec = ModelSpec(name="my-lora", source=str(adapter_with_uncached_hub_base))
    result = inspect_model(spec, Settings.from_env(), HubStatus(True, "fake Hub reachable"), [])
    assert not result.ok and result.location == f"{adapter_with_uncached_hub_base.resolve()} (local path)"
    assert "Org/Missing-Base-7B" in result.error and "downloads disabled for this call" in result.error


def test_detect_family_never_downloads_an_adapter_base(adapter_with_uncached_hub_base):
    spec = ModelSpec(name="my-lora", source=str(adapter_with_uncached_hub_base))
    with pytest.raises(UnsupportedModelError, match="cannot detect the family.*Org/Missing-Base-7B"):
        detect_family(spec)
