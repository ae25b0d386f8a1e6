"""Block reconstruction: after a layer is pruned, its surviving weights are trained so that its
outputs on the pruned stream's inputs match the dense layer's outputs on the dense stream's inputs
(the idea of EBFT and of layer-wise distillation). One layer trains at a time, so the memory is one
layer's training state, whatever the depth. Every zero of the pruned layer stays exactly zero: the
gradients of pruned weights are masked, so Adam never moves them, and the result is re-masked."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .errors import UsageError
from .methods.masks import apply_mask


@dataclass(frozen=True)
class ReconstructSettings:
    # defaults: the best held-out error at a bounded cost a layer, among 2-8 epochs, lr 1e-4 to 3e-3
    # and batches of 1-4 on SmolLM2
    epochs: int = 4  # passes over the calibration samples
    lr: float = 1e-3  # Adam's learning rate
    batch_size: int = 1  # samples per optimizer step
    train_norms: bool = False  # also train the layer's RMSNorm weights
    optimizer: str = "adam"  # or "adam8bit": bitsandbytes' Adam, its two moments in 1 byte a value, not 4

    def as_record(self) -> dict:
        return {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "train_norms": self.train_norms,
                "optimizer": self.optimizer}  # fmt: skip


OPTIMIZERS = ("adam", "adam8bit")


def make_optimizer(name: str, parameters, lr: float) -> torch.optim.Optimizer:
    """torch's Adam, or bitsandbytes' 8-bit Adam (block-wise quantized moments: 2 bytes a weight
    instead of 8, what lets a 70B layer's training state fit a 24 GB GPU with room to spare)."""
    if name == "adam":
        return torch.optim.Adam(parameters, lr=lr)
    # bitsandbytes logs a warning about an optional CPU kernel package at import; not ours to show
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    try:
        import bitsandbytes
    except ImportError as err:
        raise UsageError(
            "--reconstruct-optimizer adam8bit needs bitsandbytes: pip install bitsandbytes (or use adam)"
        ) from err
    return bitsandbytes.optim.Adam8bit(parameters, lr=lr)


def trainable(layer: torch.nn.Module, linears: tuple[str, ...], train_norms: bool) -> dict[str, torch.nn.Parameter]:
    """The parameters that train (local name -> parameter): the pruned `linears`' weights, and the
    norms' with `train_norms`. Biases stay as they are."""
    names = [f"{linear}.weight" for linear in linears]
    if train_norms:
        names += [name for name, _ in layer.named_parameters() if "norm" in name]
    parameters = dict(layer.named_parameters())
    return {name: parameters[name] for name in names}


def reconstruct_layer(runner, layer: torch.nn.Module, index: int, inputs: torch.Tensor, targets: torch.Tensor,
                      settings: ReconstructSettings, seed: int) -> dict:  # fmt: skip
    """Train the pruned `layer` in place, in float32 on the compute device: minimise the mean squared
    error between layer(inputs) and `targets` (both [nsamples, seqlen, hidden], on the CPU or
    offloaded). Samples are visited in an order drawn from `seed` and the layer index, so that a
    resumed run trains exactly as an uninterrupted one. Returns the mean loss of the first and of
    the last epoch. The layer comes back in its own dtype, every pruned weight +0.0."""
    dtype = next(layer.parameters()).dtype
    layer.float()
    parameters = trainable(layer, runner.projections.names, settings.train_norms)
    linears = [name for name in parameters if name.removesuffix(".weight") in runner.projections.names]
    keep = {name: parameters[name].detach() != 0 for name in linears}  # [out, in] bool each
    for parameter in layer.parameters():
        parameter.requires_grad_(False)
    hooks = []
    for name, parameter in parameters.items():
        parameter.requires_grad_(True)
        if name in keep:
            hooks.append(parameter.register_hook(lambda grad, keep=keep[name]: grad * keep))
    optimizer = make_optimizer(settings.optimizer, list(parameters.values()), settings.lr)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + index)
    losses = []
    for _ in range(settings.epochs):
        order = torch.randperm(inputs.shape[0], generator=generator)
        total = 0.0
        for start in range(0, len(order), settings.batch_size):
            chosen = order[start : start + settings.batch_size]
            x = inputs[chosen].to(runner.device, torch.float32)
            y = targets[chosen].to(runner.device, torch.float32)
            loss = torch.nn.functional.mse_loss(runner.forward(layer, index, x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.detach().item() * len(chosen)
        losses.append(total / inputs.shape[0])
    del optimizer
    for hook in hooks:
        hook.remove()
    for name, parameter in parameters.items():
        parameter.requires_grad_(False)
        if name in keep:
            parameter.data = apply_mask(parameter.data, ~keep[name])
    layer.to(dtype)
    return {"loss_first_epoch": losses[0], "loss_last_epoch": losses[-1]}
