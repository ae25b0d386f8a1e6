"""--allocation owl's first pass: each layer's outlier ratio over the dense stream (resumable),
turned into per-layer sparsities once per run (allocation.py holds the arithmetic)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from ..allocation import layer_outlier_ratio, owl_sparsities
from ..methods.wanda import InputSqNorm, wanda_scores
from ..plan import memory as plan
from ..stream import LayerReader, check_activations_finite
from .record import step
from .resume import IN_FLOAT32, StopOnInterrupt, resume_point


def allocate(loop, reader: LayerReader, stop: StopOnInterrupt) -> list[float]:
    """Every layer's sparsity, from outlier ratios measured in a first pass over all layers (the
    dense stream, resumable), once per run; printed and kept in the state. `loop`: the LayerLoop
    whose buffer the pass uses."""
    ctx = loop.ctx
    config, state = ctx.config, ctx.state
    if state.allocation is None or "sparsities" not in state.allocation:
        ratios = measure_outliers(loop, reader, stop, list((state.allocation or {}).get("outlier_ratios", [])))
        sparsities = owl_sparsities(ratios, config.method.sparsity, config.method.owl_lambda)
        state.allocation = {"outlier_ratios": ratios, "sparsities": sparsities}
        state.activations = None  # the dense stream's; the pruning pass starts from the embeddings
        state.save()
        state.drop_stale()
    if not ctx.job.quiet:
        print(allocation_table(state.allocation), file=sys.stderr)
    return state.allocation["sparsities"]


@step(plan.OUTLIER_PASS)
def measure_outliers(loop, reader: LayerReader, stop: StopOnInterrupt, ratios: list[float]) -> list[float]:
    """Each layer's outlier ratio of its Wanda scores, `ratios` holding those measured by an earlier
    session (whose saved activations are the next layer's inputs)."""
    ctx = loop.ctx
    config, state, out = ctx.config, ctx.state, ctx.job.out
    runner, num_layers, projections = ctx.job.source.runner, ctx.job.source.num_layers, ctx.job.projections
    loop.fill_buffer()  # the saved activations of the dense stream, or the embeddings
    last_saved, last_saved_at = len(ratios), time.perf_counter()
    bar = tqdm(desc="outliers (owl)", unit="layer", initial=len(ratios), total=num_layers, disable=ctx.job.quiet,
               dynamic_ncols=True)  # fmt: skip
    for index, stored in reader.layers(list(range(len(ratios), num_layers))):
        if stop.requested:
            stop.check_outliers(index, num_layers, out)
        ctx.job.source.check_layer_finite(index, stored, resume_point(out, 0))
        layer = runner.build(index, stored)
        statistics = loop.collect(InputSqNorm, layer, index, write_back=True)
        scores = lambda: (  # noqa: E731
            wanda_scores(layer.get_submodule(local).weight.detach(), statistics[projections.site_of(local)].sq_norm)
            for local in projections.names
        )
        ratios.append(layer_outlier_ratio(scores, config.method.owl_m))
        del stored, layer, statistics
        check_activations_finite(loop.hidden, index, resume_point(out, 0), IN_FLOAT32)
        bar.update()
        more = index + 1 < num_layers  # after the last one, the allocation is saved instead
        if more and (loop.resume.due(index, last_saved, last_saved_at) or stop.requested):
            state.allocation = {"outlier_ratios": list(ratios)}
            state.activations = state.save_activations(loop.hidden, index + 1, phase="owl")
            state.save()
            state.drop_stale()
            last_saved, last_saved_at = index + 1, time.perf_counter()
    bar.close()
    return ratios


def allocation_table(allocation: dict) -> str:
    """OWL's result, eight layers to a line: layer: sparsity (outlier ratio)."""
    cells = [
        f"{index:>3}: {sparsity:.3f} ({ratio:.2f}%)"
        for index, (sparsity, ratio) in enumerate(zip(allocation["sparsities"], allocation["outlier_ratios"]))
    ]
    lines = ["  ".join(cells[start : start + 8]) for start in range(0, len(cells), 8)]
    return "OWL layer sparsities (outlier ratio):\n" + "\n".join(lines)
