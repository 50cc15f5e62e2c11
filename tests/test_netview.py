"""What the lab and the demo show: the status table, the history's JSON and plot, model spread."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from p2pfl.checkpoint import CheckpointStore, NodeState
from p2pfl.lab.labrun import goal_met, training_ratio
from p2pfl.lab.labwatch import gossip_graph, initial_weight, weight_total
from p2pfl.lab.localnet import LocalNode
from p2pfl.lab.netview import History, Row, status_table

pytestmark = pytest.mark.unit


def status(round_: int, accuracy: float | None, weight: float = 2.0, **more: object) -> dict:
    return {
        "round": round_, "accuracy": accuracy, "neighbours": ["b", "c"], "known_peers": 5,
        "updates_accepted": 7, "updates_rejected": {"stale": 2}, "send_failures": {"b": 1},
        "bytes_sent": 3_500_000, "weight": weight, "samples": 3, **more,
    }  # fmt: skip


def rendered(table: object) -> str:
    console = Console(file=io.StringIO(), width=200)
    console.print(table)
    return console.file.getvalue()


def test_the_table_shows_each_hosts_status_and_the_exited_ones_final_accuracy() -> None:
    text = rendered(status_table("lab", [
        Row("0", "10.77.0.10", status(4, 0.9123)),
        Row("1", "10.77.0.11", None, final_accuracy=0.875),
        Row("2", "10.77.0.12", None),
    ], rounds=20))
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert [cell.strip() for cell in lines["0"].split("│")[1:-1]] == [
        "0", "10.77.0.10", "4/20", "0.9123", "2", "5", "7", "2", "1", "3.50", "2.0"]
    assert "done" in lines["1"] and "0.8750" in lines["1"]
    assert "0.8750" not in lines["2"] and "done" not in lines["2"]


def test_history_writes_every_poll_and_event_as_json_and_a_png(tmp_path: Path) -> None:
    history = History("a run")
    history.record([status(1, 0.5), None, status(1, None)])
    history.mark("cut")
    history.record([status(2, 0.7), status(2, 0.6), status(2, 0.4)])
    history.add("consensus distance", 0.25)
    history.write_json(tmp_path / "run.json")
    record = json.loads((tmp_path / "run.json").read_text())
    assert [(s["host"], s["round"], s["accuracy"]) for s in record["samples"]] == [
        (0, 1, 0.5), (2, 1, None), (0, 2, 0.7), (1, 2, 0.6), (2, 2, 0.4)]
    assert [event["label"] for event in record["events"]] == ["cut"]
    assert [value for _, value in record["series"]["consensus distance"]] == [0.25]
    history.plot(tmp_path / "run.png")
    assert (tmp_path / "run.png").read_bytes().startswith(b"\x89PNG")


def test_the_gossip_graph_joins_each_node_to_the_neighbours_it_names() -> None:
    statuses = [status(1, 0.5, neighbours=["b"]), status(1, 0.5, neighbours=["c", "x"]), None]
    graph = gossip_graph(statuses, ["a", "b", "c"])
    assert sorted(graph.edges) == [(0, 1), (1, 2)]


def test_all_push_sum_mass_is_summed_against_the_samples_the_nodes_started_with() -> None:
    statuses = [status(1, 0.5, weight=2.5, weight_pending=1.0, weight_in_flight=0.5), None,
                status(1, 0.5, weight=0.25, samples=0, weight_pending=0.0, weight_in_flight=0.0)]
    assert weight_total(statuses) == 2.5 + 1.0 + 0.5 + 0.25
    assert initial_weight(statuses) == 3.0 + 1.0  # a node with no samples starts at weight 1


def test_a_nodes_saved_model_is_read_from_its_checkpoint_or_the_previous_one(
    tmp_path: Path,
) -> None:
    node = LocalNode(0, None, tmp_path / "log", tmp_path / "state", tmp_path / "key")  # type: ignore[arg-type]
    assert node.saved_state() is None
    store = CheckpointStore(node.state_dir)

    def save(value: float) -> None:
        store.save(NodeState(round=int(value), seq=1, weight=1.0,
                             estimate=np.full(3, value), fingerprint=bytes(32)))

    save(1.0)
    save(2.0)
    assert node.saved_state().estimate.tolist() == [2.0, 2.0, 2.0]
    store.current.unlink()  # between a save's two renames
    assert node.saved_state().estimate.tolist() == [1.0, 1.0, 1.0]


def timed(seconds: float | None, watched: float = 200.0) -> dict:
    return {"training_seconds_to_target": seconds, "training_seconds_watched": watched}


def test_time_ratios_are_exact_when_both_reach_the_target_and_bounds_otherwise() -> None:
    assert training_ratio(timed(30.0), timed(100.0)) == "0.30"
    assert training_ratio(timed(30.0), timed(None, watched=150.0)) == "< 0.20"
    assert training_ratio(timed(None, watched=150.0), timed(50.0)) == "> 3.00"
    assert training_ratio(timed(None), timed(None)) == "-"


def test_a_goal_is_met_only_by_a_measured_time_within_its_limit() -> None:
    assert goal_met(timed(40.0), timed(100.0), 0.4)
    assert not goal_met(timed(41.0), timed(100.0), 0.4)
    assert goal_met(timed(99.0), timed(100.0), 1.0)  # "beats": strictly faster
    assert not goal_met(timed(100.0), timed(100.0), 1.0)
    # Only the codec reached the target: the reference's watched time bounds its own.
    assert goal_met(timed(50.0), timed(None, watched=150.0), 0.4)
    assert not goal_met(timed(None), timed(100.0), 0.4)
