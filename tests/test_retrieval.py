import pytest
import torch

from vlrm.retrieval import retrieval_metrics, true_ranks


def test_ranks_of_hand_made_similarities():
    # rows: captions, columns: images; the true image of caption i is image i
    sim = torch.tensor([[0.9, 0.1, 0.2, 0.0],    # true image best: rank 1
                        [0.8, 0.5, 0.1, 0.0],    # one image above: rank 2
                        [0.3, 0.4, 0.2, 0.5],    # three above: rank 4
                        [0.1, 0.2, 0.3, 0.25]])  # one above: rank 2
    assert true_ranks(sim).tolist() == [1, 2, 4, 2]


def test_ties_count_against_the_true_image():
    sim = torch.tensor([[0.5, 0.5, 0.5],     # all equal: no credit, rank 3
                        [0.2, 0.7, 0.7],     # one tie: rank 2
                        [0.1, 0.2, 0.9]])    # clear: rank 1
    assert true_ranks(sim).tolist() == [3, 2, 1]


def test_explicit_targets_and_shape_check():
    sim = torch.tensor([[0.1, 0.9, 0.3], [0.6, 0.2, 0.4]])  # 2 captions, 3 images
    assert true_ranks(sim, torch.tensor([1, 2])).tolist() == [1, 2]
    with pytest.raises(ValueError, match="explicit targets"):
        true_ranks(sim)


def test_metrics_from_known_ranks():
    ranks = torch.tensor([1, 2, 4, 2, 7, 12])
    out = retrieval_metrics(ranks, ks=(1, 5, 10))
    assert out["r1"] == pytest.approx(1 / 6)
    assert out["r5"] == pytest.approx(4 / 6)
    assert out["r10"] == pytest.approx(5 / 6)
    assert out["mrr"] == pytest.approx((1 + 1 / 2 + 1 / 4 + 1 / 2 + 1 / 7 + 1 / 12) / 6)
    assert out["mean_rank"] == pytest.approx(28 / 6)
    assert out["median_rank"] == 2.0          # lower middle of 1 2 2 4 7 12
    with pytest.raises(ValueError):
        retrieval_metrics(torch.tensor([], dtype=torch.long))


def test_perfect_and_constant_retrievers():
    n = 50
    assert retrieval_metrics(true_ranks(torch.eye(n)))["r1"] == 1.0
    flat = retrieval_metrics(true_ranks(torch.ones(n, n)))
    assert flat["r10"] == 0.0 and flat["mean_rank"] == n   # ties never help
