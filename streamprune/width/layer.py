"""One layer of `streamprune width`: its statistics from the calibration stream, the heads and
channels it loses, its narrowed tensors (with FLAP's compensation) to the writer, and the next
layer's inputs left in the buffer."""

from __future__ import annotations

import time

import torch

from ..pipeline.layers import collect_statistics
from ..stream import Source, forward_batches
from ..writer import CheckpointWriter
from .scores import InputMoments, channel_scores, compensation, expand, group_scores, kept, lowest
from .shapes import narrowed_tensors

SITES = ("o_proj input", "down_proj input")
OUTPUT_LINEARS = {"attention": "self_attn.o_proj", "mlp": "mlp.down_proj"}


def choose(criterion: str, layer: torch.nn.Module, moments: dict | None, geometry, cut) -> dict[str, torch.Tensor]:
    """The removed key-value groups and MLP channels of one (dense) layer, ascending."""
    statistic = (lambda site: None) if moments is None else moments.__getitem__
    o_scores = channel_scores(criterion, layer.get_submodule("self_attn.o_proj").weight.data, statistic(SITES[0]))
    down_scores = channel_scores(criterion, layer.get_submodule("mlp.down_proj").weight.data, statistic(SITES[1]))
    groups = group_scores(criterion, o_scores, geometry.group_heads * geometry.head_dim)
    return {"groups": lowest(groups, cut.groups), "channels": lowest(down_scores, cut.channels)}


def compensated(narrowed: dict, layer: torch.nn.Module, moments: dict, removed: dict, plan) -> dict:
    """FLAP's bias compensation where the family's config can carry it: each output Linear's bias
    gains what its removed inputs added on average."""
    sites = {"attention": (SITES[0], removed["q_channels"]), "mlp": (SITES[1], removed["channels"])}
    for site, (statistic, channels) in sites.items():
        if not plan.compensate[site]:
            continue
        linear = OUTPUT_LINEARS[site]
        extra = compensation(layer.get_submodule(linear).weight.data, moments[statistic].mean, channels)
        weight = narrowed[linear + ".weight"]
        old = narrowed.get(linear + ".bias")
        bias = extra.cpu() if old is None else old.double() + extra.cpu()
        narrowed[linear + ".bias"] = bias.to(weight.dtype)
    return narrowed


def narrow_layer(config, source: Source, plan, index: int, stored: dict, hidden: torch.Tensor | None,
                 writer: CheckpointWriter) -> dict:  # fmt: skip
    """Layer `index` (its tensors `stored`, local name -> tensor) narrowed and written; `hidden`, the
    calibration buffer, becomes the next layer's inputs. Returns the layer's log."""
    started, g, cut = time.perf_counter(), plan.geometry, plan.cut
    layer = source.runner.build(index, stored)
    moments = None
    if hidden is not None:  # flap propagates the dense layer's outputs: this forward writes them
        moments = collect_statistics(InputMoments, source.runner, layer, index, hidden, config.batch_size,
                                     write_back=config.criterion == "flap", sites=SITES)  # fmt: skip
    removed = choose(config.criterion, layer, moments, g, cut)
    removed["q_channels"] = expand(removed["groups"], g.group_heads * g.head_dim)
    keep = {
        "q": kept(g.heads * g.head_dim, removed["q_channels"]),
        "kv": kept(g.kv_heads * g.head_dim, expand(removed["groups"], g.head_dim)),
        "mlp": kept(g.intermediate, removed["channels"]),
    }
    narrowed = narrowed_tensors(stored, g, keep["q"], keep["kv"], keep["mlp"])
    if moments is not None:
        narrowed = compensated(narrowed, layer, moments, removed, plan)
    del layer
    for local, shape in plan.new_shapes.items():  # biases the narrowed config adds (q/k/v, gate/up): zeros
        if local not in narrowed:
            dtype = narrowed[source.runner.projections.names[0] + ".weight"].dtype
            narrowed[local] = torch.zeros(shape, dtype=dtype)
    prefix = source.names.layer(index)
    for local in sorted(narrowed):
        writer.write(prefix + local, narrowed[local])
    if hidden is not None and config.criterion != "flap":  # wanda-sp: the narrowed layer's outputs go on
        forward_batches(plan.runner, plan.runner.build(index, narrowed), index, hidden, config.batch_size,
                        write_back=True)  # fmt: skip
    heads = expand(removed["groups"], g.group_heads)
    return {"layer": index, "removed_kv_groups": removed["groups"].tolist(), "removed_heads": heads.tolist(),
            "removed_channels": removed["channels"].tolist(), "seconds": time.perf_counter() - started}  # fmt: skip
