"""What a benchmark reports: the project's goals met or missed, JSON / Markdown / PNG results, and README's
section generated from the committed results."""

import json
import math
from pathlib import Path

# The project's goals, checked on the first workload of a preset (BERT-base, seq 128 for gpu-base) against the
# bitfit_fast provider that does best on each: (name, statistic, comparison, target, relative to).
GOALS = {
    "cpu": [("step time vs reference", "speedup_vs_reference", ">=", 1 / 0.9, "reference"),
            ("peak memory vs reference", "memory_vs_reference", "<=", 0.6, "reference")],
    "cuda": [("speed vs reference eager", "speedup_vs_reference", ">=", 2.0, "reference"),
             ("speed vs reference compiled", "median_ms", "<=", 1 / 1.3, "reference-compiled"),
             ("MFU", "mfu", ">=", 0.45, None),
             ("peak memory vs reference at equal batch", "memory_vs_reference", "<=", 0.4, "reference"),
             ("largest batch vs reference", "max_batch_vs_reference", ">=", 2.5, "reference")],
}


def check_goals(record: dict, device: str) -> list[dict]:
    """Each goal with the best bitfit_fast provider's measured value on the first workload, met or missed."""
    results = record["workloads"][0]["providers"]
    checks = []
    for name, stat, comparison, target, relative_to in GOALS[device]:
        if relative_to is not None and relative_to not in results:
            continue
        values = {}
        for provider, stats in results.items():
            if not provider.startswith("fast") or stat not in stats:
                continue
            value = stats[stat]
            if stat == "median_ms" and relative_to:  # time relative to another provider
                value = value / results[relative_to]["median_ms"]
            values[provider] = value
        if not values:
            continue
        pick = max if comparison == ">=" else min
        provider = pick(values, key=values.get)
        value = values[provider]
        met = value >= target if comparison == ">=" else value <= target
        checks.append(dict(goal=name, target=f"{comparison} {target:.3g}", provider=provider, measured=value, met=met))
    return checks


def format_workload(name: str, results: dict) -> str:
    """One workload's Markdown table: a row per provider."""
    lines = [f"\n{name}", "| provider | median ms (IQR) | tokens/s | real tokens/s | MFU | peak memory | speedup "
             "| memory ratio | max batch |", "|---|---|---|---|---|---|---|---|---|"]
    for provider, s in results.items():
        memory = f"{s['peak_memory_bytes'] / 2**20:.0f} MiB" if "peak_memory_bytes" in s else "-"
        ratio = f"{s['memory_vs_reference']:.2f}x" if "memory_vs_reference" in s else "-"
        speed = f"{s['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in s else "-"
        lines.append(
            f"| {provider} | {s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f}) | {s['tokens_per_s']:,.0f} | "
            f"{s['real_tokens_per_s']:,.0f} | {100 * s['mfu']:.1f}% | {memory} | {speed} | {ratio} | "
            f"{s.get('max_batch', '-')} |"
        )
    return "\n".join(lines)


def markdown(record: dict) -> str:
    """A run's Markdown: environment, command, a table per workload, the goals."""
    header = (f"**{record['preset']}** on {record['device']} — torch {record['torch']}, triton {record['triton']}, "
              f"transformers {record['transformers']}, commit `{record['commit'][:12]}`, "
              f"matmul peak {record['matmul_peak_tflops']:.2f} TFLOP/s ({record['matmul_peak_dtype']}).  \n"
              f"Command: `{record['command']}`. Memory: {record['memory_method']}.")
    goals = ""
    if record.get("goals"):
        goals = (f"\nGoals on {record['workloads'][0]['workload']} (best bitfit_fast provider each):\n\n"
                 "| goal | target | provider | measured | met |\n|---|---|---|---|---|\n"
                 + "\n".join(f"| {g['goal']} | {g['target']} | {g['provider']} | {g['measured']:.3g} | "
                              f"{'yes' if g['met'] else 'no'} |" for g in record["goals"]) + "\n")
    return (header + "\n" + "\n".join(format_workload(w["workload"], w["providers"]) for w in record["workloads"])
            + "\n" + goals)


def plot(record: dict, path: Path) -> Path | None:
    """Throughput and memory against batch size, one line per provider, for each (model, sequence) sweep."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    sweeps: dict[str, list[dict]] = {}
    for w in record["workloads"]:
        spec = w["spec"]
        # Fixed-length workloads only; results written before "lengths" replaced "real_lengths" say it that way.
        if spec.get("lengths", "fixed") == "fixed" and not spec.get("real_lengths", False):
            sweeps.setdefault(f"{spec['arch']}-{spec['model'].split('-')[1]} seq {spec['seq']}", []).append(w)
    columns = max(1, len(sweeps))
    fig, axes = plt.subplots(2, columns, figsize=(5 * columns, 8), squeeze=False)
    for column, (title, workloads) in enumerate(sweeps.items()):
        xs = [w["spec"]["batch"] for w in workloads]
        for provider in record["providers"]:
            stats = [w["providers"][provider] for w in workloads]
            axes[0][column].plot(xs, [s["tokens_per_s"] for s in stats], marker="o", label=provider)
            axes[1][column].plot(xs, [s.get("peak_memory_bytes", math.nan) / 2**20 for s in stats], marker="o",
                                 label=provider)
        axes[0][column].set(title=title, xlabel="batch", ylabel="tokens/s")
        axes[1][column].set(xlabel="batch", ylabel="peak memory (MiB)")
        for ax in axes[:, column]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"{record['preset']} — {record['device']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write(record: dict, out_dir: Path) -> dict[str, Path]:
    """``<preset>.json``, ``.md`` and (with matplotlib) ``.png`` under ``out_dir``; returns the paths by kind."""
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"{record['preset']}"
    paths = {"json": out_dir / f"{stem}.json", "markdown": out_dir / f"{stem}.md"}
    paths["json"].write_text(json.dumps(record, indent=1) + "\n")
    paths["markdown"].write_text(markdown(record))
    png = plot(record, out_dir / f"{stem}.png")
    if png is not None:
        paths["png"] = png
    return paths


README_START = "<!-- bench:start (generated by `bitfit-fast bench --update-readme`; do not edit) -->"
README_END = "<!-- bench:end -->"


def readme_section(results_dir: Path) -> str:
    """README's generated benchmark section: the Markdown of every ``results_dir/*.json``, in name order."""
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    if not records:
        return "No benchmark results are committed yet.\n"
    return "\n".join(markdown(r) for r in records)


def update_readme(readme: Path, results_dir: Path) -> None:
    """Replace the text between README's bench markers with :func:`readme_section`."""
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + readme_section(results_dir) + text[end:])
