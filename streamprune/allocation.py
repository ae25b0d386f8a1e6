"""How much of each layer goes: the same fraction everywhere (uniform), or OWL, outlier-weighted
layerwise sparsity (Yin et al. 2024, arXiv 2310.05175; reference: the paper's code,
prune_wanda_outlier and check_outlier_mean). OWL prunes layers with many outliers less: a layer's
outlier ratio is the share of its Wanda scores |W| * ||X|| above M times their mean, over all its
Linears together; the ratios, scaled linearly to [0, 2 lambda] and shifted to mean 1 - target,
are the layers' densities. Pure math here; the streamed pass that measures the ratios is the run's."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from .errors import UsageError

ALLOCATIONS = ("uniform", "owl")
OWL_M = 5.0  # the paper's M (Hyper_m): an outlier scores above M x the layer's mean
OWL_LAMBDA = 0.08  # the paper's lambda: layer sparsities span at most 2 lambda, around the target


def layer_outlier_ratio(scores: Callable[[], Iterable[torch.Tensor]], m: float = OWL_M) -> float:
    """Percent of a layer's scores above m x their mean. `scores()` yields the layer's score
    matrices one Linear at a time (called twice: for the mean, then for the count), so that the
    layer's scores are never held all at once, as the reference's concatenation would."""
    total, count = 0.0, 0
    for matrix in scores():
        total += float(matrix.double().sum())
        count += matrix.numel()
    threshold = m * total / count
    above = sum(int((matrix > threshold).sum()) for matrix in scores())
    return 100.0 * above / count


def owl_sparsities(outlier_ratios: list[float], target: float, lam: float = OWL_LAMBDA) -> list[float]:
    """Each layer's sparsity: densities = ratios scaled to [0, 2 lam], shifted to mean 1 - target.
    Layers with equal ratios (nothing to weigh) all get the target."""
    low, high = min(outlier_ratios), max(outlier_ratios)
    if high == low:
        return [target] * len(outlier_ratios)
    scaled = [(ratio - low) * (1 / (high - low) * lam * 2) for ratio in outlier_ratios]
    mean = sum(scaled) / len(scaled)
    return [1 - (density - mean + (1 - target)) for density in scaled]


def check_owl(target: float | None, pattern: str | None, m: float, lam: float) -> None:
    """OWL's settings against the target, before anything runs."""
    if pattern is not None:
        raise UsageError(
            "--allocation owl varies the sparsity from layer to layer, which an N:M pattern fixes; "
            "use --sparsity with it, or --allocation uniform with --pattern"
        )
    if not (math.isfinite(m) and m > 0):
        raise UsageError(f"--owl-m {m} must be a positive number: an outlier scores above M x its layer's mean, e.g. 5")
    if not (math.isfinite(lam) and lam >= 0):
        raise UsageError(f"--owl-lambda {lam} must be a number of 0 or more; the paper uses 0.08")
    if not (0 < target - 2 * lam and target + 2 * lam < 1):
        raise UsageError(
            f"--sparsity {target} with --owl-lambda {lam}: layer sparsities may reach {target - 2 * lam:.2f} to "
            f"{target + 2 * lam:.2f}, outside (0, 1); lower --owl-lambda"
        )
