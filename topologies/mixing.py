"""Mixing matrices of gossip averaging on a graph, and how fast they mix.

One synchronous gossip round is x <- W x. With a symmetric doubly stochastic W
(Metropolis-Hastings weights) every node converges to the plain average; with
the column-stochastic push-sum matrix P, dividing the pushed values by the
pushed weights gives the weighted average (Kempe, Dobra & Gehrke, "Gossip-based
computation of aggregate information", FOCS 2003). The spectral gap of W says
how many rounds that takes (Boyd, Ghosh, Prabhakar & Shah, "Randomized gossip
algorithms", IEEE Trans. Inf. Theory 2006).
"""

from __future__ import annotations

import math

import networkx as nx
import numpy as np
import scipy.sparse as sp
from scipy.sparse.linalg import LinearOperator, eigsh

DENSE_EIGEN_LIMIT = 2000
_STOCHASTIC_TOL = 1e-9


def metropolis_hastings(graph: nx.Graph) -> sp.csr_matrix:
    """Return the Metropolis-Hastings mixing matrix W of `graph` (nodes 0..n-1).

    W_ij = 1 / (1 + max(d_i, d_j)) on each edge and W_ii = 1 - sum_j W_ij. It is
    symmetric and doubly stochastic using only what two neighbours know about
    each other (their degrees), so no node needs the whole graph (Xiao & Boyd,
    "Fast linear iterations for distributed averaging", 2004). The diagonal is
    positive, so W has no eigenvalue -1 and mixes even on bipartite graphs.
    """
    n, src, dst, degree = _edges(graph)
    weights = 1.0 / (1.0 + np.maximum(degree[src], degree[dst]))
    off = sp.coo_matrix(
        (np.r_[weights, weights], (np.r_[src, dst], np.r_[dst, src])), shape=(n, n)
    ).tocsr()
    diagonal = 1.0 - np.asarray(off.sum(axis=1)).ravel()
    return (off + sp.diags(diagonal)).tocsr()


def push_sum_matrix(graph: nx.Graph) -> sp.csr_matrix:
    """Return the column-stochastic push-sum matrix P of `graph` (nodes 0..n-1).

    Node j keeps 1/(d_j + 1) of its (value, weight) mass and sends 1/(d_j + 1) to
    each neighbour: P[i, j] = 1/(d_j + 1) for i in N(j) or i == j. Columns sum to
    1, so total mass is conserved; rows do not, which is why push-sum tracks a
    weight alongside the value. This is what the vectorized simulator multiplies by.
    """
    n, src, dst, degree = _edges(graph)
    share = 1.0 / (degree + 1.0)
    rows = np.r_[dst, src, np.arange(n)]
    cols = np.r_[src, dst, np.arange(n)]
    return sp.coo_matrix((share[cols], (rows, cols)), shape=(n, n)).tocsr()


def spectral_gap(matrix: sp.spmatrix | np.ndarray) -> float:
    """Return 1 - |lambda_2|, where |lambda_2| is the second largest |eigenvalue| of W.

    W must be symmetric and doubly stochastic (e.g. `metropolis_hastings`); the
    push-sum matrix is not symmetric and is rejected. A gap of 0 means the
    graph is disconnected and consensus never happens. Up to DENSE_EIGEN_LIMIT
    nodes the full spectrum is computed densely; above, Lanczos (`eigsh`) finds
    the largest |eigenvalue| of W - 11^T/n, which removes the known eigenvalue 1
    with eigenvector 1 and leaves |lambda_2| on top.
    """
    w = sp.csr_matrix(matrix, dtype=np.float64)
    n = w.shape[0]
    if w.shape != (n, n) or n < 2:
        raise ValueError(f"spectral_gap needs a square matrix of size >= 2, got {w.shape}")
    if abs(w - w.T).max() > _STOCHASTIC_TOL:
        raise ValueError(
            "spectral_gap needs a symmetric matrix: use metropolis_hastings(graph), "
            "not the push-sum matrix"
        )
    if np.abs(np.asarray(w.sum(axis=1)).ravel() - 1.0).max() > _STOCHASTIC_TOL:
        raise ValueError("spectral_gap needs a doubly stochastic matrix (rows summing to 1)")
    if n <= DENSE_EIGEN_LIMIT:
        magnitudes = np.sort(np.abs(np.linalg.eigvalsh(w.toarray())))
        second = magnitudes[-2]
    else:

        def deflated(x: np.ndarray) -> np.ndarray:
            return w @ x - x.mean(axis=0)

        operator = LinearOperator((n, n), matvec=deflated, matmat=deflated, dtype=np.float64)
        top = eigsh(
            operator,
            k=1,
            which="LM",
            return_eigenvectors=False,
            tol=1e-10,
            maxiter=50 * n,
            ncv=min(n, 64),
        )
        second = abs(top[0])
    return float(min(1.0, max(0.0, 1.0 - second)))


def rounds_to_consensus(gap: float, epsilon: float) -> int:
    """Return the predicted rounds t for x <- W x to shrink disagreement by `epsilon`.

    Bound: ||W^t x - xbar|| <= |lambda_2|^t ||x - xbar|| for symmetric doubly
    stochastic W, and |lambda_2|^t = (1 - gap)^t <= exp(-gap t), so
    t = ceil(log(1/epsilon) / gap) rounds suffice (Boyd et al. 2006). It is an
    upper bound from the worst starting vector, and it scales with 1/gap, which
    is why a ring of n nodes (gap ~ 1/n^2) is so much slower than an expander.
    """
    if not 0.0 < gap <= 1.0:
        raise ValueError(
            f"gap must be in (0, 1], got {gap}: a gap of 0 means the graph "
            f"is disconnected and never reaches consensus"
        )
    if not 0.0 < epsilon < 1.0:
        raise ValueError(f"epsilon must be in (0, 1), got {epsilon}")
    return max(1, math.ceil(math.log(1.0 / epsilon) / gap))


def _edges(graph: nx.Graph) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Return (n, src, dst, degree) of an undirected graph on 0..n-1, self-loops dropped."""
    n = graph.number_of_nodes()
    if graph.is_directed():
        raise ValueError("mixing matrices need an undirected graph: pass a networkx.Graph")
    if set(graph.nodes) != set(range(n)):
        raise ValueError(
            "graph nodes must be the integers 0..n-1: "
            "relabel with networkx.convert_node_labels_to_integers"
        )
    pairs = np.array([(u, v) for u, v in graph.edges if u != v], dtype=np.int64).reshape(-1, 2)
    degree = np.bincount(pairs.ravel(), minlength=n).astype(np.float64)
    return n, pairs[:, 0], pairs[:, 1], degree
