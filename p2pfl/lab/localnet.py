"""A network of real node daemons on loopback, as separate processes.

Used by ``scripts/local_network.py`` (``make demo``), ``scripts/bench_network.py``
and the end-to-end tests: each node is ``python -m p2pfl.cli node ...`` with
its own key, state directory and settings file (``--config``), exactly as an
operator runs it. Node 0 starts first; the others bootstrap from the address it
prints.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from fltasks.settings_schema import to_toml
from gossip.keys import NodeKey
from p2pfl.checkpoint import CheckpointError, CheckpointStore, NodeState, decode_state
from p2pfl.config import NodeConfig

_T = TypeVar("_T")

# Until a node prints its addresses; a node that exits early is reported at once, so this
# only bounds a hang. Generous: on a 2-core machine kept busy by other work, several
# nodes importing torch and libp2p at once start many times slower than on an idle one.
STARTUP_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 10.0


class LocalNetworkError(Exception):
    """A node could not be started; the message names the node and its log file."""


@dataclass
class LocalNode:
    index: int
    process: subprocess.Popen[str]
    log_path: Path
    state_dir: Path
    key_path: Path
    lines: list[str] = field(default_factory=list)
    peer_id: str | None = None
    listen: list[str] = field(default_factory=list)
    status_url: str | None = None

    def _reader(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            kind, _, value = line.partition(" ")
            if kind == "peer-id":
                self.peer_id = value
            elif kind == "listen":
                self.listen.append(value)
            elif kind == "status":
                self.status_url = value

    def status(self, timeout: float = 2.0) -> dict[str, Any] | None:
        """The node's /status, or None while it is not (or no longer) answering."""
        if self.status_url is None:
            return None
        try:
            with urllib.request.urlopen(self.status_url, timeout=timeout) as response:
                return json.load(response)
        except (urllib.error.URLError, OSError, ValueError, http.client.HTTPException):
            # HTTPException: e.g. IncompleteRead from a node exiting mid-answer.
            return None

    def saved_state(self) -> NodeState | None:
        """The node's last checkpoint (written every round), or None before its first.

        For watching from outside, e.g. the spread of the members' models, at no cost
        to the daemon. A save moves the current file to ``.prev`` before renaming the
        new one in, so a read in between finds the previous one.
        """
        store = CheckpointStore(self.state_dir)
        for path in (store.current, store.previous):
            try:
                return decode_state(path.read_bytes())
            except (OSError, CheckpointError):
                continue
        return None

    @property
    def final_accuracy(self) -> float | None:
        """From the ``stopped at round R accuracy A`` line a node prints on exit."""
        for line in reversed(self.lines):
            if line.startswith("stopped at round"):
                value = line.rsplit(" ", 1)[-1]
                return None if value == "None" else float(value)
        return None

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class LocalNetwork:
    """Start, watch and stop N daemons; always use it as a context manager."""

    def __init__(
        self,
        directory: str | Path,
        nodes: int,
        *,
        rounds: int | None,
        task: str = "digits",
        partition: str = "dirichlet:0.5",
        degree: int = 3,
        seed: int = 0,
        local_epochs: int = 5,
        extra_args: tuple[str, ...] = (),
        node_args: dict[int, tuple[str, ...]] | None = None,
    ) -> None:
        if nodes < 2:
            raise ValueError("a local network needs at least 2 nodes")
        self.directory = Path(directory)
        self.count = nodes
        self.rounds = rounds
        self.task = task
        self.partition = partition
        self.degree = degree
        self.seed = seed
        # Demo shards hold ~170 samples (6 minibatches): a few epochs per round make
        # each round worth its gossip; real deployments with real data use 1.
        self.local_epochs = local_epochs
        self.extra_args = extra_args
        # Flags for single nodes, after the shared ones (e.g. an --attack member).
        self.node_args = node_args or {}
        self.nodes: list[LocalNode | None] = [None] * nodes

    def __enter__(self) -> LocalNetwork:
        self.directory.mkdir(parents=True, exist_ok=True)
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def node_settings(self, index: int, bootstrap: str | None) -> dict[str, Any]:
        """Node ``index``'s settings, by NodeConfig field name (written to its TOML file)."""
        node_dir = self.directory / f"node-{index}"
        return {
            "key": str(node_dir / "node.key"),
            "state_dir": str(node_dir / "state"),
            "listen": ("/ip4/127.0.0.1/tcp/0",),
            "status_addr": "127.0.0.1:0",
            "task": self.task,
            "shard": f"{index}/{self.count}",
            "partition": self.partition,
            "degree": self.degree,
            "seed": self.seed,
            "local_epochs": self.local_epochs,
            "rounds": self.rounds,
            "bootstrap": (bootstrap,) if bootstrap else (),
        }

    def command(self, index: int, bootstrap: str | None) -> list[str]:
        """``p2pfl node --config node-I/node.toml`` and then ``extra_args``, ``node_args``.

        The settings go through the same TOML file an operator writes (checked
        against NodeConfig's declarations as it is written); the flags after it
        override it, as they would for an operator.
        """
        config = self.directory / f"node-{index}" / "node.toml"
        config.parent.mkdir(parents=True, exist_ok=True)
        config.write_text(to_toml(self.node_settings(index, bootstrap), NodeConfig))
        args = [sys.executable, "-m", "p2pfl.cli", "node", "--config", str(config)]
        return args + list(self.extra_args) + list(self.node_args.get(index, ()))

    def start(self, index: int, bootstrap: str | None = None) -> LocalNode:
        """Start node ``index`` (restarting it on its state dir if it ran before)."""
        node_dir = self.directory / f"node-{index}"
        node_dir.mkdir(parents=True, exist_ok=True)
        key_path = node_dir / "node.key"
        if not key_path.exists():
            NodeKey.generate().save(key_path)
        log_path = node_dir / "node.log"
        log = log_path.open("a")
        environment = dict(os.environ, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(
            self.command(index, bootstrap),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env=environment,
            start_new_session=True,
        )
        log.close()
        node = LocalNode(index, process, log_path, node_dir / "state", key_path)
        threading.Thread(target=node._reader, daemon=True).start()
        self.nodes[index] = node
        return node

    def wait_ready(self, node: LocalNode, timeout: float = STARTUP_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while node.status_url is None or not node.listen:
            if not node.running:
                raise LocalNetworkError(
                    f"node {node.index} exited with code {node.process.returncode} before it "
                    f"was ready; see {node.log_path}"
                )
            if time.monotonic() > deadline:
                raise LocalNetworkError(
                    f"node {node.index} not ready after {timeout:.0f} s; see {node.log_path}"
                )
            time.sleep(0.05)

    def start_all(self) -> None:
        first = self.start(0)
        self.wait_ready(first)
        for index in range(1, self.count):
            self.start(index, bootstrap=first.listen[0])
        for node in self.started():
            self.wait_ready(node)

    def wait_for(
        self,
        condition: Callable[[], _T],
        timeout: float,
        poll: float = 0.1,
        on_poll: Callable[[], None] | None = None,
    ) -> _T | None:
        """Poll ``condition`` every ``poll`` s until it returns something truthy, and return
        that; None after ``timeout`` s, or once no node is running (nothing more can change).

        The one poll-until loop for watching daemons from outside (scripts, benchmarks,
        end-to-end tests); ``on_poll`` runs after each poll (e.g. to redraw a live view).
        """
        deadline = time.monotonic() + timeout
        while True:
            polled = time.monotonic()
            value = condition()
            if value:
                return value
            if on_poll is not None:
                on_poll()
            if polled >= deadline or not any(node.running for node in self.started()):
                return None
            time.sleep(max(0.0, min(poll - (time.monotonic() - polled), deadline - polled)))

    def started(self) -> list[LocalNode]:
        return [node for node in self.nodes if node is not None]

    def bootstrap_addr(self) -> str:
        for node in self.started():
            if node.running and node.listen:
                return node.listen[0]
        raise LocalNetworkError("no running node to bootstrap from")

    def statuses(self) -> list[dict[str, Any] | None]:
        return [node.status() if node is not None else None for node in self.nodes]

    def wait_all_exited(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        for node in self.started():
            remaining = max(0.0, deadline - time.monotonic())
            try:
                node.process.wait(remaining)
            except subprocess.TimeoutExpired:
                return False
        return True

    def kill(self, index: int, sig: int = signal.SIGKILL) -> None:
        node = self.nodes[index]
        if node is not None and node.running:
            node.process.send_signal(sig)
            node.process.wait(STOP_TIMEOUT_S)

    def stop_all(self) -> None:
        """SIGTERM every node, then SIGKILL whatever is left: no process stays behind."""
        for node in self.started():
            if node.running:
                node.process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for node in self.started():
            try:
                node.process.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.killpg(node.process.pid, signal.SIGKILL)
                node.process.wait()
