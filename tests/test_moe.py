"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE) on tiny random checkpoints that
transformers itself wrote (per-expert tensors, as the hub stores them): streamed pruning equals a
whole-model reference that routes tokens as the model does, the stream equals the model's forward,
and the output keeps the source's layout and names."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner
from conftest import MOE_FAMILIES, WIKITEXT, attention, make_tiny_model, tree_digest
from reference_wanda import (
    capture_layer0_inputs, decoder, layer_outputs, load_full_model, prune_wanda_mask, wanda_metric,
)  # fmt: skip
from test_depth import calibration_ids, run_depth, whole_model, without_blocks
from test_evaluate import whole_model_ppl
from test_pipeline import load_state, run, saved_ids

from streamprune.cli import app
from streamprune.config import PruneConfig
from streamprune.evaluate import EvalConfig, evaluate
from streamprune.families import family_of
from streamprune.pipeline import prune


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe")
    return {family: make_tiny_model(root / family, family) for family in MOE_FAMILIES}


def family_entry(model_dir):
    return family_of(json.loads((model_dir / "config.json").read_text()))


def checkpoint_linears(model, model_dir) -> dict[str, torch.Tensor]:
    """The pruned Linears of the in-memory model (views) under their checkpoint names: attention
    and shared-expert Linears as they are, each routed expert's gate, up and down sliced out of
    transformers' stacked parameters."""
    family = family_entry(model_dir)
    names = family.experts
    linears = {}
    for index, layer in enumerate(decoder(model).layers):
        prefix = f"model.layers.{index}."
        for local in family.projections.names:
            linears[f"{prefix}{local}.weight"] = layer.get_submodule(local).weight.data
        experts = layer.mlp.experts
        intermediate = experts.down_proj.shape[2]
        for e in range(experts.gate_up_proj.shape[0]):
            expert = f"{prefix}{names.block}.experts.{e}."
            linears[f"{expert}{names.gate}.weight"] = experts.gate_up_proj.data[e, :intermediate]
            linears[f"{expert}{names.up}.weight"] = experts.gate_up_proj.data[e, intermediate:]
            linears[f"{expert}{names.down}.weight"] = experts.down_proj.data[e]
    return linears


@torch.no_grad()
def moe_wanda_reference(model, model_dir, input_ids, sparsity=0.5, prune_n=0, prune_m=0) -> set[str]:
    """prune_wanda on the whole model, one sample per forward, with the experts' statistics taken
    where the model's own forward routes each token: an expert's gate and up see the tokens whose
    top-k holds it, its down their act(gate) * up. Prunes `model` in place; returns the names of
    the expert Linears no token reached (pruned by |W| per row, as the issue asks)."""
    family = family_entry(model_dir)
    inps, kwargs_of = capture_layer0_inputs(model, input_ids)
    outs = torch.zeros_like(inps)
    never_routed = set()
    for index, (layer, kwargs) in enumerate(zip(decoder(model).layers, kwargs_of)):
        experts = layer.mlp.experts
        count, intermediate = experts.gate_up_proj.shape[0], experts.down_proj.shape[2]
        dense = {local: layer.get_submodule(local) for local in family.projections.names}
        scaler = {key: None for key in [*dense, *[(e, part) for e in range(count) for part in ("in", "down")]]}
        seen = dict.fromkeys(scaler, 0)

        def add(key, x):  # x [tokens, in]: one running-mean step, as WrappedGPT.add_batch
            x = x.t().float()
            scaler[key] = torch.zeros(x.shape[0]) if scaler[key] is None else scaler[key] * (seen[key] / (seen[key] + 1))
            seen[key] += 1
            scaler[key] += torch.norm(x, p=2, dim=1) ** 2 / seen[key]

        def observe_experts(_module, args):
            hidden, top_k_index = args[0], args[1]  # [tokens, hidden], [tokens, k]
            for e in range(count):
                tokens = (top_k_index == e).any(dim=1)
                if tokens.any():
                    x = hidden[tokens]
                    gate, up = (x @ experts.gate_up_proj[e].t()).chunk(2, dim=-1)
                    add((e, "in"), x)
                    add((e, "down"), experts.act_fn(gate) * up)

        handles = [experts.register_forward_pre_hook(observe_experts)]
        handles += [m.register_forward_hook(lambda _m, i, _o, k=k: add(k, i[0].reshape(-1, i[0].shape[-1])))
                    for k, m in dense.items()]  # fmt: skip
        for j in range(inps.shape[0]):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        for handle in handles:
            handle.remove()

        def prune_in_place(weight, key, name):
            if scaler[key] is None:
                never_routed.add(name)
                scores = weight.abs().float()
            else:
                scores = wanda_metric(weight, scaler[key])
            weight[prune_wanda_mask(scores, sparsity, prune_n, prune_m)] = 0

        for local, module in dense.items():
            prune_in_place(module.weight.data, local, local)
        for e in range(count):
            for rows, part in ((slice(0, intermediate), "gate"), (slice(intermediate, None), "up")):
                prune_in_place(experts.gate_up_proj.data[e, rows], (e, "in"), f"{index}.{e}.{part}")
            prune_in_place(experts.down_proj.data[e], (e, "down"), f"{index}.{e}.down")
        for j in range(inps.shape[0]):
            outs[j] = layer(inps[j].unsqueeze(0), **kwargs)[0]
        inps, outs = outs, inps
    return never_routed


@pytest.mark.parametrize("family", MOE_FAMILIES)
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_streamed_wanda_equals_whole_model_moe_reference(moe_models, tmp_path, family, pattern):
    source = moe_models[family]
    before = tree_digest(source)
    out = tmp_path / "out"
    record = run(source, out, pattern=pattern)
    pruned = load_state(out)
    assert pruned.keys() == load_state(source).keys()  # per-expert tensors, under the source's names

    reference = load_full_model(source)
    keep = (2, 4) if pattern else None
    moe_wanda_reference(reference, source, saved_ids(out), prune_n=2 if keep else 0, prune_m=4 if keep else 0)
    expected = checkpoint_linears(reference, source)
    same = sum(int(((pruned[name] == 0) == (weight == 0)).sum()) for name, weight in expected.items())
    assert same / sum(weight.numel() for weight in expected.values()) >= 0.999
    for name, weight in expected.items():
        zeros = pruned[name] == 0
        if keep:
            assert (zeros.view(weight.shape[0], -1, 4).sum(-1) == 2).all(), name
        else:
            assert (zeros.sum(1) == weight.shape[1] // 2).all(), name
    routers = [name for name in pruned if name.endswith(("mlp.gate.weight", "moe.gate.weight", "shared_expert_gate.weight"))]
    assert len(routers) == 3 * (2 if family == "qwen2-moe" else 1)
    for name in routers:  # routers stay dense
        assert torch.equal(pruned[name], load_state(source)[name]), name
    assert all(abs(layer["sparsity"] - 0.5) < 1e-9 for layer in record["layers"])
    assert tree_digest(source) == before


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_streamed_hidden_states_equal_full_moe_model(moe_models, tmp_path, family):
    source, seen = moe_models[family], {}
    config = PruneConfig.from_flags(model=str(source), out=tmp_path / "out", calib=str(WIKITEXT), nsamples=6, seqlen=48,
                         batch_size=4, propagate="dense", quiet=True)  # fmt: skip
    prune(config, observe=lambda index, hidden: seen.__setitem__(index, hidden.clone()))
    expected = layer_outputs(load_full_model(source), saved_ids(tmp_path / "out"))
    assert len(seen) == len(expected) == 3
    for index, want in enumerate(expected):
        torch.testing.assert_close(seen[index], want, rtol=1e-5, atol=1e-5, msg=f"layer {index}")


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_magnitude_prunes_every_expert_exactly(moe_models, tmp_path, family):
    out = tmp_path / "out"
    run(moe_models[family], out, method="magnitude", sparsity=0.3, calib="/nonexistent")  # calib unused
    source, pruned = load_state(moe_models[family]), load_state(out)
    linears = checkpoint_linears(load_full_model(moe_models[family]), moe_models[family])
    shared = 3 if family == "qwen2-moe" else 0
    assert len(linears) == 3 * (4 + shared + 8 * 3)  # q, k, v, o; the shared expert's 3; 8 experts' 3
    for name in linears:
        assert int((pruned[name] == 0).sum()) == int(pruned[name].numel() * 0.3), name
        magnitude = source[name].abs()
        assert magnitude[pruned[name] != 0].min() >= magnitude[pruned[name] == 0].max()


def test_experts_no_token_reaches_are_pruned_by_magnitude_and_named(moe_models, tmp_path):
    """2 calibration tokens, 2 experts each: at most 4 of the 8 experts of a block see a token."""
    source, out = moe_models["mixtral"], tmp_path / "out"
    record = run(source, out, nsamples=1, seqlen=2, batch_size=1)
    reference = load_full_model(source)
    never_routed = moe_wanda_reference(reference, source, saved_ids(out))
    pruned, before = load_state(out), load_state(source)
    for layer in record["layers"]:
        named = layer["uncalibrated"]
        assert len(named) >= 4 * 3 and len(named) % 3 == 0, named
        for local in named:  # the lowest |W| of each row went
            name = f"model.layers.{layer['layer']}.{local}.weight"
            magnitude, zeros = before[name].abs(), pruned[name] == 0
            assert (magnitude.masked_fill(zeros, float("inf")).min(1).values >= magnitude.masked_fill(~zeros, 0).max(1).values).all()
        experts = {local.split(".")[2] for local in named}
        assert {f"{layer['layer']}.{e}.down" for e in experts} <= never_routed
    expected = checkpoint_linears(reference, source)
    assert all(torch.equal(pruned[name] == 0, weight == 0) for name, weight in expected.items())


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_moe_eval_equals_whole_model_and_output_loads(moe_models, tmp_path, family):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = moe_models[family]
    results = evaluate(EvalConfig(model=str(source), ppl=str(WIKITEXT), seqlen=64, limit=4, batch_tokens=300, quiet=True))
    expected = whole_model_ppl(whole_model(source), AutoTokenizer.from_pretrained(source), 64, 4)
    assert results["perplexity"]["ppl"] == pytest.approx(expected, rel=1e-5)

    out = tmp_path / "out"
    run(source, out, sparsity=0.5)
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation=attention(out)).eval()
    for name, weight in checkpoint_linears(model, out).items():
        assert int((weight == 0).sum()) == weight.numel() // 2, name
    generated = model.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


@pytest.mark.parametrize("family", ["mixtral", "qwen2-moe"])
def test_depth_removes_moe_blocks_as_blocks(tmp_path, family):
    from transformers import AutoModelForCausalLM

    source = make_tiny_model(tmp_path / family, family, layers=6)
    out = tmp_path / "out"
    removed = run_depth(source, out, criterion="bi", remove=2)["removed"]
    shortened = AutoModelForCausalLM.from_pretrained(out, attn_implementation=attention(out)).eval()
    reference = whole_model(source)
    without_blocks(reference, removed)
    ids = calibration_ids(source, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(shortened(ids, use_cache=False).logits, reference(ids, use_cache=False).logits,
                                   rtol=0, atol=0)  # fmt: skip
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4
    assert load_state(out).keys() < load_state(source).keys()  # blocks renumbered, each in the source's layout


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_plan_counts_every_expert_of_a_block(moe_models, family):
    """plan.geometry.Geometry from config.json alone: the block's parameters and pruned weights, and one input
    site per statistic streamprune collects, as in the layer transformers builds."""
    from streamprune.plan.geometry import Geometry
    from streamprune.stream import open_source

    source = open_source(moe_models[family], torch.device("cpu"), "auto")
    geometry = Geometry.from_config(json.loads((moe_models[family] / "config.json").read_text()))
    layer = source.runner.skeleton(0)
    assert geometry.layer_params == sum(p.numel() for p in layer.parameters())  # q/k norms (Qwen3-MoE, OLMoE) too
    assert geometry.linear_params == sum(layer.get_submodule(n).weight.numel() for n in source.runner.projections.names)
    widths = {site: layer.get_submodule(linears[0]).in_features for site, linears in source.runner.projections.sites.items()}
    assert geometry.site_widths() == widths
    assert geometry.active_linear_params == geometry.linear_params - 6 * 3 * 64 * geometry.intermediate  # 2 of 8 run


def test_reconstruction_keeps_each_expert_sparse_and_heal_points_to_it(moe_models, tmp_path):
    from streamprune.errors import UsageError
    from streamprune.heal import HealConfig, heal

    source, out = moe_models["qwen3-moe"], tmp_path / "out"
    record = run(source, out, pattern="2:4", reconstruct=True, reconstruct_epochs=2)
    before, after = load_state(source), load_state(out)
    experts = [name for name in after if ".experts." in name]
    assert len(experts) == 3 * 8 * 3
    for name in experts:
        zeros = after[name] == 0
        assert (zeros.view(zeros.shape[0], -1, 4).sum(-1) == 2).all(), name
    changed = [name for name in experts if not torch.equal(after[name], before[name].masked_fill(after[name] == 0, 0))]
    assert changed  # the survivors of the routed experts were trained
    assert all(layer["reconstruction"]["loss_last_epoch"] < layer["reconstruction"]["loss_first_epoch"]
               for layer in record["layers"])  # fmt: skip
    with pytest.raises(UsageError, match="mixture-of-experts.*--reconstruct"):
        heal(HealConfig(model=str(source), out=tmp_path / "healed", steps=1))
    result = CliRunner().invoke(app, ["plan", "mixtral-8x7b", "--heal"])
    assert result.exit_code == 2 and "mixture-of-experts" in result.output and "--reconstruct" in result.output


def test_a_moe_layer_larger_than_the_gpu_keeps_its_experts_in_ram():
    """Mixtral-8x7B with SparseGPT on 8 GB of GPU memory: its layer (2.7 GiB of weights, 6.6 GiB of
    Hessians) does not fit with its experts on the GPU; auto keeps them in RAM, where the plan now
    counts their weights' compute copies, Hessians and pruning, and the GPU holds one expert."""
    from streamprune.plan.geometry import Geometry
    from streamprune.plan.memory import Settings, estimate, fit
    from streamprune.source import fetch_config

    limits = ["--device", "rtx4090", "--max-gpu-memory", "8GB", "--max-ram", "64GB", "--write-speed", "1GB", "--json"]
    args = ["plan", "mixtral-8x7b", "--method", "sparsegpt", *limits]
    auto = CliRunner().invoke(app, args)
    assert auto.exit_code == 0, auto.output
    chosen = json.loads(auto.output)
    assert chosen["experts_in_ram"] and chosen["settings"]["expert_weights"] == "cpu"
    on_gpu = CliRunner().invoke(app, [*args, "--expert-weights", "gpu"])
    assert on_gpu.exit_code == 4 and "add --expert-weights cpu" in on_gpu.output

    geometry = Geometry.from_config(fetch_config("mixtral-8x7b")[0])
    hidden, intermediate, experts = 4096, 14336, 8
    settings = dict(method="sparsegpt", device="cuda", stored_bytes=2, compute_bytes=2)
    gpu, cpu = estimate(geometry, Settings(**settings)), estimate(geometry, Settings(**settings, expert_weights="cpu"))
    one_expert = 3 * hidden * intermediate * 2
    hessians = experts * (hidden**2 + intermediate**2) * 4
    # the GPU gives up every expert's weights but the computing one's, and their Hessians
    assert gpu["peak_vram_bytes"] - cpu["peak_vram_bytes"] >= (experts - 1) * one_expert + hessians
    assert cpu["peak_vram_bytes"] < 8 * 10**9 < gpu["peak_vram_bytes"]
    # the RAM takes the Hessians (the weights are the read bf16 tensors themselves)
    assert cpu["ram_by_step"]["prune"] - gpu["ram_by_step"]["prune"] >= hessians
    # several processes: each one's share decides, and the run learns the choice
    from streamprune.plan.memory import shared

    wanda = Settings(method="wanda", device="cuda", expert_weights="auto", stored_bytes=2, compute_bytes=2)
    each, problems = shared(geometry, wanda, 2, None, 2 * 10**9)
    assert wanda.expert_weights == "cpu" and each["experts_in_ram"] and not problems
    # a dense model, or a CPU run, has nothing to move: auto stays put
    dense = Settings(method="wanda", device="cuda", expert_weights="auto")
    fit(Geometry.from_config(fetch_config("llama-70b")[0]), dense, None, 10**9)
    assert dense.expert_weights == "gpu"


def test_experts_in_ram_and_reconstruct_are_refused_together(moe_models, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(moe_models["mixtral"]), "--out", str(out), "--reconstruct",
                                      "--expert-weights", "cpu", "--calib", str(WIKITEXT)])  # fmt: skip
    assert result.exit_code == 2 and "--expert-weights cpu" in result.output and not out.exists(), result.output


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_the_time_probe_routes_tokens_to_every_expert(moe_models, family):
    """The plan's probe layer: constant weights would route every token to the same top-k experts
    (equal logits), and time only those; its router is random, so the probe runs them all."""
    from streamprune.plan.probes import probe_tensors
    from streamprune.stream import open_source

    runner = open_source(moe_models[family], torch.device("cpu"), "auto").runner
    layer = runner.build(0, probe_tensors(runner, torch.float32))
    ran = set()
    for name, module in layer.named_modules():
        if name.endswith(f".{runner.experts.gate}") and ".experts." in name:
            module.register_forward_hook(lambda module, args, out, name=name: ran.add(name))
    with torch.no_grad():
        # seeded, and enough tokens that a random router reaches each of 8 experts (64 unseeded missed one)
        tokens = torch.randn(1, 512, runner.config.hidden_size, generator=torch.Generator().manual_seed(0))
        runner.forward(layer, 0, tokens)
    assert len(ran) == 8  # every expert of the block computed
