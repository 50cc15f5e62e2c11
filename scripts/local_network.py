"""Run N real node daemons on loopback and watch them learn (``make demo`` runs 8).

Node 0 starts first; the others bootstrap from the address it prints. Each
trains on its own non-IID shard of the digits data (Dirichlet label skew)
and gossips signed updates over libp2p. A live table shows every node's
round and accuracy, and a page (its URL is printed first, on 127.0.0.1) shows
every node side by side, accuracy over time per node and the gossip graph; at
the end each node's final accuracy is printed. Every process is stopped on
exit, whatever happens.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pfl.lab.localnet import LocalNetwork, LocalNetworkError
from p2pfl.lab.netpage import NetworkPage, NetworkPageServer
from p2pfl.lab.netview import Row, status_table

console = Console()


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=positive_int, default=8, help="daemons to run (default 8)")
    parser.add_argument(
        "--rounds", type=positive_int, default=20, help="local rounds per node (default 20)"
    )
    parser.add_argument("--task", default="digits", help="digits, breast-cancer or module:function")
    parser.add_argument(
        "--partition",
        default="dirichlet:0.5",
        help="iid, dirichlet:ALPHA or quantity:ALPHA (default dirichlet:0.5)",
    )
    parser.add_argument("--degree", type=positive_int, default=3, help="neighbours per node")
    parser.add_argument(
        "--local-epochs",
        type=positive_int,
        default=5,
        help="epochs over each node's shard per round (default 5: demo shards are tiny)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--linger",
        type=float,
        default=15.0,
        help="seconds a finished node keeps gossiping for the late starters (default 15: "
        "the demo's nodes start within about 12 s of each other)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("runs/local-network"),
        help="keys, state and logs go here (default runs/local-network)",
    )
    parser.add_argument(
        "--page-port", type=int, default=0,
        help="port of the network page on 127.0.0.1 (default 0: a free one)",
    )
    parser.add_argument(
        "--timeout", type=float, default=170.0, help="give up after this many seconds (default 170)"
    )
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    return args


def render(network: LocalNetwork, statuses: list[dict | None], rounds: int, title: str) -> Table:
    rows = [
        Row(str(node.index), (node.peer_id or "")[-10:], status, node.final_accuracy)
        for node, status in zip(network.nodes, statuses, strict=True)
        if node is not None
    ]
    return status_table(title, rows, rounds)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.print(
        f"Starting {args.nodes} daemons on 127.0.0.1 ({args.task}, {args.partition}, "
        f"{args.rounds} rounds); logs in {args.out}/node-*/node.log"
    )
    if args.out.exists():
        if any(p for p in args.out.iterdir() if not p.name.startswith("node-")):
            console.print(f"[red]error:[/red] {args.out} holds other files; choose another --out")
            return 2
        # A demo starts fresh: old checkpoints would resume nodes at their last round.
        shutil.rmtree(args.out)
    page = NetworkPage()
    try:
        server = NetworkPageServer(page, args.page_port)
    except OSError as error:
        console.print(f"[red]error:[/red] --page-port {args.page_port}: {error.strerror}")
        return 2
    with server:
        console.print(f"network page: {server.url}")
        return run(args, page)


def run(args: argparse.Namespace, page: NetworkPage) -> int:
    """Start the daemons, watch them (table and page) until they finish, report."""
    started = time.monotonic()
    with LocalNetwork(
        args.out,
        args.nodes,
        rounds=args.rounds,
        task=args.task,
        partition=args.partition,
        degree=args.degree,
        seed=args.seed,
        local_epochs=args.local_epochs,
        extra_args=("--linger", str(args.linger)),
    ) as network:
        try:
            network.start_all()
        except LocalNetworkError as error:
            console.print(f"[red]error:[/red] {error}")
            return 1
        last: list[dict | None] = [None] * args.nodes
        with Live(console=console, refresh_per_second=4) as live:

            def redraw() -> bool:
                nonlocal last
                statuses = network.statuses()
                page.update(network, statuses)
                last = [s if s is not None else old for s, old in zip(statuses, last, strict=True)]
                live.update(render(network, statuses, args.rounds, "p2pfl local network (live)"))
                return False  # watch until every node has exited, or the timeout

            remaining = args.timeout - (time.monotonic() - started)
            network.wait_for(redraw, remaining, poll=0.25)
            if any(node.running for node in network.started()):
                console.print(f"[red]timed out after {args.timeout:.0f} s; stopping[/red]")
        network.wait_all_exited(10)
        elapsed = time.monotonic() - started
        final = Table(title=f"Final accuracy after {args.rounds} rounds ({elapsed:.1f} s wall)")
        for column in ("node", "peer id", "final accuracy", "updates accepted", "rejected"):
            final.add_column(column, justify="right" if column != "peer id" else "left")
        accuracies = []
        for node, status in zip(network.started(), last, strict=True):
            accuracy = node.final_accuracy
            if accuracy is not None:
                accuracies.append(accuracy)
            final.add_row(
                str(node.index),
                node.peer_id or "?",
                f"{accuracy:.4f}" if accuracy is not None else "did not finish",
                str(status["updates_accepted"]) if status else "-",
                str(sum(status["updates_rejected"].values())) if status else "-",
            )
        console.print(final)
        if len(accuracies) < args.nodes:
            console.print(
                f"[red]{args.nodes - len(accuracies)} node(s) did not finish; see the "
                f"logs in {args.out}[/red]"
            )
            return 1
        console.print(f"mean {sum(accuracies) / len(accuracies):.4f}, min {min(accuracies):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
