"""The benchmark harness (bitfit_fast_benches) itself: it must report what it measured, and nothing it did not."""

import contextlib
import copy
import dataclasses
import json
import math
import statistics
import types
from pathlib import Path

import pytest
import torch

from bitfit_fast import cli
from bitfit_fast_benches import (
    host_ops,
    length_groups,
    measurement,
    presets,
    profile_step,
    providers,
    report,
    runner,
    sweep,
    task_bank,
)
from bitfit_fast_benches.presets import Preset, Workload

TINY = Workload("bert-tiny", 16, 2)


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_the_reference_provider_trains_the_biases_and_the_head_only(arch):
    base = presets.build_base_model(dataclasses.replace(TINY, arch=arch), "cpu")
    trainer = providers.build_provider("reference", base, "cpu")
    expected = {n for n, _ in base.named_parameters() if n.endswith("bias") or n.startswith("classifier.")}
    assert {n for n, p in trainer.model.named_parameters() if p.requires_grad} == expected
    assert all(p.requires_grad for p in base.parameters()), "the base model is copied, not changed"


@pytest.mark.parametrize("commit, shown", [("86e182c", "86e182c"), ("a8c5d01-dirty", "a8c5d01-dirty"),
                                           ("0123456789abcdef0123", "0123456789ab"),
                                           ("0123456789abcdef0123-dirty", "0123456789ab-dirty")])
def test_reports_show_a_commit_short_and_dirty_once(commit, shown):
    assert report.short_commit(commit) == shown


def test_providers_are_timed_in_blocks_of_the_same_batches():
    """Warm-up for all first; then per block each provider re-warms once on a warm-up batch and times the block's
    batches back to back, so no timed step follows another provider's step; every provider times every timed batch
    once, in order; the first provider changes by block."""
    calls = []

    def trainer(name):
        def step(batch):
            calls.append((name, batch["id"]))
            return torch.tensor(float(batch["id"]))
        return types.SimpleNamespace(step=step)

    names = ["a", "b", "c"]
    batches = [{"id": index} for index in range(2 + 7)]
    times, losses = runner.time_in_blocks({n: trainer(n) for n in names}, batches, warmup=2, block=3, device="cpu")

    assert calls[:6] == [(n, i) for n in names for i in (0, 1)]
    timed_ids = list(range(2, 9))
    for name in names:
        assert len(times[name]) == len(timed_ids) and losses[name].item() == 8
    blocks = [timed_ids[i:i + 3] for i in range(0, len(timed_ids), 3)]
    expected, first = [], []
    for index, chunk in enumerate(blocks):
        order = names[index % 3:] + names[:index % 3]
        first.append(order[0])
        expected += [(n, i) for n in order for i in [0] + chunk]
    assert calls[6:] == expected
    assert first == ["a", "b", "c"]

    calls.clear()  # without warm-up batches no untimed step: it would run a timed batch first
    runner.time_in_blocks({n: trainer(n) for n in names}, batches[:4], warmup=0, block=2, device="cpu")
    assert calls == [(n, i) for n in names for i in (0, 1)] + [(n, i) for n in ["b", "c", "a"] for i in (2, 3)]


def test_a_slower_provider_is_reported_slower(monkeypatch):
    """Providers whose steps take known times: the reported speedup must follow the measured medians. The clock the
    steps are timed by advances by each step's time and nothing else (slept, on a machine loaded by other tests a
    stalled reference step of 5 ms took longer than a fast one of 400 ms)."""
    real_build = providers.build_provider
    now = [0.0]
    monkeypatch.setattr(measurement, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))

    def build(name, base, device, copy_base=True):
        trainer = real_build(name, base, device, copy_base)
        delay = {"reference": 2**-7, "fast": 2**-1}[name]  # sums of them subtract exactly
        step = trainer.step

        def slow_step(batch):
            now[0] += delay
            return step(batch)

        return dataclasses.replace(trainer, step=slow_step)

    monkeypatch.setattr(runner, "build_provider", build)
    monkeypatch.setattr(runner, "cpu_peak_rss", lambda name, w: dict(peak_rss=2 * 2**20, above_idle=2**20))
    monkeypatch.setattr(runner, "TIME_GOALS_RELATIVE_TO", ["reference", "reference-compiled"])  # one not run
    preset = Preset("cpu", [TINY], ["reference", "fast"], repeats=3, warmup=1)
    result = runner.run_workload(TINY, preset, peak_tflops=1.0, log=lambda _: None)
    ref, fast = result["providers"]["reference"], result["providers"]["fast"]
    assert (fast["median_ms"], ref["median_ms"]) == (500, 1000 * 2**-7)
    assert fast["speedup_vs_reference"] == fast["speedup_per_step"]["median"] == 2**-6  # each step's own ratio
    assert fast["tokens_per_s"] == pytest.approx(result["padded_tokens_per_step"] / (fast["median_ms"] / 1e3))
    flops = fast["model_flops_per_step"]
    assert fast["mfu"] == pytest.approx(flops / (fast["median_ms"] / 1e3) / 1e12)
    assert fast["memory_vs_reference"] == 1.0 and fast["steps"] == 3
    per_step = fast["speedup_per_step"]
    assert per_step["q1"] <= per_step["median"] <= per_step["q3"] < 1, "every step of fast is the slower one"
    assert ref["speedup_per_step"] == dict(q1=1.0, median=1.0, q3=1.0)
    # The step time over another provider's, step by step (3 steps: the median step's ratio is the reciprocal).
    assert list(fast["time_vs_per_step"]) == ["reference"] and "time_vs_per_step" not in ref
    assert fast["time_vs_per_step"]["reference"]["median"] == pytest.approx(1 / per_step["median"])


def test_a_graphed_provider_that_cannot_be_captured_is_recorded_and_runs_on_fixed_lengths_only(monkeypatch):
    real_build = providers.build_provider

    def build(name, base, device, copy_base=True):
        trainer = real_build(name, base, device, copy_base)
        if name != "fast":
            return trainer

        def step(batch):
            raise RuntimeError("operation not permitted when stream is capturing\nmore lines")

        return dataclasses.replace(trainer, step=step)

    monkeypatch.setattr(runner, "build_provider", build)
    monkeypatch.setattr(runner, "GRAPHED", {"fast"})  # as if "fast" replayed a CUDA graph
    monkeypatch.setattr(runner, "cpu_peak_rss", lambda name, w: dict(peak_rss=2 * 2**20, above_idle=2**20))
    preset = Preset("cpu", [TINY], ["reference", "fast"], repeats=2, warmup=1)
    result = runner.run_workload(TINY, preset, peak_tflops=1.0, log=lambda _: None)
    assert list(result["providers"]) == ["reference"], "the others are timed still"
    assert result["failed_providers"] == {"fast": "operation not permitted when stream is capturing"}
    variable = dataclasses.replace(TINY, lengths="lognormal")
    result = runner.run_workload(variable, preset, peak_tflops=1.0, log=lambda _: None)
    assert list(result["providers"]) == ["reference"] and "failed_providers" not in result, "a shape per batch"
    with pytest.raises(ValueError, match="needs a GPU"):
        real_build("fast-graphed", presets.build_base_model(TINY, "cpu"), "cpu")


def test_paired_ratios_are_the_quartiles_of_each_steps_own_ratio():
    # Medians 2.5 / 2 = 1.25, but the steps' own ratios are 0.5, 2, 0.75, 2: a ratio of medians alone hides that.
    ratios = measurement.paired_ratios([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 4.0, 2.0])
    assert ratios == dict(q1=pytest.approx(0.6875), median=pytest.approx(1.375), q3=2.0)  # NumPy's: 0.6875 too
    assert measurement.quartiles(list(range(11))) == (2.5, 5, 7.5)
    assert measurement.spread([3e-3, 1e-3, 2e-3, 4e-3]) == dict(median_ms=pytest.approx(2.5), q1_ms=pytest.approx(1.75),
                                                                q3_ms=pytest.approx(3.25), min_ms=pytest.approx(1.0),
                                                                steps=4)
    with pytest.raises(ValueError):
        measurement.paired_ratios([1.0, 2.0], [1.0])


def test_a_paired_speedup_is_the_median_of_each_steps_own_ratio():
    ref_times, fast_times = [1.0, 2.0, 3.0, 4.0, 5.0], [0.5, 4.0, 1.0, 2.0, 10.0]  # medians 3 and 2: ratio 1.5
    results = {name: dict(median_ms=1e3 * statistics.median(t), real_tokens_per_s=1.0 / statistics.median(t),
                          speedup_per_step=measurement.paired_ratios(ref_times, t))
               for name, t in (("reference", ref_times), ("fast", fast_times))}
    runner.add_ratios(results)  # each step's own ratio: 2, 0.5, 3, 2, 0.5, whose median is 2
    assert results["fast"]["speedup_vs_reference"] == results["fast"]["real_tokens_vs_reference"] == 2.0
    del results["fast"]["speedup_per_step"]
    runner.add_ratios(results)  # no paired steps: the medians' ratio
    assert results["fast"]["speedup_vs_reference"] == pytest.approx(1.5)


def test_goals_on_time_ratios_show_the_per_step_spread():
    stats = lambda ms: dict(median_ms=ms, q1_ms=ms, q3_ms=ms, tokens_per_s=1.0, real_tokens_per_s=1.0,  # noqa: E731
                            mfu=0.1, peak_memory_bytes=1000)
    results = {"reference": stats(100.0), "fast": stats(80.0)}
    runner.add_ratios(results)
    results["fast"]["speedup_per_step"] = dict(q1=1.1, median=1.25, q3=1.4)
    workload = dict(workload="bert-mini-seq128-b8", spec=dataclasses.asdict(Workload("bert-mini", 128, 8)),
                    providers=results)
    checks = {c["goal"]: c for c in report.check_goals(dict(workloads=[workload]), "cpu")}
    assert checks["step time vs reference"]["per_step"] == results["fast"]["speedup_per_step"]
    assert "per_step" not in checks["peak memory vs reference"]
    table = report.format_workload("w", results)
    assert "| 1.25x (1.10–1.40) |" in table


def test_a_goal_on_time_against_another_provider_takes_each_steps_own_ratio():
    stats = lambda ms: dict(median_ms=ms, speedup_vs_reference=1.0)  # noqa: E731
    results = {"reference": stats(100.0), "reference-compiled": stats(80.0), "fast": stats(72.0)}
    paired = dict(q1=0.85, median=0.88, q3=0.95)  # the medians' ratio is 0.9
    results["fast"]["time_vs_per_step"] = {"reference-compiled": paired}
    workload = dict(workload="w", spec=dataclasses.asdict(Workload("bert-base", 128, 8)), providers=results)
    checks = {c["goal"]: c for c in report.check_goals(dict(workloads=[workload]), "cuda")}
    compiled = checks["speed vs reference compiled"]
    assert (compiled["provider"], compiled["measured"], compiled["per_step"]) == ("fast", 0.88, paired)
    del results["fast"]["time_vs_per_step"]  # a run that paired no steps: the medians' ratio
    compiled = {c["goal"]: c for c in report.check_goals(dict(workloads=[workload]), "cuda")}[
        "speed vs reference compiled"]
    assert compiled["measured"] == pytest.approx(0.9) and "per_step" not in compiled


def test_mfu_is_against_the_faster_of_the_matmul_probes_before_and_after(monkeypatch):
    probes = iter([0.5, 2.0])  # the first probe ran in a slow phase
    monkeypatch.setattr(runner, "matmul_peak_tflops", lambda device: next(probes))
    monkeypatch.setitem(report.GOALS, "cpu", [report.Goal("MFU", "mfu", ">=", 1.5, relative_to=None)])
    monkeypatch.setattr(runner, "run_workload", lambda workload, preset, peak, log: dict(
        workload=workload.name, spec=dataclasses.asdict(workload),
        providers={"fast": dict(median_ms=500.0, model_flops_per_step=1e12)}))
    record = runner.run("cpu-small", "test", log=lambda _: None)
    assert record["matmul_peak_probes_tflops"] == [0.5, 2.0] and record["matmul_peak_tflops"] == 2.0
    for workload in record["workloads"]:
        assert workload["providers"]["fast"]["mfu"] == pytest.approx(1.0)  # 2 TFLOP/s of a 2 TFLOP/s peak
    # Met against the first probe (4.0), missed against the faster one.
    assert [(goal["measured"], goal["met"]) for goal in record["goals"]] == [(pytest.approx(1.0), False)]


def test_run_workload_measures_real_providers_and_memory():
    preset = Preset("cpu", [TINY], ["reference", "fast"], repeats=2, warmup=1)
    result = runner.run_workload(TINY, preset, peak_tflops=0.1, log=lambda _: None)
    for stats in result["providers"].values():
        assert stats["median_ms"] > 0 and stats["peak_memory_bytes"] > 0 and stats["peak_rss_bytes"] > 0
        assert stats["q1_ms"] <= stats["median_ms"] <= stats["q3_ms"]
    assert result["providers"]["reference"]["speedup_vs_reference"] == 1.0


def test_non_finite_loss_voids_the_timing(monkeypatch):
    real_build = providers.build_provider

    def build(name, base, device, copy_base=True):
        trainer = real_build(name, base, device, copy_base)
        return dataclasses.replace(trainer, step=lambda batch: torch.tensor(float("nan")))

    monkeypatch.setattr(runner, "build_provider", build)
    preset = Preset("cpu", [TINY], ["reference"], repeats=1, warmup=0)
    with pytest.raises(RuntimeError, match="non-finite loss"):
        runner.run_workload(TINY, preset, peak_tflops=1.0, log=lambda _: None)


@pytest.mark.parametrize("lengths", ["lognormal", "bbc"])
def test_batches_are_fresh_and_variable_lengths_are_padded_dynamically(lengths):
    workload = Workload("bert-tiny", 128, 8, lengths=lengths)
    batches = presets.make_batches(workload, 4, 1000, "cpu")
    assert len({tuple(b["input_ids"].flatten().tolist()) for b in batches}) == 4
    for b in batches:
        lengths = b["attention_mask"].sum(1)
        assert b["input_ids"].shape[1] == lengths.max() <= 128
        assert presets.real_tokens(b) == lengths.sum() < presets.padded_tokens(b) or lengths.min() == lengths.max()


def test_bbc_lengths_are_the_real_corpus_paragraphs():
    lengths = presets.bbc_paragraph_lengths(128)
    assert len(lengths) > 10_000  # 2,225 articles of several paragraphs
    assert min(lengths) >= 3 and max(lengths) == 128  # [CLS] word [SEP] at least; long paragraphs truncated
    assert 40 <= statistics.median(lengths) <= 128


def test_step_flops_of_bert_base():
    batch = presets.make_batches(Workload("bert-base", 128, 32), 1, 1000, "cpu")[0]
    tokens, d, ff, layers = 32 * 128, 768, 3072, 12
    gemm = 2 * tokens * layers * (4 * d * d + 2 * d * ff)
    attention = 4 * tokens * 128 * d * layers
    assert measurement.step_flops(Workload("bert-base", 128, 32), batch, "bitfit") == 2 * gemm + 3 * attention
    assert measurement.step_flops(Workload("bert-base", 128, 32), batch, "full") == 3 * gemm + 3 * attention
    # About 354 MFLOP per token for BitFit on BERT-base at 128 tokens (BITFIT_NOTES.md).
    assert (2 * gemm + 3 * attention) / tokens / 1e6 == pytest.approx(354, rel=0.02)


def test_outputs_markdown_plot_and_readme_section(tmp_path):
    record = runner.environment("bitfit-fast bench --preset tiny")
    record.update(preset="tiny", providers={"reference": "", "fast": ""}, matmul_peak_tflops=0.5,
                  matmul_peak_dtype="float32", memory_method="test")
    stats = dict(median_ms=10.0, q1_ms=9.0, q3_ms=11.0, min_ms=9.0, steps=3, tokens_per_s=100.0,
                 real_tokens_per_s=90.0, mfu=0.1, model_flops_per_step=1.0, peak_memory_bytes=2**20)
    record["workloads"] = [dict(workload=w.name, spec=dataclasses.asdict(w), real_tokens_per_step=1,
                                padded_tokens_per_step=1, providers={"reference": dict(stats), "fast": dict(stats)})
                           for w in [TINY, dataclasses.replace(TINY, batch=4)]]
    for w in record["workloads"]:
        runner.add_ratios(w["providers"])
    paths = report.write(record, tmp_path)
    assert json.loads(paths["json"].read_text())["commit"] == record["commit"]
    assert "| fast | 10.0 (9.0–11.0)" in paths["markdown"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.README_START}\nstale\n{report.README_END}\nrest\n")
    report.update_readme(readme, tmp_path)
    text = readme.read_text()
    assert "stale" not in text and "bert-tiny-seq16-b4" in text and text.endswith(f"{report.README_END}\nrest\n")


def test_a_run_in_progress_never_writes_over_the_last_whole_one_and_the_readme_skips_it(tmp_path, capsys):
    """The record after each workload is a partial one, written beside the last whole run's files (a run cut short
    leaves them as they were); the whole record removes it, and the README's section reads whole runs only."""
    whole = runner.environment("bitfit-fast bench --preset tiny")
    whole.update(preset="tiny", providers={}, matmul_peak_tflops=0.5, matmul_peak_dtype="float32",
                 memory_method="test", workloads=[])
    report.write(whole, tmp_path)
    partial = report.write({**whole, "partial": "1 of 2 workloads"}, tmp_path)
    assert partial["json"].name == "tiny.partial.json" and "**partial**: 1 of 2 workloads" in (
        partial["markdown"].read_text())
    assert "partial" not in json.loads((tmp_path / "tiny.json").read_text())
    assert report.records(tmp_path) == [json.loads((tmp_path / "tiny.json").read_text())]
    report.write(whole, tmp_path)
    assert not list(tmp_path.glob("*.partial.*"))

    (tmp_path / "other.json").write_text('["not", "a", "record"]')
    readme = tmp_path / "README.md"
    readme.write_text(f"{report.README_START}\n{report.README_END}\n")
    assert cli.main(["bench", "--update-readme", "--out", str(tmp_path), "--readme", str(readme)]) == 2
    assert capsys.readouterr().err == (f"bitfit-fast bench: error: --out {tmp_path}: other.json is not a "
                                       "`bitfit-fast bench` record: keep only those in the directory\n")


def test_readme_benchmark_section_is_generated_from_the_committed_results():
    root = Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    section = text[text.index(report.README_START) + len(report.README_START):text.index(report.README_END)]
    assert section == "\n" + report.readme_section(root / "benches" / "results")


@pytest.mark.parametrize("args,message", [
    (["--preset", "gpu-base", "--out", "/tmp/unused"], "--preset gpu-base needs a CUDA GPU; use --preset cpu-small"),
    (["--update-readme", "--readme", "/nonexistent/README.md"],
     "--readme /nonexistent/README.md is not a README with a generated benchmark section"),
    (["--providers", "nope"], "argument --providers: invalid choice: 'nope'"),
    (["--update-readme", "--out", "/nonexistent/results"],
     "--out /nonexistent/results holds no benchmark results (*.json): pass the directory that holds them"),
    (["--preset", "tiny", "--providers", "reference", "fast-graphed"],
     "--providers fast-graphed: a CUDA graph's replay needs a CUDA GPU; leave it out on this machine"),
    (["--preset", "tiny", "--out", __file__], f"--out {__file__} is a file: give a directory for the results"),
])
def test_bench_mistakes_end_with_one_line(monkeypatch, capsys, args, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    try:
        status = cli.main(["bench", *args])
    except SystemExit as exit_:  # argparse's own checks
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bitfit-fast bench: error: ") and message in err


@pytest.mark.parametrize("start", [32, 100, 7])
@pytest.mark.parametrize("threshold", [0, 1, 5, 20, 64, 100, 1000, 7000, 8191, 10_000])
def test_largest_batch_search_finds_the_threshold(threshold, start):
    """Within 1/16 below the threshold, from any start: doubling from 100 passes 6400 and must still try up to the
    limit (8192), which it returns when that fits."""
    tried = []

    def fits(size):
        tried.append(size)
        return size <= threshold

    found = measurement.largest_fitting(fits, start=start, limit=8192)
    expected = min(threshold, 8192)
    assert found <= expected and found >= expected - max(1, expected // 16), (found, tried)
    assert max(tried) <= 8192 and len(tried) < 30


def test_largest_batch_search_counts_a_failing_probe_as_too_large_and_reports_it(monkeypatch):
    """A probe that fails other than by running out of memory (PyTorch's LayerNorm backward near the memory limit on
    an H200) is a batch that does not train: the search goes on below it and returns the error for the report.
    Every probe gets a fresh model, and the memory cap is lifted afterwards."""
    models, fractions = [], []

    def step_of(model):
        def step(batch):
            size = batch["size"]
            if size > 300:
                raise torch.cuda.OutOfMemoryError("out of memory")
            if size > 200:
                raise RuntimeError("Function NativeLayerNormBackward0 returned an invalid gradient\nmore")
            return torch.tensor(0.0)
        return step

    def provider(name, model, device, copy_base=True):
        models.append(model)
        return providers.Trainer(model, torch.optim.SGD([torch.zeros(1, requires_grad=True)]), step_of(model), "bitfit")

    base = torch.nn.Linear(2, 2)
    base.config = type("Config", (), {"vocab_size": 8})()
    monkeypatch.setattr(measurement, "build_base_model", lambda workload, device: base)
    monkeypatch.setattr(measurement, "build_provider", provider)
    monkeypatch.setattr(measurement, "make_batches", lambda workload, count, vocab, device: [dict(size=workload.batch)])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: type("P", (), {"total_memory": 96 * 2**30}))
    monkeypatch.setattr(torch.cuda, "set_per_process_memory_fraction", fractions.append)

    size, errors = measurement.max_batch("reference", Workload("bert-tiny", 8, 64), "cpu", memory_gib=24)
    assert 200 - 200 // 16 <= size <= 200
    assert errors and all(e.startswith("batch ") and e.endswith("invalid gradient") for e in errors)
    assert len({id(m) for m in models}) == len(models) > 1 and base not in models
    assert fractions == [0.25, 1.0]
    results = {"reference": dict(median_ms=1.0, q1_ms=1.0, q3_ms=1.0, tokens_per_s=1.0, real_tokens_per_s=1.0,
                                 mfu=0.1, max_batch=size, max_batch_errors=errors)}
    assert f"stopped other than by memory at {errors[0]}" in report.format_workload("w", results)
    # A batch at the search's limit is not a memory limit either: larger ones were not tried.
    assert measurement.max_batch("reference", Workload("bert-tiny", 8, 64), "cpu", limit=100) == (
        100, ["batch 100, the search's limit (larger batches were not tried)"])


def test_goals_are_checked_against_the_best_fast_provider():
    stats = lambda ms, mem: dict(median_ms=ms, peak_memory_bytes=mem)  # noqa: E731
    results = {"reference": stats(100.0, 1000), "fast": stats(95.0, 900), "fast-minimal": stats(150.0, 500)}
    runner.add_ratios(results)
    workload = dict(workload="bert-mini-seq128-b8", spec=dataclasses.asdict(Workload("bert-mini", 128, 8)),
                    providers=results)
    checks = {c["goal"]: c for c in report.check_goals(dict(workloads=[workload]), "cpu")}
    speed, memory = checks["step time vs reference"], checks["peak memory vs reference"]
    assert speed["provider"] == "fast" and speed["measured"] == pytest.approx(100 / 95) and not speed["met"]
    assert memory["provider"] == "fast-minimal" and memory["measured"] == pytest.approx(0.5) and memory["met"]
    assert set(checks) == {"step time vs reference", "peak memory vs reference"}, "the BERT-base goals need BERT-base"
    # A value exactly on its target meets it.
    target = float(memory["target"].split()[1])
    results["fast-minimal"]["peak_memory_bytes"] = target * 1000
    runner.add_ratios(results)
    assert results["fast-minimal"]["memory_vs_reference"] == target
    rechecked = {c["goal"]: c for c in report.check_goals(dict(workloads=[workload]), "cpu")}
    assert rechecked["peak memory vs reference"]["met"]


def test_a_largest_batch_goal_says_when_a_search_stopped_other_than_by_memory():
    """The reference's largest batch set by PyTorch's LayerNorm backward (or ours by the search's limit) is not a
    memory limit: the goal's row says so beside "met", from the record's results (older records too)."""
    record = runner.environment("bitfit-fast bench --preset gpu-max-batch")
    record.update(preset="gpu-max-batch", providers={}, matmul_peak_tflops=1.0, matmul_peak_dtype="bfloat16",
                  memory_method="test")
    stats = dict(median_ms=10.0, q1_ms=9.0, q3_ms=11.0, tokens_per_s=100.0, real_tokens_per_s=100.0, mfu=0.1)
    results = {"reference": dict(stats, max_batch=512), "fast-minimal": dict(stats, max_batch=2304)}
    runner.add_ratios(results)
    spec = dataclasses.asdict(Workload("bert-base", 128, 256))
    record["workloads"] = [dict(workload="bert-base-seq128-b256", spec=spec, providers=results)]
    record["goals"] = [check for check in report.check_goals(record, "cuda") if "largest batch" in check["goal"]]

    def row() -> str:
        return next(line for line in report.markdown(record).splitlines() if line.startswith("| minimal-memory larg"))

    assert row().endswith("| 4.5 | - | yes |")
    results["reference"]["max_batch_errors"] = ["batch 544: Function NativeLayerNormBackward0 returned ..."]
    assert row().endswith("| 4.5 | - | yes (reference stopped other than by memory: see the notes above) |")
    results["fast-minimal"]["max_batch_errors"] = ["batch 8192, the search's limit (larger batches were not tried)"]
    assert "| yes (reference and fast-minimal stopped other than by memory: see the notes above) |" in row()


def test_unpadding_goals_name_the_fused_default_on_bert_base_workloads():
    stats = lambda ms, mem, real: dict(median_ms=ms, peak_memory_bytes=mem, real_tokens_per_s=real)  # noqa: E731
    workloads = []
    for lengths, fast_ms in [("fixed", 85.0), ("bbc", 70.0)]:
        results = {"reference": stats(100.0, 1000, 10.0), "fast": stats(fast_ms, 850, 1000 / fast_ms),
                   "fast-lean": stats(50.0, 500, 20.0)}
        runner.add_ratios(results)
        spec = dataclasses.asdict(Workload("bert-base", 128, 16, lengths=lengths))
        workloads.append(dict(workload=lengths, spec=spec, providers=results))
    checks = {c["goal"]: c for c in report.check_goals(dict(workloads=workloads), "cpu")}
    fixed_time, real_time = checks["fused default step time vs reference"], checks[
        "fused default step time vs reference, real lengths"]
    assert fixed_time["provider"] == "fast" and fixed_time["workload"] == "fixed" and fixed_time["met"]
    assert real_time["measured"] == pytest.approx(100 / 70) and not real_time["met"]
    throughput = checks["fused default real-token throughput vs reference, real lengths"]
    assert throughput["measured"] == pytest.approx(100 / 70) and not throughput["met"]
    assert checks["fused default peak memory vs reference"]["met"]


def test_task_bank_benchmark_records_every_configuration_and_its_ratios(tmp_path):
    assert task_bank.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert set(record["environment"]) >= {"device", "torch", "commit", "command"}
    predict, train = record["results"]["predict"], record["results"]["train"]
    assert list(predict) == ["single-task model", "bank, 1 tasks", "bank, 4 tasks", "sub-batches, 4 tasks"]
    assert list(train) == ["single-task model", "bank, 1 tasks", "bank, 4 tasks"]
    for entry in [*predict.values(), *train.values()]:
        assert entry["examples_per_s"] > 0 and entry["steps"] == 1
        # One timed step: its own ratio is the ratio of the medians.
        assert entry["vs_single_per_step"]["median"] == pytest.approx(entry["vs_single"])
    assert record["goals"][-1]["per_step"]["median"] == pytest.approx(record["ratios"]["mixed_vs_sub_batches"])
    assert record["ratios"]["mixed_vs_sub_batches"] == pytest.approx(
        predict["bank, 4 tasks"]["examples_per_s"] / predict["sub-batches, 4 tasks"]["examples_per_s"])
    assert len(record["goals"]) == 5 and (tmp_path / "tiny.md").read_text().startswith("Task bank, preset `tiny`")
    assert "GPU busy" not in (tmp_path / "tiny.md").read_text()  # measured on a GPU only
    # On CPU: the bank's GEMM time, and the ratio to the sub-batches it would reach were all else free.
    gemm_ms = predict["bank, 4 tasks"]["gemm_ms"]  # profiled in other runs than the timed ones: not compared
    assert gemm_ms > 0
    assert record["ratios"]["mixed_vs_sub_batches_gemm_bound"] == pytest.approx(
        predict["sub-batches, 4 tasks"]["median_ms"] / gemm_ms)
    assert "were everything but those GEMMs free, the bank would be" in (tmp_path / "tiny.md").read_text()
    # On a GPU the single-task model's and the full bank's steps also get their GPU time and top kernels.
    kernels = [dict(name="index_select_kernel", calls_per_step=12.0, ms_per_step=0.25, share=0.1)]
    predict["bank, 4 tasks"].update(gpu_busy_ms=3.5, top_kernels=kernels)
    assert (f"- predict, bank, 4 tasks: GPU busy 3.50 ms of a {predict['bank, 4 tasks']['median_ms']:.2f} ms step; "
            "top kernels (ms per step): index_select_kernel 0.250\n") in task_bank.markdown(record)


def test_task_bank_benchmark_runs_every_configuration_in_its_presets_precision(tmp_path, monkeypatch):
    # cpu-bf16 (what a server on a CPU with bf16 dot products runs): the bank, the single-task model and the
    # sub-batches alike under bf16 autocast, and the record says so.
    import transformers

    from bitfit_fast.task_bank import TaskBank

    assert task_bank.PRESETS["cpu-bf16"].precision == "bf16" and task_bank.PRESETS["cpu"].precision == "fp32"
    bf16_tiny = dataclasses.replace(task_bank.PRESETS["tiny"], precision="bf16")
    monkeypatch.setitem(task_bank.PRESETS, "tiny-bf16", bf16_tiny)
    monkeypatch.setattr(task_bank, "GRAPHED_DEVICES", ("cpu",))  # the GPU's graphed modes too (eager on CPU)
    seen, timing = [], []  # (model kind, autocast on) at each forward of a timed step (apply's probe runs fp32)
    for kind, cls in (("bank", TaskBank), ("model", transformers.BertForSequenceClassification)):
        def spy(self, *args, forward=cls.forward, kind=kind, **kwargs):
            if timing:
                seen.append((kind, torch.is_autocast_enabled("cpu")
                             and torch.get_autocast_dtype("cpu") == torch.bfloat16))
            return forward(self, *args, **kwargs)
        monkeypatch.setattr(cls, "forward", spy)

    def timed(*args, timed=task_bank.timed):
        timing.append(True)
        try:
            return timed(*args)
        finally:
            timing.pop()
    monkeypatch.setattr(task_bank, "timed", timed)
    assert task_bank.main(["--preset", "tiny-bf16", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "tiny-bf16.json").read_text())
    assert record["precision"] == "bf16" and ", bf16 autocast, `" in (tmp_path / "tiny-bf16.md").read_text()
    assert {kind for kind, _ in seen} == {"bank", "model"} and all(bf16 for _, bf16 in seen)
    assert list(record["results"]) == ["predict", "train", task_bank.GRAPHED_PREDICT_MODE, task_bank.GRAPHED_MODE]


def test_task_bank_graphed_training_pads_every_batch_to_one_shape_and_steps_each_model():
    # The GPU's graphed mode, built on CPU (where GraphedStep runs its steps eagerly): one shape for every batch, so
    # that one graph per model serves them all; each config trains its model, the bank only the batch's tasks.
    import bitfit_fast
    from bitfit_fast.task_bank import TaskBank

    workload = task_bank.PRESETS["tiny"].workload
    base = presets.build_base_model(workload, "cpu")
    single = bitfit_fast.apply(copy.deepcopy(base), announce=False).train()
    bank = TaskBank.new(copy.deepcopy(base), {"a": 2, "b": 3, "c": 2}).train()
    batches = presets.make_batches(workload, 2, base.config.vocab_size, "cpu")
    for batch in batches:
        batch.pop("labels")
    assignments = {1: ["b"] * workload.batch, 2: ["a", "b"] * (workload.batch // 2)}
    labels = torch.zeros(workload.batch, dtype=torch.long)
    configs, fixed = task_bank._graphed_training(single, bank, assignments, batches, workload.seq, labels,
                                                  torch.bfloat16)
    assert list(configs) == ["single-task model", "bank, 1 tasks", "bank, 2 tasks"]
    assert {tuple(b["input_ids"].shape) for b in fixed} == {(workload.batch, workload.seq)}
    for batch, padded in zip(batches, fixed, strict=True):
        assert torch.equal(padded["attention_mask"].sum(1), batch["attention_mask"].sum(1))
        assert padded["labels"] is labels
    def trained():  # the single-task model's parameters, each bank task's own (as its save_task writes them)
        return ({f"single.{name}": p for name, p in single.named_parameters() if p.requires_grad}
                | {f"{task}.{name}": t for task in bank.tasks for name, t in bank.task_tensors(task).items()})

    before = {name: p.detach().clone() for name, p in trained().items()}
    configs["single-task model"](fixed[0])
    configs["bank, 1 tasks"](fixed[1])
    moved = {name for name, p in trained().items() if not torch.equal(p, before[name])}
    assert {"single.classifier.weight", "b.classifier.weight"} <= moved
    assert not {"a.classifier.weight", "c.classifier.weight"} & moved, "absent tasks stay"


def test_task_bank_graphed_modes_run_and_one_that_fails_costs_only_its_own_figures(tmp_path, monkeypatch):
    # The GPU's graphed modes, on CPU where their steps run eagerly: the prediction mode's configurations predict
    # on padded batches; a capture that fails leaves the run's other figures, and is recorded with its error.
    def failing(*args):
        def step(batch):
            raise RuntimeError("operation not permitted when stream is capturing")
        return {"single-task model": step}, args[3]

    monkeypatch.setattr(task_bank, "GRAPHED_DEVICES", ("cpu",))
    monkeypatch.setattr(task_bank, "_graphed_training", failing)
    assert task_bank.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert list(record["results"]) == ["predict", "train", task_bank.GRAPHED_PREDICT_MODE]
    assert set(record["results"][task_bank.GRAPHED_PREDICT_MODE]) == {"single-task model", "bank, 1 tasks",
                                                                     "bank, 4 tasks"}
    assert record["failed_modes"] == {task_bank.GRAPHED_MODE: "RuntimeError: operation not permitted when stream "
                                                              "is capturing"}
    assert (f"- FAILED, no figures: {task_bank.GRAPHED_MODE}: RuntimeError: operation not permitted"
            in (tmp_path / "tiny.md").read_text())


def test_task_bank_graphed_prediction_pads_every_batch_and_predicts_each_models_logits():
    import bitfit_fast
    from bitfit_fast.task_bank import TaskBank

    workload = task_bank.PRESETS["tiny"].workload
    base = presets.build_base_model(workload, "cpu")
    single = bitfit_fast.apply(copy.deepcopy(base), announce=False).eval()
    bank = TaskBank.new(copy.deepcopy(base), {"a": 2, "b": 3}).eval()
    batches = presets.make_batches(workload, 2, base.config.vocab_size, "cpu")
    for batch in batches:
        batch.pop("labels")
    assignments = {1: ["b"] * workload.batch, 2: ["a", "b"] * (workload.batch // 2)}
    seen = []
    configs, fixed = task_bank._graphed_prediction(single, bank, assignments, batches, workload.seq,
                                                   lambda: seen.append("precision") or contextlib.nullcontext())
    assert list(configs) == ["single-task model", "bank, 1 tasks", "bank, 2 tasks"]
    assert {tuple(b["input_ids"].shape) for b in fixed} == {(workload.batch, workload.seq)}
    calls = []
    bank.register_forward_hook(lambda module, args, kwargs, out: calls.append((args, kwargs, torch.is_grad_enabled())),
                               with_kwargs=True)
    configs["bank, 2 tasks"](fixed[0])
    (index,), kwargs, grad_enabled = calls[0]
    assert index.tolist() == [0, 1] * (workload.batch // 2) and kwargs["input_ids"] is fixed[0]["input_ids"]
    assert seen == ["precision"] and not grad_enabled


def test_length_groups_benchmark_times_the_same_steps_grouped_and_in_one_call(tmp_path, grouped_attention):
    # grouped_attention records every grouped call: bert-tiny's 2 layers in each of the 2 grouped steps, none in the
    # steps that must run in one call.
    assert length_groups.main(["--preset", "tiny", "--out", str(tmp_path)]) == 0
    assert len(grouped_attention) == 2 * 2
    record = json.loads((tmp_path / "tiny.json").read_text())
    assert set(record["environment"]) >= {"device", "torch", "commit", "command"}
    assert {name: steps["steps"] for name, steps in record["steps"].items()} == {"grouped": 2, "one call": 2}
    assert record["paired_speedup"] > 0 and record["groups_per_batch"] > 1 and 0 < record["scores_fraction"] < 1
    assert (tmp_path / "tiny.md").read_text().startswith("Length groups, preset `tiny`")


def test_a_profile_records_where_it_ran_and_how(tmp_path, monkeypatch):
    """The profilers' JSON backs figures quoted in the code: it names the device, versions, commit and command."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    profile = lambda provider, workload: (dict(provider=provider), "a table")  # noqa: E731
    argv = ["--runs", "fast:bbc", "--out", str(tmp_path)]
    assert profile_step.profiles_main(argv, "host_profile", "", profile, lambda name, run: name, "profiled") == 0
    record = json.loads((tmp_path / "profiled.json").read_text())
    assert record["device"] == "a GPU" and record["commit"] == runner._commit()
    assert record["command"] == f"python -m bitfit_fast_benches.host_profile {' '.join(argv)}"
    assert record["torch"] == torch.__version__
    assert record["runs"] == {"fast bert-base-bbc-lengths128-b256": dict(provider="fast")}

    def fails_on_bbc(provider, workload):  # as a GPU stage's last run failed: the runs before it are kept
        if workload.lengths == "bbc":
            raise RuntimeError("a data file is missing")
        return profile(provider, workload)

    argv = ["--runs", "reference:fixed", "fast:bbc", "--out", str(tmp_path)]
    with pytest.raises(RuntimeError, match="a data file is missing"):
        profile_step.profiles_main(argv, "host_profile", "", fails_on_bbc, lambda name, run: name, "profiled")
    assert list(json.loads((tmp_path / "profiled.json").read_text())["runs"]) == ["reference bert-base-seq128-b256"]
    assert (tmp_path / "profiled.txt").read_text() == "reference bert-base-seq128-b256\na table"


def test_the_sweep_records_where_it_ran_and_restores_what_it_tuned(tmp_path, monkeypatch):
    """The sweep's JSON names its device, versions, commit and command; the module constants it sets for a
    candidate tile are back as they were afterwards, also when the candidate fails."""
    from bitfit_fast_kernels import layer_norm

    with pytest.raises(SystemExit):
        sweep.main(["--out", str(tmp_path)])  # no GPU here: one line, nothing written
    assert not (tmp_path / "sweep.json").exists()

    tile = layer_norm.TILE_ELEMENTS
    with pytest.raises(RuntimeError), sweep.patched(layer_norm, TILE_ELEMENTS=tile * 2):
        assert layer_norm.TILE_ELEMENTS == tile * 2
        raise RuntimeError("a candidate that does not compile")
    assert layer_norm.TILE_ELEMENTS == tile

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda: "a GPU")
    monkeypatch.setattr(sweep, "launch_probes", lambda: {"torch.add: host us per call": 9.7})
    assert sweep.main(["--out", str(tmp_path), "--parts", "launch"]) == 0
    record = json.loads((tmp_path / "sweep.json").read_text())
    assert record["environment"]["device"] == "a GPU" and record["environment"]["commit"] == runner._commit()
    assert record["environment"]["command"] == f"python -m bitfit_fast_benches.sweep --out {tmp_path} --parts launch"
    assert record["launch"] == {"torch.add: host us per call": 9.7}


def test_a_provider_can_take_fused_adamw():
    base = presets.build_base_model(TINY, "cpu")
    assert providers.build_provider("fast", base, "cpu", fused_optimizer=True).optimizer.defaults["fused"] is True
    assert providers.build_provider("fast", base, "cpu").optimizer.defaults["fused"] is None


def test_the_plot_leaves_gaps_for_a_provider_a_workload_skipped(tmp_path, monkeypatch):
    # A graphed provider runs on fixed lengths only: its line has a gap where a sweep lacks it, the bars of a
    # variable-length workload leave it out, and each provider keeps its color across the panels.
    import matplotlib.colors
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", lambda fig: figures.append(fig))
    stats = dict(tokens_per_s=100.0, real_tokens_per_s=90.0, peak_memory_bytes=2**20)
    workloads = [TINY, dataclasses.replace(TINY, batch=4), dataclasses.replace(TINY, lengths="lognormal")]
    record = dict(preset="tiny", device="cpu", providers={"reference": "", "fast-graphed": "", "fast": ""},
                  workloads=[dict(workload=w.name, spec=dataclasses.asdict(w),
                                  providers={p: dict(stats) for p in ["reference", "fast-graphed", "fast"]
                                             if p != "fast-graphed" or w.batch == 2 and w.lengths == "fixed"})
                             for w in workloads])
    assert report.plot(record, tmp_path / "plot.png").read_bytes()[:4] == b"\x89PNG"
    (fig,) = figures
    sweep, bars = fig.axes[0], fig.axes[1]
    graphed = [line for line in sweep.get_lines() if line.get_label() == "fast-graphed"][0]
    assert graphed.get_ydata()[0] == 100.0 and math.isnan(graphed.get_ydata()[1])
    assert [t.get_text() for t in bars.get_xticklabels()] == ["reference", "fast"]
    assert [p.get_facecolor() for p in bars.patches] == [matplotlib.colors.to_rgba(c) for c in ("C0", "C2")]
    plt.close(fig)


def test_host_ops_counts_the_gpu_code_paths_dispatches_whatever_the_banks_size():
    """The counter of a step's host work (the GPU code path on CPU, launches skipped): the launches run again
    after it; a bank's step dispatches as much with 8 tasks as with 4 (none of its work is per task)."""
    from triton.runtime import interpreter

    real_run = interpreter.InterpretedFunction.run
    small = host_ops.run(layers=2, batch=8, tasks=4)
    assert interpreter.InterpretedFunction.run is real_run, "the launches stay skipped"
    assert set(small) == {"single-task model", "bank of 4 tasks"}
    for modes in small.values():
        assert set(modes) == {"train", "predict"}
        assert all(c["aten_ops"] > 0 and c["triton_launches"] > 0 for c in modes.values())
    assert host_ops.run(layers=2, batch=8, tasks=8)["bank of 8 tasks"] == small["bank of 4 tasks"]


def test_host_ops_counts_one_step_and_leaves_the_gpu_choice_as_it_was():
    """The counts are one step's, whatever the warmup before it; leaving, the linear layers choose their GEMM as
    before."""
    import bitfit_fast_kernels.linear as linear

    real_choice = linear._gemm_choice
    step = host_ops.steps(layers=1, batch=4, tasks=2)["predict"]
    assert host_ops.count(step, warmup=1) == host_ops.count(step, warmup=3)
    assert linear._gemm_choice is real_choice


def test_cpu_gemm_ms_counts_every_gemm_the_bank_runs():
    """A bank's linear layers add a task table's rows into the GEMM's output in place (``addmm_``): counted."""
    from bitfit_fast_benches.profile_step import cpu_gemm_ms

    a, b = torch.randn(256, 256), torch.randn(256, 256)
    assert cpu_gemm_ms([lambda: torch.zeros(256, 256).addmm_(a, b)]) > 0


def test_task_bank_benchmark_keeps_no_autograd_graph_of_the_bank_alive():
    # SubBatching kept the bank's task_tensors, views with a gradient function: each bank parameter's AccumulateGrad
    # node lived on, bound to the (legacy) stream it was made on. On a GPU the graphed bank step, captured on its own
    # stream, then made the legacy stream wait for the capture: "operation would make the legacy stream depend on
    # a capturing blocking stream" (benches/results/gpu/task-bank-3d614d3.log). A capture now checks it first.
    from bitfit_fast import GraphedStep
    from bitfit_fast.task_bank import TaskBank

    base = presets.build_base_model(task_bank.PRESETS["tiny"].workload, "cpu")
    bank = TaskBank.new(copy.deepcopy(base), {"a": 2, "b": 3})
    sub_batching = task_bank.SubBatching(base, bank)
    GraphedStep(bank, bank.optimizer(lr=1e-4))._check_capturable()
    assert sub_batching.tensors["a"]  # (alive until here)
