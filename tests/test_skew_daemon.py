"""Issue 25 in the daemon: statistics agreed over libp2p, and momentum kept by the checkpoint."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import trio

from fltasks import Task, load_task, partition
from fltasks.momentum import QuasiGlobalMomentum
from gossip.feature_stats import FeatureStatsGossip
from p2pfl.checkpoint import NodeState, decode_state, encode_state
from tests.runtimes import GUARD_S, make_runtime
from topologies.feature_stats import agreed_statistics
from topologies.graphs import make_graph

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def digits() -> Task:
    return load_task("digits")


def _state(**fields: object) -> NodeState:
    return NodeState(round=2, seq=2, weight=1.0, estimate=np.zeros(4),
                     fingerprint=bytes(32), **fields)  # type: ignore[arg-type]


def test_momentum_state_round_trips_a_checkpoint() -> None:
    rng = torch.Generator().manual_seed(0)
    points = [torch.randn(4, generator=rng, dtype=torch.float64) for _ in range(4)]
    steps = torch.tensor(3.0, dtype=torch.float64)
    running = QuasiGlobalMomentum(0.9)
    for point in points[:3]:
        running.begin_round(point, steps, 0.1)

    saved = decode_state(encode_state(_state(momentum=running.state())), 4)
    resumed = QuasiGlobalMomentum(0.9)
    resumed.restore(saved.momentum)

    want = running.begin_round(points[3], steps, 0.1)
    got = resumed.begin_round(points[3], steps, 0.1)
    assert torch.equal(got, want) and bool(want.abs().sum() > 0)


def test_agreed_statistics_round_trip_a_checkpoint() -> None:
    mean, std = np.arange(3.0), np.array([1.0, 2.0, 0.5])
    saved = decode_state(encode_state(_state(statistics=(mean, std))), 4)
    assert saved.statistics is not None
    np.testing.assert_array_equal(saved.statistics[0], mean)
    np.testing.assert_array_equal(saved.statistics[1], std)
    assert decode_state(encode_state(_state()), 4).statistics is None


async def test_three_daemons_agree_on_the_simulators_pooled_statistics(
    digits: Task, tmp_path: Path
) -> None:
    settings = {"partition": "dirichlet:0.5", "rounds": 1, "degree": 2}
    with trio.fail_after(GUARD_S):
        first = make_runtime(digits, tmp_path / "0", "0/3", **settings)
        async with trio.open_nursery() as nursery:
            await nursery.start(first.run)
            assert first.transport is not None
            bootstrap = (first.transport.addrs[0],)
            others = [make_runtime(digits, tmp_path / str(i), f"{i}/3", bootstrap=bootstrap,
                                   **settings) for i in (1, 2)]
            for node in others:
                nursery.start_soon(node.run)
    # The daemon runs gossip's own class, as the simulator does.
    assert isinstance(first.stats.gossip, FeatureStatsGossip)
    shards = partition(digits.y_train, 3, "dirichlet:0.5", seed=0)
    simulated = agreed_statistics(digits, make_graph("complete", 3, 2, 0.0, seed=0), shards,
                                  "gossip")
    assert simulated is not None
    for node in (first, *others):
        assert node.training.statistics is not None, node.stats.outcome
        mean, std = node.training.statistics
        np.testing.assert_allclose(mean, simulated[0][0], atol=1e-3 * std.max())
        np.testing.assert_allclose(std, simulated[0][1], rtol=1e-3, atol=1e-3)


def test_batched_momentum_steps_equal_task_train_with_the_same_direction(digits: Task) -> None:
    """The simulator's momentum pull is Task.train's (the daemon's), step for step."""
    from topologies.batched import PaddedShards, make_trainer

    shard = np.arange(70)  # 3 minibatches of 32, 32 and 6
    trainer = make_trainer(digits)
    model = digits.make_model()
    flat = trainer.layout.flatten(model).unsqueeze(0)
    direction = torch.randn(flat.shape, generator=torch.Generator().manual_seed(5)) * 0.1
    padded = PaddedShards([shard])
    order = padded.epoch_order(torch.Generator().manual_seed(3))[0]
    trainer.train(flat, padded, epochs=1, generator=torch.Generator().manual_seed(3),
                  direction=direction)

    perm = torch.randperm(70, generator=torch.Generator().manual_seed(0))
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(70)
    x, y = digits.x_train[order][inverse], digits.y_train[order][inverse]
    pulls = {name: view[0] for name, view in trainer.layout.views(direction).items()}
    digits.train(model, x, y, epochs=1, generator=torch.Generator().manual_seed(0),
                 direction=pulls)
    torch.testing.assert_close(flat[0], trainer.layout.flatten(model), rtol=0, atol=1e-6)


async def test_a_late_members_share_rescales_the_node_once(digits: Task, tmp_path: Path) -> None:
    """The background agreement rescales when a member's shard moves the statistics, then not."""
    from types import SimpleNamespace

    from gossip import NodeKey
    from gossip.feature_stats import FeatureAggregates, encode_share

    node = make_runtime(digits, tmp_path, "0/2", partition="dirichlet:0.5")
    agreement = node.stats
    assert agreement.gossip is not None and node.training.statistics is None
    raw = digits.raw_features
    assert raw is not None
    other = partition(digits.y_train, 2, "dirichlet:0.5", seed=0)[1]
    late = FeatureStatsGossip(FeatureAggregates.of(raw.x_train[other]),
                              agreement.gossip.fingerprint).prepare(0)
    alone = SimpleNamespace(book=[])  # no neighbours to push to: only what arrives

    assert await agreement.serve(NodeKey.generate().peer_id, encode_share(late)) == b"ok"
    await agreement.step(None, alone)  # type: ignore[arg-type]
    assert agreement.rescaled == 1 and node.training.statistics is not None
    pooled = raw.x_train.mean(axis=0)
    np.testing.assert_allclose(node.training.statistics[0], pooled, atol=1e-9)
    await agreement.step(None, alone)  # type: ignore[arg-type]
    assert agreement.rescaled == 1
    assert await agreement.serve(NodeKey.generate().peer_id, b"\x00junk") != b"ok"
    assert agreement.refused == 1
