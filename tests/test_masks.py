"""Golden numbers and invariants for the pure pruning math: scores, masks, and each method's
prune() on hand-checked weights."""

import pytest
import torch

from streamprune.methods import METHODS, Target, method_named
from streamprune.methods.magnitude import magnitude_scores
from streamprune.methods.masks import apply_mask, matrix_prune_mask, nm_prune_mask, row_prune_mask
from streamprune.methods.wanda import InputSqNorm, wanda_scores


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


@pytest.mark.parametrize("values", [5, 1000, None])
def test_row_mask_is_the_stable_sorts_first_count(values):
    """Selection (kthvalue, then the ties leftmost first) picks exactly what a stable sort's first
    `count` are, with many ties (5 distinct values), few, and none, at every count."""
    torch.manual_seed(values or 0)
    scores = torch.rand(40, 64) if values is None else torch.randint(0, values, (40, 64)).float()
    for count in range(1, 64):
        expected = torch.zeros_like(scores, dtype=torch.bool)
        expected.scatter_(1, torch.sort(scores, dim=1, stable=True).indices[:, :count], True)
        assert torch.equal(row_prune_mask(scores, count / 64), expected)


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
    import streamprune.methods.masks as masks_module

    scores = torch.rand(50, 96, generator=torch.Generator().manual_seed(2))
    whole = row_prune_mask(scores, sparsity)
    monkeypatch.setattr(masks_module, "SORT_SLICE_ELEMENTS", 96 * 7)  # 7 rows per slice
    assert torch.equal(row_prune_mask(scores, sparsity), whole)
    assert (whole.sum(1) == int(96 * sparsity)).all()


def test_apply_mask_writes_positive_zero():
    weight = torch.tensor([[-1.0, 2.0, -0.0, -3.0]])
    pruned = apply_mask(weight, torch.tensor([[True, False, False, False]]))
    assert pruned.tolist() == [[0.0, 2.0, 0.0, -3.0]]
    assert not torch.signbit(pruned[pruned == 0]).any()
    assert pruned.dtype == weight.dtype


def statistic_of(sq_norm: torch.Tensor) -> InputSqNorm:
    statistic = InputSqNorm(len(sq_norm), torch.device("cpu"))
    statistic.sq_norm, statistic.samples = sq_norm, 1
    return statistic


def test_methods_prune_golden():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0], [8.0, 7.0, 6.0, 5.0]])
    half = Target(sparsity=0.5)
    magnitude = method_named("magnitude").prune(weight, None, half)
    assert magnitude.mask.tolist() == [[True] * 4, [False] * 4] and magnitude.weight is None  # per matrix
    sq = statistic_of(torch.tensor([16.0, 1.0, 1.0, 1.0]))
    assert method_named("wanda").prune(weight, sq, half).mask.tolist() == [
        [False, True, True, False],
        [False, False, True, True],
    ]
    assert (~method_named("wanda").prune(weight, sq, Target(keep_block=(2, 4))).mask).sum(1).tolist() == [2, 2]


def test_registry_names_every_method_once():
    assert list(METHODS) == [method.name for method in METHODS.values()]
    for method in METHODS.values():
        assert method.summary and (method.statistic is None or hasattr(method.statistic, "merge"))


def test_input_sq_norm_is_the_references_running_mean_and_merges():
    x = torch.randn(6, 5, 3, generator=torch.Generator().manual_seed(3))  # [samples, seqlen, in]
    whole = InputSqNorm(3, torch.device("cpu"))
    whole.add_batch(x)
    expected = (x.reshape(-1, 3) ** 2).sum(0) / 6  # sum over every token of x_j^2, over samples
    torch.testing.assert_close(whole.sq_norm, expected)
    first, second = InputSqNorm(3, torch.device("cpu")), InputSqNorm(3, torch.device("cpu"))
    first.add_batch(x[:2])
    second.add_batch(x[2:])
    first.merge(second)  # statistics from two processes: the same up to the order of the sums
    assert first.samples == 6
    torch.testing.assert_close(first.sq_norm, whole.sq_norm)
