"""OWL, outlier-weighted layerwise sparsity: the hand-checked arithmetic, the streamed allocation
against the paper's whole-model procedure on the same ids, pruning with it, and its flags."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import TINY_FAMILIES, WIKITEXT, linears_per_block
from reference_owl import owl_reference
from reference_wanda import load_full_model, pruned_linear, wanda_reference
from test_pipeline import load_state, mask_agreement, run, saved_ids
from typer.testing import CliRunner

from streamprune.allocation import layer_outlier_ratio, owl_sparsities
from streamprune.cli import app
from streamprune.errors import UsageError



def test_owl_sparsities_golden():
    # ratios 1, 2, 3 scale to densities 0, 0.08, 0.16 (lambda 0.08), shifted to mean 0.5
    sparsities = owl_sparsities([1.0, 2.0, 3.0], 0.5, 0.08)
    assert sparsities == pytest.approx([0.58, 0.5, 0.42])
    assert owl_sparsities([0.7, 0.7], 0.6) == [0.6, 0.6]  # nothing to weigh: uniform


def test_outlier_ratio_golden_across_matrices():
    # mean of the ten scores 109 / 10 = 10.9; 5 x 10.9 = 54.5; only the 100 is above: 10%
    matrices = [torch.ones(3, 3), torch.tensor([[100.0]])]
    assert layer_outlier_ratio(lambda: iter(matrices), 5) == pytest.approx(10.0)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_streamed_owl_allocation_equals_the_papers_procedure(tiny_models, tmp_path, family):
    out = tmp_path / "out"
    record = run(tiny_models[family], out, method="wanda", allocation="owl", sparsity=0.6, batch_size=1)
    ratios, sparsities = owl_reference(load_full_model(tiny_models[family]), saved_ids(out), 0.6)
    allocation = record["allocation"]
    assert allocation["name"] == "owl" and allocation["m"] == 5.0 and allocation["lambda"] == 0.08
    assert allocation["outlier_ratios"] == pytest.approx(ratios, abs=1e-9)
    assert allocation["sparsities"] == pytest.approx(sparsities, abs=1e-9)
    assert sum(allocation["sparsities"]) / len(sparsities) == pytest.approx(0.6)
    assert max(sparsities) - min(sparsities) == pytest.approx(0.16)  # ratios of 3 layers differ here
    # pruned with them: the reference's Wanda with the per-layer ratios
    reference = wanda_reference(load_full_model(tiny_models[family]), saved_ids(out), layer_sparsities=sparsities)
    pruned = load_state(out)
    assert mask_agreement(pruned, reference) >= 0.999
    for index, sparsity in enumerate(sparsities):
        weights = [tensor for name, tensor in pruned.items() if pruned_linear(name) and f"layers.{index}." in name]
        assert len(weights) == linears_per_block(family)
        for weight in weights:
            assert ((weight == 0).sum(1) == int(weight.shape[1] * sparsity)).all()


@pytest.mark.parametrize("method", ["magnitude", "ria", "sparsegpt"])
def test_owl_works_with_every_method(tiny_llama, tmp_path, method):
    uniform = run(tiny_llama, tmp_path / "uniform", method=method, sparsity=0.6)
    owl = run(tiny_llama, tmp_path / "owl", method=method, allocation="owl", sparsity=0.6)
    achieved = [layer["sparsity"] for layer in owl["layers"]]
    assert achieved == pytest.approx(owl["allocation"]["sparsities"], abs=0.01)
    assert max(achieved) - min(achieved) > 0.1
    assert uniform["allocation"] == {"name": "uniform"}
    assert sum(achieved) / len(achieved) == pytest.approx(0.6, abs=0.01)


def test_owl_refuses_patterns_and_impossible_spans(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="an N:M pattern fixes"):
        run(tiny_llama, tmp_path / "a", allocation="owl", pattern="2:4")
    with pytest.raises(UsageError, match="outside \\(0, 1\\); lower --owl-lambda"):
        run(tiny_llama, tmp_path / "b", allocation="owl", sparsity=0.9)
    result = CliRunner().invoke(app, ["run", str(tiny_llama), "--out", str(tmp_path / "c"), "--allocation", "owls"])
    assert result.exit_code == 2 and "--allocation 'owls' is not one of: uniform, owl" in result.output
    assert not (tmp_path / "c").exists()


def test_owl_prints_its_allocation_and_the_plan_counts_its_pass(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tiny_llama), "--out", str(out), "--allocation", "owl",
                                      "--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    sparsities = json.loads((out / "streamprune.json").read_text())["allocation"]["sparsities"]
    assert "OWL layer sparsities (outlier ratio):" in result.output
    assert f"  0: {sparsities[0]:.3f} (" in result.output

    def plan(*flags):
        result = CliRunner().invoke(app, ["plan", "llama-70b", "--device", "rtx4090", "--json", *flags])
        assert result.exit_code == 0, result.output
        return json.loads(result.output)

    uniform, owl = plan(), plan("--allocation", "owl")
    layers_bytes = owl["layer_bytes"] * 80
    assert owl["bytes_read"] - uniform["bytes_read"] == layers_bytes  # every layer is read twice
    assert "outlier pass" in owl["ram_by_step"] and "outlier pass" not in uniform["ram_by_step"]
    assert owl["flops"] > uniform["flops"]
