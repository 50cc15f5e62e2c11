"""The ``p2pfl`` command: ``keygen``, ``node``, ``status``, ``network`` and ``member``.

Errors a user can cause (a bad flag, key file, multiaddr or config) end the
command with one line on stderr naming the cause and the fix, and exit code 2;
never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import urllib.error
import urllib.request
from collections.abc import Sequence
from importlib import metadata
from typing import Any, NoReturn

from fltasks.settings_schema import add_flags, flag_values
from gossip.keys import KeyFileError, NodeKey
from p2pfl import member_cli, model_cli
from p2pfl.config import ConfigError, NodeConfig, build_config, load_config_file, parse_host_port

logger = logging.getLogger("p2pfl")

USAGE_ERROR = 2
# The distribution's name on the package index (pyproject.toml), not the import name.
DISTRIBUTION = "p2pfl-gossip"


class UserError(Exception):
    """A problem the user can fix; printed as one line."""


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line (argparse prints the whole usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USAGE_ERROR, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class _StartupWatch:
    """A ``task_status`` for NodeRuntime.run that only records that the node is up."""

    done = False

    def started(self, value: object = None) -> None:
        self.done = True


def _sole_cause(error: BaseException) -> BaseException:
    """The one exception inside nested single-member exception groups, else ``error``."""
    while isinstance(error, BaseExceptionGroup) and len(error.exceptions) == 1:
        error = error.exceptions[0]
    return error


def _add_node_flags(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, then one flag per setting declared in NodeConfig."""
    parser.add_argument(
        "--config", metavar="FILE", help="TOML file with any of these settings; flags override it"
    )
    # parse: argparse converts and checks choices, so a bad flag fails before torch loads.
    add_flags(parser, NodeConfig, parse=True)


def installed_version() -> str:
    """The version of the installed distribution, from its metadata (never hard-coded)."""
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed: pip install .)"


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(
        prog="p2pfl",
        description="Decentralized federated learning: train on private data, gossip signed "
        "model updates to peers over libp2p. No coordinator.",
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {installed_version()}"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    keygen = commands.add_parser("keygen", help="create a node key and print its peer id")
    keygen.add_argument("path", help="where to write the key (mode 0600)")
    keygen.add_argument("--force", action="store_true", help="overwrite an existing key")
    node = commands.add_parser("node", help="run a node until stopped or --rounds are done")
    _add_node_flags(node)
    status = commands.add_parser("status", help="print a running node's status as a table")
    status.add_argument("--status-addr", required=True, metavar="HOST:PORT")
    status.add_argument("--json", action="store_true", help="print the raw JSON instead")
    member_cli.add_commands(commands)
    model_cli.add_commands(commands)
    return parser


def node_config(args: argparse.Namespace) -> NodeConfig:
    file_settings = load_config_file(args.config) if args.config else {}
    return build_config(file_settings, flag_values(args, NodeConfig))


def run_keygen(args: argparse.Namespace) -> None:
    key = NodeKey.generate()
    key.save(args.path, overwrite=args.force)
    print(key.peer_id)


def run_node(args: argparse.Namespace) -> None:
    config = node_config(args)
    from p2pfl.logs import configure_logging

    configure_logging(config.log_format)
    key = NodeKey.load(config.key)
    # Imported here: torch and libp2p take a second to import, which `keygen` and
    # `--help` should not pay.
    import torch
    import trio

    from fltasks import load_task
    from fltasks.malloc import keep_large_buffers_in_heap
    from p2pfl.checkpoint import CheckpointError
    from p2pfl.host import parse_multiaddr, split_peer_multiaddr
    from p2pfl.runtime import NodeRuntime
    from p2pfl.transport import TransportError
    from p2pfl.tuning import raise_open_file_limit
    from p2pfl.vocabulary import agree_vocabulary, wanted, with_listen

    # Nodes share machines with other nodes and with the event loop: one
    # intra-op thread each avoids oversubscribing the cores.
    torch.set_num_threads(1)
    keep_large_buffers_in_heap()
    raise_open_file_limit()

    # A bootstrap address without /p2p/<id> can never be dialed: the node would
    # wait for peers forever, logging a warning every few seconds.
    checks = [("--listen", parse_multiaddr, addr) for addr in config.listen]
    checks += [("--bootstrap", split_peer_multiaddr, addr) for addr in config.bootstrap]
    for flag, check, addr in checks:
        try:
            check(addr)
        except ValueError as error:
            raise UserError(f"{flag}: {error}") from None
    try:
        # Before the model exists: csv members agree on categories and classes, so
        # that every member builds the same shape (p2pfl/vocabulary.py).
        agreed = agree_vocabulary(config, key) if wanted(config) else None
        if agreed is not None:
            config = with_listen(config, agreed)
        task = load_task(
            config.task,
            seed=config.seed,
            label=config.label,
            model=config.model,
            task_spec=config.task_spec,
            device=config.device,
            vocabulary=agreed.for_task() if agreed is not None else None,
        )
        runtime = NodeRuntime(config, key, task, announce=lambda line: print(line, flush=True),
                              vocabulary=agreed.state if agreed is not None else None)
    except (ValueError, CheckpointError) as error:
        raise UserError(str(error)) from None
    except TransportError as error:
        raise UserError(f"--listen: {error}") from None
    startup = _StartupWatch()

    async def main() -> None:
        async with trio.open_nursery() as nursery:

            async def stop_on_signal() -> None:
                with trio.open_signal_receiver(
                    signal.SIGINT, signal.SIGTERM, signal.SIGHUP
                ) as signals:
                    async for received in signals:
                        if received == signal.SIGHUP:
                            runtime.reload()  # --allow and the membership inbox, no restart
                            continue
                        logger.info(
                            "received %s: checkpointing and stopping", signal.Signals(received).name
                        )
                        nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(stop_on_signal)
            await runtime.run(task_status=startup)
            nursery.cancel_scope.cancel()

    try:
        trio.run(main)
    except BaseException as error:
        cause = _sole_cause(error)
        # Before the node is up, a failure to listen (an address not on this machine, a
        # port in use) is the user's to fix; libp2p and trio wrap it in exception groups.
        if not startup.done and isinstance(cause, TransportError):
            raise UserError(f"--listen: {cause}") from None
        if not startup.done and isinstance(cause, OSError):
            raise UserError(
                f"--status-addr {config.status_addr}: cannot listen ({cause.strerror or cause}); "
                "use an address of this machine and a free port"
            ) from None
        raise
    print(f"stopped at round {runtime.round} accuracy {runtime.accuracy}", flush=True)


def fetch_status(status_addr: str, timeout: float = 5.0) -> dict[str, Any]:
    host, port = parse_host_port(status_addr)
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/status", timeout=timeout) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise UserError(f"no node answers at {status_addr} ({reason}); is it running?") from None


def run_status(args: argparse.Namespace) -> None:
    status = fetch_status(args.status_addr)
    if args.json:
        print(json.dumps(status, indent=2))
        return
    rows = [(field.replace("_", " "), _status_value(value)) for field, value in status.items()]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # rich comes with the lab extra; a node's operator may lack it
        width = max(len(name) for name, _ in rows)
        print(f"p2pfl node {status['peer_id']}")
        for name, value in rows:
            first, *rest = value.splitlines() or ["-"]
            print(f"{name:<{width}}  {first}")
            for line in rest:
                print(f"{'':<{width}}  {line}")
        return
    table = Table(title=f"p2pfl node {status['peer_id']}", show_header=False)
    table.add_column("field", style="bold")
    table.add_column("value", overflow="fold")
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)


def _status_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return "\n".join(f"{k}: {v}" for k, v in value.items()) or "-"
    if isinstance(value, list):
        return "\n".join(map(str, value)) or "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handlers = {"keygen": run_keygen, "node": run_node, "status": run_status}
    handlers |= {command: member_cli.run_with(UserError) for command in member_cli.COMMANDS}
    handlers |= {command: model_cli.run_with(UserError) for command in model_cli.COMMANDS}
    try:
        handlers[args.command](args)
    except (UserError, ConfigError, KeyFileError) as error:
        print(f"p2pfl {args.command}: error: {error}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
