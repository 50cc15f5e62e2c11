"""Watching a lab's daemons: polls of every /status, waits, and what is measured.

:class:`Watch` polls every host into the live table and the
:class:`~p2pfl.lab.netview.History`; the functions below turn statuses into numbers.
The models' spread is read from the checkpoints the daemons write every round
(:meth:`~p2pfl.lab.localnet.LocalNode.saved_state`), so measuring it costs the daemons
nothing, and computed by the simulator's own ``consensus_distance`` (one source).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Sequence

import networkx as nx
import numpy as np
import torch
from rich.table import Table

from p2pfl.lab.netlab import LISTEN_PORT, LabNetwork
from p2pfl.lab.netview import History, Row, Status, status_table
from topologies.stacked_pushsum import consensus_distance

POLL_S = 0.5
# Accuracy on the digits test split moves by a sample or two between polls: a node
# "has the connected network's accuracy" within this much of it.
ACCURACY_SLACK = 0.01
# Seconds of polls averaged for a reference value (before a cut, at the end of a run).
WINDOW_S = 5.0
Statuses = list[Status | None]
Show = Callable[[Table], None]



class Watch:
    """Polls every host's /status into the live table and the history; waits on conditions."""

    def __init__(self, net: LabNetwork, history: History, show: Show | None,
                 spread: bool = False, mass: bool = False) -> None:
        self.net = net
        self.history = history
        self.show = show
        self.spread = spread
        """Also read the checkpoints and record the consensus distance at each poll."""
        self.mass = mass
        """Also record all push-sum mass over its starting total at each poll."""
        self.statuses: Statuses = []
        self.distance: float | None = None

    def poll(self) -> Statuses:
        self.statuses = self.net.statuses()
        self.history.record(self.statuses)
        if self.spread:
            self.distance = model_spread(self.net)
            if self.distance is not None:
                self.history.add("consensus distance", self.distance, log=True)
        if self.mass and all(self.statuses):
            # Read from every node within a few ms, while shares move: a snapshot
            # can miss or double-count a share or two (see ``mass_window``).
            self.history.add("push-sum mass / start",
                             weight_total(self.statuses) / initial_weight(self.statuses))
        if self.show is not None:
            rows = [Row(str(host.index), host.address + ("" if host.nat is None
                                                          else f" (nat{host.nat})"), status)
                    for host, status in zip(self.net.lab.hosts, self.statuses, strict=True)]
            self.show(status_table(self.history.title, rows))
        return self.statuses

    def until(self, done: Callable[[Statuses], bool], timeout: float,
              since: float | None = None) -> float | None:
        """Seconds (since ``since``, a :meth:`History.now`, or since the call) until
        ``done(statuses)`` holds, or None after ``timeout``."""
        start = self.history.now() if since is None else since
        found = self.net.wait_for(lambda: done(self.poll()), timeout, poll=POLL_S)
        return self.history.now() - start if found else None

    def first_times(self, conditions: dict[str, Callable[[Statuses], bool]], timeout: float,
                    since: float) -> dict[str, tuple[float, Statuses] | None]:
        """For each condition: the seconds since ``since`` and the statuses when it first held."""
        first: dict[str, tuple[float, Statuses] | None] = dict.fromkeys(conditions)

        def check(statuses: Statuses) -> bool:
            for name, condition in conditions.items():
                if first[name] is None and condition(statuses):
                    first[name] = (self.history.now() - since, statuses)
            return all(value is not None for value in first.values())

        self.until(check, timeout)
        return first

    def hold(self, seconds: float) -> list[Statuses]:
        """Poll for ``seconds``; every poll's statuses."""
        polls: list[Statuses] = []
        self.until(lambda s: polls.append(s) is not None, seconds)
        return polls


def model_spread(net: LabNetwork) -> float | None:
    """Mean squared distance of the members' models to their mean (as the simulator's)."""
    states = [node.saved_state() for node in net.started()]
    if any(state is None for state in states) or len(states) < 2:
        return None
    estimates = torch.from_numpy(np.stack([state.estimate for state in states if state]))
    return consensus_distance(estimates)


def accuracies(statuses: Statuses) -> list[float]:
    return [s["accuracy"] or 0.0 for s in statuses if s is not None]


def all_reach(target: float) -> Callable[[Statuses], bool]:
    def done(statuses: Statuses) -> bool:
        return all(s is not None and (s["accuracy"] or 0.0) >= target for s in statuses)

    return done


def every_node_trained(statuses: Statuses) -> bool:
    return all(s is not None and s["round"] >= 1 for s in statuses)


def failures(statuses: Statuses) -> int:
    return sum(sum(s["send_failures"].values()) for s in statuses if s is not None)


def rounds(statuses: Statuses) -> list[int]:
    return [s["round"] if s else 0 for s in statuses]


def weight_total(statuses: Statuses) -> float:
    """All push-sum mass: what the nodes hold, what waits to be merged, what is in flight."""
    return sum(s["weight"] + s.get("weight_pending", 0.0) + s.get("weight_in_flight", 0.0)
               for s in statuses if s is not None)


def mass_window(history: History, polls: int) -> dict[str, float | None]:
    """All push-sum mass over its starting total in the last ``polls`` polls: mean and range.

    One poll reads every node in parallel within a few ms while shares move between
    them, so a single reading is off by a share or two; the mean over many is not.
    """
    ratios = [value for _, value in history.series.get("push-sum mass / start", [])[-polls:]]
    if not ratios:
        return {"mass_ratio_end_mean": None, "mass_ratio_end_min": None,
                "mass_ratio_end_max": None}
    return {"mass_ratio_end_mean": round(statistics.mean(ratios), 4),
            "mass_ratio_end_min": round(min(ratios), 4),
            "mass_ratio_end_max": round(max(ratios), 4)}


def unreachable(statuses: Statuses) -> int:
    return sum(s.get("peers_unreachable", 0) for s in statuses if s is not None)


def initial_weight(statuses: Statuses) -> float:
    """What the weights summed to at the start: each node starts at max(samples, 1)."""
    return float(sum(max(s["samples"], 1) for s in statuses if s is not None))


def round_seconds(before: Statuses, after: Statuses, seconds: float) -> list[float]:
    return [seconds / (new["round"] - old["round"])
            for old, new in zip(before, after, strict=True)
            if old and new and new["round"] > old["round"]]


def median_or_none(values: Sequence[float]) -> float | None:
    return statistics.median(values) if values else None


def mean_or_none(values: Sequence[float]) -> float | None:
    return statistics.mean(values) if values else None


def rounded(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(value, digits)


def gossip_graph(statuses: Statuses, peer_ids: Sequence[str | None]) -> nx.Graph:
    """The undirected graph of who pushes to whom, from every node's ``neighbours``."""
    index = {peer_id: i for i, peer_id in enumerate(peer_ids) if peer_id}
    graph = nx.Graph()
    graph.add_nodes_from(range(len(peer_ids)))
    for i, status in enumerate(statuses):
        for neighbour in status["neighbours"] if status else ():
            if neighbour in index:
                graph.add_edge(i, index[neighbour])
    return graph


def books_complete(net: LabNetwork) -> bool:
    """Every node's saved peer book holds every other node at its lab address."""
    expected = {node.peer_id: f"/ip4/{net.lab.hosts[node.index].address}/tcp/{LISTEN_PORT}"
                for node in net.started()}
    for node in net.started():
        state = node.saved_state()
        if state is None:
            return False
        for peer_id, address in expected.items():
            if peer_id != node.peer_id and not any(
                addr.startswith(address) for addr in state.peers.get(peer_id, [])
            ):
                return False
    return True

