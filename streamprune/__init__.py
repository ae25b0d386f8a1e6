"""streamprune: prune large language models one decoder layer at a time."""

__version__ = "0.1.0"

from .config import PruneConfig  # noqa: E402
from .errors import StreamPruneError  # noqa: E402
from .pipeline import prune  # noqa: E402

__all__ = ["PruneConfig", "StreamPruneError", "prune", "__version__"]
