"""What a benchmark reports: the project's goals met or missed, JSON / Markdown / PNG results, and README's
section generated from the committed results."""

import dataclasses
import json
import math
from pathlib import Path

from bitfit_fast.files import atomic_write


@dataclasses.dataclass(frozen=True)
class Goal:
    """A project goal: ``stat`` of a provider ``comparison`` ``target`` on the first workload of the given kind."""

    name: str
    stat: str
    comparison: str  # ">=" or "<="
    target: float
    relative_to: str | None = "reference"  # the provider the run must include (time relative to it)
    lengths: str = "fixed"  # the workload's lengths (presets.Workload.lengths)
    model: str | None = None  # the workload's model shape; None: any
    provider: str | None = None  # None: the best bitfit_fast provider


GOALS = {
    "cpu": [
        Goal("step time vs reference", "speedup_vs_reference", ">=", 1 / 0.9),
        Goal("peak memory vs reference", "memory_vs_reference", "<=", 0.6),
        # Unpadding and the classification shortcut, BERT-base, batch 16, dropout on.
        Goal("fused default step time vs reference", "speedup_vs_reference", ">=", 1 / 0.9, model="bert-base",
             provider="fast"),
        Goal("fused default peak memory vs reference", "memory_vs_reference", "<=", 0.9, model="bert-base",
             provider="fast"),
        Goal("fused default step time vs reference, real lengths", "speedup_vs_reference", ">=", 1 / 0.6,
             lengths="bbc", model="bert-base", provider="fast"),
        Goal("fused default real-token throughput vs reference, real lengths", "real_tokens_vs_reference", ">=",
             1.6, lengths="bbc", model="bert-base", provider="fast"),
    ],
    "cuda": [
        Goal("speed vs reference eager", "speedup_vs_reference", ">=", 2.0),
        Goal("speed vs reference compiled", "median_ms", "<=", 1 / 1.3, relative_to="reference-compiled"),
        Goal("MFU", "mfu", ">=", 0.45, relative_to=None),
        Goal("fused default peak memory vs reference at equal batch", "memory_vs_reference", "<=", 0.9,
             provider="fast"),
        Goal("minimal-memory peak memory vs reference at equal batch", "memory_vs_reference", "<=", 0.4,
             provider="fast-minimal"),
        Goal("minimal-memory largest batch vs reference", "max_batch_vs_reference", ">=", 2.5,
             provider="fast-minimal"),
        Goal("real-token throughput vs reference, real lengths", "real_tokens_vs_reference", ">=", 2.0,
             lengths="bbc", model="bert-base", provider="fast"),
    ],
}


# The providers a goal times against other than the reference: the runner pairs each step with theirs too.
TIME_GOALS_RELATIVE_TO = sorted({goal.relative_to for goals in GOALS.values() for goal in goals
                                 if goal.stat == "median_ms" and goal.relative_to})


def short_commit(commit: str) -> str:
    """A recorded commit as reports show it: 12 digits, and ``-dirty`` kept."""
    dirty = commit.endswith("-dirty")
    return commit.removesuffix("-dirty")[:12] + ("-dirty" if dirty else "")


def _workload_for(record: dict, goal: Goal) -> dict | None:
    return next((w for w in record["workloads"] if w["spec"]["lengths"] == goal.lengths
                 and goal.model in (None, w["spec"]["model"])), None)


def check_goals(record: dict, device: str) -> list[dict]:
    """Each goal whose workload the run has: the provider's measured value (the best bitfit_fast provider's
    unless the goal names one), met or missed."""
    checks = []
    for goal in GOALS[device]:
        workload = _workload_for(record, goal)
        if workload is None:
            continue
        results = workload["providers"]
        if goal.relative_to is not None and goal.relative_to not in results:
            continue
        values = {}
        for provider, stats in results.items():
            if not provider.startswith("fast") or goal.provider not in (None, provider) or goal.stat not in stats:
                continue
            value = stats[goal.stat]
            if goal.stat == "median_ms" and goal.relative_to:  # time relative to another provider, step by step
                paired = stats.get("time_vs_per_step", {}).get(goal.relative_to)
                value = paired["median"] if paired else value / results[goal.relative_to]["median_ms"]
            values[provider] = value
        if not values:
            continue
        pick = max if goal.comparison == ">=" else min
        provider = pick(values, key=values.get)
        value = values[provider]
        met = value >= goal.target if goal.comparison == ">=" else value <= goal.target
        check = dict(goal=goal.name, workload=workload["workload"], target=f"{goal.comparison} {goal.target:.3g}",
                     provider=provider, measured=value, met=met)
        per_step = (results[provider].get("time_vs_per_step", {}).get(goal.relative_to)
                    if goal.stat == "median_ms" else
                    results[provider].get("speedup_per_step") if goal.stat in _PER_STEP_STATS else None)
        if per_step:
            check["per_step"] = per_step
        checks.append(check)
    return checks


# Stats that are the reference's step time over the provider's, step by step as well (both run the same batches,
# so a step's real-token throughput ratio is its time ratio): a goal on them shows the per-step ratios' spread.
_PER_STEP_STATS = ("speedup_vs_reference", "real_tokens_vs_reference")


def _goal_note(record: dict, check: dict) -> str:
    """What a goal's "met" needs said beside it: a largest batch set by an error (PyTorch's LayerNorm backward, for
    the reference) or by the search's limit is not a memory limit, so the ratio is of what trains, not of what
    fits. Derived from the record's results, so older records get it too."""
    if _GOAL_STATS.get(check["goal"]) != "max_batch_vs_reference":
        return ""
    results = next(w["providers"] for w in record["workloads"] if w["workload"] == check["workload"])
    unbounded = [name for name in ("reference", check["provider"]) if results[name].get("max_batch_errors")]
    return f" ({' and '.join(unbounded)} stopped other than by memory: see the notes above)" if unbounded else ""


_GOAL_STATS = {goal.name: goal.stat for goals in GOALS.values() for goal in goals}


def interquartile(ratios: dict | None) -> str:
    """Per-step ratios' quartiles (``measurement.paired_ratios``) as "q1–q3"; "-" for none."""
    return "-" if ratios is None else f"{ratios['q1']:.2f}–{ratios['q3']:.2f}"


def format_workload(name: str, results: dict) -> str:
    """One workload's Markdown table: a row per provider."""
    lines = [f"\n{name}", "| provider | median ms (IQR) | padded tokens/s | real tokens/s | MFU (padded) | peak memory "
             "| speedup (per-step IQR) | memory ratio | max batch |", "|---|---|---|---|---|---|---|---|---|"]
    for provider, s in results.items():
        memory = f"{s['peak_memory_bytes'] / 2**20:.0f} MiB" if "peak_memory_bytes" in s else "-"
        ratio = f"{s['memory_vs_reference']:.2f}x" if "memory_vs_reference" in s else "-"
        speed = "-"
        if "speedup_vs_reference" in s:
            per_step = f" ({interquartile(s['speedup_per_step'])})" if "speedup_per_step" in s else ""
            speed = f"{s['speedup_vs_reference']:.2f}x{per_step}"
        lines.append(
            f"| {provider} | {s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f}) | {s['tokens_per_s']:,.0f} | "
            f"{s['real_tokens_per_s']:,.0f} | {100 * s['mfu']:.1f}% | {memory} | {speed} | {ratio} | "
            f"{s.get('max_batch', '-')} |"
        )
    lines += [f"- {provider}'s largest-batch search, stopped other than by memory at {error}"
              for provider, s in results.items() for error in s.get("max_batch_errors", [])]
    return "\n".join(lines)


def markdown(record: dict) -> str:
    """A run's Markdown: environment, command, a table per workload, the goals."""
    partial = f" (**partial**: {record['partial']}; the run stopped or is running)" if record.get("partial") else ""
    header = (f"**{record['preset']}**{partial} on {record['device']} — torch {record['torch']}, "
              f"triton {record['triton']}, transformers {record['transformers']}, "
              f"commit `{short_commit(record['commit'])}`, "
              f"matmul peak {record['matmul_peak_tflops']:.2f} TFLOP/s ({record['matmul_peak_dtype']}).  \n"
              f"Command: `{record['command']}`. Memory: {record['memory_method']}.")
    goals = ""
    if record.get("goals"):
        goals = ("\nGoals (the named provider, or the best bitfit_fast provider; a time or throughput ratio is the "
                 "median of the ratios of steps timed on the same batch, shown with their IQR, or in a run that "
                 "recorded none the ratio of the medians):\n\n"
                 "| goal | workload | target | provider | measured | per-step IQR | met |\n"
                 "|---|---|---|---|---|---|---|\n"
                 + "\n".join(f"| {g['goal']} | {g.get('workload', record['workloads'][0]['workload'])} | "
                              f"{g['target']} | {g['provider']} | {g['measured']:.3g} | "
                              f"{interquartile(g.get('per_step'))} | {'yes' if g['met'] else 'no'}"
                              f"{_goal_note(record, g)} |"
                              for g in record["goals"]) + "\n")
    return (header + "\n" + "\n".join(format_workload(w["workload"], w["providers"]) for w in record["workloads"])
            + "\n" + goals)


def plot(record: dict, path: Path) -> Path | None:
    """Throughput and memory against batch size, one line per provider, for each (model, sequence) sweep; and
    for the variable-length workloads, real tokens/s and memory per provider as bars."""
    from bitfit_fast.train.plots import pyplot

    plt = pyplot()
    if plt is None:
        return None
    sweeps: dict[str, list[dict]] = {}
    variable = []
    for w in record["workloads"]:
        spec = w["spec"]
        if spec["lengths"] == "fixed":
            sweeps.setdefault(f"{spec['arch']}-{spec['model'].split('-')[1]} seq {spec['seq']}", []).append(w)
        else:
            variable.append(w)
    columns = max(1, len(sweeps) + len(variable))
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    providers = list(record["providers"])
    for column, (title, workloads) in enumerate(sweeps.items()):
        xs = [w["spec"]["batch"] for w in workloads]
        for provider in providers:  # a provider some workloads skip (a CUDA graph's on real lengths) has gaps
            stats = [w["providers"].get(provider, {}) for w in workloads]
            axes[0][column].plot(xs, [s.get("tokens_per_s", math.nan) for s in stats], marker="o", label=provider)
            axes[1][column].plot(xs, [s.get("peak_memory_bytes", math.nan) / 2**20 for s in stats], marker="o",
                                 label=provider)
        axes[0][column].set(title=title, xlabel="batch", ylabel="tokens/s")
        axes[1][column].set(xlabel="batch", ylabel="peak memory (MiB)")
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
    for column, w in enumerate(variable, start=len(sweeps)):
        present = [p for p in providers if p in w["providers"]]
        stats = [w["providers"][p] for p in present]
        colors = [f"C{providers.index(p)}" for p in present]
        axes[0][column].bar(present, [s["real_tokens_per_s"] for s in stats], color=colors)
        axes[1][column].bar(present, [s.get("peak_memory_bytes", math.nan) / 2**20 for s in stats], color=colors)
        axes[0][column].set(title=w["workload"], ylabel="real tokens/s")
        axes[1][column].set(ylabel="peak memory (MiB)")
        for ax in axes[:, column]:
            ax.tick_params(axis="x", labelrotation=45)
    for ax in axes.flat:
        ax.grid(alpha=0.3)
    if sweeps:
        axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{record['preset']} — {record['device']}")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


PARTIAL = ".partial"


def write(record: dict, out_dir: Path) -> dict[str, Path]:
    """``<preset>.json``, ``.md`` and (with matplotlib) ``.png`` under ``out_dir``; returns the paths by kind. A
    ``partial`` record (a run in progress, or cut short) is written as ``<preset>.partial.*``, never over the last
    whole run's files; the whole record, when it comes, removes it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = record["preset"] + (PARTIAL if record.get("partial") else "")
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    atomic_write(paths["json"], lambda tmp: tmp.write_text(json.dumps(record, indent=1) + "\n"))
    atomic_write(paths["markdown"], lambda tmp: tmp.write_text(markdown(record)))
    png = plot(record, out_dir / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    if not record.get("partial"):
        for suffix in (".json", ".md", ".png"):
            (out_dir / f"{record['preset']}{PARTIAL}{suffix}").unlink(missing_ok=True)
    return paths


README_START = "<!-- bench:start (generated by `bitfit-fast bench --update-readme`; do not edit) -->"
README_END = "<!-- bench:end -->"


def records(results_dir: Path) -> list[dict]:
    """The whole runs' records in ``results_dir`` (its ``*.json`` but the partial ones), in name order; ValueError
    naming a file that is not one."""
    found = []
    for path in sorted(results_dir.glob("*.json")):
        if path.name.endswith(f"{PARTIAL}.json"):
            continue
        try:
            record = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"{path.name} could not be read ({error})") from error
        if not (isinstance(record, dict) and {"preset", "workloads"} <= record.keys()):
            raise ValueError(f"{path.name} is not a `bitfit-fast bench` record: keep only those in the directory")
        found.append(record)
    return found


def readme_section(results_dir: Path) -> str:
    """README's generated benchmark section: the Markdown of every whole run's record in ``results_dir``."""
    found = records(results_dir)
    if not found:
        return "No benchmark results are committed yet.\n"
    return "\n".join(markdown(r) for r in found)


def update_readme(readme: Path, results_dir: Path) -> None:
    """Replace the text between README's bench markers with :func:`readme_section`."""
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    atomic_write(readme, lambda tmp: tmp.write_text(text[:start] + "\n" + readme_section(results_dir) + text[end:]))
