"""Depth pruning (Shortened LLaMA, Kim et al. 2024): score every decoder block, remove the weakest
whole blocks, and write a shorter checkpoint.

Every criterion is computed streamed, one block on the device at a time:
- magnitude: sum of |W| over the block's seven Linear weights (no calibration data);
- bi (block influence, ShortGPT): 1 - cos(block input, block output), averaged over tokens;
- ppl: perplexity of the calibration data with that one block skipped. One pass over the weights
  carries a "skip stream" per block (the hidden states of the model without it), so the weights are
  read once, not once per block; when the streams do not fit in RAM, a few passes each carry some;
- taylor: sum of |W * dL/dW| over the Linear weights, L the mean next-token loss. A forward pass
  keeps every block's input; a reverse pass reloads the blocks last to first, carrying dL/dh back.
Low scores mean unimportant blocks in all four; the lowest are removed, never the first
`keep_first` nor the last `keep_last` (the paper's "+": removing block 0 or 1 destroys the model).

The files, in the order a run needs them:
- config.py: DepthConfig, the settings checked; how many blocks go, which may, which do;
- blocks.py: Blocks, the source's decoder blocks streamed and built one at a time;
- saves.py: ScoringSaves, the scoring's resume points in OUT/.streamprune;
- criteria.py: the magnitude, bi and ppl passes, their per-block math, and score_blocks, which
  runs the criterion's passes;
- taylor.py: the taylor criterion's forward pass and reverse (gradient) pass;
- report.py: depth_scores.json and .csv, the printed summary, and an earlier run's scores read back;
- shortened.py: the shortened checkpoint's tensors and config.json;
- healing.py: --reconstruct, the seam blocks trained toward their removed span's output;
- command.py: depth(), the command from checked settings to the written checkpoint.
"""

from .command import depth
from .config import CRITERIA, DepthConfig, candidates, lowest, removal_count
from .criteria import block_influence
from .healing import seams
from .report import summary
from .shortened import shortened_config

__all__ = [
    "CRITERIA",
    "DepthConfig",
    "block_influence",
    "candidates",
    "depth",
    "lowest",
    "removal_count",
    "seams",
    "shortened_config",
    "summary",
]
