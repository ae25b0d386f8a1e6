"""Depth pruning: every criterion's streamed scores equal a whole-model computation on the same
calibration ids, the chosen blocks are the same, and the shortened checkpoint is the whole model
with those blocks deleted."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import WIKITEXT, attention, make_tiny_model, tree_digest
from reference_wanda import decoder
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import streamprune.depth.command as depth_command
from streamprune.calibration import read_documents, sample_windows
from streamprune.checkpoint import Checkpoint
from streamprune.cli import app
from streamprune.depth import (
    DepthConfig,
    block_influence,
    depth,
    lowest,
    removal_count,
    seams,
    shortened_config,
)
from streamprune.depth.blocks import Blocks
from streamprune.errors import UsageError
from streamprune.families import FAMILIES
from streamprune.writer import CheckpointWriter

# families whose config changes with depth (qwen2: sliding layers), and the newer layer layouts
DEPTH_FAMILIES = ("llama", "qwen2", "qwen3", "olmo2", "gemma2", "gemma3", "gemma3-vl", "phi3")


# -- pure functions ---------------------------------------------------------------------------------


def test_removal_count_and_its_refusals():
    assert removal_count(32, 6, None, 4, 2) == 6
    assert removal_count(30, None, 0.2, 4, 2) == 6
    assert removal_count(30, 24, None, 4, 2) == 24
    with pytest.raises(UsageError, match="only 24 are removable. Use --remove 24 or fewer"):
        removal_count(30, 25, None, 4, 2)
    with pytest.raises(UsageError, match="protect all 6 blocks"):
        removal_count(6, 1, None, 4, 2)
    with pytest.raises(UsageError, match="rounds to 0 blocks"):
        removal_count(8, None, 0.05, 1, 1)


def test_lowest_scores_with_ties_go_to_the_lower_index():
    scores = {0: 0.1, 1: 5.0, 2: 3.0, 3: 3.0, 4: 1.0, 5: 0.0}
    assert lowest(scores, [1, 2, 3, 4], 2) == [2, 4]  # 4 (1.0), then 2 before 3 (tied at 3.0)
    assert lowest(scores, [1, 2, 3, 4], 0) == []


def test_block_influence_golden_numbers():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 3.0]])
    same, orthogonal, opposite = x, torch.tensor([[0.0, 1.0], [5.0, 0.0], [3.0, 3.0]]), -x
    assert block_influence(x, same) == pytest.approx((0.0, 3), abs=1e-6)
    assert block_influence(x, orthogonal) == pytest.approx((2.0, 3), abs=1e-6)  # 1 + 1 + 0
    assert block_influence(x, opposite) == pytest.approx((6.0, 3), abs=1e-6)


def test_shortened_config_changes_only_what_must_change():
    config = {
        "num_hidden_layers": 6,
        "hidden_size": 64,
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "layer_types": ["full_attention"] * 2 + ["sliding_attention"] * 4,
        "max_window_layers": 2,
        "bos_token_id": 1,
    }
    new = shortened_config(config, [0, 2, 3, 5])
    assert new["num_hidden_layers"] == 4
    assert new["layer_types"] == ["full_attention"] + ["sliding_attention"] * 3
    assert new["max_window_layers"] == 1
    assert {k: v for k, v in new.items() if k not in ("num_hidden_layers", "layer_types", "max_window_layers")} == {
        k: v for k, v in config.items() if k not in ("num_hidden_layers", "layer_types", "max_window_layers")
    }


def test_shortened_config_writes_out_the_attention_kinds_a_config_class_would_derive():
    """Gemma 2's hub configs have no layer_types (sliding and global alternate by index), Gemma 3's a
    sliding pattern: the kept blocks keep their kinds only if the list is written out."""
    gemma2 = {"model_type": "gemma2", "num_hidden_layers": 6, "hidden_size": 64}
    kinds = ["sliding_attention", "full_attention"] * 3
    assert shortened_config(gemma2, [0, 1, 3, 5])["layer_types"] == [kinds[i] for i in (0, 1, 3, 5)]
    vision_language = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "num_hidden_layers": 6,
                                                               "sliding_window_pattern": 3}}  # fmt: skip
    text = shortened_config(vision_language, [0, 2, 3, 5])["text_config"]
    assert text["num_hidden_layers"] == 4
    assert text["layer_types"] == ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]


# -- whole-model references ------------------------------------------------------------------------


def whole_model(path: Path):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attention(path), dtype=torch.float32).eval()


def without_blocks(model, removed: list[int]):
    """The same model object with decoder blocks `removed` skipped (restore_blocks undoes it)."""
    text, config = decoder(model), model.config.get_text_config()
    layers, layer_types = text.layers, getattr(config, "layer_types", None)
    text.layers = torch.nn.ModuleList([m for i, m in enumerate(layers) if i not in removed])
    config.num_hidden_layers = len(text.layers)
    if layer_types:  # Qwen2 picks each layer's mask by its position in this list
        config.layer_types = [t for i, t in enumerate(layer_types) if i not in removed]
    return layers, layer_types


def restore_blocks(model, saved) -> None:
    text, config = decoder(model), model.config.get_text_config()
    text.layers, layer_types = saved
    config.num_hidden_layers = len(text.layers)
    if layer_types:
        config.layer_types = layer_types


def reference_scores(path: Path, criterion: str, input_ids: torch.Tensor) -> dict[int, float]:
    model = whole_model(path)
    blocks = list(decoder(model).layers)
    names = FAMILIES[model.config.get_text_config().model_type].projections.names
    linears = [[b.get_submodule(name) for name in names] for b in blocks]
    if criterion == "magnitude":
        return {
            i: sum(float(lin.weight.detach().double().abs().sum()) for lin in block) for i, block in enumerate(linears)
        }
    if criterion == "ppl":
        scores = {}
        for i in range(len(blocks)):
            full = without_blocks(model, [i])
            with torch.no_grad():
                scores[i] = math.exp(float(model(input_ids, labels=input_ids, use_cache=False).loss))
            restore_blocks(model, full)
        return scores
    if criterion == "bi":
        seen = {}

        def hook(index):
            def capture(module, args, kwargs, output):
                h_in = args[0] if args else kwargs["hidden_states"]
                h_out = output[0] if isinstance(output, tuple) else output
                cos = torch.nn.functional.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
                seen[index] = float((1 - cos).double().mean())

            return capture

        handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(blocks)]
        with torch.no_grad():
            model(input_ids, use_cache=False)
        for h in handles:
            h.remove()
        return seen
    if criterion == "taylor":
        model(input_ids, labels=input_ids, use_cache=False).loss.backward()
        return {
            i: sum(float((lin.weight.detach() * lin.weight.grad).double().abs().sum()) for lin in block)
            for i, block in enumerate(linears)
        }
    raise ValueError(criterion)


def run_depth(model: Path, out: Path, **kwargs) -> dict:
    settings = dict(calib=str(WIKITEXT), nsamples=4, seqlen=32, quiet=True, remove=2, keep_first=1, keep_last=1)
    settings.update(kwargs)
    return depth(DepthConfig(model=str(model), out=out, **settings))


@pytest.fixture(scope="module")
def tiny6(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("depth")
    return {family: make_tiny_model(root / family, family, layers=6) for family in DEPTH_FAMILIES}


def calibration_ids(model: Path, nsamples: int, seqlen: int, seed: int = 1234) -> torch.Tensor:
    """The ids depth() samples: same function, same arguments."""
    return sample_windows(read_documents(WIKITEXT), AutoTokenizer.from_pretrained(model), nsamples, seqlen, seed)


def assert_scores_match(report: dict, reference: dict[int, float], criterion: str, rel: float):
    got = {row["block"]: row["score"] for row in report["blocks"]}
    assert got.keys() == reference.keys()
    for block, value in reference.items():
        if criterion == "magnitude":
            assert got[block] == value, block  # exact: same float64 sums of the same weights
        else:
            assert got[block] == pytest.approx(value, rel=rel), (block, got[block], value)


# every family's blocks under the two criteria that need only their forward (hidden states) or
# weights; the head's perplexity and the backward of the criteria that need them on the families
# whose heads and layouts differ (untied; soft-capped and scaled; prefixed vision-language; fused)
@pytest.mark.parametrize(("family", "criterion"), [
    *[(family, criterion) for family in DEPTH_FAMILIES for criterion in ("magnitude", "bi")],
    *[(family, criterion) for family in ("llama", "gemma2", "gemma3-vl", "phi3") for criterion in ("ppl", "taylor")],
])  # fmt: skip
def test_streamed_scores_equal_the_whole_model(tiny6, tmp_path, family, criterion):
    model = tiny6[family]
    report = run_depth(model, tmp_path / "out", criterion=criterion)
    ids = calibration_ids(model, 4, 32)
    reference = reference_scores(model, criterion, ids)
    assert_scores_match(report, reference, criterion, rel=1e-4)
    assert report["removed"] == lowest(reference, list(range(1, 5)), 2)


@pytest.mark.parametrize("family", DEPTH_FAMILIES)
def test_shortened_checkpoint_is_the_whole_model_without_those_blocks(tiny6, tmp_path, family):
    source = tiny6[family]  # qwen2's sliding layers: layer_types and max_window_layers must follow the blocks
    before = tree_digest(source)
    report = run_depth(source, tmp_path / "out", criterion="bi", remove=2)
    removed = report["removed"]
    out = tmp_path / "out"
    config = json.loads((out / "config.json").read_text())
    config = config.get("text_config", config)  # a vision-language model's language model
    assert config["num_hidden_layers"] == 4 and len(config.get("layer_types") or "1234") == 4
    shortened = AutoModelForCausalLM.from_pretrained(out, attn_implementation=attention(out)).eval()
    reference = whole_model(source)
    without_blocks(reference, removed)
    ids = calibration_ids(source, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            shortened(ids, use_cache=False).logits, reference(ids, use_cache=False).logits, rtol=0, atol=0
        )
    generated = shortened.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 12)
    assert tree_digest(source) == before
    for name in ("depth_scores.json", "depth_scores.csv", "streamprune.json"):
        assert (out / name).is_file()
    assert (out / "depth_scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    csv_rows = (out / "depth_scores.csv").read_text().splitlines()
    assert csv_rows[0] == "block,bi_score,protected,removed" and len(csv_rows) == 7
    assert [int(r.split(",")[0]) for r in csv_rows[1:] if r.endswith(",1")] == removed


def test_ppl_reads_the_weights_once_and_fewer_streams_mean_more_passes(tiny6, tmp_path):
    model = tiny6["llama"]
    one = run_depth(model, tmp_path / "one", criterion="ppl")
    three = run_depth(model, tmp_path / "three", criterion="ppl", max_streams=2)
    assert one["passes"] == 1 and three["passes"] == 3
    tensors = Checkpoint(model).tensors
    layer_bytes = sum(info.nbytes for name, info in tensors.items() if name.startswith("model.layers."))
    # one pass: every block once (+ the embedding rows and the head); not blocks x depth
    assert one["bytes_read"] < 1.3 * one["checkpoint_bytes"]
    assert three["bytes_read"] >= 3 * layer_bytes
    assert [r["score"] for r in one["blocks"]] == [r["score"] for r in three["blocks"]]


def test_iterative_removes_one_block_per_round(tiny6, tmp_path):
    report = run_depth(tiny6["llama"], tmp_path / "it", criterion="ppl", iterative=True, remove=2)
    rounds = report["rounds"]
    assert len(rounds) == 2 and len(rounds[0]["removed"]) == 1 and len(rounds[1]["removed"]) == 1
    first = rounds[0]["removed"][0]
    assert first not in rounds[1]["blocks"] and first not in rounds[1]["scores"]
    assert report["removed"] == sorted(rounds[0]["removed"] + rounds[1]["removed"])
    magnitude = run_depth(tiny6["llama"], tmp_path / "mi", criterion="magnitude", iterative=True, remove=2)
    one_shot = run_depth(tiny6["llama"], tmp_path / "mo", criterion="magnitude", remove=2)
    assert magnitude["removed"] == one_shot["removed"]  # weights alone: rescoring changes nothing


def test_scores_only_writes_the_scores_and_nothing_else(tiny6, tmp_path):
    report = run_depth(tiny6["llama"], tmp_path / "s", criterion="magnitude", scores_only=True, remove=None)
    assert report["removed"] == []
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [
        "depth_scores.csv",
        "depth_scores.json",
        "depth_scores.png",
    ]


@pytest.mark.parametrize(
    "args,phrase",
    [
        (["--remove", "3"], "only 2 are removable. Use --remove 2 or fewer"),
        (["--remove", "1", "--keep-first", "4", "--keep-last", "2"], "protect all 6 blocks"),
        ([], "give --remove K"),
        (["--remove", "1", "--ratio", "0.2"], "give --remove K"),
        (["--ratio", "1.5"], "outside (0, 1)"),
        (["--remove", "1", "--criterion", "random"], "--criterion 'random' is not one of"),
        (["--remove", "0"], "--remove must be positive"),
    ],
)
def test_depth_refusals(tiny6, tmp_path, args, phrase):
    result = CliRunner().invoke(
        app,
        ["depth", str(tiny6["llama"]), "--out", str(tmp_path / "o"), "--keep-first", "2", "--keep-last", "2", *args],
    )
    assert result.exit_code == 2, result.output
    assert phrase in " ".join(result.output.split()), result.output
    assert not (tmp_path / "o").exists()


def test_depth_cli_prints_what_it_removed(tiny6, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "depth",
            str(tiny6["llama"]),
            "--out",
            str(tmp_path / "o"),
            "--criterion",
            "magnitude",
            "--remove",
            "1",
            "--keep-first",
            "1",
            "--keep-last",
            "1",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "removed blocks" in result.output and "6 -> 5 blocks" in result.output


# -- the real model -------------------------------------------------------------------------------


@pytest.mark.parametrize("criterion", ["magnitude", "bi", "ppl", "taylor"])
def test_smollm2_scores_equal_the_whole_model(smollm2, tmp_path, criterion):
    """SmolLM2-135M, 30 blocks, 4 x 64 calibration tokens (the paper's 10 x 128 in the benchmark)."""
    report = run_depth(
        smollm2,
        tmp_path / "out",
        criterion=criterion,
        nsamples=4,
        seqlen=64,
        remove=6,
        keep_first=4,
        keep_last=2,
        scores_only=True,
    )
    ids = calibration_ids(smollm2, 4, 64)
    reference = reference_scores(smollm2, criterion, ids)
    tolerance = {"ppl": 1e-3, "bi": 1e-3, "taylor": 1e-3, "magnitude": 0}[criterion]
    assert_scores_match(report, reference, criterion, rel=tolerance)
    chosen = lowest({row["block"]: row["score"] for row in report["blocks"]}, list(range(4, 28)), 6)
    assert chosen == lowest(reference, list(range(4, 28)), 6)


# -- stopping and starting again -------------------------------------------------------------------


def weights_digest(out: Path) -> dict[str, str]:
    return {k: v for k, v in tree_digest(out).items() if k.endswith((".safetensors", ".index.json", "config.json"))}


def test_a_run_stopped_while_writing_reuses_its_scores_and_ends_identical(tiny6, tmp_path, monkeypatch):
    reference = run_depth(tiny6["llama"], tmp_path / "reference", criterion="ppl")
    real_write, calls = CheckpointWriter.write, []

    def write_then_stop(self, name, tensor):
        calls.append(name)
        if len(calls) == 12:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(CheckpointWriter, "write", write_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_depth(tiny6["llama"], tmp_path / "out", criterion="ppl")
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()  # nothing loads as a model
    monkeypatch.setattr(CheckpointWriter, "write", real_write)

    def no_scoring(*args):
        raise AssertionError("the scores should have been reused")

    monkeypatch.setattr(depth_command, "score_blocks", no_scoring)  # where score() looks it up
    resumed = run_depth(tiny6["llama"], tmp_path / "out", criterion="ppl")
    assert resumed["removed"] == reference["removed"]
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "reference")


def test_scores_only_then_remove_reuses_the_scores(tiny6, tmp_path, monkeypatch):
    scored = run_depth(tiny6["llama"], tmp_path / "out", criterion="bi", scores_only=True, remove=None)
    monkeypatch.setattr(depth_command, "score_blocks", lambda *a: pytest.fail("the scores should have been reused"))
    report = run_depth(tiny6["llama"], tmp_path / "out", criterion="bi", remove=2)
    expected = lowest({r["block"]: r["score"] for r in scored["blocks"]}, [1, 2, 3, 4], 2)
    assert report["removed"] == expected
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 4


def test_scores_from_other_settings_are_refused(tiny6, tmp_path):
    run_depth(tiny6["llama"], tmp_path / "out", criterion="magnitude", scores_only=True, remove=None)
    with pytest.raises(UsageError, match=r"other settings \(criterion, calibration differ\).*--force"):
        run_depth(tiny6["llama"], tmp_path / "out", criterion="bi")
    report = run_depth(tiny6["llama"], tmp_path / "out", criterion="bi", force=True)
    assert report["criterion"] == "bi"


# -- stopping inside the scoring -------------------------------------------------------------------


def count_block_reads(monkeypatch, stop_at: int | None = None) -> list[int]:
    """Count Blocks.tensors calls (one per block read); raise KeyboardInterrupt at call `stop_at`."""
    real, calls = Blocks.tensors, []

    def tensors(self, index):
        calls.append(index)
        if len(calls) == stop_at:
            raise KeyboardInterrupt
        return real(self, index)

    monkeypatch.setattr(Blocks, "tensors", tensors)
    return calls


def scores_of(report: dict) -> list[dict[int, float]]:
    return [r["scores"] for r in report["rounds"]]


@pytest.mark.parametrize(
    "criterion, extra, blocks_read, stop_at",
    [
        ("magnitude", {}, 6, 4),
        ("bi", {}, 6, 4),
        ("ppl", {"max_streams": 2}, 18, 9),  # 3 passes of 6 blocks: stopped at block 2 of the second
        ("taylor", {}, 12, 3),  # 6 blocks forward, then 6 backward: stopped in the forward pass
        ("taylor", {}, 12, 9),  # ... and in the backward pass
        ("bi", {"iterative": True}, 11, 9),  # rounds of 6 and 5 blocks: stopped in the second round
    ],
)
def test_a_run_stopped_while_scoring_goes_on_from_its_last_block(
    tiny6, tmp_path, monkeypatch, criterion, extra, blocks_read, stop_at
):
    """Saved after every block (--checkpoint-minutes 0), a run stopped before reading block `stop_at`
    rereads only the blocks after the last save, and its scores are bit-identical."""
    model, settings = tiny6["llama"], dict(criterion=criterion, **extra)
    calls = count_block_reads(monkeypatch)
    reference = run_depth(model, tmp_path / "reference", **settings)  # default: no save inside a pass
    assert len(calls) == blocks_read
    calls = count_block_reads(monkeypatch, stop_at=stop_at)
    with pytest.raises(KeyboardInterrupt):
        run_depth(model, tmp_path / "out", checkpoint_minutes=0, **settings)
    state = json.loads((tmp_path / "out" / ".streamprune" / "depth.json").read_text())
    assert state["structure"]["criterion"] == criterion and state["progress"]["phase"] is not None

    calls = count_block_reads(monkeypatch)
    resumed = run_depth(model, tmp_path / "out", checkpoint_minutes=0, **settings)
    assert len(calls) == blocks_read - (stop_at - 1)  # every block read before the stop was saved
    assert scores_of(resumed) == scores_of(reference)  # exact floats
    assert resumed["removed"] == reference["removed"] and resumed["passes"] == reference["passes"]
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "reference")
    assert not (tmp_path / "out" / ".streamprune").exists()


def test_without_a_due_save_a_stopped_pass_starts_over(tiny6, tmp_path, monkeypatch):
    """With --checkpoint-minutes 5 nothing inside a 6-block pass is saved: the resumed run reads all 6 again."""
    count_block_reads(monkeypatch, stop_at=4)
    with pytest.raises(KeyboardInterrupt):
        run_depth(tiny6["llama"], tmp_path / "out", criterion="bi")
    assert not (tmp_path / "out" / ".streamprune" / "depth.json").exists()
    calls = count_block_reads(monkeypatch)
    run_depth(tiny6["llama"], tmp_path / "out", criterion="bi")
    assert len(calls) == 6


KILLER = """
import os, signal, sys

import streamprune.depth.blocks
import streamprune.depth.healing
import streamprune.runstate

event, n = sys.argv[1], int(sys.argv[2])
calls = []


def count_and_maybe_die():
    calls.append(1)
    if len(calls) == n:
        os.kill(os.getpid(), signal.SIGKILL)  # no except, no finally: as if the power went


if event == "block":  # before the n-th block read
    real_tensors = streamprune.depth.blocks.Blocks.tensors

    def tensors(self, index):
        count_and_maybe_die()
        return real_tensors(self, index)

    streamprune.depth.blocks.Blocks.tensors = tensors
elif event == "train":  # before the n-th seam block's training (--reconstruct), where heal_seams looks it up
    real_reconstruct = streamprune.depth.healing.reconstruct_layer

    def reconstruct_layer(*args, **kwargs):
        count_and_maybe_die()
        return real_reconstruct(*args, **kwargs)

    streamprune.depth.healing.reconstruct_layer = reconstruct_layer
else:  # "save": the n-th save's tensor files are written, depth.json does not name them yet
    real_write_atomic = streamprune.runstate.write_atomic

    def write_atomic(path, data):
        if path.name == "depth.json":
            count_and_maybe_die()
        return real_write_atomic(path, data)

    streamprune.runstate.write_atomic = write_atomic

from streamprune.cli import app

app(sys.argv[3:], prog_name="streamprune")
"""


@pytest.mark.parametrize(
    "event, n, blocks_left, overlap",
    [("block", 10, [9], False), ("save", 10, [10], True), ("block", 10, [9, 10], True)],
)
def test_a_killed_scoring_resumes_from_its_last_save(tiny6, tmp_path, monkeypatch, event, n, blocks_left, overlap):
    """SIGKILL in a ppl scoring (3 passes x 6 blocks), before a block read or in the middle of a save:
    the resumed run reads only what the last complete save had not done, and scores the same. With
    the next block read in the background, the 10th read starts while block 9 is computed: the kill
    then costs block 9 too unless its save came first."""
    model = tiny6["llama"]
    settings = dict(criterion="ppl", max_streams=2, checkpoint_minutes=0)
    reference = run_depth(model, tmp_path / "reference", **settings)
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    args = ["depth", str(model), "--out", str(tmp_path / "out"), "--calib", str(WIKITEXT), "--nsamples", "4",
            "--seqlen", "32", "--remove", "2", "--keep-first", "1", "--keep-last", "1", "--criterion", "ppl",
            "--max-streams", "2", "--checkpoint-minutes", "0", "--quiet"]  # fmt: skip
    args += [] if overlap else ["--no-overlap"]
    killed = subprocess.run([sys.executable, str(killer), event, str(n), *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    # a save killed halfway leaves tensor files no state names; they never count as saved
    calls = count_block_reads(monkeypatch)
    resumed = run_depth(model, tmp_path / "out", **settings)
    # "block", read by read: 9 blocks were read and saved, 18 - 9 are left. "save": the 10th save
    # (after block 2 of pass 2; pass 1 ends with a save of its own) never completed, so block 2 is
    # read again: 18 - 8
    assert len(calls) in blocks_left
    assert scores_of(resumed) == scores_of(reference)
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "reference")
    assert not (tmp_path / "out" / ".streamprune").exists()


def test_a_stopped_scoring_with_other_settings_is_refused(tiny6, tmp_path, monkeypatch):
    count_block_reads(monkeypatch, stop_at=3)
    with pytest.raises(KeyboardInterrupt):
        run_depth(tiny6["llama"], tmp_path / "out", criterion="bi", checkpoint_minutes=0)
    state_before = (tmp_path / "out" / ".streamprune" / "depth.json").read_bytes()
    count_block_reads(monkeypatch)
    with pytest.raises(UsageError, match=r'--criterion: the run in .* used "bi", this command asks for "ppl"'):
        run_depth(tiny6["llama"], tmp_path / "out", criterion="ppl")
    assert (tmp_path / "out" / ".streamprune" / "depth.json").read_bytes() == state_before
    report = run_depth(tiny6["llama"], tmp_path / "out", criterion="ppl", force=True)
    assert report["criterion"] == "ppl" and not (tmp_path / "out" / ".streamprune").exists()


# -- --reconstruct ------------------------------------------------------------------------------------


def test_seams_are_the_kept_blocks_before_each_removed_span():
    assert seams([0, 1, 4, 5], 6) == {1: 3}
    assert seams([0, 2, 3, 5], 6) == {0: 1, 3: 4}
    assert seams([2, 3, 4], 6) == {4: 5}  # blocks 0-1 have no block before them to heal


def tensors_of(model_dir: Path) -> dict[str, torch.Tensor]:
    checkpoint = Checkpoint(model_dir)
    return {name: checkpoint.read(name) for name in checkpoint.tensors}


def held_out_error(model_dir: Path, reference, ids: torch.Tensor) -> float:
    """Mean squared difference of the last hidden state from the dense model's, on `ids`."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        ours = model(ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
        dense = reference(ids, output_hidden_states=True, use_cache=False).hidden_states[-1]
    return float(torch.nn.functional.mse_loss(ours, dense))


def test_reconstruct_heals_the_seam_on_held_out_text(tiny6, tmp_path):
    """The block before the removed span is trained; every other tensor is the source's; the
    shortened model's last hidden state comes closer to the dense model's on text it never saw."""
    source = tiny6["llama"]
    before = tree_digest(source)
    plain = run_depth(source, tmp_path / "plain", criterion="bi", remove=2)
    healed = run_depth(source, tmp_path / "healed", criterion="bi", remove=2, reconstruct=True,
                       reconstruct_nsamples=16, reconstruct_seqlen=64, reconstruct_epochs=8)  # fmt: skip
    assert healed["removed"] == plain["removed"]
    seam_blocks = seams(healed["kept"], 6)
    assert set(map(int, healed["reconstruct"])) == set(seam_blocks) and seam_blocks
    for losses in healed["reconstruct"].values():
        assert losses["loss_last_epoch"] < losses["loss_first_epoch"]
    plain_state, healed_state = tensors_of(tmp_path / "plain"), tensors_of(tmp_path / "healed")
    assert plain_state.keys() == healed_state.keys()
    for name in plain_state:
        new_index = int(name.split(".")[2]) if name.startswith("model.layers.") else None
        is_seam_linear = (
            new_index is not None and healed["kept"][new_index] in seam_blocks and name.endswith("_proj.weight")
        )
        assert torch.equal(plain_state[name], healed_state[name]) != is_seam_linear, name
    reference = whole_model(source)
    held_out = calibration_ids(source, 4, 64, seed=99)  # other windows than the 16 x 64 trained on
    assert held_out_error(tmp_path / "healed", reference, held_out) < held_out_error(tmp_path / "plain", reference,
                                                                                      held_out)  # fmt: skip
    assert tree_digest(source) == before


def test_a_heal_killed_mid_seam_resumes_to_the_same_bytes(tiny6, tmp_path):
    """SIGKILL as the seam's training begins (the scores were saved before the healing pass): the
    same command reuses the scores, heals again and writes what an uninterrupted run writes, byte
    for byte."""
    model = tiny6["llama"]
    heal = dict(criterion="bi", remove=2, keep_first=1, keep_last=1, reconstruct=True, reconstruct_nsamples=4,
                reconstruct_seqlen=32, reconstruct_epochs=2)  # fmt: skip
    reference = run_depth(model, tmp_path / "reference", **heal)
    assert reference["reconstruct"], reference["removed"]  # a seam to kill in
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    args = ["depth", str(model), "--out", str(tmp_path / "out"), "--calib", str(WIKITEXT), "--nsamples", "4",
            "--seqlen", "32", "--remove", "2", "--keep-first", "1", "--keep-last", "1", "--criterion", "bi",
            "--reconstruct", "--reconstruct-nsamples", "4", "--reconstruct-seqlen", "32", "--reconstruct-epochs", "2",
            "--quiet"]  # fmt: skip
    killed = subprocess.run([sys.executable, str(killer), "train", "1", *args], capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = run_depth(model, tmp_path / "out", **heal)
    assert resumed["reconstruct"] == reference["reconstruct"]
    assert weights_digest(tmp_path / "out") == weights_digest(tmp_path / "reference")


def test_reconstruct_needs_a_checkpoint_to_heal(tiny6, tmp_path):
    with pytest.raises(UsageError, match="--scores-only"):
        run_depth(tiny6["llama"], tmp_path / "o", scores_only=True, remove=None, reconstruct=True)

