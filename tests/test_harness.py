"""The `streamprune` lm-evaluation-harness backend equals the harness's own `hf` backend: per-request
log-likelihoods, per-example predictions, rolling log-likelihoods; generation is refused."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import DATA, WIKITEXT
from typer.testing import CliRunner

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the local task files only; never the hub
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEMPLATES = Path(__file__).parent / "harness_tasks"
ZEROSHOT = DATA / "zeroshot"
TASKS = ("arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "hellaswag", "openbookqa")
LOCAL = [f"{task}_local" for task in TASKS]


@pytest.fixture(scope="module")
def harness():
    """lm-evaluation-harness, or the test is skipped (CI installs it: the eval extra)."""
    return pytest.importorskip("lm_eval", reason="needs the eval extra: pip install -e '.[eval]'")


@pytest.fixture(scope="module")
def task_dir(harness, tmp_path_factory) -> Path:
    """The local task YAMLs with their data paths filled in, and PIQA's labels merged into its file."""
    root = tmp_path_factory.mktemp("harness_tasks")
    prepared = root / "prepared"
    prepared.mkdir()
    goals = (ZEROSHOT / "piqa" / "valid.jsonl").read_text().splitlines()
    labels = (ZEROSHOT / "piqa" / "valid-labels.lst").read_text().split()
    merged = [json.dumps({**json.loads(g), "label": int(label)}) for g, label in zip(goals, labels)]
    (prepared / "piqa_valid.jsonl").write_text("\n".join(merged) + "\n")
    tasks = root / "tasks"
    tasks.mkdir()
    for template in TEMPLATES.glob("*.yaml"):
        text = template.read_text().replace("{data}", str(DATA)).replace("{prepared}", str(prepared))
        (tasks / template.name).write_text(text)
    shutil.copy(TEMPLATES / "utils.py", tasks / "utils.py")
    return tasks


@pytest.fixture(scope="module")
def task_requests(task_dir) -> dict:
    """{task: its loglikelihood Instances for the first 4 documents}, built once (building the
    datasets is most of a small run's time) and scored by both backends."""
    from lm_eval.tasks import TaskManager, get_task_dict

    found = {}
    for name, task in get_task_dict(LOCAL, TaskManager(include_path=str(task_dir))).items():
        task.build_all_requests(limit=4, rank=0, world_size=1)
        found[name] = task.instances
    return found


def predictions(instances, lls) -> list[int]:
    """Per document, the choice with the highest log-likelihood (the harness's acc)."""
    by_doc: dict[int, list[tuple[int, float]]] = {}
    for instance, ll in zip(instances, lls):
        by_doc.setdefault(instance.doc_id, []).append((instance.idx, ll))
    return [max(sorted(by_doc[d]), key=lambda pair: pair[1])[0] for d in sorted(by_doc)]


def assert_equivalent(model_dir: Path, task_requests: dict, documents: int) -> dict:
    """Every request of the first `documents` documents of each task: streamprune's (log-likelihood,
    is_greedy) equal hf's, and so do the predictions. Returns the largest difference per task."""
    from lm_eval.models.huggingface import HFLM

    from streamprune.harness import StreamedLM

    hf = HFLM(pretrained=str(model_dir), dtype="float32", device="cpu", batch_size=8)
    ours = StreamedLM(str(model_dir), device="cpu", dtype="float32", quiet=True)
    chosen = {task: [i for i in instances if i.doc_id < documents] for task, instances in task_requests.items()}
    every = [i for instances in chosen.values() for i in instances]
    expected = hf.loglikelihood(every, disable_tqdm=True)
    found = ours.loglikelihood(every, disable_tqdm=True)  # all seven tasks in one streamed pass, as the harness calls
    worst, first = {}, 0
    for task, instances in chosen.items():
        mine, theirs = found[first : first + len(instances)], expected[first : first + len(instances)]
        first += len(instances)
        assert len({i.doc_id for i in instances}) == documents
        worst[task] = max(abs(a[0] - b[0]) for a, b in zip(mine, theirs))
        assert worst[task] < 1e-3, task
        assert [a[1] for a in mine] == [b[1] for b in theirs], task  # is_greedy
        assert predictions(instances, [a[0] for a in mine]) == predictions(instances, [b[0] for b in theirs]), task
    print(f"largest |log-likelihood difference| per task: {worst}")
    return worst


def test_tiny_model_equals_hf_on_seven_tasks(tiny_llama, task_requests):
    assert_equivalent(tiny_llama, task_requests, documents=4)


@pytest.mark.smollm2
def test_smollm2_equals_hf_on_seven_tasks(smollm2, task_requests):
    # one document per task (22 requests): two took ~35 s per backend on 2 shared CPU cores
    assert_equivalent(smollm2, task_requests, documents=1)


def rolling_instances(texts: list[str]):
    from lm_eval.api.instance import Instance

    return [Instance("loglikelihood_rolling", {}, (text,), i) for i, text in enumerate(texts)]


def test_rolling_loglikelihood_equals_hf_across_windows(harness, tiny_llama):
    """Texts longer than max_length: several disjoint windows each, as hf cuts them."""
    from lm_eval.models.huggingface import HFLM

    from streamprune.harness import StreamedLM

    lines = [line for line in WIKITEXT.read_text().splitlines() if line.strip()]
    texts = ["\n".join(lines[:12]), "\n".join(lines[12:20]), lines[20]]
    hf = HFLM(pretrained=str(tiny_llama), dtype="float32", device="cpu", batch_size=4, max_length=64)
    ours = StreamedLM(str(tiny_llama), device="cpu", dtype="float32", max_length=64, quiet=True)
    expected = hf.loglikelihood_rolling(rolling_instances(texts), disable_tqdm=True)
    found = ours.loglikelihood_rolling(rolling_instances(texts), disable_tqdm=True)
    assert len(ours.tok_encode(texts[0])) > 3 * 64  # really several windows
    for a, b in zip(found, expected):
        assert abs(a - b) <= 1e-3 * abs(b)


def test_wikitext_task_equals_hf_through_the_harness(tiny_llama, task_dir):
    """A loglikelihood_rolling task end to end (simple_evaluate, per-document sums, perplexities),
    with a max_length short enough that the long rows take several windows; hf scores the same
    documents directly (a second simple_evaluate would rebuild the dataset)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from streamprune.harness import StreamedLM

    ours = simple_evaluate(
        model=StreamedLM(str(tiny_llama), device="cpu", dtype="float32", max_length=64, quiet=True),
        tasks=["wikitext_local"], limit=6, log_samples=True, bootstrap_iters=0,
        task_manager=TaskManager(include_path=str(task_dir)),
    )  # fmt: skip
    samples = sorted(ours["samples"]["wikitext_local"], key=lambda s: s["doc_id"])
    found = [s["resps"][0][0] for s in samples]
    hf = HFLM(pretrained=str(tiny_llama), dtype="float32", device="cpu", batch_size=4, max_length=64)
    expected = hf.loglikelihood_rolling(rolling_instances([s["arguments"][0][0] for s in samples]), disable_tqdm=True)
    assert len(found) == len(expected) == 6
    for a, b in zip(found, expected):
        assert abs(a - b) <= 1e-3 * abs(b)
    # the harness's word_perplexity: exp(-sum of log-likelihoods / words), words as its count_words splits them
    words = sum(len(re.split(r"\s+", s["arguments"][0][0])) for s in samples)
    assert ours["results"]["wikitext_local"]["word_perplexity,none"] == pytest.approx(
        math.exp(-sum(expected) / words), rel=1e-3
    )


def test_loglikelihood_matches_hf_tokenization_and_greedy(harness, tiny_llama):
    """Empty context (the prefix token), a context longer than max_length (left-truncated) and
    trailing spaces: same tokens, same (log-likelihood, is_greedy) as hf."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from streamprune.harness import StreamedLM

    long = " ".join(WIKITEXT.read_text().split()[:200])
    pairs = [("", "The cat"), (long, " end."), ("The cat sat on the ", "mat."), ("Question: why?\nAnswer:", " yes")]
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    hf = HFLM(pretrained=str(tiny_llama), dtype="float32", device="cpu", batch_size=4, max_length=48)
    ours = StreamedLM(str(tiny_llama), device="cpu", dtype="float32", max_length=48, quiet=True)
    expected = hf.loglikelihood(requests, disable_tqdm=True)
    found = ours.loglikelihood(requests, disable_tqdm=True)
    for (a, greedy_a), (b, greedy_b) in zip(found, expected):
        assert abs(a - b) < 1e-3
        assert greedy_a == greedy_b


def test_generate_until_is_refused_naming_the_task(harness, tiny_llama):
    from lm_eval.api.instance import Instance

    from streamprune.errors import UsageError
    from streamprune.harness import StreamedLM

    lm = StreamedLM(str(tiny_llama), device="cpu", quiet=True)
    request = Instance("generate_until", {}, ("Q: 2+2?\nA:", {"until": ["\n"]}), 0, metadata=("gsm8k", 0, 1))
    with pytest.raises(UsageError, match="gsm8k.*generate text.*once per generated token"):
        lm.generate_until([request])


def test_simple_evaluate_by_name_with_model_args(tiny_llama, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    import streamprune.harness  # noqa: F401  (registers "streamprune")

    output = simple_evaluate(model="streamprune", model_args=f"pretrained={tiny_llama},device=cpu,quiet=True",
                             tasks=["boolq_local"], limit=2, task_manager=TaskManager(include_path=str(task_dir)))  # fmt: skip
    assert output["results"]["boolq_local"]["acc,none"] in (0.0, 0.5, 1.0)


def test_cli_runs_harness_tasks_with_include_path(tiny_llama, task_dir, tmp_path):
    from streamprune.cli import app

    out = tmp_path / "results.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--tasks", "arc_easy_local,winogrande_local",
                                      "--include-path", str(task_dir), "--limit", "2", "--device", "cpu", "--quiet",
                                      "--output", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["backend"] == "lm-evaluation-harness (streamprune)"
    assert set(saved["results"]) == {"arc_easy_local", "winogrande_local"}
    assert "acc_stderr,none" in saved["results"]["arc_easy_local"]
    assert "arc_easy_local" in result.output


def test_cli_refuses_an_unknown_harness_task(tiny_llama, task_dir):
    from streamprune.cli import app

    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--tasks", "arc_easy_locl", "--include-path",
                                      str(task_dir), "--device", "cpu"])  # fmt: skip
    assert result.exit_code == 2
    assert "knows no task 'arc_easy_locl'" in result.output and "arc_easy_local" in result.output


def test_without_lm_eval_the_cli_says_how_to_get_it(tiny_llama, monkeypatch):
    import importlib.util

    from streamprune.cli import app

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "lm_eval" else real(name, *a))
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--tasks", "arc_easy", "--device", "cpu"])
    assert result.exit_code == 2
    assert "lm-eval is not installed" in result.output and "--data-dir" in result.output


def test_harness_flags_are_refused_on_the_built_in_path(tiny_llama):
    from streamprune.cli import app

    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--tasks", "arc_easy", "--data-dir", str(ZEROSHOT),
                                      "--num-fewshot", "5"])  # fmt: skip
    assert result.exit_code == 2
    assert "--num-fewshot apply to lm-evaluation-harness tasks" in result.output


def test_streamprune_imports_without_lm_eval():
    """The eval extra is optional: the package and its CLI import with lm_eval unimportable."""
    code = "import sys; sys.modules['lm_eval'] = None; import streamprune, streamprune.cli, streamprune.evaluate"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# -- BOS: models whose tokenizer prepends it (Gemma) are scored with it, on every path -------------------


@pytest.fixture(scope="module", params=["gemma2", "gemma3"])
def gemma_with_bos(request, tiny_models, tmp_path_factory) -> Path:
    """A tiny Gemma whose tokenizer prepends its BOS by default, as Gemma's own do (the fixtures'
    tokenizer adds none, which would hide the difference)."""
    from transformers import AutoTokenizer

    directory = tmp_path_factory.mktemp("bos") / request.param
    shutil.copytree(tiny_models[request.param], directory)
    AutoTokenizer.from_pretrained(directory, add_bos_token=True).save_pretrained(directory)
    tokenizer = AutoTokenizer.from_pretrained(directory)
    assert tokenizer("Question:").input_ids[0] == tokenizer.bos_token_id
    return directory


def test_gemma_with_bos_equals_hf_on_seven_tasks(gemma_with_bos, task_requests):
    """The streamed backend encodes as hf does (BOS before every context): equal within 1e-3."""
    assert_equivalent(gemma_with_bos, task_requests, documents=2)


def test_built_in_tasks_score_gemma_as_hf_does(harness, gemma_with_bos):
    """The built-in tasks (tasks.py, evaluate.pair_sequence) put the BOS where hf does: every
    sequence starts with it, and each choice's log-likelihood equals hf's on the same text."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoTokenizer

    from streamprune.evaluate import pair_sequence, stream_logprobs
    from streamprune.harness import StreamSettings
    from streamprune.stream import open_source
    from streamprune.tasks import TASKS as BUILT_IN
    from streamprune.tasks import load_task

    tokenizer = AutoTokenizer.from_pretrained(gemma_with_bos)
    source = open_source(str(gemma_with_bos), torch.device("cpu"), "float32")
    max_length = source.capped_seqlen(2048)  # as eval caps --seqlen; hf's max_length is the same 256
    pairs = [pair for task in BUILT_IN for example in load_task(task, ZEROSHOT, 2) for pair in example.pairs]
    sequences = [pair_sequence(tokenizer, context, continuation, max_length) for context, continuation in pairs]
    whole = [s for s in sequences if len(s.tokens) <= max_length]  # not left-truncated (boolq's long passages are)
    assert len(whole) >= 40 and all(s.tokens[0] == tokenizer.bos_token_id for s in whole)
    found = [float(lp.double().sum()) for lp in stream_logprobs(source, sequences, StreamSettings(quiet=True))]
    hf = HFLM(pretrained=str(gemma_with_bos), dtype="float32", device="cpu", batch_size=8)
    requests = [Instance("loglikelihood", {}, pair, i) for i, pair in enumerate(pairs)]
    expected = [ll for ll, _ in hf.loglikelihood(requests, disable_tqdm=True)]
    assert len(found) == len(expected) == len(pairs)
    worst = max(abs(a - b) for a, b in zip(found, expected))
    print(f"largest |log-likelihood difference| of {len(pairs)} built-in requests: {worst:.2e}")
    assert worst < 1e-3
