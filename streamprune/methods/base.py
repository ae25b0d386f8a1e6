"""What a pruning method is to the layer loop: a statistic collected per input site during the
layer's dense forward, then, per Linear, a weight plus its site's statistic plus a target in and a
mask (or new weights) out. The loop never asks which method it runs; it asks these questions."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar

import torch

from .masks import SORT_SLICE_ELEMENTS, nm_prune_mask, row_prune_mask


@dataclass(frozen=True)
class Target:
    """How much of one Linear goes: `sparsity`, the fraction zeroed per comparison group (a row, or
    the whole matrix), or `keep_block` = (keep_n, block_m): keep N of every M consecutive inputs."""

    sparsity: float | None = None
    keep_block: tuple[int, int] | None = None


@dataclass
class Pruned:
    """One Linear's result. `mask` is True where the weight is zeroed. `weight` is None when the
    survivors keep their values (the loop then zeroes the stored tensor through the mask, so they
    stay bit-identical), or the new weights of a method that updates the survivors."""

    mask: torch.Tensor  # [out, in] bool
    weight: torch.Tensor | None = None  # [out, in], zero wherever mask is True


class Statistic(ABC):
    """What a method learns about one input site (families.Projections) from the calibration tokens.

    `add_batch` sees every micro-batch of the dense layer's forward; `merge` folds in the same
    site's statistic collected elsewhere (another process or device, other samples), so that
    statistics can be combined in a fixed order. `samples` counts what was added: 0 where no
    calibration token reached the site (an expert the router never chose)."""

    def __init__(self, in_features: int, device: torch.device):
        self.in_features, self.device = in_features, device
        self.samples = 0

    @abstractmethod
    def add_batch(self, x: torch.Tensor) -> None:  # x [batch, seqlen, in_features]
        ...

    @abstractmethod
    def merge(self, other: Statistic) -> None: ...

    @classmethod
    def shareable(cls) -> type[Statistic]:
        """The class another process collects this statistic with, to send it here for `merge`:
        this one, or a subclass that keeps what makes the merge exact (InputSqNorm's samples)."""
        return cls

    @staticmethod
    @abstractmethod
    def held_bytes(in_features: int) -> int:
        """Bytes held per site on the compute device while the layer is calibrated and pruned."""

    @staticmethod
    @abstractmethod
    def scratch_bytes(seqlen: int, in_features: int) -> int:
        """Bytes of temporaries while one micro-batch is added (beyond the forward's own)."""

    @staticmethod
    def moved_bytes(in_features: int) -> int:
        """Bytes `add_batch` makes where x is and moves to the statistic's device, when the two differ
        (a MoE expert's statistic kept in RAM while the expert computes on the GPU)."""
        return in_features * 4

    @staticmethod
    def flops_per_token(in_features: int) -> int:
        """Floating-point operations `add_batch` spends per token (the plan's time estimate)."""
        return 3 * in_features  # a square and a sum per input feature, about


class Method(ABC):
    """A pruning method. Subclasses set `name`, `summary` (one line of --help) and `statistic`
    (None: the weights alone decide, no calibration data and no forward), and implement `prune`.
    `options` names the keyword arguments of its constructor that run and plan take as flags."""

    name: ClassVar[str]
    summary: ClassVar[str]
    statistic: ClassVar[type[Statistic] | None] = None
    options: ClassVar[tuple[str, ...]] = ()

    @property
    def needs_calibration(self) -> bool:
        return self.statistic is not None

    @abstractmethod
    def prune(self, weight: torch.Tensor, statistic: Statistic | None, target: Target) -> Pruned:
        """weight [out, in] on the compute device (the layer's own, in the compute dtype)."""

    def check_target(self, target: Target) -> None:
        """Refuse (UsageError) a target this method's settings cannot meet, before anything runs."""

    def settings(self) -> dict:
        """The method's own settings that shape the output, for the run identity a resume checks."""
        return {}

    def prune_scratch_bytes(self, rows: int, cols: int, target: Target, on_gpu: bool = False) -> int:
        """Peak temporaries of `prune` for one [rows, cols] Linear, on a GPU or a CPU. This default is a
        score matrix masked per row or N:M group: float32 scores, a sort slice (values + int64 indices),
        the mask."""
        return rows * cols * 4 + min(rows * cols, SORT_SLICE_ELEMENTS) * (4 + 8) + rows * cols

    def prune_steps(self, rows: int, cols: int) -> int:
        """Small sequential steps of `prune` for one Linear (a column at a time), each costing the
        Python and kernel-launch overhead the plan probes; 0 for a method that works on whole matrices."""
        return 0

    def prune_flops(self, rows: int, cols: int) -> int:
        """Floating-point operations of `prune` for one [rows, cols] Linear, for the plan's time
        estimate; a score and a sort are negligible beside the forward."""
        return 0


def uncalibrated_prune(weight: torch.Tensor, target: Target) -> Pruned:
    """A Linear whose site saw no calibration token (an expert no token was routed to): the weights
    alone decide, the lowest |W| of each row or N:M group (the comparison groups of every method
    with a statistic)."""
    return Pruned(row_or_group_mask(weight.abs().float(), target))


def row_or_group_mask(scores: torch.Tensor, target: Target) -> torch.Tensor:
    """The lowest scores of every output row zeroed, or of every N:M group."""
    if target.keep_block is not None:
        return nm_prune_mask(scores, *target.keep_block)
    return row_prune_mask(scores, target.sparsity)
