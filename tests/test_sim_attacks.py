"""Hostile peers in the simulator: gossip's robust rules, Byzantine nodes, DP and churn."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fltasks import load_task, partition
from gossip import robust
from gossip.aggregation import aggregator_by_name
from gossip.attacks import ATTACKS, attack_vector
from gossip.privacy import GaussianMechanism, clip_to_norm, row_norms
from gossip.pushsum import PushSum
from topologies import robust as batched
from topologies.attacks import Adversary, alie_z_max, choose_byzantine
from topologies.graphs import small_world
from topologies.network import DELIVERED, REFUNDED, NetworkConditions, NetworkModel
from topologies.privacy import DELTA, BatchedGaussianMechanism
from topologies.simulator import Simulation, SimulationConfig
from topologies.stacked_pushsum import consensus_distance

pytestmark = pytest.mark.property


def padded_sets(seed: int = 0, n: int = 40, width: int = 7, size: int = 13):
    """Own rows, padded received rows and a mask with every count from 0 to ``width``."""
    rng = np.random.default_rng(seed)
    own = rng.normal(size=(n, size))
    others = rng.normal(size=(n, width, size)) * rng.uniform(0.1, 10, size=(n, width, 1))
    counts = np.arange(n) % (width + 1)
    valid = np.zeros((n, width), dtype=bool)
    for i, count in enumerate(counts):
        valid[i, rng.permutation(width)[:count]] = True
    return own, others, valid


def per_node(own, others, valid, rule):
    return np.stack([rule(own[i], others[i][valid[i]]) for i in range(len(own))])


@pytest.mark.parametrize("beta", [0.2, 0.34])
def test_batched_trimmed_mean_is_gossips(beta):
    own, others, valid = padded_sets()
    got = batched.trimmed_mean(*map(torch.from_numpy, (own, others, valid)), beta)
    expected = per_node(
        own, others, valid, lambda z, rest: robust.trimmed_mean(np.vstack([z, rest]), beta)
    )
    np.testing.assert_array_equal(got.numpy(), expected)


def test_batched_median_is_gossips():
    own, others, valid = padded_sets(seed=1)
    got = batched.median(*map(torch.from_numpy, (own, others, valid)))
    expected = per_node(own, others, valid, lambda z, rest: robust.median(np.vstack([z, rest])))
    np.testing.assert_array_equal(got.numpy(), expected)


@pytest.mark.parametrize("tau", [None, 0.0, 2.5])
def test_batched_clipped_step_is_gossips(tau):
    own, others, valid = padded_sets(seed=2)
    got = batched.clipped_step(*map(torch.from_numpy, (own, others, valid)), tau=tau, beta=0.2)

    def reference(z, rest):
        if len(rest) == 0:
            return z
        radius = robust.adaptive_tau(z, rest, 0.2) if tau is None else tau
        return robust.clipped_step(z, rest, radius)

    np.testing.assert_array_equal(got.numpy(), per_node(own, others, valid, reference))


_ROBUST_VALUES = st.one_of(
    st.floats(width=32, allow_nan=False, allow_infinity=False),
    st.sampled_from([0.0, -0.0, 1e-45, -1e-40, 1.0, 3.4028234663852886e38, -3.4e38]),
)


@settings(max_examples=150, deadline=None)
@given(
    data=st.tuples(st.integers(1, 4), st.integers(0, 5), st.integers(1, 6)).flatmap(
        lambda shape: st.tuples(
            hnp.arrays(np.float32, (shape[0], shape[2]), elements=_ROBUST_VALUES),
            hnp.arrays(np.float32, shape, elements=_ROBUST_VALUES),
            hnp.arrays(np.bool_, shape[:2]),
        )
    ),
    rule=st.sampled_from(["trimmed-mean", "median", "clipped", "clipped-fixed"]),
)
def test_batched_rules_are_gossips_over_the_full_float_range(data, rule):
    """float32 up to +-max and subnormals: the batched rule equals the one-set rule bit for bit."""
    own, others, valid = data
    tensors = [torch.from_numpy(a) for a in (own, others, valid)]
    one_set = {
        "trimmed-mean": lambda z, rest: robust.trimmed_mean(np.vstack([z, rest])),
        "median": lambda z, rest: robust.median(np.vstack([z, rest])),
        "clipped": lambda z, rest: (
            z if len(rest) == 0 else robust.clipped_step(z, rest, robust.adaptive_tau(z, rest))
        ),
        "clipped-fixed": lambda z, rest: z if len(rest) == 0 else robust.clipped_step(z, rest, 1.5),
    }[rule]
    batched_form = {
        "trimmed-mean": batched.trimmed_mean,
        "median": batched.median,
        "clipped": batched.clipped_step,
        "clipped-fixed": lambda *t: batched.clipped_step(*t, tau=1.5),
    }[rule]
    with np.errstate(all="ignore"):
        expected = per_node(own, others, valid, one_set)
    got = batched_form(*tensors).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("name", ["trimmed-mean", "median", "clipped"])
def test_robust_round_is_gossips_aggregator_node_by_node(name):
    """Estimates and weights after lossy, churned rounds equal gossip's Aggregator.combine."""
    graph = small_world(16, 4, 0.3, seed=2)
    rng = np.random.default_rng(3)
    estimates, weights = rng.normal(size=(16, 5)), rng.integers(1, 50, size=16).astype(float)
    conditions = NetworkConditions(loss=0.2, churn=0.2)
    config = SimulationConfig(
        rounds=3,
        train=False,
        evaluate=False,
        network=conditions,
        seed=7,
        dtype=torch.float64,
        aggregator=name,
    )
    simulation = Simulation(graph, torch.from_numpy(estimates), weights, config)
    simulation.run()

    network = NetworkModel(graph, conditions, seed=7)
    rule = aggregator_by_name(name)
    nodes = [PushSum(z, w) for z, w in zip(estimates, weights, strict=True)]
    for t in range(3):
        plan = network.plan(t)
        shares = {i: nodes[i].split(int(network.degree[i])) for i in range(16) if plan.online[i]}
        inbox: dict[int, list] = {i: [] for i in range(16)}
        for arc in range(network.num_arcs):
            sender, receiver = int(network.src[arc]), int(network.dst[arc])
            if plan.fate[arc] == REFUNDED:
                nodes[sender].absorb(shares[sender].estimate, shares[sender].weight)
            elif plan.fate[arc] == DELIVERED:
                inbox[receiver].append(shares[sender])
        for i, received in inbox.items():
            rule.combine(nodes[i], received)
    np.testing.assert_allclose(
        simulation.estimates.numpy(), np.stack([node.estimate for node in nodes]), atol=1e-12
    )
    np.testing.assert_allclose(simulation.weights, [node.weight for node in nodes], rtol=1e-12)


def digits_run(rounds: int, nodes: int = 16, degree: int = 6, **options):
    task = load_task("digits", seed=0)
    graph = small_world(nodes, degree, 0.1, seed=0)
    shards = partition(task.y_train, nodes, "iid", seed=0)
    network = options.pop("network", NetworkConditions())
    options.setdefault("local_epochs", 1)
    config = SimulationConfig(rounds=rounds, seed=0, network=network, **options)
    simulation = Simulation.for_task(task, graph, shards, config)
    return simulation, simulation.run()


def test_byzantine_nodes_are_left_out_of_honest_metrics():
    simulation, history = digits_run(2, byzantine=3, attack="noise")
    honest = ~choose_byzantine(16, 3, seed=0)
    assert honest.sum() == 13 and (simulation.honest == honest).all()
    accuracy = simulation.accuracy().numpy()
    last = history[-1]
    assert last.honest_accuracy_mean == pytest.approx(accuracy[honest].mean())
    assert last.honest_accuracy_min == pytest.approx(accuracy[honest].min())
    assert last.accuracy_mean == pytest.approx(accuracy.mean())
    rows = torch.from_numpy(np.flatnonzero(honest))
    assert last.consensus_distance == pytest.approx(
        consensus_distance(simulation.estimates[rows]), rel=1e-6
    )


def test_without_attackers_honest_metrics_are_all_nodes():
    _, history = digits_run(1)
    assert history[-1].honest_accuracy_mean == history[-1].accuracy_mean
    assert history[-1].honest_accuracy_min == history[-1].accuracy_min


def test_scale_attack_breaks_the_mean_and_not_robust_rules():
    """A large scale attack blows the mean's models up; trimming or clipping holds.

    (Scaling a ReLU network barely changes its argmax, so the mean's accuracy
    falls more slowly than its models diverge: both are checked.)
    """
    clean = digits_run(6)[1][-1]
    attacked = {
        name: digits_run(
            6,
            byzantine=2,
            attack="scale",
            attack_scale=1e4,
            aggregator=name,
            **({} if name == "mean" else {"trim_fraction": 0.45}),
        )[1][-1]
        for name in ("mean", "trimmed-mean", "clipped")
    }
    assert attacked["mean"].consensus_distance > 1e9 * clean.consensus_distance
    assert attacked["mean"].honest_accuracy_mean < clean.honest_accuracy_mean - 0.05
    for name in ("trimmed-mean", "clipped"):
        assert attacked[name].consensus_distance < 100 * clean.consensus_distance, name
        assert attacked[name].honest_accuracy_mean > clean.honest_accuracy_mean - 0.03, name


def test_alie_default_is_the_papers_z_max():
    # Baruch et al. 2019: n = 50, f = 12 -> s = 14, z = Phi^-1(36/50) ~ 0.58.
    assert alie_z_max(50, 12) == pytest.approx(0.5828, abs=1e-3)


_DELTA_VALUES = st.one_of(
    st.floats(allow_nan=False, allow_infinity=False, width=64),
    st.sampled_from([0.0, 5e-324, -1e-310, 3.4028234663852886e38, -1.7976931348623157e308]),
)


@settings(max_examples=200, deadline=None)
@given(
    deltas=st.tuples(st.integers(1, 4), st.integers(1, 40)).flatmap(
        lambda shape: st.one_of(
            hnp.arrays(np.float64, shape, elements=_DELTA_VALUES),
            hnp.arrays(
                np.float32,
                shape,
                elements=st.floats(width=32, allow_nan=False, allow_infinity=False),
            ),
        )
    ),
    clip=st.sampled_from([1e-30, 1.5, 1e30]),
)
# Found under load: the one factor C / norm = 1e-30 / 4.54e288 is subnormal.
@example(deltas=np.array([[4.54e288]]), clip=1e-30)
def test_dp_clip_is_gossips_clip_to_norm_over_the_full_float_range(deltas, clip):
    mechanism = BatchedGaussianMechanism(clip, 0.7, nodes=len(deltas), seed=0)
    clipped = mechanism.clip(torch.from_numpy(deltas)).numpy()
    exact = np.stack([clip_to_norm(row, clip) for row in deltas])
    assert (row_norms(exact) <= clip * (1 + 1e-12)).all()
    assert np.isfinite(clipped).all()
    np.testing.assert_array_equal(clipped, exact.astype(deltas.dtype))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dp_clip_refuses_nan_and_inf_as_gossip_does(bad):
    deltas = np.array([[1.0, 2.0], [bad, 0.0]])
    with pytest.raises(ValueError, match="NaN or inf"):
        clip_to_norm(deltas[1], 1.0)
    with pytest.raises(ValueError, match="NaN or inf"):
        BatchedGaussianMechanism(1.0, 0.7, nodes=2, seed=0).clip(torch.from_numpy(deltas))


def test_dp_noise_has_gossips_std_and_touches_only_selected_rows():
    mechanism = BatchedGaussianMechanism(0.5, 2.0, nodes=4, seed=0)
    before = torch.zeros(4, 50_000, dtype=torch.float64)
    after = before.clone()
    after[:, 0] = 10.0  # a delta of norm 10, clipped to 0.5
    mechanism.privatize(before, after, torch.tensor([0, 2]))
    assert after[1, 0] == 10.0 and after[3, 0] == 10.0  # not privatized
    noise = after[[0, 2], 1:]
    reference = GaussianMechanism(0.5, 2.0, np.random.default_rng(0))
    assert noise.std().item() == pytest.approx(reference.noise_std, rel=0.01)
    assert noise.mean().item() == pytest.approx(0.0, abs=0.01)
    assert mechanism.steps.tolist() == [1, 0, 1, 0]


def test_dp_epsilon_is_gossips_accountant_for_the_rounds_trained():
    simulation, _ = digits_run(3, nodes=8, degree=4, dp_clip=1.0, dp_noise=1.0)
    reference = GaussianMechanism(1.0, 1.0, np.random.default_rng(0))
    reference.accountant.step(3)
    assert simulation.epsilon() == pytest.approx(reference.spent(DELTA)["epsilon"])
    assert simulation.epsilon() > 0


def test_twenty_percent_churn_per_round_still_reaches_consensus():
    graph = small_world(20, 4, 0.2, seed=1)
    rng = np.random.default_rng(4)
    estimates, weights = rng.normal(size=(20, 30)), rng.integers(1, 40, size=20).astype(float)
    config = SimulationConfig(
        rounds=100, train=False, evaluate=False, network=NetworkConditions(churn=0.2)
    )
    history = Simulation(graph, torch.from_numpy(estimates), weights, config).run()
    assert all(m.online == 16 for m in history)  # round(0.2 * 20) offline every round
    assert history[-1].consensus_distance < 1e-6 * history[0].consensus_distance


def test_twenty_percent_churn_per_round_still_learns():
    _, history = digits_run(8, network=NetworkConditions(churn=0.2))
    assert all(m.online == 13 for m in history)
    assert history[-1].accuracy_mean > history[0].accuracy_mean + 0.3
    assert history[-1].accuracy_min > 0.6


def _finite(dtype: type) -> st.SearchStrategy[float]:
    """Every finite value of ``dtype``: extremes, subnormals, signed zeros."""
    info = np.finfo(dtype)
    return st.one_of(
        st.floats(width=np.dtype(dtype).itemsize * 8, allow_nan=False, allow_infinity=False),
        st.sampled_from(
            [0.0, -0.0, float(info.smallest_subnormal), float(info.max), -float(info.max), 1.0]
        ),
    )


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    attack=st.sampled_from(ATTACKS),
    dtype=st.sampled_from([np.float32, np.float64]),
    scale=st.sampled_from([None, 0.5, 3.0]),
)
def test_the_simulators_attack_vectors_are_gossips_attacker_by_attacker(
    data: st.DataObject, attack: str, dtype: type, scale: float | None
) -> None:
    """Adversary (batched, torch in and out) and gossip's attack_vector (the daemon's, one
    node) send the same vectors over the full float range, noise draws included, when the
    daemon's attacker is given what the simulator's sees: its honest neighbours' rows."""
    n = data.draw(st.integers(2, 7), label="n")
    size = data.draw(st.integers(1, 6), label="size")
    estimates = data.draw(hnp.arrays(dtype, (n, size), elements=_finite(dtype)), label="z")
    byzantine = data.draw(
        # Fewer than floor(n/2 + 1): ALIE's default z_max is defined only for those.
        hnp.arrays(np.bool_, n).filter(lambda mask: 0 < mask.sum() < n // 2 + 1),
        label="byzantine",
    )
    neighbours = [
        np.array(
            sorted(data.draw(st.sets(st.integers(0, n - 1).filter(lambda j, i=i: j != i)))),
            dtype=np.int64,
        )
        for i in range(n)
    ]
    adversary = Adversary(byzantine, attack, scale, neighbours, seed=5)
    rng = copy.deepcopy(adversary.rng)
    with np.errstate(all="ignore"):
        got = adversary.vectors(torch.from_numpy(estimates)).numpy()
        expected = []
        for b in np.flatnonzero(byzantine):
            honest = neighbours[b][~byzantine[neighbours[b]]]
            seen = estimates[honest] if len(honest) else None
            expected.append(attack_vector(attack, estimates[b], seen, adversary.scale, rng))
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.stack(expected))
