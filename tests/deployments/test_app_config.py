"""Bad `args:` are refused before anything is built, by a pydantic ValidationError naming the field.

No cluster: `AppConfig.model_validate` and `build_app` (which only binds deployments) both run
without Ray.
"""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from deployments.app_config import FAMILY_DEFAULTS, AppConfig
from loading import Family


def defaults(family: Family) -> dict:
    return FAMILY_DEFAULTS.get(family.value) or FAMILY_DEFAULTS[family]

LLM = {"name": "chat", "source": "tiny-llm", "family": "llm"}
TTS = {"name": "voice", "source": "tiny-vits", "family": "tts"}


def args(**extra) -> dict:
    return {"device": "cpu", "models": [LLM, TTS], **extra}


def error_locs(exc: ValidationError) -> dict[str, str]:
    """'families.llm.max_ongoing_requests' -> pydantic's message for it."""
    return {".".join(map(str, e["loc"])): e["msg"] for e in exc.errors()}


BAD_ARGS = [
    # unknown keys, at every level
    pytest.param(args(bogus=1), "bogus", "Extra inputs", id="unknown-top-level-key"),
    pytest.param(args(models=[{**LLM, "max_tokens": 5}]), "models.0.max_tokens", "Extra inputs",
                 id="unknown-model-key"),
    pytest.param(args(families={"llm": {"max_batch": 4}}), "families.llm.max_batch", "Extra inputs",
                 id="unknown-family-option"),
    pytest.param(args(ingress={"replicas": 2}), "ingress.replicas", "Extra inputs", id="unknown-ingress-option"),
    pytest.param(args(limits={"max_body_bytes": 2}), "limits.max_body_bytes", "Extra inputs", id="unknown-limit"),
    # an option the family would ignore (TTS does not batch) is refused, not silently dropped
    pytest.param(args(families={"tts": {"max_batch_size": 4}}), "families.tts.max_batch_size", "Extra inputs",
                 id="option-the-family-ignores"),
    # bad family names
    pytest.param(args(families={"asr": {"num_cpus": 1}}), "families", "asr", id="unknown-family-section"),
    pytest.param(args(models=[{**LLM, "family": "chat"}]), "models.0.family", "'llm', 'stt', 'tts' or 'vlm'",
                 id="unknown-model-family"),
    pytest.param(args(device="tpu"), "device", "'auto', 'cpu' or 'gpu'", id="unknown-device"),
    # duplicate names, also through an alias
    pytest.param(args(models=[LLM, {**TTS, "name": "chat"}]), "models", "'chat'", id="duplicate-name"),
    pytest.param(args(models=[LLM, {**TTS, "aliases": ["tts-1", "chat"]}]), "models", "'chat'",
                 id="alias-clashes-with-a-name"),
    pytest.param(args(models=[]), "models", "at least 1", id="no-models"),
    # a blank alias made every model of the family without base_model an adapter of its model (pool.shared_base)
    pytest.param(args(models=[{**LLM, "aliases": [""]}, TTS]), "models.0.aliases", "aliases[0]='' is blank",
                 id="blank-alias"),
    pytest.param(args(models=[LLM, {**TTS, "name": "  "}]), "models.1.name", "name='  ' is blank", id="blank-name"),
    # device: cuda where the replica gets no GPU can only fail to load
    pytest.param(args(models=[{**LLM, "device": "cuda"}, TTS]), "", "set args.device: gpu",
                 id="cuda-model-under-app-device-cpu"),
    # negative or zero numbers
    pytest.param(args(request_timeout_s=-1), "request_timeout_s", "greater than 0", id="negative-request-timeout"),
    pytest.param(args(status_timeout_s=0), "status_timeout_s", "greater than 0", id="zero-status-timeout"),
    pytest.param(args(families={"llm": {"max_ongoing_requests": 0}}), "families.llm.max_ongoing_requests",
                 "greater than or equal to 1", id="zero-max-ongoing"),
    pytest.param(args(families={"tts": {"max_queued_requests": -2}}), "families.tts.max_queued_requests",
                 "greater than or equal to -1", id="max-queued-below-minus-one"),
    # Ray Serve takes -1 or a positive number, and refused 0 only when build_app bound the deployment
    pytest.param(args(families={"llm": {"max_queued_requests": 0}}), "families.llm.max_queued_requests",
                 "max_queued_requests=0 is refused by Ray Serve", id="zero-max-queued"),
    pytest.param(args(ingress={"max_queued_requests": 0}), "ingress.max_queued_requests",
                 "-1 for no bound or a positive number", id="zero-ingress-max-queued"),
    pytest.param(args(families={"llm": {"max_loaded_models": -1}}), "families.llm.max_loaded_models",
                 "greater than or equal to 1", id="negative-max-loaded-models"),
    pytest.param(args(families={"stt": {"num_cpus": -0.5}}), "families.stt.num_cpus", "greater than 0",
                 id="negative-num-cpus"),
    pytest.param(args(families={"llm": {"batch_wait_timeout_s": -0.1}}), "families.llm.batch_wait_timeout_s",
                 "greater than or equal to 0", id="negative-batch-wait"),
    pytest.param(args(families={"llm": {"autoscaling": {"max_replicas": 0}}}),
                 "families.llm.autoscaling.max_replicas", "greater than or equal to 1", id="zero-max-replicas"),
    pytest.param(args(families={"vlm": {"autoscaling": {"min_replicas": -1}}}),
                 "families.vlm.autoscaling.min_replicas", "greater than or equal to 0", id="negative-min-replicas"),
    pytest.param(args(families={"stt": {"max_replicas_per_node": 0}}), "families.stt.max_replicas_per_node",
                 "greater than or equal to 1", id="zero-replicas-per-node"),
    pytest.param(args(families={"llm": {"max_replicas_per_node": 101}}), "families.llm.max_replicas_per_node",
                 "less than or equal to 100", id="replicas-per-node-over-rays-100"),
    # replica bounds checked after the merge over FAMILY_DEFAULTS (llm max_replicas 4, vlm 2): Ray's own
    # refusal came from build_app and named a max_replicas the user never wrote
    pytest.param(args(families={"llm": {"autoscaling": {"min_replicas": 5}}}), "families.llm",
                 "families.llm.autoscaling: min_replicas=5 is above max_replicas=4 (the llm family's default",
                 id="min-replicas-over-the-default-max"),
    pytest.param(args(families={"vlm": {"autoscaling": {"min_replicas": 3}}}), "families.vlm",
                 "families.vlm.autoscaling: min_replicas=3 is above max_replicas=2", id="vlm-min-over-default-max"),
    pytest.param(args(families={"llm": {"autoscaling": {"initial_replicas": 6}}}), "families.llm",
                 "families.llm.autoscaling: initial_replicas=6 is outside min_replicas=1 .. max_replicas=4",
                 id="initial-replicas-over-the-default-max"),
    pytest.param(args(families={"stt": {"autoscaling": {"min_replicas": 2, "initial_replicas": 1}}}), "families.stt",
                 "initial_replicas=1 is outside min_replicas=2", id="initial-replicas-below-min"),
    # a key Ray's autoscaling_config does not know: Ray would drop it silently
    pytest.param(args(families={"llm": {"autoscaling": {"max_replica": 8}}}), "families.llm.autoscaling",
                 "'max_replica' (did you mean 'max_replicas'?); Ray Serve's autoscaling_config takes",
                 id="autoscaling-typo"),
    pytest.param(args(ingress={"num_replicas": 0}), "ingress.num_replicas", "greater than or equal to 1",
                 id="zero-ingress-replicas"),
    pytest.param(args(limits={"max_concurrent_requests": 0}), "limits.max_concurrent_requests",
                 "greater than or equal to 1", id="zero-max-concurrent-requests"),
    # Serve holds (then refuses as plain text) what its ingress replica takes past max_ongoing_requests: raised
    # alone, max_concurrent_requests did nothing past 512 (a chat waited 27 s with 600 in flight, got Serve's
    # text 503 with 800)
    pytest.param(args(limits={"max_concurrent_requests": 1000}), "",
                 "ingress.max_ongoing_requests=512 is not above limits.max_concurrent_requests=1000 plus "
                 "limits.max_realtime_sessions=64", id="max-concurrent-requests-past-the-ingress"),
    pytest.param(args(ingress={"max_ongoing_requests": 300}), "", "at least 321", id="ingress-below-its-limits"),
    pytest.param(args(limits={"min_sample_rate": 48000, "max_sample_rate": 44100}), "limits",
                 "limits.min_sample_rate=48000 is above limits.max_sample_rate=44100", id="sample-rates-inverted"),
    pytest.param(args(limits={"max_audio_seconds": 7200}), "limits",
                 "limits.media_worker_memory_mb=1024 is below the ~2004 MB a decoder needs for an upload of "
                 "limits.max_audio_seconds=7200 s in up to limits.max_upload_bytes=26,214,400",
                 id="audio-past-the-decoder-memory"),
    pytest.param(args(limits={"max_image_pixels": 8192 * 8192}), "",
                 "families.vlm.image_decode_memory_mb=1024 is below the ~1061 MB a decoder needs for an image of "
                 "limits.max_image_pixels=67,108,864 in up to limits.max_image_bytes=12,582,912",
                 id="images-past-the-vlm-decoder-memory"),
    pytest.param(args(models=[{**LLM, "max_new_tokens": -5}]), "models.0.max_new_tokens",
                 "greater than or equal to 1", id="negative-max-new-tokens"),
    pytest.param(args(models=[{**LLM, "generation_timeout_s": 0}]), "models.0.generation_timeout_s",
                 "greater than 0", id="zero-generation-timeout"),
    pytest.param(args(models=[LLM, {**TTS, "debug_load_delay_s": -1}]), "models.1.debug_load_delay_s",
                 "greater than or equal to 0", id="negative-load-delay"),
]


@pytest.mark.parametrize("bad,field,says", BAD_ARGS)
def test_bad_args_are_a_validation_error_naming_the_field(bad, field, says):
    with pytest.raises(ValidationError) as caught:
        AppConfig.model_validate(bad)
    locs = error_locs(caught.value)
    assert field in locs, f"expected an error at {field!r}, got {locs}"
    assert says in locs[field], locs


@pytest.mark.parametrize("bad,field,says", BAD_ARGS)
def test_build_app_refuses_bad_args_before_building_anything(bad, field, says, monkeypatch):
    """`serve run` calls build_app(args): the same error, before any deployment is bound."""
    from ray import serve

    from deployments import builder

    def bind_nothing(*args, **kwargs):
        raise AssertionError("a deployment was built before args were validated")

    monkeypatch.setattr(serve, "deployment", bind_nothing)
    with pytest.raises(ValidationError) as caught:
        builder.build_app(bad)
    assert field in error_locs(caught.value)


def bound_deployments(app) -> dict:
    """Every deployment an Application binds, by name (walks the constructor args it was bound with)."""
    from ray.serve import Application

    found = {}

    def walk(value):
        if isinstance(value, Application):
            deployment = value._bound_deployment
            found[deployment.name] = deployment
            walk(list(deployment.init_args) + list(deployment.init_kwargs.values()))
        elif isinstance(value, dict):
            walk(list(value.values()))
        elif isinstance(value, (list, tuple)):
            for item in value:
                walk(item)

    walk(app)
    return found


def test_good_args_build_one_deployment_per_family_without_a_cluster():
    from deployments.builder import build_app

    deployments = bound_deployments(build_app(args(families={"llm": {"max_ongoing_requests": 3}})))
    assert set(deployments) == {"ingress", "llm", "tts"}
    assert deployments["llm"].max_ongoing_requests == 3
    assert deployments["llm"].ray_actor_options["num_gpus"] == 0  # device: cpu


def test_what_args_accept_at_rays_bounds_ray_accepts_when_the_app_is_built():
    """The other side of the refusals above: the values next to them pass Ray's own validation in build_app,
    and any field of Ray's autoscaling_config passes through to it."""
    from deployments.builder import build_app

    deployments = bound_deployments(build_app(args(
        ingress={"max_queued_requests": 1},
        families={"llm": {"max_queued_requests": -1, "max_replicas_per_node": 100,
                          "autoscaling": {"min_replicas": 4, "initial_replicas": 4, "look_back_period_s": 3}},
                  "tts": {"max_queued_requests": 1, "autoscaling": {"max_replicas": 9, "min_replicas": 9}}})))
    assert deployments["ingress"].max_queued_requests == 1
    assert deployments["llm"].max_queued_requests == -1
    assert deployments["llm"]._replica_config.max_replicas_per_node == 100
    scaling = deployments["llm"]._deployment_config.autoscaling_config
    assert (scaling.min_replicas, scaling.initial_replicas, scaling.max_replicas) == (4, 4, 4)  # max: the default
    assert scaling.look_back_period_s == 3
    assert deployments["tts"]._deployment_config.autoscaling_config.min_replicas == 9


def test_a_model_without_base_model_never_shares_another_models_weights():
    """pool.shared_base looked up `base_model or ""`: a model with the alias "" (refused above, but the pool
    must not depend on it) made every model without base_model an adapter of it."""
    from deployments.pool import ModelPool
    from loading import ModelSpec

    base = ModelSpec(name="base", source="tiny-llm", family="llm", loading="lazy")
    other = ModelSpec(name="other", source="smollm2", family="llm", loading="lazy")
    adapter = ModelSpec(name="lora", source="tiny-llm-lora", family="llm", loading="lazy", base_model="llm")
    pool = ModelPool([base.model_copy(update={"aliases": ["", "llm"]}), other, adapter], 4)  # lazy: nothing loads
    assert pool.shared_base(other) is None
    assert pool.shared_base(adapter) == "base"  # an alias of a served model still names it


@pytest.mark.parametrize("auth,env,says", [
    pytest.param({"api_keys_file": "/nonexistent/keys.txt"}, {}, "auth.api_keys_file '/nonexistent/keys.txt' cannot",
                 id="unreadable-api-keys-file"),
    pytest.param({"admin_keys_file": "/nonexistent/admin.txt"}, {}, "auth.admin_keys_file", id="unreadable-admin-file"),
    pytest.param({}, {"MODELFLEET_API_KEYS": "short"}, "1 API key(s) are shorter than auth.min_key_chars=16",
                 id="short-api-key"),
    pytest.param({}, {"MODELFLEET_ADMIN_KEYS": "short"}, "1 admin key(s) are shorter", id="short-admin-key"),
])
def test_build_app_refuses_keys_the_ingress_would_refuse_even_when_auth_is_not_required(auth, env, says,
                                                                                       monkeypatch):
    """The ingress reads the keys when it starts and raises on these: built, they were a crash loop of every
    ingress replica Serve started."""
    from deployments.auth import AuthConfigError
    from deployments.builder import build_app

    for name in ("MODELFLEET_API_KEYS", "MODELFLEET_ADMIN_KEYS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(AuthConfigError) as caught:
        build_app(args(auth=auth))
    assert says in str(caught.value)


def test_a_key_file_saved_with_a_byte_order_mark_gives_its_keys(tmp_path, monkeypatch):
    """A key file saved as "UTF-8 with BOM" (Notepad, PowerShell 5's -Encoding utf8) kept U+FEFF on its first
    key, which then never matched (a 401 for the right key), and a '#' comment there became a key (found by
    review)."""
    from deployments.auth import AuthConfig, AuthConfigError, KeyChecker, load_admin_keys, load_keys

    for name in ("MODELFLEET_API_KEYS", "MODELFLEET_ADMIN_KEYS"):
        monkeypatch.delenv(name, raising=False)
    key = "user-key-0123456789abcdef"
    commented, keyed = tmp_path / "commented", tmp_path / "keyed"
    commented.write_bytes(f"\ufeff# one key per line\r\n{key}\r\n".encode())
    keyed.write_bytes(f"\ufeff{key}\r\n".encode())
    for file in (commented, keyed):
        config = AuthConfig(api_keys_file=str(file), admin_keys_file=str(file))
        assert load_keys(config) == load_admin_keys(config) == [key]
        assert KeyChecker(load_keys(config)).allows(f"Bearer {key}")
    (tmp_path / "latin1").write_bytes(b"caf\xe9-key-0123456789abcdef\n")  # not UTF-8: named, not a traceback
    with pytest.raises(AuthConfigError, match=r"auth.api_keys_file '.*latin1' is not UTF-8 text"):
        load_keys(AuthConfig(api_keys_file=str(tmp_path / "latin1")))
    # a home of no such user: a file that is not there, named (expanduser's RuntimeError was a traceback)
    with pytest.raises(AuthConfigError, match=r"auth.api_keys_file '~no-such-user-mf/keys' cannot be read"):
        load_keys(AuthConfig(api_keys_file="~no-such-user-mf/keys"))


def test_batch_length_ratio_is_a_finite_factor():
    """.inf passed validation, then every chat failed: the KV estimate multiplies by it (OverflowError, a 500)."""
    from pydantic import ValidationError

    from deployments.options import ChatOptions

    for bad in (float("inf"), float("nan"), 17.0, 0.5):
        with pytest.raises(ValidationError, match="batch_length_ratio"):
            ChatOptions(batch_length_ratio=bad)
    assert ChatOptions(batch_length_ratio=1.0).batch_length_ratio == 1.0


def test_a_cuda_model_on_replicas_without_a_gpu_is_a_health_note_where_device_auto_found_none():
    """args.device: cpu is refused at validation (BAD_ARGS); `auto` finds the cluster's GPUs only when the app
    is built (none here: no Ray), so a model that must be on a GPU is named in /health's notes."""
    from deployments.builder import build_app

    ingress = bound_deployments(build_app(args(device="auto", models=[{**LLM, "device": "cuda"}, TTS])))["ingress"]
    notes = ingress.init_args[2]
    assert any("'chat' have device: cuda" in note and "args.device: gpu" in note for note in notes), notes
    quiet = bound_deployments(build_app(args(device="auto")))["ingress"]
    assert not any("device: cuda" in note for note in quiet.init_args[2])


def test_messages_that_send_users_to_the_readme_name_sections_it_has():
    import re
    from pathlib import Path

    from deployments.health import DEMO_NOTE
    from deployments.limits import RequestLimits

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    headings = [h.lstrip("#").strip() for h in re.findall(r"^#+ .*$", readme, re.M)]
    cited = re.findall(r"README, '([^']+)'", DEMO_NOTE) + re.findall(r'README \("([^"]+)"', RequestLimits.__doc__ or "")
    assert len(cited) == 2, cited
    for section in cited:
        assert section in headings, (section, headings)
    assert "**Sizing them.**" in readme  # the paragraph RequestLimits' docstring names


def per_node(config_args: dict) -> dict:
    from deployments.builder import build_app

    return {name: deployment._replica_config.max_replicas_per_node
            for name, deployment in bound_deployments(build_app(config_args)).items()}


def test_cpu_replicas_of_a_family_get_a_node_each_unless_set():
    """Two CPU replicas of a family on one node split its cores between twice the threads (SmolLM2 on 2
    cores: 1.0 req/s from two against 7.2 from one, bench/REPLICAS.md): Ray places one per node. A GPU
    replica holds a GPU of its own, so GPU families get no such bound; a set value goes to Serve as is."""
    assert per_node(args()) == {"ingress": None, "llm": 1, "tts": 1}
    assert per_node(args(device="gpu")) == {"ingress": None, "llm": None, "tts": None}
    assert per_node(args(families={"llm": {"max_replicas_per_node": 2}})) == {"ingress": None, "llm": 2, "tts": 1}
    assert per_node(args(device="gpu", families={"tts": {"max_replicas_per_node": 3}}))["tts"] == 3


def test_a_family_section_given_in_part_keeps_the_other_defaults():
    config = AppConfig.model_validate(args(families={"llm": {"max_ongoing_requests": 3,
                                                             "autoscaling": {"max_replicas": 7}}}))
    llm = config.family_options(Family.LLM)
    assert llm.max_ongoing_requests == 3
    assert llm.max_batch_size == defaults(Family.LLM)["max_batch_size"]
    assert llm.autoscaling.max_replicas == 7
    assert llm.autoscaling.target_ongoing_requests == defaults(Family.LLM)["autoscaling"]["target_ongoing_requests"]
    tts = config.family_options(Family.TTS)
    assert tts.max_ongoing_requests == defaults(Family.TTS)["max_ongoing_requests"]
    assert tts.autoscaling.target_ongoing_requests == defaults(Family.TTS)["autoscaling"]["target_ongoing_requests"]
    pinned = AppConfig.model_validate(args(families={"llm": {"autoscaling": None}}))
    assert pinned.family_options(Family.LLM).autoscaling is None


def test_the_smallest_config_the_readme_allows_gets_every_documented_default():
    """Issue 18: `args` with only `models:` crashed the build (KeyError: <Family.LLM: 'llm'>)."""
    from deployments.builder import build_app

    smallest = {"models": [LLM]}
    config = AppConfig.model_validate(smallest)
    for family in Family:
        options = config.family_options(family)
        assert options.max_ongoing_requests == defaults(family)["max_ongoing_requests"]
        assert options.max_queued_requests == defaults(family)["max_queued_requests"]
        assert options.autoscaling.max_replicas == defaults(family)["autoscaling"]["max_replicas"]
    assert set(bound_deployments(build_app(smallest))) == {"ingress", "llm"}


def test_the_chat_requests_the_ingress_lets_in_never_wait_in_rays_router_by_default():
    """Past a replica's max_ongoing_requests, Ray's router retries with backoff of up to 0.5 s while the
    replica's freed places stay empty: 100 streaming clients got a quarter of 16 clients' req/s
    (bench/OVERLOAD.md). The ingress lets in at most limits.max_concurrent_requests at once, so an LLM
    replica that takes as many keeps every waiting chat in its own decode loop."""
    config = AppConfig.model_validate({"models": [LLM]})
    llm = config.family_options(Family.LLM)
    assert llm.max_ongoing_requests >= config.limits.max_concurrent_requests > llm.max_batch_size


@pytest.mark.parametrize("name", ["serve_config.yaml", "serve_config.gpu.yaml"])
def test_the_proxys_request_timeout_outlasts_a_realtime_session(name):
    """Ray's proxy ends any request (a WebSocket too) at http_options.request_timeout_s: below the session
    limit it would cut Realtime sessions short without the session's own `session_expired` event."""
    from pathlib import Path

    import yaml

    from deployments.limits import RequestLimits

    config = yaml.safe_load((Path(__file__).resolve().parents[2] / name).read_text())
    limits = RequestLimits(**config["applications"][0]["args"].get("limits", {}))
    assert config["http_options"]["request_timeout_s"] > limits.max_realtime_session_s


def test_scheduling_policy_is_fcfs_or_priority_and_voice_priority_needs_the_llm_to_order_by_it():
    assert AppConfig.model_validate(args()).families.llm.scheduling_policy == "fcfs"
    with pytest.raises(ValidationError) as caught:
        AppConfig.model_validate(args(families={"vlm": {"scheduling_policy": "lifo"}}))
    assert "families.vlm.scheduling_policy" in error_locs(caught.value)
    with pytest.raises(ValidationError, match="families.llm.scheduling_policy: priority"):
        AppConfig.model_validate(args(ingress={"voice_priority": -2}))
    config = AppConfig.model_validate(args(ingress={"voice_priority": -2},
                                           families={"llm": {"scheduling_policy": "priority"}}))
    assert config.ingress.voice_priority == -2 and config.families.vlm.scheduling_policy == "fcfs"


def test_a_request_timeout_below_a_generation_timeout_is_noted():
    """The ingress answers 503 timeout at request_timeout_s, so a model allowed to generate longer cannot
    (found by review: the shipped demo had 60 against 120, and the 503 named neither)."""
    from deployments.builder import timeout_notes

    models = [{"name": "a", "source": "x", "family": "llm"},
              {"name": "b", "source": "y", "family": "llm", "generation_timeout_s": 30}]
    notes = timeout_notes(AppConfig.model_validate({"models": models, "request_timeout_s": 60}))
    assert len(notes) == 1 and "request_timeout_s=60" in notes[0] and "'a'" in notes[0] and "'b'" not in notes[0]
    assert timeout_notes(AppConfig.model_validate({"models": models, "request_timeout_s": 120})) == []


def test_a_model_named_under_the_apps_local_models_dir_has_its_family_detected_there(tiny_llm_dirs, tmp_path,
                                                                                       monkeypatch):
    """`args.local_models_dir` is the replicas' LOCAL_MODELS_DIR (and doctor's, and fetch's): a model named by its
    directory there, without `family:`, must be found there when the app is built too. The family was detected
    with this process's LOCAL_MODELS_DIR alone (./models when unset), and `serve run` refused to build the app:
    "cannot detect the family of model 'chat' ... Set `family:`", though doctor said the model was fine."""
    from deployments.builder import build_app

    base_dir, _ = tiny_llm_dirs
    monkeypatch.delenv("LOCAL_MODELS_DIR", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no ./models here
    models_dir = base_dir.parent
    deployments = bound_deployments(build_app({"device": "cpu", "local_models_dir": str(models_dir),
                                               "models": [{"name": "chat", "source": base_dir.name}]}))
    assert set(deployments) == {"ingress", "llm"}
    assert deployments["llm"].ray_actor_options["runtime_env"]["env_vars"]["LOCAL_MODELS_DIR"] == str(models_dir)
