"""Pruning methods beyond Wanda, each against a whole-model implementation of its paper's procedure
on the same calibration ids, and each through run, plan and resume."""

from __future__ import annotations

import pytest
import torch
from conftest import C4, TINY_FAMILIES, WIKITEXT
from reference_wanda import load_full_model, pruned_linear, wanda_reference
from test_pipeline import load_state, mask_agreement, run, saved_ids
from typer.testing import CliRunner

from streamprune import PruneConfig, prune
from streamprune.cli import app
from streamprune.errors import UsageError
from streamprune.families import LayerRunner
from streamprune.methods import Target
from streamprune.methods.ria import RIA, ria_scores



def ria_metric(weight: torch.Tensor, scaler_row: torch.Tensor, a: float = 0.5) -> torch.Tensor:
    """RIA's W_metric as the paper's code writes it (relative importance in both directions, times
    the input norm to the a)."""
    W = weight.abs()
    return (W / W.sum(dim=0) + W / W.sum(dim=1).reshape(-1, 1)) * torch.sqrt(scaler_row.reshape((1, -1))) ** a


def test_ria_scores_golden():
    weight = torch.tensor([[1.0, -3.0], [-1.0, 1.0]])  # column sums 2, 4; row sums 4, 2
    sq_norm = torch.tensor([16.0, 1.0])  # ||X|| = 4, 1, to the 0.5: 2, 1
    expected = torch.tensor([[(1 / 2 + 1 / 4) * 2, (3 / 4 + 3 / 4) * 1], [(1 / 2 + 1 / 2) * 2, (1 / 4 + 1 / 2) * 1]])
    torch.testing.assert_close(ria_scores(weight, sq_norm), expected)
    # a row or column of zeros scores 0, not NaN
    assert torch.equal(ria_scores(torch.zeros(2, 3), torch.ones(3)), torch.zeros(2, 3))


def test_ria_differs_from_wanda_where_a_channel_dominates():
    # row 0: by Wanda, input 0 (|W| 2 x norm 1) outranks input 1 (|W| 1 x 1); RIA weighs each
    # weight by its share of its column, and column 0 is full of large weights
    weight = torch.tensor([[2.0, 1.0], [100.0, 0.1]])
    statistic = RIA.statistic(2, torch.device("cpu"))
    statistic.sq_norm, statistic.samples = torch.ones(2), 1
    mask = RIA().prune(weight, statistic, Target(sparsity=0.5)).mask
    assert mask[0].tolist() == [True, False]


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_streamed_ria_equals_whole_model_reference(tiny_models, tmp_path, family, pattern):
    out = tmp_path / "out"
    record = run(tiny_models[family], out, method="ria", pattern=pattern)
    assert record["method"] == {"name": "ria", "ria_alpha": 0.5}
    reference = load_full_model(tiny_models[family])
    keep = (2, 4) if pattern else None
    wanda_reference(reference, saved_ids(out), 0.5, 2 if keep else 0, 4 if keep else 0, metric=ria_metric)
    pruned = load_state(out)
    assert mask_agreement(pruned, reference) >= 0.999
    for name, tensor in pruned.items():
        if pruned_linear(name):
            zeros = tensor == 0
            if keep:
                assert (zeros.view(tensor.shape[0], -1, 4).sum(-1) == 2).all(), name
            else:
                assert (zeros.sum(1) == tensor.shape[1] // 2).all(), name


@pytest.mark.smollm2
@pytest.mark.parametrize("pattern", [None])  # 2:4 on the tiny fixtures above: CI time
def test_smollm2_ria_equals_whole_model_reference(smollm2, tmp_path, pattern):
    out = tmp_path / "out"
    config = PruneConfig.from_flags(model=str(smollm2), out=out, method="ria", pattern=pattern, calib=str(C4), nsamples=8,
                         seqlen=128, batch_size=1, quiet=True)  # fmt: skip
    prune(config)
    reference = load_full_model(smollm2)
    keep = (2, 4) if pattern else None
    wanda_reference(reference, saved_ids(out), 0.5, 2 if keep else 0, 4 if keep else 0, metric=ria_metric)
    agreement = mask_agreement(load_state(out), reference)
    print(f"SmolLM2 RIA {pattern or 'unstructured 50%'}: {agreement:.6%} of mask entries identical")
    assert agreement >= 0.999


@pytest.mark.parametrize("method", ["ria", "sparsegpt"])
def test_resumes_byte_identical_and_refuses_another_method(tiny_llama, tmp_path, monkeypatch, method):
    whole = tmp_path / "whole"
    run(tiny_llama, whole, method=method)
    real_forward, calls = LayerRunner.forward, []

    def forward_then_stop(self, *args):
        calls.append(1)
        if len(calls) == 9:  # inside layer 1's dense forward (8 samples, batch 3: 3 calls per pass)
            raise KeyboardInterrupt
        return real_forward(self, *args)

    monkeypatch.setattr(LayerRunner, "forward", forward_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_llama, tmp_path / "out", method=method, checkpoint_every=1)  # a resume point after layer 0
    monkeypatch.setattr(LayerRunner, "forward", real_forward)
    with pytest.raises(UsageError, match=rf'--method: the run in .* used "{method}", this command asks for "wanda"'):
        run(tiny_llama, tmp_path / "out", method="wanda")
    record = run(tiny_llama, tmp_path / "out", method=method)
    assert len(record["sessions"]) == 2 and record["sessions"][1]["from_layer"] == 1
    for name in ("model-00001-of-00001.safetensors", "model.safetensors.index.json"):
        assert (tmp_path / "out" / name).read_bytes() == (whole / name).read_bytes()


def test_plan_takes_every_registered_method():
    result = CliRunner().invoke(app, ["plan", "llama-70b", "--method", "ria", "--device", "rtx4090", "--json"])
    assert result.exit_code == 0, result.output
    ria = __import__("json").loads(result.output)
    wanda = __import__("json").loads(
        CliRunner().invoke(app, ["plan", "llama-70b", "--method", "wanda", "--device", "rtx4090", "--json"]).output
    )
    # RIA's scores hold two more float32 matrices than Wanda's while a Linear is pruned
    assert ria["peak_vram_bytes"] - wanda["peak_vram_bytes"] == 2 * 8192 * 28672 * 4
    result = CliRunner().invoke(app, ["plan", "llama-70b", "--method", "sparse"])
    assert result.exit_code == 2 and "wanda, magnitude, ria" in result.output
    assert "ria:" in CliRunner().invoke(app, ["run", "--help"]).output


@pytest.mark.parametrize("split", [1, 3, 5])
def test_statistics_merged_from_another_process(split):
    """A statistic of samples [0, split) merged with another process's of [split, 6): Wanda's (its
    shareable form keeps each sample's norms) is bit for bit the one of all six in order; SparseGPT's
    Hessian, a weighted sum, within float32 rounding."""
    from streamprune.methods.sparsegpt import Hessian
    from streamprune.methods.wanda import InputSqNorm

    torch.manual_seed(0)
    x = torch.randn(6, 16, 32) * torch.linspace(0.1, 10, 32)
    for statistic, exact in ((InputSqNorm, True), (Hessian, False)):
        whole, first, second = statistic(32, "cpu"), statistic(32, "cpu"), statistic.shareable()(32, "cpu")
        for sample in x:
            whole.add_batch(sample[None])
        for sample in x[:split]:
            first.add_batch(sample[None])
        for sample in x[split:]:
            second.add_batch(sample[None])
        first.merge(second)
        assert first.samples == whole.samples == 6
        if exact:
            assert torch.equal(first.sq_norm, whole.sq_norm)
        else:
            torch.testing.assert_close(first.H, whole.H, rtol=1e-5, atol=1e-5)
