"""The width command's settings, checked before anything is read."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from ..config import check_choice, check_dtype, check_positive, parse_device, parse_shard_size
from ..errors import UsageError
from .scores import CRITERIA


@dataclass
class WidthConfig:
    model: str
    out: Path
    ratio: float = 0.2  # the share of the decoder blocks' parameters removed
    criterion: str = "flap"
    attention_share: float | None = None  # of the removed parameters; None: attention's share of the block's
    calib: str = "c4"
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    batch_size: int = 1
    device: str = "auto"
    dtype: str = "auto"
    max_shard_size: str = "5GB"
    overlap: bool = True
    force: bool = False
    quiet: bool = False

    def __post_init__(self):
        self.out = Path(self.out)
        check_choice("--criterion", self.criterion, CRITERIA)
        if self.ratio is None or not 0 < self.ratio < 1:
            raise UsageError(f"--ratio {self.ratio}: give the share of block parameters to remove, in (0, 1), e.g. 0.2")
        if self.attention_share is not None and not 0 <= self.attention_share <= 1:
            raise UsageError(
                f"--attention-share {self.attention_share}: give the attention's part of the removed parameters, "
                "from 0 (MLP channels only) to 1 (heads only), e.g. 0.3"
            )
        check_positive(self, "nsamples", "seqlen", "batch_size")
        check_dtype(self.dtype)
        self.max_shard_bytes = parse_shard_size(self.max_shard_size)
        self.torch_device = parse_device(self.device)

    def as_record(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}
