"""The one-pass criteria (magnitude, bi, ppl) and the per-block math they reduce to, and
score_blocks, which runs config.criterion's passes (taylor's two are in taylor.py)."""

from __future__ import annotations

import math

import torch

from ..buffers import available_ram_bytes
from ..stream import check_activations_finite, load_head, token_logprobs
from .blocks import Blocks
from .config import IN_FLOAT32, DepthConfig
from .saves import ScoringSaves
from .taylor import taylor_scores


def block_influence(h_in: torch.Tensor, h_out: torch.Tensor) -> tuple[float, int]:
    """(sum over tokens of 1 - cos(h_in, h_out), token count) for [..., hidden] tensors, in float32."""
    cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    return float((1 - cos).double().sum()), cos.numel()


def mean_nll(hidden: torch.Tensor, input_ids: torch.Tensor, head, bar=None) -> float:
    """Mean next-token loss over all samples: hidden [n, seqlen, h] predicts input_ids [n, seqlen].
    `bar` (a tqdm) counts the scored tokens."""
    total = 0.0
    for sample, ids in zip(hidden, input_ids):
        total -= float(token_logprobs(sample[:-1], ids[1:], head).double().sum())
        if bar is not None:
            bar.update(len(ids) - 1)
    return total / (input_ids.shape[0] * (input_ids.shape[1] - 1))


def block_magnitude_scores(blocks: Blocks, model: list[int], saves: ScoringSaves) -> dict[int, float]:
    """Sum of |W| over each block's Linear weights."""
    position, saved = saves.resume("magnitude")
    scores, linears = saved.get("scores", {}), blocks.runner.projections.names
    for position, index, stored in blocks.stream(model, position, "magnitude"):
        scores[index] = sum(float(stored[f"{local}.weight"].double().abs().sum()) for local in linears)
        del stored
        saves.after_block("magnitude", position + 1, {"scores": scores}, {})
    return scores


def bi_scores(blocks: Blocks, model: list[int], hidden: torch.Tensor, saves: ScoringSaves) -> dict[int, float]:
    """hidden: the embedded calibration tokens [n, seqlen, hidden]; consumed."""
    position, saved = saves.resume("bi")
    scores = saved.get("scores", {})
    if position:
        saves.tensor("hidden", out=hidden)  # the input of block model[position]
    for position, index, stored in blocks.stream(model, position, "block influence"):
        sums = [0.0, 0]  # sum of 1 - cos over tokens, tokens

        def add(x: torch.Tensor, y: torch.Tensor) -> None:
            part, tokens = block_influence(x, y)
            sums[0], sums[1] = sums[0] + part, sums[1] + tokens

        blocks.forward(blocks.build(index, stored), index, hidden, on_output=add)
        del stored
        check_activations_finite(hidden, index, in_float32=IN_FLOAT32)
        scores[index] = sums[0] / sums[1]
        saves.after_block("bi", position + 1, {"scores": scores}, {"hidden": hidden})
    return scores


def ppl_scores(
    blocks: Blocks,
    model: list[int],
    embedded: torch.Tensor,
    input_ids: torch.Tensor,
    streams_per_pass: int,
    saves: ScoringSaves,
) -> tuple[dict[int, float], int]:
    """Perplexity with each block of `model` skipped; returns (scores, passes over the weights).

    At block i the main stream (no block skipped) is copied into block i's skip stream, which then
    skips block i; every skip stream started earlier goes through block i like the main one.
    """
    position, saved = saves.resume("ppl")
    scores, passes = saved.get("scores", {}), saved.get("passes", 0)
    first = saved.get("first", 0)  # the first of the blocks whose skip streams this pass carries
    streams_per_pass = saved.get("streams_per_pass", streams_per_pass)  # a resumed pass keeps its group
    head = load_head(blocks.source)
    while first < len(model):
        group = model[first : first + streams_per_pass]
        if position:  # resumed inside this pass
            main = saves.tensor("main")  # [n, seqlen, hidden]
            streams = {i: saves.tensor(f"stream-{i}") for i in saved["streams"]}
        else:
            passes += 1
            main = embedded.clone()
            streams = {}
        for position, index, stored in blocks.stream(model, position, f"ppl pass {passes}"):
            if index in group:
                streams[index] = main.clone()
            layer = blocks.build(index, stored)
            del stored
            for skipped, stream in streams.items():
                if skipped != index:
                    blocks.forward(layer, index, stream)
                    check_activations_finite(stream, index, in_float32=IN_FLOAT32)
            if index < group[-1]:  # the main stream is only needed until the group's last block
                blocks.forward(layer, index, main)
            del layer
            data = {"first": first, "passes": passes, "streams_per_pass": streams_per_pass, "scores": scores,
                    "streams": list(streams)}  # fmt: skip
            tensors = {"main": main, **{f"stream-{i}": stream for i, stream in streams.items()}}
            saves.after_block("ppl", position + 1, data, tensors)
        del main
        # the head over every skip stream's tokens: minutes for a large vocabulary, so a bar of its own
        bar = blocks.head_bar(len(streams) * input_ids[:, 1:].numel(), f"ppl pass {passes}: LM head")
        for skipped, stream in streams.items():
            scores[skipped] = math.exp(mean_nll(stream, input_ids, head, bar))
        bar.close()
        del streams
        first, position = first + streams_per_pass, 0
        data = {"first": first, "passes": passes, "streams_per_pass": streams_per_pass, "scores": scores}
        saves.save("ppl", 0, data, {})
    return scores, passes


def score_blocks(
    config: DepthConfig, blocks: Blocks, model: list[int], input_ids, saves: ScoringSaves
) -> tuple[dict, int]:
    """(score per block of `model`, passes over the weights) for config.criterion."""
    if config.criterion == "magnitude":
        return block_magnitude_scores(blocks, model, saves), 1
    hidden = blocks.source.embed(input_ids)  # [n, seqlen, hidden]
    if config.criterion == "bi":
        return bi_scores(blocks, model, hidden, saves), 1
    if config.criterion == "taylor":
        return taylor_scores(blocks, model, hidden, input_ids, saves), 2
    per_pass = streams_per_pass(config, hidden, len(model))
    return ppl_scores(blocks, model, hidden, input_ids, per_pass, saves)


def streams_per_pass(config: DepthConfig, hidden: torch.Tensor, blocks: int) -> int:
    """Skip streams carried in one pass: --max-streams, else as many as half the free RAM holds
    beside the embedded tokens and the main stream."""
    if config.max_streams is not None:
        return min(config.max_streams, blocks)
    stream_bytes = hidden.numel() * hidden.element_size()
    free = available_ram_bytes()
    if free is None:
        return blocks
    return max(1, min(blocks, free // 2 // stream_bytes - 2))
