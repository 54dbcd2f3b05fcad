"""Mixed-task batches: a TaskBank's throughput with 1, 8 and 64 distinct tasks per batch, against one task's model
and against per-task sub-batches (a hot-swapping adapter server's strategy: the batch split by task, each part run
through the whole model after swapping that task's biases and head in; PEFT's ``adapter_names`` splits inside each
layer instead, which for a bias is what the bank does).

    python -m bitfit_fast_benches.task_bank --preset cpu --out benches/results/task-bank

Every configuration runs the same batches (real BBC News paragraph lengths, dynamic padding), in rounds that
alternate the configurations (each round starting at another) in one process so that drift cancels; a ratio is
the median of each round's own ratio, measured here. ``predict`` times a no-grad forward (serving); ``train`` a
forward, backward and AdamW step on the bank's loss (the bank's own ``TaskBank.optimizer``, the single-task model's
torch.optim.AdamW). On a GPU, where both are host-bound at batch 64, each is timed again replayed as CUDA graphs
(the batches padded to one shape); a mode whose capture fails is recorded under ``failed_modes``, the others kept.
"""

import copy
import dataclasses
import functools
import random
import statistics
import tempfile
from pathlib import Path

import torch

from .measurement import paired_ratios, spread, timed
from .presets import Workload, build_base_model, make_batches, real_tokens
from .profile_step import cpu_gemm_ms, gpu_busy_ms, top_kernels
from .report import interquartile, short_commit
from .runner import environment, preset_command


@dataclasses.dataclass(frozen=True)
class TaskBankPreset:
    workload: Workload
    repeats: int
    warmup: int
    device: str
    distinct: tuple[int, ...] = (1, 8, 64)  # distinct tasks per mixed batch; the bank holds the most (heads of 2-5)
    precision: str = "fp32"  # "fp32", or "bf16": every configuration under bf16 autocast


PRESETS = {
    "cpu": TaskBankPreset(Workload("bert-mini", 128, 64, lengths="bbc"), repeats=15, warmup=2, device="cpu"),
    # What a server on a CPU with bf16 dot products (AVX512-BF16, AMX) would run: GEMMs at twice fp32's rate.
    "cpu-bf16": TaskBankPreset(Workload("bert-mini", 128, 64, lengths="bbc"), repeats=15, warmup=2, device="cpu",
                               precision="bf16"),
    # Sized for benches/gpu_run.sh's share of a 15-minute GPU lease: 64 sub-batches a round are the slow part.
    # bf16 autocast, as every GPU benchmark runs (providers.py).
    "gpu": TaskBankPreset(Workload("bert-base", 128, 64, lengths="bbc"), repeats=10, warmup=3, device="cuda",
                          precision="bf16"),
    # For the test suite: seconds, not a measurement.
    "tiny": TaskBankPreset(Workload("bert-tiny", 16, 8, lengths="lognormal"), repeats=1, warmup=0, device="cpu",
                           distinct=(1, 4)),
}

GOALS = {"mixed_vs_single_min": 0.9, "mixed_vs_sub_batches_min": 3.0}
GRAPHED_DEVICES = ("cuda",)  # where the CUDA-graph modes run (the tests add "cpu", where their steps run eagerly)


def _tasks(base: torch.nn.Module, directory: Path, count: int) -> dict[str, Path]:
    """``count`` single-task BitFit models on ``base`` with random trained values, saved: {name: directory}."""
    import bitfit_fast

    sources = {}
    for index in range(count):
        model = bitfit_fast.apply(_with_head(base, 2 + index % 4), announce=False)
        generator = torch.Generator().manual_seed(index)
        with torch.no_grad():
            for param in (p for p in model.parameters() if p.requires_grad):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        sources[f"task{index}"] = bitfit_fast.save_biases(model, directory / f"task{index}")
    return sources


def _with_head(base: torch.nn.Module, width: int) -> torch.nn.Module:
    """A copy of ``base`` with a new classifier of ``width`` labels."""
    model = copy.deepcopy(base)
    model.classifier = torch.nn.Linear(model.classifier.in_features, width, device=model.classifier.weight.device)
    model.config.num_labels = model.num_labels = width
    return model


class SubBatching:
    """Single-task models whose trained values are swapped per task: the batch's examples grouped by task, each
    group run after copying its task's biases and head in (what a hot-swapping adapter server does). One model per
    head width, since a swap cannot resize a head in place."""

    def __init__(self, base: torch.nn.Module, bank):
        import bitfit_fast

        self.bank = bank
        self.tensors = {name: bank.task_tensors(name) for name in bank.tasks}
        self.models = {width: bitfit_fast.apply(_with_head(base, width), announce=False).eval()
                       for width in {task.num_labels for task in bank.tasks.values()}}

    def __call__(self, tasks: list[str], batch: dict, precision) -> None:
        groups: dict[str, list[int]] = {}
        for i, task in enumerate(tasks):
            groups.setdefault(task, []).append(i)
        for task, rows in groups.items():
            model = self.models[self.bank.tasks[task].num_labels]
            params = dict(model.named_parameters())
            with torch.no_grad(), precision():
                for name, value in self.tensors[task].items():
                    params[name].copy_(value)
                index = torch.tensor(rows, device=batch["input_ids"].device)
                model(**{k: v.index_select(0, index) for k, v in batch.items()})


def run(preset_name: str, command: str, log=print) -> dict:
    import bitfit_fast
    from bitfit_fast.task_bank import TaskBank

    preset = PRESETS[preset_name]
    device = preset.device
    base = build_base_model(preset.workload, device)
    with tempfile.TemporaryDirectory() as directory:
        sources = _tasks(base, Path(directory), max(preset.distinct))
        bank = TaskBank.load(copy.deepcopy(base), sources).eval()
    single = bitfit_fast.apply(copy.deepcopy(base), announce=False).eval()
    sub_batching = SubBatching(base, bank)
    names = list(bank.tasks)
    batches = make_batches(preset.workload, preset.warmup + preset.repeats, base.config.vocab_size, device)
    for batch in batches:
        batch.pop("labels")
    rng = random.Random(0)
    assignments = {k: [names[i % k] for i in range(preset.workload.batch)] for k in preset.distinct}
    for tasks in assignments.values():
        rng.shuffle(tasks)

    def precision():
        return torch.autocast(device, dtype=torch.bfloat16, enabled=preset.precision == "bf16")

    def predict_single(batch):
        with torch.no_grad(), precision():
            single(**batch)

    def predict_bank(k):
        def step(batch):
            with torch.no_grad(), precision():
                bank(assignments[k], **batch)
        return step

    optimizer = bank.optimizer(lr=1e-4)  # what a joint run steps with: only the batch's tasks
    single_optimizer = torch.optim.AdamW([p for p in single.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.zeros(preset.workload.batch, dtype=torch.long, device=device)

    def train_single(batch):
        single_optimizer.zero_grad()
        with precision():
            loss = single(**batch, labels=labels).loss
        loss.backward()
        single_optimizer.step()

    def train_bank(k):
        def step(batch):
            optimizer.zero_grad()
            with precision():
                loss = bank.loss(bank(assignments[k], **batch), labels, assignments[k])
            loss.backward()
            optimizer.step(assignments[k])
        return step

    most = preset.distinct[-1]
    modes = {
        "predict": ({"single-task model": predict_single,
                     **{f"bank, {k} tasks": predict_bank(k) for k in preset.distinct},
                     f"sub-batches, {most} tasks": lambda batch: sub_batching(assignments[most], batch, precision)},
                    batches),
        "train": ({"single-task model": train_single, **{f"bank, {k} tasks": train_bank(k) for k in preset.distinct}},
                  batches),
    }
    if device in GRAPHED_DEVICES:
        modes[GRAPHED_PREDICT_MODE] = _graphed_prediction(single, bank, assignments, batches, preset.workload.seq,
                                                          precision)
        modes[GRAPHED_MODE] = _graphed_training(single, bank, assignments, batches, preset.workload.seq, labels,
                                                torch.bfloat16 if preset.precision == "bf16" else None)
    results, failed_modes = {}, {}
    for mode, (configs, mode_batches) in modes.items():
        for model in (single, bank):
            model.train(not mode.startswith("predict"))
        times = {name: [] for name in configs}
        order = list(configs)
        try:
            for round_index, batch in enumerate(mode_batches):
                # Each round starts at another configuration: no one always runs first (or after the same one).
                for name in order[round_index % len(order):] + order[:round_index % len(order)]:
                    seconds, _ = timed(configs[name], batch, device)
                    if round_index >= preset.warmup:
                        times[name].append(seconds)
        except Exception as error:  # a graph that fails to capture costs its mode, not the run's other figures
            if mode not in (GRAPHED_PREDICT_MODE, GRAPHED_MODE):
                raise
            failed_modes[mode] = f"{type(error).__name__}: {error}"[:500]
            log(f"{mode}: failed: {failed_modes[mode]}")
            continue
        if mode == "predict":
            sub_batching_per_step = paired_ratios(times[f"sub-batches, {most} tasks"], times[f"bank, {most} tasks"])
        tokens = statistics.mean(real_tokens(b) for b in mode_batches[preset.warmup:])
        results[mode] = {name: dict(spread(t), examples_per_s=preset.workload.batch / statistics.median(t),
                                    real_tokens_per_s=tokens / statistics.median(t))
                         for name, t in times.items()}
        for name, entry in results[mode].items():
            # The median of each step's own ratio (same batch, same round): a ratio of medians may take them from
            # different phases of a drifting machine, and fall outside the per-step ratios' IQR.
            entry["vs_single_per_step"] = paired_ratios(times["single-task model"], times[name])
            entry["vs_single"] = entry["vs_single_per_step"]["median"]
        log(f"{mode}: " + ", ".join(f"{n} {e['examples_per_s']:.1f}/s ({e['vs_single']:.2f}x)"
                                    for n, e in results[mode].items()))
        if device == "cuda":  # where the bank's extra time goes: GPU work, or the host issuing it
            for name in ("single-task model", f"bank, {most} tasks"):
                step = functools.partial(configs[name], mode_batches[-1])
                results[mode][name].update(gpu_busy_ms=gpu_busy_ms(step), top_kernels=top_kernels(step))
        if device == "cpu" and mode == "predict":
            # A CPU spends most of a forward in the linear layers' GEMMs, which a batch of one example already runs
            # near the machine's peak: the bank's GEMMs alone bound how much faster than the sub-batches it can be.
            name = f"bank, {most} tasks"
            results[mode][name]["gemm_ms"] = cpu_gemm_ms([functools.partial(configs[name], batch)
                                                          for batch in mode_batches[preset.warmup:]])
    ratios = dict(
        mixed_vs_single={mode: {k: results[mode][f"bank, {k} tasks"]["vs_single"] for k in preset.distinct}
                         for mode in results},
        mixed_vs_sub_batches=sub_batching_per_step["median"],
    )
    per_step = dict(mixed_vs_single={mode: {k: results[mode][f"bank, {k} tasks"]["vs_single_per_step"]
                                            for k in preset.distinct} for mode in results},
                    mixed_vs_sub_batches=sub_batching_per_step)
    if "gemm_ms" in results.get("predict", {}).get(f"bank, {most} tasks", {}):
        ratios["mixed_vs_sub_batches_gemm_bound"] = (results["predict"][f"sub-batches, {most} tasks"]["median_ms"]
                                                     / results["predict"][f"bank, {most} tasks"]["gemm_ms"])
    goals = [
        dict(goal=f"mixed-batch throughput with {k} tasks >= {GOALS['mixed_vs_single_min']}x single-task ({mode})",
             value=round(ratio, 3), met=ratio >= GOALS["mixed_vs_single_min"],
             per_step=per_step["mixed_vs_single"][mode][k])
        for mode, by_k in ratios["mixed_vs_single"].items() for k, ratio in by_k.items()
    ] + [dict(goal=f"mixed batch of {most} tasks >= {GOALS['mixed_vs_sub_batches_min']}x per-task sub-batches "
                   "(predict)",
              value=round(ratios["mixed_vs_sub_batches"], 3),
              met=ratios["mixed_vs_sub_batches"] >= GOALS["mixed_vs_sub_batches_min"],
              per_step=per_step["mixed_vs_sub_batches"])]
    return dict(environment=environment(command), preset=preset_name, workload=dataclasses.asdict(preset.workload),
                precision=preset.precision, tasks_in_bank=max(preset.distinct), results=results, ratios=ratios,
                goals=goals, failed_modes=failed_modes)


# Training steps replayed as CUDA graphs (bitfit_fast.GraphedStep), on a GPU: the same batches padded to the
# workload's length (one shape, one graph: the bank's serves every mix of tasks), so that the host's launches no
# longer set the pace (the eager steps above are host-bound at batch 64) and the GPU's work decides the ratio.
GRAPHED_MODE = "train, CUDA graphs"


def _graphed_training(single, bank, assignments: dict, batches: list[dict], length: int, labels,
                      autocast: torch.dtype | None) -> tuple:
    """(configs, batches) of the graphed training mode: each step a replay of its model's graph, under ``autocast``
    (a dtype, or None for fp32)."""
    import bitfit_fast

    params = [p for p in single.parameters() if p.requires_grad]
    # No clipping, as the eager steps.
    optimizer = torch.optim.AdamW(params, lr=1e-4, capturable=params[0].is_cuda)  # (CPU: the tests, eagerly)
    single_step = bitfit_fast.GraphedStep(single, optimizer, None, autocast)
    bank_step = bitfit_fast.GraphedStep(bank, bank.optimizer(lr=1e-4), None, autocast)
    fixed = [batch | {"labels": labels} for batch in _padded(batches, length)]
    configs = {"single-task model": single_step,
               **{f"bank, {k} tasks": functools.partial(bank_step, tasks=tasks) for k, tasks in assignments.items()}}
    return configs, fixed


# Predictions replayed as CUDA graphs, on a GPU: the eager forwards above are host-bound at batch 64 as well.
GRAPHED_PREDICT_MODE = "predict, CUDA graphs"


class _ReplayedForward:
    """A no-grad forward under ``precision`` replayed as a CUDA graph: captured on the first batch (after two warmup
    runs on a side stream), each later batch copied into the captured inputs. On CPU (the tests) it runs eagerly."""

    def __init__(self, forward, precision):
        self.forward, self.precision = forward, precision
        self.graph, self.inputs = None, None

    def _run(self, batch: dict) -> None:
        with torch.no_grad(), self.precision():
            self.forward(batch)

    def __call__(self, batch: dict) -> None:
        if not next(iter(batch.values())).is_cuda:
            return self._run(batch)
        if self.graph is None:
            self.inputs = {key: value.clone() for key, value in batch.items()}
            stream, side = torch.cuda.current_stream(), torch.cuda.Stream()
            side.wait_stream(stream)
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._run(self.inputs)
            stream.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            try:
                with torch.cuda.graph(graph):
                    self._run(self.inputs)
            except BaseException:
                torch.cuda.set_stream(stream)  # a failed capture leaves its own stream current
                raise
            self.graph = graph
        else:
            for key, value in batch.items():
                self.inputs[key].copy_(value)
        self.graph.replay()


def _graphed_prediction(single, bank, assignments: dict, batches: list[dict], length: int, precision) -> tuple:
    """(configs, batches) of the graphed prediction mode: the batches padded to ``length`` (one shape: one graph per
    configuration), the bank's tasks as a device index tensor fixed in its graph."""
    device = next(single.parameters()).device
    configs = {"single-task model": _ReplayedForward(lambda batch: single(**batch), precision)}
    for k, tasks in assignments.items():
        index = bank.task_index(tasks, device)
        configs[f"bank, {k} tasks"] = _ReplayedForward(lambda batch, index=index: bank(index, **batch), precision)
    return configs, _padded(batches, length)


def _padded(batches: list[dict], length: int) -> list[dict]:
    """The batches right-padded to ``length`` tokens: one shape, so that one graph serves them all."""
    return [{key: torch.nn.functional.pad(value, (0, length - value.shape[1])) for key, value in batch.items()}
            for batch in batches]


# Records written before the preset named its precision ran fp32 on a CPU and bf16 autocast on a GPU.
_PRECISIONS = {"fp32": "fp32", "bf16": "bf16 autocast", None: "fp32 on CPU, bf16 autocast on GPU"}


def _per_step(ratios: dict | None) -> str:
    return "" if ratios is None else f" ({interquartile(ratios)})"


def markdown(record: dict) -> str:
    """The record as a Markdown table per mode, then the goals."""
    env = record["environment"]
    lines = [f"Task bank, preset `{record['preset']}` on {env['device']} (torch {env['torch']}, commit "
             f"{short_commit(env['commit'])}): {record['workload']['model']}, batch {record['workload']['batch']}, "
             f"{record['tasks_in_bank']} tasks in the bank, {_PRECISIONS[record.get('precision')]}, "
             f"`{env['command']}`", ""]
    for mode, entries in record["results"].items():
        lines += [f"| {mode} | examples/s | real tokens/s | × single-task (per-step IQR) |", "|---|---:|---:|---:|"]
        lines += [f"| {name} | {e['examples_per_s']:.1f} | {e['real_tokens_per_s']:.0f} | {e['vs_single']:.2f}"
                  f"{_per_step(e.get('vs_single_per_step'))} |" for name, e in entries.items()]
        lines.append("")
        lines += [f"- {mode}, {name}: GPU busy {e['gpu_busy_ms']:.2f} ms of a {e['median_ms']:.2f} ms step; top "
                  "kernels (ms per step): " + ", ".join(f"{k['name'][:60]} {k['ms_per_step']:.3f}"
                                                        for k in e["top_kernels"][:8])
                  for name, e in entries.items() if "gpu_busy_ms" in e]
        if any("gpu_busy_ms" in e for e in entries.values()):
            lines.append("")
    lines += [f"- {'met' if g['met'] else 'MISSED'}: {g['goal']}: {g['value']}{_per_step(g.get('per_step'))}"
              for g in record["goals"]]
    bound = record["ratios"].get("mixed_vs_sub_batches_gemm_bound")
    if bound is not None:
        most = record["tasks_in_bank"]
        predict = record["results"]["predict"]
        lines.append(f"- on this CPU the bank's GEMMs alone take {predict[f'bank, {most} tasks']['gemm_ms']:.1f} ms of "
                     f"its {predict[f'bank, {most} tasks']['median_ms']:.1f} ms step, the {most} sub-batches "
                     f"{predict[f'sub-batches, {most} tasks']['median_ms']:.1f} ms: were everything but those GEMMs "
                     f"free, the bank would be {bound:.2f}x the sub-batches, no more")
    lines += [f"- FAILED, no figures: {mode}: {error}" for mode, error in record.get("failed_modes", {}).items()]
    lines += ["", "Ratios are medians of the ratios of steps timed on the same batch in the same round, with those "
              "ratios' IQR."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    return preset_command("bitfit_fast_benches.task_bank", __doc__, PRESETS, run, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
