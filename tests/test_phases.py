"""Per-round phase seconds, peak RSS and the loop's worst stall (p2pfl.phases)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import trio
import trio.testing

from p2pfl import phases
from p2pfl.phases import PHASES, PhaseClock, peak_rss_mb
from p2pfl.status import render_metrics

pytestmark = pytest.mark.unit


def test_a_round_record_holds_each_phase_and_the_share_that_is_not_training() -> None:
    clock = PhaseClock()
    clock.add("train", 6.0)
    clock.add("send", 1.5)
    clock.add("admit", 0.25)
    clock.add("admit", 0.25)
    record = clock.end_round(3, wall_s=8.0)
    assert record["round"] == 3
    assert record["train_s"] == 6.0 and record["send_s"] == 1.5 and record["admit_s"] == 0.5
    assert record["merge_s"] == 0.0
    assert record["overhead_fraction"] == pytest.approx(0.25)
    assert record["other_s"] == pytest.approx(2.0)  # 8 - 6: sends and admits overlap it
    assert set(PHASES) <= {key.removesuffix("_s") for key in record}
    assert clock.status()["last_round"] == record


def test_the_next_round_starts_from_zero() -> None:
    clock = PhaseClock()
    clock.add("merge", 2.0)
    clock.end_round(1, wall_s=2.0)
    record = clock.end_round(2, wall_s=1.0)
    assert record["merge_s"] == 0.0
    assert record["overhead_fraction"] == 1.0


def test_timed_work_adds_its_own_seconds_and_keeps_its_result_and_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [100.0]  # a perf_counter that moves only when the work says so
    monkeypatch.setattr(phases, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    clock = PhaseClock()

    def slow_increment(x: int) -> int:
        now[0] += 0.25
        return x + 1

    def broken() -> None:
        now[0] += 0.5
        raise ValueError("no")

    assert clock.timed("prepare", slow_increment)(1) == 2
    now[0] += 7.0  # between calls: counted nowhere

    with pytest.raises(ValueError):
        clock.timed("admit", broken)()
    record = clock.end_round(1, wall_s=1.0)
    assert record["prepare_s"] == 0.25 and record["admit_s"] == 0.5


def test_peak_rss_is_at_least_what_a_fresh_allocation_holds() -> None:
    held = bytearray(64 * 2**20)
    held[:: 4096] = b"x" * len(held[:: 4096])  # touch every page
    assert peak_rss_mb() >= 64
    del held


def test_the_watchdog_records_how_late_the_loop_woke() -> None:
    clock = trio.testing.MockClock(autojump_threshold=0)
    phases = PhaseClock()

    async def scenario() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(phases.watchdog, 0.01)
            await trio.sleep(0.105)
            assert phases.worst_stall_s == pytest.approx(0.0, abs=1e-9)  # on time: nothing blocks
            clock.jump(0.5)  # what a 0.5 s blocking call does to everyone else's wake-up
            await trio.sleep(0.05)
            nursery.cancel_scope.cancel()

    trio.run(scenario, clock=clock)
    assert phases.worst_stall_s == pytest.approx(0.495)
    assert phases.end_round(1, wall_s=1.0)["worst_stall_s"] == pytest.approx(0.495)
    assert phases.end_round(2, wall_s=1.0)["worst_stall_s"] == 0.0  # per round
    assert phases.status()["worst_stall_s"] == pytest.approx(0.495)  # since start


def test_metrics_export_the_last_rounds_phases() -> None:
    clock = PhaseClock()
    clock.add("train", 2.0)
    clock.end_round(1, wall_s=3.0)
    status = {
        "round": 1, "neighbours": [], "updates_sent": 0, "updates_accepted": 0,
        "updates_rejected": {}, "bytes_sent": 0, "bytes_received": 0, "uptime_s": 1.0,
        "phases": clock.status(),
    }
    text = render_metrics(status)
    assert 'p2pfl_round_phase_seconds{phase="train"} 2.0' in text
    assert 'p2pfl_round_phase_seconds{phase="send"} 0.0' in text
    assert "p2pfl_round_seconds 3.0" in text
    assert "p2pfl_peak_rss_bytes" in text and "p2pfl_loop_worst_stall_seconds" in text
