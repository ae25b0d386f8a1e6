"""Width pruning (FLAP, An et al. 2024; Wanda-sp): remove whole MLP channels (rows of gate/up,
columns of down) and whole attention heads (whole key-value groups where heads share them), the
same number in every layer, and write an ordinary checkpoint with a narrower config.json.

The files, in the order a run needs them:
- config.py: WidthConfig, the settings checked;
- scores.py: the pure math: input statistics, channel and group scores, the lowest, compensation;
- shapes.py: the geometry, how many groups and channels go for a --ratio, the narrowed config and tensors;
- layer.py: one layer scored, narrowed, compensated, written, and its outputs propagated;
- record.py: streamprune.json and the printed summary;
- command.py: width(), from checked settings to the written checkpoint, with resume points.
"""

from .command import width
from .config import WidthConfig
from .record import summary
from .scores import CRITERIA

__all__ = ["CRITERIA", "WidthConfig", "summary", "width"]
