"""streamprune heal: LoRA on a frozen base (NF4/int8 through bitsandbytes, bf16, fp32), merged
through the masks. Every zero stays zero; the model trained is the model written; the NF4 forward
is the dequantized base's; a kill -9 resumes bit for bit; settings are checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import C4, ROOT, make_tiny_model, tree_digest
from reference_wanda import LINEARS
from test_pipeline import load_state, run
from transformers import AutoModelForCausalLM

from streamprune.errors import UsageError
from streamprune.heal import HealConfig, add_adapters, heal, load_base, masked_delta, write_merged
from streamprune.stream import open_source

TRAIN = dict(data=str(C4), steps=6, batch_size=2, seqlen=64, lr=3e-3, checkpoint_every=2, quiet=True)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny tied-embedding Llama pruned 2:4 by Wanda: (source, pruned)."""
    root = tmp_path_factory.mktemp("heal")
    source = make_tiny_model(root / "dense", "llama-tied")
    run(source, root / "pruned", method="wanda", pattern="2:4")
    return source, root / "pruned"


def projections(state: dict) -> dict[str, torch.Tensor]:
    return {n: t for n, t in state.items() if n.endswith(tuple(f"{linear}.weight" for linear in LINEARS))}


@pytest.mark.parametrize("base", ["fp32", "nf4", "int8", "bf16"])
def test_healing_keeps_every_zero_and_loads_in_transformers(pruned, tmp_path, base):
    _, model = pruned
    before = tree_digest(model)
    record = heal(HealConfig(model=str(model), out=tmp_path / "out", base=base, **TRAIN))
    assert tree_digest(model) == before  # the source is only read
    old, new = load_state(model), load_state(tmp_path / "out")
    assert set(old) == set(new)
    for name, weight in new.items():
        assert weight.dtype == old[name].dtype, name
        if name not in projections(old):
            assert torch.equal(weight, old[name]), name  # embeddings and norms are not trained
            continue
        assert torch.equal(weight == 0, old[name] == 0), name  # no zero filled, none added
        assert weight[weight == 0].signbit().sum() == 0, name  # +0.0
        assert ((weight != 0).view(weight.shape[0], -1, 4).sum(-1) == 2).all(), name  # 2:4 intact
        assert not torch.equal(weight, old[name]), name  # the survivors moved
    assert record["last_loss"] < record["first_loss"]
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    assert not (tmp_path / "out" / ".heal").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    generated = loaded.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 7)


def trained_looking(adapters: dict) -> None:
    """Give B nonzero values (peft starts it at zero), so that every delta shows."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, parameter in adapters.items():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)


def test_a_model_without_zeros_is_healed_as_dense_and_says_so(pruned, tmp_path):
    dense, _ = pruned
    args = [sys.executable, "-m", "streamprune", "heal", str(dense), "--out", str(tmp_path / "out"), "--data", str(C4),
            "--steps", "2", "--batch-size", "1", "--seqlen", "64"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "no zero weights" in done.stderr and "healing it as a dense model" in done.stderr
    assert "healed as a dense model" in done.stdout
    assert json.loads((tmp_path / "out" / "streamprune.json").read_text())["source_zero_weights"] == 0


def test_the_model_written_is_the_model_trained(pruned, tmp_path):
    """fp32 base: the in-memory model with its masked adapters and the merged checkpoint give the
    same logits, and each merged projection is exactly source + keep x (B A) x scaling."""
    _, model = pruned
    config = HealConfig(model=str(model), out=tmp_path / "out", base="fp32", **TRAIN)
    source = open_source(str(model), torch.device("cpu"), "float32")
    base, keep = load_base(source, config)
    peft_model, adapters = add_adapters(base, keep, config)
    trained_looking(adapters)
    ids = torch.randint(0, 512, (2, 40))
    peft_model.eval()
    with torch.no_grad():
        expected = peft_model(input_ids=ids).logits
    (tmp_path / "out").mkdir()
    write_merged(config, source, base, keep)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    name = "model.layers.1.mlp.down_proj"
    lora = base.get_submodule(name)
    weight = load_state(model)[f"{name}.weight"]
    delta = (lora.lora_B["default"].weight @ lora.lora_A["default"].weight) * lora.scaling["default"]
    assert torch.equal(masked_delta(lora), torch.where(weight != 0, delta, torch.zeros(())))
    assert masked_delta(lora)[weight == 0].abs().sum() == 0 and delta[weight == 0].abs().sum() > 0


@pytest.mark.parametrize("kind", ["qwen2", "width"])
def test_projections_with_a_bias_train_and_merge_with_it(tiny_models, tmp_path, kind):
    """Qwen2's q/k/v and a width-pruned model's compensation carry biases: before training the model
    in memory is the source (its biases in use), and the merged checkpoint is the model trained."""
    from typer.testing import CliRunner

    from streamprune.cli import app

    model = tiny_models["qwen2"]
    if kind == "width":
        model = tmp_path / "narrow"
        args = ["width", str(tiny_models["llama"]), "--out", str(model), "--ratio", "0.2", "--criterion", "flap",
                "--calib", str(C4), "--nsamples", "4", "--seqlen", "32", "--quiet"]  # fmt: skip
        assert CliRunner().invoke(app, args).exit_code == 0
    assert any(name.endswith("proj.bias") for name in load_state(model))
    config = HealConfig(model=str(model), out=tmp_path / "out", base="fp32", **TRAIN)
    source = open_source(str(model), torch.device("cpu"), "float32")
    base, keep = load_base(source, config)
    peft_model, adapters = add_adapters(base, keep, config)
    peft_model.eval()
    ids = torch.randint(0, 512, (2, 40))
    reference = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(peft_model(input_ids=ids).logits, reference(input_ids=ids).logits)
        trained_looking(adapters)
        expected = peft_model(input_ids=ids).logits
    (tmp_path / "out").mkdir()
    write_merged(config, source, base, keep)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("base", ["nf4", "int8"])
def test_quantized_base_forward_equals_the_dequantized_base(pruned, tmp_path, base):
    """The QLoRA model's logits equal those of the plain model whose projections are the
    dequantized base plus the masked delta (int8: bitsandbytes' own matmul, a looser tolerance)."""
    import bitsandbytes.functional as bnbf

    _, model = pruned
    config = HealConfig(model=str(model), out=tmp_path / "out", base=base, **TRAIN)
    source = open_source(str(model), torch.device("cpu"), "float32")
    quantized, keep = load_base(source, config)
    peft_model, adapters = add_adapters(quantized, keep, config)
    trained_looking(adapters)
    plain = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    zeros = 0
    with torch.no_grad():
        for name in keep:
            linear = quantized.get_submodule(name)
            weight = linear.base_layer.weight
            if base == "nf4":
                dequantized = bnbf.dequantize_4bit(weight.data, weight.quant_state)
            else:
                dequantized = weight.data.float() * weight.SCB.float().unsqueeze(1) / 127
            source_weight = plain.get_submodule(name).weight
            assert (dequantized[source_weight == 0] == 0).all(), name  # every zero is a zero of the base
            zeros += int((dequantized == 0).sum())
            plain.get_submodule(name).weight.copy_(dequantized + masked_delta(linear))
        ids = torch.randint(0, 512, (2, 40))
        peft_model.eval()
        tolerance = 1e-4 if base == "nf4" else 3e-2
        torch.testing.assert_close(peft_model(input_ids=ids).logits, plain(input_ids=ids).logits,
                                   rtol=tolerance, atol=tolerance)  # fmt: skip
    assert zeros > 0


def crash_heal(tmp_path, model, out, event=None, n=0, action=None) -> tuple[dict, str, dict]:
    """`streamprune heal` in a child of tests/crash_run.py, crashed at the n-th `event`."""
    args = [str(model), "--out", str(out), "--data", str(C4), "--steps", "6", "--batch-size", "2", "--seqlen", "64",
            "--lr", "3e-3", "--checkpoint-every", "2", "--base", "nf4", "--quiet"]  # fmt: skip
    log, counts = tmp_path / f"{out.name}-{n}.log", tmp_path / f"{out.name}-{n}.counts"
    job = {"command": "heal", "args": args, "log": str(log), "counts": str(counts), "event": event, "n": n,
           "action": action}  # fmt: skip
    process = subprocess.run([sys.executable, str(ROOT / "tests" / "crash_run.py")], input=json.dumps(job) + "\n",
                             capture_output=True, text=True, cwd=tmp_path, timeout=600)  # fmt: skip
    ended = json.loads(process.stdout.splitlines()[-1])
    return ended, log.read_text(), json.loads(counts.read_text()) if counts.exists() else {}


def test_a_killed_heal_resumes_to_the_same_bytes(pruned, tmp_path):
    _, model = pruned
    ended, log, counts = crash_heal(tmp_path, model, tmp_path / "whole")
    assert ended == {"exit": 0}, log
    # renames: the state after steps 2 and 4, then the shards, the support files and the record
    ended, log, _ = crash_heal(tmp_path, model, tmp_path / "killed", event="replace", n=2, action="kill")
    assert ended == {"signal": 9}, log
    state = torch.load(tmp_path / "killed" / ".heal" / "state.pt", weights_only=True)
    assert state["step"] == 2  # killed while saving step 4's state
    ended, log, _ = crash_heal(tmp_path, model, tmp_path / "killed")
    assert ended == {"exit": 0}, log
    whole, resumed = tree_digest(tmp_path / "whole"), tree_digest(tmp_path / "killed")
    for name in ("streamprune.json", ".streamprune.lock"):
        whole.pop(name, None), resumed.pop(name, None)
    assert resumed == whole
    records = [json.loads((tmp_path / d / "streamprune.json").read_text()) for d in ("whole", "killed")]
    assert records[1]["resumed_from_step"] == 2 and records[1]["losses"] == records[0]["losses"]
    assert counts["replace"] > 2


def test_a_different_setting_is_refused_when_resuming(pruned, tmp_path):
    _, model = pruned
    ended, log, _ = crash_heal(tmp_path, model, tmp_path / "out", event="replace", n=2, action="kill")
    assert ended == {"signal": 9}, log
    with pytest.raises(UsageError, match="--lr|lr"):
        heal(HealConfig(model=str(model), out=tmp_path / "out", base="nf4", **{**TRAIN, "lr": 1e-3}))
    with pytest.raises(UsageError, match="--base"):
        HealConfig(model=str(model), out=tmp_path / "x", base="nf3")
    with pytest.raises(UsageError, match="--steps"):
        HealConfig(model=str(model), out=tmp_path / "x", steps=0)


def test_a_vision_language_checkpoint_is_refused_with_the_way_that_works(tiny_models, tmp_path):
    with pytest.raises(UsageError, match="vision-language.*--reconstruct"):
        heal(HealConfig(model=str(tiny_models["gemma3-vl"]), out=tmp_path / "out", **TRAIN))
    assert not (tmp_path / "out").exists()


def test_the_plan_says_whether_healing_fits_and_points_70b_to_block_reconstruction():
    from typer.testing import CliRunner

    from streamprune.cli import app

    runner = CliRunner()
    big = runner.invoke(app, ["plan", "llama-70b", "--heal", "--device", "rtx4090", "--json"])
    assert big.exit_code == 4, big.output
    numbers = json.loads(big.output)
    assert not numbers["fits"] and numbers["base"] == "nf4"
    assert numbers["parts"]["frozen base"] > 24 * 10**9  # 69B projection weights at 4.06 bits
    assert "streamprune run MODEL --reconstruct" in numbers["problems"][0]
    small = runner.invoke(app, ["plan", "qwen3-8b", "--heal", "--device", "rtx4090", "--json"])
    assert small.exit_code == 0, small.output
    numbers = json.loads(small.output)
    assert numbers["fits"] and numbers["peak_bytes"] < 24 * 10**9
    fp32 = runner.invoke(app, ["plan", "qwen3-8b", "--heal", "--device", "rtx4090", "--base", "fp32", "--json"])
    assert fp32.exit_code == 4 and "--base nf4" in json.loads(fp32.output)["problems"][0]
    bad = runner.invoke(app, ["plan", "qwen3-8b", "--heal", "--base", "nf3"])
    assert bad.exit_code == 2 and "--base" in bad.output


def test_a_heal_short_of_disk_is_refused_before_it_trains(pruned, tmp_path, monkeypatch):
    """The whole output (merged checkpoint, the files beside it, adapters and their training state)
    is checked before the first step, not after the training."""
    import shutil

    import streamprune.heal

    _, model = pruned
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=50_000))
    trained = []
    monkeypatch.setattr(streamprune.heal, "train", lambda *args: trained.append(1))
    with pytest.raises(Exception, match="not enough disk space.*adapters and training state") as refused:
        heal(HealConfig(model=str(model), out=tmp_path / "out", **TRAIN))
    assert refused.value.exit_code == 4 and not trained


def test_a_resumed_heal_counts_what_its_last_attempt_already_wrote(pruned, tmp_path):
    """A heal stopped by a full disk while merging left shards behind: the next attempt replaces
    them, so they count as room (its partial shard whole; complete ones but the largest)."""
    from streamprune.heal import merged_bytes_needed, merged_writer

    source, out = open_source(str(pruned[1]), torch.device("cpu"), "auto"), tmp_path / "out"
    out.mkdir()
    config = HealConfig(model=str(pruned[1]), out=out, max_shard_size="100KB", **TRAIN)
    writer = merged_writer(config, source)
    assert len(writer.files) >= 3
    fresh = merged_bytes_needed(config, source, writer)["output checkpoint"]
    assert fresh == writer.total_bytes
    (out / writer.files[0]).write_bytes(b"x" * 90_000)
    (out / writer.files[1]).write_bytes(b"x" * 80_000)
    (out / f".{writer.files[2]}.partial").write_bytes(b"x" * 1_000)
    largest = max(8 + len(shard.header()) + shard.data_bytes for shard in writer.shards)
    expected = writer.total_bytes - 1_000 - max(0, 170_000 - largest)
    assert merged_bytes_needed(config, source, writer)["output checkpoint"] == expected < fresh
