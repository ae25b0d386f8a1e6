"""The taylor criterion, sum of |W * dL/dW| per block: a forward pass that keeps every block's
input, then a reverse pass that reloads the blocks last to first, carrying dL/dh back."""

from __future__ import annotations

import torch

from ..stream import check_activations_finite, load_head, token_logprobs
from .blocks import Blocks
from .config import IN_FLOAT32
from .saves import ScoringSaves


def taylor_scores(
    blocks: Blocks, model: list[int], hidden: torch.Tensor, input_ids: torch.Tensor, saves: ScoringSaves
) -> dict[int, float]:
    """Sum over each block's Linear weights of |W * dL/dW|, L the mean next-token loss.

    Forward: every block's input is kept (len(model) x n x seqlen x hidden on the CPU). Then the
    head's gradient dL/dh, and blocks last to first: rebuild, forward the kept input with autograd,
    backward the carried gradient; dL/dW accumulates over micro-batches; dL/dx is carried on.
    """
    backward_from, saved = saves.resume("taylor backward")
    if saved:  # resumed in the reverse pass: the inputs of the blocks not yet done, and dL/dh
        later = list(reversed(model))[backward_from:]
        inputs = {index: saves.tensor(f"input-{index}") for index in later}
        grad, scores = saves.tensor("grad"), saved["scores"]
    else:
        inputs = taylor_forward(blocks, model, hidden, saves)
        grad = head_gradient(blocks, hidden, input_ids)
        del hidden
        scores = {}
        save_taylor(saves, "taylor backward", 0, {"scores": scores}, {"grad": grad}, inputs, always=True)

    reverse = list(reversed(model))
    for position, index, stored in blocks.stream(reverse, backward_from, "taylor backward"):
        layer = blocks.build(index, stored)
        del stored
        scores[index] = block_taylor_score(blocks, layer, index, inputs.pop(index), grad)
        del layer
        save_taylor(saves, "taylor backward", position + 1, {"scores": scores}, {"grad": grad}, inputs)
    return scores


def taylor_forward(blocks: Blocks, model: list[int], hidden: torch.Tensor, saves: ScoringSaves) -> dict:
    """Every block's input kept, {block: [n, seqlen, hidden]}; `hidden` ends as the last block's output."""
    position, _ = saves.resume("taylor forward")
    inputs = {index: saves.tensor(f"input-{index}") for index in model[:position]}
    if position:
        saves.tensor("hidden", out=hidden)
    for position, index, stored in blocks.stream(model, position, "taylor forward"):
        inputs[index] = hidden.clone()
        blocks.forward(blocks.build(index, stored), index, hidden)
        del stored
        check_activations_finite(hidden, index, in_float32=IN_FLOAT32)
        save_taylor(saves, "taylor forward", position + 1, {}, {"hidden": hidden}, inputs)
    return inputs


def head_gradient(blocks: Blocks, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """dL/dh of the last block's output [n, seqlen, hidden]; L = sum of token losses / tokens, so
    samples add up."""
    device = blocks.runner.device
    tokens = input_ids.shape[0] * (input_ids.shape[1] - 1)
    bar = blocks.head_bar(tokens, "taylor: LM head gradient")
    head = load_head(blocks.source)
    grad = torch.zeros_like(hidden)
    for k in range(hidden.shape[0]):
        h = hidden[k, :-1].to(device).requires_grad_(True)
        loss = -token_logprobs(h, input_ids[k, 1:], head).sum() / tokens
        loss.backward()
        grad[k, :-1] = h.grad.to("cpu", grad.dtype)
        bar.update(input_ids.shape[1] - 1)
    bar.close()
    return grad


def block_taylor_score(blocks: Blocks, layer, index: int, x_all: torch.Tensor, grad: torch.Tensor) -> float:
    """Sum of |W * dL/dW| over the block's Linears, given its kept input x_all [n, seqlen, hidden] and
    dL/d(its output) `grad`, which becomes dL/d(its input) in place."""
    device, size = blocks.runner.device, blocks.batch_size
    for start in range(0, x_all.shape[0], size):
        x = x_all[start : start + size].to(device).requires_grad_(True)
        y = blocks.runner.forward(layer, index, x)
        y.backward(grad[start : start + size].to(device))
        grad[start : start + size].copy_(x.grad)  # no staging copy (stream.forward_batches)
    total = 0.0
    for local in blocks.runner.projections.names:
        weight = layer.get_submodule(local).weight
        total += float((weight.detach() * weight.grad).double().abs().sum())
    return total


def save_taylor(
    saves: ScoringSaves, phase: str, position: int, data: dict, carried: dict, inputs: dict, always=False
) -> None:
    """A taylor resume point: the carried tensor (hidden forward, dL/dh backward) and the kept block
    inputs still to be used, each input written once however many saves name it."""
    names = [f"input-{i}" for i in inputs]
    save = saves.save if always else saves.after_block
    save(phase, position, data, {**carried, **dict(zip(names, inputs.values()))}, unchanged=names)
