"""Attention by length groups against one call over the padded layout: the fused default's training step with and
without ``bitfit_fast.unpadding``'s length groups, on the same batches, alternating in one process.

    python -m bitfit_fast_benches.length_groups --preset cpu --out benches/results/length-groups

Groups run on CPU only (``unpadding.GROUPED_DEVICES``); the ``gpu`` preset turns them on for CUDA too, to time
what they save there against the host time of their extra calls. The ratio is paired: the median over batches of
one call's step time over the grouped step's on the same batch, so that the VM's drift between batches cancels.
"""

import contextlib
import dataclasses
import statistics

from bitfit_fast import unpadding

from .measurement import spread, timed
from .presets import Workload, build_base_model, make_batches
from .providers import build_provider
from .report import short_commit
from .runner import environment, preset_command


@dataclasses.dataclass(frozen=True)
class LengthGroupsPreset:
    workload: Workload
    repeats: int
    warmup: int
    device: str


PRESETS = {
    "cpu": LengthGroupsPreset(Workload("bert-base", 128, 16, lengths="bbc"), repeats=10, warmup=2, device="cpu"),
    "gpu": LengthGroupsPreset(Workload("bert-base", 128, 256, lengths="bbc"), repeats=10, warmup=3, device="cuda"),
    # For the test suite: seconds, not a measurement.
    "tiny": LengthGroupsPreset(Workload("bert-tiny", 64, 8, lengths="lognormal"), repeats=2, warmup=0, device="cpu"),
}


@contextlib.contextmanager
def attention_groups(device: str, on: bool):
    """Attention by length groups on ``device`` (``on``) or in one call, for the duration of the block."""
    saved = unpadding.GROUPED_DEVICES
    unpadding.GROUPED_DEVICES = {device} if on else set()
    try:
        yield
    finally:
        unpadding.GROUPED_DEVICES = saved


def scores_fraction(lengths: list[int]) -> tuple[int, float]:
    """(groups, the scores they compute as a fraction of the padded layout's) for sequences of ``lengths``."""
    _, groups = unpadding.length_groups(lengths)
    return len(groups), sum(g.count * g.length**2 for g in groups) / (len(lengths) * max(lengths) ** 2)


def run(preset_name: str, command: str) -> dict:
    preset = PRESETS[preset_name]
    device = preset.device
    base = build_base_model(preset.workload, device)
    trainer = build_provider("fast", base, device, copy_base=False)
    batches = make_batches(preset.workload, preset.warmup + preset.repeats, base.config.vocab_size, device)
    times = {"grouped": [], "one call": []}
    for index, batch in enumerate(batches):
        names = list(times) if index % 2 == 0 else list(times)[::-1]  # neither always runs first
        for name in names:
            with attention_groups(device, on=name == "grouped"):
                seconds, _ = timed(trainer.step, batch, device)
            if index >= preset.warmup:
                times[name].append(seconds)
    timed_batches = batches[preset.warmup:]
    groups = [scores_fraction(batch["attention_mask"].sum(dim=1).tolist()) for batch in timed_batches]
    return dict(
        environment=environment(command), preset=preset_name, workload=dataclasses.asdict(preset.workload),
        steps={name: spread(seconds) for name, seconds in times.items()},
        paired_speedup=statistics.median(one / grouped for one, grouped in zip(times["one call"], times["grouped"])),
        groups_per_batch=statistics.mean(count for count, _ in groups),
        scores_fraction=statistics.mean(fraction for _, fraction in groups),
    )


def markdown(record: dict) -> str:
    env, steps = record["environment"], record["steps"]
    workload = record["workload"]
    return "\n".join([
        f"Length groups, preset `{record['preset']}` on {env['device']} (torch {env['torch']}, commit "
        f"{short_commit(env['commit'])}): {workload['model']}, batch {workload['batch']}, {workload['lengths']} "
        f"lengths up to {workload['seq']}, the fused default's training step, `{env['command']}`",
        "",
        "| attention | median ms (IQR) |",
        "|---|---:|",
        *(f"| {name} | {s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f}) |" for name, s in steps.items()),
        "",
        f"- grouped step speed, paired over the same batches: {record['paired_speedup']:.3f}× one call's",
        f"- {record['groups_per_batch']:.1f} groups a batch, computing {record['scores_fraction']:.2f} of the padded "
        "layout's attention scores",
    ]) + "\n"


def main(argv: list[str] | None = None) -> int:
    return preset_command("bitfit_fast_benches.length_groups", __doc__, PRESETS, run, markdown, argv)


if __name__ == "__main__":
    raise SystemExit(main())
