"""Settings.from_env: where the Hugging Face cache is, found as huggingface_hub finds it.

Issue: modelfleet computed the cache itself and ignored XDG_CACHE_HOME and the legacy
HUGGINGFACE_HUB_CACHE, and did not expand $VARS in HF_HOME / HF_HUB_CACHE, all of which huggingface_hub
honours: a model that huggingface-cli or transformers had cached was "not found" offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from loading import Settings
from loading.resolve import resolve_source
from loading.tiny import stage_in_hf_cache

# Every variable that takes part in huggingface_hub's choice of cache directory.
CACHE_VARIABLES = ("HF_HOME", "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "XDG_CACHE_HOME", "TRANSFORMERS_CACHE")

# huggingface_hub computes its constants at import: re-imported per environment in a child process.
_HUB_CONSTANTS = r"""
import importlib, json, os, sys
import huggingface_hub.constants as c
out = []
for env in json.loads(sys.stdin.read()):
    os.environ.clear()
    os.environ.update(env)
    importlib.reload(c)
    out.append([c.HF_HOME, c.HF_HUB_CACHE])
print(json.dumps(out))
"""


def _cases(root: Path) -> dict[str, dict[str, str]]:
    home, data = str(root / "home"), str(root / "data")
    return {
        "nothing set": {"HOME": home},
        "XDG_CACHE_HOME": {"HOME": home, "XDG_CACHE_HOME": str(root / "xdg")},
        "XDG_CACHE_HOME with ~": {"HOME": home, "XDG_CACHE_HOME": "~/xdg"},
        "HF_HOME wins over XDG_CACHE_HOME": {"HOME": home, "XDG_CACHE_HOME": str(root / "xdg"),
                                            "HF_HOME": str(root / "hf")},
        "HF_HOME with $VAR": {"HOME": home, "HF_HOME": "$MYDATA/hf", "MYDATA": data},
        "HF_HOME with ${VAR}": {"HOME": home, "HF_HOME": "${MYDATA}/hf", "MYDATA": data},
        "HF_HOME with an unset $VAR": {"HOME": home, "HF_HOME": "/srv/$NOT_SET_ANYWHERE/hf"},
        "HF_HOME with ~": {"HOME": home, "HF_HOME": "~/hf"},
        "HF_HOME empty": {"HOME": home, "HF_HOME": ""},
        "HUGGINGFACE_HUB_CACHE (legacy)": {"HOME": home, "HUGGINGFACE_HUB_CACHE": str(root / "legacy")},
        "HUGGINGFACE_HUB_CACHE with $VAR": {"HOME": home, "HUGGINGFACE_HUB_CACHE": "$MYDATA/legacy", "MYDATA": data},
        "HUGGINGFACE_HUB_CACHE wins over HF_HOME": {"HOME": home, "HF_HOME": str(root / "hf"),
                                                    "HUGGINGFACE_HUB_CACHE": str(root / "legacy")},
        "HF_HUB_CACHE wins over HUGGINGFACE_HUB_CACHE": {"HOME": home, "HUGGINGFACE_HUB_CACHE": str(root / "legacy"),
                                                         "HF_HUB_CACHE": str(root / "new")},
        "HF_HUB_CACHE with $VAR and ~": {"HOME": home, "HF_HUB_CACHE": "~/$SUB/hub", "SUB": "x"},
        "no HOME (the password database's)": {"XDG_CACHE_HOME": "~/xdg"},
    }


def test_hf_cache_is_where_huggingface_hub_puts_it(tmp_path):
    cases = _cases(tmp_path)
    child_env = {k: v for k, v in os.environ.items() if k not in CACHE_VARIABLES and k != "HUGGINGFACE_CO_STAGING"}
    out = subprocess.run([sys.executable, "-c", _HUB_CONSTANTS], input=json.dumps(list(cases.values())),
                         env=child_env, capture_output=True, text=True, timeout=120, check=True)
    expected = json.loads(out.stdout.strip().splitlines()[-1])
    differ = []
    for (name, env), (hub_home, hub_cache) in zip(cases.items(), expected, strict=True):
        settings = Settings.from_env(env)
        if (settings.hf_home, settings.hf_hub_cache) != (Path(hub_home), Path(hub_cache)):
            differ.append(f"{name}: huggingface_hub {hub_home}, {hub_cache}; "
                          f"modelfleet {settings.hf_home}, {settings.hf_hub_cache}")
    assert not differ, "\n".join(differ)


def test_only_the_given_environment_is_read(tmp_path, monkeypatch):
    # The process's own variables must not leak into a computation from a given mapping.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "process-xdg"))
    monkeypatch.setenv("MYDATA", str(tmp_path / "process-data"))
    monkeypatch.setenv("HOME", str(tmp_path / "process-home"))
    given = {"HOME": str(tmp_path / "home"), "HF_HOME": "$MYDATA/hf", "MYDATA": str(tmp_path / "data")}
    assert Settings.from_env(given).hf_hub_cache == tmp_path / "data" / "hf" / "hub"
    assert Settings.from_env({"HOME": str(tmp_path / "home")}).hf_hub_cache == \
        tmp_path / "home" / ".cache" / "huggingface" / "hub"
    assert Settings.from_env({"HOME": str(tmp_path / "home"), "HF_HUB_CACHE": "~/c"}).hf_hub_cache == \
        tmp_path / "home" / "c"


def test_a_model_cached_under_xdg_cache_home_is_found_offline(isolated_env, tiny, tmp_path, monkeypatch):
    for name in CACHE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # where `huggingface-cli download` puts it with this environment
    snapshot = stage_in_hf_cache(tiny["llm"], "acme/tiny-llm", tmp_path / "xdg" / "huggingface" / "hub")
    found = resolve_source("acme/tiny-llm", Settings.from_env())
    assert found.origin == "HF cache" and found.path.resolve() == snapshot.resolve()


@pytest.mark.parametrize("text", ["$", "a$", "${}", "$-x", "${UNCLOSED", "$$"])
def test_text_that_names_no_variable_is_left_as_written(text):
    env = {"HOME": "/h", "HF_HUB_CACHE": f"/c/{text}"}
    assert Settings.from_env(env).hf_hub_cache == Path(os.path.expandvars(f"/c/{text}"))
