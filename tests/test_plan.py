"""The plan (golden numbers from the geometry, fits and the flag that makes a run fit), `streamprune
plan`, the refusal of a run that cannot fit, and the run's I/O options: --offload disk and
--no-overlap produce the same bytes as the defaults; the background worker never saves after a
lost write."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from conftest import MOE_FAMILIES, TINY_FAMILIES, WIKITEXT, make_tiny_model, tree_digest
from test_resume import digest
from typer.testing import CliRunner

from streamprune import buffers
from streamprune.background import Worker
from streamprune.checkpoint import Checkpoint
from streamprune.cli import app
from streamprune.methods import METHODS
from streamprune.plan.geometry import Geometry
from streamprune.plan.memory import Settings, estimate, fit, largest_batch
from streamprune.plan.probes import disk_write_bytes_per_second, probe_shape
from streamprune.plan.report import seconds
from streamprune.source import ALIAS_CONFIGS

GB = 10**9
LLAMA2_70B = Geometry.from_config(ALIAS_CONFIGS["meta-llama/Llama-2-70b-hf"])
FAST = ["--calib", str(WIKITEXT), "--nsamples", "4", "--seqlen", "32", "--quiet"]


def test_llama2_70b_geometry_golden_numbers():
    # q and o 8192 x 8192; k and v 1024 x 8192 (8 KV heads of 128); gate, up, down 8192 x 28672
    assert LLAMA2_70B.linear_params == 2 * 8192**2 + 2 * 1024 * 8192 + 3 * 8192 * 28672 == 855_638_016
    assert LLAMA2_70B.layer_params == 855_638_016 + 2 * 8192
    params = estimate(LLAMA2_70B, Settings())["params"]
    assert params == 80 * (855_638_016 + 2 * 8192) + 2 * 32000 * 8192 + 8192 == 68_976_648_192  # "69B"


def test_70b_at_the_papers_calibration_fits_a_24gb_gpu():
    plan = estimate(LLAMA2_70B, Settings(device="cuda", nsamples=128, seqlen=2048, checkpoint_every=1))
    assert plan["buffer_bytes"] == 128 * 2048 * 8192 * 2 == 4 * 2**30  # DESIGN.md section 4
    assert plan["layer_bytes"] == (855_638_016 + 2 * 8192) * 2
    assert plan["peak_vram_bytes"] < 24 * GB
    # read once (and the embedding again for the calibration tokens); written once, plus an
    # activation checkpoint at each of the 79 resume points before the last layer
    assert plan["bytes_read"] == plan["checkpoint_bytes"] + 32000 * 8192 * 2
    assert plan["bytes_written"] == plan["checkpoint_bytes"] + 79 * plan["buffer_bytes"]
    forward = 2 * 855_638_016 * 128 * 2048 + 2 * 128 * 64 * 128 * 2048**2
    # and Wanda's statistic, about 3 FLOPs per input feature of each of the 4 input sites per token
    assert plan["flops"] == 2 * 80 * forward + 80 * 128 * 2048 * 3 * (8192 + 8192 + 8192 + 28672)
    # a RAM buffer is 4 GiB of the peak; on disk it is one micro-batch
    on_disk = estimate(LLAMA2_70B, Settings(device="cuda", offload="disk"))
    assert plan["peak_ram_bytes"] - on_disk["peak_ram_bytes"] == 4 * 2**30 - 2048 * 8192 * 2 * 2


def test_the_default_resume_points_write_at_most_a_fifth_more_than_the_output():
    """A 4 GiB buffer after each of 80 layers would write 444 GiB; by default a 70B run saves it
    after every 12th layer: 6 resume points, 24 GiB, 1.19x the 128 GiB output."""
    plan = estimate(LLAMA2_70B, Settings(device="cuda", nsamples=128, seqlen=2048))
    assert plan["checkpoint_every"] == 12 and plan["resume_points"] == 6
    assert plan["bytes_written"] == plan["checkpoint_bytes"] + 6 * 4 * 2**30 <= 1.2 * plan["checkpoint_bytes"]
    every_layer = estimate(LLAMA2_70B, Settings(device="cuda", nsamples=128, seqlen=2048, checkpoint_every=1))
    assert every_layer["bytes_written"] > 3.4 * every_layer["checkpoint_bytes"]
    # OWL's pass saves resume points too: fewer in each pass, the same budget
    owl = estimate(LLAMA2_70B, Settings(device="cuda", nsamples=128, seqlen=2048, allocation="owl"))
    assert owl["bytes_written"] <= 1.2 * owl["checkpoint_bytes"] and owl["checkpoint_every"] > 12


def test_the_plan_says_how_much_a_run_writes(tiny_llama):
    result = CliRunner().invoke(app, ["plan", "llama-70b", "--device", "rtx4090"])
    assert "write 152.48 GiB (1.19x the output: a resume point every 12 layer(s), 6 in all" in result.output


@pytest.mark.parametrize(
    "alias, billions",  # "Number of Parameters" on each model's card
    [("llama-3.2-1b", 1.23), ("llama-3.2-3b", 3.21), ("llama-3.3-70b", 70.6), ("qwen3-0.6b", 0.6),
     ("qwen3-1.7b", 1.7), ("qwen3-4b", 4.0), ("qwen3-8b", 8.2), ("qwen3-32b", 32.8), ("gemma-2-2b", 2.61),
     ("gemma-2-9b", 9.24), ("gemma-2-27b", 27.2), ("gemma-3-270m", 0.268), ("gemma-3-1b", 1.0),
     ("phi-3-mini", 3.82), ("phi-4", 14.7), ("phi-4-mini", 3.84), ("gemma-3-4b", 4.30), ("gemma-3-12b", 12.2),
     ("gemma-3-27b", 27.4), ("olmo-2-7b", 7.30), ("olmo-2-13b", 13.7), ("mixtral-8x7b", 46.7),
     ("mixtral-8x22b", 141), ("qwen1.5-moe-a2.7b", 14.3), ("qwen3-30b-a3b", 30.5), ("qwen3-235b-a22b", 235),
     ("olmoe-1b-7b", 6.92)],
)  # fmt: skip
def test_the_built_in_sizes_of_the_newer_aliases_give_their_published_parameter_counts(alias, billions):
    from streamprune.source import ALIASES

    params = estimate(Geometry.from_config(ALIAS_CONFIGS[ALIASES[alias]]), Settings())["params"]
    assert abs(params / 1e9 - billions) / billions < 0.02, params


def test_a_micro_batch_holds_at_most_every_sample():
    """--batch-size 1000 with --nsamples 4 runs micro-batches of 4: the plan says what the run does."""
    huge = estimate(LLAMA2_70B, Settings(device="cuda", nsamples=4, seqlen=2048, batch_size=1000))
    assert huge == estimate(LLAMA2_70B, Settings(device="cuda", nsamples=4, seqlen=2048, batch_size=4))
    assert huge != estimate(LLAMA2_70B, Settings(device="cuda", nsamples=4, seqlen=2048, batch_size=1))


def test_peak_ram_does_not_depend_on_depth():
    shallow = Geometry(8, 1024, 2816, 16, 4, 64, 49152, True, False)
    deep = Geometry(64, 1024, 2816, 16, 4, 64, 49152, True, False)
    settings = Settings(stored_bytes=4, compute_bytes=4, nsamples=16, seqlen=256)
    assert estimate(shallow, settings)["peak_ram_bytes"] == estimate(deep, settings)["peak_ram_bytes"]
    assert estimate(deep, settings)["checkpoint_bytes"] > 3 * estimate(shallow, settings)["checkpoint_bytes"]


def test_fit_names_the_flag_that_makes_it_fit():
    cpu_plan = estimate(LLAMA2_70B, Settings(device="cuda", offload="cpu"))
    disk_plan = estimate(LLAMA2_70B, Settings(device="cuda", offload="disk"))
    # auto: RAM when it fits, else the disk
    plan, problems = fit(LLAMA2_70B, Settings(device="cuda", offload="auto"), cpu_plan["peak_ram_bytes"], None)
    assert problems == [] and plan["peak_ram_bytes"] == cpu_plan["peak_ram_bytes"]
    settings = Settings(device="cuda", offload="auto")
    plan, problems = fit(LLAMA2_70B, settings, disk_plan["peak_ram_bytes"], None)
    assert problems == [] and settings.offload == "disk"
    # --offload cpu given but too big: say --offload disk
    _, problems = fit(LLAMA2_70B, Settings(device="cuda", offload="cpu"), disk_plan["peak_ram_bytes"], None)
    assert len(problems) == 1 and "--offload disk" in problems[0]
    # not even on disk: fewer samples, or more RAM
    _, problems = fit(LLAMA2_70B, Settings(device="cuda", offload="cpu"), 2 * GB, None)
    assert "even with --offload disk" in problems[0] and "--max-ram" in problems[0]
    # GPU memory: the largest batch that fits, then bfloat16, then --seqlen
    batch8 = Settings(device="cuda", batch_size=8)
    one = estimate(LLAMA2_70B, Settings(device="cuda", batch_size=1))["peak_vram_bytes"]
    _, problems = fit(LLAMA2_70B, batch8, None, one)
    # the mask computation, not the micro-batch, sets the peak at small batches
    fits = [
        b for b in range(1, 8) if estimate(LLAMA2_70B, Settings(device="cuda", batch_size=b))["peak_vram_bytes"] <= one
    ]
    assert problems and f"lower --batch-size to {max(fits)}" in problems[0] and max(fits) < 8
    _, problems = fit(LLAMA2_70B, Settings(device="cuda", compute_bytes=4), None, one)
    assert problems and "--dtype bfloat16" in problems[0]
    _, problems = fit(LLAMA2_70B, Settings(device="cuda"), None, one // 2)
    assert problems and "--seqlen" in problems[0]


def test_plan_command(tiny_llama, monkeypatch):
    runner = CliRunner()
    result = runner.invoke(app, ["plan", str(tiny_llama), "--nsamples", "4", "--seqlen", "32", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    for phrase in ("peak RAM", "disk", "I/O", "TFLOP", "time", "fits the limits"):
        assert phrase in result.output
    result = runner.invoke(app, ["plan", str(tiny_llama), "--device", "cpu", "--max-ram", "1MB"])
    assert result.exit_code == 4 and "does not fit" in result.output, result.output
    # an alias plans offline, from built-in sizes; the 24 GB GPU fits with the paper's calibration
    result = runner.invoke(app, ["plan", "llama-70b", "--device", "rtx4090", "--max-ram", "64GB", "--json"])
    assert result.exit_code == 0, result.output
    numbers = json.loads(result.output)
    assert numbers["fits"] and numbers["peak_vram_bytes"] < 24 * GB and numbers["params"] == 68_976_648_192
    assert numbers["seconds"]["total"] == max(numbers["seconds"]["compute"], numbers["seconds"]["io"])
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no retries against a dead network
    result = runner.invoke(app, ["plan", "no/such-model-offline"])
    assert result.exit_code == 4 and "cannot download config.json" in result.output, result.output


def test_plan_takes_the_run_flags():
    """The issue's own command, `plan llama-70b --sparsity 0.5 ...`, works; its flags are checked as for run."""
    runner = CliRunner()
    base = ["plan", "llama-70b", "--nsamples", "128", "--seqlen", "2048", "--device", "rtx4090", "--json"]
    plain = json.loads(runner.invoke(app, base).output)
    result = runner.invoke(app, [*base, "--sparsity", "0.5"])
    assert result.exit_code == 0, result.output
    with_sparsity = json.loads(result.output)
    for key in ("peak_vram_bytes", "disk_bytes", "bytes_written", "flops"):  # peak RAM includes the RSS of the moment
        assert with_sparsity[key] == plain[key], key
    result = runner.invoke(app, [*base, "--sparsity", "1.5"])
    assert result.exit_code == 2 and "--sparsity 1.5 is outside (0, 1)" in result.output, result.output
    result = runner.invoke(app, [*base, "--pattern", "2:4", "--sparsity", "0.5"])
    assert result.exit_code == 2 and "either --sparsity or --pattern" in result.output, result.output


def test_magnitude_plans_its_whole_matrix_sort():
    """Layer-wise magnitude sorts each Linear whole (float32 values + int64 indices); with a pattern,
    and for Wanda, the sort goes in slices of 2**26 scores. On a CPU the mask step makes the peak."""
    largest = 8192 * 28672  # gate/up/down of Llama-2-70B
    whole = estimate(LLAMA2_70B, Settings(method="magnitude"))["peak_ram_bytes"]
    sliced = estimate(LLAMA2_70B, Settings(method="magnitude", pattern="2:4"))["peak_ram_bytes"]
    assert whole - sliced == (largest - 2**26) * (4 + 8) == 2_013_265_920


def test_run_that_cannot_fit_is_refused_before_writing(tiny_llama, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["run", str(tiny_llama), "--out", str(out), "--max-ram", "1MB", *FAST])
    assert result.exit_code == 4, result.output
    assert "would not fit" in result.output and "--max-ram" in result.output
    assert not out.exists()


def test_offload_disk_and_no_overlap_give_the_same_bytes(tiny_llama, tmp_path):
    before = tree_digest(tiny_llama)
    outputs = {}
    for name, extra in [("default", []), ("disk", ["--offload", "disk"]), ("serial", ["--no-overlap"])]:
        out = tmp_path / name
        result = CliRunner().invoke(app, ["run", str(tiny_llama), "--out", str(out), *FAST, *extra])
        assert result.exit_code == 0, result.output
        outputs[name] = {file: sha for file, sha in digest(out).items() if file != "streamprune.json"}
        assert not (out / ".streamprune").exists()  # the offloaded buffer's file went with the state
        assert json.loads((out / "streamprune.json").read_text())["offload"] == ("disk" if name == "disk" else "cpu")
    assert outputs["disk"] == outputs["default"] == outputs["serial"]
    assert tree_digest(tiny_llama) == before


def test_released_offloaded_rows_keep_their_values(tmp_path):
    buffer = buffers.activation_buffer((64, 1024), torch.float32, tmp_path)  # 64 rows of 4 KiB pages
    buffer.copy_(torch.arange(64 * 1024, dtype=torch.float32).view(64, 1024))
    buffers.release(buffer, slice(3, 40))
    buffers.release(buffer)
    assert torch.equal(buffer, torch.arange(64 * 1024, dtype=torch.float32).view(64, 1024))
    assert buffers.is_offloaded(buffer) and list(tmp_path.iterdir()) == []  # no name: nothing left by a kill


@pytest.mark.parametrize("enabled", [True, False])
def test_worker_skips_every_job_after_a_failure(enabled):
    worker, done = Worker("test", enabled), []

    def fail():
        raise OSError(28, "No space left on device")

    worker.submit(done.append, 1)
    worker.submit(fail)
    worker.submit(done.append, 2)  # e.g. the resume point after a lost write: must not happen
    with pytest.raises(OSError):
        worker.wait()
    worker.close()
    assert done == [1]


def test_batch_size_auto_is_one_without_a_gpu():
    settings = Settings(device="cpu", nsamples=64)
    assert largest_batch(LLAMA2_70B, settings, 80 * GB) == 1
    assert largest_batch(LLAMA2_70B, Settings(device="cuda", nsamples=64), 80 * GB) > 1


def test_offload_dir_needs_offload_disk(tiny_llama, tmp_path):
    result = CliRunner().invoke(
        app, ["run", str(tiny_llama), "--out", str(tmp_path / "o"), "--offload", "cpu", "--offload-dir", "x", *FAST]
    )
    assert result.exit_code == 2 and "--offload disk" in result.output
    shutil.rmtree(tmp_path / "o", ignore_errors=True)


@pytest.mark.parametrize("offload", ["cpu", "disk"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_peak_ram_is_the_sum_of_its_parts(offload, device):
    plan = estimate(LLAMA2_70B, Settings(device=device, offload=offload, runtime_bytes=300 * 2**20))
    assert sum(plan["peak_ram_parts"].values()) == plan["peak_ram_bytes"]


@pytest.mark.parametrize("extra", [{}, {"allocation": "owl"}, {"reconstruct": True}])
@pytest.mark.parametrize("method", METHODS)
def test_the_run_takes_exactly_the_steps_the_plan_estimates(tiny_llama, tmp_path, method, extra):
    """The plan's RAM is estimated per run step, by name; a run records the steps it took under the
    same names. A step added, renamed or dropped on one side only fails here."""
    from test_pipeline import run

    record = run(tiny_llama, tmp_path / "out", method=method, **extra)
    assert set(record["rss_after_step_bytes"]) == set(record["plan"]["ram_by_step"])
    assert all(rss > 0 for rss in record["rss_after_step_bytes"].values())


def test_disk_write_probe_and_cpu_io_in_sequence(tmp_path):
    rate = disk_write_bytes_per_second(tmp_path)
    assert rate is not None and rate > 1e6 and list(tmp_path.iterdir()) == []  # probed, and nothing left
    assert disk_write_bytes_per_second(tmp_path / "missing") is None
    plan = {"forward_flops": 10.0, "statistic_flops": 0.0, "prune_flops": 0.0, "pruned_weights": 0, "prune_steps": 0,
            "bytes_read": 4.0, "bytes_written": 6.0}  # fmt: skip
    rates = {"forward": 1.0, "solve": 1.0, "weights": 1.0, "steps": 1.0}
    assert seconds(plan, rates, 2.0, 3.0, overlap=True) == {"compute": 10.0, "io": 4.0, "total": 10.0}
    assert seconds(plan, rates, 2.0, 3.0, overlap=False)["total"] == 14.0


def test_plan_on_this_cpu_adds_its_probed_writes_to_compute(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["plan", str(tiny_llama), "--device", "cpu", "--nsamples", "4", "--seqlen", "32",
                                      "--json"])  # fmt: skip
    numbers = json.loads(result.output)
    times = numbers["seconds"]
    assert result.exit_code == 0 and times["total"] == pytest.approx(times["compute"] + times["io"])
    assert list(tmp_path.iterdir()) == []
    monkeypatch.chdir(tiny_llama)  # inside the source: never written, the probe goes to the temp directory
    before = tree_digest(tiny_llama)
    seen = []
    monkeypatch.setattr("streamprune.plan.commands.disk_write_bytes_per_second", lambda directory: seen.append(directory))
    assert CliRunner().invoke(app, ["plan", ".", "--device", "cpu", "--nsamples", "4", "--seqlen", "32"]).exit_code == 0
    assert tree_digest(tiny_llama) == before and seen and tiny_llama.resolve() not in [seen[0], *seen[0].parents]
    named = CliRunner().invoke(app, ["plan", "llama-70b", "--device", "rtx4090", "--json"])
    times = json.loads(named.output)["seconds"]
    assert times["total"] == max(times["compute"], times["io"]), "a GPU's run overlaps its I/O"


def test_probe_forwards_the_runs_micro_batch_on_a_gpu_and_128_tokens_on_a_cpu():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert probe_shape(cpu, (16, 2048)) == probe_shape(cpu, None) == probe_shape(cuda, None) == (1, 128)
    assert probe_shape(cuda, (1, 2048)) == (1, 2048)
    assert probe_shape(cuda, (16, 2048)) == (4, 2048)  # 8192 tokens at most
    assert probe_shape(cuda, (3, 512)) == (3, 512)
    assert probe_shape(cuda, (2, 32768)) == (1, 8192)


@pytest.mark.parametrize("family", (*TINY_FAMILIES, *MOE_FAMILIES))
def test_the_plan_counts_every_parameter_of_the_checkpoint(tiny_models, tmp_path, family):
    """Every tensor the run reads and writes is in the plan, norms too (Gemma 2 and 3 have four a
    block, Qwen 3, OLMo 2 and Gemma 3 q/k norms beside them)."""
    source = tiny_models.get(family) or make_tiny_model(tmp_path / family, family)
    geometry = Geometry.from_config(json.loads((source / "config.json").read_text()))
    stored = sum(math.prod(info.shape) for info in Checkpoint(source).tensors.values())
    assert geometry.layers * geometry.layer_params + geometry.outside_params == stored


# -- the plan of a streamed eval (plan --tasks / --ppl) ---------------------------------------------------

WANDA_TASKS = ["boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]


def test_eval_plan_grows_with_its_tokens_and_includes_the_head():
    from streamprune.plan.evaluation import EvalSettings, eval_estimate, eval_seconds, eval_workload

    settings = EvalSettings(device="cuda")
    small, full = (eval_workload(WANDA_TASKS, limit, None, 2048) for limit in (50, None))
    assert 0 < small.tokens < full.tokens and 0 < small.scored < full.scored
    plans = [eval_estimate(LLAMA2_70B, work, settings) for work in (small, full)]
    for work, plan in zip((small, full), plans):
        assert plan["buffer_bytes"] == work.tokens * 8192 * 2  # eval's buffer: [all tokens, hidden] in float16
        assert plan["head_flops"] == 2 * 32000 * 8192 * work.scored  # the LM head over every scored token
        assert plan["flops"] == plan["layer_flops"] + plan["head_flops"]
        times = eval_seconds(plan, {"forward": 66e12}, 2e9, 1e9, overlap=True)
        assert times["head"] >= plan["head_flops"] / 66e12 > 0
        assert times["total"] >= times["layers"] + times["head"]
        assert all(plan[key] > 0 for key in ("peak_ram_bytes", "peak_vram_bytes", "bytes_read", "layer_flops"))
    assert plans[1]["peak_ram_bytes"] - plans[0]["peak_ram_bytes"] >= plans[1]["buffer_bytes"] - plans[0]["buffer_bytes"]
    # the GPU holds a layer and a micro-batch, or the head: not the tokens
    assert plans[0]["peak_vram_bytes"] == plans[1]["peak_vram_bytes"] < 24 * GB
    assert plans[1]["peak_vram_bytes"] > LLAMA2_70B.layer_params * 2


def test_eval_plan_per_layer_costs_are_the_run_plans():
    """Eval's forward of W windows of 2048 inputs costs what a run's forward of W samples of 2048
    does (Wanda forwards each layer twice), and reads the same layers."""
    from streamprune.plan.evaluation import PPL_BYTES_PER_TOKEN, EvalSettings, eval_estimate, eval_workload

    windows = 16
    work = eval_workload([], None, int(windows * 2049 * PPL_BYTES_PER_TOKEN), 2049)  # inputs: 2048 a window
    assert (work.sequences, work.tokens) == (windows, windows * 2048)
    plan = eval_estimate(LLAMA2_70B, work, EvalSettings(device="cuda"))
    run = estimate(LLAMA2_70B, Settings(device="cuda", nsamples=windows, seqlen=2048))
    assert plan["layer_flops"] == run["forward_flops"] / 2
    assert plan["layer_bytes"] == run["layer_bytes"]
    assert plan["bytes_read"] == run["checkpoint_bytes"]  # every tensor once: embedding, layers, norm, untied head


def test_eval_plan_puts_a_buffer_too_large_for_the_ram_in_a_file():
    from streamprune.plan.evaluation import EvalSettings, eval_workload, fit_eval

    work = eval_workload(WANDA_TASKS, None, None, 2048)
    roomy, _ = fit_eval(LLAMA2_70B, work, EvalSettings(device="cuda"), 256 * GB, 24 * GB, "auto")
    assert roomy["offload"] == "cpu" and roomy["offloaded_buffer_bytes_moved"] == 0
    tight, problems = fit_eval(LLAMA2_70B, work, EvalSettings(device="cuda"), 32 * GB, 24 * GB, "auto")
    assert tight["offload"] == "disk" and not problems
    assert tight["offloaded_buffer_bytes_moved"] == 2 * 80 * tight["buffer_bytes"]
    assert tight["peak_ram_bytes"] < roomy["peak_ram_bytes"] - tight["buffer_bytes"] / 2
    _, problems = fit_eval(LLAMA2_70B, work, EvalSettings(device="cuda"), 32 * GB, 24 * GB, "cpu")
    assert problems and "--offload-dir" in problems[0]


def test_plan_command_plans_the_wanda_papers_seven_tasks_for_70b_on_a_24gb_gpu():
    args = ["plan", "llama-70b", "--device", "rtx4090", "--tasks", ",".join(WANDA_TASKS), "--max-ram", "64GB"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "final norm and LM head" in result.output and "--offload-dir DIR" in result.output
    assert "BOS" in result.output and "then the head" in result.output  # the assumption and the head's time, stated
    numbers = json.loads(CliRunner().invoke(app, [*args, "--json"]).output)
    assert numbers["fits"] and numbers["peak_vram_bytes"] < 24 * GB and numbers["peak_ram_bytes"] < 64 * GB
    assert set(numbers["parts"]) == set(WANDA_TASKS) and numbers["seconds"]["head"] > 0
    unknown = CliRunner().invoke(app, ["plan", "llama-70b", "--tasks", "mmlu", "--device", "rtx4090"])
    assert unknown.exit_code == 2 and "plan knows the sizes of" in unknown.output
