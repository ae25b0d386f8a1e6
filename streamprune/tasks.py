"""Zero-shot multiple-choice tasks, read from local files, phrased as lm-evaluation-harness phrases them.

Each example becomes a few (context, continuation) pairs, one per choice; the model's answer is
the choice whose continuation is most likely given its context (`acc`), or most likely per byte of
the choice (`acc_norm`). Prompts follow the harness's task definitions (lm_eval/tasks/*/*.yaml):

  arc_easy, arc_challenge  "Question: {question}\\nAnswer:" + " {choice}"
  piqa                     "Question: {goal}\\nAnswer:" + " {sol}"
  boolq                    "{passage}\\nQuestion: {question}?\\nAnswer:" + " no" / " yes"
  winogrande               partial scoring: context "{sentence up to _}{option}", continuation
                           " {rest of the sentence}"; acc only, as the harness reports
  hellaswag                "{ctx}" + " {ending}", both through the harness's preprocess()
  openbookqa               "{question_stem}" + " {choice}"

Differences, all forced by the local files (../shared/data/zeroshot/README): HellaSwag's `ctx`
arrives already joined as "{activity_label}: {ctx_a} {ctx_b}" without the harness's
capitalisation of ctx_b; OpenBookQA's choices are parsed from the TSV's "(A) ... (B) ..." column.
"""

from __future__ import annotations

import csv
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError, UsageError

TASKS = ("arc_easy", "arc_challenge", "piqa", "boolq", "winogrande", "hellaswag", "openbookqa")


@dataclass
class Example:
    pairs: list[tuple[str, str]]  # (context, continuation) per choice
    gold: int
    choice_bytes: list[int] | None  # len(choice.encode()) per choice, for acc_norm; None: acc only


def load_task(name: str, data_dir: Path, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of task `name` (all when None) from `data_dir` (zeroshot layout)."""
    if name not in TASKS:
        raise UsageError(f"unknown task {name!r}; choose from: {', '.join(TASKS)}")
    loader = {
        "arc_easy": lambda d: _arc(d / "arc" / "ARC-Easy-test.jsonl"),
        "arc_challenge": lambda d: _arc(d / "arc" / "ARC-Challenge-test.jsonl"),
        "piqa": _piqa,
        "boolq": _boolq,
        "winogrande": _winogrande,
        "hellaswag": _hellaswag,
        "openbookqa": _openbookqa,
    }[name]
    try:
        examples = loader(Path(data_dir))
    except FileNotFoundError as err:
        raise BadInputError(
            f"task {name}: {err.filename} not found; --data-dir must hold the zeroshot layout "
            "(arc/, piqa/, boolq/, winogrande/, hellaswag/, openbookqa/), e.g. ../shared/data/zeroshot"
        ) from err
    except (KeyError, ValueError, IndexError) as err:
        raise BadInputError(f"task {name}: cannot parse its file under {data_dir} ({err!r})") from err
    return examples[:limit] if limit is not None else examples


def _choices(context: str, choices: list[str], gold: int) -> Example:
    return Example([(context, " " + c) for c in choices], gold, [len(c.encode()) for c in choices])


def _jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _labels(path: Path) -> list[str]:
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def _arc(path: Path) -> list[Example]:
    examples = []
    for doc in _jsonl(path):
        labels = doc["choices"]["label"]
        examples.append(
            _choices(f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], labels.index(doc["answerKey"]))
        )
    return examples


def _piqa(data_dir: Path) -> list[Example]:
    docs = _jsonl(data_dir / "piqa" / "valid.jsonl")
    labels = _labels(data_dir / "piqa" / "valid-labels.lst")
    if len(labels) != len(docs):
        raise ValueError(f"{len(docs)} questions but {len(labels)} labels")
    return [
        _choices(f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(label))
        for doc, label in zip(docs, labels)
    ]


def _boolq(data_dir: Path) -> list[Example]:
    examples = []
    for doc in _jsonl(data_dir / "boolq" / "val.jsonl"):
        label = doc["label"]
        gold = int(label) if isinstance(label, bool) else {"false": 0, "true": 1}[str(label).lower()]
        examples.append(_choices(f"{doc['passage']}\nQuestion: {doc['question']}?\nAnswer:", ["no", "yes"], gold))
    return examples


def _winogrande(data_dir: Path) -> list[Example]:
    examples = []
    for doc in _jsonl(data_dir / "winogrande" / "dev.jsonl"):
        sentence = doc["sentence"]
        blank = sentence.index("_")
        continuation = " " + sentence[blank + 1 :].strip()
        pairs = [(sentence[:blank] + option, continuation) for option in (doc["option1"], doc["option2"])]
        examples.append(Example(pairs, {"1": 0, "2": 1}[str(doc["answer"])], None))
    return examples


def _hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py preprocess()."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(data_dir: Path) -> list[Example]:
    return [
        _choices(
            _hellaswag_preprocess(doc["ctx"]), [_hellaswag_preprocess(e) for e in doc["endings"]], int(doc["label"])
        )
        for doc in _jsonl(data_dir / "hellaswag" / "hellaswag_val.jsonl")
    ]


def _openbookqa(data_dir: Path) -> list[Example]:
    examples = []
    with open(data_dir / "openbookqa" / "test.tsv", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            parts = re.split(r"\(([A-D])\)\s*", row["Choices"])[1:]  # ["A", "text ", "B", ...]
            letters, texts = parts[0::2], [t.strip() for t in parts[1::2]]
            examples.append(_choices(row["Question Stem"], texts, letters.index(row["Answer Key"].strip())))
    return examples
