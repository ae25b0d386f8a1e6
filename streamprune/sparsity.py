"""Pruning math: scores and masks. Pure functions, tensors in and out, no I/O, no modules.

Conventions: `weight` is a Linear's `[out_features, in_features]` matrix; a mask is a bool tensor
of the same shape that is True where the weight is *zeroed*. Equal scores are rare but do occur
(quantization-born weights share values), and one tie decided differently changes every later
layer's inputs: row and matrix masks use a stable sort (ties go by position), N:M masks use
torch.topk exactly as the Wanda reference does, so that both pick the same weights.
"""

from __future__ import annotations

import torch

# Sorting a [rows, cols] float matrix needs ~3x its size in scratch (values + int64 indices); rows
# are independent, so large matrices are sorted in slices of about this many elements.
_SORT_SLICE_ELEMENTS = 1 << 26


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """Wanda's metric S_ij = |W_ij| * ||X_j||_2.

    weight: [out, in]; input_sq_norm: [in] float32, ||X_j||^2 over every calibration token that
    reached this Linear, or any constant multiple of it (the reference divides by nsamples).
    Returns [out, in] float32.
    """
    return weight.abs().float() * input_sq_norm.float().sqrt().unsqueeze(0)


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W| as float32, the magnitude baseline's metric. [out, in] -> [out, in]."""
    return weight.abs().float()


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the int(in * sparsity) lowest scores of every output row (Wanda's comparison group)."""
    rows, cols = scores.shape
    prune_per_row = int(cols * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if prune_per_row == 0:
        return mask
    step = max(1, _SORT_SLICE_ELEMENTS // cols)
    for start in range(0, rows, step):
        block = scores[start : start + step]  # [step, in]
        lowest = torch.sort(block, dim=1, stable=True).indices[:, :prune_per_row]
        mask[start : start + step].scatter_(1, lowest, True)
    return mask


def matrix_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the int(numel * sparsity) lowest scores of the whole matrix (layer-wise magnitude)."""
    mask = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
    prune_count = int(scores.numel() * sparsity)
    if prune_count:
        lowest = torch.sort(scores.reshape(-1), stable=True).indices[:prune_count]
        mask[lowest] = True
    return mask.view(scores.shape)


def nm_prune_mask(scores: torch.Tensor, keep_n: int, block_m: int) -> torch.Tensor:
    """N:M semi-structured: in every row, of each `block_m` consecutive inputs keep the `keep_n`
    highest scores and zero the other block_m - keep_n. Requires in_features % block_m == 0.
    (The reference's `prune_n` counts the pruned weights; for 2:4 and 4:8 the readings agree.)"""
    rows, cols = scores.shape
    if not 0 < keep_n < block_m or cols % block_m:
        raise ValueError(f"{keep_n}:{block_m} does not tile a row of {cols} inputs")
    blocks = scores.reshape(rows, cols // block_m, block_m)  # [out, in/M, M]
    mask = torch.zeros_like(blocks, dtype=torch.bool)
    step = max(1, _SORT_SLICE_ELEMENTS // cols)
    for start in range(0, rows, step):
        lowest = torch.topk(blocks[start : start + step], block_m - keep_n, dim=2, largest=False).indices
        mask[start : start + step].scatter_(2, lowest, True)
    return mask.view(rows, cols)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pruned weight: masked entries, and any zero already there, become +0.0.

    Never `weight * ~mask`: a negative weight times zero is -0.0, which some runtimes mishandle.
    """
    return torch.where(mask | (weight == 0), torch.zeros((), dtype=weight.dtype, device=weight.device), weight)


def prune_mask(
    weight: torch.Tensor,
    method: str,
    sparsity: float,
    keep_block: tuple[int, int] | None = None,
    input_sq_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """The mask for one Linear: Wanda per output row, or magnitude per whole matrix; N:M when
    `keep_block` = (keep_n, block_m) is given (then `sparsity` is ignored)."""
    if method == "wanda":
        scores = wanda_scores(weight, input_sq_norm)
    elif method == "magnitude":
        scores = magnitude_scores(weight)
    else:
        raise ValueError(f"unknown method {method!r}")
    if keep_block is not None:
        return nm_prune_mask(scores, *keep_block)
    return row_prune_mask(scores, sparsity) if method == "wanda" else matrix_prune_mask(scores, sparsity)
