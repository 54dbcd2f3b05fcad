"""GLUE metrics in plain torch: accuracy, binary F1, Matthews correlation, Pearson and Spearman correlation."""

import torch


def accuracy(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """The fraction of predictions equal to their label."""
    return (predictions == labels).double().mean().item()


def f1(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports it for MRPC and QQP."""
    tp = ((predictions == 1) & (labels == 1)).sum().item()
    fp = ((predictions == 1) & (labels != 1)).sum().item()
    fn = ((predictions != 1) & (labels == 1)).sum().item()
    return 2 * tp / (2 * tp + fp + fn) if tp else 0.0


def matthews(predictions: torch.Tensor, labels: torch.Tensor) -> float:
    """Matthews correlation coefficient (CoLA), multi-class form; 0 when undefined."""
    classes = int(max(predictions.max(), labels.max()).item()) + 1
    confusion = torch.zeros(classes, classes, dtype=torch.float64)
    confusion.index_put_((labels.long(), predictions.long()), torch.ones(len(labels), dtype=torch.float64),
                         accumulate=True)
    total, correct = confusion.sum(), confusion.trace()
    true_counts, predicted_counts = confusion.sum(1), confusion.sum(0)
    numerator = correct * total - (true_counts * predicted_counts).sum()
    denominator = torch.sqrt((total**2 - (predicted_counts**2).sum()) * (total**2 - (true_counts**2).sum()))
    return (numerator / denominator).item() if denominator > 0 else 0.0


def pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson's correlation coefficient (STS-B); 0 when undefined (a constant input)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    denominator = torch.sqrt((x * x).sum() * (y * y).sum())
    return ((x * y).sum() / denominator).item() if denominator > 0 else 0.0


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks with ties given their average rank, as Spearman's coefficient requires."""
    order = torch.argsort(values.double(), stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(1, len(values) + 1, dtype=torch.float64)
    unique, inverse = torch.unique(values, return_inverse=True)
    sums = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, ranks)
    counts = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, torch.ones_like(ranks))
    return (sums / counts)[inverse]


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation coefficient (STS-B): Pearson's on the ranks, ties averaged."""
    return pearson(_ranks(x), _ranks(y))


def compute(metric_names: list[str], outputs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Metrics by name from logits (classification) or scores (regression, one output)."""
    regression = outputs.dim() == 1 or outputs.shape[-1] == 1
    predictions = outputs.reshape(-1) if regression else outputs.argmax(-1)
    functions = {"accuracy": accuracy, "f1": f1, "matthews": matthews, "pearson": pearson, "spearman": spearman}
    return {name: functions[name](predictions, labels) for name in metric_names}
