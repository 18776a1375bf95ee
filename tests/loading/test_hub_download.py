"""The online path of loading/resolve.py against a fake Hub on loopback (tests/loading/fake_hub.py).

Issue: downloads (`resolve_source` -> `download` -> `snapshot_download`, used by `load_model` and
`modelfleet fetch`) were never exercised, because no Hub is reachable from the test machines.
huggingface_hub reads HF_ENDPOINT once, at import, so the code under test runs in subprocesses
pointed at the fake Hub; the server logs every request, so the tests see what was asked, in which
order, and how often. Nothing of loading/ is mocked.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from loading import ModelSpec, load_model
from loading.resolve import resolve_source
from loading.settings import Settings
from loading.tiny import stage_in_hf_cache

from fake_hub import FakeHub
from loading_testutil import Timer, record, set_adapter_base

REPO_ROOT = Path(__file__).resolve().parents[2]

# Run in a fresh interpreter: one or more operations of loading/ against the endpoint in HF_ENDPOINT.
# Log records carry their wall-clock time, to be ordered against the fake Hub's request times.
DRIVER = r"""
import json, logging, pathlib, sys, time
logging.basicConfig(level=logging.WARNING, format="%(created).6f %(levelname)s %(name)s: %(message)s")
from loading.adapters import read_adapter, resolve_base
from loading.resolve import download_size_bytes, resolve_source
from loading.settings import Settings

settings = Settings.from_env()
results = []
for op in json.loads(sys.argv[1]):
    out = {"op": op["op"], "t_start": time.time()}
    if op.get("ready_file"):
        pathlib.Path(op["ready_file"]).touch()
    try:
        if op["op"] == "size":
            out["size"] = download_size_bytes(op["source"], op.get("revision"), settings.hf_hub_cache)
        else:
            if op["op"] == "resolve":
                local_dir = pathlib.Path(op["local_dir"]) if op.get("local_dir") else None
                res = resolve_source(op["source"], settings, revision=op.get("revision"), local_dir=local_dir)
            else:  # "base": the base model of the adapter directory op["source"]
                res = resolve_base(read_adapter(pathlib.Path(op["source"])), settings)
            out.update(path=str(res.path), origin=res.origin)
    except Exception as exc:
        out.update(error=type(exc).__name__, message=str(exc))
    out["t_end"] = time.time()
    results.append(out)
print(json.dumps(results))
"""

DOWNLOAD_LOG = re.compile(
    r"^(?P<at>\d+\.\d+) WARNING loading\.resolve: Downloading (?P<what>model|base model) (?P<repo>\S+) "
    r"\((?P<size>[\d.]+ GB|unknown size)\) from the Hub into (?P<into>.+)$",
    re.MULTILINE,
)


def _padded(model_dir: Path, total_bytes: int) -> dict[str, bytes]:
    """model_dir's files plus extra/padding.dat, for a repo of exactly total_bytes: big enough that the
    logged size (GB, 2 decimals) is not 0.00 and says whether the count is right. (Not a .bin: beside
    model.safetensors, a download leaves PyTorch pickles out.)"""
    files = {p.relative_to(model_dir).as_posix(): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()}
    pad = total_bytes - sum(map(len, files.values()))
    assert pad > 0
    files["extra/padding.dat"] = bytes(range(256)) * (pad // 256) + bytes(pad % 256)
    return files


@pytest.fixture
def hub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def online(isolated_env, hub) -> dict:
    """The environment of a subprocess that sees the fake Hub as the Hub, and the tmp dirs of isolated_env."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")}
    env.update(
        HF_ENDPOINT=hub.url,
        NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost",
        HF_HUB_DISABLE_PROGRESS_BARS="1", HF_HUB_DISABLE_TELEMETRY="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    )
    return env


def _start(env: dict, *ops: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(list(ops))], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(proc: subprocess.Popen) -> tuple[list[dict], str]:
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stdout + stderr
    return json.loads(stdout.strip().splitlines()[-1]), stderr


def _run(env: dict, *ops: dict) -> tuple[list[dict], str]:
    return _finish(_start(env, *ops))


def _ok(result: dict) -> dict:
    assert "error" not in result, f"{result['error']}: {result['message']}"
    return result


def _snapshot_files(snapshot: Path) -> dict[str, bytes]:
    return {p.relative_to(snapshot).as_posix(): p.read_bytes() for p in snapshot.rglob("*") if p.is_file()}


def test_download_announced_with_size_then_loaded_then_cached(tiny, hub, online, isolated_env):
    repo = "modelfleet-test/hub-llm"
    sha = hub.add_repo(repo, _padded(tiny["llm"], 31_000_000))
    served = hub.files(repo)
    total = hub.total_bytes(repo)

    with Timer() as t:
        (before, resolved, after), stderr = _run(
            online, {"op": "size", "source": repo}, {"op": "resolve", "source": repo}, {"op": "size", "source": repo}
        )
    record("hub download: size + resolve (31 MB) + size, subprocess", t.seconds)
    record("hub download: resolve_source downloading 31 MB", resolved["t_end"] - resolved["t_start"])

    # download_size_bytes counts every byte still to fetch (dry run), then nothing once cached.
    assert _ok(before)["size"] == total
    assert _ok(after)["size"] == 0

    snapshot = isolated_env["hub_cache"] / "models--modelfleet-test--hub-llm" / "snapshots" / sha
    assert _ok(resolved)["origin"] == "Hub download"
    assert Path(resolved["path"]) == snapshot
    assert _snapshot_files(snapshot) == {path: f.data for path, f in served.items()}
    assert (isolated_env["hub_cache"] / "models--modelfleet-test--hub-llm" / "refs" / "main").read_text() == sha

    # One announcement, with the served size, logged before the first byte was asked for.
    (announced,) = DOWNLOAD_LOG.finditer(stderr)
    assert announced["what"] == "model" and announced["repo"] == repo
    assert announced["size"] == f"{total / 1e9:.2f} GB" == "0.03 GB"
    assert Path(announced["into"]) == isolated_env["hub_cache"]
    file_gets = hub.log(route="file", method="GET")
    assert float(announced["at"]) < min(r.at for r in file_gets)
    # ... and every file was fetched exactly once, at the commit main pointed to.
    assert hub.file_gets(repo) == {path: 1 for path in served}
    assert {r.revision for r in file_gets} == {sha}

    # load_model finds the download in the HF cache (in this process: no endpoint needed).
    with Timer() as t:
        loaded = load_model(ModelSpec(name="hub-llm", source=repo, device="cpu"))
    record("hub download: load_model from the downloaded snapshot", t.seconds)
    assert loaded.report.resolved_from == "HF cache" and Path(loaded.report.resolved_path) == snapshot
    assert loaded.report.family == "llm" and loaded.report.device == "cpu"
    ids = loaded.processor("hello", return_tensors="pt")
    assert loaded.model(**ids).logits.shape[:2] == ids["input_ids"].shape

    # A fresh process resolves it from the cache without a single request to the Hub.
    requests_so_far = len(hub.log())
    (again,), stderr = _run(online, {"op": "resolve", "source": repo})
    assert _ok(again)["origin"] == "HF cache" and Path(again["path"]) == snapshot
    assert len(hub.log()) == requests_so_far
    assert not DOWNLOAD_LOG.search(stderr)


def test_concurrent_resolvers_download_once(tiny, hub, online, isolated_env, tmp_path):
    repo = "modelfleet-test/race-llm"
    sha = hub.add_repo(repo, tiny["llm"])
    hub.hold_downloads()  # the first file GET waits until every process is resolving
    ready = [tmp_path / f"ready-{i}" for i in range(3)]
    procs = []
    try:
        with Timer() as t:
            procs = [_start(online, {"op": "resolve", "source": repo, "ready_file": str(r)}) for r in ready]
            deadline = time.monotonic() + 45
            while not (hub.first_file_get.is_set() and all(r.exists() for r in ready)):
                assert time.monotonic() < deadline, "processes did not start resolving"
                assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
                time.sleep(0.02)
            time.sleep(0.3)  # let the late ones reach the lock
            released_at = time.time()
            hub.release_downloads()
            outcomes = [_finish(p) for p in procs]
    finally:
        hub.release_downloads()
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    record("hub download: 3 concurrent resolvers, one download", t.seconds)

    results = [_ok(result) for (result,), _ in outcomes]
    # All were resolving while the (held) download was in flight ...
    assert all(r["t_start"] < released_at for r in results)
    # ... all got the same complete snapshot ...
    snapshot = isolated_env["hub_cache"] / "models--modelfleet-test--race-llm" / "snapshots" / sha
    assert {Path(r["path"]) for r in results} == {snapshot}
    assert _snapshot_files(snapshot) == {path: f.data for path, f in hub.files(repo).items()}
    assert {r["origin"] for r in results} <= {"Hub download", "HF cache"}
    # ... and under the lock only one of them sized, announced and fetched it: each file once.
    assert sum(len(DOWNLOAD_LOG.findall(stderr)) for _, stderr in outcomes) == 1
    assert hub.file_gets(repo) == {path: 1 for path in hub.files(repo)}
    assert len(hub.log(route="info")) == 2  # the one dry run and the one download


def test_revision_is_pinned(tiny, hub, online, isolated_env):
    repo = "modelfleet-test/pinned-llm"
    files = {p.name: p.read_bytes() for p in tiny["llm"].iterdir() if p.is_file()}
    main_sha = hub.add_repo(repo, files)
    config = json.loads(files["config.json"])
    v1_files = {**files, "config.json": json.dumps({**config, "modelfleet_commit": "v1"}).encode()}
    v1_sha = hub.add_repo(repo, v1_files, branch=None, tags=("v1",))  # an older commit, not on main
    assert v1_sha != main_sha
    snapshots = isolated_env["hub_cache"] / "models--modelfleet-test--pinned-llm" / "snapshots"

    by_sha, by_tag, main_size, by_default = _run(
        online,
        {"op": "resolve", "source": repo, "revision": v1_sha},
        {"op": "resolve", "source": repo, "revision": "v1"},
        {"op": "size", "source": repo},
        {"op": "resolve", "source": repo},
    )[0]

    def asked(result: dict) -> list:
        return [r for r in hub.log() if result["t_start"] <= r.at <= result["t_end"] and r.route != "other"]

    # A commit sha is requested as such: no branch lookup, every URL carries the sha.
    assert _ok(by_sha)["origin"] == "Hub download" and Path(by_sha["path"]) == snapshots / v1_sha
    assert asked(by_sha) and {r.revision for r in asked(by_sha)} == {v1_sha}
    assert not [r for r in asked(by_sha) if r.route == "info"]
    assert json.loads((snapshots / v1_sha / "config.json").read_text())["modelfleet_commit"] == "v1"
    assert Counter(r.file for r in asked(by_sha) if r.route == "file" and r.method == "GET") == {p: 1 for p in files}

    # A tag is resolved by the Hub to its commit, which is already here: nothing is fetched again.
    assert _ok(by_tag)["origin"] == "Hub download" and Path(by_tag["path"]) == snapshots / v1_sha
    assert [(r.route, r.revision) for r in asked(by_tag) if r.route == "info"] == [("info", "v1")] * 2
    assert not [r for r in asked(by_tag) if r.method == "GET" and r.route == "file"]
    assert (snapshots.parent / "refs" / "v1").read_text() == v1_sha

    # No revision means main: another commit, downloaded next to the pinned one. Only its config.json
    # differs, and only those bytes are counted and fetched: the other blobs are shared.
    assert _ok(main_size)["size"] == len(files["config.json"])
    assert _ok(by_default)["origin"] == "Hub download" and Path(by_default["path"]) == snapshots / main_sha
    assert _snapshot_files(snapshots / main_sha) == files
    assert {r.revision for r in asked(by_default) if r.route == "info"} == {"main"}
    assert hub.file_gets(repo) == {path: 2 if path == "config.json" else 1 for path in files}

    # The spec's revision reaches resolution: each pin loads its own cached snapshot.
    requests_so_far = len(hub.log())
    for revision, sha in ((v1_sha, v1_sha), ("v1", v1_sha), (None, main_sha)):
        loaded = load_model(ModelSpec(name="pinned", source=repo, revision=revision, device="cpu"))
        assert Path(loaded.report.resolved_path) == snapshots / sha, revision
        assert loaded.report.resolved_from == "HF cache"
        assert getattr(loaded.config, "modelfleet_commit", None) == ("v1" if sha == v1_sha else None)
    assert len(hub.log()) == requests_so_far


def test_adapter_base_download_announced(tiny, hub, online, isolated_env):
    base_repo = "modelfleet-test/lora-base"
    sha = hub.add_repo(base_repo, _padded(tiny["llm"], 12_000_000))
    total = hub.total_bytes(base_repo)
    adapter = shutil.copytree(tiny["llm-lora"], isolated_env["models"] / "my-lora")
    set_adapter_base(adapter, base_repo)

    with Timer() as t:
        (base,), stderr = _run(online, {"op": "base", "source": str(adapter)})
    record("hub download: adapter base resolved by download (12 MB)", t.seconds)

    snapshot = isolated_env["hub_cache"] / "models--modelfleet-test--lora-base" / "snapshots" / sha
    assert _ok(base)["origin"] == "Hub download" and Path(base["path"]) == snapshot
    (announced,) = DOWNLOAD_LOG.finditer(stderr)
    assert (announced["what"], announced["repo"]) == ("base model", base_repo)
    assert announced["size"] == f"{total / 1e9:.2f} GB" == "0.01 GB"
    assert float(announced["at"]) < min(r.at for r in hub.log(route="file", method="GET"))
    assert hub.file_gets(base_repo) == {path: 1 for path in hub.files(base_repo)}

    # The adapter now loads on its downloaded base, from the cache.
    loaded = load_model(ModelSpec(name="my-lora", source=str(adapter), device="cpu"))
    assert Path(loaded.report.base_path) == snapshot and loaded.report.base_resolved_from == "HF cache"
    assert Path(loaded.report.adapter_path) == adapter.resolve() and loaded.adapter_name == "default"
    assert type(loaded.model).__name__.startswith("Peft")


def _every_framework(model_dir: Path, each_bytes: int) -> tuple[dict[str, bytes], set[str]]:
    """model_dir (model.safetensors) as a repo that also ships its weights for the other frameworks, as
    openai/whisper-small does (pytorch_model.bin, tf_model.h5, flax_model.msgpack), plus exports and training
    state transformers never reads. Returns the files and the names of those a download should leave out."""
    files = _padded(model_dir, each_bytes)  # what is needed: ~each_bytes
    blob = lambda tag: (tag.encode() * (each_bytes // len(tag) + 1))[:each_bytes]  # noqa: E731
    others = {
        "pytorch_model.bin": blob("pt"), "tf_model.h5": blob("tf"), "flax_model.msgpack": blob("flax"),
        "rust_model.ot": b"rust", "onnx/model.onnx": b"onnx", "onnx/model.onnx_data": b"onnx data",
        "openvino/openvino_model.xml": b"<xml/>", "training_args.bin": b"args", "original/consolidated.00.pth": b"pth",
        "model.gguf": b"GGUF",
    }
    return {**files, **others}, set(others)


def test_a_download_fetches_only_what_transformers_reads_and_announces_that_size(tiny, hub, online, isolated_env,
                                                                                  tmp_path):
    """Review 5: snapshot_download got no patterns, so a repo with its weights in four frameworks (whisper-small:
    0.97 GB each) was downloaded whole (3.87 GB for 0.97), and announced so. The dry run, the download and a
    `fetch --local-models-dir` copy now leave out other frameworks' files and, beside model.safetensors, the
    PyTorch pickles."""
    repo = "modelfleet-test/every-framework"
    files, left_out = _every_framework(tiny["llm"], 6_000_000)
    sha = hub.add_repo(repo, files)
    needed = {path: data for path, data in files.items() if path not in left_out}
    needed_bytes = sum(map(len, needed.values()))

    (size, resolved), stderr = _run(online, {"op": "size", "source": repo}, {"op": "resolve", "source": repo})
    assert _ok(size)["size"] == needed_bytes  # was every byte: 4x
    (announced,) = DOWNLOAD_LOG.finditer(stderr)
    assert announced["size"] == f"{needed_bytes / 1e9:.2f} GB" == "0.01 GB"  # was 0.02 GB
    assert set(hub.file_gets(repo)) == set(needed), sorted(hub.file_gets(repo))
    snapshot = isolated_env["hub_cache"] / "models--modelfleet-test--every-framework" / "snapshots" / sha
    assert _ok(resolved)["origin"] == "Hub download" and Path(resolved["path"]) == snapshot
    assert _snapshot_files(snapshot) == needed

    # The snapshot is complete as it is: a fresh process resolves it from the cache, no request to the Hub.
    requests_so_far = len(hub.log())
    (again,), _ = _run(online, {"op": "resolve", "source": repo})
    assert _ok(again)["origin"] == "HF cache" and len(hub.log()) == requests_so_far
    loaded = load_model(ModelSpec(name="every-framework", source=repo, device="cpu"))
    assert Path(loaded.report.resolved_path) == snapshot

    # `fetch --local-models-dir` downloads the same files into LOCAL_MODELS_DIR ...
    hub.reset_log()
    local = isolated_env["models"] / repo
    (fetched,), _ = _run({**online, "HF_HUB_CACHE": str(tmp_path / "other-cache")},
                         {"op": "resolve", "source": repo, "local_dir": str(local)})
    assert _ok(fetched)["origin"] == "Hub download"
    assert set(hub.file_gets(repo)) == set(needed)
    assert {path: data for path, data in _snapshot_files(local).items() if not path.startswith(".")} == needed
    # ... and copies only those out of a cached snapshot downloaded whole (before this fix).
    whole = tmp_path / "whole"
    for path, data in files.items():
        (whole / path).parent.mkdir(parents=True, exist_ok=True)
        (whole / path).write_bytes(data)
    stage_in_hf_cache(whole, "modelfleet-test/whole-snapshot", isolated_env["hub_cache"])
    copy = isolated_env["models"] / "modelfleet-test" / "whole-snapshot"
    copied = resolve_source("modelfleet-test/whole-snapshot", Settings.from_env(), local_dir=copy)
    assert copied.origin == "copied from the HF cache"
    assert {path: data for path, data in _snapshot_files(copy).items() if not path.startswith(".")} == needed
    assert not (copy / "onnx").exists() and not (copy / "original").exists()


def test_a_repo_without_safetensors_keeps_its_pytorch_weights(tiny, hub, online, isolated_env):
    """Only where model.safetensors (or adapter_model.safetensors) is there are the pickles left out: an adapter
    shipped as adapter_model.bin alone is downloaded with it (other frameworks' files still left out)."""
    repo = "modelfleet-test/bin-adapter"
    files = {p.name: p.read_bytes() for p in tiny["llm-lora"].iterdir() if p.is_file()}
    files["adapter_model.bin"] = files.pop("adapter_model.safetensors")  # the name is what counts here
    files.update({"training_args.bin": b"args", "tf_model.h5": b"tf"})
    sha = hub.add_repo(repo, files)
    (size, resolved), _ = _run(online, {"op": "size", "source": repo}, {"op": "resolve", "source": repo})
    kept = {path: data for path, data in files.items() if path != "tf_model.h5"}
    assert _ok(size)["size"] == sum(map(len, kept.values()))
    assert set(hub.file_gets(repo)) == set(kept)
    snapshot = isolated_env["hub_cache"] / "models--modelfleet-test--bin-adapter" / "snapshots" / sha
    assert _ok(resolved)["origin"] == "Hub download" and _snapshot_files(snapshot) == kept


def test_unknown_repo_or_revision_is_a_clear_miss(tiny, hub, online, isolated_env):
    """The Hub answering 404 is a ModelNotFoundError naming where we looked (not huggingface_hub's
    RepositoryNotFoundError, which `modelfleet fetch` does not catch), with no download announced."""
    repo = "modelfleet-test/real-llm"
    hub.add_repo(repo, tiny["llm"])
    adapter = shutil.copytree(tiny["llm-lora"], isolated_env["models"] / "orphan-lora")
    set_adapter_base(adapter, "modelfleet-test/no-such-base")

    (no_repo, no_rev, no_base), stderr = _run(
        online,
        {"op": "resolve", "source": "modelfleet-test/no-such-llm"},
        {"op": "resolve", "source": repo, "revision": "no-such-branch"},
        {"op": "base", "source": str(adapter)},
    )
    assert no_repo["error"] == "ModelNotFoundError"
    assert f"the Hub at {hub.url} (no such repo, or private/gated: modelfleet-test/no-such-llm@main)" in \
        no_repo["message"]
    assert "HF cache" in no_repo["message"] and "HF_TOKEN" in no_repo["message"]
    assert no_rev["error"] == "ModelNotFoundError"
    assert f"the Hub at {hub.url} (no such revision: {repo}@no-such-branch)" in no_rev["message"]
    assert no_base["error"] == "AdapterBaseNotFoundError"
    assert "modelfleet-test/no-such-base" in no_base["message"] and "the Hub at" in no_base["message"]
    assert not DOWNLOAD_LOG.search(stderr), stderr
    assert not hub.log(route="file", method="GET")
    assert {r.status for r in hub.log(route="info")} == {404}


def test_native_duplicates_of_safetensors_weights_are_left_out():
    """Mistral repos also ship consolidated.safetensors (~14 GB for a 7B model), Llama and Mistral an original/
    folder of the same weights: transformers reads model.safetensors (or its index) only."""
    from huggingface_hub.utils import filter_repo_objects

    from loading.resolve import ignored_files

    repo = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
            "model.safetensors.index.json", "consolidated.safetensors", "original/consolidated.00.pth",
            "original/params.json", "tokenizer.json", "tokenizer.model", "pytorch_model.bin"]
    kept = list(filter_repo_objects(repo, ignore_patterns=ignored_files(repo)))
    assert kept == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                    "model.safetensors.index.json", "tokenizer.json", "tokenizer.model"]
    only_consolidated = ["config.json", "consolidated.safetensors", "params.json"]  # no transformers weights:
    assert list(filter_repo_objects(only_consolidated, ignore_patterns=ignored_files(only_consolidated))) == \
        only_consolidated  # nothing of it is taken for a duplicate
