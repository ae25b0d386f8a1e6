"""Calibration data: read documents, sample token windows exactly as the Wanda reference does.

Reference (locuslab/wanda `lib/data.py`, get_c4): `random.seed(seed)`; for each sample, draw random
documents until one is longer than seqlen tokens, then take a random window of seqlen tokens in
it. A single text file is one document, like the reference's WikiText-2 loader, which draws only
the window. We reproduce the same random calls, so the same seed picks the same windows.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import random
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import C4_FILE, DATA_ENV, HubFile, download, local_copy
from .errors import BadInputError

CALIBRATION_FILE = "streamprune_calibration.json"  # beside a run's output: the exact token ids it used
C4_HUB = HubFile("allenai/c4", "en/c4-train.00000-of-01024.json.gz")  # the shard the Wanda paper calibrates on
_TOKENIZE_BATCH = 256  # documents per tokenizer call while counting tokens


@dataclass(frozen=True)
class DataFlags:
    """The flags a command's data errors name: run, depth and width draw --nsamples windows of --seqlen
    tokens from --calib; depth's seam healing --reconstruct-nsamples of --reconstruct-seqlen; heal
    trains on --steps x --batch-size windows of --data."""

    text: str = "--calib"
    count: str = "--nsamples"
    seqlen: str = "--seqlen"
    windows_per_count: int = 1  # heal: --batch-size windows a step
    count_suffix: str = ""  # heal: " x --batch-size 4"

    def asking(self, windows: int) -> str:
        """The flags that ask for `windows` windows, e.g. "--nsamples 128" or "--steps 50 x --batch-size 4"."""
        return f"{self.count} {windows // self.windows_per_count}{self.count_suffix}"


CALIBRATION_FLAGS = DataFlags()


def calibration_path(calib: str, flags: DataFlags = CALIBRATION_FLAGS) -> Path:
    """--calib: the C4 shard (downloaded) or a local file."""
    if calib == "c4":
        path = local_copy(C4_FILE) or fetch_c4(flags)  # the data folder's copy (STREAMPRUNE_DATA) first
    else:
        path = Path(calib).expanduser()
    if not path.is_file():
        raise BadInputError(f"{flags.text} {calib}: no such file; pass a .txt, .jsonl or .jsonl.gz file, or c4")
    try:
        path.open("rb").close()
    except OSError as err:
        raise BadInputError(f"{flags.text} {calib}: cannot be read ({err.strerror}); pass a file you can read") from err
    return path


def sample_calibration(
    settings, path: Path, sha256: str, source_dir: Path, seqlen: int, flags: DataFlags = CALIBRATION_FLAGS
) -> dict:
    """The calibration record of a run: `settings.nsamples` windows of `seqlen` token ids
    (`input_ids`, [nsamples, seqlen]) drawn with `settings.seed` from `path`, tokenized by the
    source's own tokenizer, and where they came from."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source_dir)
    except Exception as err:
        raise BadInputError(f"cannot load the tokenizer from {source_dir}: {err}") from err
    documents = read_documents(path, flags)
    input_ids = sample_windows(documents, tokenizer, settings.nsamples, seqlen, settings.seed, flags)
    return {
        "source": settings.calib if settings.calib == "c4" else str(path),
        "file": str(path),
        "sha256": sha256,
        "documents": len(documents),
        "nsamples": settings.nsamples,
        "seqlen": seqlen,
        "seed": settings.seed,
        "input_ids": input_ids,
    }


def calibration_json(calibration: dict) -> bytes:
    ids = {key: value for key, value in calibration.items() if key != "input_ids"}
    ids["input_ids"] = calibration["input_ids"].tolist()
    return json.dumps(ids).encode()


def load_saved_calibration(out: Path, nsamples: int, seqlen: int) -> dict:
    """The calibration ids an interrupted run saved: resuming must not depend on resampling."""
    path = out / CALIBRATION_FILE
    try:
        calibration = json.loads(path.read_text())
        calibration["input_ids"] = torch.tensor(calibration["input_ids"], dtype=torch.int64)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise BadInputError(
            f"cannot read {path}, the calibration ids of the interrupted run ({err}); start over with --force"
        ) from err
    if tuple(calibration["input_ids"].shape) != (nsamples, seqlen):
        raise BadInputError(f"{path} does not hold {nsamples} x {seqlen} token ids; start over with --force")
    return calibration


def fetch_c4(flags: DataFlags = CALIBRATION_FLAGS) -> Path:
    """The C4 shard the Wanda paper uses, from the hub (cached by huggingface_hub)."""
    return download(C4_HUB, "the C4 calibration shard", (
        f'pass local text instead: {flags.text} PATH (.txt, .jsonl or .jsonl.gz with a "text" field, e.g. a C4 '
        f".json.gz shard), or set {DATA_ENV} to a folder holding {C4_FILE} (streamprune fetch-data DIR --c4 makes one)."
    ))  # fmt: skip


def read_documents(path: Path, flags: DataFlags = CALIBRATION_FLAGS) -> list[str]:
    """A .txt file is one document; .jsonl / .jsonl.gz / .json.gz have one {"text": ...} per line."""
    name = path.name.lower()
    try:
        if name.endswith(".txt") or name.endswith(".raw"):
            return [path.read_text(encoding="utf-8")]
        if name.endswith((".jsonl", ".json.gz", ".jsonl.gz")):
            opener = gzip.open if name.endswith(".gz") else open
            documents = []
            with opener(path, "rt", encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    record = json.loads(line)
                    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                        raise BadInputError(f'{path}, line {number}: no "text" string field')
                    documents.append(record["text"])
            return documents
    except json.JSONDecodeError as err:
        raise BadInputError(f"{flags.text} {path}, line {number}: not JSON ({err.msg})") from err
    except UnicodeDecodeError as err:
        raise BadInputError(f"{flags.text} {path} is not UTF-8 text ({err.reason})") from err
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt gzip body, a read error
        reason = "it ends early (truncated?)" if isinstance(err, EOFError) else str(err)
        raise BadInputError(
            f"cannot read {flags.text} {path}: {reason}. Check the file (e.g. gzip -t), or pass another {flags.text}"
        ) from err
    raise BadInputError(
        f"{flags.text} {path} has an unknown extension; use .txt, .jsonl, .jsonl.gz or .json.gz, or {flags.text} c4"
    )


def sample_windows(
    documents: list[str], tokenizer, nsamples: int, seqlen: int, seed: int, flags: DataFlags = CALIBRATION_FLAGS
) -> torch.Tensor:
    """[nsamples, seqlen] token ids, drawn as the reference draws them.

    Refuses (BadInputError, with the numbers and what would fit) when the documents longer than
    seqlen hold fewer than nsamples * seqlen tokens: windows would mostly repeat each other.
    """
    lengths: dict[int, int] = {}
    long_ids: dict[int, list[int]] = {}  # only documents that can hold a window are kept

    def tokenize(indices: list[int]) -> None:
        encoded = tokenizer([documents[i] for i in indices], verbose=False).input_ids
        for i, ids in zip(indices, encoded):
            lengths[i] = len(ids)
            if len(ids) > seqlen:
                long_ids[i] = ids

    # 1. count tokens in file order until enough are found (or the documents run out)
    needed = nsamples * seqlen
    for start in range(0, len(documents), _TOKENIZE_BATCH):
        if sum(lengths[i] for i in long_ids) >= needed:
            break
        tokenize(list(range(start, min(start + _TOKENIZE_BATCH, len(documents)))))
    usable = sum(lengths[i] for i in long_ids)
    if usable < needed:
        raise BadInputError(_too_short_message(list(lengths.values()), nsamples, seqlen, flags))

    # 2. the reference's random draws; documents not yet tokenized are tokenized when drawn
    rng = random.Random(seed)
    windows = []
    for _ in range(nsamples):
        if len(documents) == 1:
            doc = 0
        else:
            while True:
                doc = rng.randint(0, len(documents) - 1)
                if doc not in lengths:
                    tokenize([doc])
                if doc in long_ids:
                    break
        start = rng.randint(0, lengths[doc] - seqlen - 1)
        windows.append(long_ids[doc][start : start + seqlen])
    return torch.tensor(windows, dtype=torch.int64)


def _too_short_message(lengths: list[int], nsamples: int, seqlen: int, flags: DataFlags) -> str:
    usable = sum(n for n in lengths if n > seqlen)
    message = (
        f"{flags.text} text too short: {len(lengths)} documents hold {sum(lengths):,} tokens, of which "
        f"{usable:,} are in documents longer than {flags.seqlen} {seqlen}; {flags.asking(nsamples)} x "
        f"{flags.seqlen} {seqlen} needs {nsamples * seqlen:,}."
    )
    fits = []
    if usable // seqlen >= flags.windows_per_count:
        fits.append(f"{flags.asking(usable // seqlen)} {flags.seqlen} {seqlen}")
    shorter = seqlen // 2
    while shorter >= 16:
        if sum(n for n in lengths if n > shorter) >= nsamples * shorter:
            fits.append(f"{flags.asking(nsamples)} {flags.seqlen} {shorter}")
            break
        shorter //= 2
    if fits:
        return message + " This text would fit " + " or ".join(fits) + f"; or pass more text with {flags.text}."
    return message + f" Pass more text with {flags.text}."


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
