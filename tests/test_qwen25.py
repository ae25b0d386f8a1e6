"""A second real trained model, of another family: Qwen2.5-Coder-0.5B-Instruct (Qwen2, 24 layers,
tied embeddings, GQA 14/2), float32 on CPU, end to end: prune (masks equal the whole-model Wanda
reference), evaluate (streamed perplexity equals the whole model's), load in transformers, generate."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import C4, WIKITEXT, tree_digest
from reference_wanda import load_full_model, wanda_reference
from test_pipeline import load_state, mask_agreement, saved_ids

from streamprune import PruneConfig, prune
from streamprune.evaluate import EvalConfig, evaluate

pytestmark = pytest.mark.smollm2  # the real-model tests: CI builds both models and runs them
CALIB = dict(calib=str(C4), nsamples=4, seqlen=128, batch_size=1, quiet=True)


@pytest.fixture(scope="module")
def pruned(qwen25, tmp_path_factory):
    before = tree_digest(qwen25)
    out = tmp_path_factory.mktemp("qwen25") / "out"
    record = prune(PruneConfig.from_flags(model=str(qwen25), out=out, pattern="2:4", **CALIB))
    assert record["source"]["num_hidden_layers"] == 24
    assert tree_digest(qwen25) == before
    return out


def test_qwen25_wanda_equals_whole_model_reference(qwen25, pruned):
    reference = load_full_model(qwen25)
    wanda_reference(reference, saved_ids(pruned), sparsity=0.5, prune_n=2, prune_m=4)
    agreement = mask_agreement(load_state(pruned), reference)
    print(f"Qwen2.5-Coder-0.5B 2:4: {agreement:.6%} of mask entries identical")
    assert agreement >= 0.999


def test_qwen25_streamed_perplexity_equals_the_whole_model(pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    streamed = evaluate(EvalConfig(model=str(pruned), ppl=str(WIKITEXT), seqlen=128, limit=3, quiet=True))
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    model = AutoModelForCausalLM.from_pretrained(pruned, dtype=torch.float32).eval()
    ids = tokenizer(WIKITEXT.read_text(), return_tensors="pt").input_ids[0, : 3 * 128].view(3, 128)
    with torch.no_grad():
        losses = [model(window.unsqueeze(0), labels=window.unsqueeze(0)).loss for window in ids]
    assert streamed["perplexity"]["ppl"] == pytest.approx(math.exp(float(torch.stack(losses).mean())), rel=1e-4)


def test_qwen25_pruned_checkpoint_loads_and_generates(pruned):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pruned)
    tokenizer = AutoTokenizer.from_pretrained(pruned)
    ids = tokenizer("def add(a, b):\n    return", return_tensors="pt").input_ids
    new = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :]
    assert len(new) == 6 and tokenizer.decode(new).strip(), tokenizer.decode(new)
