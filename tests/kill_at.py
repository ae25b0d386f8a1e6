"""`streamprune run` whose leader (rank 0, or the only process) SIGKILLs itself at its N-th layer
forward, for tests/test_distributed.py: runs under torchrun as well as alone.

    python tests/kill_at.py N run MODEL --out OUT ...     # N = 0: no kill
"""

from __future__ import annotations

import os
import signal
import sys

import streamprune.cli
from streamprune.families import LayerRunner


def main() -> None:
    kill_at, args = int(sys.argv[1]), sys.argv[2:]
    calls = 0
    forward = LayerRunner.forward

    def counted(*call_args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == kill_at and os.environ.get("RANK", "0") == "0":
            os.kill(os.getpid(), signal.SIGKILL)
        return forward(*call_args, **kwargs)

    LayerRunner.forward = counted
    sys.argv = ["streamprune", *args]
    streamprune.cli.app(args, prog_name="streamprune")


if __name__ == "__main__":
    main()
