"""Scenarios of the network lab, measured on real daemons (scripts/netlab.py, bench_bandwidth.py).

Each scenario builds a :class:`~p2pfl.lab.netlab.Lab`, runs one daemon per host, watches
them (:mod:`p2pfl.lab.labwatch`), and returns its measurements as a flat dict with the
:class:`~p2pfl.lab.netview.History` of each run. Nothing here asserts: the numbers go to
docs/NETLAB.md; the tests assert on behaviour. The spectral gap's expectation comes from
``topologies.mixing`` (one source with the simulator).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from p2pfl.lab.labwatch import (
    ACCURACY_SLACK,
    POLL_S,
    WINDOW_S,
    Show,
    Statuses,
    Watch,
    accuracies,
    all_reach,
    books_complete,
    every_node_trained,
    failures,
    gossip_graph,
    initial_weight,
    mass_window,
    mean_or_none,
    median_or_none,
    round_seconds,
    rounded,
    rounds,
    unreachable,
    weight_total,
)
from p2pfl.lab.netlab import Lab, LabNetwork
from p2pfl.lab.netview import History, Status
from p2pfl.lab.revocation import run_revoke
from topologies.mixing import metropolis_hastings, rounds_to_consensus, spectral_gap


@dataclass(frozen=True)
class LabOptions:
    hosts: int = 8
    degree: int = 3
    seed: int = 0
    target: float = 0.90
    timeout: float = 180.0
    settle: float = 30.0
    cut_rounds: int = 10
    rate_mbit: float = 10.0
    loss_percent: float = 2.0
    send_timeout: float = 5.0
    local_epochs: int = 5
    daemon_args: tuple[str, ...] = ()
    # `nat`: routers keep source ports (hole punching can work) or randomise them.
    nat_ports: str = "keep"
    # `revoke`: revocations measured one after another before the one during a cut.
    revocations: int = 3


def network(lab: Lab, directory: Path, options: LabOptions, *extra: str) -> LabNetwork:
    daemon = ("--send-timeout", str(options.send_timeout), *options.daemon_args, *extra)
    return LabNetwork(lab, str(directory), rounds=None, degree=options.degree,
                      seed=options.seed, local_epochs=options.local_epochs, extra_args=daemon)


def run_to_target(options: LabOptions, directory: Path, show: Show | None, title: str, *,
                  rate_mbit: float | None = None, loss_percent: float = 0.0,
                  extra: Sequence[str] = (), settle: float = 0.0,
                  limit_after_join: bool = False) -> tuple[Status, History]:
    """Start the hosts, wait until every node reaches the target (or the timeout), settle.

    Times count from the moment the last daemon is up: ``seconds_to_first_round`` is
    joining (every node has adopted a model and trained once), ``seconds_to_target``
    the whole wait, so ``training_seconds_to_target`` is the gossip's share. With
    ``limit_after_join`` the links get ``rate_mbit`` only once every node has joined.
    """
    history = History(title)
    first_rate = None if limit_after_join else rate_mbit
    with Lab(options.hosts, rate_mbit=first_rate, loss_percent=loss_percent) as lab, \
            network(lab, directory, options, *extra) as net:
        net.start_all()
        history.mark("all up")
        up = history.now()
        watch = Watch(net, history, show, mass=True)
        joined = watch.until(every_node_trained, options.timeout, since=up)
        accuracy_at_join = mean_or_none(accuracies(watch.statuses))
        if limit_after_join and joined is not None:
            lab.limit_rate(rate_mbit)
            history.mark(f"{rate_mbit:g} Mbit/s")
        left = options.timeout - (joined or options.timeout)
        reached = None
        if joined is not None:
            reached = watch.until(all_reach(options.target), left, since=up)
        rounds_at_target = rounds(watch.statuses)
        ends = watch.hold(max(settle, WINDOW_S))
        final = watch.statuses
    alive = [s for s in final if s]
    # Over the last seconds: one poll's accuracy moves by a test sample or two.
    means = [mean_or_none(accuracies(s)) for s in ends[-int(WINDOW_S / POLL_S):]]
    mean_accuracy = mean_or_none([m for m in means if m is not None])
    return {
        "seconds_to_first_round": joined,
        "accuracy_mean_at_first_round": rounded(accuracy_at_join),
        "seconds_to_target": reached,
        "training_seconds_to_target": None if reached is None else reached - (joined or 0.0),
        # When the target was not reached: training took longer than this.
        "training_seconds_watched": None if joined is None else round(left, 1),
        "rounds_median_at_target": None if reached is None else statistics.median(
            rounds_at_target),
        "accuracy_min_end": min(accuracies(final), default=None),
        "accuracy_mean_end": rounded(mean_accuracy),
        "rounds_median_end": statistics.median(rounds(final)),
        "updates_sent": sum(s["updates_sent"] for s in alive),
        "updates_accepted": sum(s["updates_accepted"] for s in alive),
        "bytes_sent_mb": round(sum(s["bytes_sent"] for s in alive) / 1e6, 2),
        "push_failures": failures(final),
        # Top-k: pushes that carried a link's whole copy afresh (int8).
        "whole_copies_sent": sum(s.get("whole_copies_sent", 0) for s in alive),
        "rejected": dict(sum((Counter(s["updates_rejected"]) for s in alive), Counter())),
        "known_peers_min": min((s["known_peers"] for s in alive), default=None),
        # What became of pushed shares (delivered, refused, refunded, lost, held).
        "deliveries": dict(sum((Counter(s.get("deliveries", {})) for s in alive), Counter())),
        **mass_window(history, len(ends)),
        "weight_total_end": round(weight_total(final), 3),
        "weight_in_flight_end": round(sum(s.get("weight_in_flight", 0.0) for s in alive), 3),
        "weight_total_start": initial_weight(final),
    }, history


def training_ratio(run: dict, reference: dict) -> str:
    """Training time of ``run`` over ``reference``'s; a bound when one did not reach the target.

    A run that did not reach it trained for longer than it was watched.
    """
    value, base = run["training_seconds_to_target"], reference["training_seconds_to_target"]
    if value is not None and base is not None:
        return f"{value / base:.2f}"
    if value is not None and reference["training_seconds_watched"]:
        return f"< {value / reference['training_seconds_watched']:.2f}"
    if base is not None and run["training_seconds_watched"]:
        return f"> {run['training_seconds_watched'] / base:.2f}"
    return "-"


def goal_met(run: dict, reference: dict, limit: float) -> bool:
    """Training time within ``limit`` x the reference's (strictly below it for limit 1).

    When only ``run`` reached the target, the reference's watched time bounds its own.
    """
    value = run["training_seconds_to_target"]
    base = reference["training_seconds_to_target"] or reference["training_seconds_watched"]
    if value is None or not base:
        return False
    return value / base < limit if limit >= 1.0 else value / base <= limit


def scenario_baseline(options: LabOptions, directory: Path, show: Show | None) -> tuple[
        Status, list[History]]:
    result, history = run_to_target(options, directory, show, f"baseline: {options.hosts} hosts",
                                    settle=options.settle)
    return {"scenario": "baseline", "hosts": options.hosts, **result}, [history]


def scenario_loss(options: LabOptions, directory: Path, show: Show | None) -> tuple[
        Status, list[History]]:
    """A clean run and a run with ``loss_percent`` on every link, same seed, one after the other."""
    runs = {}
    histories = []
    for name, loss in (("clean", 0.0), ("lossy", options.loss_percent)):
        title = f"loss: {options.hosts} hosts, {loss:g} % loss"
        runs[name], history = run_to_target(options, directory / name, show, title,
                                            loss_percent=loss, settle=options.settle)
        histories.append(history)
    clean, lossy = runs["clean"], runs["lossy"]
    result: Status = {"scenario": "loss", "hosts": options.hosts,
                      "loss_percent": options.loss_percent}
    for name, run in runs.items():
        result.update({f"{name}_{key}": value for key, value in run.items()
                       if key != "rejected"})
    reached, reference = lossy["accuracy_mean_end"], clean["accuracy_mean_end"]
    result["lossy_reaches_clean_accuracy"] = (
        None if reached is None or reference is None else reached >= reference - ACCURACY_SLACK)
    return result, histories


def scenario_slow(options: LabOptions, directory: Path, show: Show | None) -> tuple[
        Status, list[History]]:
    title = f"slow: {options.hosts} hosts at {options.rate_mbit:g} Mbit/s"
    result, history = run_to_target(options, directory, show, title, rate_mbit=options.rate_mbit,
                                    extra=("--task", "p2pfl.lab.netlab:wide_digits"))
    return {"scenario": "slow", "hosts": options.hosts, "rate_mbit": options.rate_mbit,
            **result}, [history]


def scenario_partition(options: LabOptions, directory: Path, show: Show | None) -> tuple[
        Status, list[History]]:
    """Cut the hosts in two halves for ``cut_rounds`` rounds, heal, and time the recovery.

    Recovered means: every node's accuracy is back within ``ACCURACY_SLACK`` of the
    connected network's (the mean of the lowest node's over the seconds before the
    cut), and the consensus distance is at most its mean over those seconds. The
    expectation is ``rounds_to_consensus`` on the gossip graph's spectral gap for
    shrinking the spread from its value at the heal to that reference.
    """
    half = options.hosts // 2
    sides = [list(range(half)), list(range(half, options.hosts))]
    history = History(f"partition: {options.hosts} hosts, {options.cut_rounds} rounds cut")
    with Lab(options.hosts) as lab, network(lab, directory, options) as net:
        net.start_all()
        history.mark("all up")
        watch = Watch(net, history, show, spread=True)
        watch.until(all_reach(options.target), options.timeout)
        connected = watch.hold(WINDOW_S)
        spread_ref = statistics.mean(d for _, d in history.series["consensus distance"][-len(
            connected):])
        accuracy_ref = statistics.mean(min(accuracies(s)) for s in connected)
        before_cut = watch.statuses
        lab.partition(sides)
        history.mark("cut")
        at_cut = rounds(before_cut)
        most_unreachable = 0

        def cut_over(statuses: Statuses) -> bool:
            nonlocal most_unreachable
            most_unreachable = max(most_unreachable, unreachable(statuses))
            return all(r >= c + options.cut_rounds
                       for r, c in zip(rounds(statuses), at_cut, strict=True))

        cut_s = watch.until(cut_over, options.timeout)
        at_heal = watch.statuses
        spread_at_heal = watch.distance
        books_at_heal = books_complete(net)
        lab.heal()
        history.mark("heal")
        healed_at = history.now()
        heal_rounds = rounds(at_heal)
        peer_ids = [node.peer_id for node in net.started()]
        side_of = {peer_id: (0 if i < half else 1) for i, peer_id in enumerate(peer_ids)}

        def crossed(index: int, status: Status | None) -> bool:
            """Node ``index`` accepted an update from the other side since the heal."""
            old = at_heal[index]
            if status is None or old is None:
                return False
            mine = 0 if index < half else 1
            return any(seq > old["last_seq"].get(sender, -1)
                       for sender, seq in status["last_seq"].items()
                       if side_of.get(sender, mine) != mine)

        first = watch.first_times({
            "one crossed": lambda s: any(crossed(i, x) for i, x in enumerate(s)),
            "all crossed": lambda s: all(crossed(i, x) for i, x in enumerate(s)),
            "accuracy": all_reach(accuracy_ref - ACCURACY_SLACK),
            "consensus": lambda s: watch.distance is not None and watch.distance <= spread_ref,
            "books": lambda s: books_complete(net),
            "reachable": lambda s: unreachable(s) == 0,
        }, options.timeout, since=healed_at)

        def seconds(name: str) -> float | None:
            found = first[name]
            return None if found is None else round(found[0], 2)

        def rounds_since_heal(name: str) -> float | None:
            found = first[name]
            if found is None:
                return None
            return statistics.median(r - h for r, h in zip(rounds(found[1]), heal_rounds,
                                                             strict=True))

        watch.hold(options.settle)
        final = watch.statuses
    gap = spectral_gap(metropolis_hastings(gossip_graph(final, peer_ids)))
    expected = None
    if spread_at_heal and spread_at_heal > spread_ref and gap > 0:
        # The distance is squared: shrinking it by r shrinks the norm by sqrt(r).
        expected = rounds_to_consensus(gap, math.sqrt(spread_ref / spread_at_heal))
    return {
        "scenario": "partition",
        "hosts": options.hosts,
        "accuracy_connected": round(accuracy_ref, 4),
        "consensus_distance_connected": spread_ref,
        "consensus_distance_at_heal": spread_at_heal,
        "round_s_before_cut_median": median_or_none(round_seconds(connected[0], connected[-1],
                                                                  WINDOW_S)),
        "round_s_during_cut_median": median_or_none(round_seconds(before_cut, at_heal,
                                                                  cut_s or options.timeout)),
        "cut_seconds": cut_s,
        "push_failures_during_cut": failures(at_heal) - failures(before_cut),
        "known_peers_min_at_heal": min(s["known_peers"] for s in at_heal if s),
        "books_complete_at_heal": books_at_heal,
        "peers_unreachable_most_during_cut": most_unreachable,
        "seconds_to_first_cross_update": seconds("one crossed"),
        "seconds_until_every_node_crossed": seconds("all crossed"),
        "seconds_to_connected_accuracy": seconds("accuracy"),
        "rounds_to_connected_accuracy": rounds_since_heal("accuracy"),
        "seconds_to_connected_consensus": seconds("consensus"),
        "rounds_to_connected_consensus": rounds_since_heal("consensus"),
        "spectral_gap": round(gap, 4),
        "rounds_expected_from_gap": expected,
        "seconds_until_books_complete": seconds("books"),
        "seconds_until_every_peer_reachable": seconds("reachable"),
        "push_failures_after_heal": failures(final) - failures(at_heal),
        "accuracy_min_end": min(accuracies(final)),
        "known_peers_min_end": min(s["known_peers"] for s in final if s),
    }, [history]


def cross_nat_pairs(nats: list[list[int]]) -> list[tuple[int, int]]:
    """Every ordered (host, host behind the other NAT) pair."""
    return [(a, b) for a in nats[0] for b in nats[1]] + [(b, a) for a in nats[0] for b in nats[1]]


def nat_links(statuses: Statuses, pairs: list[tuple[int, int]], ids: list[str]) -> Counter:
    """How each cross-NAT pair is connected, from the first host's /status: direct,
    relayed or none."""
    kinds: Counter[str] = Counter()
    for a, b in pairs:
        status = statuses[a]
        view = status["reachability"] if status else {}
        if ids[b] in view.get("direct_peers", []):
            kinds["direct"] += 1
        elif ids[b] in view.get("relayed_peers", {}):
            kinds["relayed"] += 1
        else:
            kinds["none"] += 1
    return kinds


def scenario_nat(options: LabOptions, directory: Path, show: Show | None) -> tuple[
        Status, list[History]]:
    # Hosts 0-1 public, 2-3 behind NAT 0, 4-5 behind NAT 1. Both hosts behind a NAT
    # listen on port 4001, so the router keeps that port for one of them only.
    nats = [[2, 3], [4, 5]]
    pairs = cross_nat_pairs(nats)
    options = replace(options, hosts=6)
    history = History(
        f"nat ({options.nat_ports} ports): 0-1 public, 2-3 behind nat0, 4-5 behind nat1"
    )
    with Lab(6, nats=nats, nat_ports=options.nat_ports) as lab, network(
        lab, directory, options
    ) as net:
        net.start_all()
        history.mark("all up")
        started = history.now()
        watch = Watch(net, history, show)
        ids = [node.peer_id or "" for node in net.started()]

        def heard(statuses: Statuses, a: int, b: int) -> bool:
            status = statuses[a]
            return status is not None and ids[b] in status["last_seq"]

        # One clock for all three: each is the first poll at which it held.
        first = watch.first_times(
            {
                "first_update": lambda s: any(heard(s, a, b) for a, b in pairs),
                "every_pair_heard": lambda s: all(heard(s, a, b) for a, b in pairs),
                "first_direct": lambda s: nat_links(s, pairs, ids)["direct"] > 0,
            },
            options.timeout,
            since=started,
        )
        before = watch.poll()
        watch.hold(options.settle)
        final = watch.statuses
    links = nat_links(final, pairs, ids)
    round_s = round_seconds(before, final, options.settle)

    def seconds(name: str) -> float | None:
        found = first[name]
        return None if found is None else found[0]

    return {
        "scenario": "nat",
        "nat_ports": options.nat_ports,
        "seconds_to_first_cross_nat_update": seconds("first_update"),
        "seconds_until_every_cross_nat_pair_heard": seconds("every_pair_heard"),
        "seconds_to_first_direct_cross_nat_connection": seconds("first_direct"),
        "cross_nat_pairs": len(pairs),
        "pairs_heard_at_end": sum(heard(final, a, b) for a, b in pairs),
        "pairs_direct_at_end": links["direct"],
        "pairs_relayed_at_end": links["relayed"],
        "pairs_unconnected_at_end": links["none"],
        "round_s_public_median": median_or_none(round_s[:2]),
        "round_s_natted_median": median_or_none(round_s[2:]),
        "accuracy_min": min(accuracies(final)),
        "push_failures": failures(final),
    }, [history]


SCENARIOS = {
    "baseline": scenario_baseline,
    "partition": scenario_partition,
    "slow": scenario_slow,
    "nat": scenario_nat,
    "loss": scenario_loss,
    "revoke": run_revoke,
}
NEEDS_NFT = ("nat", "loss")
