"""`streamprune fetch-data`: the standard data copied into a data folder (data.py's layout), for offline use."""

from __future__ import annotations

from pathlib import Path

from .calibration import fetch_c4
from .data import C4_FILE, WIKITEXT2_FILE, WIKITEXT2_HUB, WIKITEXT2_OFFLINE, download, wikitext_from_parquet
from .errors import ResourceError, UsageError
from .source import hub_failure
from .writer import copy_atomic, write_atomic


def fetch_data(folder: Path, c4: bool = False, tasks: list[str] | None = None) -> list[str]:
    """Fill `folder` with local copies in the layout data.py documents, for use offline; what is already there
    is kept. With `tasks`, the harness's dataset cache is filled for them too (its data stays where
    the harness keeps it: HF_HOME). Returns a line for each thing done."""
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{folder} is a file; name a folder to fill, e.g. streamprune fetch-data ~/streamprune-data")
    folder.mkdir(parents=True, exist_ok=True)
    done = []
    target = folder / WIKITEXT2_FILE
    if not target.is_file():
        text = wikitext_from_parquet(download(WIKITEXT2_HUB, "WikiText-2", WIKITEXT2_OFFLINE))
        target.parent.mkdir(exist_ok=True)
        write_atomic(target, text.encode())
    done.append(f"{target}: WikiText-2 raw test")
    if c4:
        target = folder / C4_FILE
        if not target.is_file():
            shard = fetch_c4()
            target.parent.mkdir(exist_ok=True)
            copy_atomic(shard, target)
        done.append(f"{target}: the C4 calibration shard")
    if tasks:
        warm_harness_cache(tasks)
        done.append(f"lm-evaluation-harness datasets of {', '.join(tasks)}: in the hub cache (HF_HOME)")
    return done


def warm_harness_cache(tasks: list[str]) -> None:
    """Build each harness task once: the harness downloads its dataset into the hub cache, where an
    offline `eval --tasks` (HF_HUB_OFFLINE=1, HF_DATASETS_OFFLINE=1) finds it."""
    try:
        from lm_eval.tasks import TaskManager, get_task_dict
    except ImportError as err:
        raise UsageError("--tasks fills lm-evaluation-harness's cache, and lm-eval is not installed: "
                         "pip install 'streamprune[eval]'") from err  # fmt: skip
    manager = TaskManager()
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise UsageError(f"unknown lm-evaluation-harness task(s): {', '.join(unknown)}; see `lm-eval ls tasks`")
    try:
        get_task_dict(tasks, manager)
    except Exception as err:  # the datasets library's network errors are many
        raise ResourceError(f"cannot download the datasets of {', '.join(tasks)}: {hub_failure(err)}") from err
