"""Gossip topologies: graph generators, mixing matrices and their spectral gap.

Never imports libp2p or trio, so the simulator runs without a network stack.
"""

from topologies.graphs import (
    TOPOLOGIES,
    check_graph,
    complete,
    make_graph,
    random_graph,
    ring,
    small_world,
    star,
)
from topologies.mixing import (
    metropolis_hastings,
    push_sum_matrix,
    rounds_to_consensus,
    spectral_gap,
)

__all__ = [
    "TOPOLOGIES",
    "check_graph",
    "complete",
    "make_graph",
    "metropolis_hastings",
    "push_sum_matrix",
    "random_graph",
    "ring",
    "rounds_to_consensus",
    "small_world",
    "spectral_gap",
    "star",
]
