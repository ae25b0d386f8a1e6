"""Crash `streamprune run` (or heal) at chosen points, for tests/test_resume.py.

Started once as a subprocess: it imports streamprune and its heavy dependencies (computing
nothing, so no thread pool exists yet to be broken by fork), then for each job (one JSON line on
stdin) forks a child that patches one call site, runs the CLI and dies or exits there. The parent
answers each job with one JSON line: how the child ended. Forking saves the ~5 s import per job.

A job: {"command": "run" (the default) or "heal", "args": [...CLI args after the command...], "log": path for the child's stdout and stderr,
        "event": "forward" | "write" | "replace" | "rmtree" | null, "n": 1-based call number,
        "action": "kill" (SIGKILL before the call) | "kill-after" (SIGKILL after it returns) |
                  "half-kill" (write: half the bytes reach the file, then SIGKILL) |
                  "enospc" (write: half the bytes, then the disk is full) |
                  "sigint" | "sigterm" | "sighup" (that signal before the call, then carry on),
        "counts": optional path where the child writes how often each event happened}
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import sys

import streamprune.cli
import peft  # noqa: F401
import streamprune.heal  # noqa: F401
import streamprune.pipeline  # noqa: F401  (imported before the fork, like everything heavy)
from streamprune.families import LayerRunner
from streamprune.writer import CheckpointWriter
from transformers.models.llama import modeling_llama  # noqa: F401


STOP_SIGNALS = {"sigint": signal.SIGINT, "sigterm": signal.SIGTERM, "sighup": signal.SIGHUP}


def crash_at(job: dict) -> dict[str, int]:
    """Patch the four call sites; the job's event crashes at its n-th call, every event is counted."""
    counts = {"forward": 0, "write": 0, "replace": 0, "rmtree": 0}

    def patched(event, original, write_half=False):
        def call(*args, **kwargs):
            counts[event] += 1
            hit = job.get("event") == event and counts[event] == job["n"]
            if hit and job["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            if hit and job["action"] in STOP_SIGNALS:
                os.kill(os.getpid(), STOP_SIGNALS[job["action"]])
            if hit and job["action"] in ("half-kill", "enospc") and write_half:
                writer, data = args
                view = memoryview(data).cast("B")
                writer._file.write(view[: len(view) // 2])
                writer._file.flush()
                if job["action"] == "enospc":
                    raise OSError(errno.ENOSPC, "No space left on device")
                os.kill(os.getpid(), signal.SIGKILL)
            result = original(*args, **kwargs)
            if hit and job["action"] == "kill-after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return call

    LayerRunner.forward = patched("forward", LayerRunner.forward)
    CheckpointWriter._write_bytes = patched("write", CheckpointWriter._write_bytes, write_half=True)
    os.replace = patched("replace", os.replace)
    shutil.rmtree = patched("rmtree", shutil.rmtree)
    return counts


def child(job: dict) -> None:
    log = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    counts = crash_at(job)
    command = job.get("command", "run")
    sys.argv = ["streamprune", command, *job["args"]]  # as the installed command would see them
    code = 0
    try:
        streamprune.cli.app([command, *job["args"]], prog_name="streamprune")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 1
    except BaseException as err:  # an unexpected crash is a test failure, reported as exit 99
        import traceback

        traceback.print_exc()
        code = 99 if not isinstance(err, KeyboardInterrupt) else 98
    if job.get("counts"):
        with open(job["counts"], "w") as f:
            json.dump(counts, f)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main() -> None:
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(job)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            answer = {"signal": os.WTERMSIG(status)}
        else:
            answer = {"exit": os.WEXITSTATUS(status)}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
