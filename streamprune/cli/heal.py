"""`streamprune heal`: LoRA through the masks, merged (library: heal)."""

from __future__ import annotations

from typing import Annotated

import typer

from ..heal import HealConfig
from ..heal import heal as run_heal
from ..heal import summary as heal_summary
from .app import app
from .common import check_one_process, resume_command, user_errors
from .options import (
    BATCH_SIZE,
    Base,
    CHECKPOINT_EVERY,
    Data,
    Device,
    EvalPpl,
    EvalSeqlen,
    Force,
    GradientCheckpointing,
    LoraAlpha,
    LoraRank,
    Lr,
    MaxShardSize,
    Model,
    Optimizer,
    Out,
    Quiet,
    SEQLEN,
    Seed,
    Steps,
)


@app.command()
def heal(
    model: Model,
    data: Data = "c4",
    seqlen: Annotated[int, SEQLEN] = 512,
    seed: Seed = 0,
    base: Base = "auto",
    lora_rank: LoraRank = 16,
    lora_alpha: LoraAlpha = 32.0,
    steps: Steps = 200,
    lr: Lr = 2e-4,
    optimizer: Optimizer = "adam",
    device: Device = "auto",
    batch_size: Annotated[int, BATCH_SIZE] = 4,
    gradient_checkpointing: GradientCheckpointing = True,
    checkpoint_every: Annotated[int, CHECKPOINT_EVERY] = 50,
    out: Out = ...,
    max_shard_size: MaxShardSize = "5GB",
    eval_ppl: EvalPpl = None,
    eval_seqlen: EvalSeqlen = 512,
    force: Force = False,
    quiet: Quiet = False,
) -> None:
    """Heal a pruned model with LoRA (QLoRA with --base nf4) and write the merged checkpoint.

    The whole model is held in memory (see `streamprune plan MODEL --heal`); for models that do not fit, heal layer by layer with `streamprune run ... --reconstruct`. Every weight that is zero in MODEL is still exactly zero in the output: each adapter's delta acts through its Linear's mask, in training and in the merge. Beside the checkpoint: adapter/ (peft) and streamprune.json.
    """
    with user_errors(
        on_interrupt=f"interrupted; the adapters and optimizer saved every --checkpoint-every steps are kept in "
        f"--out. To resume: {resume_command()}",
        on_gpu_oom=f"Lower --batch-size (now {batch_size}) or --seqlen, or use --base nf4. Resume with the same "
        "command after changing nothing else, or start over with --force.",
        on_disk_full=f"The training state saved so far is kept; free some space, then: {resume_command()}",
    ):
        check_one_process("heal")
        config = HealConfig(
            model=model, out=out, data=data, steps=steps, batch_size=batch_size, seqlen=seqlen, lr=lr,
            lora_rank=lora_rank, lora_alpha=lora_alpha, base=base, optimizer=optimizer, seed=seed, device=device,
            checkpoint_every=checkpoint_every, gradient_checkpointing=gradient_checkpointing,
            max_shard_size=max_shard_size, eval_ppl=eval_ppl, eval_seqlen=eval_seqlen, force=force, quiet=quiet,
        )  # fmt: skip
        record = run_heal(config)
    typer.echo(heal_summary(record))
