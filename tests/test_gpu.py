"""The CUDA path: same masks as on the CPU, peak VRAM recorded. Skipped without a GPU."""

import pytest
import torch
from test_pipeline import LINEARS, load_state, run

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_cuda_masks_match_cpu(tiny_llama, tmp_path, pattern):
    run(tiny_llama, tmp_path / "cpu", device="cpu", pattern=pattern, batch_size=1)
    record = run(tiny_llama, tmp_path / "gpu", device="cuda", pattern=pattern, batch_size=1)
    assert record["peak_vram_bytes"] > 0 and record["device"].startswith("cuda")
    cpu, gpu = load_state(tmp_path / "cpu"), load_state(tmp_path / "gpu")
    same = total = 0
    for name, tensor in cpu.items():
        if any(linear in name for linear in LINEARS):
            same += int(((tensor == 0) == (gpu[name] == 0)).sum())
            total += tensor.numel()
    assert same / total >= 0.999


def test_gpu_memory_limit_is_planned_and_refused_early(tiny_llama, tmp_path):
    from test_plan import FAST
    from typer.testing import CliRunner

    from streamprune.cli import app

    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tiny_llama), "--out", str(out), "--device", "cuda", *FAST,
                                      "--max-gpu-memory", "1KB"])  # fmt: skip
    assert result.exit_code == 4 and "GPU memory" in result.output and not out.exists(), result.output
    record = run(tiny_llama, tmp_path / "auto", device="cuda", batch_size=None)
    # auto: the most samples per micro-batch (at most 16) that the plan fits in the free GPU memory
    assert record["resolved"]["batch_size"] >= 1 and record["plan"]["peak_vram_bytes"] > 0


def test_moe_experts_in_ram_prune_as_on_the_gpu(tmp_path):
    """--expert-weights cpu (a MoE layer larger than the GPU): each expert visits the GPU while it
    computes; its statistic and pruning stay in RAM. Same masks as with the whole layer on the GPU,
    less GPU memory."""
    from conftest import make_tiny_model

    model = make_tiny_model(tmp_path / "mixtral", "mixtral")
    on_gpu = run(model, tmp_path / "gpu", device="cuda", expert_weights="gpu", batch_size=1)
    in_ram = run(model, tmp_path / "ram", device="cuda", expert_weights="cpu", batch_size=1)
    assert in_ram["plan"]["experts_in_ram"] and not on_gpu["plan"]["experts_in_ram"]
    assert in_ram["plan"]["peak_vram_bytes"] < on_gpu["plan"]["peak_vram_bytes"]
    gpu, ram = load_state(tmp_path / "gpu"), load_state(tmp_path / "ram")
    for part in (".experts.", "self_attn."):  # the experts', and the attention's from the next inputs
        names = [name for name in gpu if part in name and gpu[name].dim() == 2]  # their Linears
        same = sum(int(((gpu[name] == 0) == (ram[name] == 0)).sum()) for name in names)
        assert names and same / sum(gpu[name].numel() for name in names) >= 0.999, part


def test_moe_eval_with_experts_in_ram_equals_the_gpu_layer(tmp_path):
    from conftest import WIKITEXT, make_tiny_model

    from streamprune.evaluate import EvalConfig, evaluate

    model = make_tiny_model(tmp_path / "mixtral", "mixtral")
    ppl = {where: evaluate(EvalConfig(model=str(model), ppl=str(WIKITEXT), seqlen=64, limit=4, device="cuda",
                                      expert_weights=where, quiet=True))["perplexity"]["ppl"]
           for where in ("gpu", "cpu")}  # fmt: skip
    assert ppl["cpu"] == pytest.approx(ppl["gpu"], rel=1e-6)  # the same GPU arithmetic, weights moved
