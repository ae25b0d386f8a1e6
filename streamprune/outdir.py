"""The output directory (--out) of run and depth: checked before anything is written, locked
against a second command, created, cleared of an earlier run's files with --force, and given the
source's support files.

The source is only ever read: an --out that is, or is inside, the source is refused, and --force
removes only files a streamprune run writes (weights, index, record, run state), never through a link.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from .calibration import CALIBRATION_FILE
from .checkpoint import INDEX_FILE, SINGLE_FILE
from .errors import ResourceError, UsageError
from .runstate import STATE_DIR
from .writer import write_atomic

RECORD_FILE = "streamprune.json"  # the run record, written last
LOCK_FILE = ".streamprune.lock"  # in --out while a command writes there: its holder's pid
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".msgpack", ".h5", ".gguf")


def check_not_source(out: Path, source_dir: Path, flag: str = "--out") -> None:
    """Refuse an --out (or --offload-dir) that is, or is inside, the source: the source is only ever read."""
    out_resolved, source_resolved = out.resolve(), source_dir.resolve()
    if out_resolved == source_resolved or source_resolved in out_resolved.parents:
        where = "the source directory" if out_resolved == source_resolved else "inside the source directory"
        raise UsageError(
            f"{flag} {out} is {where} {source_dir}; streamprune never writes into the source. "
            f"Choose another {flag}, e.g. {flag} {source_dir.name}-pruned"
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
    if out.is_dir() and any(path.name != LOCK_FILE for path in out.iterdir()) and not force:
        raise UsageError(
            f"--out {out} is not empty; choose an empty or new directory, or add --force to replace the "
            "checkpoint in it"
        )


def check_destination(path: Path, flag: str) -> None:
    """Refuse a place that cannot be written before anything is written anywhere: a file where a
    directory should be, no permission, a read-only or full file system. The probe is what
    writing there will need: a file created (in the nearest existing parent when `path` does not
    exist yet), written, fsynced and removed."""
    path = path.expanduser()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        where = "exists and is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise UsageError(f"{flag} {path} {where}; choose a directory")
    probe = existing / f".streamprune-probe-{os.getpid()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"streamprune")
            os.fsync(fd)
        finally:
            os.close(fd)
            probe.unlink()
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(
                f"{flag} {path}: the disk is full ({err.strerror}); free some space or choose another place"
            ) from err
        inside = "in" if existing == path else f"{path}'s parent"
        raise UsageError(
            f"{flag} {path}: cannot write {inside} {existing} ({err.strerror}); choose a directory you can write to"
        ) from err


class OutputLock:
    """One command at a time writes into --out. `check` (early, writes nothing) refuses an --out
    another live process holds; `acquire` (just before the first write) creates --out and takes an
    exclusive flock on --out/.streamprune.lock, held until `release` or the process ends. The
    kernel drops the lock of a process that dies, so a lock file left by a killed run is taken
    over silently; the file only says who holds it."""

    def __init__(self, out: Path):
        self.out, self.fd = out, None

    @property
    def path(self) -> Path:
        return self.out / LOCK_FILE

    def check(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:
            return  # no lock file (or none we can open): nobody holds it
        try:
            self._lock(fd)
        finally:
            os.close(fd)

    def acquire(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._lock(fd)
            except BaseException:
                os.close(fd)
                raise
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # its holder removed it as we opened it: lock the file now there
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n{' '.join(['streamprune', *sys.argv[1:]])}\n".encode())
            self.fd = fd

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> OutputLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def _lock(self, fd: int) -> None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").split("\n")
            pid, command = holder[0] or "?", holder[1] if len(holder) > 1 else ""
            raise UsageError(
                f"--out {self.out} is in use by another streamprune process (pid {pid}: {command}). Wait for it to "
                f"finish or stop it (kill {pid}; it stops at its next resume point), or choose another --out"
            ) from None


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


def support_files(source_dir: Path) -> list[Path]:
    """config.json, generation_config.json, tokenizer files and the like: what is copied beside the weights."""
    return [
        path
        for path in sorted(source_dir.iterdir())
        if not (
            path.name in (RECORD_FILE, CALIBRATION_FILE)
            or path.name.endswith(_WEIGHT_SUFFIXES)
            or path.name == INDEX_FILE
            or path.name.startswith(".")
            or not path.is_file()
        )
    ]


def support_bytes(source_dir: Path) -> int:
    """Room the support files take (counted in every up-front space check)."""
    return sum(path.stat().st_size for path in support_files(source_dir))


def copy_support_files(source_dir: Path, out: Path) -> None:
    """The support files, byte for byte. Callers copy them before the index, which is written last:
    a disk that fills here leaves no output that looks finished."""
    for path in support_files(source_dir):
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
