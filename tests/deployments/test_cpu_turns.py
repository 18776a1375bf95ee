"""Replicas' model calls on one node take turns: two processes holding CpuTurns on one file never
compute at the same time, a holder that dies frees the turn, and a call inside a call holds one turn."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from deployments import cpu_turns
from deployments.cpu_turns import CpuTurns, default_path
from loading import ModelSpec, load_model
from loading.tiny import build_tiny


def hold_and_record(path: str, calls: int, hold_s: float, out) -> None:
    turns = CpuTurns(path)
    for _ in range(calls):
        with turns.hold():
            start = time.monotonic()
            time.sleep(hold_s)
            out.put((os.getpid(), start, time.monotonic()))


def test_two_processes_never_hold_the_turn_at_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=hold_and_record, args=(str(tmp_path / "turns"), 5, 0.02, out)) for _ in range(3)]
    for w in workers:
        w.start()
    spans = [out.get(timeout=60) for _ in range(15)]
    for w in workers:
        w.join(timeout=30)
    spans.sort(key=lambda s: s[1])
    assert len({pid for pid, _, _ in spans}) == 3
    for (_, _, end), (_, start, _) in zip(spans, spans[1:], strict=False):
        assert start >= end - 1e-4  # the next turn starts after the last one ended


def hold_forever(path: str, ready) -> None:
    with CpuTurns(path).hold():
        ready.set()
        time.sleep(600)


def test_a_killed_holder_frees_the_turn(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Event()
    holder = ctx.Process(target=hold_forever, args=(str(tmp_path / "turns"), ready))
    holder.start()
    assert ready.wait(60)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(timeout=30)
    turns = CpuTurns(tmp_path / "turns")
    with turns.hold():
        pass
    assert turns.status()["turns"] == 1


def test_a_call_inside_a_call_holds_one_turn(tmp_path):
    turns = CpuTurns(tmp_path / "turns")
    with turns.hold():
        with turns.hold():
            pass
        assert turns._owner is not None  # still held by the outer call
    assert turns._owner is None
    assert turns.status()["turns"] == 1
    other = CpuTurns(tmp_path / "turns")  # a second holder (as another replica would) gets it at once
    with other.hold():
        pass


def test_the_nodes_file_is_one_per_user_and_a_replica_without_it_computes_without_turns(monkeypatch, caplog):
    assert default_path() == default_path()
    assert default_path().name == f"modelfleet-cpu-turns-{os.getuid()}.lock"
    monkeypatch.setattr(cpu_turns, "default_path", lambda: Path("/nonexistent-dir/turns.lock"))
    assert cpu_turns.node_turns() is None
    assert "cpu_turns off in this replica" in caplog.text and "/nonexistent-dir/turns.lock" in caplog.text


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    return load_model(ModelSpec(name="w", source=str(build_tiny("stt", tmp_path_factory.mktemp("m") / "w"))))


def test_a_generate_call_takes_a_turn_per_forward_and_frees_it_between(whisper, tmp_path):
    """Whisper's generate: its encoder once, then a decoder forward per token, each its own turn, so a
    replica of another family computes between them rather than after the whole transcription."""
    turns = CpuTurns(tmp_path / "turns")
    model = whisper.model
    features = torch.zeros(1, model.config.num_mel_bins, 3000)
    held_between: list[bool] = []
    with turns.each_forward(model):
        calls = []
        hook = model.get_decoder().register_forward_pre_hook(lambda *_: calls.append(turns._owner is not None))
        try:
            out = model.generate(features, max_new_tokens=4)
        finally:
            hook.remove()
        held_between.append(turns._owner is not None)
    assert out.shape[-1] > 1
    assert calls and all(calls)  # every decoder forward ran inside a turn
    assert held_between == [False]  # and between calls the turn was free
    taken = turns.status()["turns"]
    assert taken == len(calls) + 1  # the encoder's own, then one per step
    model(input_features=features, decoder_input_ids=torch.tensor([[1]]))  # outside each_forward: no turn
    assert turns.status()["turns"] == taken and turns._owner is None


def test_a_forward_that_raises_gives_the_turn_back(whisper, tmp_path):
    turns = CpuTurns(tmp_path / "turns")
    with turns.each_forward(whisper.model):
        with pytest.raises(ValueError):
            whisper.model(input_features=torch.zeros(1, 3, 7))  # not the model's mel bins
        assert turns._owner is None
    other = CpuTurns(tmp_path / "turns")
    with other.hold():
        pass
