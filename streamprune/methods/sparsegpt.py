"""SparseGPT (Frantar & Alistarh 2023, arXiv 2301.00774; reference: the Wanda repository's
lib/sparsegpt.py and prune_sparsegpt). Per input site, the Hessian of the layer-wise squared error,
H = 2/n sum X X^T; per Linear, columns are pruned block by block in order, and after each column
the error it leaves is spread over the columns not yet visited (optimal brain surgeon, through the
upper Cholesky factor of H^-1). The survivors change: the method returns new weights."""

from __future__ import annotations

import math

import torch

from ..errors import BadInputError, UsageError
from .base import Method, Pruned, Statistic, Target

PERCDAMP = 0.01  # the reference's dampening: this fraction of the mean diagonal of H is added to it
BLOCKSIZE = 128  # columns pruned together before their error is spread to the rest


class Hessian(Statistic):
    """H = 2/n sum_samples X X^T in float32 ([in, in]), as the reference's `add_batch` keeps it.

    Once pruning starts, `inverse` replaces H by the upper Cholesky factor of (H + damping)^-1:
    every Linear of the site uses the same one, and H itself is no longer needed."""

    def __init__(self, in_features: int, device: torch.device):
        super().__init__(in_features, device)
        self.H = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)  # [in, in]
        self._inverse = None  # (Hinv [in, in], dead [in] bool), once pruning starts

    def add_batch(self, x: torch.Tensor) -> None:
        # the reference's running rescale, sample count = the micro-batch's samples
        batch = x.shape[0]
        self.H *= self.samples / (self.samples + batch)
        self.samples += batch
        inputs = math.sqrt(2 / self.samples) * x.reshape(-1, x.shape[-1]).t().float()  # [in, tokens]
        if inputs.device == self.H.device:
            self.H.addmm_(inputs, inputs.t())  # in place: no [in, in] product beside H
        else:  # an expert's H kept in RAM: the product computed where x is, then moved
            self.H += inputs.matmul(inputs.t()).to(self.device)

    def merge(self, other: Hessian) -> None:
        total = self.samples + other.samples
        if total:
            self.H = self.H * (self.samples / total) + other.H.to(self.device) * (other.samples / total)
        self.samples = total

    def inverse(self, percdamp: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(Hinv, dead): the upper Cholesky factor of the dampened inverse [in, in], and the inputs
        that never fired [in] (their weights are zeroed, their H diagonal set to 1)."""
        if self._inverse is None:
            H, self.H = self.H, None
            dead = torch.diag(H) == 0
            H[dead, dead] = 1
            diagonal = torch.arange(H.shape[0], device=H.device)
            H[diagonal, diagonal] += percdamp * torch.mean(torch.diag(H))
            try:
                H = torch.linalg.cholesky(H)
                H = torch.cholesky_inverse(H)
                H = torch.linalg.cholesky(H, upper=True)
            except torch.linalg.LinAlgError as err:
                raise BadInputError(
                    f"SparseGPT: the Hessian of a {H.shape[0]}-wide input is not positive definite even after "
                    f"adding --percdamp {percdamp} of its mean diagonal ({err}). Start over with more dampening, "
                    "e.g. --percdamp 0.1 --force, or with more calibration samples (--nsamples)."
                ) from None
            self._inverse = (H, dead)
        return self._inverse

    @staticmethod
    def held_bytes(in_features: int) -> int:
        return in_features * in_features * 4

    @staticmethod
    def scratch_bytes(seqlen: int, in_features: int) -> int:
        return seqlen * in_features * 4  # one sample's input in float32

    @staticmethod
    def moved_bytes(in_features: int) -> int:
        return in_features * in_features * 4  # the product X X^T, made where x is

    @staticmethod
    def flops_per_token(in_features: int) -> int:
        return 2 * in_features * in_features  # X X^T, in float32: about a forward's worth for SmolLM2


def obs_prune(weight: torch.Tensor, hinv: torch.Tensor, target: Target, blocksize: int) -> Pruned:
    """The reference's `fasterprune` loop. weight [out, in] float32 (a copy: it is updated in place);
    hinv [in, in] upper Cholesky factor of the dampened H^-1. Unstructured: each column block loses
    the entries with W^2 / diag(Hinv)^2 at or below its k-th smallest (k = numel * sparsity), chosen
    once per block; N:M: at every M-th column, the M - N smallest of each row's next M."""
    W, columns = weight, weight.shape[1]
    mask = torch.zeros_like(W, dtype=torch.bool)  # [out, in]
    prune_n, prune_m = (0, 0)
    if target.keep_block is not None:
        keep_n, prune_m = target.keep_block
        prune_n = prune_m - keep_n
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        W1 = W[:, i1:i2].clone()  # [out, count]
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = hinv[i1:i2, i1:i2]
        if prune_n == 0:
            scores = W1**2 / (torch.diag(Hinv1).reshape((1, -1))) ** 2
            threshold = torch.sort(scores.flatten())[0][int(scores.numel() * target.sparsity)]
            mask1 = scores <= threshold
            del scores
        else:
            mask1 = torch.zeros_like(W1, dtype=torch.bool)
        for i in range(i2 - i1):
            w = W1[:, i]
            d = Hinv1[i, i]
            if prune_n != 0 and i % prune_m == 0:
                scores = W1[:, i : i + prune_m] ** 2 / (torch.diag(Hinv1)[i : i + prune_m].reshape((1, -1))) ** 2
                mask1.scatter_(1, i + torch.topk(scores, prune_n, dim=1, largest=False)[1], True)
            q = w.clone()
            q[mask1[:, i]] = 0
            Q1[:, i] = q
            err1 = (w - q) / d
            W1[:, i:] -= err1.unsqueeze(1).matmul(Hinv1[i, i:].unsqueeze(0))
            Err1[:, i] = err1
        W[:, i1:i2] = Q1
        mask[:, i1:i2] = mask1
        W[:, i2:] -= Err1.matmul(hinv[i1:i2, i2:])
    return Pruned(mask, W)


class SparseGPT(Method):
    name = "sparsegpt"
    summary = "OBS column by column from the input Hessian, survivors updated (Frantar & Alistarh 2023)"
    statistic = Hessian
    options = ("percdamp", "blocksize")

    def __init__(self, percdamp: float = PERCDAMP, blocksize: int = BLOCKSIZE):
        if not (math.isfinite(percdamp) and percdamp >= 0):
            raise UsageError(f"--percdamp {percdamp} is not a number of 0 or more; it is a fraction of H's mean "
                             "diagonal, e.g. 0.01")
        if blocksize < 1:
            raise UsageError(f"--blocksize {blocksize} must be a positive number of columns, e.g. 128")
        self.percdamp, self.blocksize = percdamp, blocksize

    def check_target(self, target: Target) -> None:
        if target.keep_block is not None and self.blocksize % target.keep_block[1]:
            raise UsageError(
                f"--blocksize {self.blocksize} is not a multiple of M={target.keep_block[1]}: an N:M group "
                "must not straddle two column blocks; choose e.g. --blocksize 128"
            )

    def prune(self, weight: torch.Tensor, statistic: Hessian, target: Target) -> Pruned:
        hinv, dead = statistic.inverse(self.percdamp)
        W = weight.float().clone()  # [out, in]
        W[:, dead] = 0
        return obs_prune(W, hinv, target, self.blocksize)

    def settings(self) -> dict:
        return {"percdamp": self.percdamp, "blocksize": self.blocksize}

    def prune_scratch_bytes(self, rows: int, cols: int, target: Target, on_gpu: bool = False) -> int:
        # first the inverse, once per site: on a CPU each factorisation makes one new [in, in] beside
        # the one it replaces (the statistic's H, counted as held); on a GPU cuSOLVER's
        # cholesky_inverse makes two (its result, set to the identity, and a working copy of the
        # factor). Once it is done, W in float32, the block's W1, Q1, Err1 and scores, its sort
        # (values + int64 indices) and the mask. The larger of the two, not their sum: the inverse is
        # freed before the prune starts (RESULTS.md: SparseGPT's peak memory, measured and planned).
        block = rows * min(self.blocksize, cols)
        inverse = cols * cols * 4 * (2 if on_gpu else 1)
        return max(inverse, rows * cols * 4 + 4 * block * 4 + block * (4 + 8) + rows * cols)

    def prune_steps(self, rows: int, cols: int) -> int:
        return cols  # obs_prune's inner loop, a dozen small tensor operations a column

    def prune_flops(self, rows: int, cols: int) -> int:
        # the rank-1 updates inside each block, the block's error spread to the columns after it
        # (rows x cols^2 over the whole matrix), and the site's three cubic factorisations (charged
        # to each of its Linears: an overestimate for q/k/v and gate/up)
        return 2 * rows * cols * self.blocksize + rows * cols * cols + cols**3
