"""`modelfleet doctor` and `modelfleet fetch`: check a machine and its serve config in seconds.

Issue: the only way to learn that a model was missing, mis-configured or would not fit was to
start Ray Serve and wait for a replica to die.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from loading.cli import main
from loading.cpu_kernels import cpu_computes_bf16
from loading.tiny import stage_in_hf_cache

from loading_testutil import CLOSED_LOCAL_ENDPOINT, FAIL_FAST_S, Timer, record, set_adapter_base

CONSOLE_SCRIPT = Path(sys.executable).parent / "modelfleet"


def _serve_config(path: Path, models: list[dict]) -> Path:
    """A serve_config.yaml-shaped file: the models live under applications[0].args.models."""
    path.write_text(yaml.safe_dump({
        "applications": [{"name": "modelfleet", "route_prefix": "/", "import_path": "deployments.builder:build_app",
                          "args": {"device": "cpu", "models": models}}],
    }))
    return path


@pytest.fixture
def good_config(isolated_env, tiny, tmp_path) -> Path:
    return _serve_config(tmp_path / "good.yaml", [
        {"name": "tiny-llm", "source": str(tiny["llm"]), "aliases": ["llm"]},
        {"name": "tiny-llm-lora", "source": str(tiny["llm-lora"])},
        {"name": "tiny-whisper", "source": str(tiny["stt"]), "family": "stt"},
        {"name": "tiny-vits", "source": str(tiny["tts"])},
        {"name": "tiny-llava", "source": str(tiny["vlm"]), "family": "vlm"},
        {"name": "demo", "source": "demo-llm", "build_tiny": "llm"},
    ])


def test_doctor_good_config(good_config, monkeypatch, capsys):
    monkeypatch.setenv("HF_ENDPOINT", CLOSED_LOCAL_ENDPOINT)
    with Timer() as t:
        code = main(["doctor", "--config", str(good_config)])
    record("modelfleet doctor, good config (in process)", t.seconds)
    out = capsys.readouterr().out
    assert code == 0, out
    assert t.seconds < FAIL_FAST_S  # no weights loaded, no Hub retries
    assert "torch " in out and ("GPUs: none visible" in out or "GPU 0:" in out)
    assert "bitsandbytes: bitsandbytes" in out and "native libraries: " in out
    assert ("CPU bf16: native" if cpu_computes_bf16() else "CPU bf16: emulated") in out
    assert "Hub: OFFLINE (127.0.0.1:9 unreachable" in out and "hint: set HF_HUB_OFFLINE=1" in out
    for name in ("tiny-llm", "tiny-llm-lora", "tiny-whisper", "tiny-vits", "tiny-llava"):
        assert f"[ok  ] {name}:" in out
    assert out.count("would load: float32 on cpu") == 5
    assert "family: vlm (LlavaForConditionalGeneration)" in out and "family: tts (VitsModel)" in out
    assert "adapter base: " in out and "demo model, built on first start" in out
    assert "6 of 6 models can load." in out


def test_doctor_broken_config(isolated_env, qwen_vl, tiny, tmp_path, monkeypatch, capsys):
    config = _serve_config(tmp_path / "broken.yaml", [
        {"name": "ok", "source": str(tiny["llm"])},
        {"name": "missing", "source": "modelfleet-test/not-cached-7B"},
        {"name": "qwen-vl", "source": str(qwen_vl["qwen2_5_vl"]), "family": "llm"},
    ])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Timer() as t:
        code = main(["doctor", "--config", str(config)])
    record("modelfleet doctor, broken config (in process)", t.seconds)
    out = capsys.readouterr().out
    assert code == 1, out
    assert t.seconds < FAIL_FAST_S  # no weights loaded, no Hub retries
    assert "Hub: OFFLINE (offline mode declared by HF_HUB_OFFLINE=1)" in out
    assert "[ok  ] ok:" in out and "[FAIL] missing:" in out and "[FAIL] qwen-vl:" in out
    assert "'modelfleet-test/not-cached-7B' was not found" in out and "modelfleet fetch" in out
    assert "family: vlm" in out and "qwen2_5_vl" in out
    assert "1 of 3 models can load." in out


@pytest.fixture
def qwen_vl_with_processor(qwen_vl, tiny, tmp_path) -> Path:
    """A tiny Qwen2-VL checkpoint as the Hub has one: with its tokenizer and (image and video) processor files."""
    import json
    import shutil

    model = tmp_path / "qwen2-vl"
    shutil.copytree(qwen_vl["qwen2_vl"], model)
    for file in tiny["llm"].iterdir():
        if file.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(file, model / file.name)
    sizes = {"patch_size": 14, "merge_size": 2, "temporal_patch_size": 2}
    (model / "preprocessor_config.json").write_text(json.dumps(
        {"image_processor_type": "Qwen2VLImageProcessor", "processor_class": "Qwen2VLProcessor", **sizes}))
    (model / "video_preprocessor_config.json").write_text(json.dumps(
        {"video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor", **sizes}))
    return model


def test_a_processor_that_needs_a_missing_package_fails_doctor_and_the_load_naming_it(
        isolated_env, qwen_vl_with_processor, tmp_path, monkeypatch, capsys):
    """serve_config.gpu.yaml's Qwen2.5-VL: its processor's video part needs torchvision, which nothing installs.
    doctor said '[ok  ]' (it never loaded the processor), and the replica failed with transformers' bare
    ImportError. Now doctor loads the processor as a replica does, and both say what to install."""
    import importlib.util

    from loading import ModelSpec, UnsupportedModelError, load_model

    if importlib.util.find_spec("torchvision") is not None:
        pytest.skip("torchvision is installed here: the processor loads")
    config = _serve_config(tmp_path / "vl.yaml", [{"name": "qwen-vl", "source": str(qwen_vl_with_processor)}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["doctor", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert "[FAIL] qwen-vl:" in out and "family: vlm" in out
    assert "Qwen2VLVideoProcessor requires the Torchvision library" in out and "pip install torchvision" in out
    with pytest.raises(UnsupportedModelError, match="pip install torchvision"):
        load_model(ModelSpec(name="qwen-vl", source=str(qwen_vl_with_processor)))


def test_fetch_offline_missing_fails_fast_and_cached_succeeds(isolated_env, tiny, tmp_path, monkeypatch, capsys):
    config = _serve_config(tmp_path / "fetch.yaml", [{"name": "tiny", "source": "modelfleet-test/tiny-llm"}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Timer() as t:
        code = main(["fetch", "--config", str(config)])
    record("modelfleet fetch offline, missing model", t.seconds)
    out = capsys.readouterr().out
    assert code == 1 and t.seconds < FAIL_FAST_S
    assert "[FAIL] tiny:" in out and "HF_HUB_OFFLINE=1" in out and "0 of 1 models available locally." in out

    snapshot = stage_in_hf_cache(tiny["llm"], "modelfleet-test/tiny-llm", isolated_env["hub_cache"])
    code = main(["fetch", "--config", str(config)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"[ok  ] tiny: {snapshot.resolve()} (HF cache)" in out and "1 of 1 models available locally." in out

    # --local-models-dir wants a self-contained copy: a cached snapshot is copied there, offline.
    code = main(["fetch", "--config", str(config), "--local-models-dir"])
    out = capsys.readouterr().out
    copy = isolated_env["models"] / "modelfleet-test" / "tiny-llm"  # by Hub id: no other repo shares it
    assert code == 0, out
    assert f"[ok  ] tiny: {copy.resolve()} (copied from the HF cache)" in out
    assert (copy / "config.json").is_file() and not (copy / "config.json").is_symlink()
    assert sorted(p.name for p in copy.iterdir()) == sorted([p.name for p in snapshot.iterdir()] + [
        ".modelfleet-source.json"])


def test_two_repos_of_one_name_fetch_apart_and_each_serves_its_own(isolated_env, tiny, tmp_path, monkeypatch,
                                                                    capsys):
    """Org-A/model and Org-B/model: fetch put both in LOCAL_MODELS_DIR/model (the second never fetched), and
    the last-component lookup then served the first one's weights for both (found by review)."""
    from loading import Settings
    from loading.resolve import resolve_source

    stage_in_hf_cache(tiny["llm"], "orga/model", isolated_env["hub_cache"])
    stage_in_hf_cache(tiny["stt"], "orgb/model", isolated_env["hub_cache"])
    config = _serve_config(tmp_path / "two.yaml", [{"name": "chat", "source": "orga/model", "family": "llm"},
                                                   {"name": "ears", "source": "orgb/model", "family": "stt"}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "--config", str(config), "--local-models-dir"]) == 0, capsys.readouterr().out
    models = isolated_env["models"]
    assert (models / "orga" / "model" / "config.json").is_file() and (models / "orgb" / "model" / "config.json").is_file()
    assert main(["doctor", "--config", str(config)]) == 0, capsys.readouterr().out
    # a copy of orga/model at the old place (LOCAL_MODELS_DIR/model) is not taken for orgb/model ...
    (models / "orgb" / "model" / "config.json").unlink()  # (orgb's own copy gone: only the cache is left)
    import shutil

    shutil.copytree(models / "orga" / "model", models / "model")
    found = resolve_source("orgb/model", Settings.from_env(), allow_download=False)
    assert found.origin == "HF cache", found
    assert any("holds orga/model" in place for place in found.looked_at)
    # ... while a directory put there by hand (no record of its source) is still found by its last component
    (models / "model" / ".modelfleet-source.json").unlink()
    assert resolve_source("orgb/model", Settings.from_env(), allow_download=False).path == models / "model"


def test_a_pinned_revision_is_not_served_from_a_copy_fetched_at_another(isolated_env, tiny, tmp_path, monkeypatch,
                                                                        capsys):
    """A copy `fetch --local-models-dir` made at v1 was served once the config pinned v2, and fetch again
    stopped at it (found by review)."""
    from loading import Settings
    from loading.resolve import resolve_source

    cache, copy = isolated_env["hub_cache"], isolated_env["models"] / "org" / "tiny"
    models = {"v1": tiny["llm"], "v2": tiny["llm-seed1"]}
    for tag, sha in (("v1", "a" * 40), ("v2", "b" * 40)):
        stage_in_hf_cache(models[tag], "org/tiny", cache, revision_hash=sha)
        (cache / "models--org--tiny" / "refs" / tag).write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for tag, model in models.items():
        config = _serve_config(tmp_path / f"{tag}.yaml", [{"name": "tiny", "source": "org/tiny", "revision": tag}])
        assert main(["fetch", "--config", str(config), "--local-models-dir"]) == 0, capsys.readouterr().out
        assert (copy / "model.safetensors").read_bytes() == (model / "model.safetensors").read_bytes()
        assert resolve_source("org/tiny", Settings.from_env(), revision=tag).path == copy.resolve()
    found = resolve_source("org/tiny", Settings.from_env(), revision="v1")  # v2's copy is there now
    assert found.origin == "HF cache" and any("holds org/tiny@v2" in place for place in found.looked_at), found


def test_an_unpinned_model_is_not_served_from_a_copy_fetched_at_a_pinned_revision(isolated_env, tiny, tmp_path,
                                                                                 monkeypatch, capsys):
    """With the pin removed (main), the copy fetched at v1 was still served, and fetch kept it: only a pinned
    revision was compared with the copy's (found by review). A path to that copy is still served as it is."""
    from loading import Settings
    from loading.resolve import resolve_source

    cache, copy = isolated_env["hub_cache"], isolated_env["models"] / "org" / "tiny"
    models = {"v1": tiny["llm"], "main": tiny["llm-seed1"]}
    for tag, sha in (("v1", "a" * 40), ("main", "b" * 40)):  # staged last: refs/main -> bbbb
        stage_in_hf_cache(models[tag], "org/tiny", cache, revision_hash=sha)
        (cache / "models--org--tiny" / "refs" / tag).write_text(sha)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = _serve_config(tmp_path / "v1.yaml", [{"name": "tiny", "source": "org/tiny", "revision": "v1"}])
    assert main(["fetch", "--config", str(config), "--local-models-dir"]) == 0, capsys.readouterr().out
    found = resolve_source("org/tiny", Settings.from_env())
    assert found.origin == "HF cache" and any("holds org/tiny@v1" in place for place in found.looked_at), found
    assert resolve_source(str(copy), Settings.from_env()).path == copy.resolve()  # asked for by its path
    config = _serve_config(tmp_path / "main.yaml", [{"name": "tiny", "source": "org/tiny"}])
    assert main(["fetch", "--config", str(config), "--local-models-dir"]) == 0, capsys.readouterr().out
    assert (copy / "model.safetensors").read_bytes() == (models["main"] / "model.safetensors").read_bytes()
    assert resolve_source("org/tiny", Settings.from_env()).path == copy.resolve()


def test_fetch_to_local_models_dir_puts_an_adapters_hub_base_there_too(isolated_env, tiny, tmp_path, monkeypatch,
                                                                       capsys):
    """The adapter was copied to LOCAL_MODELS_DIR/Org/Lora but its base left in the HF cache: the directory
    was not ready to carry to a machine without the Hub (found by review)."""
    import shutil

    from loading import ModelSpec, Settings
    from loading.model_source import resolve_model

    stage_in_hf_cache(tiny["llm"], "Org/Base", isolated_env["hub_cache"])
    adapter = shutil.copytree(tiny["llm-lora"], tmp_path / "lora")
    set_adapter_base(adapter, "Org/Base")
    stage_in_hf_cache(adapter, "Org/Lora", isolated_env["hub_cache"])
    config = _serve_config(tmp_path / "lora.yaml", [{"name": "lora", "source": "Org/Lora", "family": "llm"}])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "--config", str(config), "--local-models-dir"]) == 0, capsys.readouterr().out
    base = isolated_env["models"] / "Org" / "Base"
    assert f"adapter base: {base.resolve()} (copied from the HF cache)" in capsys.readouterr().out
    shutil.rmtree(isolated_env["hub_cache"])  # the machine it is carried to
    found = resolve_model(ModelSpec(name="lora", source="Org/Lora"), Settings.from_env())
    assert found.base is not None and found.base.path == base.resolve()


def test_fetch_builds_demo_model_and_reports_adapter_base(isolated_env, tmp_path, monkeypatch, capsys):
    config = _serve_config(tmp_path / "demo.yaml", [
        {"name": "tiny-llm", "source": "tiny-llm", "build_tiny": "llm"},
        {"name": "tiny-llm-lora", "source": "tiny-llm-lora", "base_model": "tiny-llm", "build_tiny": "llm-lora"},
    ])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    models = isolated_env["models"]
    assert f"adapter base: {(models / 'tiny-llm').resolve()} (LOCAL_MODELS_DIR)" in out
    assert (models / "tiny-llm-lora" / "adapter_config.json").is_file()


def test_fetch_into_a_models_dir_it_cannot_write_fails_that_model_naming_the_dir_not_a_traceback(
        isolated_env, tmp_path, monkeypatch, capsys):
    """LOCAL_MODELS_DIR on a path that is no writable directory (a read-only mount, a typo into a file): fetch
    died with a Python traceback (NotADirectoryError from deep in the demo build) and checked no other model."""
    not_a_dir = tmp_path / "a-file"
    not_a_dir.write_text("")
    config = _serve_config(tmp_path / "demo.yaml", [
        {"name": "tiny-llm", "source": "tiny-llm", "build_tiny": "llm"},
        {"name": "missing", "source": "Org/Missing"},
    ])
    monkeypatch.setenv("LOCAL_MODELS_DIR", str(not_a_dir / "models"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "--config", str(config)]) == 1
    out = capsys.readouterr().out
    assert f"[FAIL] tiny-llm: NotADirectoryError on {not_a_dir / 'models'}" in out
    assert f"LOCAL_MODELS_DIR={not_a_dir / 'models'}" in out and "writable directories" in out
    assert "[FAIL] missing: Model 'Org/Missing' was not found" in out  # the next model is still checked
    assert "0 of 2 models available locally." in out


def test_missing_config_file(tmp_path, capsys):
    assert main(["doctor", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["validate", "doctor", "fetch"])
def test_a_directory_given_as_the_config_is_named_as_one(command, tmp_path, capsys):
    """It was 'config file DIR not found' while DIR was there."""
    from deployments.cli import main as console_script

    assert console_script([command, "--config", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"config file {tmp_path} is a directory: pass the YAML file in it" in err and "not found" not in err, err


@pytest.mark.parametrize("command", ["doctor", "fetch"])
@pytest.mark.parametrize("content,says", [
    pytest.param({"models": [{"name": "m", "source": "tiny-llm", "max_tokens": 5}]},
                 "applications[0].args.models[0].max_tokens: Extra inputs are not permitted", id="misspelt-field"),
    pytest.param({"models": [{"name": "m", "source": "tiny-llm", "aliases": [""]}]},
                 "applications[0].args.models[0].aliases: Value error, aliases[0]='' is blank", id="blank-alias"),
    pytest.param({"models": [{"name": "m", "source": "a"}, {"name": "n", "source": "b", "aliases": ["m"]}]},
                 "applications[0].args.models: Model names and aliases must be unique; duplicated: 'm'",
                 id="name-twice-in-one-app"),
    pytest.param("applications: [\n  - name: a\n   bad", "is not valid YAML", id="bad-yaml"),
])
def test_a_config_that_cannot_be_read_exits_2_naming_where(command, content, says, isolated_env, tmp_path, capsys):
    """A traceback before: pydantic's, yaml's, or the uniqueness check's ValueError."""
    path = tmp_path / "bad.yaml"
    if isinstance(content, str):
        path.write_text(content)
    else:
        _serve_config(path, content["models"])
    assert main([command, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before the machine's report
    assert captured.err.startswith(f"modelfleet {command}: {path}") and says in captured.err, captured.err


@pytest.mark.parametrize("command", ["validate", "doctor", "fetch"])
def test_a_config_that_is_not_utf8_exits_2_naming_the_file_and_the_fix(command, isolated_env, tmp_path, capsys):
    """A config saved as UTF-16 (Windows editors do) was a traceback of `modelfleet validate` (exit 1: the
    UnicodeDecodeError of reading it) and, from doctor and fetch, only 'UnicodeDecodeError: ...' without the file."""
    from deployments.cli import main as console_script

    path = tmp_path / "utf16.yaml"
    path.write_bytes("applications: []\n".encode("utf-16"))
    assert console_script([command, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"modelfleet {command}: {path} is not UTF-8 text") \
        and "save the Serve config as UTF-8 YAML" in captured.err, captured.err


def test_two_applications_may_serve_one_name(isolated_env, tiny, tmp_path, monkeypatch, capsys):
    """Names are unique per application, as Serve routes them (each app at its route prefix)."""
    model = {"name": "tiny-llm", "source": str(tiny["llm"])}
    app = lambda name, prefix: {"name": name, "route_prefix": prefix,  # noqa: E731
                                "import_path": "deployments.builder:build_app", "args": {"models": [model]}}
    path = tmp_path / "two.yaml"
    path.write_text(yaml.safe_dump({"applications": [app("a", "/a"), app("b", "/b")]}))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["doctor", "--config", str(path)]) == 0
    assert "2 of 2 models can load." in capsys.readouterr().out


def test_doctor_and_fetch_use_the_apps_local_models_dir(isolated_env, tiny, tmp_path, monkeypatch, capsys):
    """args.local_models_dir is LOCAL_MODELS_DIR for the app's replicas: doctor looks there and fetch puts
    demo builds and --local-models-dir copies there, not in the environment's LOCAL_MODELS_DIR."""
    import shutil

    app_dir = tmp_path / "app-models"
    shutil.copytree(tiny["llm"], app_dir / "tiny-llm")
    config = tmp_path / "local.yaml"
    config.write_text(yaml.safe_dump({"applications": [{
        "name": "modelfleet", "route_prefix": "/", "import_path": "deployments.builder:build_app",
        "args": {"device": "cpu", "local_models_dir": "app-models",  # relative to the working directory (tmp_path)
                 "models": [{"name": "chat", "source": "tiny-llm"},
                            {"name": "demo", "source": "demo-llm", "build_tiny": "llm"},
                            {"name": "cached", "source": "modelfleet-test/tiny-cached"}]}}]}))
    stage_in_hf_cache(tiny["llm"], "modelfleet-test/tiny-cached", isolated_env["hub_cache"])
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["fetch", "--config", str(config), "--local-models-dir"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert (app_dir / "demo-llm" / "config.json").is_file()  # the demo model built there
    assert f"[ok  ] cached: {(app_dir / 'modelfleet-test' / 'tiny-cached').resolve()} (copied from the HF cache)" in out, out
    assert not any(isolated_env["models"].iterdir()), out  # nothing in the environment's LOCAL_MODELS_DIR
    assert main(["doctor", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"args.local_models_dir={app_dir.resolve()} (exists)" in out
    assert f"location: {(app_dir / 'tiny-llm').resolve()} (LOCAL_MODELS_DIR)" in out, out
    assert "3 of 3 models can load." in out


@pytest.mark.skipif(not CONSOLE_SCRIPT.exists(), reason="modelfleet not installed (pip install -e . --no-deps)")
def test_installed_console_script(good_config, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with Timer() as t:
        proc = subprocess.run([str(CONSOLE_SCRIPT), "doctor", "--config", str(good_config)],
                              capture_output=True, text=True, timeout=300, env=dict(os.environ))
    record("modelfleet doctor, console script (subprocess)", t.seconds)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 of 6 models can load." in proc.stdout and "would load: float32 on cpu" in proc.stdout


def test_an_adapter_on_a_served_model_passes_doctor_fetch_and_family_detection(isolated_env, tiny, tmp_path,
                                                                                monkeypatch, capsys):
    """`base_model` may name another served model (its weights are shared); doctor and fetch resolved it as
    a source and failed the config that serves (found by review)."""
    from deployments.builder import build_app
    from loading.tiny import ensure_tiny

    adapter = ensure_tiny("llm-lora", tmp_path / "lora", base=tiny["llm"])
    models = [{"name": "chat", "source": str(tiny["llm"]), "family": "llm"},
              {"name": "chat-lora", "source": str(adapter), "base_model": "chat"}]
    config = _serve_config(tmp_path / "adapter.yaml", models)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["doctor", "--config", str(config)]) == 0, capsys.readouterr().out
    assert main(["fetch", "--config", str(config)]) == 0, capsys.readouterr().out
    build_app({"device": "cpu", "models": models})  # the adapter's family is detected through its served base


def _app_args(path: Path, args: dict, import_path: str = "deployments.builder:build_app") -> Path:
    path.write_text(yaml.safe_dump({"applications": [{"name": "modelfleet", "route_prefix": "/",
                                                      "import_path": import_path, "args": args}]}))
    return path


TINY_DEMO = [{"name": "tiny-llm", "source": "tiny-llm", "build_tiny": "llm"}]


@pytest.mark.parametrize("command", ["doctor", "fetch"])
@pytest.mark.parametrize("args,says", [
    pytest.param({"modles": TINY_DEMO}, "applications[0].args.modles: not a field; did you mean `models`?",
                 id="misspelt-models"),
    pytest.param({"local_model_dir": "app-models", "models": TINY_DEMO},
                 "applications[0].args.local_model_dir: not a field; did you mean `local_models_dir`?",
                 id="misspelt-local_models_dir"),
    pytest.param({"device": "cpu"}, "no model to check: no application has `args.models`", id="no-models"),
])
def test_loading_refuses_a_typo_of_what_it_reads_and_a_config_without_models(command, args, says, isolated_env,
                                                                              tmp_path, monkeypatch, capsys):
    """Review 5: doctor and fetch read only args.models and args.local_models_dir, so `modles:` gave "0 of 0
    models can load." and exit 0, and `local_model_dir:` fetched into the environment's LOCAL_MODELS_DIR."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _app_args(tmp_path / "typo.yaml", args)
    assert main([command, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"modelfleet {command}: {path}"), captured
    assert says in captured.err, captured.err
    assert not any(isolated_env["models"].iterdir())  # nothing built or fetched anywhere


@pytest.mark.parametrize("command", ["doctor", "fetch"])
@pytest.mark.parametrize("args,says", [
    pytest.param({"models": TINY_DEMO, "request_timeout_s": -1},
                 "applications[0].args.request_timeout_s: Input should be greater than 0", id="bad-value"),
    pytest.param({"models": TINY_DEMO, "familes": {"llm": {"max_batch_size": 8}}},
                 "applications[0].args.familes: Extra inputs are not permitted (did you mean `families`?)",
                 id="misspelt-section"),
    pytest.param({"models": TINY_DEMO, "limits": {"max_imagess": 2}},
                 "applications[0].args.limits.max_imagess: Extra inputs are not permitted (did you mean `max_images`?)",
                 id="misspelt-nested-field"),
    pytest.param({"models": []}, "applications[0].args.models: List should have at least 1 item", id="models-empty"),
    pytest.param({"models": [{"name": "m", "source": "tiny-llm", "max_tokens": 5}]},
                 "applications[0].args.models[0].max_tokens: Extra inputs are not permitted", id="misspelt-model-field"),
])
def test_the_console_script_refuses_what_serve_run_refuses(command, args, says, isolated_env, tmp_path, monkeypatch,
                                                            capsys):
    """`modelfleet doctor|fetch` (deployments/cli.py) validate each application of ours as the builder does
    (AppConfig): keys loading never reads passed unchecked, exit 0, on a config `serve run` refuses."""
    from deployments.cli import main as modelfleet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _app_args(tmp_path / "refused.yaml", args)
    assert modelfleet([command, "--config", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith(f"modelfleet {command}: {path}: "), captured
    assert says in captured.err and "`serve run` refuses this config" in captured.err, captured.err
    assert not any(isolated_env["models"].iterdir())


def test_the_console_script_checks_the_default_config_and_needs_an_application_of_ours(isolated_env, tmp_path,
                                                                                       monkeypatch, capsys):
    from deployments.cli import main as modelfleet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    _app_args(tmp_path / "serve_config.yaml", {"models": TINY_DEMO, "device": "tpu"})  # --config left out
    assert modelfleet(["doctor"]) == 2
    assert "modelfleet doctor: serve_config.yaml: applications[0].args.device: Input should be " in \
        capsys.readouterr().err
    _app_args(tmp_path / "serve_config.yaml", {"models": TINY_DEMO}, import_path="other.app:build")
    assert modelfleet(["fetch"]) == 2
    assert "no application has import_path: deployments.builder:build_app" in capsys.readouterr().err
    _app_args(tmp_path / "serve_config.yaml", {"models": TINY_DEMO, "device": "cpu", "limits": {"max_images": 2}})
    assert modelfleet(["fetch"]) == 0, capsys.readouterr()
    assert "1 of 1 models available locally." in capsys.readouterr().out


def test_without_the_serving_side_the_console_script_still_runs_loadings_checks(isolated_env, tmp_path, monkeypatch,
                                                                                 capsys):
    """Where deployments.app_config cannot be imported (no Ray on this machine), doctor says the `args` went
    unchecked and goes on; loading's own checks still hold."""
    from deployments.cli import main as modelfleet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setitem(sys.modules, "deployments.app_config", None)  # import raises ImportError
    path = _app_args(tmp_path / "ok.yaml", {"models": TINY_DEMO, "device": "cpu", "request_timeout_s": -1})
    assert modelfleet(["doctor", "--config", str(path)]) == 0
    captured = capsys.readouterr()
    assert "the applications' `args` were not checked as `serve run` checks them" in captured.err
    assert "1 of 1 models can load." in captured.out
    assert modelfleet(["doctor", "--config", str(_app_args(tmp_path / "typo.yaml", {"modles": TINY_DEMO}))]) == 2
    assert "applications[0].args.modles: not a field; did you mean `models`?" in capsys.readouterr().err


def test_another_applications_args_are_its_own(isolated_env, tmp_path, monkeypatch, capsys):
    """A Serve config with an embedder beside us (`args: {model: ...}`) was refused as a typo of `models`
    (c360423's check read every application's args); `serve run` serves it."""
    from deployments.cli import main as modelfleet

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = tmp_path / "two_apps.yaml"
    path.write_text(yaml.safe_dump({"applications": [
        {"name": "modelfleet", "route_prefix": "/", "import_path": "deployments.builder:build_app",
         "args": {"models": TINY_DEMO}},
        {"name": "embedder", "route_prefix": "/embed", "import_path": "my_embedder.app:build",
         "args": {"model": "BAAI/bge-small-en-v1.5", "modles": "theirs"}}]}))
    assert modelfleet(["doctor", "--config", str(path)]) == 0, capsys.readouterr()
    assert "1 of 1 models can load." in capsys.readouterr().out


def test_make_serve_validates_the_config_first_and_names_a_misspelt_field(isolated_env, tmp_path, capsys):
    """`serve run` answers a config it refuses with Ray's tracebacks (4 builds: Ray retries the task), then blocks
    until Ctrl-C: a first start of `make serve` with `max_tokens:` for `max_new_tokens:` never came back.
    `modelfleet validate` checks the fields as the builder does, in a second, and `make serve` runs it first."""
    from deployments.cli import main as console_script

    good = _app_args(tmp_path / "good.yaml", {"models": TINY_DEMO})
    typo = _app_args(tmp_path / "typo.yaml", {"models": [{**TINY_DEMO[0], "max_tokens": 16}]})
    assert console_script(["validate", "--config", str(good)]) == 0
    assert "valid (1 application(s) of modelfleet, 1 model(s))" in capsys.readouterr().out
    assert console_script(["validate", "--config", str(typo)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"modelfleet validate: {typo}: applications[0].args.models[0].max_tokens: Extra inputs "
                          "are not permitted (did you mean `max_new_tokens`?)"), err
    assert console_script(["validate", "--config", str(tmp_path / "nope.yaml")]) == 2
    assert not any(isolated_env["models"].iterdir())  # nothing built

    repo = Path(__file__).resolve().parents[2]
    plan = subprocess.run(["make", "-n", "-o", ".venv/.installed", "serve"], cwd=repo, capture_output=True,
                          text=True, check=True).stdout.splitlines()
    validate = next(i for i, line in enumerate(plan) if "modelfleet validate --config serve_config.yaml" in line)
    assert validate < next(i for i, line in enumerate(plan) if "serve run serve_config.yaml" in line), plan


@pytest.mark.parametrize("command,says", [
    ("chek", "unknown command 'chek' (did you mean `check`?): the commands are check, validate, doctor, fetch"),
    ("bogus", "unknown command 'bogus': the commands are check, validate, doctor, fetch"),
])
def test_an_unknown_command_names_all_four(command, says, capsys):
    """It was loading's argparse error, 'invalid choice: ... (choose from 'doctor', 'fetch')': a typo of check or
    validate was told that those two do not exist."""
    from deployments.cli import main as console_script

    assert console_script([command, "--url", "http://127.0.0.1:1"]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and says in captured.err, captured.err


def test_validate_refuses_what_the_builder_refuses_of_the_keys(isolated_env, tmp_path, monkeypatch, capsys):
    """build_app refuses auth.required without a key (serve_config.gpu.yaml sets it), a key file it cannot read
    and a short key; serve run answers that as it answers a misspelt field: tracebacks, then it blocks. validate
    (make serve's first step) said 'valid' for all three."""
    from deployments.cli import main as console_script

    monkeypatch.delenv("MODELFLEET_API_KEYS", raising=False)
    monkeypatch.delenv("MODELFLEET_ADMIN_KEYS", raising=False)
    required = _app_args(tmp_path / "required.yaml", {"models": TINY_DEMO, "auth": {"required": True}})
    assert console_script(["validate", "--config", str(required)]) == 2
    err = capsys.readouterr().err
    assert "applications[0].args.auth: auth.required is set but no API key is configured: set MODELFLEET_API_KEYS=" \
        in err, err
    monkeypatch.setenv("MODELFLEET_API_KEYS", "k" * 32)
    assert console_script(["validate", "--config", str(required)]) == 0
    capsys.readouterr()
    unreadable = _app_args(tmp_path / "file.yaml", {"models": TINY_DEMO,
                                                    "auth": {"admin_keys_file": str(tmp_path / "no-such-file")}})
    assert console_script(["validate", "--config", str(unreadable)]) == 2
    assert f"applications[0].args.auth: auth.admin_keys_file '{tmp_path / 'no-such-file'}' cannot be read" \
        in capsys.readouterr().err
    monkeypatch.setenv("MODELFLEET_API_KEYS", "short")
    assert console_script(["validate", "--config", str(required)]) == 2
    assert "shorter than auth.min_key_chars=16" in capsys.readouterr().err
