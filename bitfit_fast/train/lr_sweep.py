"""The paper's learning-rate sweep: one run per learning rate, the best validation score reported."""

import dataclasses
from pathlib import Path

from ..files import write_json
from .config import LR_GRID, TrainConfig
from .distributed import barrier, default_device, setup_distributed
from .loop import resolved_config, train
from .run import (
    CHECKPOINT_NAME,
    RUN_CONFIG_NAME,
    SUMMARY_NAME,
    SWEEP_SUMMARY_NAME,
    check_holds_no_run,
    check_holds_only,
    check_output_dir,
    check_same_options,
    finished_summary,
)


def _finished(run: TrainConfig) -> dict | None:
    """The summary of a run of the sweep that already trained all its epochs, else None (a damaged one: the run's
    checkpoint decides)."""
    return finished_summary(Path(run.output_dir), run.epochs)


def sweep(config: TrainConfig, grid=LR_GRID, log=print) -> dict:
    """One run per learning rate of the grid (each in its own directory, ``lr-<rate>`` under the output directory);
    returns and writes (sweep_summary.json) every run's best score and the best of all. With ``resume``, a sweep
    that stopped goes on: its finished runs are kept, its started ones continue, the others start."""
    d = setup_distributed()  # under torchrun the main process writes the summary and says what it found
    say = log if d.main else (lambda *_: None)
    runs = [dataclasses.replace(config, learning_rate=lr, output_dir=str(Path(config.output_dir) / f"lr-{lr:g}"))
            for lr in grid]
    device = default_device()
    # Its own directory holds no run or saved biases, which its runs and summary would be written into.
    check_holds_no_run(Path(config.output_dir), resume=False)
    for run in runs:  # all before the first trains: a sweep does not stop hours in on its third directory
        run.check_trains()
        out = Path(run.output_dir)
        run.resume = config.resume and (out / CHECKPOINT_NAME).is_file()
        if not (config.resume and _finished(run)):
            check_output_dir(out, run.resume)
        if config.resume and (out / RUN_CONFIG_NAME).is_file():  # kept or continued: trained as the others will be
            check_same_options(out, resolved_config(run, device)[0], unknown_yet=("regression",))
    # Nor anything but its runs (and, continued, its summary): a file of the user's there would be written over.
    check_holds_only(Path(config.output_dir), {Path(run.output_dir).name for run in runs}
                     | ({SWEEP_SUMMARY_NAME} if config.resume else set()), "sweep")
    barrier(d)  # every process checked the directories before the main one claims the first
    results = []
    for run in runs:
        summary = _finished(run) if config.resume else None
        if summary is not None:
            say(f"lr-{run.learning_rate:g} finished before: {Path(run.output_dir) / SUMMARY_NAME}")
        else:
            summary = train(run, log)
        results.append(dict(learning_rate=run.learning_rate, best=summary["best"]))
    best = max(results, key=lambda r: r["best"]["value"])
    record = dict(grid=list(grid), runs=results, best=best)
    if d.main:
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(config.output_dir) / SWEEP_SUMMARY_NAME, record)
    best_run = Path(config.output_dir) / f"lr-{best['learning_rate']:g}"
    say(f"best learning rate {best['learning_rate']:g}: {best['best']['metric']} {best['best']['value']:.4f}, the "
        f"run {best_run} (eval, predict, serve and export take it)")
    return record
