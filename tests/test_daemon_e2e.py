"""End to end: real `p2pfl node` daemons as subprocesses on loopback.

Five daemons learn digits from non-IID shards; one is killed with SIGKILL
mid-run and restarted on its state directory; every node must end at 0.85
accuracy or more, the models must draw together, and the restarted node must
resume at its saved round with its updates accepted again by its peers.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import numpy as np

from p2pfl.checkpoint import FILE_NAME, CheckpointError, decode_state
from p2pfl.localnet import LocalNetwork, LocalNode

ROUNDS = 80
LATE_ROUND = 65
VICTIM = 2


def wait_until(condition, timeout: float, what: str, poll: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def estimate_of(node: LocalNode) -> np.ndarray | None:
    try:
        return decode_state((node.state_dir / FILE_NAME).read_bytes()).estimate
    except (OSError, CheckpointError):
        return None


def consensus_distance(network: LocalNetwork) -> float:
    estimates = [estimate_of(node) for node in network.started()]
    stacked = np.stack([e for e in estimates if e is not None])
    return float(((stacked - stacked.mean(axis=0)) ** 2).sum(axis=1).mean())


def node_round(node: LocalNode) -> int:
    status = node.status()
    return status["round"] if status else -1


def test_five_daemons_learn_and_a_killed_node_resumes(tmp_path: Path) -> None:
    with LocalNetwork(
        tmp_path,
        5,
        rounds=ROUNDS,
        partition="dirichlet:0.5",
        degree=3,
        extra_args=("--round-interval", "0.2", "--linger", "5"),
    ) as network:
        network.start_all()
        nodes = network.started()
        wait_until(lambda: all(node_round(n) >= 3 for n in nodes), 90, "every node at round 3")
        early_distance = consensus_distance(network)

        victim = nodes[VICTIM]
        wait_until(lambda: node_round(victim) >= 10, 60, "the victim at round 10")
        network.kill(VICTIM, signal.SIGKILL)
        saved = decode_state((victim.state_dir / FILE_NAME).read_bytes())
        seen_before = max(
            (n.status() or {}).get("last_seq", {}).get(victim.peer_id, 0)
            for n in nodes
            if n is not victim
        )

        restarted = network.start(VICTIM, bootstrap=network.bootstrap_addr())
        network.wait_ready(restarted)
        first_round = wait_until(
            lambda: (restarted.status() or {}).get("round"), 30, "the restarted node's status"
        )
        assert first_round >= saved.round, "the restarted node did not resume its saved round"
        assert f"resumed from checkpoint at round {saved.round}" in restarted.log_path.read_text()

        def peers_accept_again() -> bool:
            return any(
                (n.status() or {}).get("last_seq", {}).get(restarted.peer_id, 0) > seen_before
                for n in network.started()
                if n is not restarted
            )

        wait_until(peers_accept_again, 60, "a peer to accept the restarted node's updates")
        others = [n for n in network.started() if n is not restarted]
        # Measured while every node still runs: a node whose peers have all finished
        # trains alone on its skewed shard and drifts, which says nothing of gossip.
        wait_until(
            lambda: min(node_round(n) for n in others) >= LATE_ROUND,
            90,
            f"the other nodes at round {LATE_ROUND}",
        )
        late_distance = consensus_distance(network)
        assert late_distance < early_distance / 2

        assert network.wait_all_exited(120), "some daemon did not finish its rounds"
        finals = [node.final_accuracy for node in network.started()]
        assert all(a is not None and a >= 0.85 for a in finals), finals
        assert all(node.process.returncode == 0 for node in network.started())
        for node in network.started():
            assert "Traceback" not in node.log_path.read_text()


def test_sigterm_stops_a_node_quickly_with_a_checkpoint(tmp_path: Path) -> None:
    with LocalNetwork(
        tmp_path, 2, rounds=None, partition="iid", degree=1, extra_args=("--round-interval", "0.1")
    ) as network:
        network.start_all()
        node = network.started()[1]
        wait_until(lambda: node_round(node) >= 3, 60, "node 1 at round 3")
        node.process.send_signal(signal.SIGTERM)
        started = time.monotonic()
        node.process.wait(10)
        assert time.monotonic() - started < 5.0
        assert node.process.returncode == 0
        log = node.log_path.read_text()
        assert "Traceback" not in log
        saved = decode_state((node.state_dir / FILE_NAME).read_bytes())
        assert saved.round >= 3
        assert node.final_accuracy is not None
