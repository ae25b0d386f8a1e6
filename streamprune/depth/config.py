"""The depth command's settings, checked before anything is read, and the choice of blocks: how
many go, which may go (never the first `keep_first` nor the last `keep_last`), and which do."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..config import check_choice, check_dtype, check_positive, check_seed, parse_device, parse_shard_size
from ..errors import UsageError
from ..reconstruct import OPTIMIZERS

CRITERIA = ("ppl", "taylor", "magnitude", "bi")
# the scores depend on the dtype: float32 scores anew
IN_FLOAT32 = "score in float32 with --dtype float32 --force (or --dtype float32 and a new --out)"


@dataclass
class DepthConfig:
    model: str
    out: Path
    criterion: str = "ppl"
    remove: int | None = None  # number of blocks to remove; or
    ratio: float | None = None  # the fraction of all blocks to remove (rounded)
    keep_first: int = 4
    keep_last: int = 2
    iterative: bool = False  # remove one block at a time and rescore the shorter model
    scores_only: bool = False
    calib: str = "c4"
    nsamples: int = 10  # the paper's calibration: 10 x 128 tokens, seed 1234
    seqlen: int = 128
    seed: int = 1234
    batch_size: int = 1
    max_streams: int | None = None  # ppl: skip streams carried per pass; None: what fits in half the free RAM
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    checkpoint_minutes: float = 5.0  # save the scoring's progress this often (0: after every block)
    overlap: bool = True  # read the next block while this one computes
    # --reconstruct: the block before each removed span is trained to produce what the span produced
    reconstruct: bool = False
    reconstruct_epochs: int = 4
    reconstruct_lr: float = 1e-3
    reconstruct_batch_size: int = 1
    reconstruct_optimizer: str = "adam"  # or adam8bit
    reconstruct_nsamples: int = 32  # its own calibration windows: the scoring's 10 x 128 are too few to train on
    reconstruct_seqlen: int = 512
    force: bool = False
    quiet: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        check_choice("--criterion", self.criterion, CRITERIA)
        if not self.scores_only and (self.remove is None) == (self.ratio is None):
            raise UsageError("give --remove K (blocks) or --ratio R (fraction of blocks), or --scores-only")
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise UsageError(f"--ratio {self.ratio} is outside (0, 1): it is the fraction of blocks removed, e.g. 0.2")
        check_positive(self, "remove", "nsamples", "seqlen", "batch_size", "max_streams")
        check_seed(self.seed)
        check_positive(self, "reconstruct_epochs", "reconstruct_lr", "reconstruct_batch_size", "reconstruct_nsamples",
                       "reconstruct_seqlen")  # fmt: skip
        check_choice("--reconstruct-optimizer", self.reconstruct_optimizer, OPTIMIZERS)
        if self.reconstruct and self.scores_only:
            raise UsageError("--reconstruct heals the shortened checkpoint; --scores-only writes none. Drop one")
        for name in ("keep_first", "keep_last", "checkpoint_minutes"):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must be 0 or more, got {getattr(self, name)}")
        check_dtype(self.dtype)
        self.max_shard_bytes = parse_shard_size(self.max_shard_size)
        self.torch_device = parse_device(self.device)


def removal_count(num_layers: int, remove: int | None, ratio: float | None, keep_first: int, keep_last: int) -> int:
    """How many blocks to remove, checked against the removable ones."""
    removable = num_layers - keep_first - keep_last
    if removable <= 0:
        raise UsageError(
            f"--keep-first {keep_first} and --keep-last {keep_last} protect all {num_layers} blocks, so none can be "
            "removed; lower them (the paper's defaults are 4 and 2)"
        )
    count = remove if remove is not None else round(ratio * num_layers)
    if count < 1:
        raise UsageError(f"--ratio {ratio} of {num_layers} blocks rounds to 0 blocks; use a larger --ratio or --remove")
    if count >= num_layers:
        asked = f"--remove {count}" if remove is not None else f"--ratio {ratio} ({count} blocks)"
        raise UsageError(
            f"{asked} would remove all {num_layers} blocks and leave no model; remove {num_layers - 1} or fewer"
        )
    if count > removable:
        raise UsageError(
            f"cannot remove {count} of {num_layers} blocks: blocks 0-{keep_first - 1} and the last {keep_last} are "
            f"protected, so only {removable} are removable. Use --remove {removable} or fewer, or lower "
            "--keep-first/--keep-last"
        )
    return count


def candidates(num_layers: int, keep_first: int, keep_last: int) -> list[int]:
    return list(range(keep_first, num_layers - keep_last))


def lowest(scores: dict[int, float], allowed: list[int], count: int) -> list[int]:
    """The `count` allowed blocks with the lowest scores (ties: the lower index), ascending."""
    return sorted(sorted(allowed, key=lambda i: (scores[i], i))[:count])
