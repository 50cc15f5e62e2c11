"""Push-sum for all nodes at once: estimates stacked in one [n, P] tensor, mixing as sparse product.

The rule is :class:`gossip.pushsum.PushSum`'s, applied to every node in one
synchronous round. With mass ``X = w * Z``, a round is ``X' = A X`` and
``w' = A w`` where ``A`` is the round's column-stochastic push matrix
(``A[i, j] = 1/(f_j+1)`` for a delivered message ``j -> i`` and for ``j``'s
own kept share, where the fanout ``f_j`` is ``j``'s degree, or the number of
out-links it pushes to this round under ``push_sample``), built from a
:class:`~topologies.network.RoundPlan`: lost messages' columns lose their
entry (mass lost), refunded ones go back onto the sender's diagonal, offline
nodes keep an identity row and column, unchosen links carry nothing, and
delayed messages go into a queue of future arrivals.

Rather than forming ``X`` and dividing back, the weights are folded into the
matrix: ``Z' = diag(1/w') A diag(w) Z``, a row-stochastic matrix, so a round
costs one sparse-times-dense product into a preallocated buffer and no extra
pass over the [n, P] state. Arrivals of delayed mass add ``mass / w'`` on the
receiving rows only.

Measured on this 2-core machine (10,000 nodes x 4,810 parameters, small-world
k=4): the product takes 30 ms in float32 and 68 ms in float64 with
``torch.addmm(..., out=)`` (torch CSR), against 90/190 ms for scipy and
200/555 ms for ``torch.sparse.mm``, whose fresh 200-400 MB output costs page
faults every round. Float32 is the default; float64 matches the node-by-node
gossip core to ~1e-12 and is what the equivalence test uses.

When what a node sends differs from its estimate (a Byzantine node's attack
vector, a compressed estimate, a CHOCO public copy), :meth:`StackedPushSum.gossip_sent`
mixes ``Z' = diag(a) Z + M S``: the node keeps its own share of its exact
estimate, receivers fold in the sent rows ``S``. Robust rules
(:meth:`StackedPushSum.gossip_robust`) replace the weighted mean with
:mod:`topologies.robust`'s batched rule over each node's received rows; the
weights add up exactly as in the mean. The plain :meth:`StackedPushSum.gossip`
is untouched by either, so runs without those features cost what they did.

Over several ranks (:mod:`topologies.ranks`) the state holds the rows of one
block of nodes, inside a buffer that also has room for the rows its
in-neighbours on other ranks send (:class:`~topologies.ranks.Halo`); the
weights, the network plan and every [n, n] matrix stay whole on each rank
(a few numbers per node or arc), and only their block's rows meet the
[rows, P] tensors.
"""

from __future__ import annotations

import warnings

import numpy as np
import scipy.sparse as sp
import torch

from topologies.network import DELIVERED, LOST, REFUNDED, NetworkModel, RoundPlan
from topologies.ranks import Halo, Ranks
from topologies.robust import BatchedRule, received_now

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
warnings.filterwarnings("ignore", message="Sparse invariant checks")


def _csr(
    indptr: np.ndarray,
    indices: np.ndarray,
    data: np.ndarray,
    size: tuple[int, int],
    dtype: torch.dtype,
) -> torch.Tensor:
    """A torch CSR matrix from scipy's arrays (built by scipy, so already valid)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse_csr_tensor(
            torch.from_numpy(indptr.astype(np.int64)),
            torch.from_numpy(indices.astype(np.int64)),
            torch.from_numpy(data).to(dtype),
            size=size,
            check_invariants=False,
        )


class StackedPushSum:
    """Every node's push-sum estimate ``z`` (rows of ``estimates``) and weight ``w``."""

    def __init__(
        self,
        estimates: torch.Tensor,
        weights: np.ndarray,
        network: NetworkModel,
        *,
        mix_columns: int | None = None,
        halo: Halo | None = None,
    ) -> None:
        """``estimates``: the rows of this rank's block (all n rows on one rank);
        ``weights``: every node's (the same on every rank).

        ``mix_columns``: mix the plain push-sum that many columns at a time, through a
        buffer of n x ``mix_columns`` instead of a second [n, P] tensor (memory-bounded
        runs; columns never interact, so the result is the same)."""
        self.halo = halo if halo is not None else Halo(Ranks(), network.n, network.src, network.dst)
        rows = self.halo.hi - self.halo.lo
        if estimates.dim() != 2 or estimates.shape[0] != rows:
            raise ValueError(f"estimates must be [n={rows}, P], got {tuple(estimates.shape)}")
        weights = np.asarray(weights, dtype=np.float64)
        if weights.shape != (network.n,) or not (weights > 0).all():
            raise ValueError("push-sum weights must be positive, one per node (sample counts)")
        self.network = network
        size = estimates.shape[1]
        # The block's rows and, around them in node order, the rows received from other
        # ranks (none on one rank): never an alias of the caller's tensor.
        self._ext = torch.empty(self.halo.size, size, dtype=estimates.dtype)
        self._ext[self.halo.own] = estimates
        self.mix_columns = None if mix_columns is None or mix_columns >= size else mix_columns
        self._spare = (
            torch.empty_like(self._ext)
            if self.mix_columns is None
            else torch.empty(self.halo.size * self.mix_columns, dtype=estimates.dtype)
        )
        self._sent: torch.Tensor | None = None  # what others send, with the halo (made on use)
        self.weights = weights.copy()
        # due round -> (mass [rows, P], weight [n]) of delayed shares still in flight
        self._in_flight: dict[int, tuple[torch.Tensor, np.ndarray]] = {}

    @staticmethod
    def _share(plan: RoundPlan) -> np.ndarray:
        """Each node's share of its mass per message and kept: 1 / (fanout + 1)."""
        return 1.0 / (plan.fanout + 1.0)

    @property
    def estimates(self) -> torch.Tensor:
        """This rank's rows: a view into the buffer that the next round replaces."""
        return self._ext[self.halo.own]

    @property
    def dtype(self) -> torch.dtype:
        return self._ext.dtype

    def _local(self, matrix: sp.csr_array) -> torch.Tensor:
        """This block's rows of an [n, n] matrix, over the buffer's rows, as torch CSR."""
        indptr, indices, data = self.halo.local_columns(matrix.indptr, matrix.indices, matrix.data)
        rows = self.halo.hi - self.halo.lo
        return _csr(indptr, indices, data, (rows, self.halo.size), self.dtype)

    def _with_halo(self, sent: torch.Tensor) -> torch.Tensor:
        """``sent`` (this block's rows) with the rows other ranks' nodes send to it."""
        if not self.halo.ranks.distributed:
            return sent.to(self.dtype)
        if self._sent is None or self._sent.shape != self._ext.shape:
            self._sent = torch.empty_like(self._ext)
        self._sent[self.halo.own] = sent
        self.halo.exchange(self._sent)
        return self._sent

    @property
    def mass_in_flight(self) -> float:
        return float(sum(w.sum() for _, w in self._in_flight.values()))

    def _split(self, plan: RoundPlan) -> tuple[np.ndarray, np.ndarray]:
        """Push-sum's split for this round: each message's share of its sender's weight
        (per link), and the fraction each node keeps (its own share plus refunds of the
        sends that failed; offline nodes keep everything)."""
        net = self.network
        share = self._share(plan)
        coef = share[net.src]
        refunds = np.bincount(net.src[plan.fate == REFUNDED], minlength=net.n)
        keep = np.where(plan.online, (1.0 + refunds) * share, 1.0)
        return coef, keep

    def gossip(self, plan: RoundPlan) -> None:
        """One push-sum round under ``plan``: split, send, refund, lose, delay, absorb."""
        net = self.network
        n = net.n
        w = self.weights
        src, dst, fate = net.src, net.dst, plan.fate
        coef, keep = self._split(plan)

        delivered = fate == DELIVERED
        now = delivered & (net.delay == 0) if net.conditions.delay else delivered
        rows = np.concatenate([dst[now], np.arange(n)])
        cols = np.concatenate([src[now], np.arange(n)])
        vals = np.concatenate([coef[now], keep])
        push = sp.csr_array((vals, (rows, cols)), shape=(n, n))
        push.sum_duplicates()
        new_w = push @ w

        arrived = self._arrivals(plan)
        if arrived is not None:
            new_w = new_w + arrived[1]

        # Row-stochastic form: Z' = diag(1/w') A diag(w) Z (+ arrivals / w').
        row_of = np.repeat(np.arange(n), np.diff(push.indptr))
        push.data = push.data * w[push.indices] / new_w[row_of]
        mix = self._local(push)
        self.halo.exchange(self._ext)
        if net.conditions.delay:  # reads the estimates before they are mixed
            self._send_delayed(plan, delivered, coef, w, self._ext)
        if self.mix_columns is None:
            out = self._spare
            torch.addmm(out[self.halo.own], mix, self._ext, beta=0.0, out=out[self.halo.own])
            self._spare, self._ext = self._ext, out
        else:
            self._mix_in_blocks(mix)
        if arrived is not None:
            self._absorb_arrivals(self.estimates, arrived, new_w)
        self.weights = new_w

    def _mix_in_blocks(self, mix: torch.Tensor) -> None:
        """``estimates = mix @ estimates``, ``mix_columns`` columns at a time, in place."""
        rows, size = self.estimates.shape
        assert self.mix_columns is not None
        for start in range(0, size, self.mix_columns):
            block = self._ext[:, start : start + self.mix_columns]
            out = self._spare[: rows * block.shape[1]].view(rows, block.shape[1])
            torch.addmm(out, mix, block.contiguous(), beta=0.0, out=out)
            self.estimates[:, start : start + self.mix_columns].copy_(out)

    def gossip_sent(
        self, plan: RoundPlan, sent: torch.Tensor, *, compensation: float = 0.0, step: float = 1.0
    ) -> None:
        """One push-sum round in which receivers fold in the rows of ``sent``, not the estimates.

        ``sent``: this block's rows. ``compensation=0``: each node keeps its own
        share of its exact estimate (as the gossip core does; a compressed or
        forged message changes only what receivers get). ``compensation=c > 0``,
        for public copies (see :mod:`topologies.compression`): the sender also
        keeps the fraction ``c`` of the mass its messages did not carry,
        ``c * step * w_i / (d_i + 1) * (z_i - sent_i)`` per message that left;
        ``c = 1`` conserves mass exactly (CHOCO-gossip). ``step`` is CHOCO's
        ``gamma``, a lazier push-sum (the weight share is
        ``step * w_i / (d_i + 1)`` too).
        """
        net = self.network
        n = net.n
        w = self.weights
        src, dst, fate = net.src, net.dst, plan.fate
        if compensation and net.conditions.delay:
            raise ValueError("public copies need delivery in the same round (delay 0)")
        coef = step * self._share(plan)[src]
        delivered = fate == DELIVERED
        left = delivered | (fate == LOST)
        given = np.bincount(src[left], weights=coef[left], minlength=n)
        keep = 1.0 - given
        now = delivered & (net.delay == 0) if net.conditions.delay else delivered
        received = np.bincount(dst[now], weights=coef[now] * w[src[now]], minlength=n)
        new_w = keep * w + received
        arrived = self._arrivals(plan)
        if arrived is not None:
            new_w = new_w + arrived[1]

        rows = dst[now]
        cols = src[now]
        vals = coef[now] * w[cols] / new_w[rows]
        own = (keep + compensation * given) * w / new_w
        if compensation:
            rows = np.concatenate([rows, np.arange(n)])
            cols = np.concatenate([cols, np.arange(n)])
            vals = np.concatenate([vals, -compensation * given * w / new_w])
        mix = sp.csr_array((vals, (rows, cols)), shape=(n, n))
        mix.sum_duplicates()
        everyone = self._with_halo(sent)
        mine = slice(self.halo.lo, self.halo.hi)
        out = self._output()
        torch.addmm(out, self._local(mix), everyone, beta=0.0, out=out)
        out.addcmul_(self.estimates, torch.from_numpy(own[mine]).to(self.dtype).unsqueeze(1))

        if net.conditions.delay:
            self._send_delayed(plan, delivered, coef, w, everyone)
        if arrived is not None:
            self._absorb_arrivals(out, arrived, new_w)
        self._replace(out)
        self.weights = new_w

    def gossip_robust(self, plan: RoundPlan, sent: torch.Tensor, rule: BatchedRule) -> None:
        """One round with a robust rule: each node's estimate becomes ``rule`` of its set.

        The set is the node's own estimate and the rows of ``sent`` delivered
        to it this round; the weight adds up as in push-sum (own kept share
        plus refunds plus the shares received), as in :mod:`gossip.aggregation`.
        """
        net = self.network
        if net.conditions.delay:
            raise ValueError("robust aggregation in the simulator needs delay 0")
        n = net.n
        src, dst, fate = net.src, net.dst, plan.fate
        coef, keep = self._split(plan)
        delivered = fate == DELIVERED
        new_w = keep * self.weights + np.bincount(
            dst[delivered], weights=coef[delivered] * self.weights[src[delivered]], minlength=n
        )
        got = received_now(net, plan)  # every node's, padded to the widest: same on any rank
        mine = slice(self.halo.lo, self.halo.hi)
        senders = torch.from_numpy(self.halo.position[got.senders[mine].numpy()].clip(min=0))
        others = self._with_halo(sent)[senders]
        self.estimates.copy_(rule(self.estimates, others, got.valid[mine]))
        self.weights = new_w

    def _output(self) -> torch.Tensor:
        """A [rows, P] output: the spare buffer's block, or (column-blocked runs) a fresh one."""
        if self.mix_columns is None:
            return self._spare[self.halo.own]
        return torch.empty_like(self.estimates)

    def _replace(self, out: torch.Tensor) -> None:
        if self.mix_columns is None:
            self._spare, self._ext = self._ext, self._spare
        else:
            self.estimates.copy_(out)

    def _mine(self, ids: np.ndarray) -> np.ndarray:
        """The rows, in this block, of those of ``ids`` (node ids) that it owns."""
        return ids[(ids >= self.halo.lo) & (ids < self.halo.hi)] - self.halo.lo

    def _absorb_arrivals(
        self, out: torch.Tensor, arrived: tuple[torch.Tensor, np.ndarray], new_w: np.ndarray
    ) -> None:
        mass, weight = arrived
        hit = self._mine(np.flatnonzero(weight > 0))
        if len(hit):
            idx = torch.from_numpy(hit)
            scale = torch.from_numpy(1.0 / new_w[hit + self.halo.lo]).to(self.dtype).unsqueeze(1)
            out.index_add_(0, idx, mass.index_select(0, idx) * scale)

    def _send_delayed(
        self,
        plan: RoundPlan,
        delivered: np.ndarray,
        coef: np.ndarray,
        w: np.ndarray,
        source: torch.Tensor,
    ) -> None:
        """Queue the delayed shares; ``source``: what is sent, with the halo's rows."""
        net = self.network
        late = delivered & (net.delay > 0)
        for lag in np.unique(net.delay[late]):
            arcs = late & (net.delay == lag)
            shares = sp.csr_array(
                (coef[arcs] * w[net.src[arcs]], (net.dst[arcs], net.src[arcs])),
                shape=(net.n, net.n),
            )
            shares.sum_duplicates()
            mass, weight = self._bucket(plan.round + int(lag))
            weight += shares @ np.ones(net.n)
            torch.addmm(mass, self._local(shares), source, out=mass)

    def _bucket(self, due: int) -> tuple[torch.Tensor, np.ndarray]:
        if due not in self._in_flight:
            rows, size = self.estimates.shape
            mass = torch.zeros(rows, size, dtype=self.dtype)
            self._in_flight[due] = (mass, np.zeros(self.network.n))
        return self._in_flight[due]

    def _arrivals(self, plan: RoundPlan) -> tuple[torch.Tensor, np.ndarray] | None:
        """Shares due now; those for offline receivers wait one more round."""
        arrived = self._in_flight.pop(plan.round, None)
        if arrived is None:
            return None
        mass, weight = arrived
        waiting = np.flatnonzero(~plan.online & (weight > 0))
        if len(waiting):
            later_mass, later_weight = self._bucket(plan.round + 1)
            idx = torch.from_numpy(self._mine(waiting))
            later_mass.index_add_(0, idx, mass.index_select(0, idx))
            later_weight[waiting] += weight[waiting]
            weight = weight.copy()
            weight[waiting] = 0.0
        return mass, weight


def consensus_distance(
    estimates: torch.Tensor,
    scratch: torch.Tensor | None = None,
    chunk: int = 256,
    ranks: Ranks | None = None,
    ids: np.ndarray | None = None,
) -> float:
    """Mean squared Euclidean distance of the rows from their plain (unweighted) mean.

    Centered, not ``mean ||z||^2 - ||mean||^2``: near consensus that difference
    cancels to noise in float32. The rows go in blocks through a reusable
    scratch buffer: subtracting the mean from the whole [n, P] tensor at once
    allocates and page-faults hundreds of MB per round, and blocks much
    smaller than ~100 rows pay more in thread start-up than in arithmetic.

    Blocks are cut at multiples of ``chunk`` in node id (``ids``: the rows'
    node ids, default 0..), and the blocks' partial means and sums are added in
    float64, over ``ranks`` too when ``estimates`` is one rank's rows. The
    mean's float32 rounding then moves the distance only to second order, and
    the result agrees across rank counts to ~1e-12.
    """
    rows_here, size = estimates.shape
    ids = np.arange(rows_here) if ids is None else np.asarray(ids)
    cuts = [0, *(np.flatnonzero(np.diff(ids // chunk)) + 1).tolist(), rows_here]
    blocks = [(a, b) for a, b in zip(cuts[:-1], cuts[1:], strict=True) if b > a]
    distributed = ranks is not None and ranks.distributed
    n = int(ranks.sum(np.array([rows_here]))[0]) if distributed else rows_here
    scale = torch.full((min(chunk, max(rows_here, 1)),), 1.0 / n, dtype=estimates.dtype)
    mean64 = torch.zeros(size, dtype=torch.float64)
    for a, b in blocks:
        mean64 += torch.mv(estimates[a:b].t(), scale[: b - a]).double()
    if distributed:
        mean64 = torch.from_numpy(ranks.sum(mean64.numpy()))
    mean = mean64.to(estimates.dtype)
    rows = min(chunk, max(rows_here, 1))
    if scratch is None or scratch.shape[0] < rows or scratch.dtype != estimates.dtype:
        scratch = torch.empty(rows, size, dtype=estimates.dtype)
    total = 0.0
    for a, b in blocks:
        buf = scratch[: b - a]
        torch.sub(estimates[a:b], mean, out=buf)
        # Squares summed in float64: a float32 dot's rounding (~1e-7 of the result)
        # would depend on which rows share a block, so on the number of ranks.
        total += float(buf.square_().sum(dtype=torch.float64))
    if distributed:
        total = float(ranks.sum(np.array([total]))[0])
    return total / n
