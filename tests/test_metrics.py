"""GLUE metrics against textbook formulas written out independently."""

import math

import pytest
import torch

from bitfit_fast.train import metrics


def test_accuracy_and_f1():
    pred, gold = torch.tensor([1, 1, 0, 0, 1, 0]), torch.tensor([1, 0, 0, 1, 1, 0])
    assert metrics.accuracy(pred, gold) == pytest.approx(4 / 6)
    tp, fp, fn = 2, 1, 1
    assert metrics.f1(pred, gold) == pytest.approx(2 * tp / (2 * tp + fp + fn))
    # The positive class is 1: here its F1 is 0.5 (tp 1, fp 2, fn 0), class 0's would be 0.8.
    assert metrics.f1(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 0, 0])) == pytest.approx(0.5)


def test_matthews_binary_formula_and_degenerate_case():
    torch.manual_seed(1)
    pred, gold = torch.randint(0, 2, (200,)), torch.randint(0, 2, (200,))
    tp = int(((pred == 1) & (gold == 1)).sum())
    tn = int(((pred == 0) & (gold == 0)).sum())
    fp = int(((pred == 1) & (gold == 0)).sum())
    fn = int(((pred == 0) & (gold == 1)).sum())
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews(pred, gold) == pytest.approx(expected)
    assert metrics.matthews(torch.zeros(5, dtype=torch.long), torch.tensor([0, 1, 0, 1, 1])) == 0.0


def test_pearson_and_spearman_with_ties():
    x = torch.tensor([1.0, 2.0, 2.0, 3.0, 5.0, 5.0, 5.0, 0.5])
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 7.0, 6.0, 6.0, 0.0])

    def naive_ranks(v):  # average rank of ties, by counting
        return torch.tensor([float((v < a).sum()) + (float((v == a).sum()) + 1) / 2 for a in v])

    def naive_pearson(a, b):
        a, b = a - a.mean(), b - b.mean()
        return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum()))

    assert metrics.pearson(x, y) == pytest.approx(naive_pearson(x, y))
    assert metrics.spearman(x, y) == pytest.approx(naive_pearson(naive_ranks(x), naive_ranks(y)))


def test_compute_uses_argmax_for_classes_and_scores_for_regression():
    logits = torch.tensor([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert metrics.compute(["accuracy"], logits, torch.tensor([1, 0, 0])) == {"accuracy": pytest.approx(2 / 3)}
    scores = torch.tensor([[0.5], [1.5], [2.5]])
    out = metrics.compute(["pearson", "spearman"], scores, torch.tensor([1.0, 2.0, 3.0]))
    assert out["pearson"] == pytest.approx(1.0) and out["spearman"] == pytest.approx(1.0)
