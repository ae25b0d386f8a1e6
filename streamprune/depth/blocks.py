"""The source's decoder blocks as every depth pass walks them: streamed in a given order, checked,
and built one at a time on the device."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from tqdm import tqdm

from ..stream import LayerReader, Source, check_weights_finite, forward_batches, head_bar


class Blocks:
    """The source's decoder blocks, streamed in a given order (the next one read in the background
    while this one computes) and built one at a time on the device."""

    def __init__(self, source: Source, batch_size: int, overlap: bool, quiet: bool):
        self.source, self.runner = source, source.runner
        self.batch_size, self.overlap, self.quiet = batch_size, overlap, quiet

    def tensors(self, index: int) -> dict[str, torch.Tensor]:
        """Block `index`'s tensors, checked (on the reading thread)."""
        stored = {}
        for name, local in self.source.layer_names[index].items():
            stored[local] = self.source.checkpoint.read(name, count=False)
            check_weights_finite(stored[local], name)
        return stored

    def stream(self, order: list[int], start: int, desc: str) -> Iterator[tuple[int, int, dict]]:
        """(position, block index, its tensors) for order[start:], with a progress bar that counts
        from 0 (a resumed phase starts part done)."""
        bar = tqdm(desc=desc, initial=start, total=len(order), unit="block", disable=self.quiet, dynamic_ncols=True)
        with LayerReader(self.source, self.overlap, read=self.tensors) as reader:
            for position, (index, stored) in enumerate(reader.layers(order[start:]), start):
                yield position, index, stored
                bar.update()
        bar.close()

    def head_bar(self, tokens: int, desc: str) -> tqdm:
        """A bar over the tokens the LM head scores after a pass's last block (stream.head_bar)."""
        return head_bar(tokens, self.quiet, desc)

    def build(self, index: int, stored: dict[str, torch.Tensor]) -> torch.nn.Module:
        return self.runner.build(index, stored)

    def forward(self, layer: torch.nn.Module, index: int, hidden: torch.Tensor, on_output=None) -> None:
        """hidden [n, seqlen, hidden] on the CPU, replaced in place by the layer's output."""
        forward_batches(self.runner, layer, index, hidden, self.batch_size, write_back=True, on_output=on_output)
