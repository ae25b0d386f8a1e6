"""The `streamprune` command: each command builds its library config from flags and calls the library.

app.py holds the command group, options.py every flag (declared once, shared by the commands that
take it), common.py what every command shares (errors as messages and exit codes, resume commands),
and one file per command registers it on the group."""

# each registers its command on `app`, in the order --help lists them
from . import run, plan, evaluate, depth, width, heal, data  # noqa: F401, I001  # isort: skip
from .app import app
from .common import stop_signals_as_ctrl_c

__all__ = ["app", "stop_signals_as_ctrl_c"]
