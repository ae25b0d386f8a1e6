"""RIA, relative importance and activations (Zhang et al., ICLR 2024, "Plug-and-Play"): score
(|W_ij| / sum_i |W_ij| + |W_ij| / sum_j |W_ij|) * ||X_j||_2^a with a = 0.5, i.e. each weight's
share of its input channel's and of its output row's magnitude, times the input's norm to the a.
The lowest scores of each output row (or N:M group) are zeroed; no channel permutation."""

from __future__ import annotations

import torch

from .base import Method, Pruned, Target, row_or_group_mask
from .masks import SORT_SLICE_ELEMENTS
from .wanda import InputSqNorm

ALPHA = 0.5  # the paper's a


def ria_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor, alpha: float = ALPHA) -> torch.Tensor:
    """weight [out, in]; input_sq_norm [in], ||X_j||^2 (a constant multiple changes no row's order).
    Returns [out, in] float32. A column or row of zeros scores 0, not 0/0."""
    magnitude = weight.abs().float()
    tiny = torch.finfo(torch.float32).tiny
    scores = magnitude / magnitude.sum(0, keepdim=True).clamp_min(tiny)  # share of input channel j
    scores += magnitude / magnitude.sum(1, keepdim=True).clamp_min(tiny)  # share of output row i
    return scores.mul_(input_sq_norm.float().sqrt().pow(alpha).unsqueeze(0))


class RIA(Method):
    name = "ria"
    summary = "(|W|/column sum + |W|/row sum) x input norm^0.5, lowest per output row (Zhang et al. 2024)"
    statistic = InputSqNorm

    def prune(self, weight: torch.Tensor, statistic: InputSqNorm, target: Target) -> Pruned:
        return Pruned(row_or_group_mask(ria_scores(weight, statistic.sq_norm), target))

    def settings(self) -> dict:
        return {"ria_alpha": ALPHA}

    def prune_scratch_bytes(self, rows: int, cols: int, target: Target, on_gpu: bool = False) -> int:
        # |W|, the scores and one share in float32, then a sort slice and the mask
        return rows * cols * 4 * 3 + min(rows * cols, SORT_SLICE_ELEMENTS) * (4 + 8) + rows * cols
