"""``GET /history``: the last half hour of a node's /status, sampled, in bounded memory.

The web page (p2pfl/web/) draws accuracy, loss, rejections and the push-sum mass
against time and round. /status is a snapshot, so something must remember the
past: this keeps a few numbers per sample, and one record per finished round, in
fixed-size deques, so a node that runs for months holds the same few hundred KB.
It is a pure object fed by :func:`record_history`; the status server only reads it.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import trio

from p2pfl.status import StatusSource

HISTORY_INTERVAL_S = 2.0
MAX_SAMPLES = 900  # 30 minutes at one sample every 2 s
MAX_ROUNDS = 1000
HISTORY_SCHEMA_VERSION = 1


def _total(counts: dict[str, int] | None) -> int:
    return sum(counts.values()) if counts else 0


class StatusHistory:
    """Samples of /status over time, and one record per round, each capped in length."""

    def __init__(self, max_samples: int = MAX_SAMPLES, max_rounds: int = MAX_ROUNDS) -> None:
        self.samples: deque[dict[str, Any]] = deque(maxlen=max_samples)
        self.rounds: deque[dict[str, Any]] = deque(maxlen=max_rounds)

    def record(self, status: dict[str, Any]) -> None:
        """Keep what the page charts of one /status snapshot (``t`` is its uptime)."""
        t = status["uptime_s"]
        self.samples.append({
            "t": t,
            "round": status["round"],
            "accuracy": status.get("accuracy"),
            "train_loss": status.get("train_loss"),
            "epsilon": status.get("epsilon"),
            # Cumulative counts: the page draws their increase per interval.
            "rejected": dict(status.get("updates_rejected") or {}),
            "push_failures": _total(status.get("send_failures")),
            "connections_refused": _total(status.get("connections_refused")),
            "weight": status.get("weight"),
            "weight_pending": status.get("weight_pending"),
            "weight_in_flight": status.get("weight_in_flight"),
        })
        finished = status["round"]
        if finished > 0 and (not self.rounds or self.rounds[-1]["round"] < finished):
            phases = (status.get("phases") or {}).get("last_round") or {}
            self.rounds.append({
                "round": finished,
                "t": t,
                "accuracy": status.get("accuracy"),
                "train_loss": status.get("train_loss"),
                "epsilon": status.get("epsilon"),
                "phases": {k: v for k, v in phases.items() if k.endswith("_s")},
            })

    def view(self) -> dict[str, Any]:
        return {
            "schema_version": HISTORY_SCHEMA_VERSION,
            "interval_s": HISTORY_INTERVAL_S,
            "samples": list(self.samples),
            "rounds": list(self.rounds),
        }


async def record_history(
    history: StatusHistory, source: StatusSource, interval: float = HISTORY_INTERVAL_S
) -> None:
    """Sample ``source`` into ``history`` every ``interval`` seconds until cancelled."""
    while True:
        history.record(source())
        await trio.sleep(interval)
