"""Standard data by name, from a folder of local copies or from the Hugging Face hub.

One setting names the folder: the environment variable STREAMPRUNE_DATA, or eval's --data-dir.
Its layout (what `streamprune fetch-data DIR` writes; every part optional):

    wikitext2/wiki.test.raw               WikiText-2 raw, test split: eval --ppl wikitext2
    c4/c4-train.00000-of-01024.json.gz    the C4 shard the Wanda paper calibrates on: --calib c4
    zeroshot/<task>/...                   the built-in zero-shot tasks' files (tasks.py): eval --data-dir

Without a local copy, WikiText-2 comes from the hub's parquet file of `Salesforce/wikitext` at a
pinned revision (cached as the hub caches), and the text scored is the official wiki.test.raw,
rebuilt from its rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import BadInputError, ResourceError, UsageError
from .source import hub_failure, hub_reachable

DATA_ENV = "STREAMPRUNE_DATA"
WIKITEXT2 = "wikitext2"  # the name --ppl takes for the standard text
WIKITEXT2_FILE = Path("wikitext2") / "wiki.test.raw"
C4_FILE = Path("c4") / "c4-train.00000-of-01024.json.gz"
ZEROSHOT_DIR = "zeroshot"


@dataclass(frozen=True)
class HubFile:
    repo: str
    filename: str
    revision: str | None = None  # a commit: the same bytes for every user, whatever the repo becomes
    repo_type: str = "dataset"


WIKITEXT2_HUB = HubFile("Salesforce/wikitext", "wikitext-2-raw-v1/test-00000-of-00001.parquet",
                        "b08601e04326c79dfdd32d625aee71d232d685c3")  # fmt: skip
WIKITEXT2_ROWS = 4358


def data_folder(data_dir: str | Path | None = None, flag: str = "--data-dir") -> Path | None:
    """The folder of local copies: `data_dir` where given, else STREAMPRUNE_DATA, else None."""
    value = data_dir if data_dir is not None else os.environ.get(DATA_ENV) or None
    if value is None:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        named = f"{flag} {value}" if data_dir is not None else f"{DATA_ENV}={value}"
        raise UsageError(f"{named} is not a folder; point it at a data folder (streamprune fetch-data DIR "
                         f"makes one), or unset {DATA_ENV} to download from the hub")  # fmt: skip
    return folder


def zeroshot_folder(data_dir: str | Path) -> Path:
    """The built-in tasks' folder of a data folder (its zeroshot/), or `data_dir` itself when it is one."""
    folder = Path(data_dir).expanduser()
    return folder / ZEROSHOT_DIR if (folder / ZEROSHOT_DIR).is_dir() else folder


def local_copy(relative: Path, data_dir: str | Path | None = None) -> Path | None:
    folder = data_folder(data_dir)
    if folder is None or not (folder / relative).is_file():
        return None
    return folder / relative


def ppl_text(ppl: str, data_dir: str | Path | None = None) -> tuple[str, str]:
    """--ppl's text and where it came from: `wikitext2` (the data folder's copy, else the hub), or a file."""
    if ppl == WIKITEXT2:
        local = local_copy(WIKITEXT2_FILE, data_dir)
        if local is None:
            hub = WIKITEXT2_HUB
            return wikitext_from_parquet(download(hub, "WikiText-2", WIKITEXT2_OFFLINE)), f"{hub.repo}@{hub.revision[:7]}/{hub.filename}"
        path = local
    else:
        path = Path(ppl).expanduser()
    try:
        return path.read_text(encoding="utf-8"), str(path)
    except (OSError, UnicodeDecodeError) as err:
        raise BadInputError(f"--ppl {ppl}: cannot read it ({err}); pass a text file, or --ppl {WIKITEXT2}") from err


def download(hub: HubFile, what: str, offline: str) -> Path:
    """`hub`'s file from the hub's cache, downloaded first where the hub is reachable; `offline`: what
    to do instead, said when it cannot be had."""
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(hub.repo, hub.filename, repo_type=hub.repo_type, revision=hub.revision,
                                    local_files_only=not hub_reachable()))  # fmt: skip
    except Exception as err:  # offline, proxy, a cut download: each ends the same way for the user
        raise ResourceError(
            f"cannot download {what} ({hub.repo}, {hub.filename}) from the Hugging Face hub: {hub_failure(err)}. "
            f"Offline, {offline}"
        ) from err


WIKITEXT2_OFFLINE = (f"set {DATA_ENV} to a folder holding {WIKITEXT2_FILE} (streamprune fetch-data DIR makes one "
                     "where the hub is reachable), or pass --ppl FILE.")  # fmt: skip


def wikitext_from_parquet(path: Path) -> str:
    """wiki.test.raw rebuilt from the dataset's rows: the rows keep their newlines, and an empty row
    stands for a line holding one space (how the hub's conversion stored the file's blank lines)."""
    try:
        import pyarrow.parquet as parquet
    except ImportError as err:
        raise UsageError(
            f"--ppl {WIKITEXT2} reads the hub's parquet file, which needs pyarrow: pip install 'streamprune[eval]'; "
            f"or point {DATA_ENV} at a folder holding {WIKITEXT2_FILE}, or pass --ppl FILE"
        ) from err
    try:
        rows = parquet.read_table(path, columns=["text"]).column("text").to_pylist()
    except Exception as err:  # a damaged cache entry: pyarrow's own error types vary by version
        raise BadInputError(
            f"cannot read {path} as WikiText-2's parquet file ({err}); delete it and run again"
        ) from err
    if len(rows) != WIKITEXT2_ROWS:
        raise BadInputError(
            f"{path} holds {len(rows)} rows, not WikiText-2 test's {WIKITEXT2_ROWS}; delete it and run again"
        )
    return rows_to_raw(rows)


def rows_to_raw(rows: list[str]) -> str:
    return "".join(row if row else " \n" for row in rows)
