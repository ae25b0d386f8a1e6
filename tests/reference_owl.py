"""OWL's allocation as the paper's code computes it (Yin et al. 2024, prune_wanda_outlier and
check_outlier_mean), on transformers' full in-memory model: the reference for streamprune's
outlier pass. A first pass with the dense stream: per layer, every Linear's Wanda metric
flattened and concatenated, the share above Hyper_m x its mean (in percent); then the ratios are
scaled to [0, 2 Lamda] and shifted to mean 1 - sparsity (numpy float64 in the original)."""

from __future__ import annotations

import numpy as np
import torch
from reference_wanda import capture_layer0_inputs, collect_scaler_rows, decoder


def check_outlier_mean(metric: torch.Tensor, threshold: float) -> float:
    max_shred = torch.mean(metric) * threshold
    return float((metric > max_shred).sum().item()) / metric.numel() * 100


@torch.no_grad()
def owl_reference(model, input_ids: torch.Tensor, sparsity: float, hyper_m: float = 5.0, lamda: float = 0.08):
    """(outlier ratios, layer sparsities) of `model` (left unchanged)."""
    inps, kwargs_of = capture_layer0_inputs(model, input_ids)
    outs = torch.zeros_like(inps)
    all_layer_ratio = []
    for layer, kwargs in zip(decoder(model).layers, kwargs_of):
        scaler = collect_scaler_rows(layer, inps, outs, kwargs)
        layer_wmetric = [
            torch.abs(module.weight.data) * torch.sqrt(scaler[name].reshape((1, -1)))
            for name, module in layer.named_modules()
            if isinstance(module, torch.nn.Linear)
        ]
        layer_wmetric = torch.cat([torch.flatten(x) for x in layer_wmetric])
        all_layer_ratio.append(check_outlier_mean(layer_wmetric, hyper_m))
        inps, outs = outs, inps
    ratios = np.array(all_layer_ratio)
    scaled = (ratios - ratios.min()) * (1 / (ratios.max() - ratios.min()) * lamda * 2)
    scaled = scaled - np.mean(scaled) + (1 - sparsity)
    return list(all_layer_ratio), [1 - density for density in scaled]
