"""/history and the per-peer table of /status stay bounded, and the metrics follow
Prometheus's naming conventions."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from p2pfl.peer_activity import PeerActivity
from p2pfl.status import render_metrics
from p2pfl.status_history import StatusHistory

pytestmark = pytest.mark.unit


def status(round_: int, t: float, **more: Any) -> dict[str, Any]:
    return {"round": round_, "uptime_s": t, "accuracy": 0.5, "updates_rejected": {}, **more}


def test_history_keeps_at_most_its_cap_of_samples_and_rounds() -> None:
    history = StatusHistory(max_samples=10, max_rounds=5)
    for i in range(1000):
        history.record(status(i // 2, float(i)))
    view = history.view()
    assert len(view["samples"]) == 10 and view["samples"][-1]["t"] == 999.0
    assert [r["round"] for r in view["rounds"]] == [495, 496, 497, 498, 499]


def test_history_records_one_entry_per_finished_round_with_its_phases() -> None:
    history = StatusHistory()
    phases = {"last_round": {"round": 1, "train_s": 0.5, "overhead_fraction": 0.1}}
    for t, round_ in enumerate([0, 1, 1, 1, 2]):
        history.record(status(round_, float(t), phases=phases))
    rounds = history.view()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert rounds[0]["phases"] == {"train_s": 0.5}


def test_history_sums_push_failures_and_refused_connections_over_peers_and_reasons() -> None:
    history = StatusHistory()
    history.record(status(0, 0.0, send_failures={"a": 2, "b": 3},
                          connections_refused={"handshake-rate": 4}))
    sample = history.view()["samples"][0]
    assert sample["push_failures"] == 5 and sample["connections_refused"] == 4


def test_peer_activity_forgets_the_least_recently_heard_peer_past_its_cap() -> None:
    activity = PeerActivity(max_peers=3)
    for i, peer in enumerate(["a", "b", "c"]):
        activity.accepted(peer, float(i))
    activity.refused("a", "replay", 3.0)  # a is now the most recent
    activity.accepted("d", 4.0)
    view = activity.view(now=5.0)
    assert set(view) == {"a", "c", "d"}
    assert view["a"] == {"accepted": 1, "refused": {"replay": 1}, "last_heard_s_ago": 2.0}


FULL_STATUS: dict[str, Any] = {
    "peer_id": "12D3KooWJbV6uzPMKBPtwhgUXm8FnTnosy4gawhgjCLP6PdDPsdC",
    "version": "0.1.0", "round": 3, "neighbours": ["a"], "accuracy": 0.9,
    "train_loss": 0.2, "updates_sent": 4, "updates_accepted": 5,
    "updates_rejected": {"replay": 1}, "deliveries": {"delivered": 3, "refunded": 1},
    "send_failures": {"12D3KooWPeerOne": 2, "12D3KooWPeerTwo": 1},
    "connections_refused": {"handshake-rate": 2}, "weight": 1.0, "weight_pending": 0.5,
    "weight_in_flight": 0.25, "known_peers": 4, "bytes_sent": 10, "bytes_received": 20,
    "uptime_s": 1.0, "epsilon": 1.5, "delta": 1e-5, "dp_target_epsilon": 8.0,
    "membership": {"members_known": 3, "network_id": "abc", "member_log_head": "h1",
                   "member_log_length": 1, "cert_not_after": 2e9, "member_refusals": {}},
}


def test_metric_names_follow_prometheus_conventions() -> None:
    families = list(text_string_to_metric_families(render_metrics(FULL_STATUS)))
    for family in families:
        assert family.name.startswith("p2pfl_"), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name == family.name + "_total", sample.name
            else:
                assert not sample.name.endswith("_total"), sample.name
            # No label carries a peer id or a value that changes over a run (a new
            # series each time): the bounded reasons, fates, phases and info labels only.
            assert set(sample.labels) <= {"reason", "fate", "phase", "version", "network_id"}
    values = {s.name: s.value for f in families for s in f.samples if not s.labels}
    assert values["p2pfl_push_failures_total"] == 3
    assert values["p2pfl_pushsum_weight_in_flight"] == 0.25
    assert values["p2pfl_dp_target_epsilon"] == 8.0
