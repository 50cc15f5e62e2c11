"""Issue 24's run: a fixed number of rounds on slow links, with default flags, in the lab.

4 hosts (network namespaces, p2pfl/lab/netlab.py), every link at --rate-mbit (tbf, both
directions, from the start), the 1.1M-parameter MLP on digits (4.5 MB raw,
``p2pfl.lab.netlab:wide_digits``), --degree 3, --rounds 10 of --local-epochs 2, and no
other daemon flag unless --daemon-args gives some. It waits until every daemon has
exited by itself (its rounds, then serving until its neighbourhood has its final model,
at most --linger) or --cap seconds, and prints each node's last accuracy and what the
network did. Needs root and iproute2.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from p2pfl.lab.labwatch import failures
from p2pfl.lab.namespaces import lab_unavailable_reason
from p2pfl.lab.netlab import Lab, LabNetwork, terminate_on_sigterm


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=4)
    parser.add_argument("--rate-mbit", type=float, default=10.0)
    parser.add_argument("--degree", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--local-epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cap", type=float, default=900.0, help="longest wait, seconds")
    parser.add_argument("--daemon-args", default="", help='e.g. "--compression int8"')
    parser.add_argument("--out", type=Path, default=Path("runs/slowlinks.json"))
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the daemons' state directories and logs here (new folder)")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, directory: Path) -> dict[str, Any]:
    last: list[dict[str, Any] | None] = [None] * args.hosts
    with Lab(args.hosts, rate_mbit=args.rate_mbit) as lab, LabNetwork(
        lab, str(directory), rounds=args.rounds, degree=args.degree, seed=args.seed,
        local_epochs=args.local_epochs, task="p2pfl.lab.netlab:wide_digits",
        extra_args=tuple(shlex.split(args.daemon_args)),
    ) as net:
        net.start_all()
        started = time.monotonic()
        exited: list[float | None] = [None] * args.hosts
        trace: list[list[Any]] = []  # [seconds, node, round, accuracy, weight] per change
        while time.monotonic() - started < args.cap and None in exited:
            for index, status in enumerate(net.statuses()):
                if status is not None:
                    before, last[index] = last[index], status
                    if before is None or before["round"] != status["round"]:
                        trace.append([round(time.monotonic() - started, 1), index,
                                      status["round"], status["accuracy"], status.get("weight")])
            for index, node in enumerate(net.nodes):
                if exited[index] is None and node is not None and node.process.poll() is not None:
                    exited[index] = round(time.monotonic() - started, 1)
            time.sleep(1.0)
    alive = [s for s in last if s]
    return {
        "daemon_args": args.daemon_args,
        "rate_mbit": args.rate_mbit,
        "accuracy": [s and s["accuracy"] for s in last],
        "rounds": [s and s["round"] for s in last],
        "seconds_to_exit": exited,
        "updates_accepted": sum(s["updates_accepted"] for s in alive),
        "push_failures": failures(alive),
        "deliveries": [s.get("deliveries") for s in alive],
        "weight_total_end": sum(s.get("weight", 0.0) for s in alive),
        "link_mbit": [s.get("link_mbit") for s in alive],
        "trace": trace,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if reason := lab_unavailable_reason():
        print(f"bench_slowlinks: {reason}")
        return 2
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)  # a run resumes from old state dirs
    with terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="p2slow-") as tmp:
        result = run(args, args.keep or Path(tmp))
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    accuracies = [a for a in result["accuracy"] if a is not None]
    print(f"min accuracy {min(accuracies, default=0):.3f}, "
          f"mean {sum(accuracies) / max(len(accuracies), 1):.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
