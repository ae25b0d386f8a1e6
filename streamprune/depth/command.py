"""`streamprune depth`: the settings checked against the source, the scores reused or computed (going
on from a stopped scoring's last save), the report, and the shortened checkpoint."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from .. import buffers
from ..calibration import calibration_path, file_sha256, sample_calibration
from ..chart import block_chart_png
from ..errors import UsageError
from ..outdir import (
    RECORD_FILE,
    OutputLock,
    check_destination,
    check_not_source,
    check_output_dir,
    prepare_output_dir,
    write_json,
)
from ..runstate import (
    DEPTH_STATE_FILE,
    ScoringState,
    check_same_structure,
    saved_state,
    source_fingerprint,
)
from ..stream import Source, open_source
from ..writer import write_atomic
from .blocks import Blocks
from .config import DepthConfig, candidates, lowest, removal_count
from .criteria import score_blocks
from .healing import heal_seams, healing_ids
from .report import SCORES_CSV, SCORES_JSON, SCORES_PNG, depth_report, earlier_scores, scores_csv
from .saves import ScoringSaves
from .shortened import write_shortened


def depth(config: DepthConfig) -> dict:
    """Score the blocks of `config.model`, and unless --scores-only write the shortened checkpoint
    to `config.out`; returns the report (also written as depth_scores.json)."""
    started = time.perf_counter()
    buffers.return_freed_memory_to_the_system()

    # 1. the source and the settings, all checked before anything is written
    source = open_source(config.model, config.torch_device, config.dtype)
    check_not_source(config.out, source.directory)
    with OutputLock(config.out) as lock:  # taken before the first write; released however this ends
        lock.check()
        check_destination(config.out, "--out")
        count = None
        if not config.scores_only:
            count = removal_count(source.num_layers, config.remove, config.ratio, config.keep_first, config.keep_last)
        calib_path = None if config.criterion == "magnitude" else calibration_path(config.calib)
        structure = scoring_identity(config, source, count, calib_path)
        heal_ids = None
        if config.reconstruct:  # sampled now: bad calibration text is found before anything is written
            heal_ids = healing_ids(config, source, calibration_path(config.calib))
        return score_and_write(config, source, structure, count, calib_path, heal_ids, lock, started)


def score_and_write(
    config: DepthConfig, source: Source, structure: dict, count, calib_path, heal_ids, lock, started
) -> dict:
    """Steps 2-5: the scores (reused or computed), the report, the shortened checkpoint."""
    # 2-3. the scores: reused from an earlier run into --out with these exact settings (stopped
    # while writing, or --scores-only), else computed, going on from a stopped scoring's last save
    allowed = candidates(source.num_layers, config.keep_first, config.keep_last)
    state = None if config.force else ScoringState.load(config.out)
    earlier = None if config.force or state is not None else earlier_scores(config.out, structure)
    if earlier is not None:
        lock.acquire()
        rounds, calibration, scoring_seconds = earlier["rounds"], earlier["calibration"], earlier["scoring_seconds"]
        if not config.iterative:
            rounds[0]["removed"] = lowest(rounds[0]["scores"], allowed, count or 0)
        if not config.quiet:
            print(f"reusing the block scores in {config.out / SCORES_JSON} (same model and settings)", file=sys.stderr)
    else:
        rounds, calibration, scoring_seconds = score(config, source, structure, state, count, calib_path, lock, started)

    # 4. the report: scores per block (JSON, CSV) and the chart, written before the checkpoint
    report = depth_report(config, source, structure, rounds, calibration, scoring_seconds)
    write_json(config.out / SCORES_JSON, report)
    write_atomic(config.out / SCORES_CSV, scores_csv(report).encode())
    write_atomic(config.out / SCORES_PNG, block_chart_png(report))
    # the scores are durable: the scoring state goes, and so do the weights of an earlier try to
    # write the checkpoint (only our own files can be there: --out was empty or held this run)
    prepare_output_dir(config.out, force=True)
    if config.scores_only:
        return report

    # 5. the shortened checkpoint: kept blocks renumbered 0..K-1, everything else as it was but the
    # blocks healed by --reconstruct
    healed = {}
    if heal_ids is not None:
        healed, report["reconstruct"] = heal_seams(config, source, report["kept"], heal_ids)
    report["output_files"], report["output_bytes"] = write_shortened(config, source, report["kept"], healed)
    report["total_seconds"] = time.perf_counter() - started
    write_json(config.out / RECORD_FILE, report)
    return report


def scoring_identity(config: DepthConfig, source: Source, count: int | None, calib_path: Path | None) -> dict:
    """Everything the scores depend on: the same scores may be reused only when these match."""
    seqlen = source.capped_seqlen(config.seqlen)
    return {
        "source": source_fingerprint(source.checkpoint),
        "criterion": config.criterion,
        "remove": count if config.iterative else None,  # one-shot scores do not depend on how many go
        "keep_first": config.keep_first,
        "keep_last": config.keep_last,
        "iterative": config.iterative,
        "calibration": None if calib_path is None else {"sha256": file_sha256(calib_path), "nsamples": config.nsamples,
                                                        "seqlen": seqlen, "seed": config.seed},
        "dtype": str(source.dtype).removeprefix("torch."),
        "batch_size": config.batch_size,
    }  # fmt: skip


def score(config: DepthConfig, source: Source, structure: dict, state, count, calib_path, lock, started) -> tuple:
    """(rounds, calibration record, scoring seconds): score the blocks, going on from `state` (the
    last save of a stopped scoring in --out) when there is one. --iterative removes one block per
    round and rescores the shorter model."""
    if state is None:
        check_output_dir(config.out, config.force)
    else:
        check_same_structure(state.structure, structure, config.out, "an unfinished depth scoring")
    saved = saved_state(config.out, DEPTH_STATE_FILE)
    calibration = None
    if calib_path is not None:  # every criterion but magnitude; read before --out is created
        seqlen, sha256 = structure["calibration"]["seqlen"], structure["calibration"]["sha256"]
        calibration = sample_calibration(config, calib_path, sha256, source.directory, seqlen)
        source.check_token_ids(calibration["input_ids"])
    lock.acquire()
    if saved_state(config.out, DEPTH_STATE_FILE) != saved:
        raise UsageError(
            f"--out {config.out}: the scoring saved there changed while this command was starting (another "
            "streamprune process?). Nothing was written; run the same command again"
        )
    if state is None:
        check_output_dir(config.out, config.force)
        prepare_output_dir(config.out, config.force)
        state = ScoringState(config.out, structure)
    elif not config.quiet:
        at = f"{state.progress['phase'] or 'a new round'} from position {state.progress['position']}"
        print(f"continuing the block scoring saved in {config.out} ({at})", file=sys.stderr)
    input_ids = None if calibration is None else calibration.pop("input_ids")

    blocks = Blocks(source, config.batch_size, config.overlap, config.quiet)
    saves = ScoringSaves(state, config.checkpoint_minutes, source.checkpoint, started)
    rounds = saves.rounds
    allowed = candidates(source.num_layers, config.keep_first, config.keep_last)
    while len(rounds) < (count if config.iterative and count else 1):
        model = [i for i in range(source.num_layers) if not any(i in r["removed"] for r in rounds)]
        scores, passes = score_blocks(config, blocks, model, input_ids, saves)
        take = 0 if count is None else 1 if config.iterative else count
        chosen = lowest(scores, [i for i in allowed if i in model], take)
        rounds.append({"blocks": model, "scores": scores, "removed": chosen, "passes": passes,
                       "bytes_read": source.checkpoint.bytes_read})  # fmt: skip
        saves.save(None, 0, {}, {})
    return rounds, calibration, saves.seconds()
