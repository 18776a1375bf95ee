"""GPUs per family replica: a family's own `num_gpus` (a share of one GPU, or 0 for the CPU), a family of
`device: cpu` models asking none, and a replica given no GPU seeing none (Ray >= 2.49 no longer empties
CUDA_VISIBLE_DEVICES for it: a CPU replica loaded onto cuda:0 of a GPU Ray had given another replica)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from deployments.app_config import AppConfig
from deployments.builder import FAMILY_SERVERS, gpu_shortage_notes, plan_gpus
from deployments.family_server import family_gpus
from loading import Family

REPO = Path(__file__).resolve().parents[2]


def config(**args) -> AppConfig:
    args.setdefault("models", [{"name": "chat", "source": "tiny-llm", "family": "llm"},
                               {"name": "ears", "source": "tiny-whisper", "family": "stt"}])
    return AppConfig.model_validate(args)


def actor_options(app: AppConfig, family: Family, available: float) -> dict:
    planned, _ = plan_gpus(app.device, available)
    specs = [spec for spec in app.models if spec.family is family]
    options = app.family_options(family)
    return FAMILY_SERVERS[family].deployment_options(family.value, options, family_gpus(options, planned, specs),
                                                     {})["ray_actor_options"]


def test_a_family_takes_its_own_share_of_a_gpu_or_none():
    app = config(device="gpu", families={"stt": {"num_gpus": 0.25}, "tts": {"num_gpus": 0}})
    assert actor_options(app, Family.LLM, 1)["num_gpus"] == 1
    assert actor_options(app, Family.STT, 1)["num_gpus"] == 0.25
    assert actor_options(app, Family.STT, 1).get("runtime_env") is None  # Ray sets its one GPU
    cpu = actor_options(app, Family.TTS, 1)
    assert cpu["num_gpus"] == 0 and cpu["runtime_env"]["env_vars"]["CUDA_VISIBLE_DEVICES"] == ""
    on_cpu = config(device="gpu", models=[{"name": "chat", "source": "tiny-llm", "family": "llm", "device": "cpu"}])
    assert actor_options(on_cpu, Family.LLM, 1)["num_gpus"] == 0  # every model of it on the CPU: no GPU held


@pytest.mark.parametrize(("args", "named"), [
    ({"device": "cpu", "families": {"stt": {"num_gpus": 0.5}}}, "families.stt.num_gpus=0.5"),
    ({"models": [{"name": "chat", "source": "tiny-llm", "family": "llm", "device": "cuda"}],
      "families": {"llm": {"num_gpus": 0}}}, "'chat' (llm)"),
    ({"families": {"llm": {"num_gpus": 2}}}, "less than or equal to 1"),  # a model never spans GPUs
    ({"families": {"tts": {"memory_budget_mb": float("inf")}}}, "finite number"),
    ({"ingress": {"num_cpus": float("nan")}}, "finite number"),
])
def test_contradictory_or_unbounded_gpu_and_resource_settings_are_refused_by_name(args, named):
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        config(**args)


def test_the_shortage_note_counts_shares_and_says_how_to_fit_one_gpu():
    note = gpu_shortage_notes({"llm": 1, "stt": 1, "vlm": 1}, {"llm": 1, "stt": 1, "vlm": 1}, 1)
    assert len(note) == 1 and "3 GPU(s)" in note[0] and "has 1" in note[0] and "num_gpus: 0.25" in note[0]
    assert gpu_shortage_notes({"llm": 1, "stt": 0.25, "tts": 0.25}, {"llm": 1, "stt": 1, "tts": 2}, 1) \
        and "1.75 GPU(s)" in gpu_shortage_notes({"llm": 1, "stt": 0.25, "tts": 0.25}, {"llm": 1, "stt": 1, "tts": 2}, 1)[0]
    assert gpu_shortage_notes({"llm": 0.5, "stt": 0.25, "tts": 0.25}, {"llm": 1, "stt": 1, "tts": 1}, 1) == []


PROBE = r"""
import json, os, sys
import ray
options = json.loads(sys.argv[1])
ray.init(num_cpus=4, num_gpus=2, include_dashboard=False, log_to_driver=False)

@ray.remote
class Probe:
    def look(self):
        return os.environ.get("CUDA_VISIBLE_DEVICES")

seen = {name: ray.get(Probe.options(**actor).remote().look.remote()) for name, actor in options.items()}
ray.shutdown()
print(json.dumps(seen))
"""


def test_a_replica_without_a_gpu_sees_none_on_a_gpu_node():
    """A real local Ray declaring 2 GPUs (the node's CUDA_VISIBLE_DEVICES=0,1), actors started with the builder's
    options: the CPU family's sees no device, the GPU families' one each."""
    app = config(device="gpu", families={"stt": {"num_gpus": 0.25}, "tts": {"num_gpus": 0}},
                 models=[{"name": "chat", "source": "tiny-llm", "family": "llm"},
                         {"name": "ears", "source": "tiny-whisper", "family": "stt"},
                         {"name": "voice", "source": "tiny-vits", "family": "tts"}])
    options = {family.value: actor_options(app, family, 2) for family in (Family.LLM, Family.STT, Family.TTS)}
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "0,1", "RAY_USAGE_STATS_ENABLED": "0"}
    out = subprocess.run([sys.executable, "-c", PROBE, json.dumps(options)], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=180)
    assert out.returncode == 0, out.stderr[-2000:]
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["tts"] == ""
    assert seen["llm"] in ("0", "1") and seen["stt"] in ("0", "1")


def test_the_gpu_configs_one_gpu_variant_fits_one_gpu():
    """serve_config.gpu.yaml's commented num_gpus shares, uncommented, start every family on one GPU."""
    import yaml

    text = (REPO / "serve_config.gpu.yaml").read_text()
    assert text.count("# num_gpus:") == 4
    args = yaml.safe_load(text.replace("# num_gpus:", "num_gpus:"))["applications"][0]["args"]
    app = AppConfig.model_validate(args)
    from deployments.builder import starting_replicas

    gpus = {family.value: app.family_options(family).num_gpus for family in Family}
    demand = {family.value: starting_replicas(app.family_options(family)) for family in Family}
    assert sum(gpus.values()) <= 1 and gpu_shortage_notes(gpus, demand, 1) == []
