"""Run real daemons on separate hosts in a network lab and measure what the network does.

Each host is a network namespace with its own IP (p2pfl/netlab.py); one daemon runs
per host (``ip netns exec ... python -m p2pfl.cli node``). Scenarios:

- ``baseline``: H hosts on one bridge; time until every node reaches the target.
- ``partition``: a 4|4 cut for 10 rounds, then the heal: round time during the cut,
  time to the first update across the old cut, push failures after the heal.
- ``slow``: every link at --rate-mbit with a 1.1M-parameter model (4.5 MB raw).
- ``nat``: 2 public hosts and 2 hosts behind each of 2 NATs (needs nftables): time to
  the first update between the NATs (through a relay) and until every pair across them
  has exchanged one (with ``--degree 5`` every pair are neighbours), and whether DCUtR
  turned relayed connections into direct ones (``--nat-ports random`` defeats it).
- ``loss``: baseline with --loss-percent on every host's inbound packets (needs nftables).

Needs root, iproute2 and, for ``nat`` and ``loss``, nftables (apt-get install -y nftables).
A live table shows every host; ``--json`` writes the measurements. Every namespace,
link, rule and daemon is removed on exit, Ctrl-C or a crash.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pfl.localnet import LocalNetworkError
from p2pfl.netlab import (
    Lab,
    LabError,
    LabNetwork,
    lab_unavailable_reason,
    nft_missing_reason,
    terminate_on_sigterm,
)

console = Console()
POLL_S = 0.5
Status = dict[str, Any]


def live_table(net: LabNetwork, statuses: list[Status | None], title: str) -> Table:
    table = Table(title=title)
    for column in ("host", "address", "round", "accuracy", "peers", "accepted", "sent", "failed"):
        table.add_column(column, justify="right")
    for index, status in enumerate(statuses):
        host = net.lab.hosts[index]
        where = host.address + ("" if host.nat is None else f" (nat{host.nat})")
        if status is None:
            table.add_row(str(index), where, "-", "-", "-", "-", "-", "-")
            continue
        accuracy = status["accuracy"]
        table.add_row(
            str(index),
            where,
            str(status["round"]),
            "-" if accuracy is None else f"{accuracy:.3f}",
            str(status["known_peers"]),
            str(status["updates_accepted"]),
            str(status["updates_sent"]),
            str(sum(status["send_failures"].values())),
        )
    return table


class Watch:
    """Polls every host's /status, keeps the live table fresh, and waits on conditions."""

    def __init__(self, net: LabNetwork, live: Live, title: str) -> None:
        self.net = net
        self.live = live
        self.title = title
        self.statuses: list[Status | None] = []

    def poll(self) -> list[Status | None]:
        self.statuses = self.net.statuses()
        self.live.update(live_table(self.net, self.statuses, self.title))
        return self.statuses

    def until(self, done: Callable[[list[Status | None]], bool], timeout: float) -> float | None:
        """Seconds until ``done(statuses)`` holds, or None after ``timeout``."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if done(self.poll()):
                return time.monotonic() - started
            time.sleep(POLL_S)
        return None


def all_reach(target: float) -> Callable[[list[Status | None]], bool]:
    def done(statuses: list[Status | None]) -> bool:
        return all(s is not None and (s["accuracy"] or 0.0) >= target for s in statuses)

    return done


def failures(statuses: list[Status | None]) -> int:
    return sum(sum(s["send_failures"].values()) for s in statuses if s is not None)


def accuracies(statuses: list[Status | None]) -> list[float]:
    return [s["accuracy"] or 0.0 for s in statuses if s is not None]


def started_network(lab: Lab, directory: Path, args: argparse.Namespace, *extra: str) -> LabNetwork:
    options = ("--send-timeout", str(args.send_timeout), *shlex.split(args.daemon_args), *extra)
    return LabNetwork(
        lab, str(directory), rounds=None, degree=args.degree, seed=args.seed, extra_args=options
    )


def scenario_baseline(args: argparse.Namespace, directory: Path, loss: float = 0.0) -> Status:
    name = "loss" if loss else "baseline"
    with Lab(args.hosts, loss_percent=loss) as lab, started_network(lab, directory, args) as net:
        with Live(console=console, refresh_per_second=2) as live:
            net.start_all()
            watch = Watch(net, live, f"{name}: {args.hosts} hosts")
            reached = watch.until(all_reach(args.target), args.timeout)
            watch.until(lambda s: False, args.settle)
        final = watch.statuses
    return {
        "scenario": name,
        "hosts": args.hosts,
        "loss_percent": loss,
        "seconds_to_target_after_last_start": reached,
        "accuracy_min": min(accuracies(final)),
        "push_failures": failures(final),
        "known_peers_min": min(s["known_peers"] for s in final if s),
    }


def _round_times(
    before: list[Status | None], after: list[Status | None], seconds: float
) -> list[float]:
    times = []
    for old, new in zip(before, after, strict=True):
        if old and new and new["round"] > old["round"]:
            times.append(seconds / (new["round"] - old["round"]))
    return times


def scenario_partition(args: argparse.Namespace, directory: Path) -> Status:
    half = args.hosts // 2
    sides = [list(range(half)), list(range(half, args.hosts))]
    with Lab(args.hosts) as lab, started_network(lab, directory, args) as net:
        with Live(console=console, refresh_per_second=2) as live:
            net.start_all()
            watch = Watch(net, live, f"partition: {args.hosts} hosts")
            watch.until(all_reach(args.target), args.timeout)
            connected = watch.poll()
            watch.until(lambda s: False, 5.0)
            before_cut = watch.poll()
            round_before = _round_times(connected, before_cut, 5.0)
            lab.partition(sides)
            watch.title = f"partition: cut {sides[0]} | {sides[1]}"
            cut_at = time.monotonic()
            rounds_at_cut = [s["round"] if s else 0 for s in before_cut]
            watch.until(
                lambda s: all(
                    x and x["round"] >= r + args.cut_rounds
                    for x, r in zip(s, rounds_at_cut, strict=True)
                ),
                args.timeout,
            )
            cut_seconds = time.monotonic() - cut_at
            at_heal = watch.poll()
            round_cut = _round_times(before_cut, at_heal, cut_seconds)
            peer_ids = [node.peer_id for node in net.nodes if node is not None]
            side_of = {peer_id: (0 if i < half else 1) for i, peer_id in enumerate(peer_ids)}

            def crossed(index: int, status: Status | None) -> bool:
                old = at_heal[index]
                if status is None or old is None:
                    return False
                mine = 0 if index < half else 1
                return any(
                    seq > old["last_seq"].get(sender, -1)
                    for sender, seq in status["last_seq"].items()
                    if side_of.get(sender, mine) != mine
                )

            lab.heal()
            watch.title = "partition: healed"
            first = watch.until(lambda s: any(crossed(i, x) for i, x in enumerate(s)), args.timeout)
            everyone = watch.until(
                lambda s: all(crossed(i, x) for i, x in enumerate(s)), args.timeout
            )
            healed_for = time.monotonic() - cut_at - cut_seconds
            watch.until(lambda s: False, max(0.0, args.settle - healed_for))
            healed_for = time.monotonic() - cut_at - cut_seconds
            final = watch.statuses
    return {
        "scenario": "partition",
        "hosts": args.hosts,
        "round_s_before_cut_median": statistics.median(round_before) if round_before else None,
        "round_s_during_cut_median": statistics.median(round_cut) if round_cut else None,
        "round_s_during_cut_max": max(round_cut) if round_cut else None,
        "cut_seconds": round(cut_seconds, 1),
        "push_failures_during_cut": failures(at_heal) - failures(before_cut),
        "seconds_to_first_cross_update": first,
        "seconds_until_every_node_crossed": None if everyone is None else (first or 0) + everyone,
        "push_failures_after_heal": failures(final) - failures(at_heal),
        "updates_sent_end": sum(s["updates_sent"] for s in final if s),
        "updates_accepted_end": sum(s["updates_accepted"] for s in final if s),
        "seconds_observed_after_heal": round(healed_for, 1),
        "accuracy_min_end": min(accuracies(final)),
        "known_peers_min_end": min(s["known_peers"] for s in final if s),
    }


def scenario_slow(args: argparse.Namespace, directory: Path) -> Status:
    task = ("--task", "p2pfl.netlab:wide_digits")
    with (
        Lab(args.hosts, rate_mbit=args.rate_mbit) as lab,
        started_network(lab, directory, args, *task) as net,
    ):
        with Live(console=console, refresh_per_second=2) as live:
            net.start_all()
            watch = Watch(net, live, f"slow: {args.hosts} hosts at {args.rate_mbit} Mbit/s")
            reached = watch.until(all_reach(args.target), args.timeout)
            final = watch.statuses
    statuses = [s for s in final if s]
    return {
        "scenario": "slow",
        "hosts": args.hosts,
        "rate_mbit": args.rate_mbit,
        "send_timeout_s": args.send_timeout,
        "seconds_to_target_after_last_start": reached,
        "accuracy_min": min(accuracies(final)),
        "accuracy_median": statistics.median(accuracies(final)),
        "rounds_median": statistics.median(s["round"] for s in statuses),
        "updates_sent": sum(s["updates_sent"] for s in statuses),
        "updates_accepted": sum(s["updates_accepted"] for s in statuses),
        "push_failures": failures(final),
        "rejected": dict(sum((Counter(s["updates_rejected"]) for s in statuses), Counter())),
        "known_peers_min": min(s["known_peers"] for s in statuses),
    }


def _cross_nat_pairs(nats: list[list[int]]) -> list[tuple[int, int]]:
    return [(a, b) for a in nats[0] for b in nats[1]] + [(b, a) for a in nats[0] for b in nats[1]]


def _links(statuses: list[Status | None], pairs: list[tuple[int, int]], ids: list[str]) -> Counter:
    """How each (host, host behind the other NAT) pair is connected: direct, relayed, none."""
    kinds: Counter[str] = Counter()
    for a, b in pairs:
        view = statuses[a]["reachability"] if statuses[a] else {}
        if ids[b] in view.get("direct_peers", []):
            kinds["direct"] += 1
        elif ids[b] in view.get("relayed_peers", {}):
            kinds["relayed"] += 1
        else:
            kinds["none"] += 1
    return kinds


def scenario_nat(args: argparse.Namespace, directory: Path) -> Status:
    # Hosts 0-1 public, 2-3 behind NAT 0, 4-5 behind NAT 1. Both hosts behind a NAT
    # listen on port 4001, so the router keeps that port for one of them only.
    nats = [[2, 3], [4, 5]]
    pairs = _cross_nat_pairs(nats)
    title = f"nat ({args.nat_ports} ports): 0-1 public, 2-3 behind nat0, 4-5 behind nat1"
    with Lab(6, nats=nats, nat_ports=args.nat_ports) as lab, started_network(
        lab, directory, args
    ) as net:
        with Live(console=console, refresh_per_second=2) as live:
            net.start_all()
            ids = [node.peer_id or "" for node in net.started()]
            watch = Watch(net, live, title)

            def heard(statuses: list[Status | None], a: int, b: int) -> bool:
                status = statuses[a]
                return status is not None and ids[b] in status["last_seq"]

            # One clock for all three: each is the first poll at which it held.
            goals: dict[str, Callable[[list[Status | None]], bool]] = {
                "first_update": lambda s: any(heard(s, a, b) for a, b in pairs),
                "every_pair_heard": lambda s: all(heard(s, a, b) for a, b in pairs),
                "first_direct": lambda s: _links(s, pairs, ids)["direct"] > 0,
            }
            reached: dict[str, float] = {}
            started = time.monotonic()

            def all_reached(statuses: list[Status | None]) -> bool:
                for name, goal in goals.items():
                    if name not in reached and goal(statuses):
                        reached[name] = time.monotonic() - started
                return len(reached) == len(goals)

            watch.until(all_reached, args.timeout)
            first = watch.poll()
            watch.until(lambda s: False, args.settle)
            final = watch.statuses
    links = _links(final, pairs, ids)
    round_s = _round_times(first, final, args.settle)
    return {
        "scenario": "nat",
        "nat_ports": args.nat_ports,
        "seconds_to_first_cross_nat_update": reached.get("first_update"),
        "seconds_until_every_cross_nat_pair_heard": reached.get("every_pair_heard"),
        "seconds_to_first_direct_cross_nat_connection": reached.get("first_direct"),
        "cross_nat_pairs": len(pairs),
        "pairs_heard_at_end": sum(heard(final, a, b) for a, b in pairs),
        "pairs_direct_at_end": links["direct"],
        "pairs_relayed_at_end": links["relayed"],
        "pairs_unconnected_at_end": links["none"],
        "round_s_public_median": statistics.median(round_s[:2]),
        "round_s_natted_median": statistics.median(round_s[2:]),
        "accuracy_min": min(accuracies(final)),
        "push_failures": failures(final),
    }


SCENARIOS = ("baseline", "partition", "slow", "nat", "loss")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", choices=SCENARIOS, default=["baseline", "partition"]
    )
    parser.add_argument("--hosts", type=int, default=8, help="hosts (default 8)")
    parser.add_argument("--degree", type=int, default=3, help="neighbours per node (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--target", type=float, default=0.90, help="accuracy target (0.90)")
    parser.add_argument("--timeout", type=float, default=180.0, help="longest wait per phase (s)")
    parser.add_argument("--settle", type=float, default=30.0, help="seconds observed at the end")
    parser.add_argument("--cut-rounds", type=int, default=10, help="rounds the cut lasts (10)")
    parser.add_argument("--rate-mbit", type=float, default=10.0, help="link rate for `slow`")
    parser.add_argument("--loss-percent", type=float, default=2.0, help="loss for `loss` (2)")
    parser.add_argument("--send-timeout", type=float, default=5.0, help="daemon --send-timeout")
    parser.add_argument(
        "--daemon-args", default="", help='more daemon flags, e.g. "--read-timeout 60"'
    )
    parser.add_argument(
        "--nat-ports",
        choices=["keep", "random"],
        default="keep",
        help="`nat`: routers keep source ports (hole punching can work) or randomise them",
    )
    parser.add_argument("--json", type=Path, help="write the measurements here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if reason := lab_unavailable_reason():
        console.print(f"netlab: {reason}")
        return 2
    results = []
    with terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="p2lab-") as tmp:
        for name in args.scenarios:
            if name in ("nat", "loss") and (reason := nft_missing_reason()):
                console.print(f"netlab: {name} skipped: {reason}")
                continue
            directory = Path(tmp) / name
            try:
                if name == "baseline":
                    result = scenario_baseline(args, directory)
                elif name == "loss":
                    result = scenario_baseline(args, directory, loss=args.loss_percent)
                elif name == "partition":
                    result = scenario_partition(args, directory)
                elif name == "slow":
                    result = scenario_slow(args, directory)
                else:
                    result = scenario_nat(args, directory)
            except (LabError, LocalNetworkError) as error:
                console.print(f"netlab: {name} failed: {error}")
                return 1
            results.append(result)
            summary = Table(title=f"netlab {name}")
            summary.add_column("measure")
            summary.add_column("value", justify="right")
            for key, value in result.items():
                summary.add_row(key, f"{value:.2f}" if isinstance(value, float) else str(value))
            console.print(summary)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; every `with Lab` has torn down by now
        console.print("netlab: interrupted; the lab and its daemons are gone")
        sys.exit(130)
