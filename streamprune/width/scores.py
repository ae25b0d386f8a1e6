"""Width pruning's math, tensors in and tensors out: the input statistics of the o_proj and down_proj
sites, a score per input channel, a score per key-value group, the lowest ones, and FLAP's bias
compensation. No I/O, no model.

Definitions follow the published code (CASIA-IVA-Lab/FLAP, lib/prune.py), uniform per layer ("UL-UM"):
- flap (its WIFV metric): variance of input channel j over the calibration tokens x ||W[:, j]||^2. For
  attention the published code squares each channel's metric before summing it over a head
  (`metrics[...] ** 2`); we do the same, summing over the whole key-value group where heads share one.
- wanda-sp: sum over the output rows of |W_ij| x ||X_j||, summed over each structure (the published
  code takes the mean over rows: the same order within a layer).
- magnitude: sum over the output rows of |W_ij|, summed over each structure (no data).
Two deliberate differences: the variance is the exact one over all tokens (the published running
update aliases its old mean, so it computes something slightly different), and ties are broken by
the lower index with exactly `count` removed (the published threshold keeps every tie)."""

from __future__ import annotations

import torch

CRITERIA = ("flap", "wanda-sp", "magnitude")
CALIBRATED = ("flap", "wanda-sp")


class InputMoments:
    """Per input channel of one site, over every calibration token: the count, the sum and the sum
    of squares, in float64 (a 2048 x 128 token calibration would lose the variance in float32)."""

    def __init__(self, width: int, device: torch.device | str = "cpu"):
        self.tokens = 0
        self.sum = torch.zeros(width, dtype=torch.float64, device=device)
        self.sum_squares = torch.zeros(width, dtype=torch.float64, device=device)

    def add_batch(self, x: torch.Tensor) -> None:
        """x [..., width]: one micro-batch's inputs of the site."""
        flat = x.reshape(-1, x.shape[-1]).double()
        self.tokens += flat.shape[0]
        self.sum += flat.sum(0)
        self.sum_squares += flat.square().sum(0)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.tokens

    @property
    def variance(self) -> torch.Tensor:
        """Population variance over the tokens (E[x^2] - E[x]^2, never below 0)."""
        return (self.sum_squares / self.tokens - self.mean.square()).clamp_min(0)


def channel_scores(criterion: str, weight: torch.Tensor, moments: InputMoments | None) -> torch.Tensor:
    """A score per input channel of an output Linear (o_proj, down_proj), weight [out, in] ->
    [in] float64; low means unimportant."""
    w = weight.double()
    if criterion == "flap":
        return moments.variance.to(w.device) * w.square().sum(0)
    if criterion == "wanda-sp":
        return (w.abs() * moments.sum_squares.to(w.device).sqrt()).sum(0)
    if criterion == "magnitude":
        return w.abs().sum(0)
    raise ValueError(criterion)


def group_scores(criterion: str, o_proj_scores: torch.Tensor, group_channels: int) -> torch.Tensor:
    """A score per key-value group from o_proj's channel scores (each group's `group_channels`
    consecutive channels: its query heads x head_dim)."""
    per_channel = o_proj_scores.square() if criterion == "flap" else o_proj_scores
    return per_channel.reshape(-1, group_channels).sum(1)


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    """The indices of the `count` lowest scores (ties: the lower index), ascending."""
    order = torch.sort(scores.cpu(), stable=True).indices
    return order[:count].sort().values


def kept(size: int, removed: torch.Tensor) -> torch.Tensor:
    """0..size-1 without `removed`, ascending."""
    keep = torch.ones(size, dtype=torch.bool)
    keep[removed] = False
    return keep.nonzero().squeeze(1)


def expand(indices: torch.Tensor, width: int) -> torch.Tensor:
    """Indices of units `width` wide (heads, groups) -> the indices of their channels, ascending."""
    return (indices.unsqueeze(1) * width + torch.arange(width)).reshape(-1)


def compensation(weight: torch.Tensor, mean: torch.Tensor, removed_channels: torch.Tensor) -> torch.Tensor:
    """FLAP's bias compensation: what the removed input channels added on average, W[:, removed] @
    mean(X[removed]), float64 [out]; added to the output Linear's bias, it keeps the mean output."""
    columns = weight[:, removed_channels.to(weight.device)].double()
    return columns @ mean.to(columns.device)[removed_channels.to(columns.device)]
