"""Golden numbers and invariants for the pure pruning math."""

import pytest
import torch

from streamprune.sparsity import (
    apply_mask,
    magnitude_scores,
    matrix_prune_mask,
    nm_prune_mask,
    prune_mask,
    row_prune_mask,
    wanda_scores,
)


def test_wanda_scores_golden():
    weight = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
    sq_norm = torch.tensor([4.0, 1.0, 0.25])  # input norms 2, 1, 0.5
    assert torch.equal(wanda_scores(weight, sq_norm), torch.tensor([[2.0, 2.0, 1.5], [8.0, 5.0, 3.0]]))


def test_input_norm_changes_the_choice_against_magnitude():
    # by |W| alone the first input goes; a loud first input makes Wanda drop the last instead
    weight = torch.tensor([[0.1, 0.5, 0.3, 0.4]])
    sq_norm = torch.tensor([100.0, 1.0, 1.0, 1.0])
    assert row_prune_mask(magnitude_scores(weight), 0.25).tolist() == [[True, False, False, False]]
    assert row_prune_mask(wanda_scores(weight, sq_norm), 0.25).tolist() == [[False, False, True, False]]


def test_row_mask_golden_and_ties_broken_by_position():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    assert row_prune_mask(scores, 0.5).tolist() == [[False, True, False, True], [True, True, False, False]]
    assert row_prune_mask(scores, 0.2).sum() == 0  # int(4 * 0.2) == 0 per row


def test_matrix_mask_counts_over_the_whole_matrix():
    scores = torch.tensor([[9.0, 8.0, 7.0], [1.0, 2.0, 3.0]])
    assert matrix_prune_mask(scores, 0.5).tolist() == [[False, False, False], [True, True, True]]


def test_nm_mask_golden():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0, 5.0]])
    assert nm_prune_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, False, True, True]]
    assert nm_prune_mask(scores, 1, 4).tolist() == [[True, False, True, True, False, True, True, True]]


@pytest.mark.parametrize("keep_n,block_m", [(2, 4), (4, 8), (1, 4), (3, 4)])
def test_nm_invariant_exactly_n_kept_per_group(keep_n, block_m):
    scores = torch.rand(37, 64, generator=torch.Generator().manual_seed(1))
    kept = ~nm_prune_mask(scores, keep_n, block_m)
    assert (kept.view(37, -1, block_m).sum(-1) == keep_n).all()


def test_nm_refuses_patterns_that_do_not_tile():
    with pytest.raises(ValueError):
        nm_prune_mask(torch.rand(2, 6), 2, 4)
    with pytest.raises(ValueError):
        nm_prune_mask(torch.rand(2, 8), 4, 4)


@pytest.mark.parametrize("sparsity", [0.1, 0.5, 0.63, 0.9])
def test_row_invariant_exact_count_per_row_also_when_sliced(monkeypatch, sparsity):
    import streamprune.sparsity as sparsity_module

    scores = torch.rand(50, 96, generator=torch.Generator().manual_seed(2))
    whole = row_prune_mask(scores, sparsity)
    monkeypatch.setattr(sparsity_module, "_SORT_SLICE_ELEMENTS", 96 * 7)  # 7 rows per slice
    assert torch.equal(row_prune_mask(scores, sparsity), whole)
    assert (whole.sum(1) == int(96 * sparsity)).all()


def test_apply_mask_writes_positive_zero():
    weight = torch.tensor([[-1.0, 2.0, -0.0, -3.0]])
    pruned = apply_mask(weight, torch.tensor([[True, False, False, False]]))
    assert pruned.tolist() == [[0.0, 2.0, 0.0, -3.0]]
    assert not torch.signbit(pruned[pruned == 0]).any()
    assert pruned.dtype == weight.dtype


def test_prune_mask_dispatch():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [8.0, 7.0, 6.0, 5.0]])
    assert prune_mask(weight, "magnitude", 0.5).tolist() == [[True] * 4, [False] * 4]  # per matrix, not per row
    sq = torch.tensor([16.0, 1.0, 1.0, 1.0])
    assert prune_mask(weight, "wanda", 0.5, input_sq_norm=sq).tolist() == [
        [False, True, True, False],
        [False, False, True, True],
    ]
    assert prune_mask(weight, "wanda", 0.5, (2, 4), sq).sum(1).tolist() == [2, 2]
