"""One decoder layer of Llama-2-70B's geometry (hidden 8192, intermediate 28672, 64 heads, 8 KV
heads, random bf16 weights) pruned with Wanda on a GPU with 128 x 2048 calibration tokens, exactly as
the layer loop does it (the run's collect_statistics, prune_linears and forward_batches; the activation buffer
128 x 2048 x 8192 bf16 = 4 GiB in CPU RAM): peak VRAM and seconds per layer, extrapolated to 80
layers, beside `streamprune plan llama-70b`'s estimate for the same settings.

    python benchmarks/gpu_layer.py            # needs a CUDA GPU; ~2 minutes on an H100

Without a GPU it measures nothing and says so in RESULTS.md.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import conditions, write_section  # noqa: E402

from streamprune.families import FAMILIES, LayerRunner  # noqa: E402
from streamprune.methods import Target, method_named  # noqa: E402
from streamprune.pipeline import collect_statistics, prune_linears  # noqa: E402
from streamprune.plan import Geometry, Settings, estimate  # noqa: E402
from streamprune.source import ALIAS_CONFIGS  # noqa: E402
from streamprune.stream import forward_batches  # noqa: E402

CONFIG = ALIAS_CONFIGS["meta-llama/Llama-2-70b-hf"]
NSAMPLES, SEQLEN = 128, 2048
GIB = 2**30


def main() -> None:
    plan = estimate(Geometry.from_config(CONFIG), Settings(device="cuda", nsamples=NSAMPLES, seqlen=SEQLEN))
    header = [
        "## One Llama-2-70B layer on a GPU (Wanda 50%, bf16, 128 x 2048 calibration tokens)",
        "",
        "Command: `python benchmarks/gpu_layer.py`.",
        "",
        conditions(),
        "",
    ]
    if not torch.cuda.is_available():
        body = "\n".join(
            header
            + [
                "No GPU was lent to the session that ran this, so nothing was measured. For the record, the plan "
                f"(`streamprune plan llama-70b --device h100`, arithmetic, not a measurement) expects peak VRAM "
                f"{plan['peak_vram_bytes'] / GIB:.2f} GiB and peak RAM {plan['peak_ram_bytes'] / GIB:.2f} GiB "
                "plus the runtime.",
            ]
        )
        write_section("gpu-layer", body)
        return

    device = torch.device("cuda")
    config_dir = Path(tempfile.mkdtemp())
    (config_dir / "config.json").write_text(json.dumps({**CONFIG, "rms_norm_eps": 1e-5}))
    runner = LayerRunner(config_dir, FAMILIES["llama"], device, torch.bfloat16)
    torch.manual_seed(0)
    tensors = {
        name: (torch.randn(p.shape, dtype=torch.bfloat16) * 0.02 if p.dim() == 2 else torch.ones(p.shape))
        for name, p in runner.skeleton(0).state_dict().items()
    }
    hidden = torch.randn(NSAMPLES, SEQLEN, CONFIG["hidden_size"], dtype=torch.bfloat16).pin_memory()
    torch.cuda.reset_peak_memory_stats(device)
    torch.cuda.synchronize()
    started = time.perf_counter()
    method = method_named("wanda")
    with torch.no_grad():
        layer = runner.build(0, tensors)
        # the dense forward
        statistics = collect_statistics(method.statistic, runner, layer, 0, hidden, 1, write_back=False)
        for _ in prune_linears(method, layer, statistics, Target(sparsity=0.5), runner.projections):  # prune
            pass
        forward_batches(runner, layer, 0, hidden, 1, write_back=True)  # pruned forward
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device)
    body = "\n".join(
        header
        + [
            "| | measured | plan |",
            "|---|---:|---:|",
            f"| peak VRAM (torch allocated) | {peak / GIB:.2f} GiB | {plan['peak_vram_bytes'] / GIB:.2f} GiB |",
            f"| seconds per layer | {seconds:.1f} | |",
            f"| 80 layers (x80, compute only) | {80 * seconds / 60:.1f} min | |",
            "",
            f"Under 24 GB: **{'yes' if peak < 24 * 10**9 else 'no'}**. Random weights: the time is the real "
            "arithmetic; the masks mean nothing.",
        ]
    )
    write_section("gpu-layer", body)


if __name__ == "__main__":
    main()
