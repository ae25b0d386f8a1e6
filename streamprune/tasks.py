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

Tokens: as the harness's `hf` backend makes them (hf_encode), BOS included where the tokenizer adds
one by default: lm-eval 0.4.13 has no per-family rule of its own (its add_bos_token defaults to None,
the tokenizer's default; the Gemma special case of earlier releases is gone), and Gemma's tokenizers
prepend <bos>, without which Gemma scores near chance.

Differences, all forced by the local files (docs/data.md lists them): HellaSwag's `ctx`
arrives already joined as "{activity_label}: {ctx_a} {ctx_b}" without the harness's
capitalisation of ctx_b; OpenBookQA's choices are parsed from the TSV's "(A) ... (B) ..." column.
"""

from __future__ import annotations

import csv
import io
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


def prefix_token(tokenizer, custom: int | None = None) -> int:
    """HFLM.prefix_token_id: the token an empty context is replaced by, and whose text at the start
    of a string means "already has its BOS": `custom`, else BOS, else EOS."""
    if custom is not None:
        return custom
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id


def hf_encode(tokenizer, text: str, add_special_tokens: bool | None = None, add_bos_token: bool | None = None,
              prefix_token_id: int | None = None) -> list[int]:  # fmt: skip
    """The token ids of `text` as lm-evaluation-harness 0.4.13's `hf` backend makes them
    (HFLM.tok_encode): `add_special_tokens` if given, else `add_bos_token` (HFLM's model_arg,
    default None), else the tokenizer's own default, which prepends BOS where the tokenizer is made
    to (Gemma's, Llama's; not SmolLM2's or Qwen's). A text that already starts with the prefix
    token's text gets no second one. Every zero-shot score goes through this, built-in and harness
    alike, so that the two paths and `--model hf` see the same tokens."""
    flag = add_special_tokens if add_special_tokens is not None else add_bos_token
    special = {} if flag is None else {"add_special_tokens": flag}
    if add_special_tokens is None and text.startswith(tokenizer.decode(prefix_token(tokenizer, prefix_token_id))):
        special["add_special_tokens"] = False
    return tokenizer.encode(text, **special)


def load_task(name: str, data_dir: Path, limit: int | None = None) -> list[Example]:
    """The first `limit` examples of task `name` (all when None) from `data_dir` (zeroshot layout).
    A file that cannot be used is refused naming it and, where one is to blame, its line."""
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
            "(arc/, piqa/, boolq/, winogrande/, hellaswag/, openbookqa/, their files as streamprune/tasks.py lists them)"
        ) from err
    except OSError as err:  # a directory where the file should be, no permission, ...
        raise BadInputError(f"task {name}: cannot read {err.filename}: {err.strerror}") from err
    return examples[:limit] if limit is not None else examples


class _Malformed(ValueError):
    """What is wrong with one record; `_examples` adds the file and line."""


def _examples(path: Path, records, convert) -> list[Example]:
    """convert(record) for every (line number, record); the first bad one is refused by file and
    line, and a file without examples is refused too."""
    examples = []
    for number, record in records:
        try:
            examples.append(convert(record))
        except _Malformed as err:
            raise BadInputError(f"{path}, line {number}: {err}; fix or replace the file") from None
    if not examples:
        raise BadInputError(f"{path} holds no examples; it should have one per line")
    return examples


def _read_text(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise BadInputError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None


def _jsonl(path: Path):
    """(line number, object) for every non-blank line of a JSON-lines file."""
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise BadInputError(f"{path}, line {number}: not JSON ({err.msg}); fix or replace the file") from None
        if not isinstance(record, dict):
            raise BadInputError(
                f"{path}, line {number}: a JSON {type(record).__name__}, not an object; fix or replace the file"
            )
        yield number, record


def _text(record: dict, key: str) -> str:
    if key not in record:
        raise _Malformed(f'no "{key}" field')
    if not isinstance(record[key], str):
        raise _Malformed(f'"{key}" is not a string ({record[key]!r})')
    return record[key]


def _texts(record: dict, key: str, where: str | None = None) -> list[str]:
    value = record.get(key)
    if key not in record:
        raise _Malformed(f'no "{where or key}" field')
    if not isinstance(value, list) or not value or not all(isinstance(item, str) for item in value):
        raise _Malformed(f'"{where or key}" is not a non-empty list of strings')
    return value


def _gold(value, choices: dict) -> int:
    """The index of the right answer, from a label the file spells one of `choices`' ways."""
    key = str(value).strip().lower() if isinstance(value, (str, int, bool)) else None
    if key not in choices:
        raise _Malformed(f"the answer {value!r} is none of {', '.join(map(repr, choices))}")
    return choices[key]


def _choices(context: str, choices: list[str], gold: int) -> Example:
    return Example([(context, " " + c) for c in choices], gold, [len(c.encode()) for c in choices])


def _arc(path: Path) -> list[Example]:
    def convert(doc: dict) -> Example:
        if not isinstance(doc.get("choices"), dict):
            raise _Malformed('"choices" is not an object with "label" and "text" lists')
        labels, texts = _texts(doc["choices"], "label", "choices.label"), _texts(doc["choices"], "text", "choices.text")
        if len(labels) != len(texts):
            raise _Malformed(f"{len(labels)} choice labels but {len(texts)} choice texts")
        gold = _gold(_text(doc, "answerKey"), {label.lower(): i for i, label in enumerate(labels)})
        return _choices(f"Question: {_text(doc, 'question')}\nAnswer:", texts, gold)

    return _examples(path, _jsonl(path), convert)


def _piqa(data_dir: Path) -> list[Example]:
    path, labels_path = data_dir / "piqa" / "valid.jsonl", data_dir / "piqa" / "valid-labels.lst"
    records = list(_jsonl(path))
    lines = enumerate(_read_text(labels_path).split("\n"), start=1)
    labels = [(number, line.strip()) for number, line in lines if line.strip()]
    if len(labels) != len(records):
        raise BadInputError(
            f"{labels_path} has {len(labels)} labels but {path} has {len(records)} questions; "
            "the two files must match line for line"
        )
    golds = _examples(labels_path, labels, lambda label: _gold(label, {"0": 0, "1": 1}))
    pairs = zip(records, golds)

    def convert(pair) -> Example:
        doc, gold = pair
        return _choices(f"Question: {_text(doc, 'goal')}\nAnswer:", [_text(doc, "sol1"), _text(doc, "sol2")], gold)

    return _examples(path, ((number, (doc, gold)) for (number, doc), gold in pairs), convert)


def _boolq(data_dir: Path) -> list[Example]:
    def convert(doc: dict) -> Example:
        if "label" not in doc:
            raise _Malformed('no "label" field')
        gold = _gold(doc["label"], {"false": 0, "true": 1})
        return _choices(f"{_text(doc, 'passage')}\nQuestion: {_text(doc, 'question')}?\nAnswer:", ["no", "yes"], gold)

    path = data_dir / "boolq" / "val.jsonl"
    return _examples(path, _jsonl(path), convert)


def _winogrande(data_dir: Path) -> list[Example]:
    def convert(doc: dict) -> Example:
        sentence = _text(doc, "sentence")
        if "_" not in sentence:
            raise _Malformed('"sentence" has no blank ("_") to fill')
        blank = sentence.index("_")
        continuation = " " + sentence[blank + 1 :].strip()
        options = (_text(doc, "option1"), _text(doc, "option2"))
        if "answer" not in doc:
            raise _Malformed('no "answer" field')
        gold = _gold(doc["answer"], {"1": 0, "2": 1})
        return Example([(sentence[:blank] + option, continuation) for option in options], gold, None)

    path = data_dir / "winogrande" / "dev.jsonl"
    return _examples(path, _jsonl(path), convert)


def _hellaswag_preprocess(text: str) -> str:
    """lm_eval/tasks/hellaswag/utils.py preprocess()."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(data_dir: Path) -> list[Example]:
    def convert(doc: dict) -> Example:
        endings = _texts(doc, "endings")
        if "label" not in doc:
            raise _Malformed('no "label" field')
        gold = _gold(doc["label"], {str(i): i for i in range(len(endings))})
        return _choices(_hellaswag_preprocess(_text(doc, "ctx")), [_hellaswag_preprocess(e) for e in endings], gold)

    path = data_dir / "hellaswag" / "hellaswag_val.jsonl"
    return _examples(path, _jsonl(path), convert)


def _openbookqa(data_dir: Path) -> list[Example]:
    def convert(row: dict) -> Example:
        for column in ("Question Stem", "Choices", "Answer Key"):
            if not isinstance(row.get(column), str):
                raise _Malformed(f'no "{column}" column')
        parts = re.split(r"\(([A-D])\)\s*", row["Choices"])[1:]  # ["A", "text ", "B", ...]
        letters, texts = parts[0::2], [t.strip() for t in parts[1::2]]
        if not letters:
            raise _Malformed('"Choices" holds no "(A) ..." choices')
        gold = _gold(row["Answer Key"], {letter.lower(): i for i, letter in enumerate(letters)})
        return _choices(row["Question Stem"], texts, gold)

    path = data_dir / "openbookqa" / "test.tsv"
    reader = csv.DictReader(io.StringIO(_read_text(path), newline=""), delimiter="\t")
    rows = [(reader.line_num, row) for row in reader]
    return _examples(path, rows, convert)
