"""The paper's learning-rate sweep: one run per learning rate, the best validation score reported."""

import dataclasses
from pathlib import Path

from ..files import write_json
from .config import LR_GRID, TrainConfig
from .loop import train


def sweep(config: TrainConfig, grid=LR_GRID, log=print) -> dict:
    """One run per learning rate of the grid (each in its own directory, ``lr-<rate>`` under the output directory);
    returns and writes (sweep_summary.json) every run's best score and the best of all."""
    results = []
    for lr in grid:
        run = dataclasses.replace(config, learning_rate=lr, output_dir=str(Path(config.output_dir) / f"lr-{lr:g}"))
        summary = train(run, log)
        results.append(dict(learning_rate=lr, best=summary["best"]))
    best = max(results, key=lambda r: r["best"]["value"])
    record = dict(grid=list(grid), runs=results, best=best)
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    write_json(Path(config.output_dir) / "sweep_summary.json", record)
    log(f"best learning rate {best['learning_rate']:g}: {best['best']['metric']} {best['best']['value']:.4f}")
    return record
