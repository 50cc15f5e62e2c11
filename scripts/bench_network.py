"""Benchmark the network: how fast 8 real daemons learn, and how fast one update moves.

Part (a), learning speed: ``--nodes`` real daemons on 127.0.0.1 until every
node's accuracy reaches ``--target`` (:mod:`p2pfl.bench.learning`). Part (b),
the throughput of one update exchange against bare libp2p and raw TCP
(:mod:`p2pfl.bench.throughput`). Part (c), bytes on the wire per codec. What
each figure measures, exactly, is in those modules' text.

Prints a rich table, then the result as ONE JSON line, the last line of stdout.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import trio

from fltasks.malloc import keep_large_buffers_in_heap
from p2pfl.bench.learning import EMPTY_LEARNING, measure_learning, measure_wire_bytes
from p2pfl.bench.report import report
from p2pfl.bench.throughput import measure_throughput


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=8, help="daemons to run (default 8)")
    parser.add_argument("--target", type=float, default=0.93, help="accuracy every node must reach")
    parser.add_argument("--partition", default="dirichlet:0.5", help="iid, dirichlet:A, quantity:A")
    parser.add_argument("--timeout", type=float, default=150.0, help="give up after this many s")
    parser.add_argument("--rounds", type=int, default=100, help="--rounds of each daemon")
    parser.add_argument("--degree", type=int, default=3, help="gossip neighbours per node")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--local-epochs",
        type=int,
        default=None,
        help="epochs per round of each daemon (default: LocalNetwork's, as `make demo`)",
    )
    parser.add_argument(
        "--node-args",
        default="",
        help="extra flags for every daemon of part (a), e.g. \"--feature-stats local\"",
    )
    parser.add_argument("--poll", type=float, default=0.1, help="status poll interval, seconds")
    parser.add_argument("--repeats", type=int, default=9, help="best of this many transfers")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="keep the nodes' keys, state and logs here (default: a temporary directory)",
    )
    parser.add_argument(
        "--skip-learning", action="store_true", help="skip part (a), the learning speed"
    )
    parser.add_argument(
        "--skip-codecs", action="store_true", help="skip part (c), bytes on the wire per codec"
    )
    parser.add_argument("--codec-nodes", type=int, default=4, help="daemons per codec run")
    parser.add_argument("--codec-rounds", type=int, default=20, help="rounds per codec run")
    args = parser.parse_args(argv)
    if args.nodes < 2:
        parser.error("--nodes must be at least 2")
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    learning = EMPTY_LEARNING if args.skip_learning else measure_learning(args)
    # The same process tuning as `p2pfl node` applies to itself (see p2pfl/tuning.py).
    keep_large_buffers_in_heap()
    throughput = trio.run(measure_throughput, args.repeats)
    wire = {} if args.skip_codecs else measure_wire_bytes(args)
    report(args, learning, throughput, wire)


if __name__ == "__main__":
    main()
