"""--reconstruct: the block before each removed span (a seam) is trained to produce what the span
produced, on calibration windows of its own."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import torch

from ..calibration import DataFlags, file_sha256, sample_calibration
from ..reconstruct import ReconstructSettings, reconstruct_layer, trainable
from ..stream import Source, check_activations_finite
from .blocks import Blocks
from .config import IN_FLOAT32, DepthConfig


def seams(kept: list[int], num_layers: int) -> dict[int, int]:
    """{kept block: the last block of the removed span right after it}. A span at the very start has
    no block before it to heal."""
    found, seam = {}, None
    for index in range(num_layers):
        if index in kept:
            seam = index
        elif seam is not None:
            found[seam] = index  # the span goes on to here
    return found


def healing_ids(config: DepthConfig, source: Source, calib_path: Path) -> torch.Tensor:
    """The calibration windows the seams train on, [reconstruct_nsamples, reconstruct_seqlen]."""
    seqlen = source.capped_seqlen(config.reconstruct_seqlen)
    settings = SimpleNamespace(calib=config.calib, nsamples=config.reconstruct_nsamples, seed=config.seed)
    flags = DataFlags(count="--reconstruct-nsamples", seqlen="--reconstruct-seqlen")
    calibration = sample_calibration(settings, calib_path, file_sha256(calib_path), source.directory, seqlen, flags)
    source.check_token_ids(calibration["input_ids"])
    return calibration["input_ids"]


def heal_seams(config: DepthConfig, source: Source, kept: list[int], input_ids: torch.Tensor) -> tuple[dict, dict]:
    """One pass over the blocks up to the last removed span, with two streams: the dense model's,
    and the shortened model's (the same until the first seam, so it is split off there). At a seam
    (a kept block followed by a removed span) the block is trained, on the shortened stream's
    inputs, toward the dense stream's output after the span (what the span produced); the
    shortened stream then goes through the trained block. Returns ({source tensor name: trained
    tensor} for the seam blocks, {seam block: first and last epoch's mean loss})."""
    settings = ReconstructSettings(
        config.reconstruct_epochs, config.reconstruct_lr, config.reconstruct_batch_size,
        optimizer=config.reconstruct_optimizer,
    )  # fmt: skip
    span_end = seams(kept, source.num_layers)
    if not span_end:
        return {}, {}
    last = max(span_end.values())  # nothing after the last span is trained
    blocks = Blocks(source, config.batch_size, config.overlap, config.quiet)
    dense = source.embed(input_ids)  # [n, seqlen, hidden]
    shortened = None  # the shortened model's stream, from the first seam on
    healed, losses, seam = {}, {}, None  # seam: (index, layer, tensors) waiting for its span's end
    for _, index, stored in blocks.stream(list(range(last + 1)), 0, "healing seams"):
        layer = blocks.build(index, stored)
        if index in span_end and shortened is None:
            shortened = dense.clone()
        if shortened is not None and index in kept and index not in span_end:
            blocks.forward(layer, index, shortened)
        blocks.forward(layer, index, dense)
        if index in span_end:
            seam = (index, layer, stored)  # its dense output is in `dense`; it trains once the span has run
        if seam is not None and span_end[seam[0]] == index:
            seam_index, seam_layer, seam_stored = seam
            with torch.enable_grad():
                losses[seam_index] = reconstruct_layer(
                    source.runner, seam_layer, seam_index, shortened, dense, settings, config.seed
                )
            for local in trainable(seam_layer, source.runner.projections.names, settings.train_norms):
                name = source.names.layer(seam_index) + local
                healed[name] = seam_layer.get_parameter(local).data.to("cpu", seam_stored[local].dtype)
            if index < last:
                blocks.forward(seam_layer, seam_index, shortened)
            seam = None
        check_activations_finite(dense, index, in_float32=IN_FLOAT32)
    return healed, losses
