"""The simulator over several processes: each rank owns a contiguous block of nodes.

Launched by ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``
and ``MASTER_PORT``), the simulator splits its n nodes into ``world`` blocks
``[n r / world, n (r + 1) / world)``. What grows with n x P (the models,
the mixing buffers, compression memory and public copies, delayed mass, the
shards each rank trains on, DP-SGD's per-node models) lives on the rank
that owns the node. What grows with n or the number of arcs only (the
graph, each round's network plan, the push-sum weights, the Byzantine mask)
is computed identically on every rank from the same seeds: a few bytes per
node, and it is what makes a run give the same numbers on any number of ranks.

Each round a rank sends the rows its nodes' out-arcs need, and only those,
to the rank owning each target (:class:`Halo`): point-to-point sends of a
fixed set of rows, worked out once from the graph, so both sides know the
counts without asking. A rank keeps its block and the rows it receives in
one buffer ordered by node id (:attr:`Halo.ids`): the block's rows stay in the
same order within every row of the mixing matrix, so the sparse product
sums in the same order as on one rank and the result is bitwise the same.

Only gloo is used: the simulator's tensors live in CPU memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from topologies.settings_error import SettingError

DEFAULT_TIMEOUT_S = 300.0


@dataclass(frozen=True)
class Ranks:
    """This process's rank and the world size; ``world == 1`` is the plain simulator."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def block(self, n: int, rank: int | None = None) -> tuple[int, int]:
        """The node ids ``[lo, hi)`` that ``rank`` (default this one) owns."""
        r = self.rank if rank is None else rank
        return n * r // self.world, n * (r + 1) // self.world

    def owners(self, ids: np.ndarray, n: int) -> np.ndarray:
        starts = np.array([self.block(n, r)[0] for r in range(self.world)])
        return np.searchsorted(starts, ids, side="right") - 1

    def sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks, in float64."""
        if not self.distributed:
            return values
        tensor = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64))
        dist.all_reduce(tensor)
        return tensor.numpy()

    def max(self, value: float) -> float:
        if not self.distributed:
            return value
        tensor = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor)

    def gather_rows(self, local: torch.Tensor, n: int) -> torch.Tensor:
        """Every rank's block of a per-node tensor [b, ...], stacked in node order [n, ...]."""
        if not self.distributed:
            return local
        width = max(hi - lo for lo, hi in (self.block(n, r) for r in range(self.world)))
        padded = torch.zeros(width, *local.shape[1:], dtype=local.dtype)
        padded[: len(local)] = local
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        sizes = [hi - lo for lo, hi in (self.block(n, r) for r in range(self.world))]
        return torch.cat([part[:size] for part, size in zip(parts, sizes, strict=True)])

    def gather_objects(self, value: object) -> list[object]:
        if not self.distributed:
            return [value]
        out: list[object] = [None] * self.world
        dist.all_gather_object(out, value)
        return out


def launched_ranks() -> int:
    """The world size torchrun asked for (1 when run as a plain script)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_ranks(timeout_s: float = DEFAULT_TIMEOUT_S) -> Ranks:
    """Join the other ranks (gloo), waiting at most ``timeout_s`` for them, then and at
    every exchange: a rank that never comes or dies fails the others instead of hanging."""
    world = launched_ranks()
    if world == 1:
        return Ranks()
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=timedelta(seconds=timeout_s))
    return Ranks(dist.get_rank(), dist.get_world_size())


def close_ranks(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def check_shardable(attack: str, byzantine: int, world: int) -> None:
    """Refuse, naming the flag, what the simulator cannot yet run over several ranks."""
    if world > 1 and byzantine and attack == "alie":
        # ALIE reads its honest neighbours' estimates, not what they send: that would be a
        # second exchange per round, not built.
        raise SettingError("attack", f"alie is not sharded: run it on 1 rank, not {world}")


class Halo:
    """The rows one rank receives each round (in-neighbours on other ranks) and sends."""

    def __init__(self, ranks: Ranks, n: int, src: np.ndarray, dst: np.ndarray) -> None:
        self.ranks = ranks
        lo, hi = ranks.block(n)
        self.lo, self.hi, self.n = lo, hi, n
        inside = (src >= lo) & (src < hi)
        mine = (dst >= lo) & (dst < hi)
        remote = np.unique(src[mine & ~inside])
        # Every row this rank reads, in node order: its block sits in one contiguous run.
        self.ids = np.union1d(np.arange(lo, hi), remote)
        start = int(np.searchsorted(self.ids, lo))
        self.own = slice(start, start + hi - lo)
        self.position = np.full(n, -1, dtype=np.int64)
        self.position[self.ids] = np.arange(len(self.ids))
        owners = ranks.owners(self.ids, n)
        self.receive: dict[int, slice] = {}
        self.send: dict[int, torch.Tensor] = {}
        for peer in range(ranks.world):
            if peer == ranks.rank:
                continue
            at = np.flatnonzero(owners == peer)
            if len(at):  # a peer's block is contiguous in node order, so is its run here
                self.receive[peer] = slice(int(at[0]), int(at[-1]) + 1)
            plo, phi = ranks.block(n, peer)
            needed = np.unique(src[inside & (dst >= plo) & (dst < phi)])
            if len(needed):
                self.send[peer] = torch.from_numpy(needed - lo)

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def rows_received(self) -> int:
        return self.size - (self.hi - self.lo)

    def exchange(self, extended: torch.Tensor) -> None:
        """Fill the received rows of ``extended`` [size, P] from the owners' blocks."""
        if not self.ranks.distributed:
            return
        own = extended[self.own]
        ops, keep = [], []
        for peer, rows in self.send.items():
            buffer = own.index_select(0, rows)
            keep.append(buffer)
            ops.append(dist.P2POp(dist.isend, buffer, peer))
        for peer, rows in self.receive.items():
            ops.append(dist.P2POp(dist.irecv, extended[rows], peer))
        if ops:
            for request in dist.batch_isend_irecv(ops):
                request.wait()

    def local_columns(
        self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This block's rows of an [n, n] CSR matrix, columns renumbered into :attr:`ids`.

        The renumbering is monotonic, so each row keeps its entries' order."""
        begin, end = int(indptr[self.lo]), int(indptr[self.hi])
        local_ptr = indptr[self.lo : self.hi + 1] - begin
        columns = self.position[indices[begin:end]]
        if (columns < 0).any():
            raise RuntimeError("a mixing entry reads a row this rank never receives")
        return local_ptr, columns, data[begin:end]
