"""Per-record DP (``--dp sample``): DP-SGD with opacus in the daemon, on real digits.

- A node trains a few rounds of DP-SGD: the model learns, epsilon grows, and it
  is opacus's own RDP accountant stepped the same number of times at the
  same noise and sample rate; the budget survives a restart.
- The node announces weight 1, not its record count (the add/remove relation).
- ``--dp-target-epsilon``: the node stops training before epsilon would pass
  the target, says so in /status, /metrics and the log, and keeps merging.
- Steps spent under ``--dp node`` compose into the same accountant.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import trio
from opacus.accountants import RDPAccountant
from runtimes import make_runtime

from fltasks import Task, partition
from fltasks.dp_sgd import DpSgdTrainer, check_history, epsilon_of
from gossip import NodeKey
from p2pfl.checkpoint import CheckpointStore
from p2pfl.config import ConfigError, NodeConfig
from p2pfl.status import render_metrics

pytestmark = pytest.mark.integration

torch.set_num_threads(1)
DELTA = 1e-5
SAMPLE = {"dp": "sample", "dp_clip": 1.0, "dp_noise": 1.0, "min_neighbours": 0}


def opacus_epsilon(noise: float, sample_rate: float, steps: int) -> float:
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise, sample_rate=sample_rate)
    return float(accountant.get_epsilon(DELTA))


async def test_dp_sgd_rounds_learn_and_spend_opacus_epsilon_across_a_restart(
    digits: Task, tmp_path: Path
) -> None:
    key = NodeKey.generate()
    # Shard 0 of 8: 180 records, batches of 32, so q = 32/180 and 5 steps a round.
    with trio.fail_after(120):
        node = make_runtime(digits, tmp_path / "node", "0/8", key, rounds=2, **SAMPLE)
        assert node.status()["epsilon"] == 0.0 and node.status()["dp"] == "sample"
        trainer = node.budget.dp_sgd
        assert trainer is not None
        rate, per_round = trainer.sample_rate, trainer.steps_per_epoch
        samples = len(node.training.shard)
        assert (rate, per_round) == (32 / samples, int(samples / 32))
        await node.run()
        after_two = node.status()["epsilon"]
        assert after_two == pytest.approx(opacus_epsilon(1.0, rate, 2 * per_round), rel=1e-9)

        again = make_runtime(digits, tmp_path / "node", "0/8", key, rounds=5, **SAMPLE)
        assert again.status()["epsilon"] == after_two  # restored, not restarted at 0
        await again.run()
    status = again.status()
    assert status["epsilon"] > after_two
    assert status["epsilon"] == pytest.approx(opacus_epsilon(1.0, rate, 5 * per_round), rel=1e-9)
    assert status["delta"] == DELTA
    # Five noisy rounds on 180 records still learn: chance is 0.1.
    assert status["accuracy"] > 0.2
    assert f"p2pfl_dp_epsilon {status['epsilon']}" in render_metrics(status)
    saved = CheckpointStore(tmp_path / "node").load(again.gossip.layout.fingerprint)
    assert saved is not None
    assert saved.privacy["dp_history"] == [[1.0, rate, 5 * per_round]]


def test_a_dp_sgd_node_announces_weight_one_not_its_record_count(
    digits: Task, tmp_path: Path
) -> None:
    node = make_runtime(digits, tmp_path / "sample", "0/8", **SAMPLE)
    assert node.gossip.pushsum.weight == 1.0
    plain = make_runtime(digits, tmp_path / "plain", "0/8", min_neighbours=0)
    assert plain.gossip.pushsum.weight == float(len(plain.training.shard))


async def test_the_target_epsilon_stops_training_but_not_merging(
    digits: Task, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    node = make_runtime(digits, tmp_path / "node", "0/8", rounds=4, **SAMPLE)
    assert node.budget.dp_sgd is not None
    rate, per_round = node.budget.dp_sgd.sample_rate, node.budget.dp_sgd.steps_per_epoch
    # A target between the epsilon of 2 and of 3 rounds: exactly 2 rounds may train.
    two, three = (opacus_epsilon(1.0, rate, k * per_round) for k in (2, 3))
    target = (two + three) / 2
    node = make_runtime(
        digits, tmp_path / "node2", "0/8", rounds=4, dp_target_epsilon=target, **SAMPLE
    )
    with caplog.at_level(logging.WARNING, logger="p2pfl.privacy_budget"), trio.fail_after(120):
        await node.run()
    status = node.status()
    trainer = node.budget.dp_sgd
    assert trainer is not None and trainer.history() == [(1.0, rate, 2 * per_round)]
    assert status["epsilon"] == pytest.approx(two) and status["epsilon"] <= target
    assert status["dp_exhausted"] is True and status["round"] == 4
    assert "p2pfl_dp_exhausted 1" in render_metrics(status)
    assert any("privacy budget reached" in r.getMessage() for r in caplog.records)


def test_node_mode_steps_compose_into_the_dp_sgd_accountant(
    digits: Task, tmp_path: Path
) -> None:
    # 3 node-mode rounds at sigma 4 (sensitivity 2C: opacus noise 2, rate 1), then DP-SGD.
    state = tmp_path / "node"
    node = make_runtime(digits, state, "0/8", **SAMPLE)
    store = CheckpointStore(state)
    node_mode = {"dp_steps": 3, "dp_noise": 4.0, "non_private_rounds": 0}
    store.save(replace(node.saved_state(), round=3, privacy=node_mode))
    node.store.unlock()
    resumed = make_runtime(digits, state, "0/8", **SAMPLE)
    assert resumed.budget.dp_sgd is not None
    assert resumed.budget.dp_sgd.history() == [(2.0, 1.0, 3)]
    assert resumed.status()["epsilon"] == pytest.approx(epsilon_of([(2.0, 1.0, 3)], DELTA))
    # And back: node mode refuses a state that spent budget under DP-SGD.
    resumed.store.unlock()
    sampled = {"dp_history": [[1.0, 0.2, 5]], "non_private_rounds": 0}
    store.save(replace(node.saved_state(), privacy=sampled))
    with pytest.raises(ConfigError, match="spent its budget under --dp sample"):
        make_runtime(digits, state, "0/8", dp_clip=1.0, dp_noise=1.0, min_neighbours=0)


@pytest.mark.parametrize(
    "bad", [{}, [[1.0, 0.2]], [[1.0, 0.2, -1]], [[0.0, 0.2, 1]], [[1.0, 1.5, 1]], [[1, 0.2, 1.5]]]
)
def test_a_malformed_history_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="DP-SGD history"):
        check_history(bad)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"dp": "record"}, "choose node or sample"),
        ({"dp": "node", "dp_clip": 1.0}, "needs --dp-clip C and --dp-noise SIGMA"),
        ({"dp_clip": 1.0, "dp_noise": 1.0, "dp_lr": 1.0}, "only used with --dp sample"),
        ({"dp": "sample", "dp_lr": 0.0}, "--dp-lr 0.0: must be a finite number > 0"),
        ({"dp_target_epsilon": 8.0}, "only used with DP on"),
        ({"dp": "sample", "dp_clip": 1.0, "dp_noise": 1.0, "dp_target_epsilon": -1.0}, "> 0"),
    ],
)
def test_dp_settings_are_checked(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        NodeConfig(**settings).validate()  # type: ignore[arg-type]


def test_old_node_flags_still_mean_node_mode() -> None:
    config = NodeConfig(dp_clip=1.0, dp_noise=2.0).validate()
    assert config.dp_mode == "node" and config.dp_enabled
    assert NodeConfig().validate().dp_mode is None
    assert np.isfinite(epsilon_of([(1.0, 0.2, 10)], DELTA))


def test_the_dp_flags_reach_the_config() -> None:
    from p2pfl.cli import build_parser, node_config

    flags = ["node", "--dp", "sample", "--dp-clip", "1.5", "--dp-noise", "0.8", "--dp-lr", "2"]
    args = build_parser().parse_args([*flags, "--dp-delta", "1e-6", "--dp-target-epsilon", "8"])
    config = node_config(args)
    assert (config.dp_mode, config.dp_clip, config.dp_noise) == ("sample", 1.5, 0.8)
    assert config.dp_lr == 2.0
    assert (config.dp_delta, config.dp_target_epsilon) == (1e-6, 8.0)
    old = node_config(build_parser().parse_args(["node", "--dp-clip", "1", "--dp-noise", "2"]))
    assert old.dp_mode == "node"


def test_dp_sample_alone_takes_the_declared_defaults(digits: Task, tmp_path: Path) -> None:
    from fltasks.dp_defaults import DP_SGD_CLIP, DP_SGD_LR, DP_SGD_NOISE

    node = make_runtime(digits, tmp_path, "0/8", dp="sample", min_neighbours=0)
    trainer = node.budget.dp_sgd
    assert trainer is not None
    assert (trainer.noise_multiplier, trainer.clip_norm) == (DP_SGD_NOISE, DP_SGD_CLIP)
    expected_batch = trainer.optimizer.expected_batch_size
    assert trainer.optimizer.param_groups[0]["lr"] * expected_batch == pytest.approx(DP_SGD_LR)


def test_a_target_and_rounds_choose_the_noise_that_spends_the_target(
    digits: Task, tmp_path: Path
) -> None:
    lines: list[str] = []
    config = NodeConfig(
        key=str(tmp_path / "unused.key"), state_dir=str(tmp_path), shard="0/8",
        status_addr="127.0.0.1:0", dp="sample", dp_target_epsilon=8.0, rounds=40,
        min_neighbours=0,
    ).validate()
    from p2pfl.runtime import NodeRuntime

    node = NodeRuntime(config, NodeKey.generate(), digits, announce=lines.append)
    trainer = node.budget.dp_sgd
    assert trainer is not None
    spent = trainer.epsilon_after(40 * trainer.steps_per_epoch, DELTA)
    assert 7.9 <= spent <= 8.0  # opacus's search stops within 0.01 below the target
    assert trainer.epsilon_after(41 * trainer.steps_per_epoch, DELTA) > 8.0
    assert any(f"noise {trainer.noise_multiplier:.3f} spends epsilon 8" in line for line in lines)


# -- the simulator runs the daemon's DP-SGD, node by node ----------------------------------


def test_the_simulators_dp_sgd_is_the_daemons_for_the_same_generator(digits: Task) -> None:
    from fltasks.dp_defaults import DP_SGD_CLIP, DP_SGD_LR
    from fltasks.scaling import node_view
    from topologies.batched import make_trainer
    from topologies.privacy import DpSgdNodes

    shards = partition(digits.y_train, 4, "iid", seed=0)
    view = node_view(digits, shards, record_private=True)  # as both scale under --dp sample
    layout = make_trainer(view).layout
    nodes = DpSgdNodes(view, layout, shards, clip_norm=DP_SGD_CLIP, noise_multiplier=1.0, seed=3)
    start = layout.flatten(view.make_model())
    flat = start.repeat(4, 1)
    nodes.train(flat, torch.tensor([2]), epochs=2)
    assert torch.equal(flat[0], start) and not torch.equal(flat[2], start)

    # The daemon's trainer (p2pfl/runtime.py builds it so), with the generator the
    # simulator seeds for node 2.
    model = view.make_model()
    rows = torch.as_tensor(shards[2], dtype=torch.long)
    daemon = DpSgdTrainer(
        model, view.x_train[rows], view.y_train[rows], lr=DP_SGD_LR,
        batch_size=view.batch_size, noise_multiplier=1.0, clip_norm=DP_SGD_CLIP,
        generator=torch.Generator().manual_seed(3 * 100_003 + 2 + 0x5347),
    )
    daemon.train(2)
    assert torch.equal(flat[2], layout.flatten(model))
    assert nodes.trainers[2].history() == daemon.history()


def test_a_sample_mode_simulation_reports_the_worst_nodes_opacus_epsilon(digits: Task) -> None:
    from topologies.graphs import small_world
    from topologies.simulator import Simulation, SimulationConfig

    shards = partition(digits.y_train, 6, "dirichlet:0.5", seed=0)
    config = SimulationConfig(
        rounds=2, local_epochs=1, seed=0, dp_clip=1.0, dp_noise=1.0, dp_mode="sample"
    )
    simulation = Simulation.for_task(digits, small_world(6, 2, 0.1, seed=0), shards, config)
    assert (simulation.weights == 1.0).all()  # counts stay private, as in the daemon
    simulation.run()
    expected = max(
        opacus_epsilon(1.0, min(1.0, 32 / len(s)), 2 * int(1 / min(1.0, 32 / len(s))))
        for s in shards
    )
    assert simulation.epsilon(DELTA) == pytest.approx(expected, rel=1e-9)


async def test_the_target_epsilon_also_bounds_node_mode(digits: Task, tmp_path: Path) -> None:
    from gossip.privacy import RdpAccountant

    one, two = (RdpAccountant(2.0, steps=k).epsilon(DELTA) for k in (1, 2))  # sigma 4: z = 2
    node = make_runtime(
        digits, tmp_path / "node", "0/1", rounds=3, min_neighbours=0,
        dp_clip=1.0, dp_noise=4.0, dp_target_epsilon=(one + two) / 2,
    )
    with trio.fail_after(60):
        await node.run()
    assert node.budget.privacy is not None and node.budget.privacy.accountant.steps == 1
    status = node.status()
    assert status["epsilon"] == pytest.approx(one) and status["dp_exhausted"] is True
    assert status["state"] == "serving"  # its rounds are done; dp-exhausted before that


def test_dp_sgd_refuses_a_model_whose_batchnorm_mixes_records() -> None:
    from fltasks.models import small_cnn

    x, y = torch.randn(20, 3, 32, 32), torch.randint(0, 10, (20,))
    with pytest.raises(ValueError, match=r"--dp sample cannot train this model: .*BatchNorm"):
        DpSgdTrainer(small_cnn(3, 32, 32, 10), x, y, lr=0.1, batch_size=4,
                     noise_multiplier=1.0, clip_norm=1.0, generator=torch.Generator())


# -- randomness: fresh OS entropy before every DP-SGD step ---------------------------------


def test_reseeding_replaces_the_generators_whole_state_with_os_entropy() -> None:
    from p2pfl.dp import reseed_from_os_entropy

    first, second = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    reseed_from_os_entropy(first)
    reseed_from_os_entropy(second)
    # Same seed before, different streams after: the seed no longer decides anything.
    assert not torch.equal(torch.rand(8, generator=first), torch.rand(8, generator=second))
    copy = torch.Generator()
    copy.set_state(first.get_state())
    assert torch.equal(torch.rand(8, generator=first), torch.rand(8, generator=copy))


def test_the_daemons_dp_sgd_reseeds_before_every_step(digits: Task) -> None:
    from p2pfl.dp import reseed_from_os_entropy

    calls: list[int] = []

    def counting(generator: torch.Generator) -> None:
        calls.append(1)
        reseed_from_os_entropy(generator)

    rows = torch.arange(160)
    trainers = [
        DpSgdTrainer(
            digits.make_model(), digits.x_train[rows], digits.y_train[rows], lr=1.0,
            batch_size=32, noise_multiplier=1.0, clip_norm=1.0,
            generator=torch.Generator().manual_seed(0), reseed=reseed,
        )
        for reseed in (counting, None)
    ]
    for trainer in trainers:
        trainer.train(2)
    assert len(calls) == 2 * trainers[0].steps_per_epoch == 10
    assert trainers[0].history() == trainers[1].history()  # the same accounting
    changed = [torch.cat([p.detach().flatten() for p in t.module.parameters()]) for t in trainers]
    assert not torch.equal(changed[0], changed[1])  # the seed did not decide the steps


def test_a_lingering_simulation_gossips_without_training_or_spending(digits: Task) -> None:
    from topologies.graphs import ring
    from topologies.simulator import Simulation, SimulationConfig

    shards = partition(digits.y_train, 4, "iid", seed=0)
    config = SimulationConfig(rounds=1, linger_rounds=3, local_epochs=1, seed=0, dp_clip=1.0,
                              dp_noise=1.0, dp_mode="sample")
    simulation = Simulation.for_task(digits, ring(4), shards, config)
    history = simulation.run()
    assert len(history) == 4
    spent = max(opacus_epsilon(1.0, 32 / len(s), int(len(s) / 32)) for s in shards)
    assert simulation.epsilon(DELTA) == pytest.approx(spent, rel=1e-9)  # one round's steps
    distances = [m.consensus_distance for m in history]
    assert distances[3] < distances[1] < distances[0]  # only averaging after round 1
