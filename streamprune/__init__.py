"""streamprune: prune large language models one decoder layer at a time."""

from .config import PruneConfig
from .errors import StreamPruneError
from .pipeline import prune
from .version import __version__

__all__ = ["PruneConfig", "StreamPruneError", "prune", "__version__"]
