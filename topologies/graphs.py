"""Communication graphs for gossip: who may send updates to whom.

Plain functions in the style of `networkx.generators`: every random one takes
`seed=`, every one returns a connected undirected `networkx.Graph` on nodes
0..n-1 (inserted in order, edges sorted, so iteration is deterministic), and
bad parameters raise `ValueError` with one line naming the fix. Averaging only
reaches consensus on a connected graph, hence the guarantee.
"""

from __future__ import annotations

import numbers
import operator
import random

import networkx as nx

TOPOLOGIES = ("ring", "random", "small-world", "complete", "star")
_REGULAR_TRIES = 100


def ring(n: int) -> nx.Graph:
    """Return the cycle C_n: each node talks to its two neighbours (one if n == 2).

    The slowest-mixing connected regular graph, spectral gap O(1/n^2); the usual
    worst case in decentralized SGD (Lian et al., NeurIPS 2017).
    """
    n = _check_n(n)
    return _canonical(nx.cycle_graph(n))


def complete(n: int) -> nx.Graph:
    """Return K_n: everyone talks to everyone, the all-reduce baseline (gap ~ 1)."""
    n = _check_n(n)
    return _canonical(nx.complete_graph(n))


def star(n: int) -> nx.Graph:
    """Return the star with hub 0 and n - 1 leaves: a central server in disguise."""
    n = _check_n(n)
    return _canonical(nx.star_graph(n - 1))


def random_graph(n: int, degree: int, seed: int | None = None) -> nx.Graph:
    """Return a connected random `degree`-regular graph on n nodes.

    Model: uniform random regular graph (Steger & Wormald, "Generating random
    regular graphs quickly", 1999, via `networkx.random_regular_graph`), redrawn
    until connected; for degree >= 3 it is connected with high probability and an
    expander. Degree 2 is drawn directly as a uniformly random Hamiltonian cycle,
    the only connected 2-regular graphs, because a random 2-regular graph is
    almost never connected for large n. Needs n * degree even.
    """
    n = _check_n(n)
    degree = _as_int("degree", degree, minimum=1)
    if degree >= n:
        raise ValueError(
            f"degree must be < n (got degree={degree}, n={n}): use complete(n) for degree n - 1"
        )
    if n * degree % 2:
        raise ValueError(
            f"a {degree}-regular graph on {n} nodes does not exist "
            f"(n * degree is odd): change n or degree by one"
        )
    if degree == 1 and n > 2:
        raise ValueError(
            f"a 1-regular graph on {n} nodes is a set of disjoint pairs "
            f"and cannot be connected: use degree >= 2"
        )
    rng = random.Random(seed)
    if degree == 2:
        order = list(range(n))
        rng.shuffle(order)
        graph = nx.empty_graph(n)
        graph.add_edges_from(zip(order, order[1:] + order[:1], strict=True))
        return _canonical(graph)
    for _ in range(_REGULAR_TRIES):
        graph = nx.random_regular_graph(degree, n, seed=rng)
        if nx.is_connected(graph):
            return _canonical(graph)
    raise ValueError(
        f"no connected {degree}-regular graph on {n} nodes found in "
        f"{_REGULAR_TRIES} draws: try another seed or a larger degree"
    )


def small_world(n: int, k: int, p: float, seed: int | None = None) -> nx.Graph:
    """Return a connected Watts-Strogatz small-world graph.

    Model: a ring lattice where each node joins its k/2 nearest neighbours on
    each side, each edge rewired with probability p (Watts & Strogatz,
    "Collective dynamics of 'small-world' networks", Nature 1998), redrawn until
    connected (`networkx.connected_watts_strogatz_graph`). k must be even,
    because networkx would silently use k - 1 for an odd k.
    """
    n = _check_n(n)
    k = _as_int("k", k, minimum=2)
    if k >= n:
        raise ValueError(f"k must be < n (got k={k}, n={n}): use complete(n) instead")
    if k % 2:
        raise ValueError(f"k must be even (k/2 neighbours on each side), got {k}")
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= p <= 1.0:
        raise ValueError(f"rewiring probability p must be in [0, 1], got {p!r}")
    try:
        graph = nx.connected_watts_strogatz_graph(n, k, p, tries=100, seed=seed)
    except nx.NetworkXError as exc:
        raise ValueError(
            f"no connected small-world graph with n={n}, k={k}, p={p} "
            f"in 100 tries: lower p or raise k"
        ) from exc
    return _canonical(graph)


def make_graph(
    name: str, n: int, degree: int = 4, rewire: float = 0.1, seed: int | None = None
) -> nx.Graph:
    """Build the topology called `name` (one of TOPOLOGIES) from command-line style options.

    `degree` is the regular degree for 'random' and k for 'small-world'; `rewire`
    is p for 'small-world'. Options a topology does not use are ignored.
    """
    if name == "ring":
        return ring(n)
    if name == "random":
        return random_graph(n, degree, seed=seed)
    if name == "small-world":
        return small_world(n, degree, rewire, seed=seed)
    if name == "complete":
        return complete(n)
    if name == "star":
        return star(n)
    raise ValueError(f"unknown topology {name!r}: use one of {', '.join(TOPOLOGIES)}")


def check_graph(graph: nx.Graph) -> None:
    """Raise ValueError unless `graph` is usable for gossip: nodes 0..n-1, n >= 2, connected.

    For graphs a user builds themselves; the generators above already guarantee it.
    """
    n = graph.number_of_nodes()
    if n < 2:
        raise ValueError(f"a gossip graph needs at least 2 nodes, got {n}")
    if set(graph.nodes) != set(range(n)):
        raise ValueError(
            "graph nodes must be the integers 0..n-1: "
            "relabel with networkx.convert_node_labels_to_integers"
        )
    if graph.is_directed():
        raise ValueError("gossip graphs are undirected: pass a networkx.Graph")
    if not nx.is_connected(graph):
        parts = nx.number_connected_components(graph)
        raise ValueError(
            f"graph is not connected ({parts} components): averaging cannot reach consensus"
        )


def _check_n(n: int) -> int:
    return _as_int("n", n, minimum=2)


def _as_int(name: str, value: int, minimum: int) -> int:
    """Accept Python and numpy integers (scripts pass both), reject bools and floats."""
    try:
        as_int = operator.index(value) if not isinstance(value, bool) else None
    except TypeError:
        as_int = None
    if as_int is None or as_int < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return as_int


def _canonical(graph: nx.Graph) -> nx.Graph:
    """Copy with nodes 0..n-1 in order and sorted edges, so iteration order is reproducible."""
    out = nx.Graph()
    out.add_nodes_from(range(graph.number_of_nodes()))
    out.add_edges_from(sorted((min(u, v), max(u, v)) for u, v in graph.edges))
    return out
