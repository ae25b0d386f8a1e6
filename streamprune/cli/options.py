"""Every flag of every command, declared once, with a one-sentence help and the --help panel it
is listed in; each command that takes it gives its own default. Longer explanations: docs/cli-notes.md."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..methods import methods_help
from ..version import __version__

# -- the --help panels, the same in every command ---------------------------------------------------

METHOD = "Method"
DATA = "Calibration and data"
RECONSTRUCTION = "Reconstruction"
HEALING = "Healing"
MEMORY = "Memory and devices"
RESUME = "Resume"
OUTPUT = "Output"

# -- every flag, declared once ------------------------------------------------------------------------
# Each command gives its own default (`device: Device = "auto"`). A flag whose type differs between
# commands is an OptionInfo (SEQLEN, ...) that each command puts in its own Annotated type. A command
# lists its flags in panel order, so a required one (`out: Out = ...`) can come last.

Model = Annotated[str, typer.Argument(help=
    "A local checkpoint directory (config.json + safetensors), a hub id such as meta-llama/Llama-2-7b-hf, or an alias "
    "such as llama-70b, llama-3-8b, mistral-7b, qwen2-7b, smollm2-135m.")]  # fmt: skip


def print_version(asked: bool) -> None:
    if asked:
        typer.echo(f"streamprune {__version__}")
        raise typer.Exit()


Version = Annotated[
    bool, typer.Option("--version", help="Print the version and exit.", is_eager=True, callback=print_version)
]

# fmt: off
# Method
Method = Annotated[str, typer.Option("--method", rich_help_panel=METHOD, help=f"Pruning method; {methods_help()}.")]
Sparsity = Annotated[Optional[float], typer.Option("--sparsity", rich_help_panel=METHOD, help=
    "Fraction of weights zeroed in every pruned Linear, in (0, 1); 0.5 when no --pattern is given.")]
Pattern = Annotated[Optional[str], typer.Option("--pattern", rich_help_panel=METHOD, help=
    "N:M semi-structured sparsity instead of --sparsity: keep N of every M consecutive input weights in each row "
    "(2:4 keeps 2 of 4).")]
Percdamp = Annotated[Optional[float], typer.Option("--percdamp", rich_help_panel=METHOD, help=
    "sparsegpt: dampening added to the Hessian's diagonal, as a fraction of its mean (default 0.01).")]
Blocksize = Annotated[Optional[int], typer.Option("--blocksize", rich_help_panel=METHOD, help=
    "sparsegpt: columns pruned together before their error is spread to the rest (default 128).")]
Allocation = Annotated[str, typer.Option("--allocation", rich_help_panel=METHOD, help=
    "How much each layer loses: uniform (--sparsity everywhere) or owl (outlier-weighted: layers with more outliers "
    "lose less, the mean stays --sparsity).")]
OwlM = Annotated[float, typer.Option("--owl-m", rich_help_panel=METHOD, help=
    "owl: an outlier's Wanda score is above M x its layer's mean.")]
OwlLambda = Annotated[float, typer.Option("--owl-lambda", rich_help_panel=METHOD, help=
    "owl: layer sparsities span at most 2 x lambda around --sparsity.")]
Sequential = Annotated[bool, typer.Option("--sequential", rich_help_panel=METHOD, help=
    "Prune each layer in four steps (q/k/v, o_proj, gate/up, down_proj), each from statistics taken with the "
    "earlier steps already pruned.")]
Remove = Annotated[Optional[int], typer.Option("--remove", rich_help_panel=METHOD, help=
    "Number of decoder blocks to remove.")]
Ratio = Annotated[Optional[float], typer.Option("--ratio", rich_help_panel=METHOD, help=
    "Fraction to remove: depth, of all blocks (rounded, instead of --remove); width, of the decoder blocks' "
    "parameters.")]
Criterion = Annotated[str, typer.Option("--criterion", rich_help_panel=METHOD, help=
    "Score, the lowest removed: for depth's blocks ppl (calibration perplexity with the block skipped), taylor "
    "(sum |W * dL/dW|), magnitude (sum |W|, no data) or bi (1 - cos(block input, output)); for width's heads and "
    "channels flap (input variance x squared weight column norm), wanda-sp (|W| x ||X||) or magnitude (|W|, no data).")]
AttentionShare = Annotated[Optional[float], typer.Option("--attention-share", rich_help_panel=METHOD, help=
    "width: the part of the removed parameters taken as whole attention heads (key-value groups), the rest as MLP "
    "channels; default: attention's share of the block's parameters, which removes the same fraction of both, as "
    "FLAP does.")]
KeepFirst = Annotated[int, typer.Option("--keep-first", rich_help_panel=METHOD, help=
    "Never remove the first N blocks.")]
KeepLast = Annotated[int, typer.Option("--keep-last", rich_help_panel=METHOD, help="Never remove the last N blocks.")]
Iterative = Annotated[bool, typer.Option("--iterative", rich_help_panel=METHOD, help=
    "Remove one block at a time, rescoring each time.")]

# Calibration and data
Calib = Annotated[str, typer.Option("--calib", rich_help_panel=DATA, help=
    'Calibration text: a .txt, .jsonl or .jsonl.gz file (a "text" field per line), or c4 for the Wanda '
    "paper's C4 shard from the hub.")]
Nsamples = Annotated[int, typer.Option("--nsamples", rich_help_panel=DATA, help="Number of calibration sequences.")]
SEQLEN = typer.Option("--seqlen", rich_help_panel=DATA, help=
    "Tokens per sequence: the calibration (run, plan, depth, width), training (heal) or perplexity (eval) window.")
Seed = Annotated[int, typer.Option("--seed", rich_help_panel=DATA, help=
    "Seed for choosing the calibration or training windows (heal: and the adapters' initial values).")]
Propagate = Annotated[str, typer.Option("--propagate", rich_help_panel=DATA, help=
    "Where the next block's calibration inputs come from: the pruned block (pruned) or the dense one (dense).")]
Data = Annotated[str, typer.Option("--data", rich_help_panel=DATA, help=
    "Training text: c4 (the shard run calibrates on) or a local .jsonl, .jsonl.gz or .txt file.")]
Ppl = Annotated[Optional[Path], typer.Option("--ppl", rich_help_panel=DATA, help=
    "Text for perplexity: wikitext2 (WikiText-2 raw test, from the data folder or the hub) or a text file; "
    "tokenized whole and cut into windows of --seqlen tokens.")]
Tasks = Annotated[Optional[str], typer.Option("--tasks", rich_help_panel=DATA, help=
    "Comma-separated tasks. With --data-dir: the built-in offline ones (arc_easy, arc_challenge, piqa, boolq, "
    "winogrande, hellaswag, openbookqa); without it: any lm-evaluation-harness task, run through the streamed "
    "backend (needs lm-eval, the eval extra of streamprune). plan: the tasks of the eval to plan; fetch-data: the "
    "harness tasks whose datasets to cache.")]
C4 = Annotated[bool, typer.Option("--c4", rich_help_panel=DATA, help=
    "Also copy the C4 calibration shard (about 300 MB) that --calib c4 reads.")]
DataDir = Annotated[Optional[Path], typer.Option("--data-dir", rich_help_panel=DATA, help=
    "A data folder of local copies (as STREAMPRUNE_DATA; see docs/data.md); given, --tasks are the built-in "
    "offline tasks, read from its zeroshot/ folder.")]
Limit = Annotated[Optional[int], typer.Option("--limit", rich_help_panel=DATA, help=
    "At most N examples per task and N perplexity windows.")]
IncludePath = Annotated[Optional[Path], typer.Option("--include-path", rich_help_panel=DATA, help=
    "lm-evaluation-harness tasks: a directory of task YAMLs of one's own, added to the harness's tasks.")]
NumFewshot = Annotated[Optional[int], typer.Option("--num-fewshot", rich_help_panel=DATA, help=
    "lm-evaluation-harness tasks: examples shown before each question (default: each task's own).")]

# Reconstruction
Reconstruct = Annotated[bool, typer.Option("--reconstruct", rich_help_panel=RECONSTRUCTION, help=
    "Train with Adam so that outputs match the dense model's: in run each pruned layer's surviving weights (zeros "
    "stay zero), in depth the block before each removed span.")]
ReconstructEpochs = Annotated[int, typer.Option("--reconstruct-epochs", rich_help_panel=RECONSTRUCTION, help=
    "--reconstruct: passes over the training samples per trained layer or block.")]
ReconstructLr = Annotated[float, typer.Option("--reconstruct-lr", rich_help_panel=RECONSTRUCTION, help=
    "--reconstruct: Adam's learning rate.")]
ReconstructBatchSize = Annotated[int, typer.Option("--reconstruct-batch-size", rich_help_panel=RECONSTRUCTION, help=
    "--reconstruct: samples per optimizer step.")]
ReconstructNorms = Annotated[bool, typer.Option("--reconstruct-norms", rich_help_panel=RECONSTRUCTION, help=
    "--reconstruct: train the norms too.")]
ReconstructOptimizer = Annotated[str, typer.Option("--reconstruct-optimizer", rich_help_panel=RECONSTRUCTION, help=
    "--reconstruct: adam (torch, float32 moments) or adam8bit (bitsandbytes, a quarter of the moments' memory).")]
ReconstructNsamples = Annotated[int, typer.Option("--reconstruct-nsamples", rich_help_panel=RECONSTRUCTION, help=
    "--reconstruct: calibration sequences to train on.")]
ReconstructSeqlen = Annotated[int, typer.Option("--reconstruct-seqlen", rich_help_panel=RECONSTRUCTION, help=
    "--reconstruct: tokens per training sequence.")]

# Healing
Heal = Annotated[bool, typer.Option("--heal", rich_help_panel=HEALING, help=
    "Plan `streamprune heal` (LoRA, the whole model in memory) instead of a run.")]
Base = Annotated[str, typer.Option("--base", rich_help_panel=HEALING, help=
    "The frozen base in memory: nf4 (QLoRA, bitsandbytes 4-bit), int8 (bitsandbytes LLM.int8), bf16, fp32, or auto "
    "(nf4 on a GPU, fp32 on a CPU).")]
LoraRank = Annotated[int, typer.Option("--lora-rank", rich_help_panel=HEALING, help="LoRA rank r of every adapter.")]
LoraAlpha = Annotated[float, typer.Option("--lora-alpha", rich_help_panel=HEALING, help=
    "LoRA alpha: the delta is scaled by alpha / r.")]
Steps = Annotated[int, typer.Option("--steps", rich_help_panel=HEALING, help="Optimizer steps.")]
Lr = Annotated[float, typer.Option("--lr", rich_help_panel=HEALING, help=
    "Peak learning rate (linear warmup over 5% of the steps, then cosine to 0).")]
Optimizer = Annotated[str, typer.Option("--optimizer", rich_help_panel=HEALING, help=
    "adam, or adam8bit (bitsandbytes, a quarter of the moments' memory).")]

# Memory and devices
Device = Annotated[str, typer.Option("--device", rich_help_panel=MEMORY, help=
    "Compute device: auto (cuda if available), cpu, cuda or cuda:N; plan also takes a GPU to plan for: h200, h100, "
    "a100, l40s, rtx4090, rtx3090, a10.")]
Dtype = Annotated[str, typer.Option("--dtype", rich_help_panel=MEMORY, help=
    "Compute dtype: auto (the checkpoint's), float32, bfloat16, float16.")]
BATCH_SIZE = typer.Option("--batch-size", rich_help_panel=MEMORY, help=
    "Sequences per micro-batch (heal: per optimizer step); run also takes auto, the most (up to 16) that fit "
    "--max-gpu-memory.")
BatchTokens = Annotated[int, typer.Option("--batch-tokens", rich_help_panel=MEMORY, help=
    "Tokens per micro-batch on the device (padding included).")]
MaxStreams = Annotated[Optional[int], typer.Option("--max-streams", rich_help_panel=MEMORY, help=
    "ppl: skip streams per pass over the weights (default: as many as fit in half the free RAM).")]
Offload = Annotated[str, typer.Option("--offload", rich_help_panel=MEMORY, help=
    "Where the calibration activations live: cpu (RAM), disk (a memory-mapped file) or auto (cpu when the plan fits "
    "the RAM, else disk).")]
OffloadDir = Annotated[Optional[Path], typer.Option("--offload-dir", rich_help_panel=MEMORY, help=
    "Directory for the activation buffer's file when it is kept on disk (run: with --offload disk, default "
    "--out/.streamprune/offload; eval: whenever given).")]
ExpertWeights = Annotated[str, typer.Option("--expert-weights", rich_help_panel=MEMORY, help=
    "Mixture-of-experts models on a GPU: where each layer's routed experts live: gpu, cpu (in RAM, each moved to "
    "the GPU only while it computes) or, for run and plan, auto (gpu when the plan fits --max-gpu-memory).")]
MaxRam = Annotated[Optional[str], typer.Option("--max-ram", rich_help_panel=MEMORY, help=
    "RAM the command may use, e.g. 16GB, checked against the plan (default: what is available now).")]
MaxGpuMemory = Annotated[Optional[str], typer.Option("--max-gpu-memory", rich_help_panel=MEMORY, help=
    "GPU memory the command may use, e.g. 24GB (default: what is free on the device, or for plan the named GPU's).")]
Overlap = Annotated[bool, typer.Option("--overlap/--no-overlap", rich_help_panel=MEMORY, help=
    "Overlap disk reads and writes with compute: the next layer is read while this one computes.")]
GradientCheckpointing = Annotated[bool, typer.Option(
    "--gradient-checkpointing/--no-gradient-checkpointing", rich_help_panel=MEMORY,
    help="Recompute each block's activations in the backward pass: far less memory, more time.")]
Processes = Annotated[int, typer.Option("--processes", rich_help_panel=MEMORY, help=
    "Plan a run of this many processes on one machine (torchrun --nproc-per-node N).")]
ReadSpeed = Annotated[str, typer.Option("--read-speed", rich_help_panel=MEMORY, help=
    "Disk read speed per second assumed for the time estimate.")]
WriteSpeed = Annotated[Optional[str], typer.Option("--write-speed", rich_help_panel=MEMORY, help=
    "Disk write speed per second for the time estimate (default: probed here, or 1GB for a GPU named but not here).")]

# Resume
CHECKPOINT_EVERY = typer.Option("--checkpoint-every", rich_help_panel=RESUME, help=
    "Save a resume point every K layers (heal: steps); run's default is the smallest K that adds at most 20% to "
    "what it writes.")
CHECKPOINT_MINUTES = typer.Option("--checkpoint-minutes", rich_help_panel=RESUME, help=
    "Save a resume point whenever this many minutes have passed since the last one (depth: 0 saves after every "
    "block).")

# Output
Out = Annotated[Path, typer.Option("--out", "-o", rich_help_panel=OUTPUT, help=
    "Output directory for the new checkpoint and the files beside it.")]
MaxShardSize = Annotated[str, typer.Option("--max-shard-size", rich_help_panel=OUTPUT, help=
    "Largest output shard file, e.g. 5GB, 500MB, 2GiB.")]
Force = Annotated[bool, typer.Option("--force", rich_help_panel=OUTPUT, help=
    "Write into a non-empty --out, replacing the checkpoint there or discarding an unfinished run to start over.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", rich_help_panel=OUTPUT, help="No progress bars.")]
ScoresOnly = Annotated[bool, typer.Option("--scores-only", rich_help_panel=OUTPUT, help=
    "Score and report; write no checkpoint.")]
EvalPpl = Annotated[Optional[Path], typer.Option("--eval-ppl", rich_help_panel=OUTPUT, help=
    "Afterwards, measure the output's perplexity on this text file, or on wikitext2 (streamed, as eval does).")]
EvalSeqlen = Annotated[int, typer.Option("--eval-seqlen", rich_help_panel=OUTPUT, help="Window length for --eval-ppl.")]
AsJson = Annotated[bool, typer.Option("--json", rich_help_panel=OUTPUT, help=
    "Print the numbers as JSON instead of the report.")]
Output = Annotated[Optional[Path], typer.Option("--output", rich_help_panel=OUTPUT, help=
    "Write the results, with per-example predictions, to this JSON file.")]
# fmt: on
