"""The application on a real multi-node Ray cluster: GPU placement, autoscaling, node loss.

One machine, several Ray nodes (`ray.cluster_utils.Cluster`): a head with no GPU and two worker
nodes that each declare one GPU (Ray accepts `num_gpus` without physical GPUs). Every node binds
127.0.0.2 (a loopback address that Ray does not rewrite to the machine's public IP, as it does
127.0.0.1), the HTTP proxy 127.0.0.1: no traffic leaves loopback. The models are the tiny
random-weight ones; they fall back to CPU because no CUDA is present, and /health says so.

Timings printed here (scale-up, scale-down, node replacement) are the ones cluster/README.md quotes.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import pytest
import requests

from deployments.serve_env import unclaimed_port

pytestmark = pytest.mark.cluster

NODE_IP = "127.0.0.2"
GPU_WORKERS = 2


def free_port() -> int:
    return unclaimed_port()  # outside the ephemeral range: see serve_env.unclaimed_port


@contextlib.contextmanager
def no_address_file():
    """cluster_utils records its head in /tmp/ray/ray_current_cluster, where any plain `ray.init()`
    on this machine (another test run) would find and join it; and its shutdown deletes that file
    whoever wrote it. Neither belongs in a test."""
    import ray._common.utils as common_utils
    import ray._private.utils as private_utils

    saved = private_utils.write_ray_address, common_utils.reset_ray_address
    private_utils.write_ray_address = common_utils.reset_ray_address = lambda *a, **k: None
    try:
        yield
    finally:
        private_utils.write_ray_address, common_utils.reset_ray_address = saved


@dataclass
class Fleet:
    cluster: object
    url: str
    models_dir: str
    workers: list = field(default_factory=list)

    def add_gpu_worker(self):
        node = self.cluster.add_node(num_cpus=2, num_gpus=1, node_ip_address=NODE_IP)
        self.workers.append(node)
        return node


@pytest.fixture(scope="module")
def fleet(tmp_path_factory):
    import ray
    from ray import serve
    from ray.cluster_utils import Cluster

    assert not ray.is_initialized(), "another test left Ray connected"
    models_dir = str(tmp_path_factory.mktemp("cluster-models"))
    started = time.monotonic()
    with no_address_file():
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 2, "num_gpus": 0, "node_ip_address": NODE_IP, "include_dashboard": False,
            # notice a dead node in ~3 s instead of ~30 s
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 3},
        })
    fleet = Fleet(cluster, "", models_dir)
    try:
        for _ in range(GPU_WORKERS):
            fleet.add_gpu_worker()
        ray.init(address=cluster.address, _node_ip_address=NODE_IP, log_to_driver=False,
                 runtime_env={"env_vars": {"LOCAL_MODELS_DIR": models_dir}})
        port = free_port()
        # One proxy, on the head: proxies on every node of one machine would fight over the port.
        serve.start(proxy_location="HeadOnly",
                    http_options={"host": "127.0.0.1", "port": port, "request_timeout_s": 60})
        fleet.url = f"http://127.0.0.1:{port}"
        print(f"\n[cluster] head + {GPU_WORKERS} GPU workers up in {time.monotonic() - started:.1f} s; "
              f"resources {ray.cluster_resources()}")
        yield fleet
    finally:
        with contextlib.suppress(Exception):
            serve.shutdown()
        ray.shutdown()
        with no_address_file():
            cluster.shutdown()


# -- helpers -------------------------------------------------------------------------------------------
def llm_args(models_dir: str, autoscaling: dict, **extra) -> dict:
    return {
        "device": "gpu", "local_models_dir": models_dir, "request_timeout_s": 15, "status_timeout_s": 3,
        # eager: a new replica turns RUNNING (and gets traffic) only once its model is in memory
        "models": [{"name": "tiny-llm", "source": "tiny-llm", "build_tiny": "llm", "max_new_tokens": 64,
                    "loading": "eager", "generation_timeout_s": 10}],  # within request_timeout_s: no /health note
        # Ray waits graceful_shutdown_timeout_s even to stop a replica still pending for a GPU
        "families": {"llm": {"num_cpus": 0.25, "autoscaling": autoscaling, "graceful_shutdown_timeout_s": 2}},
        **extra,
    }


def deploy(fleet: Fleet, name: str, args: dict, *, wait_running: bool = True, probe_health: bool = True) -> str:
    """Deploy without blocking on RUNNING (some of these apps never get there), then wait for what the
    test needs. `probe_health=False`: /health calls every family and would wake a scaled-to-zero one."""
    from ray import serve

    from deployments.builder import build_app

    serve._run(build_app(args), name=name, route_prefix=f"/{name}", _blocking=False)
    url = f"{fleet.url}/{name}"
    if probe_health:
        wait(lambda: requests.get(url + "/health", timeout=10).status_code == 200, 120, f"{name} answers /health")
    else:
        wait(lambda: f"/{name}" in requests.get(fleet.url + "/-/routes", timeout=10).json(), 120, f"route /{name}")
    if wait_running:
        wait(lambda: app_status(name) == "RUNNING", 120, f"{name} RUNNING")
    return url


def wait(predicate, timeout: float, what: str, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException, ValueError, KeyError):
            if predicate():
                return time.monotonic()
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


def app_status(app: str) -> str:
    from ray import serve

    status = serve.status().applications.get(app)
    return str(getattr(status.status, "value", status.status)) if status else "MISSING"


def replica_states(app: str, deployment: str = "llm") -> dict[str, int]:
    from ray import serve

    status = serve.status().applications[app].deployments[deployment]
    return {str(getattr(state, "value", state)): count for state, count in status.replica_states.items() if count}


def replica_views(app: str, want: int, deployment: str = "llm", timeout: float = 60) -> dict[int, dict]:
    """Each replica's own report (pid, node, CUDA_VISIBLE_DEVICES, device plan) once its model is ready,
    by calling status through a handle until `want` distinct ready replicas have answered."""
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app)
    seen: dict[int, dict] = {}
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        info = handle.status.remote().result(timeout_s=30)[0]
        seen[info["replica"]["pid"]] = info
        if len(seen) >= want and all(v["state"] == "ready" for v in seen.values()):
            break
        time.sleep(0.1)
    return seen


def alive_actor_nodes(class_prefix: str) -> list[str]:
    """Node ids of the live actors whose class name starts with `class_prefix` (Serve replicas are
    `ServeReplica:<app>:<deployment>`), from the GCS actor table (no dashboard needed)."""
    import ray

    return [a["Address"]["NodeID"] for a in ray._private.state.actors().values()
            if a["State"] == "ALIVE" and a["ActorClassName"].startswith(class_prefix)]


def chat(url: str, max_tokens: int = 32, timeout: float = 40) -> requests.Response:
    return requests.post(url + "/v1/chat/completions", timeout=timeout, json={
        "model": "tiny-llm", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": max_tokens})


class Load:
    """`threads` clients sending chat requests back to back until stopped (or `max_requests` each).
    Every outcome is recorded: (start, end, HTTP status or the client exception's name, body)."""

    def __init__(self, url: str, threads: int, max_requests: int = 400, max_tokens: int = 48):
        self.url, self.max_requests, self.max_tokens = url, max_requests, max_tokens
        self.stop = threading.Event()
        self.results: list[tuple[float, float, object, dict | None]] = []
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(threads)]

    def _run(self):
        for _ in range(self.max_requests):
            if self.stop.is_set():
                return
            started = time.monotonic()
            try:
                response = chat(self.url, self.max_tokens)
                outcome, body = response.status_code, response.json()
            except Exception as exc:  # a hang shows up as the client timeout
                outcome, body = type(exc).__name__, None
            with self._lock:
                self.results.append((started, time.monotonic(), outcome, body))

    def __enter__(self):
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        assert not any(t.is_alive() for t in self._threads), "a client never returned"

    def outcomes(self) -> Counter:
        return Counter(outcome for _, _, outcome, _ in self.results)


# -- placement -----------------------------------------------------------------------------------------
def test_one_replica_per_gpu_across_worker_nodes_each_seeing_one_device(fleet):
    """num_gpus=1 replicas land one per declared GPU, on different worker nodes; each sees exactly one
    CUDA device id (Ray's CUDA_VISIBLE_DEVICES), plans cuda:0, and falls back to CPU without CUDA."""
    from ray import serve

    url = deploy(fleet, "fleet", llm_args(fleet.models_dir, {"min_replicas": GPU_WORKERS, "max_replicas": GPU_WORKERS}))
    try:
        assert replica_states("fleet") == {"RUNNING": GPU_WORKERS}
        views = replica_views("fleet", GPU_WORKERS)
        assert len(views) == GPU_WORKERS, views
        worker_ids = {node.node_id for node in fleet.workers}
        nodes = [view["replica"]["node_id"] for view in views.values()]
        assert len(set(nodes)) == GPU_WORKERS and set(nodes) <= worker_ids, (nodes, worker_ids)
        for view in views.values():
            devices = view["replica"]["cuda_visible_devices"]
            assert devices is not None and len(devices.split(",")) == 1, view
            assert view["device"] == "cpu"
            assert view["device_reason"] == f"no CUDA device visible (CUDA_VISIBLE_DEVICES={devices!r})"
        # /health reads serve.status() (cached 1 s), which can trail the replicas' own state by a moment
        wait(lambda: requests.get(url + "/health", timeout=30).json()["models"]["tiny-llm"]["deployment"]["replicas"]
             == {"RUNNING": GPU_WORKERS}, 30, "/health to show both replicas RUNNING")
        health = requests.get(url + "/health", timeout=30).json()
        model = health["models"]["tiny-llm"]
        assert health["status"] == "ok" and "notes" not in health, health
        assert model["device"] == "cpu" and "no CUDA device visible" in model["device_reason"]
        assert model["deployment"]["replicas"] == {"RUNNING": GPU_WORKERS}
        assert model["deployment"]["replica_resources"] == {"CPU": 0.25, "GPU": 1}
        assert model["deployment"]["cluster_gpus"] == {"total": GPU_WORKERS, "free": 0}
        assert chat(url).status_code == 200
        print(f"\n[placement] replicas on nodes {[n[:8] for n in nodes]}, CUDA_VISIBLE_DEVICES "
              f"{[v['replica']['cuda_visible_devices'] for v in views.values()]}")

        # Every GPU is taken: a family that asks for one more is reported, not left pending in silence.
        starved = deploy(fleet, "starved", llm_args(fleet.models_dir, None, request_timeout_s=3), wait_running=False)
        health = requests.get(starved + "/health", timeout=30).json()
        model = health["models"]["tiny-llm"]
        assert health["status"] == "degraded" and model["state"] == "unavailable", health
        assert "PENDING" in model["error"] and "GPU: 1" in model["error"], model["error"]
        assert f"the cluster has {GPU_WORKERS} GPU(s), 0 free" in model["error"], model["error"]
        assert model["deployment"]["replicas"] == {"STARTING": 1}
        started = time.monotonic()
        response = chat(starved)
        assert time.monotonic() - started < 10, "must not hang"
        assert response.status_code == 503 and "pending for resources" in response.json()["error"]["message"]
        print(f"[placement] starved family: {model['error']}")
    finally:
        for app in ("starved", "fleet"):
            serve.delete(app)


def test_gpu_shortage_at_build_time_is_a_note_in_health(fleet):
    """More replicas asked at deploy time than the cluster has GPUs: the builder's note says how many."""
    from ray import serve

    url = deploy(fleet, "greedy", llm_args(fleet.models_dir, {"min_replicas": GPU_WORKERS + 1,
                                                              "max_replicas": GPU_WORKERS + 1}), wait_running=False)
    try:
        wait(lambda: replica_states("greedy") == {"RUNNING": GPU_WORKERS, "STARTING": 1}, 60, "2 running, 1 pending")
        # the placed replicas serve meanwhile
        wait(lambda: requests.get(url + "/health", timeout=30).json()["models"]["tiny-llm"]["state"] == "ready",
             60, "model ready")
        health = requests.get(url + "/health", timeout=30).json()
        assert any(f"ask for {GPU_WORKERS + 1} GPU(s)" in note and f"has {GPU_WORKERS}" in note
                   for note in health["notes"]), health
        assert health["models"]["tiny-llm"]["deployment"]["status"] == "UPDATING"
        assert chat(url).status_code == 200
    finally:
        serve.delete("greedy")


# -- autoscaling ---------------------------------------------------------------------------------------
def test_a_family_scales_up_under_load_and_back_down_and_every_request_succeeds(fleet):
    from ray import serve

    scaling = {"min_replicas": 1, "max_replicas": GPU_WORKERS, "target_ongoing_requests": 1,
               "upscale_delay_s": 0.5, "downscale_delay_s": 3, "metrics_interval_s": 0.5, "look_back_period_s": 2}
    url = deploy(fleet, "scaling", llm_args(fleet.models_dir, scaling))
    try:
        assert replica_states("scaling") == {"RUNNING": 1}
        with Load(url, threads=4) as load:
            started = time.monotonic()
            decided = wait(lambda: sum(replica_states("scaling").values()) == GPU_WORKERS, 90, "scale-up decision")
            scaled_up = wait(lambda: replica_states("scaling").get("RUNNING", 0) == GPU_WORKERS, 90, "scale-up")
            time.sleep(3)  # keep the load on both replicas for a while
        stopped = time.monotonic()
        scaled_down = wait(lambda: replica_states("scaling") == {"RUNNING": 1}, 90, "scale-down")
        outcomes = load.outcomes()
        print(f"\n[autoscaling] 1 -> {GPU_WORKERS} replicas in {scaled_up - started:.1f} s under 4 concurrent "
              f"clients (replica added after {decided - started:.1f} s, then {scaled_up - decided:.1f} s to start "
              f"and load its model); back to 1 in {scaled_down - stopped:.1f} s after the load stopped "
              f"(downscale_delay_s=3); requests: {dict(outcomes)}")
        assert set(outcomes) == {200}, (outcomes, [r[3] for r in load.results if r[2] != 200][:3])
        assert sum(outcomes.values()) >= 8
        assert chat(url).status_code == 200
    finally:
        serve.delete("scaling")


def test_a_family_scaled_to_zero_cold_starts_on_the_first_request(fleet):
    """min_replicas: 0 frees the family's GPU when idle; the next request waits for a replica to start
    and load its model (the cold start), then succeeds."""
    from ray import serve

    scaling = {"min_replicas": 0, "max_replicas": 1, "upscale_delay_s": 0, "downscale_delay_s": 1,
               "metrics_interval_s": 0.5, "look_back_period_s": 1}
    url = deploy(fleet, "sleepy", llm_args(fleet.models_dir, scaling, request_timeout_s=120), probe_health=False)
    try:
        assert replica_states("sleepy") == {}
        started = time.monotonic()
        response = chat(url, timeout=150)
        cold = time.monotonic() - started
        assert response.status_code == 200, response.text
        started = time.monotonic()
        assert chat(url).status_code == 200
        warm = time.monotonic() - started
        idle = time.monotonic()
        asleep = wait(lambda: replica_states("sleepy") == {}, 60, "back to zero replicas")
        # a health probe reports the family as asleep without waking it
        for _ in range(3):
            health = requests.get(url + "/health", timeout=10).json()
            assert health["status"] == "ok" and health["models"]["tiny-llm"]["state"] == "scaled_to_zero", health
            time.sleep(1)
        assert replica_states("sleepy") == {}
        print(f"\n[scale-to-zero] first request after zero replicas: {cold:.1f} s (cold start), next one "
              f"{warm:.2f} s; back to zero {asleep - idle:.1f} s after the last request (downscale_delay_s=1)")
    finally:
        serve.delete("sleepy")


# -- node loss -----------------------------------------------------------------------------------------
def test_losing_a_worker_node_keeps_the_app_answering_and_its_replica_is_replaced(fleet):
    from ray import serve

    url = deploy(fleet, "sturdy", llm_args(fleet.models_dir, {"min_replicas": GPU_WORKERS, "max_replicas": GPU_WORKERS}))
    try:
        ingress_nodes = set(alive_actor_nodes("ServeReplica:sturdy:ingress"))
        llm_nodes = set(alive_actor_nodes("ServeReplica:sturdy:llm"))
        # The worker to lose holds an LLM replica; not the ingress (losing the only ingress replica is
        # an outage of the whole app, which more ingress replicas avoid; not what this test measures).
        victim = next(n for n in fleet.workers if n.node_id in llm_nodes and n.node_id not in ingress_nodes)
        with Load(url, threads=3, max_tokens=24) as load:
            time.sleep(2)
            killed = time.monotonic()
            fleet.cluster.remove_node(victim, allow_graceful=False)
            fleet.workers.remove(victim)
            noticed = wait(lambda: replica_states("sturdy").get("RUNNING", 0) < GPU_WORKERS, 60, "Serve notices")
            time.sleep(2)  # serve from the surviving replica alone for a moment
            added = time.monotonic()
            new_node = fleet.add_gpu_worker()  # what KubeRay or the cluster launcher does for a lost pod
            joined = time.monotonic()
            replaced = wait(lambda: replica_states("sturdy") == {"RUNNING": GPU_WORKERS}
                            and new_node.node_id in alive_actor_nodes("ServeReplica:sturdy:llm"), 120, "replacement")
            time.sleep(2)
        outcomes = load.outcomes()
        print(f"\n[node loss] Serve noticed the lost replica {noticed - killed:.1f} s after the node died; "
              f"new GPU node joined in {joined - added:.1f} s; replacement replica RUNNING "
              f"{replaced - joined:.1f} s after the node joined ({replaced - killed:.1f} s after the loss, "
              f"including a deliberate 2 s with one replica); requests: {dict(outcomes)}, 503 codes: "
              f"{dict(Counter(body['error']['code'] for _, _, outcome, body in load.results if outcome == 503))}")
        assert set(outcomes) <= {200, 503}, outcomes  # no 500, no client timeout: nothing hangs
        for _, _, outcome, body in load.results:
            if outcome == 503:
                assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]
        served_alone = [r for r in load.results if r[2] == 200 and noticed <= r[0] and r[1] <= added]
        assert served_alone, "the surviving replica answered while the other was gone"
        assert outcomes[200] >= 0.8 * sum(outcomes.values()), outcomes
        assert chat(url).status_code == 200
    finally:
        serve.delete("sturdy")
