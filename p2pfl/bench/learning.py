"""Benchmark part (a): how fast real daemons learn; and part (c): bytes on the wire per codec.

Part (a), learning speed. ``p2pfl.lab.localnet.LocalNetwork`` starts ``--nodes`` real
daemons (``python -m p2pfl.cli node``, one process each) on 127.0.0.1: the digits
task, non-IID shards (``--partition``, default ``dirichlet:0.5``), degree 3,
``--local-epochs`` per round (default: LocalNetwork's, as ``make demo`` runs), and
``--rounds`` high enough that no node stops before the target. Every node's
``GET /status`` is polled (concurrently, every ``--poll`` s) until one poll sees
EVERY node's ``accuracy`` >= ``--target``; then all nodes are stopped at once.

* ``seconds_to_target``: from the moment all nodes are ready (each has printed its
  listen and status addresses) to that poll;
* ``seconds_to_target_incl_startup``: from launching the first process;
* ``rounds_to_target``: the highest ``round`` among the nodes at that poll.

After ``--timeout`` seconds without reaching the target these are null. A node
trains as soon as it knows one peer, so while the later daemons are still
starting (importing torch and libp2p on a busy machine) the first ones already
train: ``rounds_at_ready`` (the highest round when the last node is up) shows
how far, and ``seconds_to_target`` is smaller the slower the startup was. Read
it next to ``seconds_to_target_incl_startup``.

The reference is 87 s: the figure measured for p2pfl 0.4.4 on this machine,
quoted from the project issue and NOT re-measured here. ``speedup_vs_reference``
is ``87 / seconds_to_target`` (goal >= 20x); ``speedup_vs_reference_incl_startup``
is ``87 / seconds_to_target_incl_startup``.

Part (c): per codec, a short real run; the payload bytes each node sent per
round and per update, from its ``GET /status``.
"""

from __future__ import annotations

import argparse
import shlex
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

from rich.console import Console

from p2pfl.lab.localnet import LocalNetwork, LocalNetworkError

console = Console()

# Part (a)'s figures before anything is measured (and when --skip-learning is given).
EMPTY_LEARNING: dict[str, Any] = {
    "seconds_to_target": None,
    "seconds_to_target_incl_startup": None,
    "rounds_to_target": None,
    "startup_s": None,
    "rounds_at_ready": None,
    "final_accuracies": None,
}


# -- (a) learning speed -------------------------------------------------------------------


def _accuracies(network: LocalNetwork, pool: ThreadPoolExecutor) -> list[dict[str, Any] | None]:
    nodes = network.started()
    return list(pool.map(lambda node: node.status(timeout=1.0), nodes))


def measure_learning(args: argparse.Namespace) -> dict[str, Any]:
    """Part (a): the figures above; each None when not reached (see :data:`EMPTY_LEARNING`)."""
    result = dict(EMPTY_LEARNING)
    with tempfile.TemporaryDirectory(prefix="bench-network-") as scratch:
        options: dict[str, Any] = {}
        if args.local_epochs is not None:
            options["local_epochs"] = args.local_epochs
        network = LocalNetwork(
            args.out if args.out is not None else Path(scratch),
            args.nodes,
            rounds=args.rounds,
            task="digits",
            partition=args.partition,
            degree=args.degree,
            seed=args.seed,
            # A speed figure: rounds unpaced and plain push-sum, as docs/BENCHMARKS.md says.
            extra_args=(
                "--round-interval", "0", "--aggregator", "mean",
                *shlex.split(getattr(args, "node_args", "")),
            ),
            **options,
        )
        result["local_epochs"] = network.local_epochs
        with network, ThreadPoolExecutor(max_workers=args.nodes) as pool:
            launched = time.monotonic()
            try:
                network.start_all()
            except LocalNetworkError as error:
                console.print(f"[red]the local network did not start: {error}[/red]")
                return result
            ready = time.monotonic()
            result["startup_s"] = round(ready - launched, 2)
            # Nodes train as soon as they know a peer, so the first ones are already
            # some rounds in when the last one is up: shown, since it moves the figure.
            at_ready = _accuracies(network, pool)
            result["rounds_at_ready"] = max((s["round"] for s in at_ready if s), default=None)
            last: list[dict[str, Any] | None] = []

            def everyone_at_target() -> bool:
                nonlocal last
                last = _accuracies(network, pool)
                accuracies = [s.get("accuracy") if s else None for s in last]
                return all(a is not None and a >= args.target for a in accuracies)

            remaining = args.timeout - (time.monotonic() - launched)
            if network.wait_for(everyone_at_target, remaining, poll=args.poll):
                # The end of the poll that saw it: the target held by then.
                seen = time.monotonic()
                result["seconds_to_target"] = round(seen - ready, 2)
                result["seconds_to_target_incl_startup"] = round(seen - launched, 2)
                result["rounds_to_target"] = max(s["round"] for s in last if s)
            result["final_accuracies"] = [
                None if s is None or s.get("accuracy") is None else round(s["accuracy"], 4)
                for s in last
            ]
            result["final_rounds"] = [None if s is None else s["round"] for s in last]
            # Leaving the `with` stops every node (SIGTERM, then SIGKILL).
    return result


def _keep_latest(
    network: LocalNetwork, pool: ThreadPoolExecutor, latest: dict[int, dict[str, Any]]
) -> bool:
    """Record each node's latest status after its first round; never done on its own, so
    the caller watches until every node has exited (or its timeout)."""
    for node, status in zip(network.started(), _accuracies(network, pool), strict=True):
        if status is not None and status["round"] > 0:
            latest[node.index] = status
    return False


# -- (c) bytes on the wire per codec -------------------------------------------------------

CODECS = ("raw", "fp16", "int8", "topk:0.01")


def measure_wire_bytes(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Per codec: a short real run, payload bytes each node sent per round, from /status."""
    results: dict[str, dict[str, Any]] = {}
    for codec in CODECS:
        with tempfile.TemporaryDirectory(prefix=f"bench-wire-{codec}-") as scratch:
            network = LocalNetwork(
                Path(scratch),
                args.codec_nodes,
                rounds=args.codec_rounds,
                task="digits",
                partition=args.partition,
                degree=args.degree,
                seed=args.seed,
                extra_args=("--compression", codec),
            )
            latest: dict[int, dict[str, Any]] = {}
            with network, ThreadPoolExecutor(max_workers=args.codec_nodes) as pool:
                try:
                    network.start_all()
                except LocalNetworkError as error:
                    console.print(f"[red]the {codec} network did not start: {error}[/red]")
                    continue

                network.wait_for(
                    partial(_keep_latest, network, pool, latest), args.timeout, poll=args.poll
                )
                finals = [n.final_accuracy for n in network.started()]
            per_round = [s["bytes_sent"] / s["round"] for s in latest.values()]
            # Per update sent: independent of how many neighbours each node had.
            per_update = [
                s["bytes_sent"] / s["updates_sent"] for s in latest.values() if s["updates_sent"]
            ]
            results[codec] = {
                "bytes_per_node_per_round": round(sum(per_round) / len(per_round))
                if per_round
                else None,
                "bytes_per_update": round(sum(per_update) / len(per_update))
                if per_update
                else None,
                "final_accuracy_mean": round(
                    sum(a for a in finals if a is not None)
                    / max(1, sum(a is not None for a in finals)),
                    4,
                ),
            }
    raw = results.get("raw", {}).get("bytes_per_update")
    for entry in results.values():
        value = entry["bytes_per_update"]
        entry["fewer_bytes_than_raw"] = round(raw / value, 2) if raw and value else None
    return results
