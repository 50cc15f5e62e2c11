"""Tests for topologies: generators, validation, mixing matrices and spectral gaps."""

import subprocess
import sys
from pathlib import Path

import networkx as nx
import numpy as np
import pytest

import topologies.mixing as mixing
from topologies import (
    TOPOLOGIES,
    check_graph,
    complete,
    make_graph,
    metropolis_hastings,
    push_sum_matrix,
    random_graph,
    ring,
    rounds_to_consensus,
    small_world,
    spectral_gap,
    star,
)

pytestmark = pytest.mark.unit


def _degrees(graph: nx.Graph) -> set[int]:
    return {d for _, d in graph.degree}


# --- generators --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "graph, degrees",
    [
        (ring(10), {2}),
        (ring(2), {1}),
        (complete(7), {6}),
        (star(6), {1, 5}),
        (random_graph(20, 3, seed=0), {3}),
        (random_graph(21, 2, seed=0), {2}),
        (random_graph(2, 1, seed=0), {1}),
    ],
)
def test_generator_degrees_nodes_and_connectivity(graph: nx.Graph, degrees: set[int]) -> None:
    assert _degrees(graph) == degrees
    assert list(graph.nodes) == list(range(graph.number_of_nodes()))
    assert nx.is_connected(graph)


def test_star_hub_is_node_zero() -> None:
    assert star(6).degree[0] == 5


def test_small_world_keeps_edge_count_and_is_connected() -> None:
    graph = small_world(100, 4, 0.3, seed=1)
    assert graph.number_of_edges() == 100 * 4 // 2
    assert nx.is_connected(graph)
    assert list(graph.nodes) == list(range(100))


def test_small_world_without_rewiring_is_the_ring_lattice() -> None:
    graph = small_world(10, 4, 0.0, seed=0)
    assert _degrees(graph) == {4}
    assert graph.has_edge(0, 2) and not graph.has_edge(0, 3)


def test_random_degree_two_is_one_cycle_for_large_n() -> None:
    graph = random_graph(2000, 2, seed=4)
    assert _degrees(graph) == {2} and nx.is_connected(graph)


@pytest.mark.parametrize(
    "build",
    [
        lambda seed: random_graph(30, 4, seed=seed),
        lambda seed: random_graph(30, 2, seed=seed),
        lambda seed: small_world(30, 4, 0.5, seed=seed),
    ],
)
def test_random_generators_are_deterministic_under_seed(build) -> None:
    assert list(build(1).edges) == list(build(1).edges)
    assert set(build(1).edges) != set(build(2).edges)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ring(1), "n must be an integer >= 2"),
        (lambda: complete(0), "n must be an integer >= 2"),
        (lambda: star(1), "n must be an integer >= 2"),
        (lambda: ring(5.0), "n must be an integer >= 2"),
        (lambda: random_graph(1, 1, seed=0), "n must be an integer >= 2"),
        (lambda: random_graph(10, 0, seed=0), "degree must be an integer >= 1"),
        (lambda: random_graph(10, 10, seed=0), "degree must be < n"),
        (lambda: random_graph(9, 3, seed=0), r"n \* degree is odd"),
        (lambda: random_graph(10, 1, seed=0), "cannot be connected"),
        (lambda: small_world(10, 10, 0.1, seed=0), "k must be < n"),
        (lambda: small_world(10, 12, 0.1, seed=0), "k must be < n"),
        (lambda: small_world(10, 1, 0.1, seed=0), "k must be an integer >= 2"),
        (lambda: small_world(10, 3, 0.1, seed=0), "k must be even"),
        (lambda: small_world(10, 4, 1.5, seed=0), r"p must be in \[0, 1\]"),
        (lambda: small_world(10, 4, -0.1, seed=0), r"p must be in \[0, 1\]"),
        (lambda: small_world(10, 4, float("nan"), seed=0), r"p must be in \[0, 1\]"),
        (lambda: make_graph("torus", 10), "unknown topology 'torus': use one of ring, random"),
    ],
)
def test_bad_parameters_raise_one_line_value_error(call, message: str) -> None:
    with pytest.raises(ValueError, match=message) as info:
        call()
    assert "\n" not in str(info.value)


def test_numpy_integers_are_accepted() -> None:
    assert ring(np.int64(5)).number_of_nodes() == 5


@pytest.mark.parametrize("name", TOPOLOGIES)
def test_make_graph_builds_every_named_topology(name: str) -> None:
    graph = make_graph(name, 16, degree=4, rewire=0.2, seed=0)
    assert graph.number_of_nodes() == 16 and nx.is_connected(graph)


def test_make_graph_passes_options_through() -> None:
    assert set(make_graph("random", 16, degree=5, seed=3).edges) == set(
        random_graph(16, 5, seed=3).edges
    )
    assert set(make_graph("small-world", 16, degree=6, rewire=0.3, seed=3).edges) == set(
        small_world(16, 6, 0.3, seed=3).edges
    )


@pytest.mark.parametrize(
    "graph, message",
    [
        (nx.Graph([(0, 1), (2, 3)]), "not connected"),
        (nx.Graph([(1, 2), (2, 3)]), "0..n-1"),
        (nx.empty_graph(1), "at least 2 nodes"),
        (nx.DiGraph([(0, 1), (1, 0)]), "undirected"),
    ],
)
def test_check_graph_rejects_unusable_graphs(graph: nx.Graph, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_graph(graph)


def test_check_graph_accepts_generated_graph() -> None:
    check_graph(small_world(12, 4, 0.2, seed=0))


def test_topologies_never_imports_network_stack() -> None:
    code = "import sys, topologies; print([m for m in ('libp2p', 'trio') if m in sys.modules])"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=root)
    assert out.stdout.strip() == "[]"


# --- mixing matrices ---------------------------------------------------------------------


GRAPHS = [ring(12), star(9), complete(6), random_graph(30, 3, seed=1),
          small_world(40, 4, 0.2, seed=2)]


@pytest.mark.parametrize("graph", GRAPHS)
def test_metropolis_hastings_is_symmetric_doubly_stochastic(graph: nx.Graph) -> None:
    w = metropolis_hastings(graph).toarray()
    assert np.allclose(w, w.T)
    assert np.allclose(w.sum(axis=0), 1) and np.allclose(w.sum(axis=1), 1)
    assert (w >= 0).all()
    assert np.count_nonzero(w - np.diag(np.diag(w))) == 2 * graph.number_of_edges()


def test_metropolis_hastings_weight_on_edge() -> None:
    w = metropolis_hastings(star(5))
    assert w[0, 1] == pytest.approx(1 / 5)  # hub degree 4 dominates the leaf's 1
    assert w[1, 1] == pytest.approx(4 / 5)


@pytest.mark.parametrize("graph", GRAPHS)
def test_metropolis_hastings_rounds_reach_the_average(graph: nx.Graph) -> None:
    w = metropolis_hastings(graph)
    x = np.random.default_rng(0).normal(size=graph.number_of_nodes())
    y = x.copy()
    for _ in range(3000):
        y = w @ y
    assert np.allclose(y, x.mean(), atol=1e-6)


@pytest.mark.parametrize("graph", GRAPHS)
def test_push_sum_matrix_is_column_stochastic(graph: nx.Graph) -> None:
    p = push_sum_matrix(graph).toarray()
    assert np.allclose(p.sum(axis=0), 1)
    degree = np.array([graph.degree[j] for j in range(graph.number_of_nodes())])
    assert np.allclose(np.diag(p), 1 / (degree + 1))
    u, v = next(iter(graph.edges))
    assert p[u, v] == pytest.approx(1 / (degree[v] + 1))


def test_push_sum_ratio_reaches_weighted_average() -> None:
    graph = star(7)
    p = push_sum_matrix(graph)
    rng = np.random.default_rng(1)
    values, samples = rng.normal(size=7), rng.integers(1, 100, size=7).astype(float)
    s, w = values * samples, samples.copy()
    for _ in range(500):
        s, w = p @ s, p @ w
    assert np.allclose(s / w, np.average(values, weights=samples))


def test_spectral_gap_orders_complete_small_world_ring() -> None:
    gaps = [spectral_gap(metropolis_hastings(g))
            for g in (complete(32), small_world(32, 4, 0.2, seed=0), ring(32))]
    assert gaps[0] > gaps[1] > gaps[2] > 0


def test_spectral_gap_of_ring_matches_closed_form() -> None:
    n = 50  # MH on a ring is 1/3 everywhere: eigenvalues 1/3 + 2/3 cos(2 pi k / n)
    assert spectral_gap(metropolis_hastings(ring(n))) == pytest.approx(
        2 / 3 * (1 - np.cos(2 * np.pi / n))
    )


def test_spectral_gap_sparse_path_agrees_with_dense(monkeypatch: pytest.MonkeyPatch) -> None:
    w = metropolis_hastings(small_world(300, 4, 0.1, seed=5))
    dense = spectral_gap(w)
    monkeypatch.setattr(mixing, "DENSE_EIGEN_LIMIT", 100)
    assert spectral_gap(w) == pytest.approx(dense, rel=1e-6)


def test_spectral_gap_of_disconnected_graph_is_zero() -> None:
    w = metropolis_hastings(nx.Graph([(0, 1), (2, 3)]))
    assert spectral_gap(w) == pytest.approx(0.0, abs=1e-12)


def test_spectral_gap_rejects_push_sum_matrix() -> None:
    with pytest.raises(ValueError, match="symmetric"):
        spectral_gap(push_sum_matrix(star(5)))


def test_rounds_to_consensus_is_monotone() -> None:
    by_gap = [rounds_to_consensus(g, 1e-3) for g in (0.01, 0.1, 0.5, 1.0)]
    by_eps = [rounds_to_consensus(0.1, e) for e in (1e-1, 1e-3, 1e-6)]
    assert by_gap == sorted(by_gap, reverse=True) and len(set(by_gap)) == 4
    assert by_eps == sorted(by_eps) and len(set(by_eps)) == 3
    assert rounds_to_consensus(0.1, 1e-3) == int(np.ceil(np.log(1e3) / 0.1))


def test_rounds_to_consensus_bounds_observed_rounds() -> None:
    w = metropolis_hastings(ring(16))
    bound = rounds_to_consensus(spectral_gap(w), 1e-3)
    x = np.zeros(16)
    x[0] = 1.0
    start = np.linalg.norm(x - x.mean())
    for _ in range(bound):
        x = w @ x
    assert np.linalg.norm(x - x.mean()) <= 1e-3 * start


@pytest.mark.parametrize("gap, epsilon", [(0.0, 0.1), (1.5, 0.1), (0.1, 0.0), (0.1, 1.0)])
def test_rounds_to_consensus_rejects_bad_input(gap: float, epsilon: float) -> None:
    with pytest.raises(ValueError):
        rounds_to_consensus(gap, epsilon)
