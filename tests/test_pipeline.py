"""End-to-end on tiny checkpoints: streamed pruning equals the whole-model Wanda reference, the
streamed hidden states equal the full model's, and the output is an ordinary checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import C4, TINY_FAMILIES, WIKITEXT, linears_per_block, make_tiny_model, tree_digest
from reference_wanda import (
    LINEARS, checkpoint_state, decoder, layer_outputs, load_full_model, pruned_linear, wanda_reference,
)  # fmt: skip
from safetensors import safe_open

from streamprune import PruneConfig, prune
from streamprune.families import FAMILIES



def load_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, read with the safetensors library (not streamprune's reader)."""
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(directory / file, "pt") as f:
            assert f.metadata() == {"format": "pt"}
            state.update({name: f.get_tensor(name) for name in f.keys()})
    assert set(state) == set(index["weight_map"])
    return state


def saved_ids(out: Path) -> torch.Tensor:
    return torch.tensor(json.loads((out / "streamprune_calibration.json").read_text())["input_ids"])


def run(model_dir: Path, out: Path, **kwargs) -> dict:
    options = dict(calib=str(WIKITEXT), nsamples=8, seqlen=48, batch_size=3, quiet=True)
    options.update(kwargs)
    return prune(PruneConfig.from_flags(model=str(model_dir), out=out, **options))


def mask_agreement(pruned: dict, reference_model) -> float:
    same = total = 0
    for name, tensor in checkpoint_state(reference_model).items():
        if pruned_linear(name):
            same += int(((pruned[name] == 0) == (tensor == 0)).sum())
            total += tensor.numel()
    return same / total


@pytest.mark.parametrize("family", TINY_FAMILIES)
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_streamed_wanda_equals_whole_model_reference(tiny_models, tmp_path, family, pattern):
    source = tiny_models[family]
    before = tree_digest(source)
    out = tmp_path / "out"
    record = run(source, out, pattern=pattern)
    pruned = load_state(out)

    reference = load_full_model(source)
    keep = (2, 4) if pattern else None
    wanda_reference(reference, saved_ids(out), sparsity=0.5, prune_n=2 if keep else 0, prune_m=4 if keep else 0)
    assert mask_agreement(pruned, reference) >= 0.999

    for name, tensor in pruned.items():
        if not pruned_linear(name):
            continue
        zeros = tensor == 0
        if keep:  # every group of 4 consecutive inputs has exactly 2 nonzeros
            assert (zeros.view(tensor.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:  # every row exactly at the target
            assert (zeros.sum(1) == int(tensor.shape[1] * 0.5)).all(), name
    assert all(abs(layer["sparsity"] - 0.5) < 1e-9 for layer in record["layers"])
    assert tree_digest(source) == before


@pytest.mark.parametrize("family", (*TINY_FAMILIES, "llama3.2"))
def test_streamed_hidden_states_equal_full_model(tiny_models, tmp_path, family):
    """With dense propagation the buffers after each layer are the dense model's hidden states:
    the proof that masks (causal and sliding), rotary embeddings (scaled too) and attention match."""
    source = tiny_models.get(family) or make_tiny_model(tmp_path / family, family)
    seen = {}
    config = PruneConfig.from_flags(
        model=str(source),
        out=tmp_path / "out",
        calib=str(WIKITEXT),
        nsamples=6,
        seqlen=48,
        batch_size=4,
        propagate="dense",
        quiet=True,
    )
    prune(config, observe=lambda index, hidden: seen.__setitem__(index, hidden.clone()))
    expected = layer_outputs(load_full_model(source), saved_ids(tmp_path / "out"))
    assert len(seen) == len(expected)
    for index, want in enumerate(expected):
        torch.testing.assert_close(seen[index], want, rtol=1e-5, atol=1e-5, msg=f"layer {index}")


def test_output_is_an_ordinary_checkpoint(tiny_llama, tmp_path):
    out = tmp_path / "out"
    run(tiny_llama, out, max_shard_size="40KB")
    source, pruned = load_state(tiny_llama), load_state(out)
    assert {n: (t.shape, t.dtype) for n, t in source.items()} == {n: (t.shape, t.dtype) for n, t in pruned.items()}
    for name, tensor in pruned.items():
        if not name.endswith(".weight") or not any(linear in name for linear in LINEARS):
            assert torch.equal(tensor, source[name]), f"{name} was not copied unchanged"
        assert not torch.signbit(tensor[tensor == 0]).any(), f"{name} has -0.0"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1
    for file in files:  # within the limit, unless one tensor alone is larger (then it is alone)
        holds = [n for n, f in index["weight_map"].items() if f == file]
        assert (out / file).stat().st_size <= 40_000 or len(holds) == 1, (file, holds)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in pruned.values())
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (tiny_llama / name).read_bytes()
    assert not list(out.glob(".*"))  # no temporary files left

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, pruned[name]), name
    record = json.loads((out / "streamprune.json").read_text())
    assert record["calibration"]["nsamples"] == 8 and record["calibration"]["seqlen"] == 48
    assert len(record["layers"]) == 3 and record["peak_rss_bytes"] > 0


def test_bfloat16_checkpoint_keeps_dtype_and_unpruned_bits(tmp_path):
    from conftest import make_tiny_model

    source = make_tiny_model(tmp_path / "bf16", "llama", layers=2, dtype=torch.bfloat16)
    out = tmp_path / "out"
    record = run(source, out, calib=str(C4), nsamples=4, seqlen=32)
    assert record["compute_dtype"] == "bfloat16"
    before, after = load_state(source), load_state(out)
    for name, tensor in after.items():
        assert tensor.dtype == torch.bfloat16
        kept = tensor != 0
        assert torch.equal(tensor[kept], before[name][kept])  # surviving weights bit-identical


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_magnitude_prunes_exact_count_per_matrix_without_calibration(tiny_models, tmp_path, family):
    out = tmp_path / "out"
    record = run(tiny_models[family], out, method="magnitude", sparsity=0.3, calib="/nonexistent")  # calib unused
    assert record["calibration"] is None and not (out / "streamprune_calibration.json").exists()
    source, pruned = load_state(tiny_models[family]), load_state(out)
    weights = {n: t for n, t in pruned.items() if pruned_linear(n)}
    assert len(weights) == linears_per_block(family) * 3  # every Linear of the 3 layers (biases, as Qwen2's, are kept)
    for name, tensor in weights.items():
        assert int((tensor == 0).sum()) == int(tensor.numel() * 0.3), name
        # exactly the smallest |W| are gone: every survivor is at least as large as every pruned weight
        magnitude = source[name].abs()
        assert magnitude[tensor != 0].min() >= magnitude[tensor == 0].max()


def test_wanda_4_8_and_unstructured_ratio(tiny_llama, tmp_path):
    out = tmp_path / "out"
    run(tiny_llama, out, pattern="4:8")
    for name, tensor in load_state(out).items():
        if any(linear in name for linear in LINEARS):
            assert ((tensor != 0).view(tensor.shape[0], -1, 8).sum(-1) == 4).all()
    out2 = tmp_path / "out2"
    run(tiny_llama, out2, sparsity=0.7)
    for name, tensor in load_state(out2).items():
        if any(linear in name for linear in LINEARS):
            assert ((tensor == 0).sum(1) == math.floor(tensor.shape[1] * 0.7)).all()


def test_linears_are_all_the_linears(tiny_models):
    """streamprune's list of prunable Linears is every nn.Linear of a block, in every family."""
    for source in tiny_models.values():
        model = load_full_model(source)
        layer = decoder(model).layers[0]
        projections = FAMILIES[model.config.get_text_config().model_type].projections
        assert sorted(n for n, m in layer.named_modules() if isinstance(m, torch.nn.Linear)) == sorted(projections.names)
