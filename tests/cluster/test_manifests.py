"""cluster/: the Ray cluster launcher config and the KubeRay RayService parse, carry the fields their
tools require, and serve exactly our application (no drift from serve_config.gpu.yaml)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CLUSTER = REPO / "cluster"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def render_module():
    spec = importlib.util.spec_from_file_location("cluster_render", CLUSTER / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- KubeRay RayService ----------------------------------------------------------------------------------
def test_rayservice_serve_config_is_exactly_serve_config_gpu_yaml():
    service = load("rayservice.yaml")
    embedded = service["spec"]["serveConfigV2"]
    assert isinstance(embedded, str), "KubeRay wants serveConfigV2 as a YAML string"
    assert yaml.safe_load(embedded) == yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text())
    assert embedded == (REPO / "serve_config.gpu.yaml").read_text()


def test_render_check_passes_now_and_fails_on_drift():
    done = subprocess.run([sys.executable, "-m", "cluster.render", "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    render = render_module()
    manifest = (CLUSTER / "rayservice.yaml").read_text()
    drifted = manifest.replace("import_path: deployments.builder:build_app", "import_path: elsewhere:app")
    assert render.render(drifted, (REPO / "serve_config.gpu.yaml").read_text()) == manifest
    assert render.render(manifest, "applications: []\n") != manifest


def test_render_check_exits_non_zero_on_drift_and_render_repairs_it(tmp_path, capsys):
    render = render_module()
    copy = tmp_path / "rayservice.yaml"
    copy.write_text((CLUSTER / "rayservice.yaml").read_text().replace("route_prefix: /", "route_prefix: /drifted"))
    render.MANIFEST = copy
    assert render.main(["--check"]) == 1
    assert "drifted" in capsys.readouterr().err
    assert render.main([]) == 0 and render.main(["--check"]) == 0
    assert copy.read_text() == (CLUSTER / "rayservice.yaml").read_text()


def test_rayservice_carries_what_kuberay_requires():
    service = load("rayservice.yaml")
    assert service["apiVersion"] == "ray.io/v1" and service["kind"] == "RayService"
    assert service["metadata"]["name"]
    cluster = service["spec"]["rayClusterConfig"]
    # RayClusterSpec: headGroupSpec required; every group has rayStartParams and a pod template.
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), "rayStartParams values are strings"
    head_container = head["template"]["spec"]["containers"][0]
    assert head_container["image"] and head_container["name"]
    assert {"gcs-server": 6379, "dashboard": 8265, "serve": 8000} == {
        p["name"]: p["containerPort"] for p in head_container["ports"] if p["name"] in ("gcs-server", "dashboard", "serve")}
    assert head_container["resources"]["limits"].get("nvidia.com/gpu") is None  # no replicas on the head
    assert head["rayStartParams"]["num-gpus"] == "0"
    groups = cluster["workerGroupSpecs"]
    gpu = next(g for g in groups if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu"))
    assert gpu["groupName"] and isinstance(gpu["rayStartParams"], dict)
    assert 0 <= gpu["minReplicas"] <= gpu["replicas"] <= gpu["maxReplicas"]
    limits = gpu["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "1", "one GPU per worker pod: one family replica per pod"
    assert gpu["template"]["spec"]["containers"][0]["image"] == head_container["image"]
    # The Ray in the image must be the Ray the app is tested with.
    import ray

    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True
    # The serve config it carries asks for GPUs and listens where KubeRay's serve Service points.
    serve_config = yaml.safe_load(service["spec"]["serveConfigV2"])
    assert serve_config["http_options"]["host"] == "0.0.0.0" and serve_config["http_options"]["port"] == 8000
    assert serve_config["applications"][0]["args"]["device"] == "gpu"


# KubeRay's RayService CRD (ray-operator/config/crd/bases/ray.io_rayservices.yaml at ray-project/kuberay
# feeaf72f, v1.7.0-rc.0+5, 2026-08-19), gzipped: the schema the API server checks a RayService against
KUBERAY_CRD = Path(__file__).parent / "data" / "kuberay-rayservice-crd.yaml.gz"


def _kubernetes_schema(schema):
    """A CRD's structural schema as JSON Schema: int-or-string fields take either."""
    if isinstance(schema, list):
        return [_kubernetes_schema(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: _kubernetes_schema(value) for key, value in schema.items()}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    return out


def _pruned(value, schema, path=()):
    """Fields the API server would drop without a word (not in the schema, nor kept by
    x-kubernetes-preserve-unknown-fields): a misspelt field `kubectl apply` takes and KubeRay never sees."""
    if isinstance(value, list) and isinstance(schema, dict) and "items" in schema:
        return [p for i, item in enumerate(value) for p in _pruned(item, schema["items"], (*path, i))]
    if not isinstance(value, dict) or not isinstance(schema, dict) or schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found = []
    for key, item in value.items():
        if key in schema.get("properties", {}):
            found += _pruned(item, schema["properties"][key], (*path, key))
        elif isinstance(schema.get("additionalProperties"), dict):
            found += _pruned(item, schema["additionalProperties"], (*path, key))
        elif "properties" in schema and path[:1] != ("metadata",):  # ObjectMeta: the API server's own
            found.append(".".join(map(str, (*path, key))))
    return found


def test_rayservice_validates_against_kuberays_crd_with_no_field_dropped():
    """The checks above are what we know KubeRay needs; this is the CRD the API server applies: types, enums,
    required fields, and no field it would prune (a misspelling is dropped silently, not refused)."""
    import gzip

    import jsonschema

    crd = yaml.load(gzip.decompress(KUBERAY_CRD.read_bytes()), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    schema = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]
    service = load("rayservice.yaml")
    errors = [f"{'.'.join(map(str, e.path))}: {e.message[:200]}"
              for e in jsonschema.Draft7Validator(_kubernetes_schema(schema)).iter_errors(service)]
    assert not errors, errors
    assert _pruned(service, schema) == []
    # the checks bite: a wrong type, and a misspelt field that the API server would drop
    broken = yaml.safe_load(yaml.safe_dump(service))
    broken["spec"]["rayClusterConfig"]["workerGroupSpecs"][0]["maxReplicas"] = "four"
    broken["spec"]["rayClusterConfig"]["enableInTreeAutoscalling"] = True
    assert list(jsonschema.Draft7Validator(_kubernetes_schema(schema)).iter_errors(broken))
    assert _pruned(broken, schema) == ["spec.rayClusterConfig.enableInTreeAutoscalling"]


# -- Ray cluster launcher --------------------------------------------------------------------------------
def test_cluster_yaml_validates_against_rays_own_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = load("cluster.yaml")
    schema = json.loads((Path(__import__("ray.autoscaler").autoscaler.__file__).parent / "ray-schema.json").read_text())
    assert set(schema["required"]) <= set(config)
    pytest.importorskip("jsonschema")  # ray depends on it; validate_config uses it
    validate_config(prepare_config(config))  # what `ray up` does first (no cloud calls)


def test_cluster_yaml_has_a_cpu_head_and_a_gpu_worker_type():
    config = load("cluster.yaml")
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"] and t["resources"].get("GPU", 0) >= 1]
    assert gpu_types, "a GPU worker node type"
    for node_type in gpu_types:
        assert node_type["node_config"]["InstanceType"]
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"] <= config["max_workers"]
    assert any("ray start --head" in c for c in config["head_start_ray_commands"])
    assert any("ray start --address" in c for c in config["worker_start_ray_commands"])
    assert config["provider"]["type"] in ("aws", "gcp")
    assert config["docker"]["image"].startswith("rayproject/ray:")
    import ray

    assert config["docker"]["image"].split(":")[1].startswith(ray.__version__)


# -- GPU shortage notes (the builder, no Ray needed) -----------------------------------------------------
def test_builder_notes_when_families_ask_more_gpus_than_the_cluster_has():
    from deployments.app_config import AppConfig
    from deployments.builder import gpu_shortage_notes, plan_gpus, starting_replicas

    assert plan_gpus("gpu", 0)[0] == 1 and "no GPU" in plan_gpus("gpu", 0)[1][0]
    assert plan_gpus("auto", 0) == (0, []) and plan_gpus("auto", 2) == (1, [])
    whole = {"llm": 1, "stt": 1, "tts": 1}
    note = gpu_shortage_notes(whole, {"llm": 2, "stt": 1, "tts": 0}, 2)
    assert len(note) == 1 and "3 GPU(s)" in note[0] and "llm 2 x 1, stt 1 x 1" in note[0] and "has 2" in note[0]
    assert "replicas stay PENDING" in note[0]
    assert gpu_shortage_notes(whole, {"llm": 2}, 2) == []  # enough
    assert gpu_shortage_notes({"llm": 0}, {"llm": 5}, 1) == []  # CPU replicas
    assert gpu_shortage_notes(whole, {"llm": 5}, 0, told=True) == []  # plan_gpus' own note covers a cluster with none
    config = AppConfig.model_validate(yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text())["applications"][0]["args"])
    from loading import Family

    assert starting_replicas(config.family_options(Family.TTS)) == 0  # scale-to-zero family
    assert starting_replicas(config.family_options(Family.LLM)) == 1


# -- what a network-facing deployment must not leave open ---------------------------------------------------
def test_the_gpu_config_requires_api_keys_and_says_how_to_give_them(monkeypatch):
    from deployments.auth import AuthConfigError
    from deployments.builder import build_app

    args = yaml.safe_load((REPO / "serve_config.gpu.yaml").read_text())["applications"][0]["args"]
    assert args["auth"]["required"] is True
    monkeypatch.delenv("MODELFLEET_API_KEYS", raising=False)
    with pytest.raises(AuthConfigError, match="MODELFLEET_API_KEYS=.* where Ray starts .*never that of `serve deploy`"):
        build_app(args)
    monkeypatch.setenv("MODELFLEET_API_KEYS", "short")
    with pytest.raises(AuthConfigError, match="min_key_chars"):
        build_app(args)
    monkeypatch.setenv("MODELFLEET_API_KEYS", "a-long-enough-key-0123456789")
    build_app(args)  # binds every deployment; nothing is deployed without a cluster


def before_ray_start(config: dict, commands: str) -> str:
    """What a node's start command runs before `ray start`: the environment Ray's processes start with."""
    start = next(c for c in config[commands] if "ray start" in c)
    return start[:start.index("ray start")]


@pytest.mark.parametrize("commands", ["head_start_ray_commands", "worker_start_ray_commands"])
def test_ray_starts_with_the_api_keys_so_the_workers_that_build_and_serve_the_app_have_them(commands, tmp_path):
    """`serve deploy` only sends the config: build_app and the ingress run in Ray workers, whose environment
    is that of `ray start`. The README's `MODELFLEET_API_KEYS=<key> serve deploy` deployed an app that failed
    with 'auth.required is set but no API key is configured'. The start command itself is run here, with
    `ray start` swapped for reading the keys as the builder does, from the file file_mounts puts on the node."""
    from deployments.auth import AuthConfig

    config = load("cluster.yaml")
    before_ray = before_ray_start(config, commands)
    assert "MODELFLEET_API_KEYS=" in before_ray
    remote = next(r for r, local in config["file_mounts"].items() if Path(local) == Path("cluster/secrets"))
    assert "~/modelfleet-secrets/api_keys" in before_ray and remote == "~/modelfleet-secrets"
    assert "cluster/secrets/" in (REPO / ".gitignore").read_text().splitlines()  # never committed, never in ~/modelfleet
    secrets = tmp_path / remote.removeprefix("~/")
    secrets.mkdir()
    keys = ["a-long-enough-key-0123456789", "another-long-key-abcdefghij"]
    (secrets / "api_keys").write_text(f"# rotated 2025-01-01\n{keys[0]}\n\n  # old\n{keys[1]}\n")
    builder = tmp_path / "read_keys.py"  # in place of `ray start`: what build_app and the ingress read
    builder.write_text("from deployments.auth import AuthConfig, load_keys\n"
                       f"print(load_keys(AuthConfig.model_validate({AuthConfig(required=True).model_dump()!r})))\n")
    env = {"HOME": str(tmp_path), "PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}
    done = subprocess.run(["bash", "-c", f"{before_ray}{sys.executable} {builder}"], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(keys)
    readme = (CLUSTER / "README.md").read_text()
    commands_shown = [line for line in readme.splitlines() if line.startswith("    ")]  # its command blocks
    assert not any("MODELFLEET_API_KEYS=" in line and "serve deploy" in line for line in commands_shown)


# serve.env's settings that hold on a cluster as on one machine. Its others stay Ray's there: HAProxy and the
# throughput-optimized mode change the request path (README: "On a cluster the manifests keep Ray's defaults"),
# its slower timers trade reaction time that an autoscaling cluster needs, and its 2 s draining suits HAProxy on
# the same machine, not a cloud load balancer.
CLUSTER_SETTINGS = ["RAY_worker_niceness"]


@pytest.mark.parametrize("key", CLUSTER_SETTINGS)
def test_every_node_starts_ray_with_serve_envs_cpu_priorities(key, tmp_path):
    """The twenty-second session set RAY_worker_niceness=0 in serve.env (Ray's workers, the replicas' event loops
    among them, ran at nice 15 below Ray's daemons), and neither manifest carried it: every replica on a cluster
    stayed at 15. Each pod's container and each node's `ray start` now set serve.env's value; the start command
    is run here with `ray start` swapped for printing the variable."""
    from deployments.serve_env import read_serve_env

    wanted = read_serve_env()[key]
    service = load("rayservice.yaml")["spec"]["rayClusterConfig"]
    for group in [service["headGroupSpec"], *service["workerGroupSpecs"]]:
        env = {e["name"]: e.get("value") for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env.get(key) == wanted, (group.get("groupName", "head"), env.get(key), wanted)
    config = load("cluster.yaml")
    (tmp_path / "modelfleet-secrets").mkdir()
    (tmp_path / "modelfleet-secrets" / "api_keys").write_text("a-long-enough-key-0123456789\n")
    for commands in ("head_start_ray_commands", "worker_start_ray_commands"):
        done = subprocess.run(["bash", "-c", f"{before_ray_start(config, commands)}printenv {key}"], cwd=REPO,
                              env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                              timeout=60)
        assert (done.returncode, done.stdout.strip()) == (0, wanted), (commands, done.stderr)


def test_rays_dashboard_is_never_opened_to_the_network():
    head = " ".join(load("cluster.yaml")["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head
    policy = load("networkpolicy.yaml")
    assert policy["kind"] == "NetworkPolicy" and policy["spec"]["policyTypes"] == ["Ingress"]
    open_to_all = [rule for rule in policy["spec"]["ingress"] if "from" not in rule]
    assert [port["port"] for rule in open_to_all for port in rule["ports"]] == [8000]  # Serve only
    operator = [rule for rule in policy["spec"]["ingress"] if {8265, 52365} <= {p["port"] for p in rule.get("ports", [])}]
    assert operator and operator[0]["from"][0]["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/name": "kuberay-operator"}
    service = load("rayservice.yaml")
    for template in [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"],
                     *(group["template"] for group in service["spec"]["rayClusterConfig"]["workerGroupSpecs"])]:
        assert template["metadata"]["labels"] == policy["spec"]["podSelector"]["matchLabels"]
        env = {e["name"]: e for e in template["spec"]["containers"][0]["env"]}
        assert env["MODELFLEET_API_KEYS"]["valueFrom"]["secretKeyRef"]["name"] == "modelfleet-api-keys"
