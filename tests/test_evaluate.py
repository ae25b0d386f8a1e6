"""Streamed evaluation equals transformers' whole model: perplexity and zero-shot predictions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import DATA, TINY_FAMILIES, WIKITEXT, attention
from typer.testing import CliRunner

from streamprune.cli import app
from streamprune.evaluate import EvalConfig, Sequence, encode_pair, evaluate, leading_ids, pair_sequence, ppl_windows
from streamprune.tasks import TASKS, load_task

ZEROSHOT = DATA / "zeroshot"


def whole_model(model_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation=attention(model_dir)).eval()


@torch.no_grad()
def whole_model_loglik(model, sequence: Sequence) -> float:
    ids = torch.tensor([sequence.inputs])
    logprobs = model(ids).logits[0].float().log_softmax(-1)  # [len, vocab]
    targets = torch.tensor(sequence.tokens[sequence.target_start :])
    return float(logprobs[sequence.target_start - 1 :].gather(1, targets.unsqueeze(1)).double().sum())


@torch.no_grad()
def whole_model_ppl(model, tokenizer, seqlen: int, limit: int) -> float:
    """The Wanda repository's eval_ppl on non-overlapping windows, with the exact token mean."""
    ids = tokenizer(WIKITEXT.read_text(), return_tensors="pt").input_ids
    nll, count = 0.0, 0
    for i in range(min(limit, ids.shape[1] // seqlen)):
        window = ids[:, i * seqlen : (i + 1) * seqlen]
        logits = model(window).logits[0, :-1].float()
        nll += float(torch.nn.functional.cross_entropy(logits, window[0, 1:], reduction="sum"))
        count += seqlen - 1
    return math.exp(nll / count)


def whole_model_predictions(model, tokenizer, task: str, limit: int, seqlen: int) -> list[int]:
    predictions = []
    for example in load_task(task, ZEROSHOT, limit):
        lls = [whole_model_loglik(model, pair_sequence(tokenizer, c, t, seqlen)) for c, t in example.pairs]
        predictions.append(max(range(len(lls)), key=lls.__getitem__))
    return predictions


def test_encode_pair_moves_trailing_space_to_the_continuation(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    context, continuation = encode_pair(tokenizer, "The cat sat on the ", "mat.")
    assert context == tokenizer("The cat sat on the", add_special_tokens=False).input_ids
    assert context + continuation == tokenizer("The cat sat on the mat.", add_special_tokens=False).input_ids


def test_ppl_windows_are_non_overlapping_and_limited(tiny_llama):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    ids = tokenizer("one two three four five six seven eight nine ten").input_ids
    windows = ppl_windows(tokenizer, "one two three four five six seven eight nine ten", 3, None)
    assert len(windows) == len(ids) // 3
    assert [w.tokens for w in windows] == [ids[i * 3 : i * 3 + 3] for i in range(len(windows))]
    assert len(ppl_windows(tokenizer, "one two three four five six seven eight nine ten", 3, 1)) == 1


@pytest.mark.parametrize("model", ["tiny_llama", "smollm2"])
def test_a_limited_text_is_tokenized_as_the_whole_text_begins(request, model):
    """With --limit only a prefix is tokenized; its ids are the whole text's first ids, wherever the
    cut falls (one line, or lines)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(request.getfixturevalue(model))
    text = WIKITEXT.read_text()[:120_000]
    for body in (text, text.replace("\n", " ")):
        whole = tokenizer(body, return_attention_mask=False, verbose=False).input_ids
        for needed in (1, 517, 4096, 20_000, len(whole) + 5):
            assert leading_ids(tokenizer, body, needed)[:needed] == whole[:needed]


def test_a_long_line_with_a_limit_is_read_in_little_memory(tiny_llama, tmp_path):
    """A 30 MB --ppl file of one line, --limit 2: the tokenizer sees only a prefix (it took gigabytes
    on the whole line); the peak RSS of the whole eval stays under 1.5 GB."""
    line = WIKITEXT.read_text().replace("\n", " ")
    text = tmp_path / "line.txt"
    text.write_text((line * (30_000_000 // len(line) + 1))[:30_000_000])
    probe = (
        "import resource, subprocess, sys; code = subprocess.run(sys.argv[1:]).returncode; "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(code)"
    )
    args = [sys.executable, "-c", probe, sys.executable, "-m", "streamprune", "eval", str(tiny_llama),
            "--ppl", str(text), "--limit", "2", "--seqlen", "128", "--quiet"]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "perplexity" in done.stdout and "2 windows x 128 tokens" in done.stdout
    assert int(done.stdout.split()[-1]) * 1024 < 1.5e9


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_streamed_equals_whole_model_on_tiny_models(tiny_models, family, tmp_path):
    from transformers import AutoTokenizer

    model_dir = tiny_models[family]
    tasks = ["arc_easy", "winogrande", "hellaswag"]
    config = EvalConfig(
        model=str(model_dir),
        ppl=str(WIKITEXT),
        tasks=tasks,
        data_dir=str(ZEROSHOT),
        seqlen=64,
        limit=6,
        batch_tokens=300,
        quiet=True,
    )
    results = evaluate(config)
    model, tokenizer = whole_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    expected = whole_model_ppl(model, tokenizer, 64, 6)
    assert results["perplexity"]["windows"] == 6 and results["perplexity"]["tokens"] == 6 * 64
    assert results["perplexity"]["ppl"] == pytest.approx(expected, rel=1e-5)
    for task in tasks:
        assert results["tasks"][task]["predictions"] == whole_model_predictions(model, tokenizer, task, 6, 64)


def test_offloaded_buffer_gives_the_same_results(tiny_llama, tmp_path):
    common = dict(model=str(tiny_llama), ppl=str(WIKITEXT), seqlen=32, limit=4, quiet=True)
    in_ram = evaluate(EvalConfig(**common))
    on_disk = evaluate(EvalConfig(**common, offload_dir=str(tmp_path / "offload")))
    assert on_disk["perplexity"]["ppl"] == in_ram["perplexity"]["ppl"]
    assert list((tmp_path / "offload").iterdir()) == []  # the buffer file is gone afterwards


def test_activations_that_do_not_fit_in_ram_are_refused_with_the_way_out(tiny_llama, monkeypatch):
    import streamprune.evaluate

    monkeypatch.setattr(streamprune.evaluate, "available_ram_bytes", lambda: 10_000)
    result = invoke("eval", tiny_llama, "--ppl", WIKITEXT, "--seqlen", "32", "--limit", "4", "--quiet")
    assert result.exit_code == 4, result.output
    text = " ".join(result.output.split())
    assert "(124 tokens x 64 x 4 bytes = 31.00 KiB) do not fit in the 9.77 KiB of RAM available" in text, text
    assert "--offload-dir DIR" in text


def test_every_task_loads_with_the_harness_prompts():
    sizes = {
        "arc_easy": 2376,
        "arc_challenge": 1172,
        "piqa": 1838,
        "boolq": 3270,
        "winogrande": 1267,
        "hellaswag": 10042,
        "openbookqa": 500,
    }
    for task in TASKS:
        examples = load_task(task, ZEROSHOT)
        assert len(examples) == sizes[task], task
        assert all(0 <= e.gold < len(e.pairs) for e in examples)
    arc = load_task("arc_easy", ZEROSHOT, 1)[0]
    assert arc.pairs[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    boolq = load_task("boolq", ZEROSHOT, 1)[0]
    assert boolq.pairs[0][0].endswith("\nQuestion: does ethanol take more energy make that produces?\nAnswer:")
    assert [c for _, c in boolq.pairs] == [" no", " yes"] and boolq.gold == 0
    wino = load_task("winogrande", ZEROSHOT, 1)[0]
    assert wino.pairs == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert wino.gold == 1 and wino.choice_bytes is None
    obqa = load_task("openbookqa", ZEROSHOT, 2)[1]
    assert obqa.pairs[0] == ("There is most likely going to be fog around:", " a marsh") and obqa.gold == 0


def invoke(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_cli_eval_prints_a_table_and_writes_json(tiny_llama, tmp_path):
    out = tmp_path / "results.json"
    result = invoke(
        "eval",
        tiny_llama,
        "--ppl",
        WIKITEXT,
        "--tasks",
        "piqa,boolq",
        "--data-dir",
        ZEROSHOT,
        "--seqlen",
        "32",
        "--limit",
        "3",
        "--output",
        out,
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    assert "perplexity" in result.output and "piqa" in result.output and "average acc" in result.output
    saved = json.loads(out.read_text())
    assert saved["tasks"]["piqa"]["n"] == 3 and saved["perplexity"]["windows"] == 3


@pytest.mark.parametrize(
    "args, phrase",
    [
        ([], "nothing to evaluate"),
        (["--tasks", "mmlu", "--data-dir", "x"], "unknown task 'mmlu'"),
        (["--tasks", "piqa", "--data-dir", "x", "--num-fewshot", "1"], "apply to lm-evaluation-harness tasks"),
        (["--ppl", "/nonexistent.txt"], "cannot read it"),
        (["--tasks", "piqa", "--data-dir", "/nonexistent"], "not found; --data-dir must hold"),
        (["--ppl", str(WIKITEXT), "--limit", "0"], "--limit must be positive"),
        (["--ppl", str(WIKITEXT), "--device", "gpu0"], "--device 'gpu0' is not a device"),
    ],
)
def test_cli_eval_bad_input(tiny_llama, args, phrase):
    result = invoke("eval", tiny_llama, *args, "--quiet")
    assert result.exit_code in (2, 3), result.output
    assert phrase in " ".join(result.output.split()), result.output


def test_run_with_eval_ppl_evaluates_the_pruned_model(tiny_llama, tmp_path):
    out = tmp_path / "pruned"
    result = invoke(
        "run",
        tiny_llama,
        "--out",
        out,
        "--calib",
        WIKITEXT,
        "--nsamples",
        "4",
        "--seqlen",
        "32",
        "--eval-ppl",
        WIKITEXT,
        "--eval-seqlen",
        "32",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    record = json.loads((out / "streamprune.json").read_text())
    pruned_ppl = record["evaluation"]["perplexity"]["ppl"]
    assert f"perplexity {pruned_ppl:.3f}" in result.output
    again = evaluate(EvalConfig(model=str(out), ppl=str(WIKITEXT), seqlen=32, quiet=True))
    assert again["perplexity"]["ppl"] == pruned_ppl


def test_run_with_a_missing_eval_ppl_file_is_refused_before_pruning(tiny_llama, tmp_path):
    out = tmp_path / "pruned"
    result = invoke("run", tiny_llama, "--out", out, "--calib", WIKITEXT, "--eval-ppl", tmp_path / "nope.txt")
    assert result.exit_code == 2 and "--eval-ppl" in result.output and "no such file" in result.output
    assert not out.exists()


@pytest.mark.smollm2
def test_smollm2_streamed_equals_whole_model(smollm2):
    from transformers import AutoTokenizer

    limit = 4  # 4 windows, 4 questions of each of the 7 tasks: every one must agree (CI time)
    config = EvalConfig(
        model=str(smollm2),
        ppl=str(WIKITEXT),
        tasks=list(TASKS),
        data_dir=str(ZEROSHOT),
        seqlen=512,
        limit=limit,
        quiet=True,
    )
    results = evaluate(config)
    model, tokenizer = whole_model(smollm2), AutoTokenizer.from_pretrained(smollm2)
    expected = whole_model_ppl(model, tokenizer, 512, limit)
    assert results["perplexity"]["ppl"] == pytest.approx(expected, rel=1e-3)
    same = total = 0
    for task in TASKS:
        reference = whole_model_predictions(model, tokenizer, task, limit, 512)
        streamed = results["tasks"][task]["predictions"]
        same += sum(a == b for a, b in zip(reference, streamed))
        total += len(reference)
    assert same / total >= 0.995, (same, total)
