"""Time to target accuracy per codec and link rate, on real daemons in the network lab.

8 hosts (network namespaces, p2pfl/lab/netlab.py), every link limited to 1, 10 and
100 Mbit/s (tbf, both directions), a 1.1M-parameter MLP on digits
(``--model mlp:1024,1024``, 4.5 MB raw), and the codecs raw, fp16, int8 and
topk:0.01. For each rate and codec, a fresh lab runs until every node reaches
--target, or until --cap seconds (reported as "not reached", never guessed).
Ratios are against raw at the same rate, in the same run.

The daemons join on unlimited links (each fetches members' models raw, whatever
the codec: at 1 Mbit/s that alone took over 5 minutes for 8 hosts) and start
training together (``--min-neighbours`` hosts-1); once every node has trained once,
every link gets the rate and the clock starts. ``training (s)`` is from then to
the target, and the ratios use it; ``to target`` is from the last daemon's start.
``--limit-from-start`` limits the links during joining too.

A host pushes to --degree neighbours at once over its link (and receives from
about as many), so one update gets about rate/degree; TCP flows through a tbf
queue share it unevenly, and deadlines sized at that rate had receivers cut 243
of the 1 Mbit/s int8 frames in one run. So the daemons' --min-link-mbit, which
sizes their push and read deadlines, is rate / (2 x degree): the tuned flags.
``--default-flags`` leaves it out, as a new user would.

Needs root and iproute2; takes up to
rates x codecs x (--cap + start-up) seconds. Results go to --out (JSON and a plot
per run).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from p2pfl.lab.labrun import LabOptions, goal_met, run_to_target, training_ratio
from p2pfl.lab.localnet import LocalNetworkError
from p2pfl.lab.namespaces import LabError, lab_unavailable_reason
from p2pfl.lab.netlab import terminate_on_sigterm

console = Console()
CODECS = ("raw", "fp16", "int8", "topk:0.01")
RATES = (1.0, 10.0, 100.0)
# The goals: (rate, codec, reference, largest ratio of training times).
GOALS = ((10.0, "int8", "raw", 0.4), (1.0, "topk:0.01", "int8", 1.0))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rates", default=",".join(f"{r:g}" for r in RATES),
                        help="link rates in Mbit/s, comma-separated (default 1,10,100)")
    parser.add_argument("--codecs", default=",".join(CODECS),
                        help="comma-separated (default raw,fp16,int8,topk:0.01)")
    parser.add_argument("--hosts", type=int, default=8)
    parser.add_argument("--degree", type=int, default=3)
    parser.add_argument("--model", default="mlp:1024,1024", help="daemon --model (1.1M parameters)")
    parser.add_argument("--target", type=float, default=0.85,
                        help="accuracy every node must reach (default 0.85)")
    parser.add_argument("--cap", type=float, default=240.0,
                        help="longest run per rate and codec, seconds (default 240)")
    parser.add_argument("--local-epochs", type=int, default=1, help="daemon --local-epochs (1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit-from-start", action="store_true",
                        help="limit the links while the daemons join too (default: once all "
                        "have joined and trained once)")
    parser.add_argument("--default-flags", action="store_true",
                        help="no --min-link-mbit: the daemons' deadlines follow each link's "
                             "measured rate, as a new user's would")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-bandwidth"))
    parser.add_argument("--keep", type=Path, default=None,
                        help="keep the daemons' state directories and logs here (new folder)")
    return parser.parse_args(argv)


def seconds(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.1f}"


def rate_table(rate: float, runs: dict[str, dict], args: argparse.Namespace) -> Table:
    table = Table(title=f"{rate:g} Mbit/s per host, {args.hosts} hosts, target {args.target}")
    for column in ("codec", "MB sent per node", "to target (s)", "training (s)", "rounds",
                   "x raw", "accuracy end", "push failures", "whole copies"):
        table.add_column(column, justify="left" if column == "codec" else "right")
    raw = runs.get("raw")
    for codec, run in runs.items():
        per_node = run["bytes_sent_mb"] / args.hosts
        table.add_row(
            codec, f"{per_node:.1f}", seconds(run["seconds_to_target"]),
            seconds(run["training_seconds_to_target"]), str(run["rounds_median_at_target"] or "-"),
            training_ratio(run, raw) if raw else "-",
            "-" if run["accuracy_mean_end"] is None else f"{run['accuracy_mean_end']:.3f}",
            str(run["push_failures"]), str(run["whole_copies_sent"]),
        )  # fmt: skip
    return table


def goal_lines(results: dict[float, dict[str, dict]]) -> list[str]:
    lines = []
    for rate, codec, reference, limit in GOALS:
        runs = results.get(rate, {})
        if codec in runs and reference in runs:
            met = goal_met(runs[codec], runs[reference], limit)
            want = f"<= {limit}x" if limit < 1.0 else "beats"
            shown = training_ratio(runs[codec], runs[reference])
            lines.append(f"goal at {rate:g} Mbit/s: {codec} {want} {reference}: {shown} -> "
                         f"{'met' if met else 'NOT met'}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if reason := lab_unavailable_reason():
        console.print(f"bench_bandwidth: {reason}")
        return 2
    rates = [float(rate) for rate in args.rates.split(",")]
    codecs = args.codecs.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[float, dict[str, dict]] = {}
    if args.keep is not None:
        args.keep.mkdir(parents=True, exist_ok=False)  # a run resumes from old state dirs
    with terminate_on_sigterm(), tempfile.TemporaryDirectory(prefix="p2lab-bw-") as scratch:
        tmp = args.keep or scratch
        for rate in rates:
            results[rate] = {}
            options = LabOptions(hosts=args.hosts, degree=args.degree, seed=args.seed,
                                 target=args.target, timeout=args.cap,
                                 local_epochs=args.local_epochs)
            for codec in codecs:
                name = f"{rate:g}mbit-{codec.replace(':', '')}"
                tuned = () if args.default_flags else (
                    "--min-link-mbit", f"{rate / (2 * args.degree):g}")
                extra = ("--compression", codec, "--model", args.model, *tuned,
                         "--min-neighbours", str(args.hosts - 1))
                title = f"{codec} at {rate:g} Mbit/s"
                try:
                    with Live(console=console, refresh_per_second=1) as live:
                        run, history = run_to_target(
                            options, Path(tmp) / name, live.update, title, rate_mbit=rate,
                            extra=extra, limit_after_join=not args.limit_from_start)
                except (LabError, LocalNetworkError) as error:
                    console.print(f"bench_bandwidth: {title} failed: {error}")
                    return 1
                results[rate][codec] = run
                history.plot(args.out / f"{name}.png")
                (args.out / f"{name}.json").write_text(
                    json.dumps({"result": run, "run": history.as_dict()}, indent=1) + "\n")
                console.print(f"{title}: {seconds(run['seconds_to_target'])} (s to target)")
            console.print(rate_table(rate, results[rate], args))
    for rate in rates:
        console.print(rate_table(rate, results[rate], args))
    for line in goal_lines(results):
        console.print(line)
    summary = {f"{rate:g}": runs for rate, runs in results.items()}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        console.print("bench_bandwidth: interrupted; the lab and its daemons are gone")
        sys.exit(130)
