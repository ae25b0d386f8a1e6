"""Masks from scores, and applying them. Pure functions, tensors in and out, no I/O, no modules;
every method's scores end here.

Conventions: `weight` is a Linear's `[out_features, in_features]` matrix; a mask is a bool tensor
of the same shape that is True where the weight is *zeroed*. Equal scores are rare but do occur
(quantization-born weights share values), and one tie decided differently changes every later
layer's inputs: row and matrix masks use a stable sort (ties go by position), N:M masks use
torch.topk exactly as the Wanda reference does, so that both pick the same weights.
"""

from __future__ import annotations

import torch

# Selecting in (or sorting) a [rows, cols] float matrix needs scratch of a few times its size; rows
# are independent, so large matrices are done in slices of about this many elements.
SORT_SLICE_ELEMENTS = 1 << 26


def row_prune_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Zero the int(in * sparsity) lowest scores of every output row (Wanda's comparison group)."""
    rows, cols = scores.shape
    prune_per_row = int(cols * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if prune_per_row == 0:
        return mask
    step = max(1, SORT_SLICE_ELEMENTS // cols)
    for start in range(0, rows, step):
        mask[start : start + step] = lowest_per_row(scores[start : start + step], prune_per_row)
    return mask


def lowest_per_row(scores: torch.Tensor, count: int) -> torch.Tensor:
    """True at the `count` lowest scores of each row [rows, cols], ties going to the lower column:
    exactly the first `count` of a stable sort, found by selection (kthvalue, 2x faster than the sort
    on a CPU, where the sort was two fifths of a 70B-geometry layer's time)."""
    threshold = torch.kthvalue(scores, count, dim=1, keepdim=True).values  # [rows, 1]
    below = scores < threshold
    tied = scores == threshold
    # of the ties, as many as are still needed, leftmost first
    still_needed = count - below.sum(1, keepdim=True, dtype=torch.int32)
    return below | (tied & (tied.cumsum(1, dtype=torch.int32) <= still_needed))


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
    step = max(1, SORT_SLICE_ELEMENTS // cols)
    for start in range(0, rows, step):
        lowest = torch.topk(blocks[start : start + step], block_m - keep_n, dim=2, largest=False).indices
        mask[start : start + step].scatter_(2, lowest, True)
    return mask.view(rows, cols)


def apply_mask(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The pruned weight: masked entries, and any zero already there, become +0.0.

    Never `weight * ~mask`: a negative weight times zero is -0.0, which some runtimes mishandle.
    """
    return torch.where(mask | (weight == 0), torch.zeros((), dtype=weight.dtype, device=weight.device), weight)


def zero_count(tensor: torch.Tensor) -> int:
    """How many entries are zero (either sign): 17x faster than (tensor == 0).sum() on a CPU."""
    return tensor.numel() - int(torch.count_nonzero(tensor))


_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.uint8)  # bit j of a byte holds column 8 * byte + j


def pack_bits(flags: torch.Tensor) -> torch.Tensor:
    """A bool matrix [rows, cols] in one bit an entry: uint8 [rows, ceil(cols / 8)]."""
    rows, cols = flags.shape
    padded = torch.zeros(rows, -(-cols // 8) * 8, dtype=torch.uint8, device=flags.device)
    padded[:, :cols] = flags
    return (padded.view(rows, -1, 8) * _BIT_WEIGHTS.to(flags.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """pack_bits' inverse: the bool matrix [rows, cols]."""
    bits = (packed.unsqueeze(-1) & _BIT_WEIGHTS.to(packed.device)) != 0  # [rows, bytes, 8]
    return bits.view(packed.shape[0], -1)[:, :cols]
