"""Run real daemons on separate hosts in a network lab and measure what the network does.

Each host is a network namespace with its own IP (p2pfl/lab/netlab.py); one daemon runs
per host (``ip netns exec ... python -m p2pfl.cli node``). Scenarios (p2pfl/lab/labrun.py):

- ``baseline``: H hosts on one bridge; time until every node reaches the target.
- ``partition``: a 4|4 cut for 10 rounds, then the heal: rounds and seconds until
  every node is back at the connected network's accuracy and the models' spread
  (consensus distance) is as small as before the cut, against the spectral gap's
  expectation; and whether peer books re-learn the addresses that failed.
- ``slow``: every link at --rate-mbit with a 1.1M-parameter model (4.5 MB raw).
- ``nat``: 2 public hosts and 2 hosts behind each of 2 NATs (needs nftables): time to
  the first update between the NATs, and how each cross-NAT pair is connected
  (direct, relayed, none); ``--nat-ports random`` for port-randomising NATs.
- ``loss``: a clean run, then one with --loss-percent on every link (needs nftables):
  accuracy and the push-sum weight the nodes hold, before and after.
- ``revoke``: every host a member of one network (founders and certified members,
  k = 2); --revocations members revoked one after another (``p2pfl member publish``
  at one founder), then one more while a founder is cut off: seconds until every
  other member refuses the key, and the cut-off one's catch-up after the heal
  (p2pfl/lab/revocation.py).

Needs root, iproute2 and, for ``nat`` and ``loss``, nftables (apt-get install -y nftables).
A live table shows every host. For each scenario, --out gets NAME.json (the
measurements and every poll's accuracy per host) and NAME.png (accuracy against
time per host); summary.json holds every scenario's measurements. Every namespace,
link, rule and daemon is removed on exit, Ctrl-C or a crash.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pfl.lab.labrun import NEEDS_NFT, SCENARIOS, LabOptions
from p2pfl.lab.localnet import LocalNetworkError
from p2pfl.lab.namespaces import LabError, lab_unavailable_reason, nft_missing_reason
from p2pfl.lab.netlab import terminate_on_sigterm
from p2pfl.lab.revocation import RevocationLabError

console = Console()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "scenarios", nargs="*", choices=sorted(SCENARIOS), default=["baseline", "partition"]
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
    parser.add_argument("--local-epochs", type=int, default=5, help="daemon --local-epochs (5)")
    parser.add_argument(
        "--daemon-args", default="", help='more daemon flags, e.g. "--aggregator mean"'
    )
    parser.add_argument(
        "--nat-ports",
        choices=["keep", "random"],
        default="keep",
        help="`nat`: routers keep source ports (hole punching can work) or randomise them",
    )
    parser.add_argument(
        "--revocations", type=int, default=3,
        help="`revoke`: revocations timed before the one during a cut (3)",
    )
    parser.add_argument(
        "--out", type=Path, default=Path("runs/netlab"), help="where results go (runs/netlab)"
    )
    return parser.parse_args(argv)


def options_from(args: argparse.Namespace) -> LabOptions:
    return LabOptions(
        hosts=args.hosts,
        degree=args.degree,
        seed=args.seed,
        target=args.target,
        timeout=args.timeout,
        settle=args.settle,
        cut_rounds=args.cut_rounds,
        rate_mbit=args.rate_mbit,
        loss_percent=args.loss_percent,
        send_timeout=args.send_timeout,
        local_epochs=args.local_epochs,
        daemon_args=tuple(shlex.split(args.daemon_args)),
        nat_ports=args.nat_ports,
        revocations=args.revocations,
    )


def summary_table(name: str, result: dict) -> Table:
    table = Table(title=f"netlab {name}")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in result.items():
        shown = f"{value:.3g}" if isinstance(value, float) else str(value)
        if isinstance(value, list) and value and isinstance(value[0], dict):
            shown = f"{len(value)} runs, in {name}.json"  # per-run details: too wide here
        table.add_row(key, shown)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if reason := lab_unavailable_reason():
        console.print(f"netlab: {reason}")
        return 2
    options = options_from(args)
    args.out.mkdir(parents=True, exist_ok=True)
    results = []
    with terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="p2lab-") as tmp:
        for name in args.scenarios:
            if name in NEEDS_NFT and (reason := nft_missing_reason()):
                console.print(f"netlab: {name} skipped: {reason}")
                continue
            try:
                with Live(console=console, refresh_per_second=2) as live:
                    result, histories = SCENARIOS[name](options, Path(tmp) / name, live.update)
            except (LabError, LocalNetworkError, RevocationLabError) as error:
                console.print(f"netlab: {name} failed: {error}")
                return 1
            results.append(result)
            console.print(summary_table(name, result))
            record = {"result": result, "runs": [history.as_dict() for history in histories]}
            (args.out / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n")
            for number, history in enumerate(histories):
                suffix = f"-{number + 1}" if len(histories) > 1 else ""
                history.plot(args.out / f"{name}{suffix}.png")
            console.print(f"netlab: wrote {args.out}/{name}.json and the plot(s) beside it")
    (args.out / "summary.json").write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM; every `with Lab` has torn down by now
        console.print("netlab: interrupted; the lab and its daemons are gone")
        sys.exit(130)
