"""Plots of a run: matplotlib set up once (headless, optional), the learning curves."""

from pathlib import Path

from ..files import atomic_write


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None where matplotlib is not installed (plots are
    optional: `pip install matplotlib`)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def moving_average(values: list[float], window: int) -> list[float]:
    """Each value averaged with the ones before it: ``window`` values in all (fewer at the start)."""
    return [sum(values[max(0, i + 1 - window):i + 1]) / min(window, i + 1) for i in range(len(values))]


def plot_curves(history: list, path: Path, loss_title: str = "training loss") -> Path | None:
    """Batch losses with their moving average, and validation metrics per epoch, as a PNG at ``path``; None (and
    no file) without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    steps = [h["step"] for h in history if "loss" in h]
    losses = [h["loss"] for h in history if "loss" in h]
    evaluations = [h for h in history if "validation" in h]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    left.plot(steps, losses, alpha=0.4, label="batch")
    window = max(1, len(losses) // 50)
    left.plot(steps, moving_average(losses, window), label=f"mean of {window}")
    left.set(xlabel="step", ylabel="training loss", title=loss_title)
    left.legend()
    for split in (evaluations[0]["validation"] if evaluations else {}):
        for metric in evaluations[0]["validation"][split]:
            right.plot([h["epoch"] for h in evaluations], [h["validation"][split][metric] for h in evaluations],
                       marker="o", label=f"{split} {metric}")
    right.set(xlabel="epoch", title="validation")
    right.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100))
    plt.close(fig)
    return path
