"""Wanda (Sun et al. 2023, arXiv 2306.11695; reference locuslab/wanda lib/prune.py): score
|W_ij| * ||X_j||_2, X_j input feature j over every calibration token; the lowest scores of each
output row (or N:M group) are zeroed; the survivors keep their values."""

from __future__ import annotations

import torch

from .base import Method, Pruned, Statistic, Target, row_or_group_mask


class InputSqNorm(Statistic):
    """||X_j||^2 / samples for every input feature j, float32: the reference's `scaler_row`."""

    def __init__(self, in_features: int, device: torch.device):
        super().__init__(in_features, device)
        self.sq_norm = torch.zeros(in_features, dtype=torch.float32, device=device)  # [in]

    def add_batch(self, x: torch.Tensor) -> None:
        for sample in x:  # [seqlen, in] on the compute device; the statistic may be in RAM (an expert's)
            self.add_sample((torch.norm(sample.t().float(), p=2, dim=1) ** 2).to(self.device))

    def add_sample(self, sq_norm: torch.Tensor) -> None:
        """One sample's ||X_j||^2 [in] into a running mean over samples, in the reference's exact
        arithmetic: a plain float32 sum ranks the same in exact math but rounds differently, and one
        flipped near-tie changes every later layer. With one sample per micro-batch the masks then
        match it bit for bit."""
        self.samples += 1
        n = self.samples
        self.sq_norm *= (n - 1) / n
        self.sq_norm += sq_norm / n

    def merge(self, other: InputSqNorm) -> None:
        if isinstance(other, SampleSqNorms):  # its samples after ours, as if this process had seen them
            for sq_norm in other.per_sample.to(self.device):
                self.add_sample(sq_norm)
            return
        total = self.samples + other.samples
        if total:
            self.sq_norm = self.sq_norm * (self.samples / total) + other.sq_norm.to(self.device) * (
                other.samples / total
            )
        self.samples = total

    @classmethod
    def shareable(cls) -> type[Statistic]:
        return SampleSqNorms

    @staticmethod
    def held_bytes(in_features: int) -> int:
        return in_features * 4

    @staticmethod
    def scratch_bytes(seqlen: int, in_features: int) -> int:
        return seqlen * in_features * 4  # one sample's input in float32


class SampleSqNorms(InputSqNorm):
    """InputSqNorm that also keeps each sample's ||X_j||^2 ([samples, in] float32, 4 bytes a feature
    a sample), for another process: merged into the statistic of the samples before them, they
    continue its running mean, which is then bit for bit the one a single process computes."""

    def __init__(self, in_features: int, device: torch.device):
        super().__init__(in_features, device)
        self.per_sample = torch.zeros(0, in_features, dtype=torch.float32, device=device)  # [samples, in]

    def add_sample(self, sq_norm: torch.Tensor) -> None:
        super().add_sample(sq_norm)
        self.per_sample = torch.cat([self.per_sample, sq_norm.unsqueeze(0)])


def wanda_scores(weight: torch.Tensor, input_sq_norm: torch.Tensor) -> torch.Tensor:
    """S_ij = |W_ij| * ||X_j||_2. weight [out, in]; input_sq_norm [in] float32, ||X_j||^2 or any
    constant multiple of it (the reference divides by nsamples). Returns [out, in] float32."""
    # one float32 copy, then in place: a third of the time of abs, float and multiply into new tensors
    return weight.to(torch.float32, copy=True).abs_().mul_(input_sq_norm.float().sqrt().unsqueeze(0))


class Wanda(Method):
    name = "wanda"
    summary = "|W| x input norm, lowest per output row (Sun et al. 2023)"
    statistic = InputSqNorm

    def prune(self, weight: torch.Tensor, statistic: InputSqNorm, target: Target) -> Pruned:
        return Pruned(row_or_group_mask(wanda_scores(weight, statistic.sq_norm), target))
