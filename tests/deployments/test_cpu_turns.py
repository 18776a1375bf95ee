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

from deployments import cpu_turns, turn_shares
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


# -- turns shared by compute time (turn_shares.py) -----------------------------------------------------
def hold_for_a_while(path: str, hold_s: float, seconds: float, share_time: bool, out, weight: float = 1.0,
                     name: object = None, start=None) -> None:
    """A replica whose forwards each hold the turn `hold_s` (sleeping: holding is what is shared here),
    with a little Python between them, as a decode loop has. `start`: a barrier the rivals pass
    together, so that none computes alone while the other is still starting (a spawned process took
    over a second to start on a loaded 2-core machine, and its rival's solo turns skewed the shares)."""
    turns = CpuTurns(path, share_time=share_time, weight=weight)
    if start is not None:
        start.wait(timeout=120)
    end, held = time.monotonic() + seconds, 0.0
    while time.monotonic() < end:
        with turns.hold():
            start = time.monotonic()
            time.sleep(hold_s)
            held += time.monotonic() - start
        time.sleep(0.002)
    out.put((hold_s if name is None else name, held, turns.status()))


def shares_of(path: str, share_time: bool) -> dict[float, tuple[float, dict]]:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Barrier(2)
    workers = [ctx.Process(target=hold_for_a_while, args=(path, hold, 4.0, share_time, out, 1.0, None, start))
               for hold in (0.04, 0.008)]
    for w in workers:
        w.start()
    results = [out.get(timeout=120) for _ in workers]
    for w in workers:
        w.join(timeout=30)
    return {hold: (held, status) for hold, held, status in results}


def test_replicas_with_long_and_short_forwards_share_the_turn_by_time(tmp_path):
    """A replica with 40 ms forwards beside one with 8 ms forwards: by time, each holds the turn about
    half the time; in wake order, one forward each, the long one held it 2.4-5x as long."""
    fair = shares_of(str(tmp_path / "by-time"), True)
    long_held, long_status = fair[0.04]
    short_held, short_status = fair[0.008]
    assert 0.6 < long_held / short_held < 1.6, fair
    assert long_status["deferrals"] > 0
    # every second held counts (plus any level-up after a gap: a replica that was idle starts level)
    assert long_status["computed_s"] >= 0.95 * long_held and short_status["computed_s"] >= 0.95 * short_held
    wake_order = shares_of(str(tmp_path / "wake-order"), False)
    assert wake_order[0.04][0] / wake_order[0.008][0] > max(1.8, long_held / short_held), wake_order
    assert "deferrals" not in wake_order[0.04][1]


def test_a_replica_with_three_times_the_weight_computes_about_three_times_as_long(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    start = ctx.Barrier(2)
    workers = [ctx.Process(target=hold_for_a_while,
                           args=(str(tmp_path / "turns"), 0.01, 4.0, True, out, weight, weight, start))
               for weight in (3.0, 1.0)]
    for w in workers:
        w.start()
    held = {weight: (seconds, status) for weight, seconds, status in (out.get(timeout=120) for _ in workers)}
    for w in workers:
        w.join(timeout=30)
    assert 2.0 < held[3.0][0] / held[1.0][0] < 4.5, held
    assert held[3.0][1]["weight"] == 3.0 and held[1.0][1]["weight"] == 1.0


def rival_slot(turns: CpuTurns, pid: int, computed: float, active_since: float) -> None:
    """Write a slot of the node's table as another replica would (a free one)."""
    table = turns.shares.table
    free = int(next(i for i in range(len(table)) if table["pid"][i] == 0))
    table[free] = (pid, computed, active_since, 0.0)


def test_a_replica_that_was_idle_starts_level_with_the_active_ones(tmp_path):
    """No credit for idleness: a replica that computed nothing while a rival computed 10 s starts at the
    rival's 10 s, so it cannot then hold the node for 10 s before the rival's next turn."""
    first = CpuTurns(tmp_path / "turns")
    rival_slot(first, os.getppid(), 10.0, time.monotonic())  # a live process, waiting for the turn
    with first.hold():
        pass
    assert 10.0 <= first.shares.table["computed"][first.shares.me] < 10.5
    assert first.shares.deferrals == 0  # level with the rival: nothing to let go first


def test_a_rival_that_is_behind_goes_first_and_a_dead_or_stale_one_does_not_stall(tmp_path):
    turns = CpuTurns(tmp_path / "turns")
    with turns.hold():
        time.sleep(0.05)
    ctx = multiprocessing.get_context("spawn")
    gone = ctx.Process(target=time.sleep, args=(0,))
    gone.start()
    gone.join()
    rival_slot(turns, gone.pid, 0.0, time.monotonic())  # behind, but its process is gone
    rival_slot(turns, os.getppid(), 0.0, time.monotonic() - 60)  # behind, but waiting for a minute: stale
    with turns.hold():
        pass
    assert turns.shares.deferrals == 0
    rival_slot(turns, os.getppid(), 0.0, time.monotonic())  # behind, alive and waiting: it goes first...
    started = time.monotonic()
    with turns.hold():  # ...but one that never takes its turn holds this one back MAX_DEFER_S at most
        waited = time.monotonic() - started
    assert turns.shares.deferrals == 1
    assert turn_shares.MAX_DEFER_S <= waited < turn_shares.MAX_DEFER_S + 0.5


def test_a_full_table_leaves_the_replica_taking_turns_in_wake_order(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(turn_shares, "SLOTS", 1)
    first = CpuTurns(tmp_path / "turns")
    assert first.shares is not None
    first.shares.table["pid"][0] = os.getppid()  # the one slot is another live process's
    second = CpuTurns(tmp_path / "turns")
    assert second.shares is None and "no room for its share" in caplog.text
    with second.hold():
        pass
    assert second.status()["turns"] == 1
