"""Width pruning: on every tiny family the streamed choice of heads and channels (and FLAP's bias
compensation) equals the whole-model reference, the output is an ordinary narrower checkpoint that
transformers loads and generates with, the share of block parameters removed is --ratio, and a run
killed anywhere resumes to the same bytes."""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT, TINY_FAMILIES, WIKITEXT, make_tiny_model, tree_digest
from reference_flap import flap_reference
from reference_wanda import load_full_model
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from streamprune.cli import app
from streamprune.errors import UsageError
from streamprune.families import tensor_names
from streamprune.width import WidthConfig, width
from streamprune.width.scores import InputMoments, channel_scores, compensation, group_scores, lowest

CALIBRATION = {"calib": str(WIKITEXT), "nsamples": 8, "seqlen": 48, "batch_size": 3, "quiet": True}
# heads of the tiny fixtures come in two key-value groups: half the removal from attention takes one
SHARE = 0.5
# Qwen3's fixture has head_dim 32: one group is a quarter of a block, more than 20% of it
RATIOS = {"qwen3": 0.3}


def load_state(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    state = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(directory / file, "pt") as f:
            state.update({name: f.get_tensor(name) for name in f.keys()})  # noqa: SIM118 (safe_open is no mapping)
    return state


def layer_prefix(directory: Path, state: dict) -> str:
    return tensor_names(json.loads((directory / "config.json").read_text()), state).layer(0).removesuffix("0.")


def block_parameters(directory: Path) -> int:
    state = load_state(directory)
    prefix = layer_prefix(directory, state)
    return sum(t.numel() for name, t in state.items() if name.startswith(prefix))


def saved_ids(out: Path) -> torch.Tensor:
    return torch.tensor(json.loads((out / "streamprune_calibration.json").read_text())["input_ids"])


def text(config: dict) -> dict:
    return config.get("text_config", config)


def check_loads_and_generates(out: Path, source: Path) -> None:
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    new, old = (
        text(json.loads((out / "config.json").read_text())),
        text(json.loads((source / "config.json").read_text())),
    )
    config = model.config.get_text_config()
    assert config.intermediate_size == new["intermediate_size"] < old["intermediate_size"]
    assert config.head_dim == new["head_dim"]
    assert config.num_attention_heads == new["num_attention_heads"]
    generated = model.generate(torch.tensor([[1, 5, 9, 13]]), max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_flap_equals_the_whole_model_reference_and_loads(tiny_models, tmp_path, family):
    source, out = tiny_models[family], tmp_path / "out"
    before = tree_digest(source)
    ratio = RATIOS.get(family, 0.2)
    record = width(WidthConfig(model=str(source), out=out, ratio=ratio, attention_share=SHARE, **CALIBRATION))
    assert tree_digest(source) == before
    assert record["per_layer"]["kv_groups_removed"] == 1  # heads go too

    removed = 1 - block_parameters(out) / block_parameters(source)
    assert abs(removed - ratio) <= 0.02, removed
    assert record["achieved_ratio"] == pytest.approx(removed)
    check_loads_and_generates(out, source)

    cut = record["per_layer"]
    reference = flap_reference(
        load_full_model(source), saved_ids(out), cut["kv_groups_removed"], cut["channels_removed"]
    )
    state = load_state(out)
    prefix = layer_prefix(out, state)
    for index, (layer, expected) in enumerate(zip(record["layers"], reference)):
        assert layer["removed_kv_groups"] == expected["groups"].tolist(), index
        assert layer["removed_channels"] == expected["channels"].tolist(), index
        for site, linear, key in (("attention", "self_attn.o_proj", "o_bias"), ("mlp", "mlp.down_proj", "down_bias")):
            bias = state.get(f"{prefix}{index}.{linear}.bias")
            assert (bias is not None) == (site in record["bias_compensation"]["applied"])
            if bias is not None:
                torch.testing.assert_close(bias.double(), expected[key], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("family", ("llama", "qwen2", "gemma2", "phi3"))
def test_wanda_sp_equals_the_whole_model_reference(tiny_models, tmp_path, family):
    """Propagated through the narrowed layers (OLMo 2 is left out: its q/k norms span all heads, so
    the reference's masked heads are not the narrowed model's)."""
    source, out = tiny_models[family], tmp_path / "out"
    record = width(WidthConfig(model=str(source), out=out, criterion="wanda-sp", attention_share=SHARE, **CALIBRATION))
    cut = record["per_layer"]
    reference = flap_reference(load_full_model(source), saved_ids(out), cut["kv_groups_removed"],
                               cut["channels_removed"], criterion="wanda-sp")  # fmt: skip
    assert [layer["removed_kv_groups"] for layer in record["layers"]] == [e["groups"].tolist() for e in reference]
    assert [layer["removed_channels"] for layer in record["layers"]] == [e["channels"].tolist() for e in reference]
    assert record["bias_compensation"]["applied"] == []
    assert not any(name.endswith("o_proj.bias") for name in load_state(out))


def test_magnitude_needs_no_data_and_keeps_the_kept_weights(tiny_llama, tmp_path):
    out = tmp_path / "out"
    record = width(
        WidthConfig(model=str(tiny_llama), out=out, criterion="magnitude", ratio=0.3, quiet=True, calib="none")
    )
    assert record["calibration"] is None and not (out / "streamprune_calibration.json").exists()
    source, narrowed = load_state(tiny_llama), load_state(out)
    for index, layer in enumerate(record["layers"]):
        down = source[f"model.layers.{index}.mlp.down_proj.weight"]
        assert layer["removed_channels"] == lowest(down.abs().double().sum(0), len(layer["removed_channels"])).tolist()
        keep = [c for c in range(down.shape[1]) if c not in layer["removed_channels"]]
        assert torch.equal(narrowed[f"model.layers.{index}.mlp.down_proj.weight"], down[:, keep])
        assert torch.equal(narrowed[f"model.layers.{index}.mlp.up_proj.weight"],
                           source[f"model.layers.{index}.mlp.up_proj.weight"][keep])  # fmt: skip
    check_loads_and_generates(out, tiny_llama)


def test_the_attention_share_splits_the_removal(tiny_llama, tmp_path):
    heads_only = width(WidthConfig(model=str(tiny_llama), out=tmp_path / "a", criterion="magnitude", ratio=0.2,
                                   attention_share=1.0, quiet=True))  # fmt: skip
    mlp_only = width(WidthConfig(model=str(tiny_llama), out=tmp_path / "b", criterion="magnitude", ratio=0.2,
                                 attention_share=0.0, quiet=True))  # fmt: skip
    assert heads_only["per_layer"]["kv_groups_removed"] == 1
    assert mlp_only["per_layer"]["kv_groups_removed"] == 0
    assert mlp_only["per_layer"]["channels_removed"] > heads_only["per_layer"]["channels_removed"]
    for record in (heads_only, mlp_only):
        assert abs(record["achieved_ratio"] - 0.2) <= 0.02


def test_mixture_of_experts_is_refused_before_anything_is_written(tmp_path):
    source = make_tiny_model(tmp_path / "mixtral", "mixtral", layers=2)
    with pytest.raises(UsageError, match="mixture-of-experts.*streamprune depth"):
        width(WidthConfig(model=str(source), out=tmp_path / "out", criterion="magnitude", quiet=True))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("flags", "message"), [
    (["--ratio", "1.5"], "--ratio 1.5"),
    (["--attention-share", "2"], "--attention-share 2"),
    (["--criterion", "taylor"], "--criterion 'taylor'"),
])  # fmt: skip
def test_bad_settings_say_what_to_type(tiny_llama, tmp_path, flags, message):
    result = CliRunner().invoke(app, ["width", str(tiny_llama), "--out", str(tmp_path / "o"), *flags])
    assert result.exit_code != 0 and message in result.output, result.output


def test_the_command_prints_what_it_removed(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["width", str(tiny_llama), "--out", str(out), "--criterion", "magnitude", "-q"])
    assert result.exit_code == 0, result.output
    assert "MLP channels 128 -> 89" in result.output and "streamprune.json" in result.output
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 89


def test_the_scores_on_numbers():
    moments = InputMoments(3)
    moments.add_batch(torch.tensor([[[1.0, 0.0, 2.0], [3.0, 0.0, 2.0]]]))
    torch.testing.assert_close(moments.variance, torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64))
    weight = torch.tensor([[1.0, 2.0, -1.0], [1.0, 0.0, 1.0]])
    torch.testing.assert_close(channel_scores("flap", weight, moments), torch.tensor([2.0, 0, 0], dtype=torch.float64))
    torch.testing.assert_close(
        channel_scores("magnitude", weight, None), torch.tensor([2.0, 2, 2], dtype=torch.float64)
    )
    # flap squares each o_proj channel's score before summing a group (as the published code)
    assert group_scores("flap", torch.tensor([1.0, 2.0, 3.0, 0.0]), 2).tolist() == [5.0, 9.0]
    assert lowest(torch.tensor([3.0, 1.0, 1.0, 0.0]), 2).tolist() == [1, 3]
    assert lowest(torch.tensor([1.0, 1.0, 1.0]), 2).tolist() == [0, 1]  # ties: the lower index
    torch.testing.assert_close(compensation(weight, moments.mean, torch.tensor([0])),
                               torch.tensor([2.0, 2.0], dtype=torch.float64))  # fmt: skip


def test_a_width_pruned_model_prunes_and_reconstructs_as_any_dense_one(tiny_llama, tmp_path):
    """The output is an ordinary dense checkpoint: `run --reconstruct` takes it (its narrower MLP,
    fewer heads and compensation biases) and writes a model that loads and generates, half zeros."""
    narrow, pruned = tmp_path / "narrow", tmp_path / "pruned"
    runner = CliRunner()
    width = runner.invoke(app, ["width", str(tiny_llama), "--out", str(narrow), "--ratio", "0.2", *WIDTH_ARGS])
    assert width.exit_code == 0, width.output
    args = ["run", str(narrow), "--out", str(pruned), "--sparsity", "0.5", "--reconstruct", "--reconstruct-epochs", "1",
            "--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--quiet"]  # fmt: skip
    run = runner.invoke(app, args)
    assert run.exit_code == 0, run.output
    check_loads_and_generates(pruned, tiny_llama)
    state, narrowed = load_state(pruned), load_state(narrow)
    down = next(name for name in state if name.endswith("mlp.down_proj.weight"))
    assert state[down].shape == narrowed[down].shape and (state[down] == 0).float().mean() == pytest.approx(0.5, abs=0.02)
    assert all(torch.equal(state[n], narrowed[n]) for n in state if n.endswith("proj.bias"))


def test_a_run_that_cannot_fit_the_ram_is_refused_before_it_writes(tiny_llama, tmp_path):
    """The plan's estimate of the peaks, checked first: 2M x 256 calibration tokens of a 64-wide model
    need more RAM than any test machine has (126 GiB); refused with the flags to lower, exit 4."""
    out = tmp_path / "out"
    args = ["width", str(tiny_llama), "--out", str(out), "--ratio", "0.2", "--calib", str(WIKITEXT),
            "--nsamples", "2000000", "--seqlen", "256", "--quiet"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 4, result.output
    assert "of RAM" in result.output and "lower --nsamples (now 2000000)" in result.output
    assert not out.exists()


# -- kill -9 anywhere, then resume: the same bytes --------------------------------------------------

WIDTH_ARGS = ["--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--batch-size", "1",
              "--max-shard-size", "60KB", "--attention-share", "0.5", "--quiet"]  # fmt: skip


class Crasher:
    """tests/crash_run.py, which forks one `streamprune width` per job and kills it where asked."""

    def __init__(self, tmp: Path):
        self.tmp, self.jobs = tmp, 0
        self.process = subprocess.Popen([sys.executable, str(ROOT / "tests" / "crash_run.py")], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, cwd=tmp)  # fmt: skip
        assert json.loads(self.process.stdout.readline()) == {"ready": True}

    def run(self, model: Path, out: Path, event=None, n=0, action=None) -> tuple[dict, str, dict]:
        self.jobs += 1
        log, counts = self.tmp / f"job{self.jobs}.log", self.tmp / f"job{self.jobs}.counts"
        job = {"command": "width", "args": [str(model), "--out", str(out), *WIDTH_ARGS], "log": str(log),
               "counts": str(counts), "event": event, "n": n, "action": action}  # fmt: skip
        self.process.stdin.write(json.dumps(job) + "\n")
        self.process.stdin.flush()
        ended = json.loads(self.process.stdout.readline())
        return ended, log.read_text(), json.loads(counts.read_text()) if counts.exists() else {}

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


def digest(out: Path) -> dict[str, str]:
    """sha256 of every file; of the record, without what measures one session."""
    files = {}
    for path in sorted(p for p in out.rglob("*") if p.is_file()):
        data = path.read_bytes()
        if path.name == "streamprune.json":
            record = json.loads(data)
            for key in ("total_seconds", "sessions", "command"):
                record.pop(key)
            record["arguments"].pop("out")
            for layer in record["layers"]:
                layer.pop("seconds")
            data = json.dumps(record, sort_keys=True).encode()
        files[str(path.relative_to(out))] = hashlib.sha256(data).hexdigest()
    return files


def test_kill_anywhere_then_resume_is_byte_identical(tmp_path):
    model = make_tiny_model(tmp_path / "llama4", "llama", layers=4)
    crasher = Crasher(tmp_path)
    try:
        ended, log, counts = crasher.run(model, tmp_path / "reference")
        assert ended == {"exit": 0}, log
        expected = digest(tmp_path / "reference")
        assert counts["forward"] == 16  # 4 layers x 4 samples, one dense forward each (flap)
        # mid-layer, mid-shard (half its bytes on disk) and at the very end (the last rename)
        crashes = [("forward", 6, "kill"), ("write", counts["write"] // 2, "half-kill"),
                   ("replace", counts["replace"], "kill")]  # fmt: skip
        for number, (event, n, action) in enumerate(crashes):
            out = tmp_path / f"crash{number}"
            ended, log, _ = crasher.run(model, out, event=event, n=n, action=action)
            assert ended == {"signal": signal.SIGKILL}, (event, n, log)
            if number == 0:  # other settings on the unfinished run are refused, naming the flag
                args = ["width", str(model), "--out", str(out), *WIDTH_ARGS, "--ratio", "0.3"]
                result = CliRunner().invoke(app, args)
                assert result.exit_code != 0 and "--ratio: the run" in result.output, result.output
            ended, log, _ = crasher.run(model, out)
            assert ended == {"exit": 0}, (event, n, log)
            assert digest(out) == expected, (event, n)
            assert len(json.loads((out / "streamprune.json").read_text())["sessions"]) == 2
    finally:
        crasher.close()
