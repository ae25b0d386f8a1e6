"""Magnitude, the baseline: |W| alone, no calibration data. Unstructured, the lowest |W| of each
whole matrix go (layer-wise, as the Wanda repository's baseline does); N:M, of each group."""

from __future__ import annotations

import torch

from .base import Method, Pruned, Statistic, Target
from .masks import matrix_prune_mask, nm_prune_mask


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| as float32. [out, in] -> [out, in]."""
    return weight.abs().float()


class Magnitude(Method):
    name = "magnitude"
    summary = "|W|, lowest per whole matrix (no calibration data)"

    def prune(self, weight: torch.Tensor, statistic: Statistic | None, target: Target) -> Pruned:
        scores = magnitude_scores(weight)
        if target.keep_block is not None:
            return Pruned(nm_prune_mask(scores, *target.keep_block))
        return Pruned(matrix_prune_mask(scores, target.sparsity))

    def prune_scratch_bytes(self, rows: int, cols: int, target: Target, on_gpu: bool = False) -> int:
        if target.keep_block is not None:
            return super().prune_scratch_bytes(rows, cols, target)
        return rows * cols * (4 + 4 + 8 + 1)  # the whole matrix sorted at once
