"""The threads torch computes with: a small CPU model on one (its idle OpenMP threads would only spin,
taking cores the rest of the app needs), a bigger one on the replica's; an explicit count for all."""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch

from deployments.cpu_turns import CpuTurns
from deployments.decode_loop import DecodeLoop
from deployments.llm import LLMServer
from deployments.options import ChatOptions
from deployments.params import ChatParams
from deployments.threads import ComputeThreads
from loading import ModelSpec, load_model
from loading.tiny import build_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    spec = ModelSpec(name="tiny", source=str(build_tiny("llm", tmp_path_factory.mktemp("m") / "tiny-llm")),
                     max_new_tokens=8)
    return spec, load_model(spec)


@pytest.fixture(autouse=True)
def restore_threads(monkeypatch):
    """ComputeThreads sets the process's count and OMP_NUM_THREADS / MKL_NUM_THREADS, as in a replica."""
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(variable, os.environ.get(variable, ""))  # restored after the test
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def threads(**options) -> ComputeThreads:
    return ComputeThreads(ChatOptions(num_cpus=2, **options))


def test_a_small_cpu_model_computes_on_one_thread_and_a_bigger_one_on_the_replicas(tiny):
    _, loaded = tiny
    size = loaded.report.parameters
    assert size == sum(p.numel() for p in loaded.model.parameters())
    assert size < 5_000_000  # the default bound
    assert threads().threads == 2
    assert threads().for_model(loaded) == 1
    assert threads(single_thread_below_params=size).for_model(loaded) == 2  # not below: the replica's count
    assert threads(single_thread_below_params=0).for_model(loaded) == 2


def test_an_explicit_count_is_used_for_every_model(tiny):
    _, loaded = tiny
    assert threads(torch_threads=3).for_model(loaded) == 3


def test_the_decode_loop_computes_each_forward_with_the_models_threads_in_the_nodes_turn(tiny, tmp_path):
    spec, loaded = tiny
    torch.set_num_threads(2)
    seen: list[tuple[int, bool]] = []
    policy = threads(single_thread_below_params=0)  # the tiny model on the replica's two threads
    policy.turns = CpuTurns(tmp_path / "turns")

    @contextmanager
    def computing(model):
        with policy.computing(model):
            seen.append((torch.get_num_threads(), policy.turns._owner is not None))
            yield

    loop = DecodeLoop(4, {"model_calls": 0, "requests": 0, "largest_batch": 0}, computing=computing)
    params = ChatParams(model="tiny", messages=[{"role": "user", "content": "hi"}], max_new_tokens=4, temperature=0)
    params.inputs = LLMServer.encode(None, loaded, params)
    out = []
    loop.submit(spec, loaded, params, out.append)
    loop.run()
    assert out and out[0].completion_tokens >= 1
    assert seen and set(seen) == {(2, True)}, seen  # the prefill and every step: two threads, in a turn
    assert policy.turns.status()["turns"] == len(seen)


def test_only_multithreaded_forwards_on_cpu_take_the_turn_and_it_can_be_turned_off(tiny, tmp_path):
    _, loaded = tiny
    policy = threads(single_thread_below_params=0)
    policy.turns = CpuTurns(tmp_path / "turns")
    with policy.computing(replace(loaded, report=replace(loaded.report, device="cuda:0"))):
        assert policy.turns._owner is None  # a GPU call never waits for the node's CPU
    with policy.computing(loaded):
        assert policy.turns._owner is not None
    assert policy.turns.status()["turns"] == 1
    one_thread = threads()  # the tiny model computes on one thread: nothing of it spins, it runs at once
    one_thread.turns = CpuTurns(tmp_path / "turns")
    with one_thread.computing(loaded), one_thread.calling(loaded):
        assert one_thread.turns._owner is None and one_thread.turns.status()["turns"] == 0
    assert threads(cpu_turns=False).turns is None
    with threads(cpu_turns=False).computing(loaded):
        pass


def test_turns_are_shared_by_time_unless_told_otherwise(monkeypatch, tmp_path):
    monkeypatch.setattr("deployments.cpu_turns.default_path", lambda: tmp_path / "turns")
    assert threads().turns.shares is not None  # the default: who goes next by seconds computed
    assert threads(cpu_turns_share_time=False).turns.shares is None  # the kernel's wake order
