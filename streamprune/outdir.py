"""The output directory (--out) of run and depth: checked before anything is written, created,
cleared of an earlier run's files with --force, and given the source's support files.

The source is only ever read: an --out that is, or is inside, the source is refused, and --force
removes only files a streamprune run writes (weights, index, record, run state), never through a link.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from .calibration import CALIBRATION_FILE
from .checkpoint import INDEX_FILE, SINGLE_FILE
from .errors import UsageError
from .runstate import STATE_DIR
from .writer import write_atomic

RECORD_FILE = "streamprune.json"  # the run record, written last
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def check_not_source(out: Path, source_dir: Path) -> None:
    """Refuse an --out that is, or is inside, the source: the source is only ever read."""
    out_resolved, source_resolved = out.resolve(), source_dir.resolve()
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        where = "the source directory" if out_resolved == source_resolved else "inside the source directory"
        raise UsageError(
            f"--out {out} is {where} {source_dir}; streamprune never writes into the source. "
            f"Choose another --out, e.g. --out {source_dir.name}-pruned"
        )


def check_output_dir(out: Path, force: bool) -> None:
    """For a new run: refuse a file, and a non-empty directory without --force."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} exists and is a file; choose a directory")
    if (out / RECORD_FILE).is_file() and not force:
        raise UsageError(
            f"--out {out} already holds a completed run (see {out / RECORD_FILE}); choose another --out, or "
            "add --force to redo it"
        )
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UsageError(
            f"--out {out} is not empty; choose an empty or new directory, or add --force to replace the "
            "checkpoint in it"
        )


def prepare_output_dir(out: Path, force: bool) -> None:
    """Create --out; with --force, remove the weights, record and run state of an earlier run
    there, which would otherwise be loaded instead of (or mixed with) the new ones. Nothing else
    is touched."""
    out.mkdir(parents=True, exist_ok=True)
    if force:
        stale = [out / SINGLE_FILE, out / INDEX_FILE, out / RECORD_FILE, out / CALIBRATION_FILE]
        stale += [*out.glob("model-*-of-*.safetensors"), *out.glob(".*.partial")]
        for path in stale:
            if path.is_file():
                path.unlink()
        if (out / STATE_DIR).is_symlink():  # remove the link, never what it points at
            (out / STATE_DIR).unlink()
        shutil.rmtree(out / STATE_DIR, ignore_errors=True)


def copy_support_files(source_dir: Path, out: Path) -> None:
    """config.json, generation_config.json, tokenizer files and the like, byte for byte."""
    for path in sorted(source_dir.iterdir()):
        if (
            path.name in (RECORD_FILE, CALIBRATION_FILE)
            or path.name.endswith(_WEIGHT_SUFFIXES)
            or path.name == INDEX_FILE
            or path.name.startswith(".")
            or not path.is_file()
        ):
            continue
        write_atomic(out / path.name, path.read_bytes())


def write_json(path: Path, data: dict) -> None:
    """A record or report, indented, written atomically."""
    write_atomic(path, (json.dumps(data, indent=2) + "\n").encode())


def same_disk(a: Path, b: Path) -> bool:
    """Whether two paths (or their nearest existing parents) are on the same file system."""

    def device_of(path: Path) -> int:
        path = path.resolve()
        while not path.exists():
            path = path.parent
        return path.stat().st_dev

    return device_of(a) == device_of(b)
