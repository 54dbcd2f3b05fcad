"""Benchmark suite: reference BitFit (eager, compiled), full fine-tuning and bitfit_fast on one model and data.

Every provider trains the same randomly initialised model on the same fresh batches, with the paper's
optimizer (AdamW, clipping 1.0). Steps of all providers alternate in one process so that drift (clocks,
thermals, other load) cancels; each step is timed between device synchronisations. Memory is measured per
provider on its own: on a GPU as resident state plus the step's peak allocation, on CPU as the peak RSS of a
separate process. Ratios are always computed from the medians measured here, never assumed.
"""

import copy
import dataclasses
import json
import math
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

# Model shapes: (hidden, layers, heads, intermediate). Random init is fine for speed.
SHAPES = {
    "bert-tiny": (128, 2, 2, 512),
    "bert-mini": (256, 4, 4, 1024),
    "bert-base": (768, 12, 12, 3072),
    "bert-large": (1024, 24, 16, 4096),
}
ARCHS = ("bert", "roberta")

PROVIDERS = {
    "reference": "PyTorch BitFit, eager (non-bias weights requires_grad=False)",
    "reference-compiled": "the same under torch.compile",
    "full": "full fine-tuning, eager",
    "fast": "bitfit_fast, fused layers (memory=default)",
    "fast-lean": "bitfit_fast, fused layers (memory=lean)",
    "fast-minimal": "bitfit_fast, fused layers (memory=minimal)",
    "fast-modules": "bitfit_fast, module-level path only (fuse_layers=False)",
    "fast-torch": "bitfit_fast, fused layers on the torch backend (no Triton)",
}


@dataclasses.dataclass(frozen=True)
class Workload:
    model: str  # a key of SHAPES
    seq: int
    batch: int
    arch: str = "bert"
    real_lengths: bool = False  # variable GLUE-like lengths with dynamic padding

    @property
    def name(self) -> str:
        lengths = f"real-lengths{self.seq}" if self.real_lengths else f"seq{self.seq}"
        return f"{self.arch}-{self.model.split('-')[1]}-{lengths}-b{self.batch}"


@dataclasses.dataclass
class Preset:
    device: str
    workloads: list[Workload]
    providers: list[str]
    repeats: int
    warmup: int
    max_batch: bool = False  # search the largest batch that fits (GPU only)


def _sweep(model: str, seq: int, batches: list[int], arch: str = "bert") -> list[Workload]:
    return [Workload(model, seq, b, arch) for b in batches]


PRESETS = {
    "tiny": Preset("cpu", [Workload("bert-tiny", 16, 2), Workload("bert-tiny", 16, 4, real_lengths=True)],
                   ["reference", "full", "fast", "fast-minimal"], repeats=3, warmup=1),
    "cpu-small": Preset(
        "cpu",
        _sweep("bert-mini", 128, [8, 16]) + [Workload("bert-mini", 128, 32, real_lengths=True)],
        ["reference", "full", "fast", "fast-lean", "fast-minimal", "fast-modules"], repeats=10, warmup=3,
    ),
    "gpu-base": Preset(
        "cuda",
        _sweep("bert-base", 128, [32, 64, 128, 256]) + _sweep("bert-base", 512, [16, 32])
        + [Workload("bert-base", 128, 256, real_lengths=True)],
        ["reference", "reference-compiled", "full", "fast", "fast-lean", "fast-minimal", "fast-torch"],
        repeats=20, warmup=5, max_batch=True,
    ),
    "gpu-large": Preset(
        "cuda", _sweep("bert-large", 128, [32, 64, 128]) + _sweep("bert-large", 512, [8, 16]),
        ["reference", "reference-compiled", "full", "fast", "fast-lean", "fast-minimal"], repeats=15, warmup=5,
    ),
    "gpu-roberta": Preset(
        "cuda", _sweep("bert-base", 128, [64, 128], arch="roberta"),
        ["reference", "reference-compiled", "full", "fast", "fast-lean"], repeats=20, warmup=5,
    ),
}


# ---------------------------------------------------------------------------------------------- models, data


def build_base_model(workload: Workload, device: str, seed: int = 0):
    import transformers

    hidden, layers, heads, inter = SHAPES[workload.model]
    common = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads, intermediate_size=inter,
                  num_labels=2, hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
    torch.manual_seed(seed)
    if workload.arch == "roberta":
        config = transformers.RobertaConfig(vocab_size=50265, max_position_embeddings=514, pad_token_id=1, **common)
        model = transformers.RobertaForSequenceClassification(config)
    else:
        config = transformers.BertConfig(vocab_size=30522, max_position_embeddings=512, **common)
        model = transformers.BertForSequenceClassification(config)
    return model.to(device).train()


def real_lengths(n: int, max_len: int, rng: random.Random) -> list[int]:
    """Sentence lengths like GLUE's: log-normal around a few dozen tokens, capped at the max length."""
    return [min(max_len, max(4, int(rng.lognormvariate(math.log(28), 0.6)))) for _ in range(n)]


def make_batches(workload: Workload, count: int, vocab: int, device: str, seed: int = 1) -> list[dict]:
    """``count`` distinct batches (no input is reused across timed steps); padded to the longest sequence."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = real_lengths(workload.batch, workload.seq, rng) if workload.real_lengths else [workload.seq] * workload.batch
        width = max(lengths)
        ids = torch.randint(5, vocab, (workload.batch, width), generator=gen)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        labels = torch.randint(0, 2, (workload.batch,), generator=gen)
        batches.append(dict(input_ids=(ids * mask).to(device), attention_mask=mask.to(device), labels=labels.to(device)))
    return batches


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def padded_tokens(batch: dict) -> int:
    return batch["input_ids"].numel()


# ------------------------------------------------------------------------------------------------- providers


@dataclasses.dataclass
class Trainer:
    """One provider's model, optimizer and training step."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[dict], torch.Tensor]
    method: str  # "bitfit" or "full": which FLOPs count as the model's


def build_provider(name: str, base: torch.nn.Module, device: str, copy_base: bool = True) -> Trainer:
    """The provider's trainer on a copy of ``base`` (or on ``base`` itself with ``copy_base=False``)."""
    import bitfit_fast

    model = copy.deepcopy(base) if copy_base else base
    method = "full" if name == "full" else "bitfit"
    if name.startswith("fast"):
        options = {"fast": {}, "fast-lean": dict(memory="lean"), "fast-minimal": dict(memory="minimal"),
                   "fast-modules": dict(fuse_layers=False), "fast-torch": dict(backend="torch")}[name]
        dtype = torch.bfloat16 if device == "cuda" else None
        bitfit_fast.apply(model, dtype=dtype, **options)
    elif name != "full":
        head = {n for n, _ in model.named_children() if n != model.base_model_prefix}
        for pname, param in model.named_parameters():
            param.requires_grad_(pname.endswith("bias") or pname.split(".")[0] in head)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-3 if method == "bitfit" else 1e-5)
    forward = torch.compile(model) if name == "reference-compiled" else model
    autocast = torch.bfloat16 if device == "cuda" else None

    def step(batch: dict) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss = forward(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        return loss.detach()

    return Trainer(model, optimizer, step, method)


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(step: Callable[[dict], torch.Tensor], batch: dict, device: str) -> tuple[float, torch.Tensor]:
    """Seconds of one step between two device synchronisations (all queued work included)."""
    synchronize(device)
    start = time.perf_counter()
    loss = step(batch)
    synchronize(device)
    return time.perf_counter() - start, loss


# ------------------------------------------------------------------------------------------ memory, peaks


def resident_bytes(trainer: Trainer) -> int:
    """Distinct storages of the provider's parameters, buffers and optimizer state."""
    storages = {}
    tensors = list(trainer.model.parameters()) + list(trainer.model.buffers())
    tensors += [t for state in trainer.optimizer.state.values() for t in state.values() if torch.is_tensor(t)]
    tensors += [m._packed_qkv for m in trainer.model.modules() if getattr(m, "_packed_qkv", None) is not None]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def gpu_peak_bytes(trainer: Trainer, batch: dict) -> int:
    """Resident state plus the highest allocation above it during one step."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    trainer.step(batch)
    torch.cuda.synchronize()
    return resident_bytes(trainer) + torch.cuda.max_memory_allocated() - before


def cpu_peak_rss(provider: str, workload: Workload, steps: int = 2) -> dict:
    """Peak RSS of a fresh process that builds the model and trains ``steps`` steps with this provider."""
    spec = json.dumps(dict(provider=provider, workload=dataclasses.asdict(workload), steps=steps))
    # A fixed mmap threshold makes glibc return every freed tensor to the OS at once (the default threshold
    # adapts upwards and keeps freed blocks in the heap), so the peak RSS follows live memory, not fragmentation.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-m", "bitfit_fast.bench", "--rss-probe", spec], capture_output=True,
                         text=True, env=env, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"memory probe for {provider} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def _rss_probe(spec: str) -> None:
    """Child process of :func:`cpu_peak_rss`: RSS when idle, then the peak while training.

    One step on a tiny model first loads everything imported lazily (modeling code, kernels); the kernel's
    high-water mark is then reset (``/proc/self/clear_refs``), so only the workload's own peak is measured.
    """
    args = json.loads(spec)
    workload = Workload(**args["workload"])
    warmup = dataclasses.replace(workload, model="bert-tiny", seq=8, batch=1, real_lengths=False)
    trainer = build_provider(args["provider"], build_base_model(warmup, "cpu"), "cpu", copy_base=False)
    trainer.step(make_batches(warmup, 1, trainer.model.config.vocab_size, "cpu")[0])
    del trainer
    Path("/proc/self/clear_refs").write_text("5")
    idle = _proc_status_bytes("VmRSS")
    trainer = build_provider(args["provider"], build_base_model(workload, "cpu"), "cpu", copy_base=False)
    for batch in make_batches(workload, args["steps"], trainer.model.config.vocab_size, "cpu"):
        trainer.step(batch)
    peak = _proc_status_bytes("VmHWM")
    print(json.dumps(dict(idle_rss=idle, peak_rss=peak, above_idle=peak - idle)))


def largest_fitting(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """Largest size in [1, limit] for which ``fits`` holds, assuming it holds below some threshold: doubling from
    ``start``, then bisection to within 1/16 of the answer. 0 if not even size 1 fits."""
    good, size = 0, start
    while size <= limit and fits(size):
        good, size = size, size * 2
    bad = size if size <= limit else None
    while bad is not None and bad - good > max(1, good // 16):
        middle = (good + bad) // 2
        good, bad = (middle, bad) if fits(middle) else (good, middle)
    return good


def max_batch(provider: str, workload: Workload, device: str, limit: int = 8192) -> int:
    """Largest batch (padded to ``workload.seq``) for which a training step runs without running out of memory."""
    trainer = build_provider(provider, build_base_model(workload, device), device, copy_base=False)

    def fits(batch_size: int) -> bool:
        batch = make_batches(dataclasses.replace(workload, batch=batch_size, real_lengths=False), 1,
                             trainer.model.config.vocab_size, device)[0]
        try:
            trainer.step(batch)
            torch.cuda.synchronize()
            return True
        except torch.cuda.OutOfMemoryError:
            return False
        finally:
            trainer.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()

    try:
        return largest_fitting(fits, workload.batch, limit)
    finally:
        trainer.model.cpu()
        torch.cuda.empty_cache()


def matmul_peak_tflops(device: str) -> float:
    """Measured dense-matmul throughput: bf16 on a GPU, fp32 on CPU (the dtype the models compute in there)."""
    n, dtype, reps = (8192, torch.bfloat16, 20) if device == "cuda" else (1024, torch.float32, 5)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    times = []
    for _ in range(reps):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e12


def step_flops(workload: Workload, batch: dict, method: str) -> float:
    """Model FLOPs of one step on the padded batch: the method's own work, recomputation not counted.

    BitFit: forward plus input-gradient GEMMs (no weight gradients); full fine-tuning adds the weight gradients.
    Attention: QK^T and PV forward, twice that backward. Embeddings, pooler and head are negligible.
    """
    hidden, layers, _, inter = SHAPES[workload.model]
    batch_size, width = batch["input_ids"].shape
    tokens = batch_size * width
    gemm = 2 * tokens * layers * (4 * hidden * hidden + 2 * hidden * inter)
    attention = 2 * 2 * tokens * width * hidden * layers
    return (2 if method == "bitfit" else 3) * gemm + 3 * attention


# ------------------------------------------------------------------------------------------------- runner


def environment(command: str) -> dict:
    import transformers

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += "-dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads"
    return dict(device=device, torch=torch.__version__, triton=triton_version, transformers=transformers.__version__,
                python=platform.python_version(), commit=commit, command=command,
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


def _spread(times: list[float]) -> dict:
    ordered = sorted(times)
    quartile = max(1, len(ordered) // 4)
    return dict(median_ms=1e3 * statistics.median(ordered), q1_ms=1e3 * ordered[quartile - 1],
                q3_ms=1e3 * ordered[-quartile], min_ms=1e3 * ordered[0], steps=len(ordered))


def run_workload(workload: Workload, preset: Preset, peak_tflops: float, log=print) -> dict:
    device = preset.device
    base = build_base_model(workload, device)
    vocab = base.config.vocab_size
    trainers = {name: build_provider(name, base, device) for name in preset.providers}
    del base
    batches = make_batches(workload, preset.warmup + preset.repeats, vocab, device)
    times: dict[str, list[float]] = {name: [] for name in trainers}
    losses = {}
    names = list(trainers)
    for index, batch in enumerate(batches):
        # Rotate the order so no provider always runs first (caches, clocks) and drift cancels.
        for name in names[index % len(names):] + names[: index % len(names)]:
            seconds, loss = timed(trainers[name].step, batch, device)
            if index >= preset.warmup:
                times[name].append(seconds)
            losses[name] = loss
    for name, loss in losses.items():
        if not torch.isfinite(loss):
            raise RuntimeError(f"{name} produced a non-finite loss on {workload.name}: the timing is void")

    timed_batches = batches[preset.warmup:]
    real = sum(real_tokens(b) for b in timed_batches) / len(timed_batches)
    padded = sum(padded_tokens(b) for b in timed_batches) / len(timed_batches)
    results = {}
    for name, trainer in trainers.items():
        stats = _spread(times[name])
        seconds = stats["median_ms"] / 1e3
        flops = statistics.mean(step_flops(workload, b, trainer.method) for b in timed_batches)
        stats.update(tokens_per_s=padded / seconds, real_tokens_per_s=real / seconds,
                     mfu=flops / seconds / (peak_tflops * 1e12), model_flops_per_step=flops)
        if device == "cuda":
            stats["peak_memory_bytes"] = gpu_peak_bytes(trainer, batches[-1])
        results[name] = stats
    del trainers
    if device == "cuda":
        torch.cuda.empty_cache()
    else:
        for name in preset.providers:
            probe = cpu_peak_rss(name, workload)
            results[name].update(peak_rss_bytes=probe["peak_rss"], peak_memory_bytes=probe["above_idle"])
    if preset.max_batch and device == "cuda" and not workload.real_lengths and workload == preset.workloads[0]:
        for name in preset.providers:
            results[name]["max_batch"] = max_batch(name, workload, device)
    add_ratios(results)
    log(format_workload(workload.name, results))
    return dict(workload=workload.name, spec=dataclasses.asdict(workload), real_tokens_per_step=real,
                padded_tokens_per_step=padded, providers=results)


def add_ratios(results: dict) -> None:
    """Every provider against the reference eager: speedup (>1 is faster), memory and max-batch ratios."""
    ref = results.get("reference")
    if ref is None:
        return
    for stats in results.values():
        stats["speedup_vs_reference"] = ref["median_ms"] / stats["median_ms"]
        if "peak_memory_bytes" in stats and ref.get("peak_memory_bytes"):
            stats["memory_vs_reference"] = stats["peak_memory_bytes"] / ref["peak_memory_bytes"]
        if "max_batch" in stats and ref.get("max_batch"):
            stats["max_batch_vs_reference"] = stats["max_batch"] / ref["max_batch"]


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


def run(preset_name: str, command: str, providers: list[str] | None = None, log=print) -> dict:
    preset = PRESETS[preset_name]
    if providers:
        unknown = sorted(set(providers) - set(PROVIDERS))
        if unknown:
            raise ValueError(f"unknown providers {unknown}; known: {sorted(PROVIDERS)}")
        preset = dataclasses.replace(preset, providers=list(providers))
    if preset.device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"preset {preset_name!r} needs a CUDA GPU; use --preset cpu-small on this machine")
    record = environment(command)
    record.update(preset=preset_name, providers={p: PROVIDERS[p] for p in preset.providers},
                  matmul_peak_tflops=matmul_peak_tflops(preset.device),
                  matmul_peak_dtype="bfloat16" if preset.device == "cuda" else "float32",
                  memory_method=(
                      "resident state (parameters, buffers, optimizer state) + the step's peak allocation above it"
                      if preset.device == "cuda" else
                      "peak RSS above the idle process (after imports), one fresh process per provider"))
    log(f"{record['device']} | matmul peak {record['matmul_peak_tflops']:.2f} TFLOP/s ({record['matmul_peak_dtype']})")
    record["workloads"] = [run_workload(w, preset, record["matmul_peak_tflops"], log) for w in preset.workloads]
    record["goals"] = check_goals(record, preset.device)
    return record


# ----------------------------------------------------------------------------------------- reporting


def format_workload(name: str, results: dict) -> str:
    lines = [f"\n{name}", "| provider | median ms (IQR) | tokens/s | real tokens/s | MFU | peak memory | speedup | memory ratio | max batch |",
             "|---|---|---|---|---|---|---|---|---|"]
    for provider, s in results.items():
        memory = f"{s['peak_memory_bytes'] / 2**20:.0f} MiB" if "peak_memory_bytes" in s else "-"
        ratio = f"{s['memory_vs_reference']:.2f}x" if "memory_vs_reference" in s else "-"
        speed = f"{s['speedup_vs_reference']:.2f}x" if "speedup_vs_reference" in s else "-"
        lines.append(
            f"| {provider} | {s['median_ms']:.1f} ({s['q1_ms']:.1f}–{s['q3_ms']:.1f}) | {s['tokens_per_s']:,.0f} | "
            f"{s['real_tokens_per_s']:,.0f} | {100 * s['mfu']:.1f}% | {memory} | {speed} | {ratio} | {s.get('max_batch', '-')} |"
        )
    return "\n".join(lines)


def markdown(record: dict) -> str:
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
        if not w["spec"]["real_lengths"]:
            spec = w["spec"]
            sweeps.setdefault(f"{spec['arch']}-{spec['model'].split('-')[1]} seq {spec['seq']}", []).append(w)
    fig, axes = plt.subplots(2, max(1, len(sweeps)), figsize=(5 * max(1, len(sweeps)), 8), squeeze=False)
    for column, (title, workloads) in enumerate(sweeps.items()):
        for provider in record["providers"]:
            xs = [w["spec"]["batch"] for w in workloads]
            axes[0][column].plot(xs, [w["providers"][provider]["tokens_per_s"] for w in workloads], marker="o", label=provider)
            axes[1][column].plot(xs, [w["providers"][provider].get("peak_memory_bytes", math.nan) / 2**20 for w in workloads],
                                 marker="o", label=provider)
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
    records = [json.loads(p.read_text()) for p in sorted(results_dir.glob("*.json"))]
    if not records:
        return "No benchmark results are committed yet.\n"
    return "\n".join(markdown(r) for r in records)


def update_readme(readme: Path, results_dir: Path) -> None:
    text = readme.read_text()
    start, end = text.index(README_START) + len(README_START), text.index(README_END)
    readme.write_text(text[:start] + "\n" + readme_section(results_dir) + text[end:])


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--rss-probe":
    _rss_probe(sys.argv[2])
