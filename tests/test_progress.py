"""Every long step shows progress until the last one: after the layers' bar, `eval --ppl` and
`depth --criterion ppl` (and taylor) show the final norm and LM head's own bar, counting the tokens
it scores (issue 34: minutes of silence after 100% on Gemma 3's 262k-row head). Read from what the
real CLI writes to stderr."""

from __future__ import annotations

import re

import pytest
from conftest import WIKITEXT
from typer.testing import CliRunner

from streamprune.cli import app

# one tqdm refresh: "desc: 100%|####| 189/189 [..." (unit_scale may write 1.2k)
REFRESH = re.compile(r"(?P<desc>[^\r\n|]+?):\s+(?P<percent>\d+)%\|[^|]*\|\s*(?P<done>[\d.]+[kM]?)/(?P<total>[\d.]+[kM]?)")
HEAD = "final norm + LM head"


def count(text: str) -> float:
    """A tqdm count as written: 93, 93.0, 1.23k, 4.78M."""
    scale = {"k": 1e3, "M": 1e6}.get(text[-1], 1)
    return float(text.rstrip("kM")) * scale


def finished_bars(stderr: str) -> list[tuple[str, float]]:
    """(description, total) of each bar that reached 100%, in the order they got there."""
    bars = []
    for match in REFRESH.finditer(stderr):
        if match["percent"] == "100" and match["done"] == match["total"]:
            bar = (match["desc"].strip(), count(match["total"]))
            if bar not in bars:
                bars.append(bar)
    return bars


def last_refresh(stderr: str) -> str:
    """The description of the last bar refresh the command wrote."""
    return [m["desc"].strip() for m in REFRESH.finditer(stderr)][-1]


def invoke(args: list[str]) -> str:
    """The CLI run in this process (tqdm writes to the runner's stderr); its stderr."""
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stderr


def eval_progress(model, windows: int = 3, seqlen: int = 32) -> str:
    return invoke(["eval", str(model), "--ppl", str(WIKITEXT), "--limit", str(windows), "--seqlen", str(seqlen),
                   "--device", "cpu"])  # fmt: skip


def depth_progress(model, out, criterion: str, nsamples: int = 2, seqlen: int = 16) -> str:
    return invoke(["depth", str(model), "--out", str(out), "--criterion", criterion, "--remove", "1", "--calib",
                   str(WIKITEXT), "--nsamples", str(nsamples), "--seqlen", str(seqlen), "--scores-only",
                   "--device", "cpu"])  # fmt: skip


def assert_head_after_layers(stderr: str, layers_bar: str, layers: int, head_bar: str, head_tokens: int) -> None:
    """The layers' bar reached all its layers, then the head's bar counted every scored token, and
    nothing long came after it without a bar."""
    bars = finished_bars(stderr)
    names = [name for name, _ in bars]
    assert (layers_bar, layers) in bars, bars
    assert (head_bar, head_tokens) in bars, bars
    assert names.index(head_bar) > names.index(layers_bar), bars
    assert last_refresh(stderr) == head_bar, stderr[-500:]


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_eval_shows_the_head_after_the_layers_on_gemma(tiny_models, family):
    stderr = eval_progress(tiny_models[family])
    assert_head_after_layers(stderr, "evaluating", 3, HEAD, 3 * 31)  # 3 windows x 31 predicted tokens


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_depth_ppl_shows_the_head_after_each_pass_on_gemma(tiny_models, family, tmp_path):
    stderr = depth_progress(tiny_models[family], tmp_path / "out", "ppl")
    # one pass: 3 blocks, then the head over the 3 skip streams' 2 x 15 predicted tokens each
    assert_head_after_layers(stderr, "ppl pass 1", 3, "ppl pass 1: LM head", 3 * 2 * 15)


def test_depth_taylor_shows_the_head_gradient_between_its_passes(tiny_models, tmp_path):
    stderr = depth_progress(tiny_models["gemma3"], tmp_path / "out", "taylor")
    names = [name for name, _ in finished_bars(stderr)]
    assert names == ["taylor forward", "taylor: LM head gradient", "taylor backward"], names


@pytest.mark.smollm2
def test_eval_and_depth_show_the_head_after_the_layers_on_smollm2(smollm2, tmp_path):
    assert_head_after_layers(eval_progress(smollm2, windows=1), "evaluating", 30, HEAD, 31)
    stderr = depth_progress(smollm2, tmp_path / "out", "ppl", nsamples=1, seqlen=8)
    assert_head_after_layers(stderr, "ppl pass 1", 30, "ppl pass 1: LM head", 30 * 7)
