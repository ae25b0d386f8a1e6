"""What every command shares: errors as messages and exit codes, stop signals, resume commands."""

from __future__ import annotations

import errno
import os
import shlex
import signal
import sys
import threading
from contextlib import contextmanager

import torch
import typer

from ..distributed import under_torchrun
from ..errors import EXIT_INTERRUPTED, EXIT_RESOURCES, STOP_SIGNALS, StreamPruneError, UsageError

@contextmanager
def user_errors(on_interrupt: str, on_gpu_oom: str, on_disk_full: str | None = None):
    """What the user can act on becomes a message and its exit code (README); anything else is a
    bug and keeps its traceback. A full disk is handled only where the command says what is kept.
    SIGTERM and SIGHUP stop the command as Ctrl-C does (run's layer loop finishes its layer first)."""
    try:
        with stop_signals_as_ctrl_c():
            yield
    except StreamPruneError as err:
        say(f"error: {err}")
        if err.exit_code == EXIT_INTERRUPTED:
            say(f"to resume: {resume_command()}")
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        say(f"\n{on_interrupt}")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except torch.OutOfMemoryError:
        say(f"error: out of GPU memory. {on_gpu_oom}")
        raise typer.Exit(EXIT_RESOURCES) from None
    except OSError as err:
        if err.errno != errno.ENOSPC or on_disk_full is None:
            raise
        say(f"error: the disk is full ({err.filename or 'the output directory'}). {on_disk_full}")
        raise typer.Exit(EXIT_RESOURCES) from None


@contextmanager
def stop_signals_as_ctrl_c():
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, while the command runs."""
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in STOP_SIGNALS:
            if signum != signal.SIGINT:
                previous[signum] = signal.signal(signum, signal.default_int_handler)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def check_one_process(command: str) -> None:
    """Refuse a command that runs in one process when torchrun started several: each would do the
    whole work and write the same files."""
    if under_torchrun():
        raise UsageError(
            f"streamprune {command} runs in one process (only run shares its work between processes): "
            f"start it without torchrun: streamprune {command} ..."
        )


def say(message: str) -> None:
    """A message on stderr; after SIGHUP the terminal may be gone, which must not hide the exit code."""
    if under_torchrun():  # which process says it
        message = f"[process {os.environ.get('RANK', '?')}] {message.lstrip()}"
    try:
        typer.echo(message, err=True)
    except OSError:
        pass


def parse_batch_size(text: str) -> int | None:
    """--batch-size: a positive count, or auto (None: sized from the plan)."""
    if text.strip().lower() == "auto":
        return None
    try:
        return int(text)
    except ValueError:
        raise UsageError(f"--batch-size {text!r} is neither a number nor auto; e.g. --batch-size 1") from None


def resume_command() -> str:
    if under_torchrun():  # any process count resumes it
        processes = os.environ.get("LOCAL_WORLD_SIZE", os.environ["WORLD_SIZE"])
        return shlex.join(["torchrun", f"--nproc-per-node={processes}", "-m", "streamprune", *sys.argv[1:]])
    return shlex.join(["streamprune", *sys.argv[1:]])


def summary(record: dict) -> str:
    gib = 1024**3
    lines = [
        f"pruned {record['source']['num_hidden_layers']} layers of {record['source']['model']} "
        f"({record['arguments']['method']}, target sparsity {record['target_sparsity']:.3f}, "
        f"achieved {record['mean_layer_sparsity']:.3f}) in {record['total_seconds']:.1f} s on {record['device']}"
        + (f" x {record['processes']} processes" if record.get("processes", 1) > 1 else ""),
        f"peak RSS {record['peak_rss_bytes'] / gib:.2f} GiB (planned {record['plan']['peak_ram_bytes'] / gib:.2f})"
        + (
            f", peak VRAM {record['peak_vram_bytes'] / gib:.2f} GiB "
            f"(planned {record['plan']['peak_vram_bytes'] / gib:.2f})"
            if record["peak_vram_bytes"]
            else ""
        ),
        *(
            [f"resumed {len(record['sessions']) - 1} time(s), last from layer {record['sessions'][-1]['from_layer']}"]
            if len(record["sessions"]) > 1
            else []
        ),
        f"wrote {record['arguments']['out']} ({len(record['output_files'])} shards); run record: streamprune.json",
    ]
    return "\n".join(lines)
