"""The published whole-model FLAP procedure (An et al. 2024, CASIA-IVA-Lab/FLAP `prune_flap`, the
uniform "UL-UM" structure) and its Wanda-sp baseline (`prune_wanda_sp`), re-implemented on
transformers' full in-memory model, as the reference streamprune width must match.

As published: statistics at the inputs of o_proj and down_proj, one sample per forward; FLAP's WIFV
metric (input variance x squared column norm), squared for attention and summed per head (here per
key-value group, the GQA form); its bias W[:, removed] @ mean(X[removed]); all of FLAP's statistics
from the dense model (`inps, outs = outs, inps` after the dense forward); Wanda-sp's running-mean
`scaler_row` in float32, (|W| x sqrt(scaler_row)).mean over rows, and the next layer's inputs from the
compressed layer. Differences: the counts removed are given (streamprune decides the head/channel
split), the variance is the exact one over all tokens in float64 (the published running update
aliases its old mean), ties go to the lower index, and a removed head is masked (its v rows zeroed,
as FLAP's `unstr` mode masks) rather than cut, which gives the same outputs wherever no norm spans
all heads.
"""

from __future__ import annotations

import torch
from reference_wanda import capture_layer0_inputs, decoder

O_PROJ, DOWN = "self_attn.o_proj", "mlp.down_proj"


def geometry(model) -> tuple[int, int, int, int]:
    """(heads, kv heads, head_dim, intermediate) of the model's language model."""
    config = model.config.get_text_config()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, config.num_key_value_heads or heads, head_dim, config.intermediate_size


def site_inputs(layer, inps: torch.Tensor, outs: torch.Tensor, kwargs: dict) -> dict[str, torch.Tensor]:
    """Every token's input of o_proj and down_proj, [tokens, in] float64, from one forward of the
    dense layer, one sample at a time (outputs into `outs`)."""
    seen = {O_PROJ: [], DOWN: []}
    handles = [
        layer.get_submodule(name).register_forward_hook(
            lambda _m, inp, _out, name=name: seen[name].append(inp[0].reshape(-1, inp[0].shape[-1]).double())
        )
        for name in seen
    ]
    for j in range(inps.shape[0]):
        outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
    for h in handles:
        h.remove()
    return {name: torch.cat(xs) for name, xs in seen.items()}


def lowest(scores: torch.Tensor, count: int) -> torch.Tensor:
    return torch.sort(scores, stable=True).indices[:count].sort().values


def mask_groups(layer, groups: torch.Tensor, group_heads: int, head_dim: int, kv_heads: int, heads: int) -> None:
    """Remove key-value groups the FLAP `unstr` way: their v rows zeroed (their heads then output 0)."""
    attn = layer.self_attn
    rows = (groups.unsqueeze(1) * head_dim + torch.arange(head_dim)).reshape(-1)
    v, rows = (
        (attn.qkv_proj, (heads + kv_heads) * head_dim + rows) if hasattr(attn, "qkv_proj") else (attn.v_proj, rows)
    )
    v.weight.data[rows] = 0  # Phi-3's qkv_proj: v after q and k
    if v.bias is not None:  # Qwen2's: a biased v would still give the head an output
        v.bias.data[rows] = 0


def mask_channels(layer, channels: torch.Tensor, intermediate: int) -> None:
    """Remove MLP channels by zeroing their up rows (act(gate) x 0 = 0)."""
    up, rows = (layer.mlp.gate_up_proj, intermediate + channels) if hasattr(layer.mlp, "gate_up_proj") else (
        layer.mlp.up_proj, channels)  # fmt: skip
    up.weight.data[rows] = 0  # Phi-3's gate_up_proj: up after gate
    if up.bias is not None:
        up.bias.data[rows] = 0


@torch.no_grad()
def flap_reference(model, input_ids: torch.Tensor, groups: int, channels: int, criterion: str = "flap") -> list[dict]:
    """Per layer: the removed key-value groups and MLP channels, and (flap) the compensation biases
    of o_proj and down_proj, float64. Masks the model in place (wanda-sp propagates through it)."""
    heads, kv_heads, head_dim, intermediate = geometry(model)
    group_heads = heads // kv_heads
    inps, kwargs_of = capture_layer0_inputs(model, input_ids)
    outs = torch.zeros_like(inps)
    result = []
    for layer, kwargs in zip(decoder(model).layers, kwargs_of):
        x = site_inputs(layer, inps, outs, kwargs)
        w_o, w_down = layer.get_submodule(O_PROJ).weight.data.double(), layer.get_submodule(DOWN).weight.data.double()
        if criterion == "flap":
            o_metric = (x[O_PROJ].var(0, correction=0) * w_o.pow(2).sum(0)) ** 2
            down_metric = x[DOWN].var(0, correction=0) * w_down.pow(2).sum(0)
        else:  # wanda-sp; ||X|| over all tokens (the published running mean of ||x||^2 is a constant times it)
            o_metric = (w_o.abs() * x[O_PROJ].square().sum(0).sqrt()).mean(0)
            down_metric = (w_down.abs() * x[DOWN].square().sum(0).sqrt()).mean(0)
        removed_groups = lowest(o_metric.reshape(-1, group_heads * head_dim).sum(1), groups)
        removed_channels = lowest(down_metric, channels)
        q_channels = (removed_groups.unsqueeze(1) * group_heads * head_dim
                      + torch.arange(group_heads * head_dim)).reshape(-1)  # fmt: skip
        entry = {"groups": removed_groups, "channels": removed_channels}
        if criterion == "flap":
            entry["o_bias"] = w_o[:, q_channels] @ x[O_PROJ].mean(0)[q_channels]
            entry["down_bias"] = w_down[:, removed_channels] @ x[DOWN].mean(0)[removed_channels]
        result.append(entry)
        if criterion != "flap":  # prune_wanda_sp compresses, then runs the layer again for the next inputs
            mask_groups(layer, removed_groups, group_heads, head_dim, kv_heads, heads)
            mask_channels(layer, removed_channels, intermediate)
            for j in range(inps.shape[0]):
                outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps
    return result
