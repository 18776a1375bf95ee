"""ModelHandle: a lazy model loads once, however many first requests arrive together.

Issue: with lazy loading, every concurrent first request started its own load (N copies of the
weights, OOM); requests during a load hung without a hint; a failed load was retried in a loop
by every request.
"""

from __future__ import annotations

import threading

import pytest

from loading import ModelHandle, ModelLoadFailed, ModelLoadingInProgress, ModelSpec, State, load_model


def _handle(spec: ModelSpec) -> ModelHandle:
    return ModelHandle(spec.name, lambda progress: load_model(spec, progress=progress))


def _call_get_concurrently(handle: ModelHandle, n: int, timeout: float):
    barrier = threading.Barrier(n)
    results: list = [None] * n

    def worker(i: int) -> None:
        barrier.wait()
        try:
            results[i] = handle.get(timeout=timeout)
        except Exception as exc:  # collected and asserted on below
            results[i] = exc

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    return results


def test_ten_concurrent_first_callers_load_once(isolated_env, tiny):
    handle = _handle(ModelSpec(name="tiny-llm", source=str(tiny["llm"]), debug_load_delay_s=0.3))
    assert handle.status() == {"state": "not_loaded"}
    results = _call_get_concurrently(handle, 10, timeout=30)
    assert handle.load_count == 1
    assert all(r is results[0] for r in results), results
    assert results[0].report.device == "cpu"
    status = handle.status()
    assert status["state"] == "ready" and status["device"] == "cpu" and status["loading_strategy"] == "float32 on cpu"
    assert handle.get(timeout=0) is results[0] and handle.load_count == 1


def test_waiters_time_out_with_loading_in_progress(isolated_env, tiny):
    # The load is held until the waiters are back: that they all came back with "still loading"
    # while it was held proves that none of them waited for the load itself (no wall-time bound).
    spec = ModelSpec(name="tiny-llm", source=str(tiny["llm"]), debug_load_delay_s=0.2)
    release = threading.Event()

    def held_load(progress):
        progress("simulated delay", 0.0)
        if not release.wait(60):
            raise TimeoutError("the test never released the load")
        return load_model(spec, progress=progress)

    handle = ModelHandle(spec.name, held_load)
    try:
        results = _call_get_concurrently(handle, 10, timeout=0.2)
        assert all(isinstance(r, ModelLoadingInProgress) for r in results), results
        err = results[0]
        assert err.phase == "simulated delay" and err.retry_after_s >= 2 and not err.permanent
        assert err.name == "tiny-llm" and "still loading" in str(err)

        status = handle.status()
        assert status["state"] == "loading" and status["phase"] == "simulated delay"
        assert handle.state is State.LOADING
    finally:
        release.set()
    loaded = handle.get(timeout=60)
    assert handle.status()["state"] == "ready" and handle.load_count == 1
    assert loaded.report.load_seconds >= 0.2  # the load that ran is load_model's, with its own delay


def test_status_goes_through_the_phases(isolated_env, tiny):
    spec = ModelSpec(name="tiny-llm", source=str(tiny["llm"]))
    phases: list[str] = []
    handle = ModelHandle(spec.name, lambda progress: load_model(
        spec, progress=lambda phase, fraction=None: (phases.append(phase), progress(phase, fraction))))
    assert handle.state is State.NOT_LOADED
    assert handle.start() is True and handle.start() is False  # a second start does nothing
    handle.get(timeout=30)
    assert phases[:4] == ["resolving", "reading config", "loading processor", "planning placement"]
    assert phases[-1] == "ready" and any(p.startswith("loading weights") for p in phases)
    assert handle.state is State.READY


def test_failed_load_is_sticky_until_reload(isolated_env, tiny, tmp_path):
    source = tmp_path / "arrives-later"
    handle = _handle(ModelSpec(name="later", source=str(source)))
    with pytest.raises(ModelLoadFailed, match="was not found") as first:
        handle.get(timeout=10)
    assert first.value.permanent
    for _ in range(3):  # every later call gets the same failure, without loading again
        with pytest.raises(ModelLoadFailed):
            handle.get(timeout=10)
    assert handle.load_count == 1
    status = handle.status()
    assert status["state"] == "failed" and str(source) in status["error"]

    import shutil

    shutil.copytree(tiny["llm"], source)  # the operator fixes it...
    with pytest.raises(ModelLoadFailed):  # ...still sticky until reload()
        handle.get(timeout=10)
    handle.reload()
    assert handle.status() == {"state": "not_loaded"}
    loaded = handle.get(timeout=30)
    assert handle.load_count == 2 and loaded.report.resolved_path == str(source.resolve())


def test_non_loading_error_is_reported_with_its_type(isolated_env):
    def boom(progress):
        progress("exploding", 0.5)
        raise RuntimeError("CUDA error: out of memory")

    handle = ModelHandle("boom", boom)
    with pytest.raises(ModelLoadFailed, match="RuntimeError: CUDA error: out of memory"):
        handle.get(timeout=5)
    assert handle.status()["error"] == "RuntimeError: CUDA error: out of memory"
