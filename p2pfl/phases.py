"""Where a daemon's rounds go: seconds per phase, peak memory and the event loop's worst stall.

A round's phases are ``train``, ``wait`` (for the neighbourhood:
p2pfl/pacing.py), ``merge``, ``prepare`` (encode and sign),
``evaluate`` and ``checkpoint``, one after the other, and ``other``, the rest
of the round's wall time (mostly waiting for the gossip lock). Two more run in
the background, overlapping the rounds, and are summed over every call that
ended during the round: ``send`` (each push, from its stream to the
receiver's receipt; pushes to several neighbours run at once, so this can
exceed the wall time they took) and ``admit`` (verify and decode of each
update that arrived). Gossip work is timed inside the call (in its worker
thread for large models), so waiting for the gossip lock is not counted in
it; ``send`` and the round are wall-clock seconds on the loop.

``overhead_fraction`` is everything but training as a share of the round's
wall time: ``1 - train / round``. Background sends and admits are not in the
round's wall time; on a busy machine they slow the round's own phases down.

The watchdog measures the loop's worst stall as ``scripts/bench_loop_stall.py``
does: it asks for a short sleep over and over and records how late it wakes.
"""

from __future__ import annotations

import resource
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, ParamSpec, TypeVar

import trio

PHASES = ("train", "wait", "merge", "prepare", "send", "admit", "evaluate", "checkpoint")
BACKGROUND_PHASES = ("send", "admit")  # overlap the rounds
ROUND_PHASES = tuple(phase for phase in PHASES if phase not in BACKGROUND_PHASES)
# A short tick measures stalls finely; 10 ms keeps the watchdog's own cost at about
# a hundred wake-ups a second.
WATCHDOG_TICK_S = 0.01

P = ParamSpec("P")
T = TypeVar("T")


def peak_rss_mb() -> float:
    """This process's peak resident set size, in MiB (``ru_maxrss``)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / (2**20 if sys.platform == "darwin" else 2**10)


class PhaseClock:
    """Seconds per phase for the round in progress, and the last finished round's record.

    ``add`` may be called from worker threads (training, offloaded gossip work);
    a lock keeps the running sums whole.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._current = dict.fromkeys(PHASES, 0.0)
        self.totals = dict.fromkeys(PHASES, 0.0)  # since the daemon started
        self._stall = 0.0
        self.last_round: dict[str, Any] | None = None
        self.worst_stall_s = 0.0

    def add(self, phase: str, seconds: float) -> None:
        with self._lock:
            self._current[phase] += seconds
            self.totals[phase] += seconds

    def timed(self, phase: str, work: Callable[P, T]) -> Callable[P, T]:
        """``work``, adding the seconds each call takes to ``phase``."""

        def timed_work(*args: P.args, **kwargs: P.kwargs) -> T:
            start = time.perf_counter()
            try:
                return work(*args, **kwargs)
            finally:
                self.add(phase, time.perf_counter() - start)

        return timed_work

    @contextmanager
    def timing(self, phase: str) -> Iterator[None]:
        """Add the block's wall-clock seconds to ``phase`` (awaits inside count)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(phase, time.perf_counter() - start)

    def stalled(self, seconds: float) -> None:
        """The loop woke ``seconds`` late (called by :meth:`watchdog`)."""
        self._stall = max(self._stall, seconds)
        self.worst_stall_s = max(self.worst_stall_s, seconds)

    def end_round(self, round_number: int, wall_s: float) -> dict[str, Any]:
        """Close the round that took ``wall_s``: its record, and a fresh one begins."""
        with self._lock:
            phases, self._current = self._current, dict.fromkeys(PHASES, 0.0)
        stall, self._stall = self._stall, 0.0
        record = {
            "round": round_number,
            "round_s": round(wall_s, 4),
            **{f"{name}_s": round(seconds, 4) for name, seconds in phases.items()},
            # The rest of the round: waits for the gossip lock (held by admits),
            # copying the estimate, choosing neighbours.
            "other_s": round(max(0.0, wall_s - sum(phases[p] for p in ROUND_PHASES)), 4),
            "overhead_fraction": round(1.0 - phases["train"] / wall_s, 4) if wall_s > 0 else None,
            "worst_stall_s": round(stall, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }
        self.last_round = record
        return record

    def status(self) -> dict[str, Any]:
        return {
            "last_round": self.last_round,
            "total_s": {name: round(seconds, 4) for name, seconds in self.totals.items()},
            "worst_stall_s": round(self.worst_stall_s, 4),
            "peak_rss_mb": round(peak_rss_mb(), 1),
        }

    async def watchdog(self, tick: float = WATCHDOG_TICK_S) -> None:
        """Run until cancelled, recording how late each ``tick`` sleep wakes."""
        while True:
            before = trio.current_time()
            await trio.sleep(tick)
            self.stalled(max(0.0, trio.current_time() - before - tick))
