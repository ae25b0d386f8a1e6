"""Several processes on one run, over torch.distributed (gloo between CPU processes, NCCL between
GPUs): `torchrun --nproc-per-node N -m streamprune run ...`.

Data parallel over calibration samples, in nanoGPT's shape: one process per device, ranks from
torchrun's environment, rank 0 (the leader) writes the checkpoint and owns the run state. Each
process holds a contiguous share of the activation buffer (so the buffer's RAM is divided too), runs
each layer over its samples, and sends its statistics to the leader, which merges them in rank
order (deterministic), prunes, and broadcasts the pruned weights; every process then pushes its
share through the pruned layer. At a resume point the leader writes the whole buffer, its rows in
sample order (its own, then each peer's as it arrives), so a run may resume with any number of
processes.

Every process reads the checkpoint itself (the same directory, or a copy at the same path).
"""

from __future__ import annotations

import datetime
import os
from typing import Any, Iterable, Iterator

import torch
import torch.distributed as dist

from . import buffers
from .errors import UsageError
from .methods import Statistic

# a peer that crashed is noticed by torchrun, which stops the others; this bounds a wait otherwise
TIMEOUT = datetime.timedelta(minutes=60)


class Peers:
    """This process's place among the processes of one run; one process alone is a world of one,
    for which every exchange is a no-op."""

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank

    @property
    def leader(self) -> bool:
        return self.rank == 0

    @property
    def alone(self) -> bool:
        return self.world_size == 1

    @classmethod
    def from_environment(cls, device: torch.device) -> Peers:
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK, and the process group joined (gloo on the
        CPU, NCCL on GPUs); a world of one without them."""
        if not under_torchrun():
            return cls()
        peers = cls(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            # rows of the CPU buffer and counts go by gloo, tensors on GPUs by NCCL
            backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend, timeout=TIMEOUT)
        return peers

    def device(self, asked: torch.device) -> torch.device:
        """The device this process computes on: its own GPU (by local rank) when GPUs were asked for."""
        if self.alone or asked.type != "cuda":
            return asked
        if self.local_rank >= torch.cuda.device_count():
            raise UsageError(
                f"process {self.rank} (local rank {self.local_rank}) has no GPU of its own: this machine has "
                f"{torch.cuda.device_count()}. Start at most that many: torchrun --nproc-per-node "
                f"{torch.cuda.device_count()} -m streamprune run ..."
            )
        torch.cuda.set_device(self.local_rank)
        return torch.device("cuda", self.local_rank)

    def share(self, count: int, rank: int | None = None) -> slice:
        """The samples of `count` that process `rank` (default: this one) holds: contiguous, the
        first `count % world_size` processes one more than the rest."""
        rank = self.rank if rank is None else rank
        base, extra = divmod(count, self.world_size)
        start = rank * base + min(rank, extra)
        return slice(start, start + base + (rank < extra))

    # -- exchanges: every process calls each of them at the same point ---------------------------------

    def broadcast_object(self, value: Any) -> Any:
        """The leader's `value` (small, picklable), on every process."""
        if self.alone:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_object(self, value: Any) -> list[Any] | None:
        """Every process's `value` (small, picklable), in rank order, on the leader; None elsewhere."""
        if self.alone:
            return [value]
        gathered = [None] * self.world_size if self.leader else None
        dist.gather_object(value, gathered, dst=0)
        return gathered

    def broadcast(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite `tensors` (the same shapes and dtypes everywhere) with the leader's, bit for bit."""
        if self.alone:
            return
        for tensor in tensors:
            dist.broadcast(_bytes(tensor), src=0)

    def merge(self, statistics: dict[str, Statistic]) -> None:
        """Fold every peer's statistics (collected as `Statistic.shareable()`) into the leader's,
        site by site and peer by peer in rank order: the samples in their order, every run the
        same. The others' are left as they were."""
        if self.alone:
            return
        for site in sorted(statistics):
            mine = statistics[site]
            if not self.leader:
                for _, value in _fields(mine):
                    if isinstance(value, torch.Tensor):
                        dist.send(_shape(value), dst=0)
                        dist.send(_bytes(value.contiguous()), dst=0)
                    else:
                        dist.send(_count(value), dst=0)
                continue
            for peer in range(1, self.world_size):
                theirs = type(mine).shareable()(mine.in_features, mine.device)
                for name, value in _fields(theirs):
                    if isinstance(value, torch.Tensor):
                        shape = _shape(value)
                        dist.recv(shape, src=peer)
                        value = torch.empty(shape[1 : 1 + shape[0]].tolist(), dtype=value.dtype, device=value.device)
                        dist.recv(_bytes(value), src=peer)
                    else:
                        count = _count(0)
                        dist.recv(count, src=peer)
                        value = int(count)
                    setattr(theirs, name, value)
                mine.merge(theirs)
                del theirs

    def gather_rows(self, hidden: torch.Tensor, total: int) -> Iterator[torch.Tensor]:
        """The leader's: every row of the whole buffer (`total` samples) in sample order, its own
        share's (`hidden`) then each peer's as `send_rows` sends it."""
        yield from buffers.released_rows(hidden)
        received = torch.empty_like(hidden[0])
        for peer in range(1, self.world_size):
            rows = self.share(total, peer)
            for _ in range(rows.stop - rows.start):
                dist.recv(_bytes(received), src=peer)
                yield received

    def send_rows(self, hidden: torch.Tensor) -> None:
        """A peer's side of `gather_rows`: its share's rows, in order."""
        for row in buffers.released_rows(hidden):
            dist.send(_bytes(row.contiguous()), dst=0)

    def scatter_rows(self, rows: Iterable[torch.Tensor] | None, hidden: torch.Tensor, total: int) -> None:
        """Fill each process's `hidden` with its share of the whole buffer (`total` samples), whose
        rows in sample order only the leader has (`rows`; None elsewhere)."""
        if not self.leader:
            for row in range(hidden.shape[0]):
                dist.recv(_bytes(hidden[row]), src=0)
                buffers.release(hidden, slice(row, row + 1))
            return
        for index, row in enumerate(rows):
            owner = next(peer for peer in range(self.world_size) if index < self.share(total, peer).stop)
            if owner == 0:
                hidden[index].copy_(row)
                buffers.release(hidden, slice(index, index + 1))
            else:
                dist.send(_bytes(row.contiguous()), dst=owner)


def under_torchrun() -> bool:
    """Whether torchrun started this process as one of several (its WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def leave_process_group() -> None:
    """Done with the other processes (torch warns at exit about a group left open)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _fields(statistic: Statistic) -> list[tuple[str, Any]]:
    """A statistic's state to send: its tensors and counts, by attribute name (the same on every
    process, since the same class built them for the same site)."""
    return sorted(
        (name, value)
        for name, value in vars(statistic).items()
        if isinstance(value, torch.Tensor) or (isinstance(value, int) and not isinstance(value, bool))
    )


def _bytes(tensor: torch.Tensor) -> torch.Tensor:
    """`tensor`'s bytes, as a uint8 view: what a backend sends whatever the dtype (gloo has no bfloat16)."""
    return tensor.view(-1).view(torch.uint8)


def _shape(tensor: torch.Tensor) -> torch.Tensor:
    """A tensor's rank and shape, as a fixed-size header: what the receiver allocates."""
    header = torch.zeros(1 + MAX_DIMS, dtype=torch.int64)
    header[0] = tensor.dim()
    header[1 : 1 + tensor.dim()] = torch.tensor(tensor.shape, dtype=torch.int64)
    return header


MAX_DIMS = 7


def _count(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64)
