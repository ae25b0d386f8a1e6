"""--reconstruct: each pruned layer's survivors trained toward the dense stream's outputs. Every
zero stays zero (N:M groups intact), the loss goes down, the plan knows the step, flags are checked."""

from __future__ import annotations

import pytest
import torch
from reference_wanda import LINEARS
from test_pipeline import load_state, run
from transformers import AutoModelForCausalLM

from streamprune.errors import UsageError

LEARN = dict(reconstruct=True, reconstruct_epochs=3, reconstruct_lr=1e-3)


def linear_weights(state: dict) -> dict[str, torch.Tensor]:
    return {name: t for name, t in state.items() if name.endswith(tuple(f"{linear}.weight" for linear in LINEARS))}


@pytest.mark.parametrize("pattern, optimizer", [(None, "adam"), ("2:4", "adam"), ("2:4", "adam8bit")])
def test_reconstruction_keeps_every_zero_and_trains_the_survivors(tiny_llama, tmp_path, pattern, optimizer):
    # magnitude's masks do not depend on the stream: the same zeros with and without training
    plain, trained = tmp_path / "plain", tmp_path / "trained"
    run(tiny_llama, plain, method="magnitude", pattern=pattern)
    record = run(tiny_llama, trained, method="magnitude", pattern=pattern, **LEARN, reconstruct_optimizer=optimizer)
    assert record["arguments"]["reconstruct_optimizer"] == optimizer
    before, after = linear_weights(load_state(plain)), linear_weights(load_state(trained))
    for name, weight in after.items():
        assert torch.equal(weight == 0, before[name] == 0), name
        assert not torch.equal(weight, before[name]), name  # the survivors moved
        assert weight[weight == 0].signbit().sum() == 0, name  # zeros are +0.0
        if pattern:
            assert ((weight != 0).view(weight.shape[0], -1, 4).sum(-1) <= 2).all(), name
    for layer in record["layers"]:
        assert layer["reconstruction"]["loss_last_epoch"] < layer["reconstruction"]["loss_first_epoch"]
    assert record["method"]["name"] == "magnitude"


def test_reconstruction_brings_the_outputs_closer_to_the_dense_model(tiny_llama, tmp_path):
    """The last layer's output on the calibration ids: nearer the dense model's after training."""
    from test_pipeline import saved_ids

    plain, trained = tmp_path / "plain", tmp_path / "trained"
    run(tiny_llama, plain, method="wanda", pattern="2:4")
    run(tiny_llama, trained, method="wanda", pattern="2:4", **LEARN)
    ids = saved_ids(trained)

    def hidden(directory):
        model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        with torch.no_grad():
            return model(ids, output_hidden_states=True).hidden_states[-1]

    dense = hidden(tiny_llama)
    assert (hidden(trained) - dense).pow(2).mean() < (hidden(plain) - dense).pow(2).mean()


def test_reconstruction_flags_are_checked(tiny_llama, tmp_path):
    with pytest.raises(UsageError, match="--propagate dense"):
        run(tiny_llama, tmp_path / "a", reconstruct=True, propagate="dense")
    with pytest.raises(UsageError, match="--reconstruct-lr must be positive"):
        run(tiny_llama, tmp_path / "b", reconstruct=True, reconstruct_lr=0)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_the_8bit_optimizer_plans_a_quarter_of_the_moments():
    """A 70B layer's 856M Linear weights: Adam's float32 moments take 6.4 GiB; 8-bit ones 1.6 GiB."""
    from test_plan import LLAMA2_70B

    from streamprune.plan.memory import Settings, estimate
    from streamprune.reconstruct import ReconstructSettings

    def vram(optimizer):
        settings = Settings(device="cuda", reconstruct=ReconstructSettings(optimizer=optimizer))
        return estimate(LLAMA2_70B, settings)["peak_vram_bytes"]

    assert vram("adam") - vram("adam8bit") == LLAMA2_70B.linear_params * 6
    assert vram("adam8bit") < 16 * 2**30 < vram("adam") < 22 * 2**30

