"""Calibration sampling reproduces the Wanda reference's random draws; short text is refused."""

import random

import pytest
import torch
from conftest import C4, WIKITEXT
from transformers import AutoTokenizer

from streamprune.calibration import read_documents, sample_windows
from streamprune.errors import BadInputError


def reference_c4_windows(documents, tokenizer, nsamples, seqlen, seed):
    """locuslab/wanda get_c4's draws, written out: random long-enough document, random window."""
    random.seed(seed)
    windows = []
    for _ in range(nsamples):
        while True:
            doc = random.randint(0, len(documents) - 1)
            ids = tokenizer(documents[doc], return_tensors="pt").input_ids
            if ids.shape[1] > seqlen:
                break
        start = random.randint(0, ids.shape[1] - seqlen - 1)
        windows.append(ids[:, start : start + seqlen])
    return torch.cat(windows)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.mark.parametrize("seed", [0, 7])
def test_c4_sampling_matches_reference(tokenizer, seed):
    documents = read_documents(C4)
    assert len(documents) == 2000
    ours = sample_windows(documents, tokenizer, nsamples=16, seqlen=256, seed=seed)
    assert torch.equal(ours, reference_c4_windows(documents, tokenizer, 16, 256, seed))


def test_text_file_is_one_document_with_random_windows(tokenizer):
    documents = read_documents(WIKITEXT)
    assert len(documents) == 1
    ids = tokenizer(documents[0]).input_ids
    windows = sample_windows(documents, tokenizer, nsamples=4, seqlen=64, seed=0)
    rng = random.Random(0)
    for row in windows.tolist():
        start = rng.randint(0, len(ids) - 64 - 1)
        assert row == ids[start : start + 64]


def test_too_short_says_what_was_found_and_what_fits(tokenizer, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(" ".join(["the quick brown fox jumps over the lazy dog"] * 40))
    found = len(tokenizer(text.read_text()).input_ids)
    with pytest.raises(BadInputError) as err:
        sample_windows(read_documents(text), tokenizer, nsamples=128, seqlen=64, seed=0)
    message = str(err.value)
    assert f"{found:,} tokens" in message and "needs 8,192" in message
    assert f"--nsamples {found // 64} --seqlen 64" in message


def test_jsonl_without_text_field_is_refused(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"content": "no text field"}\n')
    with pytest.raises(BadInputError, match="line 2"):
        read_documents(bad)
